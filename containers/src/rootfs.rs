//! The container's filesystem: the overlay on the host, then (inside the new mount
//! namespace) /proc, /sys, a minimal /dev, pivot_root and masked paths.

use crate::mountinfo;
use crate::spec::{IdMap, RootfsSpec};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::io::{Error, ErrorKind, Result};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

fn err(stage: String, e: impl Into<Error>) -> Error {
    let e: Error = e.into();
    Error::new(e.kind(), format!("{stage}: {e}"))
}

fn nix_err(stage: String, e: nix::Error) -> Error {
    err(stage, Error::from_raw_os_error(e as i32))
}

fn mnt(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    mount(src, target, fstype, flags, data).map_err(|e| {
        nix_err(
            format!(
                "mount {} at {}",
                fstype.or(src).unwrap_or("(remount)"),
                target.display()
            ),
            e,
        )
    })
}

/// Checks what would break the overlay option string.
pub fn validate(spec: &RootfsSpec) -> std::result::Result<(), String> {
    if spec.lowerdirs.is_empty() {
        return Err("rootfs needs at least one lower dir".into());
    }
    let all = spec
        .lowerdirs
        .iter()
        .chain([&spec.upperdir, &spec.workdir, &spec.mountpoint]);
    for p in all {
        let s = p.to_str().ok_or(format!("{} is not UTF-8", p.display()))?;
        if !p.is_absolute() {
            return Err(format!("rootfs path {s:?} must be absolute"));
        }
        if s.contains([',', ':', '\0', '\\']) {
            return Err(format!("rootfs path {s:?} contains ',', ':' or '\\'"));
        }
    }
    if spec.mountpoint == Path::new("/") {
        return Err("rootfs mountpoint must not be /".into());
    }
    Ok(())
}

