//! cgroup v1: one directory per mounted hierarchy, all with the same relative path.

use super::util::{self, ctx};
use super::{CgroupManager, Stats};
use crate::mountinfo::MountInfo;
use crate::spec::Limits;
use std::io::{Error, ErrorKind, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Controllers we create a group in.
const WANTED: &[&str] = &[
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "pids", "blkio",
];

const CFS_PERIOD_US: u64 = 100_000;

/// Docker's default device allow-list (everything else denied, mknod always allowed).
const DEVICE_ALLOW: &[&str] = &[
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:1 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
    "c 10:200 rwm",
];

/// A mounted v1 hierarchy and the controllers it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub mount_point: PathBuf,
    pub controllers: Vec<String>,
}

impl Hierarchy {
    fn has(&self, c: &str) -> bool {
        self.controllers.iter().any(|x| x == c)
    }
}

/// The v1 hierarchies with at least one wanted controller, one per superblock.
pub fn hierarchies(mounts: &[MountInfo]) -> Vec<Hierarchy> {
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for m in mounts.iter().filter(|m| m.fs_type == "cgroup") {
        let controllers: Vec<String> = m
            .super_options
            .iter()
            .filter(|o| WANTED.contains(&o.as_str()))
            .cloned()
            .collect();
        // A bind mount of a sub-group is not the hierarchy root.
        if controllers.is_empty() || m.root != Path::new("/") || seen.contains(&m.dev) {
            continue;
        }
        seen.push(m.dev.clone());
        out.push(Hierarchy {
            mount_point: m.mount_point.clone(),
            controllers,
        });
    }
    out
}

pub struct V1Manager {
    hierarchies: Vec<Hierarchy>,
    rel: Result<PathBuf>,
}

impl V1Manager {
    pub fn new(hierarchies: Vec<Hierarchy>, path: &str) -> Self {
        V1Manager {
            hierarchies,
            rel: super::validate_path(path),
        }
    }

    fn rel(&self) -> Result<&Path> {
        match &self.rel {
            Ok(p) => Ok(p),
            Err(e) => Err(Error::new(e.kind(), e.to_string())),
        }
    }

    fn dir(&self, h: &Hierarchy) -> Result<PathBuf> {
        Ok(h.mount_point.join(self.rel()?))
    }

    fn find(&self, c: &str) -> Option<&Hierarchy> {
        self.hierarchies.iter().find(|h| h.has(c))
    }

    fn controller_dir(&self, c: &str) -> Result<PathBuf> {
        match self.find(c) {
            Some(h) => self.dir(h),
            None => Err(Error::new(
                ErrorKind::NotFound,
                format!("cgroup v1 controller {c} is not mounted"),
            )),
        }
    }

    /// Creates the group, and any missing level above it, each configured before the
    /// next is made: the kernel copies a new group's device rules (and, with
    /// `cgroup.clone_children`, its cpus/mems) from its parent, so a start usually only
    /// checks them; and a parent's device rules cannot change once it has children.
    fn create_in(&self, h: &Hierarchy) -> Result<()> {
        let leaf = self.dir(h)?;
        // Usually only the leaf is missing: one mkdir.
        if let Err(e) = make_dir(&leaf) {
            if e.kind() != ErrorKind::NotFound {
                return Err(e);
            }
            let mut above: Vec<&Path> = leaf
                .ancestors()
                .skip(1)
                .take_while(|p| *p != h.mount_point)
                .collect();
            above.reverse();
            for dir in above.into_iter().filter(|d| !d.is_dir()) {
                publish_level(h, dir)?;
            }
            make_dir(&leaf)?;
        }
        configure_level(h, &leaf, true)
    }

    fn all_procs(&self) -> Result<Vec<i32>> {
        let mut all = Vec::new();
        for h in &self.hierarchies {
            util::subtree_procs(&self.dir(h)?, &mut all)?;
        }
        all.sort_unstable();
        all.dedup();
        Ok(all)
    }

