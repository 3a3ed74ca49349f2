//! Applies one OCI/docker layer (an uncompressed tar stream) onto a rootfs, with
//! whiteouts, without ever following a symlink that is inside the rootfs.

use super::fsutil::{self, cstr, is_dir, lstat_at, mkdir_at, open_dir_at};
use super::Error;
use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Component, Path};

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

fn invalid(msg: String) -> Error {
    Error::Invalid(msg)
}

fn io_err(context: String) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { context, source }
}

/// Splits a tar path into components relative to the rootfs; `..` is refused outright
/// (even when it would stay inside) and a leading `/` is taken as the rootfs.
pub(crate) fn split_path(p: &Path) -> Result<Vec<CString>, Error> {
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                return Err(invalid(format!("path traversal in layer entry {:?}", p)))
            }
            Component::Prefix(_) => return Err(invalid(format!("bad path {:?}", p))),
            Component::Normal(n) => {
                out.push(cstr(n).map_err(|_| invalid(format!("bad path {:?}", p)))?)
            }
        }
    }
    Ok(out)
}

fn join(comps: &[CString]) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, c) in comps.iter().enumerate() {
        if i > 0 {
            v.push(b'/');
        }
        v.extend_from_slice(c.to_bytes());
    }
    v
}

fn join_child(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = prefix.to_vec();
    if !v.is_empty() {
        v.push(b'/');
    }
    v.extend_from_slice(name);
    v
}

pub(crate) struct Applier {
    root: OwnedFd,
    dev: libc::dev_t,
    /// Paths written by the current layer: whiteouts only hide lower layers.
    seen: HashSet<Vec<u8>>,
    is_root: bool,
}

impl Applier {
    pub(crate) fn new(rootfs: &Path) -> Result<Applier, Error> {
        let root =
            fsutil::open_dir(rootfs).map_err(io_err(format!("opening {}", rootfs.display())))?;
        let st = fsutil::fstat(root.as_raw_fd()).map_err(io_err("stat rootfs".into()))?;
        Ok(Applier {
            root,
            dev: st.st_dev,
            seen: HashSet::new(),
            is_root: unsafe { libc::geteuid() } == 0,
        })
    }

    /// Applies a whole layer; `what` names it in error messages.
    pub(crate) fn apply<R: Read>(&mut self, reader: R, what: &str) -> Result<(), Error> {
        self.seen.clear();
        let mut ar = tar::Archive::new(reader);
        let entries = ar
            .entries()
            .map_err(|e| invalid(format!("{what}: not a tar: {e}")))?;
        for entry in entries {
            let mut entry =
                entry.map_err(|e| invalid(format!("{what}: bad or truncated tar: {e}")))?;
            self.entry(&mut entry, what)?;
        }
        Ok(())
    }

    /// Opens the directory holding an entry. With `create`, missing directories are made
    /// and non-directories in the way are replaced, as overlayfs would show it; never followed.
    fn walk(&mut self, comps: &[CString], create: bool) -> Result<Option<OwnedFd>, Error> {
        let mut cur = self.root.try_clone().map_err(io_err("dup".into()))?;
        for (i, c) in comps.iter().enumerate() {
            let ctx = || format!("creating {}", String::from_utf8_lossy(&join(&comps[..=i])));
            match lstat_at(cur.as_raw_fd(), c).map_err(io_err(ctx()))? {
                Some(st) if is_dir(&st) => {}
                Some(_) if create => {
                    fsutil::remove_at(cur.as_raw_fd(), c, self.dev).map_err(io_err(ctx()))?;
                    mkdir_at(cur.as_raw_fd(), c, 0o755).map_err(io_err(ctx()))?;
                }
                None if create => mkdir_at(cur.as_raw_fd(), c, 0o755).map_err(io_err(ctx()))?,
                _ => return Ok(None),
            }
            if create {
                self.seen.insert(join(&comps[..=i]));
            }
            cur = open_dir_at(cur.as_raw_fd(), c).map_err(io_err(ctx()))?;
        }
        Ok(Some(cur))
    }

