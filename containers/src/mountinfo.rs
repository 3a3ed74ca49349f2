//! Parsing of `/proc/<pid>/mountinfo` (see proc(5)).

use std::path::{Path, PathBuf};

/// One line of mountinfo, with the fields the runtime needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub id: u32,
    pub parent: u32,
    /// `major:minor` of the filesystem.
    pub dev: String,
    /// Root of the mount inside its filesystem.
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    /// Per-superblock options, e.g. `rw,memory` for a v1 cgroup.
    pub super_options: Vec<String>,
}

/// Undoes the kernel's octal escapes (`\040` for a space, etc.).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = (oct[0] - b'0') as u32 * 64
                    + (oct[1] - b'0') as u32 * 8
                    + (oct[2] - b'0') as u32;
                if v <= 255 {
                    out.push(v as u8);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses one mountinfo line; `None` when it is malformed.
pub fn parse_line(line: &str) -> Option<MountInfo> {
    let (left, right) = line.split_once(" - ")?;
    let mut l = left.split(' ');
    let id = l.next()?.parse().ok()?;
    let parent = l.next()?.parse().ok()?;
    let dev = l.next()?.to_string();
    let root = PathBuf::from(unescape(l.next()?));
    let mount_point = PathBuf::from(unescape(l.next()?));
    let mut r = right.split(' ');
    let fs_type = r.next()?.to_string();
    let source = unescape(r.next().unwrap_or(""));
    let super_options = r
        .next()
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    Some(MountInfo {
        id,
        parent,
        dev,
        root,
        mount_point,
        fs_type,
        source,
        super_options,
    })
}

pub fn parse(text: &str) -> Vec<MountInfo> {
    text.lines().filter_map(parse_line).collect()
}

/// The mounts of the calling process's mount namespace.
///
/// Kept from the last call while it is still true: a mount or unmount in the namespace
/// marks an open mountinfo file (POLLPRI, proc(5)), and a move to another namespace
/// changes /proc/self/ns/mnt. Reading and parsing the table took 0.2 ms here, on every
/// container start and exec (their cgroup paths come from it).
pub fn read_self() -> std::io::Result<Vec<MountInfo>> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    struct Cached {
        ns: (u64, u64),
        file: std::fs::File,
        mounts: Vec<MountInfo>,
    }
    static CACHE: std::sync::Mutex<Option<Cached>> = std::sync::Mutex::new(None);
    // Also re-arms the file's event (opening arms it too): the next poll reports only
    // changes after this one.
    let changed = |file: &std::fs::File| {
        let mut pfd = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLPRI,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n != 0
    };
    let ns = std::fs::metadata("/proc/self/ns/mnt").map(|m| (m.dev(), m.ino()));
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let (Ok(ns), Some(c)) = (&ns, cache.as_ref()) {
        if c.ns == *ns && !changed(&c.file) {
            return Ok(c.mounts.clone());
        }
    }
    let mut file = std::fs::File::open("/proc/self/mountinfo")?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    let mounts = parse(&text);
    // A change after the open shows on the next poll, even one the read already saw.
    *cache = ns.ok().map(|ns| Cached {
        ns,
        file,
        mounts: mounts.clone(),
    });
    Ok(mounts)
}

/// Mounts at `dir` or below it, deepest (last mounted) first: the order to unmount them.
pub fn mounts_under(mounts: &[MountInfo], dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mounts
        .iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .map(|m| m.mount_point.clone())
        .collect();
    v.reverse();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:5 master:2 - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 / /tmp/a\\040b rw - overlay overlay rw,lowerdir=/x
51 50 0:41 / /tmp/a\\040b/proc rw - proc proc rw
52 23 0:42 / /tmp/a\\040bc rw - tmpfs tmpfs rw
garbage line
";

    #[test]
    fn parses_fields_and_escapes() {
        let m = parse(SAMPLE);
        assert_eq!(m.len(), 7);
        assert_eq!(m[1].fs_type, "cgroup");
        assert_eq!(m[1].super_options, vec!["rw", "cpu"]);
        assert_eq!(m[2].mount_point, PathBuf::from("/sys/fs/cgroup/memory"));
        assert_eq!(m[2].dev, "0:32");
        assert_eq!(m[3].fs_type, "cgroup2");
        assert_eq!(m[4].mount_point, PathBuf::from("/tmp/a b"));
    }

    #[test]
    fn mounts_under_is_deepest_first_and_component_wise() {
        let m = parse(SAMPLE);
        let v = mounts_under(&m, Path::new("/tmp/a b"));
        assert_eq!(
            v,
            vec![PathBuf::from("/tmp/a b/proc"), PathBuf::from("/tmp/a b")]
        );
    }

    #[test]
    fn unescape_edge_cases() {
        assert_eq!(unescape("a\\"), "a\\");
        assert_eq!(unescape("a\\04"), "a\\04");
        assert_eq!(unescape("\\011x"), "\tx");
    }
}
