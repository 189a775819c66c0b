//! Host memory under quotas, so that no tenant can get the executor
//! killed for running out of memory.
//!
//! Two counters, checked before anything is allocated:
//!
//! - each tenant's [`HostUsage`], against its host-memory quota
//!   (`--tenant-host-memory-bytes`);
//! - the executor's [`HostBudget`], the sum over tenants, against what the
//!   process may use (`--host-memory-bytes`; by default three quarters of
//!   the memory limit of its cgroup, or of the machine).
//!
//! What counts: every instance's linear memory, as it is instantiated and
//! grown (a grow past either limit fails, and the guest's `memory.grow`
//! returns -1); and on the CPU backend, where tensors are host memory,
//! every tensor and loaded assets file (charged with the device memory they
//! also count as there). Compiled code, request bodies and job results are
//! bounded by their own limits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why host memory was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostMemoryError {
    #[error(
        "host memory quota exceeded: the tenant holds {used} bytes; {asked} more would pass its {max}"
    )]
    Tenant { used: u64, asked: u64, max: u64 },
    #[error(
        "the executor's host memory is exhausted: {used} bytes held; {asked} more would pass its {max}"
    )]
    Executor { used: u64, asked: u64, max: u64 },
}

/// Adds `n` to `counter` unless that passes `max`; the value before, as
/// the error.
fn add(counter: &AtomicU64, n: u64, max: u64) -> Result<(), u64> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
            cur.checked_add(n).filter(|&v| v <= max)
        })
        .map(|_| ())
}

/// Host memory the whole executor may hold for its tenants.
#[derive(Debug)]
pub struct HostBudget {
    used: AtomicU64,
    max: u64,
}

impl HostBudget {
    pub fn new(max: u64) -> Arc<HostBudget> {
        Arc::new(HostBudget {
            used: AtomicU64::new(0),
            max,
        })
    }

    /// Bytes held now, over every tenant.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> u64 {
        self.max
    }
}

/// One tenant's host memory, against its quota and the executor's budget.
#[derive(Debug)]
pub struct HostUsage {
    used: AtomicU64,
    max: u64,
    budget: Arc<HostBudget>,
}

impl HostUsage {
    pub fn new(max: u64, budget: Arc<HostBudget>) -> HostUsage {
        HostUsage {
            used: AtomicU64::new(0),
            max,
            budget,
        }
    }

    /// Bytes the tenant holds now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `n` bytes from the tenant's quota and the executor's budget,
    /// or neither.
    pub fn reserve(&self, n: u64) -> Result<(), HostMemoryError> {
        add(&self.used, n, self.max).map_err(|used| HostMemoryError::Tenant {
            used,
            asked: n,
            max: self.max,
        })?;
        if let Err(used) = add(&self.budget.used, n, self.budget.max) {
            self.used.fetch_sub(n, Ordering::AcqRel);
            return Err(HostMemoryError::Executor {
                used,
                asked: n,
                max: self.budget.max,
            });
        }
        Ok(())
    }

    /// Gives back what [`reserve`](Self::reserve) took.
    pub fn release(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
        self.budget.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// An instance's resource limits: wasmtime's per-store limits, with every
/// byte of linear memory also charged to the tenant's [`HostUsage`] as the
/// memory is made and grown, and given back when the instance goes.
#[derive(Debug)]
pub struct InstanceLimiter {
    store: wasmtime::StoreLimits,
    host: Arc<HostUsage>,
    /// Bytes charged for this instance's memory.
    charged: u64,
    /// Bytes charged by the last growth, until it is known to have happened.
    pending: u64,
    /// Why host memory was last refused: an instantiation that fails for
    /// it is reported as this.
    pub refused: Option<HostMemoryError>,
}

impl InstanceLimiter {
    pub fn new(store: wasmtime::StoreLimits, host: Arc<HostUsage>) -> InstanceLimiter {
        InstanceLimiter {
            store,
            host,
            charged: 0,
            pending: 0,
            refused: None,
        }
    }

    /// Bytes of linear memory charged for this instance.
    pub fn charged(&self) -> u64 {
        self.charged
    }
}

impl wasmtime::ResourceLimiter for InstanceLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if !self.store.memory_growing(current, desired, maximum)? {
            return Ok(false);
        }
        let more = desired.saturating_sub(current) as u64;
        match self.host.reserve(more) {
            Ok(()) => {
                self.charged += more;
                self.pending = more;
                Ok(true)
            }
            Err(e) => {
                self.refused = Some(e);
                Ok(false)
            }
        }
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.host.release(self.pending);
        self.charged -= self.pending;
        self.pending = 0;
        self.store.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.store.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.store.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.store.instances()
    }

    fn tables(&self) -> usize {
        self.store.tables()
    }

    fn memories(&self) -> usize {
        self.store.memories()
    }
}

impl Drop for InstanceLimiter {
    fn drop(&mut self) {
        self.host.release(self.charged);
    }
}

/// Bytes of memory this process may use: its cgroup's limit (v2
/// `memory.max`, or v1 `memory.limit_in_bytes`) when one is set, else the
/// machine's memory. `None` when neither can be read.
pub fn memory_limit() -> Option<u64> {
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .filter_map(|s| s.trim().parse::<u64>().ok())
    .next();
    let machine = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    match (cgroup, machine) {
        // An unlimited v1 cgroup reports a huge number.
        (Some(c), Some(m)) => Some(c.min(m)),
        (c, m) => c.or(m),
    }
}

/// The default executor budget: three quarters of [`memory_limit`] (the
/// rest is the runtime's own: compiled code, buffers, the allocator's
/// slack), split over `executors` sharing the machine; 8 GiB when the
/// limit cannot be read.
pub fn default_budget(executors: u64) -> u64 {
    memory_limit().map_or(8 << 30, |m| m / 4 * 3) / executors.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_is_held_to_its_quota_and_all_to_the_budget() {
        let budget = HostBudget::new(100);
        let a = HostUsage::new(60, budget.clone());
        let b = HostUsage::new(60, budget.clone());
        a.reserve(60).unwrap();
        assert!(matches!(a.reserve(1), Err(HostMemoryError::Tenant { .. })));
        b.reserve(40).unwrap();
        assert!(matches!(
            b.reserve(1),
            Err(HostMemoryError::Executor { used: 100, .. })
        ));
        assert_eq!(b.used(), 40, "a refusal takes nothing");
        a.release(60);
        b.reserve(20).unwrap();
        assert_eq!(budget.used(), 60);
    }

    #[test]
    fn the_machine_has_a_memory_limit() {
        let m = memory_limit().expect("readable on Linux");
        assert!(m > 64 << 20, "{m}");
        assert!(default_budget(2) <= m / 2);
    }
}
