//! Waiting for processes without a monitor per container: the daemon waits on a
//! pidfd for each process it started, and for processes it re-adopted after a restart.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use tokio::io::unix::AsyncFd;

/// How a waited-for process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exit code, or 128 + signal number when killed (shell convention).
    Code(i32),
    /// Not our child (re-adopted after a daemon restart): it ended, but how is unknown.
    Unknown,
}

impl Exit {
    pub fn code(self) -> Option<i32> {
        match self {
            Exit::Code(c) => Some(c),
            Exit::Unknown => None,
        }
    }
}

/// Marks the daemon a child subreaper, so that no descendant escapes to the host's init.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until `pid` ends and reaps it if it is our child.
pub async fn wait(pid: i32) -> Exit {
    let fd = match pidfd_open(pid) {
        Ok(fd) => fd,
        // Already gone and reaped (or never ours).
        Err(_) => return Exit::Unknown,
    };
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same.
    if let Ok(afd) = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) } {
        // A pidfd turns readable when the process exits.
        let _ = afd.readable().await.map(|mut g| g.retain_ready());
        return reap(afd.get_ref());
    }
    Exit::Unknown
}

fn reap(pidfd: &OwnedFd) -> Exit {
    // SAFETY: siginfo_t is plain data, filled by waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on a pidfd we own, writing into `info`.
    let rc = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED,
        )
    };
    if rc != 0 {
        return Exit::Unknown; // ECHILD: not our child
    }
    // SAFETY: waitid filled a SIGCHLD siginfo, whose status field is valid.
    let status = unsafe { info.si_status() };
    match info.si_code {
        libc::CLD_EXITED => Exit::Code(status),
        _ => Exit::Code(128 + status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exit_codes_and_signals() {
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap();
        assert_eq!(wait(child.id() as i32).await, Exit::Code(3));
        let child = std::process::Command::new("sh")
            .args(["-c", "kill -9 $$"])
            .spawn()
            .unwrap();
        assert_eq!(wait(child.id() as i32).await, Exit::Code(137));
    }

    #[tokio::test]
    async fn not_our_child_is_unknown() {
        // A grandchild: its parent `sh` reports its pid, and we are not its parent.
        let out = std::process::Command::new("sh")
            .args(["-c", "sleep 0.3 & echo $!"])
            .output()
            .unwrap();
        let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert_eq!(wait(pid).await, Exit::Unknown);
    }
}