/// Builds the overlay as a detached mount (the new mount API) that the container's
/// helper attaches inside its own mount namespace with [`attach_detached`]: the host's
/// mount table never holds it, and a helper spawned ahead of time (the pool) can still
/// get a rootfs made later. With an id map, the image layers are idmapped through
/// `userns`, a user namespace that has that map (the container's own: making one would
/// cost a fork of the caller), and the upper dir is given to the container's root.
pub fn detached_overlay(
    spec: &RootfsSpec,
    idmap: Option<(&IdMap, BorrowedFd<'_>)>,
) -> Result<DetachedRootfs> {
    use std::os::fd::AsRawFd;
    let dirs: &[&PathBuf] = if spec.readonly {
        &[&spec.mountpoint]
    } else {
        &[&spec.upperdir, &spec.workdir, &spec.mountpoint]
    };
    for d in dirs {
        std::fs::create_dir_all(d).map_err(|e| err(format!("create {}", d.display()), e))?;
    }
    // An identity map (a nested daemon sharing its own range) needs no shifted layers; the
    // kernel would refuse them anyway on a filesystem the host mounted.
    let idmap = idmap.filter(|(m, _)| m.host_uid != 0 || m.host_gid != 0);
    if let (true, [layer]) = (spec.readonly, spec.lowerdirs.as_slice()) {
        // Nothing to write, so no overlay: the layer itself (which overlayfs would refuse
        // alone without an upper dir). Its read-only flag holds as the container's root
        // has no CAP_SYS_ADMIN to remount it (Docker's capability set).
        let userns = idmap.map(|(_, userns)| userns);
        return detached_clone(layer, userns, true).map(|mount| DetachedRootfs {
            mount,
            layers: vec![],
        });
    }
    let Some((m, userns)) = idmap else {
        let lower: Vec<String> = spec
            .lowerdirs
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        return overlay_from(&lower, spec).map(|mount| DetachedRootfs {
            mount,
            layers: vec![],
        });
    };
    if !spec.readonly {
        std::os::unix::fs::chown(&spec.upperdir, Some(m.host_uid), Some(m.host_gid))
            .map_err(|e| err(format!("chown {}", spec.upperdir.display()), e))?;
    }
    let layer_fds = spec
        .lowerdirs
        .iter()
        .map(|l| detached_clone(l, Some(userns), false))
        .collect::<Result<Vec<_>>>()?;
    if !DETACHED_LAYERS_REFUSED.load(std::sync::atomic::Ordering::Relaxed) {
        let lower: Vec<String> = layer_fds
            .iter()
            .map(|fd| format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .collect();
        match overlay_from(&lower, spec) {
            // The kernel logs "failed to clone lowerpath" only to dmesg.
            Err(e)
                if e.kind() == ErrorKind::InvalidInput
                    && e.to_string().contains("overlay create") =>
            {
                tracing::info!(
                    "this kernel's overlayfs takes no detached layers: attaching them first"
                );
                DETACHED_LAYERS_REFUSED.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            other => {
                return other.map(|mount| DetachedRootfs {
                    mount,
                    layers: layer_fds,
                })
            }
        }
    }
    overlay_on_attached_layers(&layer_fds, spec).map(|mount| DetachedRootfs {
        mount,
        layers: layer_fds,
    })
}

/// A rootfs from [`detached_overlay`]: the overlay, and the idmapped layer clones it was
/// made from (the overlay holds its own references). Closing a clone unmounts it, 0.3 ms
/// here: a start drops them once the helper has been sent the rootfs, not on the way.
pub struct DetachedRootfs {
    pub mount: OwnedFd,
    pub layers: Vec<OwnedFd>,
}

/// Kernels before 6.15 refuse detached mounts as overlay layers (clone_private_mount
/// wants them in our mount namespace); known after the first refusal.
static DETACHED_LAYERS_REFUSED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Makes idmapped layers go the way older kernels need (tests use it to cover that path on
/// a newer kernel).
#[doc(hidden)]
pub fn attach_layers_first(on: bool) {
    DETACHED_LAYERS_REFUSED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The overlay over idmapped layers attached for the moment in a private mount namespace
/// of a thread of our own: nothing shows in the host's mount table, and the attachments
/// go with that namespace when the thread ends (the overlay keeps its own clones).
fn overlay_on_attached_layers(layers: &[OwnedFd], spec: &RootfsSpec) -> Result<OwnedFd> {
    let parent = spec.upperdir.parent().unwrap_or(Path::new("/"));
    let dirs: Vec<PathBuf> = (0..layers.len())
        .map(|i| parent.join(format!(".layer-{i}")))
        .collect();
    let result = std::thread::scope(|s| {
        s.spawn(|| -> Result<OwnedFd> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
                .map_err(|e| nix_err("unshare a mount namespace for the layers".into(), e))?;
            mnt(
                None,
                Path::new("/"),
                None,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None,
            )?;
            for (fd, dir) in layers.iter().zip(&dirs) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| err(format!("create {}", dir.display()), e))?;
                attach_detached(fd, dir)?;
            }
            let lower: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            overlay_from(&lower, spec)
        })
        .join()
        .unwrap_or_else(|_| Err(Error::other("the layer thread panicked")))
    });
    for d in &dirs {
        let _ = std::fs::remove_dir(d);
    }
    result
}

/// Known after the first refusal of overlayfs' `volatile` (kernels before 5.10).
static VOLATILE_REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets a flag parameter (one without a value) on a filesystem context.
fn set_flag(fs: &OwnedFd, key: &std::ffi::CStr) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fsconfig on our fs context with a valid C string and no value.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_FLAG,
            key.as_ptr(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    };
    if r < 0 {
        return Err(Error::last_os_error());
    }
    Ok(())
}

/// An overlay of `lower` (paths, topmost first) under the spec's upper and work dirs (or
/// of `lower` alone, read-only, for a `readonly` spec), as a detached mount.
fn overlay_from(lower: &[String], spec: &RootfsSpec) -> Result<OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let cstr = |s: &str| {
        std::ffi::CString::new(s)
            .map_err(|_| Error::new(ErrorKind::InvalidInput, "NUL in overlay option"))
    };
    // SAFETY: fsopen with a C string; the result is a new fd we own.
    let fs = unsafe { libc::syscall(libc::SYS_fsopen, c"overlay".as_ptr(), FSOPEN_CLOEXEC) };
    if fs < 0 {
        return Err(err("fsopen overlay".into(), Error::last_os_error()));
    }
    // SAFETY: fs was just returned by fsopen.
    let fs = unsafe { OwnedFd::from_raw_fd(fs as i32) };
    let set = |key: &str, value: Option<&str>| -> Result<()> {
        let k = cstr(key)?;
        let v = value.map(cstr).transpose()?;
        let (cmd, vptr) = match &v {
            Some(v) => (FSCONFIG_SET_STRING, v.as_ptr()),
            None => (FSCONFIG_CMD_CREATE, std::ptr::null()),
        };
        let kptr = if v.is_some() {
            k.as_ptr()
        } else {
            std::ptr::null()
        };
        // SAFETY: fsconfig on our fs context with valid (or null) C strings.
        let r = unsafe { libc::syscall(libc::SYS_fsconfig, fs.as_raw_fd(), cmd, kptr, vptr, 0) };
        if r < 0 {
            let e = Error::last_os_error();
            // The kernel says why in the context's log; an errno alone rarely does.
            let why = fs_context_log(&fs);
            let key = if why.is_empty() {
                key.to_string()
            } else {
                format!("{key} ({why})")
            };
            return Err(err(format!("overlay {key}"), e));
        }
        Ok(())
    };
    // lowerdir+ (one layer per call) would avoid the 4 KiB option limit, but needs 6.8.
    set("lowerdir", Some(&lower.join(":")))?;
    if !spec.readonly {
        set("upperdir", Some(&spec.upperdir.display().to_string()))?;
        set("workdir", Some(&spec.workdir.display().to_string()))?;
    }
    if spec.volatile
        && !spec.readonly
        && !VOLATILE_REFUSED.load(std::sync::atomic::Ordering::Relaxed)
    {
        // Linux >= 5.10; without it the overlay is only slower to end.
        if let Err(e) = set_flag(&fs, c"volatile") {
            tracing::info!("overlayfs refuses volatile ({e}); upper dirs are synced on unmount");
            VOLATILE_REFUSED.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    set("create", None)?;
    // SAFETY: fsmount on a created context; the result is a detached mount fd we own.
    let m = unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, 0) };
    if m < 0 {
        return Err(err("fsmount overlay".into(), Error::last_os_error()));
    }
    // SAFETY: m was just returned by fsmount.
    Ok(unsafe { OwnedFd::from_raw_fd(m as i32) })
}

