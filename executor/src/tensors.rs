//! An instance's tensor table and a tenant's usage counters.
//!
//! Guests hold tensors as `i32` handles (> 0) that they keep in linear
//! memory, so handle numbers are stable for the life of an instance and are
//! restored as they were after a migration. Every tensor a guest creates
//! counts against its tenant's device-memory and live-tensor quotas until it
//! is freed or its instance dies; assets are counted once, at registration,
//! and never per instance.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tensor_wasm_kernels::{KernelError, Tensor};
use tensor_wasm_shared::AbiError;

use crate::memory::HostUsage;
use crate::sync::lock;

/// A failed guest ABI call: the code the guest sees and the message
/// `last_error` gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbiFailure {
    pub code: AbiError,
    pub message: String,
}

impl AbiFailure {
    pub fn new(code: AbiError, message: impl Into<String>) -> Self {
        AbiFailure {
            code,
            message: message.into(),
        }
    }
}

impl From<KernelError> for AbiFailure {
    fn from(e: KernelError) -> Self {
        AbiFailure::new(e.abi(), e.to_string())
    }
}

/// What a tenant's tensors use, against its quotas. Shared by all of the
/// tenant's instances.
#[derive(Debug)]
pub struct TenantUsage {
    bytes: AtomicU64,
    tensors: AtomicU64,
    max_bytes: u64,
    max_tensors: u64,
    /// Where tensors live in host memory (the CPU backend), the tenant's
    /// host memory too, charged first.
    host: Option<Arc<HostUsage>>,
}

impl TenantUsage {
    pub fn new(max_bytes: u64, max_tensors: u64) -> Self {
        TenantUsage {
            bytes: AtomicU64::new(0),
            tensors: AtomicU64::new(0),
            max_bytes,
            max_tensors,
            host: None,
        }
    }

    /// The same quotas, every byte also charged to `host` (tensors that
    /// live in host memory).
    pub fn in_host_memory(self, host: Arc<HostUsage>) -> Self {
        TenantUsage {
            host: Some(host),
            ..self
        }
    }

    /// Device bytes held now.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Live tensors now (assets excluded).
    pub fn tensors(&self) -> u64 {
        self.tensors.load(Ordering::Relaxed)
    }

    /// Takes `bytes` of device memory, and one tensor unless `asset`.
    pub fn reserve(&self, bytes: u64, asset: bool) -> Result<(), AbiFailure> {
        let add = |counter: &AtomicU64, n: u64, max: u64, what: &str| {
            counter
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                    cur.checked_add(n).filter(|&v| v <= max)
                })
                .map(|_| ())
                .map_err(|cur| {
                    AbiFailure::new(
                        AbiError::QuotaExceeded,
                        format!("{what} quota exceeded: {cur} in use + {n} > {max}"),
                    )
                })
        };
        if let Some(host) = &self.host {
            host.reserve(bytes)
                .map_err(|e| AbiFailure::new(AbiError::QuotaExceeded, e.to_string()))?;
        }
        let release_host = || {
            if let Some(host) = &self.host {
                host.release(bytes);
            }
        };
        if let Err(e) = add(&self.bytes, bytes, self.max_bytes, "device memory") {
            release_host();
            return Err(e);
        }
        if !asset && let Err(e) = add(&self.tensors, 1, self.max_tensors, "live tensor") {
            self.bytes.fetch_sub(bytes, Ordering::AcqRel);
            release_host();
            return Err(e);
        }
        Ok(())
    }

    /// Gives back what [`TenantUsage::reserve`] took.
    pub fn release(&self, bytes: u64, asset: bool) {
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        if !asset {
            self.tensors.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(host) = &self.host {
            host.release(bytes);
        }
    }
}

#[derive(Debug)]
struct Slot {
    tensor: Tensor,
    /// Set for asset handles, which count against no quota here.
    asset: bool,
    /// Which tensor this is, among all the table ever held: a handle reused
    /// for another tensor gets another serial.
    serial: u64,
}

/// The table's contents, behind the lock that [`TableView`] shares.
#[derive(Debug, Default)]
struct Slots {
    slots: BTreeMap<i32, Slot>,
    assets: HashMap<String, i32>,
    next: i32,
    serials: u64,
}

impl Slots {
    fn fresh_handle(&mut self) -> i32 {
        // Handles grow until i32::MAX, then the lowest free one is reused;
        // the live-tensor quota keeps the table far smaller than that.
        if self.next < i32::MAX && !self.slots.contains_key(&self.next) {
            let h = self.next;
            self.next += 1;
            return h;
        }
        (1..=i32::MAX)
            .find(|h| !self.slots.contains_key(h))
            .unwrap_or(i32::MAX)
    }

