//! The crate's only unsafe code: two thin wrappers over process system calls that std and tokio
//! don't offer (dying with the parent, signalling a process group).

use std::io;

/// Makes the child spawned by `command` die (SIGKILL) when the spawning thread exits, so that
/// Flotilla crashing or being SIGKILLed never leaves orphaned services holding ports.
///
/// Linux delivers `PR_SET_PDEATHSIG` when the *thread* that forked the child exits, not the whole
/// process. Children must therefore be spawned from async tasks running on the runtime's worker
/// threads, which live as long as the runtime; never from `spawn_blocking` (its threads exit after
/// being idle for a while, killing every child they forked) nor inside `block_in_place`.
#[allow(unsafe_code)]
pub(crate) fn die_with_parent(command: &mut tokio::process::Command) {
    #[cfg(target_os = "linux")]
    {
        // Captured before the fork: in the child, `getppid()` must still be this.
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
        // functions may be called. It calls prctl, getppid and _exit, all async-signal-safe, and
        // allocates nothing (`last_os_error` only reads errno).
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) == -1 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl, in which case the signal was
                // never going to come: the child has already been re-parented.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

/// Sends `signal` to every process in the process group `pgid` (0 only checks that one exists).
pub(crate) fn signal_group(pgid: u32, signal: i32) -> io::Result<()> {
    kill(-checked_pid(pgid)?, signal)
}

/// Sends `signal` to the single process `pid` (0 only checks that it exists).
#[cfg(test)]
pub(crate) fn signal_process(pid: u32, signal: i32) -> io::Result<()> {
    kill(checked_pid(pid)?, signal)
}

/// Refuses 0 and 1, which as negated targets would mean "our own group" and "every process".
fn checked_pid(pid: u32) -> io::Result<libc::pid_t> {
    libc::pid_t::try_from(pid)
        .ok()
        .filter(|&p| p > 1)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("bad pid {pid}")))
}

#[allow(unsafe_code)]
fn kill(target: libc::pid_t, signal: i32) -> io::Result<()> {
    // SAFETY: kill(2) touches no memory of ours; callers have ruled out the broadcast targets.
    if unsafe { libc::kill(target, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
