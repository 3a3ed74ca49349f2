//! The private daemon under test and everything the harness must undo: its network
//! namespace, cgroup root, temp dir, the instances and peer containers it made.

use serde_json::Value;
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

static INTERRUPTED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Makes SIGINT/SIGTERM set a flag instead of killing us, so cleanup still runs.
pub fn install_signal_flag() {
    let flag = INTERRUPTED.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(sig, Arc::clone(flag));
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.get().is_some_and(|f| f.load(Ordering::SeqCst))
}

/// Wall time of a command in ms, or its stderr (and stdout) on failure.
pub fn timed(cmd: &mut Command) -> Result<(f64, Output), String> {
    cmd.stdin(Stdio::null());
    let t = Instant::now();
    let out = cmd
        .output()
        .map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if out.status.success() {
        Ok((ms, out))
    } else {
        Err(failure(cmd, &out))
    }
}

pub fn failure(cmd: &Command, out: &Output) -> String {
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    format!(
        "`{} {}` failed ({}): {}{}",
        cmd.get_program().to_string_lossy(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    )
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

fn is_mountpoint(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(path))
}

/// Removes a cgroup directory tree bottom-up (cgroup dirs only go with rmdir).
fn rmdir_tree(p: &Path) {
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(p);
}

pub struct Harness {
    pub ltv: PathBuf,
    tmp: Option<tempfile::TempDir>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub cgroup_root: String,
    pub netns: String,
    daemon: Option<Child>,
    /// `GET /1.0` of the daemon under test.
    pub server: Value,
    /// Commands that undo what the harness made outside the daemon (peer containers).
    undo: Vec<Vec<OsString>>,
    /// A mount namespace without the cgroup2 mount, for crun on hybrid hosts.
    peer_mntns: Option<File>,
    /// The daemon runs with `--bridge none`.
    loopback_only: bool,
    cleaned: bool,
}

impl Harness {
    /// `loopback_only`: the daemon under test gets no bridge (`--bridge none`).
    pub fn start(ltv: &Path, loopback_only: bool) -> Result<Harness, String> {
        let pid = std::process::id();
        // /var/tmp: survives /tmp cleaners during long runs, and is a disk (overlay upper dirs).
        let base = std::env::var_os("LTV_BENCH_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        let tmp = tempfile::Builder::new()
            .prefix("ltv-bench-")
            .tempdir_in(if base.is_dir() {
                base
            } else {
                std::env::temp_dir()
            })
            .map_err(|e| format!("temp dir: {e}"))?;
        let dir = tmp.path().to_path_buf();
        let netns = format!("ltv-bench-{pid}");
        let mut h = Harness {
            ltv: ltv.to_path_buf(),
            socket: dir.join("ltv.sock"),
            state_dir: dir.join("state"),
            cgroup_root: format!("ltv-bench-{pid}"),
            netns: netns.clone(),
            dir,
            tmp: Some(tmp),
            daemon: None,
            server: Value::Null,
            undo: Vec::new(),
            peer_mntns: None,
            loopback_only,
            cleaned: false,
        };
        let st = Command::new("ip")
            .args(["netns", "add", &netns])
            .status()
            .map_err(|e| format!("ip: {e}"))?;
        if !st.success() {
            return Err(format!("ip netns add {netns} failed"));
        }
        h.spawn_daemon()?;
        Ok(h)
    }

    fn spawn_daemon(&mut self) -> Result<(), String> {
        let ns = File::open(format!("/run/netns/{}", self.netns)).map_err(|e| e.to_string())?;
        let log = File::create(self.dir.join("daemon.log")).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&self.ltv);
        cmd.arg("daemon")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--cgroup-root", &self.cgroup_root])
            .args(if self.loopback_only {
                &["--bridge", "none"][..]
            } else {
                &[]
            })
            .env("LTV_SOCKET", &self.socket)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            // Its own process group: a terminal Ctrl-C reaches us, and we stop it in order.
            .process_group(0);
        let fd = ns.as_raw_fd();
        // SAFETY: setns is async-signal-safe; `ns` stays open until spawn returns.
        // Only the network namespace changes, unlike `ip netns exec` (which also remounts).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.daemon = Some(cmd.spawn().map_err(|e| format!("spawn daemon: {e}"))?);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok((200, body)) = self.get("/1.0") {
                self.server = serde_json::from_str(&body).unwrap_or(Value::Null);
                return Ok(());
            }
            if let Some(Ok(Some(st))) = self.daemon.as_mut().map(|c| c.try_wait()) {
                return Err(format!("daemon exited with {st}: {}", self.daemon_log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("daemon did not answer: {}", self.daemon_log()))
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// One HTTP/1.1 GET on the API socket: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String), String> {
        let mut s = UnixStream::connect(&self.socket).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: ltv\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
        parse_http(&raw).ok_or_else(|| "bad HTTP response".to_string())
    }

    pub fn get_json(&self, path: &str) -> Value {
        match self.get(path) {
            Ok((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }

    /// Kinds this daemon says it runs (`GET /1.0` → `kinds`).
    pub fn kinds(&self) -> Vec<String> {
        self.server["kinds"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|k| k.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The CLI, talking to our daemon.
    pub fn ltv_cmd<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
        let mut c = Command::new(&self.ltv);
        c.args(args)
            .env("LTV_SOCKET", &self.socket)
            .stdin(Stdio::null());
        c
    }

    pub fn ltv_ok<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<String, String> {
        let mut c = self.ltv_cmd(args);
        let out = c.output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(failure(&c, &out))
        }
    }

    /// `ltv list --format json`.
    pub fn list(&self) -> Vec<Value> {
        self.ltv_ok(&["list", "--format", "json"])
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    pub fn instance_pid(&self, name: &str) -> Option<i32> {
        let v = self.get_json(&format!("/1.0/instances/{name}"));
        v["pid"].as_i64().map(|p| p as i32)
    }

    /// Deletes every instance, children (longer paths) first.
    pub fn delete_all(&self) {
        let mut names: Vec<String> = self
            .list()
            .iter()
            .filter_map(|i| i["name"].as_str().map(String::from))
            .collect();
        names.sort_by_key(|n| std::cmp::Reverse(n.matches('/').count()));
        for n in names {
            let _ = self.ltv_cmd(&["delete", "--force", &n]).output();
        }
    }

    /// The busybox image's rootfs on disk (peers run from the same files).
    pub fn image_rootfs(&self, alias: &str) -> Option<PathBuf> {
        let images = self.get_json("/1.0/images");
        let fp = images.as_array()?.iter().find(|i| i["alias"] == alias)?["fingerprint"]
            .as_str()?
            .to_string();
        let p = self.state_dir.join("images").join(&fp).join("rootfs");
        p.exists().then_some(p)
    }

    pub fn push_undo(&mut self, cmd: &[&str]) {
        self.undo.push(cmd.iter().map(OsString::from).collect());
    }

    pub fn drop_undo(&mut self, cmd: &[&str]) {
        let c: Vec<OsString> = cmd.iter().map(OsString::from).collect();
        self.undo.retain(|u| *u != c);
    }

    /// A command for a peer runtime; on hybrid hosts it runs in a mount namespace
    /// without the cgroup2 mount (crun refuses that layout otherwise).
    pub fn peer_cmd(&mut self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.stdin(Stdio::null());
        if self.peer_mntns.is_none() && is_mountpoint("/sys/fs/cgroup/unified") {
            self.peer_mntns = hidden_unified_mntns();
        }
        if let Some(ns) = &self.peer_mntns {
            let fd = ns.as_raw_fd();
            // SAFETY: setns in the forked child before exec; the fd outlives the spawn.
            unsafe {
                c.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNS) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        c
    }

    /// Undoes everything; safe to call twice.
    pub fn cleanup(&mut self) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        if self.daemon.is_some() {
            self.delete_all();
        }
        for u in self.undo.drain(..).rev() {
            let _ = Command::new(&u[0])
                .args(&u[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut c) = self.daemon.take() {
            // SAFETY: kill on the pid of our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for m in cgroup_mounts() {
            rmdir_tree(&m.join(&self.cgroup_root));
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.netns])
            .status();
        // Anything the daemon left mounted under our dir would make removal fail or recurse.
        let prefix = self.dir.to_string_lossy().into_owned();
        let mut mps: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(String::from))
            .filter(|mp| mp.starts_with(&prefix))
            .collect();
        mps.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mp in mps {
            if let Ok(c) = std::ffi::CString::new(mp) {
                // SAFETY: valid C string; lazy unmount of our own temp mounts.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        self.peer_mntns = None;
        if let Some(t) = self.tmp.take() {
            if let Err(e) = t.close() {
                eprintln!("warning: removing {}: {e}", prefix);
            }
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// A private mount namespace without /sys/fs/cgroup/unified, kept alive by an fd.
fn hidden_unified_mntns() -> Option<File> {
    let mut child = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("umount /sys/fs/cgroup/unified && echo ok && exec sleep 600")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.take()?).read_line(&mut line);
    let ns = if line.trim() == "ok" {
        File::open(format!("/proc/{}/ns/mnt", child.id())).ok()
    } else {
        None
    };
    let _ = child.kill();
    let _ = child.wait();
    ns
}

/// (status, body) of a raw HTTP/1.1 response, chunked or not.
pub fn parse_http(raw: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Some((status, body.to_string()));
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((len, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).ok()?;
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].strip_prefix("\r\n").unwrap_or(&tail[n..]);
    }
    Some((status, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_plain_and_chunked() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_http(r), Some((200, "{}".into())));
        let r = b"HTTP/1.1 501 Not Implemented\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_http(r), Some((501, "abcde".into())));
    }
}