    fn put(&mut self, h: i32, tensor: Tensor, asset: bool) {
        self.serials += 1;
        let serial = self.serials;
        self.slots.insert(
            h,
            Slot {
                tensor,
                asset,
                serial,
            },
        );
    }
}

/// One instance's live tensors by handle.
///
/// The instance changes it; a migration reads it while the instance runs
/// through a [`TableView`]: the contents sit behind a lock that each access
/// takes briefly (uncontended but for a migration's listing).
#[derive(Debug)]
pub struct TensorTable {
    inner: Arc<Mutex<Slots>>,
    usage: Arc<TenantUsage>,
}

/// One entry of a [`TableView::listing`].
#[derive(Clone, Debug)]
pub struct TableEntry {
    pub handle: i32,
    pub serial: u64,
    pub tensor: Tensor,
    /// The asset's name, for an asset handle.
    pub asset: Option<String>,
}

/// A reader of an instance's tensor table, held apart from the instance.
#[derive(Clone, Debug)]
pub struct TableView(Arc<Mutex<Slots>>);

impl TableView {
    /// Every handle with its tensor, in handle order.
    pub fn listing(&self) -> Vec<TableEntry> {
        let s = lock(&self.0);
        let names: HashMap<i32, &String> = s.assets.iter().map(|(n, h)| (*h, n)).collect();
        s.slots
            .iter()
            .map(|(&handle, slot)| TableEntry {
                handle,
                serial: slot.serial,
                tensor: slot.tensor.clone(),
                asset: slot
                    .asset
                    .then(|| names.get(&handle).map(|n| (*n).clone()))
                    .flatten(),
            })
            .collect()
    }
}

fn bad_handle(h: i32) -> AbiFailure {
    AbiFailure::new(AbiError::BadHandle, format!("no tensor has handle {h}"))
}

impl TensorTable {
    pub fn new(usage: Arc<TenantUsage>) -> Self {
        TensorTable {
            inner: Arc::new(Mutex::new(Slots {
                next: 1,
                ..Slots::default()
            })),
            usage,
        }
    }

    pub fn usage(&self) -> &Arc<TenantUsage> {
        &self.usage
    }

    /// A reader of this table that outlives no tensor: it clones what it
    /// lists.
    pub fn view(&self) -> TableView {
        TableView(self.inner.clone())
    }

    /// A tensor by handle.
    pub fn get(&self, h: i32) -> Result<Tensor, AbiFailure> {
        lock(&self.inner)
            .slots
            .get(&h)
            .map(|s| s.tensor.clone())
            .ok_or_else(|| bad_handle(h))
    }

    /// Stores a new tensor, charging its tenant, and returns its handle.
    pub fn insert(&mut self, tensor: Tensor) -> Result<i32, AbiFailure> {
        self.usage.reserve(tensor.nbytes(), false)?;
        let mut s = lock(&self.inner);
        let h = s.fresh_handle();
        s.put(h, tensor, false);
        Ok(h)
    }

    /// The handle of asset `name`, inserting `tensor` the first time.
    pub fn asset(
        &mut self,
        name: &str,
        tensor: impl FnOnce() -> Option<Tensor>,
    ) -> Result<i32, AbiFailure> {
        let mut s = lock(&self.inner);
        if let Some(&h) = s.assets.get(name) {
            return Ok(h);
        }
        let tensor = tensor().ok_or_else(|| {
            AbiFailure::new(AbiError::NameNotFound, format!("no asset named {name:?}"))
        })?;
        let h = s.fresh_handle();
        s.put(h, tensor, true);
        s.assets.insert(name.to_string(), h);
        Ok(h)
    }

    /// Frees a handle; freeing an asset handle only forgets it.
    pub fn free(&mut self, h: i32) -> Result<(), AbiFailure> {
        let mut s = lock(&self.inner);
        let slot = s.slots.remove(&h).ok_or_else(|| bad_handle(h))?;
        if slot.asset {
            s.assets.retain(|_, v| *v != h);
        } else {
            drop(s);
            self.usage.release(slot.tensor.nbytes(), false);
        }
        Ok(())
    }

    /// Puts a tensor under a known handle (snapshot import, migration),
    /// replacing what the handle held. Charges the tenant like
    /// [`TensorTable::insert`].
    pub fn restore(&mut self, h: i32, tensor: Tensor) -> Result<(), AbiFailure> {
        if h <= 0 {
            return Err(AbiFailure::new(
                AbiError::BadHandle,
                format!("handle {h} cannot be restored"),
            ));
        }
        self.usage.reserve(tensor.nbytes(), false)?;
        let mut s = lock(&self.inner);
        if let Some(old) = s.slots.remove(&h) {
            s.assets.retain(|_, v| *v != h);
            if !old.asset {
                self.usage.release(old.tensor.nbytes(), false);
            }
        }
        s.put(h, tensor, false);
        s.next = s.next.max(h.saturating_add(1));
        Ok(())
    }

