//! The `ltv` that runs inside instances (a system container's nested daemon, a microVM's
//! init and agent): our own binary, stripped. It is statically linked (the workspace's
//! `.cargo/config.toml`), so it runs on any image whatever libc it has, and an exec
//! costs no dynamic loading: under kvm-pvm, where every page fault is emulated guest
//! kernel work, that is seconds per start of the guest agent.

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
