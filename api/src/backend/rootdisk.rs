//! A microVM's root disk: an ext4 image made from the instance's image with `mkfs.ext4 -d`
//! (no loop mounts), plus the guest's `/init` (guest-kernel/init.c) and our bundled `ltv`
//! (see `bundle.rs`) as its agent, written into the image with `debugfs` so the image
//! store is never touched.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::path::Path;
use std::process::{Command, Stdio};

pub use super::bundle::GUEST_LTV;

/// Free space the guest gets on top of what the image uses.
const HEADROOM: u64 = 512 << 20;

/// Builds `out` (sparse) from `rootfs` and `bundle`; on failure nothing is left at `out`.
pub fn build(rootfs: &Path, out: &Path, hostname: &str, bundle: &Path) -> io::Result<()> {
    let tmp = out.with_extension("img.tmp");
    let result = build_at(rootfs, &tmp, hostname, bundle).and_then(|()| std::fs::rename(&tmp, out));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn build_at(rootfs: &Path, img: &Path, hostname: &str, bundle: &Path) -> io::Result<()> {
    let used = du_bytes(rootfs)?;
    let ltv = bundle.join("ltv");
    let extra = std::fs::metadata(&ltv)?.len();
    // ext4 metadata and the journal need room too: 20 % over the data.
    let size = ((used + extra) * 6 / 5 + HEADROOM).next_multiple_of(1 << 20);
    std::fs::File::create(img)?.set_len(size)?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "ltv-root", "-E", "root_owner=0:0", "-d"])
        .arg(rootfs)
        .arg(img))?;

    // What debugfs copies in, besides the bundle.
    let staging = img.with_extension("staging");
    let result = stage(&staging, hostname).and_then(|()| {
        let mut script = Script::default();
        script.put(rootfs, GUEST_LTV, &ltv, 0o755);
        script.put(rootfs, "/init", &staging.join("init"), 0o755);
        script.put(rootfs, "/etc/hostname", &staging.join("hostname"), 0o644);
        for d in ["/proc", "/sys", "/dev", "/run", "/tmp", "/var/log"] {
            script.mkdirs(rootfs, d);
        }
        for d in ["instances", "images"] {
            script.mkdirs(rootfs, &format!("{AGENT_STATE}/{d}"));
        }
        script.put(
            rootfs,
            &format!("{AGENT_STATE}/ltv.db"),
            &staging.join("ltv.db"),
            0o644,
        );
        debugfs(img, &script.0)
    });
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// The guest agent's state directory (its default).
const AGENT_STATE: &str = crate::daemon::DEFAULT_STATE_DIR;

/// The guest's PID 1: guest-kernel/init.c, compiled by build.rs. A 9 KB program without
/// libc, where our own binary as init took about 6 s from the kernel's start of /init to
/// the readiness marker on kvm-pvm (loading it is emulated guest kernel work).
const GUEST_INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest-init"));

/// Into `staging`: the init, the hostname file and the agent's database. The database is
/// made here rather than at the agent's first start in the guest: creating one switches
/// SQLite to WAL through fsyncs of the file and its directory, which took about 5 s of
/// emulated guest kernel work on a kvm-pvm host.
fn stage(staging: &Path, hostname: &str) -> io::Result<()> {
    std::fs::create_dir_all(staging)?;
    std::fs::write(staging.join("init"), GUEST_INIT)?;
    std::fs::write(staging.join("hostname"), format!("{hostname}\n"))?;
    // Closed again at once, so the WAL is folded into the file and removed.
    crate::db::Db::open(&staging.join("ltv.db")).map_err(|e| io::Error::other(format!("{e:#}")))?;
    Ok(())
}

/// A debugfs command file; each `put` creates the missing parents first.
#[derive(Default)]
struct Script(String, BTreeSet<String>);

impl Script {
    fn cmd(&mut self, line: String) {
        self.0.push_str(&line);
        self.0.push('\n');
    }

    fn mkdirs(&mut self, rootfs: &Path, guest_dir: &str) {
        let dir = resolve(rootfs, guest_dir);
        let mut prefix = String::new();
        for part in dir.split('/').filter(|p| !p.is_empty()) {
            prefix.push('/');
            prefix.push_str(part);
            if rootfs.join(&prefix[1..]).is_dir() || !self.1.insert(prefix.clone()) {
                continue;
            }
            self.cmd(format!("mkdir {prefix}"));
        }
    }

    fn put(&mut self, rootfs: &Path, guest_path: &str, from: &Path, mode: u32) {
        let at = resolve(rootfs, guest_path);
        if let Some((parent, _)) = at.rsplit_once('/') {
            self.mkdirs(rootfs, parent);
        }
        // `write` refuses to replace: remove whatever the image had there.
        self.cmd(format!("rm {at}"));
        self.cmd(format!("write {} {at}", from.display()));
        self.cmd(format!("sif {at} mode 0{:o}", 0o100000 | mode));
    }
}

