//! One cgroup interface with v1 (incl. hybrid) and v2 implementations.
//! Paths are always relative to each hierarchy's ROOT, never to our own cgroup.

mod util;
pub mod v1;
pub mod v2;

use crate::mountinfo::{self, MountInfo};
use crate::spec::Limits;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// v1 controllers plus a cgroup2 mount at /sys/fs/cgroup/unified (this host).
    V1Hybrid,
    V1,
    V2,
}

impl Layout {
    pub fn detect() -> Layout {
        match mountinfo::read_self() {
            Ok(m) => Self::from_mounts(&m),
            Err(_) => Layout::V2,
        }
    }

    /// The layout that a mount table describes.
    pub fn from_mounts(mounts: &[MountInfo]) -> Layout {
        let root = std::path::Path::new("/sys/fs/cgroup");
        if mounts
            .iter()
            .any(|m| m.mount_point == root && m.fs_type == "cgroup2")
        {
            return Layout::V2;
        }
        let has_v1 = !v1::hierarchies(mounts).is_empty();
        let has_v2 = mounts.iter().any(|m| m.fs_type == "cgroup2");
        match (has_v1, has_v2) {
            (true, true) => Layout::V1Hybrid,
            (true, false) => Layout::V1,
            // A cgroup2 mount elsewhere, or nothing at all: v2 is the modern default.
            (false, _) => Layout::V2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Layout::V1Hybrid => "v1-hybrid",
            Layout::V1 => "v1",
            Layout::V2 => "v2",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub memory_bytes: u64,
    pub memory_limit: Option<u64>,
    pub pids: u64,
    pub cpu_usage_ns: u64,
}

pub trait CgroupManager: Send + Sync {
    fn create(&self) -> std::io::Result<()>;
    fn add_process(&self, pid: i32) -> std::io::Result<()>;
    fn apply(&self, limits: &Limits) -> std::io::Result<()>;
    fn stats(&self) -> std::io::Result<Stats>;
    /// The processes in the group and in its sub-groups (a nesting container's own).
    fn processes(&self) -> std::io::Result<Vec<i32>>;
    /// SIGKILL every process in the group and wait until it is empty.
    fn kill_all(&self) -> std::io::Result<()>;
    /// Remove the group's directories; a missing group is fine.
    fn remove(&self) -> std::io::Result<()>;
    /// Removes the group with one rmdir per directory if it has neither processes nor
    /// sub-groups (or is gone); false if any directory stays, for `kill_all` + `remove`.
    fn remove_if_empty(&self) -> bool;
    fn exists(&self) -> bool;
    /// Lets `uid:gid` (a container's root) manage sub-groups of the group: what LXC and
    /// systemd call delegation. The group's own limits stay out of its reach.
    fn delegate(&self, uid: u32, gid: u32) -> std::io::Result<()>;
    /// The group's cgroup v2 directory, where a process can be cloned straight into
    /// (CLONE_INTO_CGROUP); `None` for v1.
    fn v2_dir(&self) -> Option<std::path::PathBuf> {
        None
    }
    /// v1: the `tasks` file of each hierarchy. A single-threaded process that writes "0"
    /// there moves itself without the global lock whose RCU grace period (6 to 16 ms
    /// here) every move by pid waits for. Empty on v2 (CLONE_INTO_CGROUP is free there).
    fn self_move_files(&self) -> std::io::Result<Vec<std::path::PathBuf>> {
        Ok(vec![])
    }
}

/// The manager for `path` (relative to each hierarchy root) on this host's layout.
/// An invalid path (absolute, `..`, empty) makes every operation fail with `InvalidInput`.
pub fn manager(path: &str) -> Box<dyn CgroupManager> {
    let mounts = mountinfo::read_self().unwrap_or_default();
    match Layout::from_mounts(&mounts) {
        Layout::V2 => {
            // /sys/fs/cgroup first: other cgroup2 mounts may be hidden beneath it.
            let std_root = std::path::Path::new("/sys/fs/cgroup");
            let v2: Vec<_> = mounts.iter().filter(|m| m.fs_type == "cgroup2").collect();
            let root = v2
                .iter()
                .find(|m| m.mount_point == std_root)
                .or(v2.first())
                .map(|m| m.mount_point.clone())
                .unwrap_or_else(|| std_root.into());
            Box::new(v2::V2Manager::new(root, path))
        }
        Layout::V1 | Layout::V1Hybrid => {
            Box::new(v1::V1Manager::new(v1::hierarchies(&mounts), path))
        }
    }
}

/// A daemon nested in a container makes its delegated cgroup usable for its own
/// containers (v2 only needs it; see [`v2::claim_delegated_root`]).
pub fn claim_delegated_root() -> std::io::Result<()> {
    if Layout::detect() != Layout::V2 || !util::in_user_namespace() {
        return Ok(());
    }
    v2::claim_delegated_root(std::path::Path::new("/sys/fs/cgroup"))
}

/// CFS quota for `cpus` CPUs over `period_us`, clamped to the kernel's 1 ms minimum.
pub fn cpu_quota_us(cpus: f64, period_us: u64) -> Option<u64> {
    if !cpus.is_finite() || cpus <= 0.0 {
        return None;
    }
    let q = (cpus * period_us as f64).round();
    Some(if q < 1000.0 {
        1000
    } else {
        q.min(u64::MAX as f64 / 2.0) as u64
    })
}

/// Removes the levels above `root`'s groups that a daemon which died while making them
/// left under temporary names (v1 only makes them so).
pub fn remove_unpublished_levels(root: &str) {
    if let Ok(mounts) = mountinfo::read_self() {
        v1::remove_unpublished_levels(&v1::hierarchies(&mounts), root);
    }
}

/// Checks that a cgroup path is relative and stays inside the hierarchy.
pub fn validate_path(path: &str) -> std::io::Result<std::path::PathBuf> {
    use std::path::Component;
    let p = std::path::Path::new(path);
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("invalid cgroup path {path:?}: must be relative, non-empty, without '..'"),
        )
    };
    if path.is_empty() || path.contains('\0') {
        return Err(bad());
    }
    let mut out = std::path::PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => return Err(bad()),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(bad());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_math() {
        assert_eq!(cpu_quota_us(0.5, 100_000), Some(50_000));
        assert_eq!(cpu_quota_us(2.0, 100_000), Some(200_000));
        assert_eq!(cpu_quota_us(0.001, 100_000), Some(1000));
        assert_eq!(cpu_quota_us(0.0, 100_000), None);
        assert_eq!(cpu_quota_us(-1.0, 100_000), None);
        assert_eq!(cpu_quota_us(f64::NAN, 100_000), None);
        assert_eq!(cpu_quota_us(1.234567, 100_000), Some(123_457));
    }

    #[test]
    fn path_validation() {
        assert!(validate_path("ltv/app").is_ok());
        assert_eq!(
            validate_path("./a/b").unwrap(),
            std::path::PathBuf::from("a/b")
        );
        for bad in ["", "/abs", "a/../b", "..", ".", "a\0b"] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn layout_detection() {
        let hybrid = mountinfo::parse(
            "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
             41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n",
        );
        assert_eq!(Layout::from_mounts(&hybrid), Layout::V1Hybrid);
        assert_eq!(Layout::from_mounts(&hybrid[..1]), Layout::V1);
        let v2 = mountinfo::parse("30 23 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        assert_eq!(Layout::from_mounts(&v2), Layout::V2);
        assert_eq!(Layout::from_mounts(&[]), Layout::V2);
    }
}