    /// Removes what lower layers put under `dir`, keeping what this layer wrote.
    fn clear_unseen(&self, dir: RawFd, prefix: &[u8]) -> Result<(), Error> {
        let ctx = || format!("opaque whiteout in {}", String::from_utf8_lossy(prefix));
        for n in fsutil::list_dir(dir).map_err(io_err(ctx()))? {
            let p = join_child(prefix, n.to_bytes());
            if !self.seen.contains(&p) {
                fsutil::remove_at(dir, &n, self.dev).map_err(io_err(ctx()))?;
            } else if lstat_at(dir, &n)
                .map_err(io_err(ctx()))?
                .is_some_and(|st| is_dir(&st))
            {
                let sub = open_dir_at(dir, &n).map_err(io_err(ctx()))?;
                self.clear_unseen(sub.as_raw_fd(), &p)?;
            }
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, e: &mut tar::Entry<R>, what: &str) -> Result<(), Error> {
        let path = e
            .path()
            .map_err(|err| invalid(format!("{what}: bad entry path: {err}")))?
            .into_owned();
        let comps = split_path(&path)?;
        let shown = path.display().to_string();
        let Some((name, parents)) = comps.split_last() else {
            return Ok(()); // the rootfs itself
        };
        let kind = e.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            return Ok(());
        }
        let nb = name.to_bytes();
        if nb.starts_with(WHITEOUT) {
            let Some(dir) = self.walk(parents, false)? else {
                return Ok(()); // nothing below to hide
            };
            let prefix = join(parents);
            if nb == OPAQUE {
                return self.clear_unseen(dir.as_raw_fd(), &prefix);
            }
            let target = &nb[WHITEOUT.len()..];
            if target.is_empty() || target == b"." || target == b".." {
                return Err(invalid(format!("{what}: bad whiteout {shown}")));
            }
            if !self.seen.contains(&join_child(&prefix, target)) {
                let t = CString::new(target).expect("from a CString");
                fsutil::remove_at(dir.as_raw_fd(), &t, self.dev)
                    .map_err(io_err(format!("whiteout {shown}")))?;
            }
            return Ok(());
        }

        let dir = self.walk(parents, true)?.expect("created");
        let d = dir.as_raw_fd();
        self.seen.insert(join(&comps));
        let ctx = || format!("extracting {shown}");
        let h = e.header();
        let mode = h
            .mode()
            .map_err(|err| invalid(format!("{what}: {shown}: bad mode: {err}")))?
            & 0o7777;
        let mut uid = h.uid().unwrap_or(0);
        let mut gid = h.gid().unwrap_or(0);
        let mtime = h.mtime().unwrap_or(0) as i64;
        let major = h.device_major().ok().flatten().unwrap_or(0);
        let minor = h.device_minor().ok().flatten().unwrap_or(0);
        let mut xattrs = Vec::new();
        if let Ok(Some(pax)) = e.pax_extensions() {
            for ext in pax.flatten() {
                let Ok(k) = ext.key() else { continue };
                match k {
                    "uid" => uid = ext.value().ok().and_then(|v| v.parse().ok()).unwrap_or(uid),
                    "gid" => gid = ext.value().ok().and_then(|v| v.parse().ok()).unwrap_or(gid),
                    _ => {
                        if let Some(x) = k.strip_prefix("SCHILY.xattr.") {
                            xattrs.push((x.to_string(), ext.value_bytes().to_vec()));
                        }
                    }
                }
            }
        }
        let existing = lstat_at(d, name).map_err(io_err(ctx()))?;
        match kind {
            tar::EntryType::Directory => {
                match existing {
                    Some(st) if is_dir(&st) => {}
                    Some(_) => {
                        fsutil::remove_at(d, name, self.dev).map_err(io_err(ctx()))?;
                        mkdir_at(d, name, 0o700).map_err(io_err(ctx()))?;
                    }
                    None => mkdir_at(d, name, 0o700).map_err(io_err(ctx()))?,
                }
                let fd = open_dir_at(d, name).map_err(io_err(ctx()))?;
                self.set_meta(fd.as_raw_fd(), uid, gid, mode, &xattrs)
                    .map_err(io_err(ctx()))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if existing.is_some() {
                    fsutil::remove_at(d, name, self.dev).map_err(io_err(ctx()))?;
                }
                let flags = libc::O_CREAT
                    | libc::O_EXCL
                    | libc::O_WRONLY
                    | libc::O_NOFOLLOW
                    | libc::O_CLOEXEC;
                let raw = unsafe { libc::openat(d, name.as_ptr(), flags, 0o600 as libc::c_uint) };
                if raw < 0 {
                    return Err(io_err(ctx())(io::Error::last_os_error()));
                }
                let mut f = unsafe { std::fs::File::from_raw_fd(raw) };
                let want = e.size();
                let mut got = 0u64;
                let mut buf = vec![0u8; 128 * 1024];
                loop {
                    let n = match e.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                        Err(err) => return Err(invalid(format!("{what}: reading {shown}: {err}"))),
                    };
                    f.write_all(&buf[..n]).map_err(io_err(ctx()))?;
                    got += n as u64;
                }
                if got != want {
                    return Err(invalid(format!(
                        "{what}: truncated data for {shown} ({got} of {want} bytes)"
                    )));
                }
                self.set_meta(f.as_raw_fd(), uid, gid, mode, &xattrs)
                    .map_err(io_err(ctx()))?;
                let ts = [timespec(mtime), timespec(mtime)];
                unsafe { libc::futimens(f.as_raw_fd(), ts.as_ptr()) };
            }
            tar::EntryType::Symlink => {
                let target = e
                    .link_name()
                    .map_err(|err| invalid(format!("{what}: {shown}: bad link: {err}")))?
                    .ok_or_else(|| invalid(format!("{what}: symlink {shown} without target")))?;
                let t = cstr(target.as_os_str())
                    .map_err(|_| invalid(format!("{what}: bad link {shown}")))?;
                if existing.is_some() {
                    fsutil::remove_at(d, name, self.dev).map_err(io_err(ctx()))?;
                }
                if unsafe { libc::symlinkat(t.as_ptr(), d, name.as_ptr()) } < 0 {
                    return Err(io_err(ctx())(io::Error::last_os_error()));
                }
                self.chown_at(d, name, uid, gid).map_err(io_err(ctx()))?;
                let ts = [timespec(mtime), timespec(mtime)];
                unsafe {
                    libc::utimensat(d, name.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
                };
            }
            tar::EntryType::Link => {
                let target = e
                    .link_name()
                    .map_err(|err| invalid(format!("{what}: {shown}: bad link: {err}")))?
                    .ok_or_else(|| invalid(format!("{what}: hardlink {shown} without target")))?
                    .into_owned();
                let tcomps = split_path(&target)?;
                if tcomps == comps {
                    return Ok(());
                }
                let Some((tname, tparents)) = tcomps.split_last() else {
                    return Err(invalid(format!("{what}: hardlink {shown} to the root")));
                };
                let missing = || {
                    invalid(format!(
                        "{what}: hardlink {shown} to missing {}",
                        target.display()
                    ))
                };
                let tdir = self.walk(tparents, false)?.ok_or_else(missing)?;
                match lstat_at(tdir.as_raw_fd(), tname).map_err(io_err(ctx()))? {
                    None => return Err(missing()),
                    Some(st) if is_dir(&st) => {
                        return Err(invalid(format!("{what}: hardlink {shown} to a directory")))
                    }
                    Some(_) => {}
                }
                if existing.is_some() {
                    fsutil::remove_at(d, name, self.dev).map_err(io_err(ctx()))?;
                }
                // Flags 0: link the symlink itself if the target is one, never what it points to.
                if unsafe { libc::linkat(tdir.as_raw_fd(), tname.as_ptr(), d, name.as_ptr(), 0) }
                    < 0
                {
                    return Err(io_err(ctx())(io::Error::last_os_error()));
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let fmt = match kind {
                    tar::EntryType::Char => libc::S_IFCHR,
                    tar::EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                if existing.is_some() {
                    fsutil::remove_at(d, name, self.dev).map_err(io_err(ctx()))?;
                }
                let dev = libc::makedev(major, minor);
                if unsafe { libc::mknodat(d, name.as_ptr(), fmt | mode as libc::mode_t, dev) } < 0 {
                    let err = io::Error::last_os_error();
                    if err.raw_os_error() == Some(libc::EPERM) && !self.is_root {
                        tracing::warn!("skipping device node {shown}: not root");
                        return Ok(());
                    }
                    return Err(io_err(ctx())(err));
                }
                self.chown_at(d, name, uid, gid).map_err(io_err(ctx()))?;
                if unsafe { libc::fchmodat(d, name.as_ptr(), mode as libc::mode_t, 0) } < 0 {
                    return Err(io_err(ctx())(io::Error::last_os_error()));
                }
            }
            tar::EntryType::GNUSparse => {
                return Err(invalid(format!(
                    "{what}: sparse file {shown} is not supported"
                )))
            }
            tar::EntryType::GNULongName | tar::EntryType::GNULongLink => {}
            other => {
                return Err(invalid(format!(
                    "{what}: unsupported entry type {other:?} for {shown}"
                )))
            }
        }
        Ok(())
    }

    fn set_meta(
        &self,
        fd: RawFd,
        uid: u64,
        gid: u64,
        mode: u32,
        xattrs: &[(String, Vec<u8>)],
    ) -> io::Result<()> {
        if self.is_root && unsafe { libc::fchown(fd, uid as libc::uid_t, gid as libc::gid_t) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // After chown, which clears set-id bits.
        if unsafe { libc::fchmod(fd, mode as libc::mode_t) } < 0 {
            return Err(io::Error::last_os_error());
        }
        for (k, v) in xattrs {
            let Ok(k) = CString::new(k.as_bytes()) else {
                continue;
            };
            // Optional: a filesystem without xattrs still gets a usable rootfs.
            if unsafe { libc::fsetxattr(fd, k.as_ptr(), v.as_ptr().cast(), v.len(), 0) } < 0 {
                tracing::debug!("xattr {:?}: {}", k, io::Error::last_os_error());
            }
        }
        Ok(())
    }

    fn chown_at(&self, dir: RawFd, name: &CStr, uid: u64, gid: u64) -> io::Result<()> {
        if self.is_root
            && unsafe {
                libc::fchownat(
                    dir,
                    name.as_ptr(),
                    uid as libc::uid_t,
                    gid as libc::gid_t,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn timespec(secs: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    }
}
