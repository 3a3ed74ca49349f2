//! Debian images made with `debootstrap --variant=minbase`, from the host's own mirror,
//! with sysvinit fitted to run as a system container's init.

use super::{
    detect_init, io_err, DebianOptions, Error, ImageConfig, ImageInfo, ImageStore, Progress,
};
use sha2::{Digest as _, Sha256};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;

pub const DEFAULT_SUITE: &str = "bookworm";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// An init the user can choose with `--include`; without one the image gets sysvinit,
/// which needs nothing from the host. (systemd 252 freezes in an unprivileged container on
/// cgroup v1 hybrid: it cannot make /sys/fs/cgroup/{unified,systemd} there.)
const INIT_PACKAGES: &[&str] = &["sysvinit-core", "systemd-sysv", "runit-init"];
const DEFAULT_INIT: &str = "sysvinit-core";

/// sysvinit's inittab for a container, after LXC's Debian template but without gettys
/// (there is no console; `ltv exec` is the way in). SIGPWR, which `ltv stop` sends,
/// halts through runlevel 0; Debian's own line runs a powerfail script it no longer ships.
const INITTAB: &str = "\
# Written by ltv for a system container.
id:2:initdefault:
si::sysinit:/etc/init.d/rcS
l0:0:wait:/etc/init.d/rc 0
l1:1:wait:/etc/init.d/rc 1
l2:2:wait:/etc/init.d/rc 2
l3:3:wait:/etc/init.d/rc 3
l4:4:wait:/etc/init.d/rc 4
l5:5:wait:/etc/init.d/rc 5
l6:6:wait:/etc/init.d/rc 6
ca:12345:ctrlaltdel:/sbin/shutdown -t1 -a -r now
pf::powerwait:/sbin/init 0
";

/// Boot scripts for hardware a container does not have (LXC's template disables the
/// same): no RTC, no backlight. Disabled with update-rc.d, so upgrades keep them off.
const DISABLED_SERVICES: &[&str] = &["hwclock.sh", "brightness"];

fn usable_suite(s: &str) -> bool {
    !s.ends_with("-security") && !s.ends_with("-updates") && !s.contains("/updates")
}

fn usable_uri(u: &str) -> bool {
    ["http://", "https://", "ftp://", "file:/"]
        .iter()
        .any(|p| u.starts_with(p))
}

/// The first `deb` URI with a plain (not security/updates) suite in apt sources text,
/// either deb822 (`.sources`) or one-line (`.list`) format.
pub fn parse_apt_sources(text: &str, deb822: bool) -> Option<String> {
    if deb822 {
        // Stanzas are separated by blank lines; continuation lines start with space.
        let mut fields: Vec<(String, String)> = Vec::new();
        let mut stanzas = Vec::new();
        for line in text.lines().chain(std::iter::once("")) {
            if line.trim().is_empty() {
                if !fields.is_empty() {
                    stanzas.push(std::mem::take(&mut fields));
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                if let Some(last) = fields.last_mut() {
                    last.1.push(' ');
                    last.1.push_str(line.trim());
                }
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                fields.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        for st in stanzas {
            let get = |k: &str| {
                st.iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.as_str())
                    .unwrap_or("")
            };
            if get("enabled").eq_ignore_ascii_case("no")
                || !get("types").split_whitespace().any(|t| t == "deb")
            {
                continue;
            }
            if !get("suites").split_whitespace().any(usable_suite) {
                continue;
            }
            if let Some(uri) = get("uris").split_whitespace().find(|u| usable_uri(u)) {
                return Some(uri.to_string());
            }
        }
        None
    } else {
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            let mut rest = match line
                .strip_prefix("deb ")
                .or_else(|| line.strip_prefix("deb\t"))
            {
                Some(r) => r.trim_start(),
                None => continue,
            };
            if rest.starts_with('[') {
                match rest.find(']') {
                    Some(i) => rest = rest[i + 1..].trim_start(),
                    None => continue,
                }
            }
            let mut words = rest.split_whitespace();
            let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
                continue;
            };
            if usable_uri(uri) && usable_suite(suite) {
                return Some(uri.to_string());
            }
        }
        None
    }
}