/// Attaches a detached mount (from [`detached_overlay`]) at `target`.
pub fn attach_detached(mount: &OwnedFd, target: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let t = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::new(ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: move_mount from our detached mount fd to a C path.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mount.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(err(
            format!("attach rootfs at {}", target.display()),
            Error::last_os_error(),
        ));
    }
    Ok(())
}

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A detached copy of `dir`'s mount, idmapped through `userns` if given, read-only if
/// asked.
fn detached_clone(dir: &Path, userns: Option<BorrowedFd<'_>>, readonly: bool) -> Result<OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::new(ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: open_tree with a valid C path; the result is a new fd we own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(err(
            format!("open_tree {}", dir.display()),
            Error::last_os_error(),
        ));
    }
    // SAFETY: fd was just returned by open_tree.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut attr = MountAttr {
        attr_set: 0,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    if let Some(userns) = userns {
        attr.attr_set |= MOUNT_ATTR_IDMAP;
        attr.userns_fd = userns.as_raw_fd() as u64;
    }
    if readonly {
        attr.attr_set |= MOUNT_ATTR_RDONLY;
    }
    if attr.attr_set == 0 {
        return Ok(fd);
    }
    // SAFETY: mount_setattr on our detached mount with a correctly sized struct.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(err(
            format!("mount_setattr {}", dir.display()),
            Error::last_os_error(),
        ));
    }
    Ok(fd)
}

/// Lazily unmounts everything at or below `dir` in the caller's mount namespace.
pub fn unmount_all(dir: &Path) -> Result<()> {
    let dir = match std::fs::canonicalize(dir) {
        Ok(d) => d,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(format!("resolve {}", dir.display()), e)),
    };
    // Shared propagation can bring mounts back; a few rounds settle it.
    for _ in 0..8 {
        let mounts = mountinfo::read_self().map_err(|e| err("read mountinfo".into(), e))?;
        let under = mountinfo::mounts_under(&mounts, &dir);
        if under.is_empty() {
            return Ok(());
        }
        for m in under {
            match umount2(&m, MntFlags::MNT_DETACH) {
                Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
                Err(e) => return Err(nix_err(format!("unmount {}", m.display()), e)),
            }
        }
    }
    Err(Error::other(format!(
        "mounts remain under {} after unmounting",
        dir.display()
    )))
}

