//! Directory-fd based file operations that never follow symlinks, so a hostile layer
//! cannot make us write or delete outside the rootfs.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub(crate) fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in file name"))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub(crate) fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str())?;
    let fd = check(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens `name` in `dir` as a directory, failing (ELOOP/ENOTDIR) on symlinks.
pub(crate) fn open_dir_at(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    let flags = libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_RDONLY | libc::O_CLOEXEC;
    let fd = check(unsafe { libc::openat(dir, name.as_ptr(), flags) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn lstat_at(dir: RawFd, name: &CStr) -> io::Result<Option<libc::stat>> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    match check(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) }) {
        Ok(_) => Ok(Some(st)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(crate) fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

pub(crate) fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

pub(crate) fn mkdir_at(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    check(unsafe { libc::mkdirat(dir, name.as_ptr(), mode as libc::mode_t) }).map(|_| ())
}

/// Names in a directory (without `.` and `..`).
pub(crate) fn list_dir(fd: RawFd) -> io::Result<Vec<CString>> {
    // fdopendir takes ownership, so hand it a duplicate.
    let dup = check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })?;
    let dirp = unsafe { libc::fdopendir(dup) };
    if dirp.is_null() {
        let e = io::Error::last_os_error();
        unsafe { libc::close(dup) };
        return Err(e);
    }
    unsafe { libc::rewinddir(dirp) };
    let mut names = Vec::new();
    loop {
        let ent = unsafe { libc::readdir(dirp) };
        if ent.is_null() {
            break;
        }
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    unsafe { libc::closedir(dirp) };
    Ok(names)
}

/// Removes `name` in `dir` recursively without following symlinks and without
/// crossing into another filesystem (a leftover mount must never be emptied).
pub(crate) fn remove_at(dir: RawFd, name: &CStr, dev: libc::dev_t) -> io::Result<()> {
    let Some(st) = lstat_at(dir, name)? else {
        return Ok(());
    };
    if is_dir(&st) {
        if st.st_dev != dev {
            return Err(io::Error::other("refusing to remove across a mount point"));
        }
        let sub = open_dir_at(dir, name)?;
        remove_children(sub.as_raw_fd(), dev, &|_| false)?;
        check(unsafe { libc::unlinkat(dir, name.as_ptr(), libc::AT_REMOVEDIR) })?;
    } else {
        check(unsafe { libc::unlinkat(dir, name.as_ptr(), 0) })?;
    }
    Ok(())
}

/// Removes every child of `dir` for which `keep` is false.
pub(crate) fn remove_children(
    dir: RawFd,
    dev: libc::dev_t,
    keep: &dyn Fn(&CStr) -> bool,
) -> io::Result<()> {
    for n in list_dir(dir)? {
        if !keep(&n) {
            remove_at(dir, &n, dev)?;
        }
    }
    Ok(())
}

/// Removes a whole directory tree given by path, refusing to cross mount points.
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let pfd = open_dir(parent)?;
    let Some(st) = lstat_at(pfd.as_raw_fd(), &cstr(name)?)? else {
        return Ok(());
    };
    remove_at(pfd.as_raw_fd(), &cstr(name)?, st.st_dev)
}

/// Lazily unmounts everything mounted at or below `path` (deepest first), e.g. what a
/// killed debootstrap left behind, so the tree can be removed safely.
pub(crate) fn unmount_below(path: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = path.as_os_str().as_bytes();
    let mut points: Vec<Vec<u8>> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p == prefix || (p.starts_with(prefix) && p.get(prefix.len()) == Some(&b'/')))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        if let Ok(c) = CString::new(p) {
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Whether `path` (absolute, as seen inside the image) exists in `root`, resolving
/// symlinks as a chroot would so absolute links never escape to the host.
pub(crate) fn exists_in_root(root: &Path, path: &str) -> bool {
    let mut todo: Vec<Vec<u8>> = path
        .as_bytes()
        .split(|&c| c == b'/')
        .rev()
        .map(|s| s.to_vec())
        .collect();
    let mut cur: Vec<Vec<u8>> = Vec::new();
    let mut hops = 0;
    while let Some(comp) = todo.pop() {
        match comp.as_slice() {
            b"" | b"." => continue,
            b".." => {
                cur.pop();
                continue;
            }
            _ => {}
        }
        let mut p = root.to_path_buf();
        for c in &cur {
            p.push(OsStr::from_bytes(c));
        }
        p.push(OsStr::from_bytes(&comp));
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            return false;
        };
        if md.file_type().is_symlink() {
            hops += 1;
            let Ok(target) = std::fs::read_link(&p) else {
                return false;
            };
            if hops > 40 {
                return false;
            }
            let t = target.as_os_str().as_bytes();
            if t.starts_with(b"/") {
                cur.clear();
            }
            todo.extend(t.split(|&c| c == b'/').rev().map(|s| s.to_vec()));
        } else {
            cur.push(comp);
        }
    }
    true
}
