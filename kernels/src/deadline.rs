//! The deadline of the invocation whose ops run on this thread: long CPU
//! ops look at it between chunks of their work and stop once it has
//! passed ([`KernelError::DeadlineExceeded`]), so that an op started just
//! before an invocation's deadline does not hold the executor's cores far
//! past it.
//!
//! The executor sets it around each import a guest calls ([`scope`]); ops
//! run outside any scope (tests, tools) have none.

use std::cell::Cell;
use std::time::Instant;

use crate::error::{KernelError, Result};

/// Work between two looks at the deadline, in multiply-adds: about 2^29
/// (5·10^8), some milliseconds of one core's sgemm.
pub(crate) const CHUNK_WORK: usize = 1 << 29;

thread_local! {
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Runs `f` with `deadline` as this thread's, then puts the one before
/// back (also when `f` panics).
pub fn scope<R>(deadline: Option<Instant>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Instant>);
    impl Drop for Restore {
        fn drop(&mut self) {
            DEADLINE.with(|d| d.set(self.0));
        }
    }
    let _restore = Restore(DEADLINE.with(|d| d.replace(deadline)));
    f()
}

/// This thread's deadline, if any.
pub fn current() -> Option<Instant> {
    DEADLINE.with(Cell::get)
}

/// An error if this thread's deadline has passed.
pub(crate) fn check(op: &'static str) -> Result<()> {
    match current() {
        Some(d) if Instant::now() >= d => Err(KernelError::DeadlineExceeded { op }),
        _ => Ok(()),
    }
}

/// Rows of an `m`-row operand per chunk when each row costs `row_work`
/// multiply-adds: at least one.
pub(crate) fn rows_per_chunk(m: usize, row_work: usize) -> usize {
    (CHUNK_WORK / row_work.max(1)).clamp(1, m.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_scope_sets_and_restores_the_deadline() {
        assert_eq!(current(), None);
        let d = Instant::now() + Duration::from_secs(60);
        scope(Some(d), || {
            assert_eq!(current(), Some(d));
            assert!(check("x").is_ok());
            scope(Some(Instant::now()), || {
                assert!(matches!(
                    check("x"),
                    Err(KernelError::DeadlineExceeded { op: "x" })
                ));
            });
            assert_eq!(current(), Some(d));
        });
        assert_eq!(current(), None);
        let caught = std::panic::catch_unwind(|| scope(Some(d), || panic!("op")));
        assert!(caught.is_err());
        assert_eq!(current(), None, "restored after a panic");
    }

    #[test]
    fn chunks_hold_at_least_a_row() {
        assert_eq!(rows_per_chunk(8192, 8192 * 8192), 8);
        assert_eq!(rows_per_chunk(10, 1 << 40), 1);
        assert_eq!(rows_per_chunk(10, 1), 10);
        assert_eq!(rows_per_chunk(0, 5), 1);
    }
}
