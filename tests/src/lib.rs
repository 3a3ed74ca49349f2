//! Helpers for the end-to-end tests: start a real `ltv daemon` (as root, inside a
//! network namespace this harness creates), drive the real `ltv` CLI and the raw HTTP
//! API, and check that nothing is left behind.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The `ltv` binary under test: `$LTV_BIN`, or `target/<profile>/ltv` beside this test.
pub fn ltv_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LTV_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test>-<hash>
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("ltv");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p ltv` first (./dev test does)",
        bin.display()
    );
    bin
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Ends the test early, with the reason printed, where it truly cannot run.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!("skipped: end-to-end tests need root (namespaces, mounts, cgroups)");
            return;
        }
    };
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A daemon under test with its own state dir, socket, cgroup root and network namespace.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub cgroup_root: String,
    /// `None`: the daemon shares the host's network (only for downloads from the apt mirror).
    pub netns: Option<String>,
    /// Extra environment for the daemon process.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl TestDaemon {
    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// A daemon in a network namespace of its own: no packet leaves it.
    pub fn start() -> TestDaemon {
        Self::start_with(true)
    }

    /// A daemon on the host's network, for image builds that fetch Debian packages.
    pub fn start_with_host_network() -> TestDaemon {
        Self::start_with(false)
    }

    /// A daemon in its own network namespace, with extra environment (e.g. `LTV_KERNEL`).
    pub fn start_with_env(env: &[(&str, &str)]) -> TestDaemon {
        Self::start_full(true, env)
    }

    fn start_with(own_netns: bool) -> TestDaemon {
        Self::start_full(own_netns, &[])
    }

    fn start_full(own_netns: bool, env: &[(&str, &str)]) -> TestDaemon {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{n}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix("ltv-e2e-")
            .tempdir()
            .expect("tempdir");
        let netns = own_netns.then(|| format!("ltv-e2e-{id}"));
        if let Some(ns) = &netns {
            let status = Command::new("ip")
                .args(["netns", "add", ns])
                .status()
                .expect("run ip");
            assert!(status.success(), "ip netns add {ns} failed");
        }
        let mut d = TestDaemon {
            socket: dir.path().join("ltv.sock"),
            state_dir: dir.path().join("state"),
            cgroup_root: format!("ltv-e2e-{id}"),
            netns,
            dir,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        d.spawn();
        d
    }

    /// Starts (or restarts) the daemon process inside the test's network namespace.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let netns = self
            .netns
            .as_ref()
            .map(|ns| std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("daemon log");
        let mut cmd = Command::new(ltv_bin());
        cmd.args(["daemon", "--state-dir"])
            .arg(&self.state_dir)
            .args(["--cgroup-root", &self.cgroup_root])
            .env("LTV_SOCKET", &self.socket)
            // On the host's network (image downloads only) it must not make a bridge there.
            .args(
                self.netns
                    .is_none()
                    .then_some(["--bridge", "none"])
                    .into_iter()
                    .flatten(),
            )
            .env("LTV_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if let Some(fd) = netns.as_ref().map(|f| f.as_raw_fd()) {
            // SAFETY: setns is async-signal-safe; the fd stays open until spawn returns.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn ltv daemon");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.api("GET", "/1.0", None).0 == 200 {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("daemon exited with {status}: {}", self.daemon_log());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "daemon did not answer on {}: {}",
            self.socket.display(),
            self.daemon_log()
        );
    }

    /// Stops the daemon process (SIGTERM) and waits for it; instances keep running.
    pub fn stop_daemon(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill on the pid of our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Kills the daemon process with SIGKILL, as a crash would.
    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// The CLI, talking to this daemon.
    pub fn ltv(&self, args: &[&str]) -> Output {
        self.ltv_cmd(args).output().expect("run ltv")
    }

    pub fn ltv_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(ltv_bin());
        cmd.args(args)
            .env("LTV_SOCKET", &self.socket)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the CLI and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.ltv(args);
        assert!(
            out.status.success(),
            "ltv {args:?} failed ({}):\nstdout: {}\nstderr: {}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.daemon_log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One raw HTTP/1.1 request on the API socket: (status, body).
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let Ok(mut s) = UnixStream::connect(&self.socket) else {
            return (0, String::new());
        };
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: ltv\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if s.write_all(req.as_bytes()).is_err() {
            return (0, String::new());
        }
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        parse_http(&raw)
    }

    pub fn api_json(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let (status, text) = self.api(method, path, body);
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    pub fn build_busybox(&self) {
        self.ok(&["image", "build", "busybox"]);
    }

    /// Host cgroup directories of an instance that exist now.
    pub fn cgroup_dirs(&self, name: &str) -> Vec<PathBuf> {
        cgroup_mounts()
            .into_iter()
            .map(|m| m.join(&self.cgroup_root).join(name))
            .filter(|p| p.exists())
            .collect()
    }

    /// Mounts under this daemon's state dir.
    pub fn mounts(&self) -> Vec<String> {
        let state = self.state_dir.to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.split(' ').nth(4).is_some_and(|mp| mp.starts_with(&state)))
            .map(str::to_string)
            .collect()
    }

    /// Asserts that the instance left no mount, cgroup directory or overlay dir.
    pub fn assert_no_leftovers(&self, name: &str) {
        let mounts: Vec<String> = self
            .mounts()
            .into_iter()
            .filter(|m| m.contains(&format!("/{name}/")))
            .collect();
        assert!(mounts.is_empty(), "mounts of {name} left: {mounts:#?}");
        let cgroups = self.cgroup_dirs(name);
        assert!(cgroups.is_empty(), "cgroups of {name} left: {cgroups:?}");
        let dir = self.state_dir.join("instances").join(name);
        assert!(!dir.exists(), "instance dir {} left", dir.display());
        // Its files go from the daemon's trash on a thread of their own, soon after.
        let trash = self.state_dir.join("instances").join(".trash");
        let trashed = || {
            std::fs::read_dir(&trash)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|f| f.starts_with(&format!("{name}.")))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !trashed().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = trashed();
        assert!(
            left.is_empty(),
            "files of {name} left in {}: {left:?}",
            trash.display()
        );
    }

    /// `ip ARGS` in the daemon's network namespace; its standard output.
    pub fn ip(&self, args: &[&str]) -> String {
        let ns = self
            .netns
            .as_deref()
            .expect("the daemon runs in a netns of its own");
        let out = Command::new("ip")
            .args(["-n", ns])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn instance(&self, name: &str) -> serde_json::Value {
        let (status, v) = self.api_json("GET", &format!("/1.0/instances/{name}"), None);
        assert_eq!(status, 200, "GET instance {name}: {v}");
        v
    }

    pub fn wait_status(&self, name: &str, status: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.instance(name);
            if v["status"] == status {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not become {status}: {v}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        // Remove whatever a failed test left, then the daemon and its netns.
        if self.child.is_some() {
            let (_, list) = self.api_json("GET", "/1.0/instances", None);
            for i in list.as_array().cloned().unwrap_or_default() {
                if let Some(name) = i["name"].as_str() {
                    let _ = self.api("DELETE", &format!("/1.0/instances/{name}?force=true"), None);
                }
            }
        }
        self.stop_daemon();
        // A daemon that had to be killed could not drain its helper pool: its spares
        // exit when their control socket closes, and their empty groups go here.
        for _ in 0..50 {
            let mut left = false;
            for m in cgroup_mounts() {
                let root = m.join(&self.cgroup_root);
                for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                    if e.file_name().to_string_lossy().starts_with(".spare-") {
                        left |= std::fs::remove_dir(e.path()).is_err();
                    }
                }
                let _ = std::fs::remove_dir(&root);
            }
            if !left {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(ns) = &self.netns {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// Roots of every mounted cgroup hierarchy (v1 controllers and v2).
pub fn cgroup_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" - cgroup ") || l.contains(" - cgroup2 "))
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .collect()
}

fn parse_http(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return (0, String::new());
    };
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Host processes whose command line contains `needle` (read from /proc: no procps needed).
pub fn pids_with_cmdline(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(needle)
            })
        })
        .collect()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// One level of a nesting chain: its path and kind (`app`, `system`, `vm`).
pub type Level<'a> = (&'a str, &'a str);

/// Checks each level of a chain such as `vm1`, `vm1/sys1`, `vm1/sys1/app1` (outermost
/// first) from inside, through exec: its hostname is its own name; its kernel is the host's
/// unless a microVM is on the way; each level has a pid namespace of its own; its root is a
/// mapped id (a top-level container's an
/// unprivileged host uid, a nested one's the same ids as its parent's); and a file written
/// at the innermost level is seen at no other level, nor on the host.
pub fn check_chain(d: &TestDaemon, chain: &[Level]) {
    let host_kernel = nix_uname_release();
    let marker = format!("/tmp/ltv-chain-marker-{}", std::process::id());
    let (innermost, _) = chain.last().expect("a chain");
    d.ok(&[
        "exec",
        innermost,
        "--",
        "sh",
        "-c",
        &format!("echo inside > {marker}"),
    ]);
    let mut in_vm = false;
    let mut pid_namespaces: Vec<(bool, String)> = vec![];
    for (i, (path, kind)) in chain.iter().enumerate() {
        let script = format!(
            "hostname; uname -r; readlink /proc/self/ns/pid; cat /proc/self/uid_map; cat {marker} 2>/dev/null || echo absent"
        );
        let out = d.ok(&["exec", path, "--", "sh", "-c", &script]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines.len() >= 5, "{path}: {out}");
        let name = path.rsplit('/').next().unwrap();
        assert_eq!(lines[0], name, "{path}: hostname");
        in_vm |= *kind == "vm";
        assert_eq!(
            lines[1] != host_kernel,
            in_vm,
            "{path}: kernel {} (host {host_kernel})",
            lines[1]
        );
        // Namespace ids only compare within one kernel.
        let ns = (in_vm, lines[2].to_string());
        assert!(
            !pid_namespaces.contains(&ns),
            "{path}: pid namespace {} of a level above",
            lines[2]
        );
        pid_namespaces.push(ns);
        let map: Vec<u64> = lines[3]
            .split_whitespace()
            .map(|f| f.parse().unwrap())
            .collect();
        match *kind {
            "vm" => assert_eq!(map, [0, 0, 4294967295], "{path}: a VM's root is its own"),
            _ if i == 0 || chain[i - 1].1 == "vm" => {
                assert!(map[1] >= 1_000_000 && map[2] == 65536, "{path}: {map:?}")
            }
            _ => assert_eq!(map, [0, 0, 65536], "{path}: within its parent's range"),
        }
        let expect = if i == chain.len() - 1 {
            "inside"
        } else {
            "absent"
        };
        assert_eq!(lines[4], expect, "{path}: the innermost level's file");
    }
    assert!(
        !Path::new(&marker).exists(),
        "the innermost level's file is on the host"
    );
}

fn nix_uname_release() -> String {
    let out = Command::new("uname").arg("-r").output().expect("uname");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn pids_with_cmdline_finds_this_process_and_nothing_for_a_stranger() {
        let me = std::env::args().next().unwrap();
        assert!(super::pids_with_cmdline(&me).contains(&std::process::id()));
        assert!(super::pids_with_cmdline("no-such-process-\u{1}-here").is_empty());
    }
}