    fn freeze(&self, state: &str) -> Result<()> {
        let Ok(d) = self.controller_dir("freezer") else {
            return Ok(());
        };
        let f = d.join("freezer.state");
        if !f.exists() {
            return Ok(());
        }
        util::write(&f, state)?;
        if state == "FROZEN" {
            // Bounded wait: a stuck FREEZING state must not hang destroy.
            for _ in 0..200 {
                if util::read(&f)?.trim() == "FROZEN" {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(())
    }
}

/// mkdir, where a directory that is there already is fine.
fn make_dir(dir: &Path) -> Result<()> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(ctx(e, "mkdir", dir)),
        _ => Ok(()),
    }
}

/// Makes a missing level above a leaf: configured under a temporary name, then renamed
/// into place, so that no group made below it (by another thread refilling spares, or
/// another daemon) ever sees it half configured. Losing the race to another maker is fine.
fn publish_level(h: &Hierarchy, dir: &Path) -> Result<()> {
    static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.with_file_name(format!(".{name}.new-{}-{n}", std::process::id()));
    std::fs::create_dir(&tmp).map_err(|e| ctx(e, "mkdir", &tmp))?;
    let placed = configure_level(h, &tmp, false).and_then(|()| {
        std::fs::rename(&tmp, dir).or_else(|e| match e.raw_os_error() {
            Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => Ok(()),
            _ => Err(ctx(e, "rename to", dir)),
        })
    });
    // Still there when it lost the race or failed.
    let _ = std::fs::remove_dir(&tmp);
    placed
}

/// Removes the groups that a daemon which died inside `publish_level` left under their
/// temporary names on the way to `path` (and in it). They hold no tasks: one rmdir each.
pub fn remove_unpublished_levels(hierarchies: &[Hierarchy], path: &str) {
    let Ok(rel) = super::validate_path(path) else {
        return;
    };
    for h in hierarchies {
        let levels = rel.ancestors().map(|r| h.mount_point.join(r));
        for entry in levels
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .flatten()
        {
            let name = entry.file_name();
            if maker_of_unpublished(&name.to_string_lossy())
                .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
            {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
}

/// The pid in `publish_level`'s temporary name `.<name>.new-<pid>-<n>`.
fn maker_of_unpublished(name: &str) -> Option<u32> {
    let (_, made_by) = name.strip_prefix('.')?.rsplit_once(".new-")?;
    let (pid, n) = made_by.split_once('-')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Gives a group what it needs before it may hold tasks, unless it inherited that
/// already: cpus/mems, and Docker's device rules. Levels above a leaf hand theirs down.
/// Other threads may be making sibling groups at the same time (the spare pools refill
/// in parallel): a leaf makes sure of its own settings whatever its parent got.
fn configure_level(h: &Hierarchy, dir: &Path, leaf: bool) -> Result<()> {
    if h.has("cpuset") {
        inherit_cpuset(&h.mount_point, dir)?;
        if !leaf {
            util::write(&dir.join("cgroup.clone_children"), "1")?;
        }
    }
    // In a delegated group (we are a nested daemon) only the host's root may write
    // device rules; a new group inherits its parent's, which the host set.
    if h.has("devices") && !util::in_user_namespace() {
        match restrict_devices(dir) {
            // A level above that got a child meanwhile keeps its rules (the kernel
            // refuses to change them now); the child sets its own.
            Err(_) if !leaf => {}
            r => r?,
        }
    }
    Ok(())
}

/// Copies cpus/mems from the parent into a cpuset group that has none, filling an empty
/// parent first (one that another thread made and has not filled yet).
fn inherit_cpuset(root: &Path, dir: &Path) -> Result<()> {
    let Some(parent) = dir.parent().filter(|p| p.starts_with(root)) else {
        return Ok(());
    };
    for f in ["cpuset.cpus", "cpuset.mems"] {
        if util::read(&dir.join(f))?.trim().is_empty() {
            let mut theirs = util::read(&parent.join(f))?;
            if theirs.trim().is_empty() {
                inherit_cpuset(root, parent)?;
                theirs = util::read(&parent.join(f))?;
            }
            util::write(&dir.join(f), theirs.trim())?;
        }
    }
    Ok(())
}

/// Gives a devices group Docker's allow-list, unless it has exactly that already (a new
/// group inherits its parent's list): one read instead of thirteen writes.
fn restrict_devices(dir: &Path) -> Result<()> {
    let list = util::read(&dir.join("devices.list"))?;
    if has_device_rules(&list) {
        return Ok(());
    }
    util::write(&dir.join("devices.deny"), "a")?;
    for rule in DEVICE_ALLOW {
        util::write(&dir.join("devices.allow"), rule)?;
    }
    Ok(())
}

/// Whether a `devices.list` holds exactly [`DEVICE_ALLOW`] (everything else denied).
fn has_device_rules(list: &str) -> bool {
    let mut have: Vec<&str> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let mut want = DEVICE_ALLOW.to_vec();
    have.sort_unstable();
    want.sort_unstable();
    have == want
}

impl CgroupManager for V1Manager {
    fn create(&self) -> Result<()> {
        self.rel()?;
        if self.hierarchies.is_empty() {
            return Err(Error::new(
                ErrorKind::NotFound,
                "no cgroup v1 hierarchy is mounted",
            ));
        }
        for h in &self.hierarchies {
            self.create_in(h)?;
        }
        Ok(())
    }

    fn add_process(&self, pid: i32) -> Result<()> {
        for h in &self.hierarchies {
            util::write(&self.dir(h)?.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    fn self_move_files(&self) -> Result<Vec<PathBuf>> {
        self.hierarchies
            .iter()
            .map(|h| Ok(self.dir(h)?.join("tasks")))
            .collect()
    }

    fn apply(&self, limits: &Limits) -> Result<()> {
        if let Some(h) = self.find("memory") {
            let d = self.dir(h)?;
            let v = limits
                .memory_bytes
                .map(|b| b.to_string())
                .unwrap_or("-1".into());
            util::write(&d.join("memory.limit_in_bytes"), &v)?;
        } else if limits.memory_bytes.is_some() {
            self.controller_dir("memory")?;
        }
        if let Some(h) = self.find("cpu") {
            let d = self.dir(h)?;
            let quota = limits
                .cpus
                .and_then(|c| super::cpu_quota_us(c, CFS_PERIOD_US));
            util::write(&d.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
            let q = quota.map(|q| q.to_string()).unwrap_or("-1".into());
            util::write(&d.join("cpu.cfs_quota_us"), &q)?;
        } else if limits.cpus.is_some() {
            self.controller_dir("cpu")?;
        }
        if let Some(h) = self.find("pids") {
            let d = self.dir(h)?;
            let v = limits.pids.map(|p| p.to_string()).unwrap_or("max".into());
            util::write(&d.join("pids.max"), &v)?;
        } else if limits.pids.is_some() {
            self.controller_dir("pids")?;
        }
        Ok(())
    }

    fn stats(&self) -> Result<Stats> {
        let mut s = Stats::default();
        if let Ok(d) = self.controller_dir("memory") {
            s.memory_bytes = util::read_u64(&d.join("memory.usage_in_bytes"))?;
            let lim = util::read_u64(&d.join("memory.limit_in_bytes"))?;
            // "Unlimited" reads back as PAGE_COUNTER_MAX rounded to pages.
            s.memory_limit = (lim < (1u64 << 62)).then_some(lim);
        }
        if let Ok(d) = self.controller_dir("pids") {
            s.pids = util::read_u64(&d.join("pids.current"))?;
        } else {
            s.pids = self.all_procs()?.len() as u64;
        }
        if let Ok(d) = self.controller_dir("cpuacct") {
            s.cpu_usage_ns = util::read_u64(&d.join("cpuacct.usage"))?;
        }
        Ok(s)
    }

    fn processes(&self) -> Result<Vec<i32>> {
        self.rel()?;
        self.all_procs()
    }

    fn kill_all(&self) -> Result<()> {
        self.rel()?;
        if !self.exists() {
            return Ok(());
        }
        // Usually empty already (a pid namespace dies with its init): skip the freezer.
        if self.all_procs()?.is_empty() {
            return Ok(());
        }
        // Freeze first so nothing forks between reading the list and killing it.
        let frozen = self.freeze("FROZEN");
        util::kill_pids(&self.all_procs()?);
        if frozen.is_ok() {
            // The group may have gone meanwhile (its last task exited and it was removed).
            if let Err(e) = self.freeze("THAWED") {
                if self.exists() {
                    return Err(e);
                }
            }
        }
        util::wait_empty(
            || self.all_procs(),
            util::kill_pids,
            Duration::from_secs(10),
        )
    }

    fn remove(&self) -> Result<()> {
        for h in &self.hierarchies {
            util::remove_tree(&self.dir(h)?)?;
        }
        Ok(())
    }

    fn remove_if_empty(&self) -> bool {
        self.hierarchies
            .iter()
            .all(|h| self.dir(h).is_ok_and(|d| util::remove_if_empty(&d)))
    }

    fn delegate(&self, uid: u32, gid: u32) -> Result<()> {
        for h in &self.hierarchies {
            util::delegate(&self.dir(h)?, &["cgroup.procs", "tasks"], uid, gid)?;
        }
        Ok(())
    }

    fn exists(&self) -> bool {
        self.hierarchies
            .iter()
            .any(|h| self.dir(h).map(|d| d.is_dir()).unwrap_or(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mountinfo;

    #[test]
    fn hierarchies_from_mountinfo() {
        let m = mountinfo::parse(
            "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
             33 31 0:29 / /sys/fs/cgroup/cpu2 rw - cgroup cgroup rw,cpu,cpuacct\n\
             40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n\
             35 31 0:32 /sub /mnt/mem rw - cgroup cgroup rw,memory\n\
             36 31 0:33 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n\
             41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n",
        );
        let h = hierarchies(&m);
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].controllers, vec!["cpu", "cpuacct"]);
        assert_eq!(h[1].mount_point, PathBuf::from("/sys/fs/cgroup/pids"));
    }

    #[test]
    fn removes_levels_that_a_dead_daemon_left_unpublished() {
        let t = tempfile::tempdir().unwrap();
        let h = Hierarchy {
            mount_point: t.path().to_path_buf(),
            controllers: vec!["pids".into()],
        };
        // pid_max is at most 2^22: no process has this pid.
        let dead = t.path().join(".ltv.new-999999999-3");
        let nested_dead = t.path().join("ltv/.sys1.new-999999999-0");
        let ours = t.path().join(format!(".ltv.new-{}-0", std::process::id()));
        let unrelated = [t.path().join("ltv/.spare-1"), t.path().join("ltv/.x.new-y")];
        for d in [&dead, &nested_dead, &ours].into_iter().chain(&unrelated) {
            std::fs::create_dir_all(d).unwrap();
        }
        remove_unpublished_levels(&[h], "ltv/sys1/app1");
        assert!(!dead.exists() && !nested_dead.exists());
        assert!(ours.exists(), "a live maker's level is its own business");
        assert!(unrelated.iter().all(|d| d.exists()));
        assert_eq!(maker_of_unpublished(".ltv.new-12-0"), Some(12));
        assert_eq!(maker_of_unpublished(".a.new-b.new-7-1"), Some(7));
        assert_eq!(maker_of_unpublished("ltv.new-12-0"), None);
    }

    #[test]
    fn writes_limits_in_fake_tree() {
        let t = tempfile::tempdir().unwrap();
        let mk = |c: &str, files: &[&str]| {
            let d = t.path().join(c).join("ltv/x");
            std::fs::create_dir_all(&d).unwrap();
            for f in files {
                std::fs::write(d.join(f), "").unwrap();
            }
            Hierarchy {
                mount_point: t.path().join(c),
                controllers: vec![c.to_string()],
            }
        };
        let hs = vec![
            mk("memory", &["memory.limit_in_bytes"]),
            mk("cpu", &["cpu.cfs_period_us", "cpu.cfs_quota_us"]),
            mk("pids", &["pids.max"]),
        ];
        let m = V1Manager::new(hs, "ltv/x");
        m.apply(&Limits {
            memory_bytes: Some(64 << 20),
            cpus: Some(0.5),
            pids: None,
        })
        .unwrap();
        let rd = |p: &str| std::fs::read_to_string(t.path().join(p)).unwrap();
        assert_eq!(rd("memory/ltv/x/memory.limit_in_bytes"), "67108864");
        assert_eq!(rd("cpu/ltv/x/cpu.cfs_quota_us"), "50000");
        assert_eq!(rd("cpu/ltv/x/cpu.cfs_period_us"), "100000");
        assert_eq!(rd("pids/ltv/x/pids.max"), "max");
        assert!(m.exists());
    }

    #[test]
    fn an_empty_cpuset_parent_is_filled_before_its_child() {
        // Another thread made `a` and has not filled it yet when `a/b` is configured.
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        for (dir, value) in [("", "0-1"), ("a", ""), ("a/b", "")] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
            std::fs::write(root.join(dir).join("cpuset.cpus"), value).unwrap();
            std::fs::write(
                root.join(dir).join("cpuset.mems"),
                if value.is_empty() { "" } else { "0" },
            )
            .unwrap();
        }
        inherit_cpuset(root, &root.join("a/b")).unwrap();
        for dir in ["a", "a/b"] {
            let read = |f: &str| std::fs::read_to_string(root.join(dir).join(f)).unwrap();
            assert_eq!(
                (read("cpuset.cpus"), read("cpuset.mems")),
                ("0-1".into(), "0".into()),
                "{dir}"
            );
        }
    }

    #[test]
    fn device_rules_are_recognised_in_the_kernels_listing() {
        // devices.list of a group that inherited the rules, in the kernel's order.
        let inherited = DEVICE_ALLOW
            .iter()
            .rev()
            .fold(String::new(), |s, r| s + r + "\n");
        assert!(has_device_rules(&inherited));
        assert!(
            !has_device_rules("a *:* rwm\n"),
            "a new root group allows all"
        );
        assert!(
            !has_device_rules(""),
            "nothing allowed is not the list either"
        );
        let one_more = format!("{inherited}c 10:229 rwm\n");
        assert!(!has_device_rules(&one_more));
    }

    #[test]
    fn bad_path_fails_cleanly() {
        let m = V1Manager::new(vec![], "../escape");
        assert_eq!(m.create().unwrap_err().kind(), ErrorKind::InvalidInput);
        assert!(!m.exists());
    }
}
