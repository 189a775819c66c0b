//! Scheduling policy of the calling thread.

/// Makes the calling thread `SCHED_IDLE`: it runs only when no other
/// thread wants its core. Answers whether the kernel took it.
pub(crate) fn idle_this_thread() -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `sched_setscheduler` reads one `sched_param` through a pointer
    // to a live local; pid 0 is the calling thread. Lowering one's own
    // priority needs no privilege.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0 }
}