fn mkdir_p(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| err(format!("create {}", p.display()), e))
}

/// Ensures an empty regular file exists to bind a device node onto.
fn touch(p: &Path) -> Result<()> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(p)
        .map(|_| ())
        .map_err(|e| err(format!("create {}", p.display()), e))
}

fn symlink(target: &str, link: &Path) -> Result<()> {
    match std::os::unix::fs::symlink(target, link) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(err(format!("symlink {}", link.display()), e)),
    }
}

const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Builds the container's view under `root` (the overlay mountpoint), in a fresh mount
/// namespace, then makes it `/`. `tty` binds the terminal on fd 0 at /dev/console.
/// Stops mounts made from here on from propagating to other namespaces.
pub fn make_private() -> Result<()> {
    mnt(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )
}

pub fn setup(root: &Path, spec: &crate::spec::ContainerSpec, cg: &CgroupMounts) -> Result<()> {
    let tty = spec.process.tty;
    let nsfl = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    // Nothing we mount may leak back to the host.
    mnt(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    // A mount copied into a user namespace's mount ns is locked and pivot_root refuses
    // it; a bind made here is ours (and makes the root a mount point in any case).
    let r = root.to_str().unwrap_or_default();
    mnt(
        Some(r),
        root,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    // Device nodes made inside the container stay unusable (no device cgroup on v2);
    // the /dev entries are binds of host nodes and keep their own mount's flags.
    remount_bind_adding(root, MsFlags::MS_NODEV)?;
    // A symlink here would point our mounts at host paths before pivot_root.
    for d in ["proc", "sys", "dev"] {
        refuse_symlink(&root.join(d))?;
    }

    let proc_ = root.join("proc");
    mkdir_p(&proc_)?;
    mnt(Some("proc"), &proc_, Some("proc"), nsfl, None)?;

    let sys = root.join("sys");
    mkdir_p(&sys)?;
    if mnt(
        Some("sysfs"),
        &sys,
        Some("sysfs"),
        nsfl | MsFlags::MS_RDONLY,
        None,
    )
    .is_err()
    {
        // A fresh sysfs can be refused (e.g. without a matching netns); bind the host's.
        mnt(
            Some("/sys"),
            &sys,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        mnt(
            None,
            &sys,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nsfl,
            None,
        )?;
    }

    // A nesting container manages its own (delegated) cgroup: writable then.
    mount_cgroupfs(&sys.join("fs/cgroup"), cg, !spec.nesting)?;
    setup_dev(&root.join("dev"), tty)?;
    let run = root.join("run");
    // An image whose /run is a symlink keeps it (mounting would follow it to the host).
    if spec.run_tmpfs && !run.is_symlink() {
        mkdir_p(&run)?;
        mnt(
            Some("tmpfs"),
            &run,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=755"),
        )?;
    }
    for b in &spec.binds {
        let target = root.join(b.target.trim_start_matches('/'));
        refuse_symlink(&target)?;
        if b.source.is_dir() {
            mkdir_p(&target)?;
        } else if !target.exists() {
            touch(&target)?;
        }
        let src = b.source.to_str().unwrap_or_default();
        mnt(
            Some(src),
            &target,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        let ro = if b.readonly {
            MsFlags::MS_RDONLY
        } else {
            MsFlags::empty()
        };
        remount_bind_adding(&target, ro | MsFlags::MS_NOSUID)?;
    }
    pivot(root)?;
    // After pivot_root, so that a symlink in a path the user gave resolves inside.
    for t in &spec.tmpfs {
        mount_tmpfs(t)?;
    }
    if spec.nesting {
        // Masks would be locked in the mount namespace of any container it starts, and
        // the kernel refuses a new proc mount where one is partly hidden. What they hide is
        // refused to a user namespace's root anyway (LXC's nesting does the same).
        return Ok(());
    }
    mask_paths()
}

fn mount_tmpfs(t: &crate::spec::Tmpfs) -> Result<()> {
    let target = Path::new(&t.target);
    mkdir_p(target)?;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if !t.exec {
        flags |= MsFlags::MS_NOEXEC;
    }
    if t.readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    let mut data = format!("mode={:o}", t.mode);
    if let Some(size) = t.size_bytes {
        data.push_str(&format!(",size={size}"));
    }
    mnt(Some("tmpfs"), target, Some("tmpfs"), flags, Some(&data))
}

fn refuse_symlink(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{} is a symlink in the image", p.display()),
        )),
        _ => Ok(()),
    }
}

/// Adds `extra` to a bind mount's flags, keeping the ones it has (flags locked by a user
/// namespace may not be cleared).
fn remount_bind_adding(p: &Path, extra: MsFlags) -> Result<()> {
    use nix::sys::statvfs::{statvfs, FsFlags};
    let st = statvfs(p).map_err(|e| nix_err(format!("statvfs {}", p.display()), e))?;
    let f = st.flags();
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra;
    for (have, ms) in [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(have) {
            flags |= ms;
        }
    }
    mnt(None, p, None, flags, None)
}

/// The host's cgroup mounts, which the container's view of its own group copies. Read by
/// the parent, from its kept mount table: a helper would read it anew (its mount namespace
/// is new), and inside its cgroup namespace it shows roots other than `/`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CgroupMounts {
    v2: bool,
    /// v1: (directory name, exact superblock options) per hierarchy.
    v1: Vec<(String, String)>,
}

