//! Worker processes this process starts (`up`'s workers, `group`'s ranks): the same binary,
//! tied to this process's life, stopped with SIGTERM so they leave the registry cleanly.

use std::process::Stdio;

use tokio::process::{Child, Command};

/// `tessera` (this very binary) with stdin closed and stdout piped (a worker prints its
/// address there), stopped if this process dies or drops it.
pub fn tessera() -> std::io::Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true);
    #[cfg(target_os = "linux")]
    // SAFETY: runs in the child between fork and exec and only calls prctl(2), which is
    // async-signal-safe. It makes the kernel stop the worker if this process dies without
    // cleaning up (SIGKILL), so no orphaned worker keeps its port and memory.
    unsafe {
        cmd.pre_exec(
            || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            },
        );
    }
    Ok(cmd)
}

/// Asks `child` to stop (SIGTERM: a worker drains, revokes its registration and exits). False
/// when it has already been reaped or signals are not available here.
pub fn ask_to_stop(child: &Child) -> bool {
    #[cfg(unix)]
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on a pid this process spawned and has not yet reaped; it touches
        // no memory of ours.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        return true;
    }
    false
}
