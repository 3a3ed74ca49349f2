//! A tiny image from Debian's `busybox-static`: the binary, one symlink per applet and
//! just enough /etc for busybox init.

use super::{detect_init, io_err, Error, ImageConfig, ImageInfo, ImageStore, Progress};
use sha2::{Digest as _, Sha256};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bump when the generated files or layout change, so the fingerprint changes too.
const LAYOUT_VERSION: &str = "ltv-busybox-layout-2";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const INITTAB: &str = "\
::sysinit:/etc/init.d/rcS
::ctrlaltdel:/sbin/reboot
::restart:/sbin/init
";

const RCS: &str = "\
#!/bin/sh
# Boot of a busybox system container; the runtime may already have mounted these.
# (Debian's busybox has no mountpoint applet.)
[ -e /proc/self ] || mount -t proc proc /proc
[ -e /sys/kernel ] || mount -t sysfs sysfs /sys 2>/dev/null
grep -q ' /run ' /proc/mounts || mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
[ -s /etc/hostname ] && hostname -F /etc/hostname
[ -c /dev/console ] && echo ltv-ready > /dev/console 2>/dev/null
exit 0
";

/// (path, mode, contents) of the generated files.
const FILES: &[(&str, u32, &str)] = &[
    (
        "etc/passwd",
        0o644,
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    ),
    ("etc/group", 0o644, "root:x:0:\nnogroup:x:65534:\n"),
    ("etc/hostname", 0o644, "ltv\n"),
    (
        "etc/hosts",
        0o644,
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    ),
    ("etc/resolv.conf", 0o644, ""),
    ("etc/inittab", 0o644, INITTAB),
    ("etc/init.d/rcS", 0o755, RCS),
];

const DIRS: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("sbin", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("tmp", 0o1777),
    ("root", 0o700),
    ("etc/init.d", 0o755),
    ("var/log", 0o755),
    ("run", 0o755),
    ("home", 0o755),
];

fn run(cmd: &mut Command) -> Result<String, Error> {
    let out = cmd
        .output()
        .map_err(|e| Error::Tool(format!("running {cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(Error::Tool(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The installed busybox-static version, if the package is installed.
fn installed_version() -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}\t${Version}", "busybox-static"])
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, version) = s.split_once('\t')?;
    (out.status.success() && status.ends_with(" installed") && !version.is_empty())
        .then(|| version.to_string())
}

/// Finds the busybox binary: the installed package, else the package fetched with
/// `apt-get download` and unpacked into `scratch` (the host is left untouched).
fn locate(
    scratch: &Path,
    progress: &dyn Progress,
    use_installed: bool,
) -> Result<(PathBuf, String), Error> {
    if let Some(v) = installed_version().filter(|_| use_installed) {
        if Path::new("/bin/busybox").is_file() {
            return Ok((PathBuf::from("/bin/busybox"), v));
        }
    }
    progress.stage("Downloading busybox-static");
    std::fs::create_dir_all(scratch).map_err(io_err("creating scratch dir"))?;
    run(Command::new("apt-get")
        .args(["download", "busybox-static"])
        .current_dir(scratch))?;
    let deb = std::fs::read_dir(scratch)
        .map_err(io_err("reading scratch dir"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| Error::Tool("apt-get download produced no .deb".into()))?;
    let version = run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Version"))?
        .trim()
        .to_string();
    let x = scratch.join("x");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x))?;
    for cand in ["bin/busybox", "usr/bin/busybox"] {
        if x.join(cand).is_file() {
            return Ok((x.join(cand), version));
        }
    }
    Err(Error::Tool(
        "busybox-static package has no busybox binary".into(),
    ))
}

pub(super) fn build(store: &ImageStore, progress: &dyn Progress) -> Result<ImageInfo, Error> {
    build_with(store, progress, true)
}

/// `use_installed: false` always fetches the package, as when it is not installed.
pub(super) fn build_with(
    store: &ImageStore,
    progress: &dyn Progress,
    use_installed: bool,
) -> Result<ImageInfo, Error> {
    progress.stage("Locating busybox-static");
    let tmp = store.tmp()?;
    let (bin, version) = locate(&tmp.path().join("pkg"), progress, use_installed)?;
    let bytes = std::fs::read(&bin).map_err(io_err(format!("reading {}", bin.display())))?;
    let mut h = Sha256::new();
    h.update(&bytes);
    h.update(LAYOUT_VERSION.as_bytes());
    for (path, mode, content) in FILES {
        h.update(format!("\0{path}\0{mode:o}\0").as_bytes());
        h.update(content.as_bytes());
    }
    let fingerprint = hex::encode(h.finalize());
    if store.exists(&fingerprint) {
        return store.get(&fingerprint);
    }

    progress.stage("Creating busybox rootfs");
    let root = tmp.rootfs();
    let list = run(Command::new(&bin).arg("--list-full"))?;
    for (d, mode) in DIRS {
        let p = root.join(d);
        std::fs::create_dir_all(&p).map_err(io_err(format!("creating {}", p.display())))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))
            .map_err(io_err("chmod"))?;
    }
    let dst = root.join("bin/busybox");
    std::fs::write(&dst, &bytes).map_err(io_err("writing bin/busybox"))?;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err("chmod bin/busybox"))?;
    let applets: Vec<&str> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    for (i, applet) in applets.iter().enumerate() {
        // Names come from the binary: still refuse anything that could climb out.
        if applet.starts_with('/')
            || applet.split('/').any(|c| c == ".." || c.is_empty())
            || *applet == "bin/busybox"
        {
            continue;
        }
        let link = root.join(applet);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io_err(format!("creating {}", parent.display())))?;
        }
        if link.symlink_metadata().is_ok() {
            continue;
        }
        symlink("/bin/busybox", &link).map_err(io_err(format!("linking {applet}")))?;
        progress.advance(i as u64 + 1, Some(applets.len() as u64));
    }
    for (path, mode, content) in FILES {
        let p = root.join(path);
        std::fs::write(&p, content).map_err(io_err(format!("writing {path}")))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))
            .map_err(io_err("chmod"))?;
    }
    let _ = std::fs::remove_dir_all(tmp.path().join("pkg"));
    let config = ImageConfig {
        entrypoint: Vec::new(),
        cmd: vec!["/bin/sh".into()],
        env: vec![PATH_ENV.into()],
        working_dir: "/".into(),
        user: String::new(),
        init: detect_init(&root),
    };
    store.commit(
        tmp,
        &fingerprint,
        config,
        format!("busybox-static {version}"),
    )
}
