//! cgroup v2: one unified hierarchy. The root directory is a parameter so the logic can
//! be tested against a temporary directory holding fake control files.

use super::util::{self, ctx};
use super::{CgroupManager, Stats};
use crate::spec::Limits;
use std::io::{Error, ErrorKind, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

const CONTROLLERS: &[&str] = &["cpu", "memory", "pids"];
const CPU_PERIOD_US: u64 = 100_000;

pub struct V2Manager {
    root: PathBuf,
    rel: Result<PathBuf>,
}

impl V2Manager {
    /// `root` is the cgroup2 mount point (normally `/sys/fs/cgroup`).
    pub fn new(root: impl Into<PathBuf>, path: &str) -> Self {
        V2Manager {
            root: root.into(),
            rel: super::validate_path(path),
        }
    }

    fn dir(&self) -> Result<PathBuf> {
        match &self.rel {
            Ok(p) => Ok(self.root.join(p)),
            Err(e) => Err(Error::new(e.kind(), e.to_string())),
        }
    }

    /// Enables our controllers in `dir`'s subtree_control, skipping unavailable ones.
    fn enable_controllers(dir: &Path) -> Result<()> {
        let avail = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        let enabled =
            std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
        let want: Vec<&str> = CONTROLLERS
            .iter()
            .copied()
            .filter(|c| avail.split_whitespace().any(|a| a == *c))
            .filter(|c| !enabled.split_whitespace().any(|a| a == *c))
            .collect();
        if want.is_empty() {
            return Ok(());
        }
        let all = want
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ");
        let f = dir.join("cgroup.subtree_control");
        if util::write(&f, &all).is_ok() {
            return Ok(());
        }
        // One refused controller must not keep the others off.
        let mut last = Ok(());
        for c in want {
            if let Err(e) = util::write(&f, &format!("+{c}")) {
                tracing::warn!("enable {c} in {}: {e}", f.display());
                last = Err(e);
            }
        }
        last
    }

    fn procs(&self) -> Result<Vec<i32>> {
        let d = self.dir()?;
        let mut all = Vec::new();
        util::subtree_procs(&d, &mut all)?;
        Ok(all)
    }
}

fn write_if(dir: &Path, file: &str, value: &str, needed: bool) -> Result<()> {
    let f = dir.join(file);
    if !needed && !f.exists() {
        return Ok(());
    }
    util::write(&f, value).map_err(|e| {
        if e.kind() == ErrorKind::NotFound {
            Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{} is missing: controller not enabled for this cgroup",
                    f.display()
                ),
            )
        } else {
            e
        }
    })
}

