//! Waiting for processes without a monitor per container: the daemon waits on a
//! pidfd for each process it started, and for processes it re-adopted after a restart.

use ltv_containers::namespaces::pidfd_open;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
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

/// Sends SIGKILL to `pid` if `is_it` still holds once a pidfd pins the process: a pid
/// from our records may have been reaped, and reused, since they were read.
pub fn kill_pinned(pid: i32, is_it: impl FnOnce() -> bool) -> io::Result<bool> {
    let fd = pidfd_open(pid)?;
    if !is_it() {
        return Ok(false);
    }
    // SAFETY: pidfd_send_signal on our own descriptor, without siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

/// Adopted orphans to reap: a subreaper gets the processes that `exec` started in a
/// container when their helper dies first (setns + fork children skip the container's
/// init). Each is a zombie child of ours inside a deeper pid namespace, never PID 1 there
/// (that is a container init, which `wait` reaps). Our own direct children in our
/// namespace are left to whoever waits for them.
pub fn reap_adopted_orphans() {
    let me = std::process::id() as i32;
    for pid in our_children().unwrap_or_else(every_process) {
        // The short stat file first: most children are alive, and this runs on every SIGCHLD.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if !stat_is_zombie(&stat) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        if is_adopted_zombie(&status, me) {
            // SAFETY: a zombie child of ours; WNOHANG never blocks.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        }
    }
}

/// The children of all our threads (orphans are handed to any live thread), or `None`
/// without CONFIG_PROC_CHILDREN. A zombie missed while the lists change is found next time.
fn our_children() -> Option<Vec<i32>> {
    let mut pids = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        match std::fs::read_to_string(task.path().join("children")) {
            Ok(list) => pids.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && task.path().exists() => {
                return None
            }
            Err(_) => {} // the thread just ended
        }
    }
    Some(pids)
}

/// The state follows the command name, which may itself hold ") ".
fn stat_is_zombie(stat: &str) -> bool {
    stat.rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('Z'))
}

/// Every pid on the system: the slow way, for kernels without the children lists.
fn every_process() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn is_adopted_zombie(status: &str, me: i32) -> bool {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let zombie = field("State:").is_some_and(|s| s.starts_with('Z'));
    let ours = field("PPid:").and_then(|p| p.parse::<i32>().ok()) == Some(me);
    let nspids: Vec<&str> = field("NSpid:")
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    zombie && ours && nspids.len() > 1 && nspids.last() != Some(&"1")
}

/// Reaps adopted orphans shortly after a child exits, and every few seconds. The scan
/// reads every child's stat file: run after each SIGCHLD, it competed with the exits of
/// back-to-back containers, which are nearly all reaped by their own waiters; orphans
/// are rare and can wait a moment.
pub fn spawn_orphan_reaper() {
    tokio::spawn(async {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut chld) = signal(SignalKind::child()) else {
            return;
        };
        loop {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), chld.recv()).await;
            // SIGCHLDs meanwhile are one pending signal: the next round scans once for all.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let _ = tokio::task::spawn_blocking(reap_adopted_orphans).await;
        }
    });
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
    #[allow(clippy::zombie_processes)] // reaped by `wait` through a pidfd
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

    #[test]
    fn adopted_zombies_are_recognised() {
        let status = |state: &str, ppid: i32, nspid: &str| {
            format!("Name:\tsh\nState:\t{state}\nPPid:\t{ppid}\nNSpid:\t{nspid}\n")
        };
        assert!(is_adopted_zombie(&status("Z (zombie)", 10, "500 7"), 10));
        assert!(
            !is_adopted_zombie(&status("Z (zombie)", 10, "500 1"), 10),
            "a container init"
        );
        assert!(
            !is_adopted_zombie(&status("Z (zombie)", 10, "500"), 10),
            "our own namespace"
        );
        assert!(
            !is_adopted_zombie(&status("S (sleeping)", 10, "500 7"), 10),
            "alive"
        );
        assert!(
            !is_adopted_zombie(&status("Z (zombie)", 11, "500 7"), 10),
            "not ours"
        );
    }

    #[test]
    fn zombie_state_from_stat() {
        assert!(stat_is_zombie("42 (a) b) Z 1 42 42 0"));
        assert!(!stat_is_zombie("42 (a) Z) S 1 42 42 0"));
    }

    #[test]
    fn our_children_include_a_new_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        match our_children() {
            Some(pids) => assert!(pids.contains(&pid), "{pid} not in {pids:?}"),
            None => eprintln!("skipped: this kernel has no /proc/PID/task/TID/children"),
        }
        assert!(every_process().contains(&pid));
        child.kill().unwrap();
        child.wait().unwrap();
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
