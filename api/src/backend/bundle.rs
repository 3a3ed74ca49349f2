//! The `ltv` that runs inside instances (a system container's nested daemon, a microVM's
//! init and agent): our own binary, stripped. It is statically linked (the workspace's
//! `.cargo/config.toml`), so it runs on any image whatever libc it has, and an exec
//! costs no dynamic loading: under kvm-pvm, where every page fault is emulated guest
//! kernel work, that is seconds per start of the guest agent.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where instances see the bundle.
pub const GUEST_DIR: &str = "/.ltv";
/// Our binary inside an instance.
pub const GUEST_LTV: &str = "/.ltv/ltv";

/// The bundle for the running binary under `cache`, built on first use: `<cache>/<key>`
/// holding `ltv`. The key changes whenever our binary does.
pub fn ensure(cache: &Path) -> io::Result<PathBuf> {
    // We already are the bundle (a nested daemon, a guest agent): hand down our own.
    if std::fs::read_link("/proc/self/exe").is_ok_and(|p| p == Path::new(GUEST_LTV)) {
        return Ok(PathBuf::from(GUEST_DIR));
    }
    if let Some(lib) = shared_libraries()?.first() {
        return Err(io::Error::other(format!(
            "this ltv is dynamically linked (it loaded {lib}), so it cannot run inside instances: build it with the workspace's .cargo/config.toml, which links it statically"
        )));
    }
    let meta = std::fs::metadata("/proc/self/exe")?;
    let key = format!(
        "{:x}-{:x}-{:x}",
        meta.ino(),
        meta.size(),
        meta.mtime() as u64 * 1_000_000_000 + meta.mtime_nsec() as u64
    );
    let dir = cache.join(key);
    if dir.join("ltv").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(cache)?;
    let tmp = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(cache)?;
    build(tmp.path())?;
    // Only complete bundles get their name; a concurrent builder's win is as good as ours.
    let built = tmp.keep();
    if std::fs::rename(&built, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&built);
    }
    if dir.join("ltv").exists() {
        // Our binary changed since the last bundle: the older ones are garbage, but for
        // those a running container still has mounted.
        prune(cache, &dir, &mounted_roots());
        Ok(dir)
    } else {
        Err(io::Error::other(format!(
            "bundle {} was not built",
            dir.display()
        )))
    }
}

fn build(dir: &Path) -> io::Result<()> {
    let ltv = dir.join("ltv");
    // Stripped: debug info is tens of MB that every instance would carry for nothing.
    // By our pid: strip's own /proc/self/exe is strip.
    let stripped = Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&ltv)
        .arg(format!("/proc/{}/exe", std::process::id()))
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy("/proc/self/exe", &ltv)?;
    }
    let mode =
        |p: &Path| std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755));
    mode(&ltv)?;
    mode(dir)
}

/// Removes every bundle under `cache` but `keep` and those whose directory name is in
/// `in_use`. A nesting container bind-mounts its bundle at `/.ltv` for as long as it
/// runs, and its nested daemon may exec `/.ltv/ltv` again.
fn prune(cache: &Path, keep: &Path, in_use: &HashSet<OsString>) {
    for entry in std::fs::read_dir(cache).into_iter().flatten().flatten() {
        let name = entry.file_name();
        // Dot names are builds in progress (ours or a concurrent daemon's).
        if entry.path() == keep || name.to_string_lossy().starts_with('.') || in_use.contains(&name)
        {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => tracing::info!("removed the old bundle {}", entry.path().display()),
            Err(e) => tracing::warn!("old bundle {}: {e}", entry.path().display()),
        }
    }
}

/// The last path component of the root of every mount in every mount namespace on
/// the host: a bind mount's root names the directory it came from.
fn mounted_roots() -> HashSet<OsString> {
    let mut namespaces = HashSet::new();
    let mut roots = HashSet::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let proc_dir = entry.path();
        let Ok(ns) = std::fs::read_link(proc_dir.join("ns/mnt")) else {
            continue;
        };
        if !namespaces.insert(ns) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(proc_dir.join("mountinfo")) else {
            continue;
        };
        for m in ltv_containers::mountinfo::parse(&text) {
            roots.extend(m.root.file_name().map(OsString::from));
        }
    }
    roots
}

/// Every shared object mapped into this process: none for a static build.
fn shared_libraries() -> io::Result<Vec<String>> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut libs: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| {
            p.starts_with('/')
                && Path::new(p)
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().contains(".so"))
        })
        .map(String::from)
        .collect();
    libs.sort();
    libs.dedup();
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Old bundles go, unless mounted somewhere; the current one and builds in
    /// progress stay.
    #[test]
    fn prune_keeps_the_current_bundle_and_those_in_use() {
        let cache = tempfile::tempdir().unwrap();
        let unique = format!(
            "{}-{:x}",
            std::process::id(),
            std::ptr::from_ref(&cache) as usize
        );
        let [old, mounted, current, building] =
            ["old", "mounted", "current", ".build-x"].map(|n| {
                let d = cache.path().join(format!("{n}-{unique}"));
                std::fs::create_dir(&d).unwrap();
                std::fs::write(d.join("ltv"), b"x").unwrap();
                d
            });
        let elsewhere = tempfile::tempdir().unwrap();
        let target = elsewhere.path();
        // As root, the way a nesting container holds its bundle: a bind mount.
        let root = nix::unistd::Uid::effective().is_root();
        if root {
            nix::mount::mount(
                Some(&mounted),
                target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .unwrap();
        }
        let in_use = if root {
            mounted_roots()
        } else {
            eprintln!("not root: the mount is simulated");
            HashSet::from([mounted.file_name().unwrap().to_owned()])
        };
        prune(cache.path(), &current, &in_use);
        if root {
            nix::mount::umount(target).unwrap();
        }
        assert!(!old.exists());
        assert!(mounted.join("ltv").exists());
        assert!(current.join("ltv").exists());
        assert!(building.join("ltv").exists());
    }

    /// The bundled binary runs by itself: no loader, no libraries.
    #[test]
    fn the_bundle_is_a_static_binary_that_runs() {
        assert_eq!(
            shared_libraries().unwrap(),
            Vec::<String>::new(),
            "the workspace builds static binaries"
        );
        let cache = tempfile::tempdir().unwrap();
        let dir = ensure(cache.path()).unwrap();
        assert_eq!(ensure(cache.path()).unwrap(), dir, "built once");
        let elf = std::fs::read(dir.join("ltv")).unwrap();
        assert!(elf.starts_with(b"\x7fELF"));
        let out = Command::new("readelf")
            .args(["-lW"])
            .arg(dir.join("ltv"))
            .output()
            .unwrap();
        let headers = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        assert!(!headers.contains("INTERP"), "{headers}");
        // The test binary is what got bundled here: it lists its tests.
        let out = Command::new(dir.join("ltv"))
            .arg("--list")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("bundle"),
            "{out:?}"
        );
    }
}