impl CgroupMounts {
    pub fn detect() -> Result<CgroupMounts> {
        use crate::cgroups::{v1, Layout};
        let mounts = mountinfo::read_self().map_err(|e| err("read mountinfo".into(), e))?;
        let v2 = Layout::from_mounts(&mounts) == Layout::V2;
        let mut list = Vec::new();
        for h in v1::hierarchies(&mounts) {
            let Some(m) = mounts.iter().find(|m| m.mount_point == h.mount_point) else {
                continue;
            };
            let Some(name) = h.mount_point.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            // The exact option set of the existing hierarchy, or the kernel says EBUSY.
            let opts: Vec<&str> = m
                .super_options
                .iter()
                .map(String::as_str)
                .filter(|o| *o != "rw" && *o != "ro")
                .collect();
            list.push((name.to_string(), opts.join(",")));
        }
        Ok(CgroupMounts { v2, v1: list })
    }
}

/// The messages a filesystem context logged (`e overlayfs: ...`), joined.
fn fs_context_log(fs: &OwnedFd) -> String {
    use std::os::fd::AsRawFd;
    let mut lines = Vec::new();
    let mut buf = [0u8; 1024];
    // Each read returns one message; ENODATA once none is left.
    for _ in 0..16 {
        // SAFETY: read into a buffer we own from an fd we own.
        let n = unsafe { libc::read(fs.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        let msg = String::from_utf8_lossy(&buf[..n as usize]);
        lines.push(msg.get(2..).unwrap_or(&msg).trim().to_string());
    }
    lines.join("; ")
}

/// A view of the container's own cgroup (we are in its cgroup namespace), so programs can
/// read their limits; `readonly` unless it is delegated. v2: one cgroup2 mount; v1: a
/// tmpfs with one mount per hierarchy, named like on the host.
fn mount_cgroupfs(target: &Path, cg: &CgroupMounts, readonly: bool) -> Result<()> {
    let ro = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY;
    let rw = ro - MsFlags::MS_RDONLY;
    let fs = if readonly { ro } else { rw };
    if cg.v2 {
        return mnt(Some("cgroup2"), target, Some("cgroup2"), fs, None);
    }
    mnt(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        rw,
        Some("mode=755,size=64k"),
    )?;
    for (name, opts) in &cg.v1 {
        let t = target.join(name);
        mkdir_p(&t)?;
        mnt(Some("cgroup"), &t, Some("cgroup"), fs, Some(opts))?;
    }
    mnt(
        None,
        target,
        None,
        MsFlags::MS_REMOUNT | ro,
        Some("mode=755,size=64k"),
    )
}

fn setup_dev(dev: &Path, tty: bool) -> Result<()> {
    mkdir_p(dev)?;
    mnt(
        Some("tmpfs"),
        dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )?;
    for d in DEVICES {
        let t = dev.join(d);
        touch(&t)?;
        let src = format!("/dev/{d}");
        mnt(Some(&src), &t, None, MsFlags::MS_BIND, None)?;
    }
    let pts = dev.join("pts");
    mkdir_p(&pts)?;
    let ptsfl = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    let opts = "newinstance,ptmxmode=0666,mode=0620,gid=5";
    if mnt(Some("devpts"), &pts, Some("devpts"), ptsfl, Some(opts)).is_err() {
        // gid 5 (tty) may be unmapped in a small user namespace.
        mnt(
            Some("devpts"),
            &pts,
            Some("devpts"),
            ptsfl,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        )?;
    }
    let shm = dev.join("shm");
    mkdir_p(&shm)?;
    mnt(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )?;
    let mq = dev.join("mqueue");
    mkdir_p(&mq)?;
    mnt(
        Some("mqueue"),
        &mq,
        Some("mqueue"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    symlink("pts/ptmx", &dev.join("ptmx"))?;
    symlink("/proc/self/fd", &dev.join("fd"))?;
    symlink("/proc/self/fd/0", &dev.join("stdin"))?;
    symlink("/proc/self/fd/1", &dev.join("stdout"))?;
    symlink("/proc/self/fd/2", &dev.join("stderr"))?;
    if tty {
        let console = dev.join("console");
        touch(&console)?;
        // Bind by path: the fd's own mount belongs to the parent's namespace (EINVAL).
        let pts = std::fs::read_link("/proc/self/fd/0")
            .map_err(|e| err("find terminal of stdin".into(), e))?;
        if pts.is_absolute() && pts.exists() {
            mnt(pts.to_str(), &console, None, MsFlags::MS_BIND, None)?;
        }
    }
    Ok(())
}

fn pivot(root: &Path) -> Result<()> {
    std::env::set_current_dir(root).map_err(|e| err(format!("chdir {}", root.display()), e))?;
    // pivot_root(".", ".") stacks the old root on top of the new one; detaching it
    // leaves the new root alone without needing a put_old directory.
    nix::unistd::pivot_root(".", ".").map_err(|e| nix_err("pivot_root".into(), e))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| nix_err("detach old root".into(), e))?;
    std::env::set_current_dir("/").map_err(|e| err("chdir /".into(), e))
}

/// Docker's masked and read-only /proc and /sys paths, so that container root cannot
/// reach host-wide knobs (sysrq-trigger, kcore, ...).
const MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const READONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

fn mask_paths() -> Result<()> {
    for p in MASKED {
        let p = Path::new(p);
        let md = match std::fs::metadata(p) {
            Ok(m) => m,
            Err(_) => continue,
        };
        if md.is_dir() {
            mnt(
                Some("tmpfs"),
                p,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=0"),
            )
            .or_else(|_| mnt(Some("tmpfs"), p, Some("tmpfs"), MsFlags::MS_RDONLY, None))?;
        } else {
            mnt(Some("/dev/null"), p, None, MsFlags::MS_BIND, None)?;
        }
    }
    let locked = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for p in READONLY {
        let p = Path::new(p);
        if !p.exists() {
            continue;
        }
        mnt(
            Some(p.to_str().unwrap_or_default()),
            p,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        // Flags locked by a user namespace (from the proc mount) must be kept.
        mnt(
            None,
            p,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | locked,
            None,
        )?;
    }
    Ok(())
}

/// The working directory, created (as root) when the image lacks it, like runc does.
pub fn ensure_dir(p: &str) -> Result<PathBuf> {
    let p = PathBuf::from(if p.is_empty() { "/" } else { p });
    if !p.is_dir() {
        mkdir_p(&p)?;
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RootfsSpec {
        RootfsSpec {
            lowerdirs: vec!["/img/b".into(), "/img/a".into()],
            upperdir: "/c/up".into(),
            workdir: "/c/work".into(),
            mountpoint: "/c/root".into(),
            volatile: false,
            readonly: false,
        }
    }

    #[test]
    fn validation() {
        assert!(validate(&spec()).is_ok());
        let mut s = spec();
        s.lowerdirs.clear();
        assert!(validate(&s).is_err());
        let mut s = spec();
        s.upperdir = "/a,b".into();
        assert!(validate(&s).is_err());
        let mut s = spec();
        s.lowerdirs[0] = "rel".into();
        assert!(validate(&s).is_err());
        let mut s = spec();
        s.mountpoint = "/".into();
        assert!(validate(&s).is_err());
    }
}