/// `path` inside `rootfs` with the image's symlinks followed the way the guest will follow
/// them: absolute targets stay inside the rootfs.
pub fn resolve(rootfs: &Path, path: &str) -> String {
    let mut todo: std::collections::VecDeque<String> = path
        .split('/')
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect();
    let file = todo.pop_back().unwrap_or_default();
    let mut out: Vec<String> = vec![];
    let mut hops = 0;
    while let Some(p) = todo.pop_front() {
        match p.as_str() {
            "." => continue,
            ".." => {
                out.pop();
                continue;
            }
            _ => out.push(p),
        }
        if let Ok(target) = std::fs::read_link(rootfs.join(out.join("/"))) {
            hops += 1;
            if hops > 40 {
                break;
            }
            out.pop();
            let target = target.to_string_lossy().into_owned();
            if target.starts_with('/') {
                out.clear();
            }
            for q in target.split('/').filter(|q| !q.is_empty()).rev() {
                todo.push_front(q.to_string());
            }
        }
    }
    out.push(file);
    format!("/{}", out.join("/"))
}

fn debugfs(img: &Path, script: &str) -> io::Result<()> {
    let mut child = Command::new("debugfs")
        .args(["-w", "-f", "-"])
        .arg(img)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("debugfs (e2fsprogs): {e}")))?;
    child
        .stdin
        .take()
        .ok_or_else(|| io::Error::other("debugfs stdin"))?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    // debugfs exits 0 even when a command fails; its complaints are on stderr. An `rm` of
    // a path that did not exist is expected.
    let errors: Vec<&str> = std::str::from_utf8(&out.stderr)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.contains("File not found by ext2_lookup"))
        .filter(|l| !l.trim().is_empty())
        .collect();
    if !out.status.success() || !errors.is_empty() {
        return Err(io::Error::other(format!(
            "debugfs on {}: {}",
            img.display(),
            errors.join("; ")
        )));
    }
    Ok(())
}

fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd
        .stdout(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("{:?}: {e}", cmd.get_program())))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn du_bytes(dir: &Path) -> io::Result<u64> {
    let out = Command::new("du").args(["-sb"]).arg(dir).output()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| io::Error::other(format!("du {}: no size", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn resolves_inside_the_rootfs() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("usr/lib64")).unwrap();
        symlink("usr/lib64", root.path().join("lib64")).unwrap();
        // An absolute target must stay inside the rootfs, never reach the host's /usr.
        symlink("/usr/sbin", root.path().join("sbin")).unwrap();
        assert_eq!(resolve(root.path(), "/lib64/ld.so"), "/usr/lib64/ld.so");
        assert_eq!(resolve(root.path(), "/sbin/ltv"), "/usr/sbin/ltv");
        assert_eq!(resolve(root.path(), "/bin/sh"), "/bin/sh");
    }

    #[test]
    fn builds_an_ext4_disk_with_us_as_init() {
        if !Path::new("/usr/sbin/debugfs").exists() && !Path::new("/sbin/debugfs").exists() {
            eprintln!("skipped: e2fsprogs (mkfs.ext4, debugfs) is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        std::fs::create_dir_all(root.join("usr/lib64")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hostname"), "old\n").unwrap();
        symlink("usr/lib64", root.join("lib64")).unwrap();
        let img = dir.path().join("disk.img");
        let bundle = super::super::bundle::ensure(&dir.path().join("bundle")).unwrap();
        build(&root, &img, "vm-test", &bundle).unwrap();
        let cat = |p: &str| {
            let o = Command::new("debugfs")
                .args(["-R", &format!("cat {p}")])
                .arg(&img)
                .output()
                .unwrap();
            o.stdout
        };
        assert_eq!(cat("/etc/hostname"), b"vm-test\n");
        let ltv = cat(GUEST_LTV);
        assert!(ltv.starts_with(b"\x7fELF"), "ltv missing from the disk");
        // Our C init, which starts the agent from where the bundle put it.
        let init = cat("/init");
        assert_eq!(init, GUEST_INIT);
        assert!(init.starts_with(b"\x7fELF"));
        assert!(
            init.windows(GUEST_LTV.len())
                .any(|w| w == GUEST_LTV.as_bytes()),
            "the init does not start {GUEST_LTV}"
        );
        assert!(!dir.path().join("disk.img.tmp").exists());
        // The agent finds its database made, with the schema in it.
        let db = cat("/var/lib/ltv/ltv.db");
        assert!(db.starts_with(b"SQLite format 3\0"), "no agent database");
        assert!(
            db.windows(b"CREATE TABLE instances".len())
                .any(|w| w == b"CREATE TABLE instances"),
            "no schema in the agent database"
        );
        assert!(!dir.path().join("disk.img.staging").exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            3,
            "only rootfs, bundle and disk.img are left"
        );
    }
}