    /// Puts an asset handle under its number (snapshot import, migration),
    /// replacing what the handle held.
    pub fn restore_asset(&mut self, name: &str, h: i32, tensor: Tensor) -> Result<(), AbiFailure> {
        let mut s = lock(&self.inner);
        if h <= 0 || s.assets.get(name).is_some_and(|&other| other != h) {
            return Err(AbiFailure::new(
                AbiError::BadHandle,
                format!("asset handle {h} cannot be restored"),
            ));
        }
        if let Some(old) = s.slots.remove(&h)
            && !old.asset
        {
            self.usage.release(old.tensor.nbytes(), false);
        }
        s.put(h, tensor, true);
        s.assets.insert(name.to_string(), h);
        s.next = s.next.max(h.saturating_add(1));
        Ok(())
    }

    /// Every guest-owned tensor with its handle, in handle order (assets
    /// excluded: they travel with their function).
    pub fn owned(&self) -> Vec<(i32, Tensor)> {
        lock(&self.inner)
            .slots
            .iter()
            .filter(|(_, s)| !s.asset)
            .map(|(h, s)| (*h, s.tensor.clone()))
            .collect()
    }

    /// Asset handles by name.
    pub fn asset_handles(&self) -> HashMap<String, i32> {
        lock(&self.inner).assets.clone()
    }

    pub fn len(&self) -> usize {
        lock(&self.inner).slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for TensorTable {
    fn drop(&mut self) {
        let mut s = lock(&self.inner);
        for slot in std::mem::take(&mut s.slots)
            .into_values()
            .filter(|s| !s.asset)
        {
            self.usage.release(slot.tensor.nbytes(), false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensor_wasm_kernels::{Backend, CpuBackend, DType};

    #[test]
    fn quotas_are_charged_and_released() {
        let usage = Arc::new(TenantUsage::new(100, 2));
        let b = CpuBackend::default();
        let mut t = TensorTable::new(usage.clone());
        let h1 = t.insert(b.zeros(DType::F32, &[10]).unwrap()).unwrap();
        assert_eq!((usage.bytes(), usage.tensors()), (40, 1));
        let e = t.insert(b.zeros(DType::F32, &[20]).unwrap()).unwrap_err();
        assert_eq!(e.code, AbiError::QuotaExceeded);
        let h2 = t.insert(b.zeros(DType::U8, &[10]).unwrap()).unwrap();
        let e = t.insert(b.zeros(DType::U8, &[1]).unwrap()).unwrap_err();
        assert_eq!(e.code, AbiError::QuotaExceeded, "tensor count");
        assert_ne!(h1, h2);
        t.free(h1).unwrap();
        assert_eq!(t.free(h1).unwrap_err().code, AbiError::BadHandle);
        assert_eq!((usage.bytes(), usage.tensors()), (10, 1));
        drop(t);
        assert_eq!((usage.bytes(), usage.tensors()), (0, 0));
    }

    #[test]
    fn assets_keep_one_handle_and_cost_nothing() {
        let usage = Arc::new(TenantUsage::new(0, 0));
        let b = CpuBackend::default();
        let w = b.zeros(DType::F32, &[4]).unwrap();
        let mut t = TensorTable::new(usage.clone());
        let h = t.asset("w", || Some(w.clone())).unwrap();
        assert_eq!(t.asset("w", || None).unwrap(), h);
        assert_eq!(
            t.asset("x", || None).unwrap_err().code,
            AbiError::NameNotFound
        );
        assert_eq!(usage.bytes(), 0);
        t.free(h).unwrap();
        assert_ne!(t.asset("w", || Some(w.clone())).unwrap(), h);
    }

    #[test]
    fn restored_handles_keep_their_numbers() {
        let usage = Arc::new(TenantUsage::new(1 << 20, 100));
        let b = CpuBackend::default();
        let mut t = TensorTable::new(usage.clone());
        t.restore(7, b.zeros(DType::I32, &[2]).unwrap()).unwrap();
        // A later migration round names the handle again, for the tensor
        // it holds now: that one replaces the first, charged instead.
        t.restore(7, b.zeros(DType::I32, &[3]).unwrap()).unwrap();
        assert_eq!(t.get(7).unwrap().dims(), [3]);
        assert_eq!((usage.bytes(), usage.tensors()), (12, 1));
        assert!(t.restore(0, b.zeros(DType::I32, &[1]).unwrap()).is_err());
        let next = t.insert(b.zeros(DType::I32, &[1]).unwrap()).unwrap();
        assert_eq!(next, 8);
    }
}