impl CgroupManager for V2Manager {
    fn create(&self) -> Result<()> {
        let leaf = self.dir()?;
        let rel = leaf.strip_prefix(&self.root).unwrap_or(&leaf).to_path_buf();
        let mut cur = self.root.clone();
        for comp in rel.components() {
            if let Err(e) = Self::enable_controllers(&cur) {
                tracing::warn!("cgroup v2 controllers in {}: {e}", cur.display());
            }
            cur.push(comp);
            match std::fs::create_dir(&cur) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(ctx(e, "mkdir", &cur)),
            }
        }
        Ok(())
    }

    fn add_process(&self, pid: i32) -> Result<()> {
        util::write(&self.join_dir()?.join("cgroup.procs"), &pid.to_string())
    }

    fn delegate(&self, uid: u32, gid: u32) -> Result<()> {
        let files = ["cgroup.procs", "cgroup.threads", "cgroup.subtree_control"];
        util::delegate(&self.dir()?, &files, uid, gid)
    }

    fn apply(&self, limits: &Limits) -> Result<()> {
        let d = self.dir()?;
        let mem = limits
            .memory_bytes
            .map(|b| b.to_string())
            .unwrap_or("max".into());
        write_if(&d, "memory.max", &mem, limits.memory_bytes.is_some())?;
        let quota = limits
            .cpus
            .and_then(|c| super::cpu_quota_us(c, CPU_PERIOD_US));
        let cpu = match quota {
            Some(q) => format!("{q} {CPU_PERIOD_US}"),
            None => format!("max {CPU_PERIOD_US}"),
        };
        write_if(&d, "cpu.max", &cpu, quota.is_some())?;
        let pids = limits.pids.map(|p| p.to_string()).unwrap_or("max".into());
        write_if(&d, "pids.max", &pids, limits.pids.is_some())?;
        Ok(())
    }

    fn stats(&self) -> Result<Stats> {
        let d = self.dir()?;
        let mut s = Stats::default();
        if d.join("memory.current").exists() {
            s.memory_bytes = util::read_u64(&d.join("memory.current"))?;
            let max = util::read(&d.join("memory.max"))?;
            s.memory_limit = max.trim().parse().ok();
        }
        s.pids = match util::read_u64(&d.join("pids.current")) {
            Ok(n) => n,
            Err(_) => self.procs()?.len() as u64,
        };
        if let Ok(stat) = std::fs::read_to_string(d.join("cpu.stat")) {
            s.cpu_usage_ns = parse_usage_usec(&stat).unwrap_or(0).saturating_mul(1000);
        }
        Ok(s)
    }

    fn processes(&self) -> Result<Vec<i32>> {
        self.procs()
    }

    fn kill_all(&self) -> Result<()> {
        let d = self.dir()?;
        if !d.is_dir() {
            return Ok(());
        }
        let kill_file = d.join("cgroup.kill");
        if kill_file.exists() {
            util::write(&kill_file, "1")?;
            return util::wait_empty(
                || self.procs(),
                |_| {
                    let _ = util::write(&kill_file, "1");
                },
                Duration::from_secs(10),
            );
        }
        // Before Linux 5.14: freeze so nothing forks while we kill, then thaw to let them die.
        let freeze = d.join("cgroup.freeze");
        let frozen = freeze.exists() && util::write(&freeze, "1").is_ok();
        util::kill_pids(&self.procs()?);
        if frozen {
            util::write(&freeze, "0")?;
        }
        util::wait_empty(|| self.procs(), util::kill_pids, Duration::from_secs(10))
    }

    fn remove(&self) -> Result<()> {
        util::remove_tree(&self.dir()?)
    }

    fn remove_if_empty(&self) -> bool {
        self.dir().is_ok_and(|d| util::remove_if_empty(&d))
    }

    fn exists(&self) -> bool {
        self.dir().map(|d| d.is_dir()).unwrap_or(false)
    }

    fn v2_dir(&self) -> Option<PathBuf> {
        self.join_dir().ok()
    }
}

impl V2Manager {
    /// Where new processes of the group go: `init` once the daemon inside a delegated
    /// group has moved its processes there (see [`claim_delegated_root`]); a group with
    /// controllers enabled for its children may hold no process itself.
    fn join_dir(&self) -> Result<PathBuf> {
        let d = self.dir()?;
        let delegated = std::fs::read_to_string(d.join("cgroup.subtree_control"))
            .is_ok_and(|c| !c.trim().is_empty());
        Ok(if delegated && d.join(INIT_LEAF).is_dir() {
            d.join(INIT_LEAF)
        } else {
            d
        })
    }
}

/// The leaf that a delegated group's own processes move to.
const INIT_LEAF: &str = "init";

/// Run by a daemon inside a container whose group was delegated to it (`root`, its
/// cgroup namespace's root): v2 lets a group enable controllers for its children only
/// once it holds no process, so the container's processes move to `init` (as systemd
/// does with init.scope), and our controllers are enabled for the groups we make.
pub fn claim_delegated_root(root: &Path) -> Result<()> {
    let leaf = root.join(INIT_LEAF);
    match std::fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(ctx(e, "mkdir", &leaf)),
    }
    // Processes may fork meanwhile: a few rounds until none is left.
    for _ in 0..20 {
        let procs = util::read_procs(&root.join("cgroup.procs"))?;
        if procs.is_empty() {
            return V2Manager::enable_controllers(root);
        }
        for pid in procs {
            // One that exited meanwhile is fine.
            let _ = util::write(&leaf.join("cgroup.procs"), &pid.to_string());
        }
    }
    Err(Error::other(format!(
        "{} keeps getting new processes",
        root.display()
    )))
}

