//! Where the CPU backend's parallel work runs, by priority (`SECURITY.md`,
//! "Tenants and each other").
//!
//! The executor runs the invocations of a tenant that uses more than its
//! share of the cores on *background* threads ([`enter_background`]):
//! threads the kernel schedules as `SCHED_IDLE`, so that any other
//! tenant's thread that wakes up takes the core from them at once, while
//! they still get every core nobody else wants. An op called on such a
//! thread spreads its work over the background pool, whose threads are
//! `SCHED_IDLE` too; an op called on any other thread uses rayon's global
//! pool. OpenBLAS runs single-threaded ([`init`]): its own worker threads
//! would otherwise run every tenant's matmul at normal priority, so the
//! matmul and attention kernels split their rows over these pools
//! themselves.

use std::cell::Cell;
use std::sync::OnceLock;

use crate::deadline;

thread_local! {
    static BACKGROUND: Cell<bool> = const { Cell::new(false) };
}

/// Makes this thread a background one, for good: `SCHED_IDLE` (an
/// unprivileged thread cannot go back), and its ops' parallel work on the
/// background pool. Answers whether the kernel took the policy; the
/// thread counts as background either way.
pub fn enter_background() -> bool {
    BACKGROUND.with(|b| b.set(true));
    crate::sys::sched::idle_this_thread()
}

/// Whether this thread is a background one.
pub fn is_background() -> bool {
    BACKGROUND.with(Cell::get)
}

/// Makes OpenBLAS single-threaded (once): the kernels split their work
/// over the pools themselves.
pub fn init() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(crate::sys::blas::single_threaded);
}

/// The pool background threads spread their work over: as many threads as
/// rayon's global pool, each `SCHED_IDLE`.
fn background_pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("tw-background-{i}"))
            .start_handler(|_| {
                enter_background();
            })
            .build()
            .expect("a thread pool of a few threads starts")
    })
}

/// Runs `f`, whose parallel iterators then use this thread's pool: the
/// background pool on a background thread, rayon's global pool otherwise.
/// This thread's deadline ([`deadline::scope`]) holds inside `f`; `f`'s
/// tasks on other threads must take it along themselves.
pub(crate) fn par<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if is_background() && rayon::current_thread_index().is_none() {
        let d = deadline::current();
        background_pool().install(move || deadline::scope(d, f))
    } else {
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_background_thread_runs_its_parallel_work_on_background_threads() {
        let seen = std::thread::spawn(|| {
            enter_background();
            par(|| {
                use rayon::prelude::*;
                (0..64)
                    .into_par_iter()
                    .map(|_| (is_background(), rayon::current_thread_index().is_some()))
                    .collect::<Vec<_>>()
            })
        })
        .join()
        .unwrap();
        assert!(seen.iter().all(|&(bg, pooled)| bg && pooled), "{seen:?}");
        // Other threads stay where they were.
        assert!(!is_background());
        let normal = par(|| {
            use rayon::prelude::*;
            (0..64)
                .into_par_iter()
                .map(|_| is_background())
                .collect::<Vec<_>>()
        });
        assert!(normal.iter().all(|bg| !bg));
    }
}
