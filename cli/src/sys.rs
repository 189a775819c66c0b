//! The binary's only `unsafe`: Linux process calls that `tensor-wasm up`
//! and the proxy need and std does not offer.
#![allow(unsafe_code)]

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

/// Makes the kernel send the child SIGTERM if this process dies, so a
/// supervisor killed with SIGKILL leaves no orphaned fleet behind.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and calls
    // only `prctl`, which is async-signal-safe; it touches no memory of the
    // parent and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes every file and folder this process (and the children it starts)
/// creates from now on readable by its user only: the services' state is
/// the tenants' (`SECURITY.md`, "Files on disk").
pub fn private_files() {
    // SAFETY: `umask` takes an integer, cannot fail, and touches no memory.
    unsafe {
        libc::umask(0o077);
    }
}

/// Sends SIGTERM (a graceful stop) to a child.
pub fn terminate(child: &Child) {
    signal(child, libc::SIGTERM);
}

/// Sends SIGQUIT (hand the sockets over) to a proxy child.
pub fn quit(child: &Child) {
    signal(child, libc::SIGQUIT);
}

/// Signals a child we spawned and have not reaped, so its pid is still ours.
fn signal(child: &Child, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: `kill` takes plain integers; the pid belongs to our unreaped
    // child, so it cannot have been recycled for another process.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Raises this process's soft limit on open files to its hard limit, and
/// answers the limit in force: the proxy sizes its cap on client
/// connections from it, so that they cannot take the descriptors its
/// audit log and executor calls need.
pub fn raise_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` writes one `rlimit` through a pointer to a live
    // local of that type.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `setrlimit` reads one `rlimit` through a pointer to a live
        // local; raising the soft limit up to the hard one needs no
        // privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    lim.rlim_cur
}