fn parse_usage_usec(stat: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == "usage_usec").then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path, content: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    fn rd(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap()
    }

    #[test]
    fn create_enables_controllers_along_the_path() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        touch(
            &r.join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        );
        touch(&r.join("cgroup.subtree_control"), "");
        // What the kernel would show in the intermediate group once the root enabled them.
        touch(&r.join("ltv/cgroup.controllers"), "cpu memory pids\n");
        touch(&r.join("ltv/cgroup.subtree_control"), "memory\n");
        let m = V2Manager::new(r, "ltv/app1");
        m.create().unwrap();
        assert!(r.join("ltv/app1").is_dir());
        assert_eq!(rd(&r.join("cgroup.subtree_control")), "+cpu +memory +pids");
        assert_eq!(rd(&r.join("ltv/cgroup.subtree_control")), "+cpu +pids");
        assert!(m.exists());
    }

    #[test]
    fn apply_writes_limits() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        for f in ["memory.max", "cpu.max", "pids.max"] {
            touch(&d.join(f), "junk");
        }
        let m = V2Manager::new(t.path(), "a/b");
        m.apply(&Limits {
            memory_bytes: Some(1 << 30),
            cpus: Some(1.5),
            pids: Some(100),
        })
        .unwrap();
        assert_eq!(rd(&d.join("memory.max")), "1073741824");
        assert_eq!(rd(&d.join("cpu.max")), "150000 100000");
        assert_eq!(rd(&d.join("pids.max")), "100");
        m.apply(&Limits::default()).unwrap();
        assert_eq!(rd(&d.join("memory.max")), "max");
        assert_eq!(rd(&d.join("cpu.max")), "max 100000");
        assert_eq!(rd(&d.join("pids.max")), "max");
    }

    #[test]
    fn apply_reports_missing_controller() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a")).unwrap();
        let m = V2Manager::new(t.path(), "a");
        let e = m
            .apply(&Limits {
                memory_bytes: Some(1),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        // Unlimited needs no controller.
        m.apply(&Limits::default()).unwrap();
    }

    #[test]
    fn a_claimed_group_takes_new_processes_in_its_init_leaf() {
        let t = tempfile::tempdir().unwrap();
        let g = t.path().join("g");
        touch(&g.join("cgroup.procs"), "");
        touch(&g.join("cgroup.controllers"), "cpu memory pids\n");
        touch(&g.join("cgroup.subtree_control"), "");
        let m = V2Manager::new(t.path(), "g");
        assert_eq!(m.v2_dir(), Some(g.clone()), "not claimed yet");
        claim_delegated_root(&g).unwrap();
        assert!(g.join("init").is_dir());
        let enabled = std::fs::read_to_string(g.join("cgroup.subtree_control")).unwrap();
        assert_eq!(enabled, "+cpu +memory +pids");
        assert_eq!(m.v2_dir(), Some(g.join("init")));
        // A group whose processes never leave is reported, not looped on forever.
        touch(&g.join("cgroup.procs"), "42\n");
        touch(&g.join("init/cgroup.procs"), "");
        assert!(claim_delegated_root(&g).is_err());
    }

    #[test]
    fn stats_and_kill_and_remove() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("g");
        touch(&d.join("memory.current"), "4096\n");
        touch(&d.join("memory.max"), "max\n");
        touch(&d.join("pids.current"), "3\n");
        touch(&d.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n");
        touch(&d.join("cgroup.procs"), "");
        touch(&d.join("cgroup.kill"), "");
        let m = V2Manager::new(t.path(), "g");
        let s = m.stats().unwrap();
        assert_eq!(
            s,
            Stats {
                memory_bytes: 4096,
                memory_limit: None,
                pids: 3,
                cpu_usage_ns: 1_500_000
            }
        );
        m.kill_all().unwrap();
        assert_eq!(rd(&d.join("cgroup.kill")), "1");
        // Real cgroup dirs hold only kernel files; drop the fakes before rmdir.
        for e in std::fs::read_dir(&d).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        m.remove().unwrap();
        assert!(!m.exists());
        m.remove().unwrap();
        m.kill_all().unwrap();
    }

    #[test]
    fn invalid_path_is_an_error_not_a_panic() {
        let m = V2Manager::new("/nonexistent", "/etc");
        assert_eq!(m.create().unwrap_err().kind(), ErrorKind::InvalidInput);
        assert!(m.add_process(1).is_err());
        assert!(!m.exists());
    }
}
