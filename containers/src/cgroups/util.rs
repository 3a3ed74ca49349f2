//! File helpers shared by the v1 and v2 managers.

use std::io::{Error, ErrorKind, Result, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// Writes a control file that must already exist (cgroupfs never lets us create one).
pub fn write(path: &Path, value: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| ctx(e, "open", path))?;
    f.write_all(value.as_bytes())
        .map_err(|e| ctx(e, &format!("write {value:?} to"), path))
}

pub fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| ctx(e, "read", path))
}

pub fn read_u64(path: &Path) -> Result<u64> {
    let s = read(path)?;
    s.trim().parse().map_err(|_| {
        Error::new(
            ErrorKind::InvalidData,
            format!("{}: not a number: {s:?}", path.display()),
        )
    })
}

pub fn ctx(e: Error, what: &str, path: &Path) -> Error {
    Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Pids listed in a `cgroup.procs` file; a missing file is an empty group.
pub fn read_procs(path: &Path) -> Result<Vec<i32>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect()),
        // A group removed meanwhile (ENODEV while it goes) holds no process.
        Err(e) if e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV) => {
            Ok(Vec::new())
        }
        Err(e) => Err(ctx(e, "read", path)),
    }
}

/// Appends the processes of the group at `dir` and of every group below it (a nesting
/// container's own sub-groups) to `out`.
pub fn subtree_procs(dir: &Path, out: &mut Vec<i32>) -> Result<()> {
    out.extend(read_procs(&dir.join("cgroup.procs"))?);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                subtree_procs(&e.path(), out)?;
            }
        }
    }
    Ok(())
}

/// Removes `dir` and every cgroup below it, deepest first; a missing dir is fine.
/// `rmdir` may see EBUSY for a moment after the last task exits, so it retries.
pub fn remove_tree(dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ctx(e, "read dir", dir)),
    };
    for e in entries.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_tree(&e.path())?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(ctx(e, "rmdir", dir)),
        }
    }
}

/// One rmdir of a cgroup directory: true if it is gone now. The kernel refuses a group
/// with processes or sub-groups (EBUSY), whatever control files it holds.
pub fn remove_if_empty(dir: &Path) -> bool {
    match std::fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) => e.kind() == ErrorKind::NotFound,
    }
}

/// Hands `dir` and its `files` to `uid:gid`, so that they may create sub-groups and move
/// processes between them, while the group's own limit files stay root's.
pub fn delegate(dir: &Path, files: &[&str], uid: u32, gid: u32) -> Result<()> {
    let own = |p: &Path| {
        std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(|e| ctx(e, "chown", p))
    };
    own(dir)?;
    for f in files {
        let p = dir.join(f);
        if p.exists() {
            own(&p)?;
        }
    }
    Ok(())
}

/// Whether we run in a user namespace other than the initial one, where the kernel refuses
/// some cgroup v1 writes (device rules) that only the host's root may make.
pub fn in_user_namespace() -> bool {
    std::fs::read_to_string("/proc/self/uid_map")
        .map(|m| m.split_whitespace().collect::<Vec<_>>() != ["0", "0", "4294967295"])
        .unwrap_or(false)
}

/// SIGKILLs every listed process (ESRCH ignored).
pub fn kill_pids(pids: &[i32]) {
    for &p in pids {
        if p > 0 {
            // SAFETY: plain syscall on a pid number.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }
}

/// Polls `procs` until it returns no pid; kills stragglers with `kill` on each round.
pub fn wait_empty(
    mut procs: impl FnMut() -> Result<Vec<i32>>,
    mut kill: impl FnMut(&[i32]),
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(1);
    loop {
        let p = procs()?;
        if p.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::new(
                ErrorKind::TimedOut,
                format!("cgroup still has processes {p:?} after {timeout:?}"),
            ));
        }
        kill(&p);
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_if_empty_takes_only_an_empty_dir() {
        let t = tempfile::tempdir().unwrap();
        let full = t.path().join("full");
        std::fs::create_dir_all(full.join("sub")).unwrap();
        assert!(!remove_if_empty(&full), "a dir with a sub-dir stays");
        assert!(full.join("sub").is_dir());
        assert!(remove_if_empty(&full.join("sub")));
        assert!(remove_if_empty(&full));
        assert!(!full.exists());
        assert!(remove_if_empty(&full), "a missing dir counts as removed");
    }
}
