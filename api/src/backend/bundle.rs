//! The `ltv` that runs inside instances (a system container's nested daemon, a microVM's
//! init and agent): our binary, stripped, its ELF interpreter and run path pointed at its
//! own copies of our libraries under `/.ltv/lib`, so it runs on any image whatever libc it
//! has, and never replaces the image's own libraries.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where instances see the bundle.
pub const GUEST_DIR: &str = "/.ltv";
/// Our binary inside an instance.
pub const GUEST_LTV: &str = "/.ltv/ltv";
const GUEST_LIB: &str = "/.ltv/lib";

/// The bundle for the running binary under `cache`, built on first use: `<cache>/<key>`
/// holding `ltv` and `lib/`. The key changes whenever our binary does.
pub fn ensure(cache: &Path) -> io::Result<PathBuf> {
    // We already are a bundle (a nested daemon, a guest agent): hand down our own.
    if interpreter_of_self()?.is_some_and(|i| i.starts_with(GUEST_LIB)) {
        return Ok(PathBuf::from(GUEST_DIR));
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
    let lib = dir.join("lib");
    std::fs::create_dir(&lib)?;
    let mut interp = None;
    for path in shared_libraries()? {
        let name = Path::new(&path)
            .file_name()
            .ok_or_else(|| io::Error::other(format!("library path {path}")))?;
        // The content, under the name the binary asks for (not the symlink's target's).
        std::fs::copy(&path, lib.join(name))?;
        if path == interpreter_of_self()?.unwrap_or_default() {
            interp = Some(format!("{GUEST_LIB}/{}", name.to_string_lossy()));
        }
    }
    let interp = interp.ok_or_else(|| io::Error::other("our binary has no ELF interpreter"))?;
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
    let out = Command::new("patchelf")
        .args(["--set-interpreter", &interp, "--set-rpath", GUEST_LIB])
        .arg(&ltv)
        .output()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("patchelf: {e} (install Debian's patchelf package)"),
            )
        })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "patchelf {}: {}",
            ltv.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    for entry in std::fs::read_dir(dir)?.chain(std::fs::read_dir(&lib)?) {
        let p = entry?.path();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
}

/// Our PT_INTERP, read where the headers say rather than by reading the whole binary
/// (tens of MB); patchelf puts a new interpreter, and may put the program headers, at
/// the end of the file.
fn interpreter_of_self() -> io::Result<Option<String>> {
    interpreter_of(Path::new("/proc/self/exe"))
}

fn interpreter_of(binary: &Path) -> io::Result<Option<String>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(binary)?;
    let read_at = |off: u64, len: usize| -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let n = f.read_at(&mut buf, off)?;
        buf.truncate(n);
        Ok(buf)
    };
    let ehdr = read_at(0, 64)?;
    let u16_at = |b: &[u8], o: usize| {
        b.get(o..o + 2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
    };
    let u64_at = |b: &[u8], o: usize| {
        b.get(o..o + 8)
            .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
    };
    if ehdr.get(..5) != Some(b"\x7fELF\x02") {
        return Ok(None);
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (
        u64_at(&ehdr, 0x20),
        u16_at(&ehdr, 0x36),
        u16_at(&ehdr, 0x38),
    ) else {
        return Ok(None);
    };
    let phdrs = read_at(phoff, phentsize * phnum)?;
    for i in 0..phnum {
        let ph = &phdrs[(i * phentsize).min(phdrs.len())..];
        if ph.get(..4) != Some(&libc::PT_INTERP.to_le_bytes()[..]) {
            continue;
        }
        let (Some(off), Some(size)) = (u64_at(ph, 8), u64_at(ph, 32)) else {
            return Ok(None);
        };
        let raw = read_at(off, size.min(4096) as usize)?;
        let path = raw.split(|b| *b == 0).next().unwrap_or_default();
        return Ok(Some(String::from_utf8_lossy(path).into_owned()));
    }
    Ok(None)
}

/// Every shared object mapped into this process, and its program interpreter.
pub fn shared_libraries() -> io::Result<Vec<String>> {
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
    if let Some(interp) = interpreter_of_self()? {
        libs.push(interp);
    }
    libs.sort();
    libs.dedup();
    Ok(libs)
}

/// PT_INTERP of a 64-bit little-endian ELF in memory, e.g. `/lib64/ld-linux-x86-64.so.2`:
/// what the tests check [`interpreter_of_self`] against.
#[cfg(test)]
fn interpreter(elf: &[u8]) -> Option<String> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    if elf.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let phoff = u64_at(0x20)? as usize;
    let (phentsize, phnum) = (u16_at(0x36)? as usize, u16_at(0x38)? as usize);
    (0..phnum).find_map(|i| {
        let ph = phoff + i * phentsize;
        if u32::from_le_bytes(elf.get(ph..ph + 4)?.try_into().ok()?) != libc::PT_INTERP {
            return None;
        }
        let (off, size) = (u64_at(ph + 8)? as usize, u64_at(ph + 32)? as usize);
        let raw = elf.get(off..off + size)?;
        Some(String::from_utf8_lossy(raw.split(|b| *b == 0).next()?).into_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_interpreter_is_found() {
        let interp = interpreter_of_self()
            .unwrap()
            .expect("a dynamic test binary");
        assert!(interp.contains("ld-linux"), "{interp}");
        let whole = interpreter(&std::fs::read("/proc/self/exe").unwrap());
        assert_eq!(whole.as_deref(), Some(interp.as_str()));
        if let Ok(expected) = std::env::var("LTV_EXPECT_INTERP") {
            assert_eq!(
                interp, expected,
                "a patched binary finds its new interpreter"
            );
        }
    }

    /// The bundled binary asks for its own loader and runs on the bundle's libraries.
    #[test]
    fn the_bundle_points_at_its_own_libraries() {
        if Command::new("patchelf").arg("--version").output().is_err() {
            eprintln!("skipped: patchelf is not installed (./dev installs it)");
            return;
        }
        let cache = tempfile::tempdir().unwrap();
        let dir = ensure(cache.path()).unwrap();
        assert_eq!(ensure(cache.path()).unwrap(), dir, "built once");
        let elf = std::fs::read(dir.join("ltv")).unwrap();
        let interp = interpreter(&elf).unwrap();
        // What the bundled binary finds when it asks itself (a nested daemon, a guest agent
        // does): patchelf put the new path at the end of the file.
        assert_eq!(
            interpreter_of(&dir.join("ltv")).unwrap(),
            Some(interp.clone())
        );
        assert!(interp.starts_with("/.ltv/lib/ld-linux"), "{interp}");
        let libs: Vec<_> = std::fs::read_dir(dir.join("lib"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(libs.iter().any(|l| l.starts_with("libc.so")), "{libs:?}");
        let loader = dir.join("lib").join(interp.rsplit('/').next().unwrap());
        let out = Command::new(loader)
            .arg("--library-path")
            .arg(dir.join("lib"))
            .arg(dir.join("ltv"))
            .arg("--list")
            .output()
            .unwrap();
        // The test binary is what got bundled here: it lists its tests.
        assert!(out.status.success(), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("bundle"),
            "{out:?}"
        );
    }
}