/// The host's Debian mirror, from /etc/apt/sources.list then sources.list.d (apt's order).
pub fn host_apt_mirror() -> Option<String> {
    let etc = Path::new("/etc/apt");
    if let Ok(t) = std::fs::read_to_string(etc.join("sources.list")) {
        if let Some(u) = parse_apt_sources(&t, false) {
            return Some(u);
        }
    }
    let mut parts: Vec<_> = std::fs::read_dir(etc.join("sources.list.d"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    parts.sort();
    for p in parts {
        let deb822 = match p.extension().and_then(|e| e.to_str()) {
            Some("sources") => true,
            Some("list") => false,
            _ => continue,
        };
        if let Ok(t) = std::fs::read_to_string(&p) {
            if let Some(u) = parse_apt_sources(&t, deb822) {
                return Some(u);
            }
        }
    }
    None
}

/// `name version arch` of every installed package, sorted.
fn installed_packages(rootfs: &Path) -> Result<Vec<String>, Error> {
    let status = rootfs.join("var/lib/dpkg/status");
    let text = std::fs::read_to_string(&status)
        .map_err(io_err(format!("reading {}", status.display())))?;
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let get = |k: &str| {
            stanza
                .lines()
                .find_map(|l| {
                    l.strip_prefix(k)
                        .and_then(|r| r.strip_prefix(':'))
                        .map(str::trim)
                })
                .unwrap_or("")
        };
        if get("Status").ends_with(" installed") {
            out.push(format!(
                "{} {} {}",
                get("Package"),
                get("Version"),
                get("Architecture")
            ));
        }
    }
    out.sort();
    Ok(out)
}

/// Turns debootstrap's `I:` lines into stages and a per-stage count.
#[derive(Default)]
pub(super) struct Tracker {
    stage: String,
    done: u64,
    packages: Option<u64>,
    retrieved: u64,
}

impl Tracker {
    pub(super) fn line(&mut self, line: &str, progress: &dyn Progress) {
        let Some(msg) = line.strip_prefix("I: ") else {
            return;
        };
        let verb = msg.split_whitespace().next().unwrap_or("");
        let per_package = [
            "Retrieving",
            "Validating",
            "Extracting",
            "Unpacking",
            "Configuring",
        ]
        .contains(&verb)
            && msg.split_whitespace().count() <= 3
            && !msg.ends_with("packages...")
            && !msg.contains("Release")
            && !msg.contains("Packages");
        if !per_package {
            progress.stage(msg);
            return;
        }
        // debootstrap alternates Retrieving/Validating per package: one stage, one count.
        if verb == "Validating" {
            return;
        }
        let stage = match verb {
            "Retrieving" => "Retrieving packages",
            "Extracting" => "Extracting packages",
            "Unpacking" => "Unpacking packages",
            _ => "Configuring packages",
        };
        if self.stage != stage {
            if self.stage == "Retrieving packages" {
                self.packages = Some(self.retrieved);
            }
            self.stage = stage.to_string();
            self.done = 0;
            progress.stage(stage);
        }
        self.done += 1;
        if verb == "Retrieving" {
            self.retrieved += 1;
        }
        let total = self.packages.map(|p| p.max(self.done));
        progress.advance(self.done, total);
    }
}

pub(super) fn build(
    store: &ImageStore,
    opts: &DebianOptions,
    progress: &dyn Progress,
) -> Result<ImageInfo, Error> {
    let suite = if opts.suite.is_empty() {
        DEFAULT_SUITE
    } else {
        opts.suite.as_str()
    };
    let bad_name = |s: &str| {
        s.is_empty()
            || s.starts_with('-')
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-._".contains(&b))
    };
    if bad_name(suite) {
        return Err(Error::Invalid(format!("bad suite name {suite:?}")));
    }
    let mut include: Vec<String> = opts
        .include
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(p) = include.iter().find(|p| bad_name(p)) {
        return Err(Error::Invalid(format!("bad package name {p:?}")));
    }
    if !include.iter().any(|p| INIT_PACKAGES.contains(&p.as_str())) {
        include.push(DEFAULT_INIT.into());
    }
    include.sort();
    include.dedup();
    let mirror = match &opts.mirror {
        Some(m) => m.clone(),
        None => host_apt_mirror().ok_or_else(|| {
            Error::Tool("no Debian mirror in the host's apt sources; pass one".into())
        })?,
    };
    if !usable_uri(&mirror) {
        return Err(Error::Invalid(format!("bad mirror URL {mirror:?}")));
    }
    if !Path::new("/usr/sbin/debootstrap").exists() && crate::which("debootstrap").is_none() {
        progress.stage("Installing debootstrap");
        let out = Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "debootstrap"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .map_err(|e| Error::Tool(format!("apt-get: {e}")))?;
        if !out.status.success() {
            return Err(Error::Tool(format!(
                "apt-get install debootstrap failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }

    let tmp = store.tmp()?;
    let root = tmp.rootfs();
    progress.stage(&format!("debootstrap {suite}"));
    let mut cmd = Command::new("debootstrap");
    cmd.arg("--variant=minbase");
    if !include.is_empty() {
        cmd.arg(format!("--include={}", include.join(",")));
    }
    cmd.arg(suite).arg(&root).arg(&mirror);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    // Die with us rather than keep writing into a directory we are about to remove.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // Own process group, so stragglers (dpkg in the chroot) can be killed with it.
            libc::setpgid(0, 0);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Tool(format!("starting debootstrap: {e}")))?;
    let (tx, rx) = mpsc::channel::<String>();
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|r| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        })
    })
    .collect();
    drop(tx);
    let mut tracker = Tracker::default();
    let mut tail: std::collections::VecDeque<String> = Default::default();
    let pgid = child.id() as libc::pid_t;
    let mut status = None;
    loop {
        match rx.recv_timeout(std::time::Duration::from_millis(500)) {
            Ok(line) => {
                tracing::debug!("debootstrap: {line}");
                tracker.line(&line, progress);
                if tail.len() == 15 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if status.is_none() {
            if let Ok(Some(st)) = child.try_wait() {
                // If debootstrap was killed, its children would keep writing (and keep
                // our pipes open): end the whole group.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                status = Some(st);
            }
        }
    }
    for r in readers {
        let _ = r.join();
    }
    let status = match status {
        Some(st) => st,
        None => child
            .wait()
            .map_err(|e| Error::Tool(format!("waiting for debootstrap: {e}")))?,
    };
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    if !status.success() {
        // `tmp` is dropped here: mounts under it are detached and the tree removed.
        let log = tail.into_iter().collect::<Vec<_>>().join("\n");
        return Err(Error::Tool(format!(
            "debootstrap failed ({status}):\n{log}"
        )));
    }

    progress.stage("Finishing image");
    // Apt caches and logs are not part of the image.
    for d in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let p = root.join(d);
        if let Ok(rd) = std::fs::read_dir(&p) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    sanitize_etc(&root)?;
    let packages = installed_packages(&root)?;
    let sysvinit = packages.iter().any(|p| p.starts_with("sysvinit-core "));
    if sysvinit {
        configure_sysvinit(&root)?;
    }
    let mut h = Sha256::new();
    h.update(format!("debian-minbase\0{suite}\0{}\0", include.join(",")).as_bytes());
    if sysvinit {
        h.update(INITTAB.as_bytes());
        h.update(DISABLED_SERVICES.join(",").as_bytes());
    }
    for p in &packages {
        h.update(p.as_bytes());
        h.update(b"\n");
    }
    let fingerprint = hex::encode(h.finalize());
    let config = ImageConfig {
        entrypoint: Vec::new(),
        cmd: vec!["/bin/bash".into()],
        env: vec![PATH_ENV.into()],
        working_dir: "/".into(),
        user: String::new(),
        init: detect_init(&root),
    };
    let mut source = format!("debootstrap {suite} minbase");
    if !include.is_empty() {
        source.push_str(&format!(" +{}", include.join(",")));
    }
    store.commit(tmp, &fingerprint, config, source)
}

/// debootstrap copies the host's hostname and resolv.conf: neither belongs in an image
/// (the runtime provides them, as for the busybox image).
pub(super) fn sanitize_etc(root: &Path) -> Result<(), Error> {
    for (name, content) in [("etc/hostname", "localhost\n"), ("etc/resolv.conf", "")] {
        let p = root.join(name);
        // Replace rather than write through, in case it is a symlink.
        let _ = std::fs::remove_file(&p);
        std::fs::write(&p, content).map_err(io_err(format!("writing {name}")))?;
    }
    Ok(())
}

/// Fits sysvinit to a container: an inittab without consoles that halts on SIGPWR, and
/// no boot scripts for absent hardware.
fn configure_sysvinit(root: &Path) -> Result<(), Error> {
    let p = root.join("etc/inittab");
    let _ = std::fs::remove_file(&p);
    std::fs::write(&p, INITTAB).map_err(io_err("writing etc/inittab"))?;
    for name in DISABLED_SERVICES {
        if !root.join("etc/init.d").join(name).exists() {
            continue;
        }
        let out = Command::new("chroot")
            .arg(root)
            .args(["/usr/sbin/update-rc.d", name, "disable"])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::Tool(format!("chroot update-rc.d: {e}")))?;
        if !out.status.success() {
            return Err(Error::Tool(format!(
                "update-rc.d {name} disable failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(())
}
