//! Small helpers shared by the registry and the jobs: poison-tolerant locks
//! (a panic elsewhere must not take a tenant's state down with it), ids and
//! timestamps.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn read_lock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn write_lock<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// Now, as RFC 3339 in UTC to the second.
pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// 64 random bits, for new function and job ids.
pub(crate) fn random_bits() -> u64 {
    rand::RngCore::next_u64(&mut rand::thread_rng())
}

/// A counting gate for blocking threads: at most its width pass at once.
/// A tenant's running invocations go through one
/// ([`crate::state::Tenant::running`]).
#[derive(Debug)]
pub struct Gate {
    free: Mutex<usize>,
    opened: std::sync::Condvar,
}

/// A place in a [`Gate`], given back on drop.
#[derive(Debug)]
pub struct Pass<'a>(&'a Gate);

impl Gate {
    /// A gate `width` wide (at least 1).
    pub fn new(width: usize) -> Gate {
        Gate {
            free: Mutex::new(width.max(1)),
            opened: std::sync::Condvar::new(),
        }
    }

    /// Waits for a place, at most `wait`; none when it did not come.
    pub fn enter(&self, wait: std::time::Duration) -> Option<Pass<'_>> {
        let end = std::time::Instant::now() + wait;
        let mut free = lock(&self.free);
        while *free == 0 {
            let left = end.checked_duration_since(std::time::Instant::now())?;
            free = match self.opened.wait_timeout(free, left) {
                Ok((g, _)) => g,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        *free -= 1;
        Some(Pass(self))
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        *lock(&self.0.free) += 1;
        self.0.opened.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_gate_lets_its_width_through_and_times_out_the_rest() {
        let g = Gate::new(2);
        let a = g.enter(Duration::ZERO).unwrap();
        let _b = g.enter(Duration::ZERO).unwrap();
        assert!(g.enter(Duration::from_millis(10)).is_none());
        drop(a);
        assert!(g.enter(Duration::ZERO).is_some());
        // One that waits gets the place given back meanwhile.
        let g = std::sync::Arc::new(Gate::new(1));
        let held = g.enter(Duration::ZERO).unwrap();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| g.enter(Duration::from_secs(60)).is_some());
            std::thread::sleep(Duration::from_millis(20));
            drop(held);
            assert!(waiter.join().unwrap());
        });
    }
}
