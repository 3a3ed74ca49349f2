//! Namespaces: the raw clone used from the multi-threaded daemon, user-namespace id maps,
//! joining an existing container's namespaces, and the loopback interface.

use crate::spec::IdMap;
use std::ffi::{CStr, CString};
use std::io::{Error, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Namespaces a container's first process gets at clone time. The cgroup namespace is
/// created later by the helper, once it has been moved into the container's cgroup.
pub fn clone_flags(user_ns: bool) -> libc::c_int {
    let mut f = libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET;
    if user_ns {
        f |= libc::CLONE_NEWUSER;
    }
    f
}

/// An execve prepared entirely before the clone: after clone in a multi-threaded process
/// the child may only make async-signal-safe calls, so no allocation happens there.
pub struct PreparedExec {
    path: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// (source, target) pairs for dup2; every source is above every target (see
    /// [`dup_above_targets`]), so the order is free.
    dups: Vec<(OwnedFd, RawFd)>,
    /// The child blocks on one byte from this (target) fd before execve.
    sync_fd: Option<RawFd>,
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::new(std::io::ErrorKind::InvalidInput, "NUL byte in string"))
}

impl PreparedExec {
    /// `fds` are (descriptor, number it gets in the child, below [`MAX_TARGET_FD`]).
    pub fn new(
        path: &str,
        argv: &[&str],
        envp: &[String],
        fds: &[(RawFd, RawFd)],
        sync_fd: Option<RawFd>,
    ) -> Result<Self> {
        let argv: Vec<CString> = argv.iter().map(|a| cstring(a)).collect::<Result<_>>()?;
        let envp: Vec<CString> = envp.iter().map(|a| cstring(a)).collect::<Result<_>>()?;
        let mut argv_ptrs: Vec<_> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut envp_ptrs: Vec<_> = envp.iter().map(|a| a.as_ptr()).collect();
        envp_ptrs.push(std::ptr::null());
        let dups = fds
            .iter()
            .map(|&(src, dst)| Ok((dup_above_targets(src)?, check_target(dst)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(PreparedExec {
            path: cstring(path)?,
            _argv: argv,
            argv_ptrs,
            _envp: envp,
            envp_ptrs,
            dups,
            sync_fd,
        })
    }

    /// A fork-like clone with `flags` (plus SIGCHLD), into the cgroup v2 directory
    /// `cgroup` where given and the kernel can (`in_cgroup` in the result says); the child
    /// sets up its fds, waits for the sync byte if asked, and execs.
    pub fn spawn(&self, flags: libc::c_int, cgroup: Option<&OwnedFd>) -> Result<Forked> {
        // SAFETY: the child only runs `child`, which makes async-signal-safe calls on
        // memory prepared before the clone, then execs or exits.
        let forked = unsafe { fork(flags, cgroup)? };
        if let Forked::Child = forked {
            // SAFETY: see above; never returns.
            unsafe { self.child(flags & libc::CLONE_NEWUSER != 0) }
        }
        Ok(forked)
    }

    /// `become_root`: see [`setup_child`].
    unsafe fn child(&self, become_root: bool) -> ! {
        setup_child(&self.dups, self.sync_fd, become_root);
        libc::execve(
            self.path.as_ptr(),
            self.argv_ptrs.as_ptr(),
            self.envp_ptrs.as_ptr(),
        );
        libc::_exit(127)
    }
}

/// The descriptor numbers a child of [`fork`] gets its fds at ([`setup_child`]) stay below
/// this; the sources are duplicated above it first.
pub const MAX_TARGET_FD: RawFd = 64;

/// `fd` if it is a valid target for [`setup_child`].
pub fn check_target(fd: RawFd) -> Result<RawFd> {
    if (0..MAX_TARGET_FD).contains(&fd) {
        Ok(fd)
    } else {
        Err(Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("descriptor target {fd} not below {MAX_TARGET_FD}"),
        ))
    }
}

/// A close-on-exec duplicate of `fd` above every target of [`setup_child`], so that no
/// dup2 there clobbers a later source.
pub fn dup_above_targets(fd: RawFd) -> Result<OwnedFd> {
    // SAFETY: fcntl on a descriptor the caller owns; the result is a new fd we own.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, MAX_TARGET_FD) };
    if n < 0 {
        return Err(Error::last_os_error());
    }
    // SAFETY: n was just returned by fcntl.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Where a fork-like clone returned.
pub enum Forked {
    Child,
    Parent {
        pid: libc::pid_t,
        /// Cloned straight into the requested cgroup (clone3 + CLONE_INTO_CGROUP).
        in_cgroup: bool,
    },
}

/// clone(2) like fork (no new stack, no CLONE_VM) with `flags` plus SIGCHLD; with
/// `cgroup` (a cgroup v2 directory), clone3 + CLONE_INTO_CGROUP first, which avoids a
/// costly migration later, and a plain clone where the kernel lacks either. With
/// CLONE_PARENT the child's exit signal is the caller's own (clone3 wants none given).
///
/// # Safety
/// In a multi-threaded caller the child may only make async-signal-safe calls.
pub unsafe fn fork(flags: libc::c_int, cgroup: Option<&OwnedFd>) -> Result<Forked> {
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
    if let Some(cgroup) = cgroup {
        let args = CloneArgs {
            flags: flags as u32 as u64 | CLONE_INTO_CGROUP,
            exit_signal: if flags & libc::CLONE_PARENT != 0 {
                0
            } else {
                libc::SIGCHLD as u64
            },
            cgroup: cgroup.as_raw_fd() as u64,
            ..Default::default()
        };
        let pid = libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        );
        match pid {
            0 => return Ok(Forked::Child),
            p if p > 0 => {
                return Ok(Forked::Parent {
                    pid: p as libc::pid_t,
                    in_cgroup: true,
                })
            }
            _ => {
                let e = Error::last_os_error();
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::ENOSYS) | Some(libc::E2BIG) | Some(libc::EINVAL)
                ) {
                    return Err(e);
                }
            }
        }
    }
    let pid = libc::syscall(
        libc::SYS_clone,
        (flags | libc::SIGCHLD) as libc::c_ulong,
        0usize,
        0usize,
        0usize,
        0usize,
    );
    match pid {
        0 => Ok(Forked::Child),
        p if p > 0 => Ok(Forked::Parent {
            pid: p as libc::pid_t,
            in_cgroup: false,
        }),
        _ => Err(Error::last_os_error()),
    }
}

/// In a child just cloned by [`fork`]: dup2 each (source, target), close every other
/// descriptor above them, wait for one byte on `sync_fd` if given, and with `become_root`
/// switch to uid/gid 0 of the new user namespace (mapped by then), or execve would drop
/// every capability. Exits the child on failure.
///
/// # Safety
/// Async-signal-safe calls only (raw syscalls: glibc's setuid wrappers would try to
/// signal threads that do not exist in the child). Every source must be above every
/// target, so that no dup2 clobbers a later source.
pub unsafe fn setup_child(dups: &[(OwnedFd, RawFd)], sync_fd: Option<RawFd>, become_root: bool) {
    for (src, dst) in dups {
        if libc::dup2(src.as_raw_fd(), *dst) < 0 {
            libc::_exit(126);
        }
    }
    // A clone holds a copy of every descriptor of its parent, close-on-exec or not; a
    // pool spare may wait long, and a pipe end it holds would keep another container's
    // stdin from ever reaching EOF. Keep only what we set up.
    let keep = dups.iter().map(|(_, dst)| *dst).max().unwrap_or(2).max(2);
    libc::syscall(
        libc::SYS_close_range,
        (keep + 1) as libc::c_uint,
        libc::c_uint::MAX,
        0 as libc::c_uint,
    );
    if let Some(fd) = sync_fd {
        let mut b = 0u8;
        loop {
            let r = libc::read(fd, &mut b as *mut u8 as *mut libc::c_void, 1);
            if r == 1 {
                break;
            }
            // The parent gave up (EOF) or the read failed for good.
            if r == 0 || *libc::__errno_location() != libc::EINTR {
                libc::_exit(125);
            }
        }
    }
    if become_root
        && (libc::syscall(libc::SYS_setresgid, 0, 0, 0) != 0
            || libc::syscall(libc::SYS_setresuid, 0, 0, 0) != 0
            || libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0)
    {
        libc::_exit(124);
    }
}

/// `struct clone_args` of clone3(2), up to the `cgroup` field.
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Writes the uid/gid maps of a child in a new user namespace (from the parent, as root:
/// no `setgroups deny` needed, so the container may still call setgroups).
pub fn write_id_maps(pid: i32, map: &IdMap) -> Result<()> {
    let w = |file: &str, host: u32| {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, format!("0 {host} {}\n", map.size))
            .map_err(|e| Error::new(e.kind(), format!("write {path}: {e}")))
    };
    w("uid_map", map.host_uid)?;
    w("gid_map", map.host_gid)
}

/// A pidfd for `pid`: it pins the process, so what is done through it cannot reach
/// another one that reused the pid.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Joins the namespaces of a running process (its user namespace too if `user`): all in
/// one setns(2) on a pidfd (Linux 5.8), which switches them together in the right order,
/// where a file and a setns per namespace took seven of each for every exec. Kernels that
/// take no pidfd there (EINVAL) get one namespace file at a time.
pub fn join_process(pid: i32, user: bool) -> Result<()> {
    // A container's namespaces: those it was cloned with and the cgroup one made after.
    let flags = clone_flags(user) | libc::CLONE_NEWCGROUP;
    let pidfd =
        pidfd_open(pid).map_err(|e| Error::new(e.kind(), format!("pidfd of {pid}: {e}")))?;
    // SAFETY: setns on an owned pidfd with namespace flags.
    if unsafe { libc::setns(pidfd.as_raw_fd(), flags) } == 0 {
        return Ok(());
    }
    let e = Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(Error::new(e.kind(), format!("setns to {pid}: {e}")));
    }
    // Opened before joining any: joining the mount namespace changes what `/proc` means.
    for (kind, fd) in open_namespaces(pid, user)? {
        join(kind, &fd)?;
    }
    Ok(())
}

fn open_namespaces(pid: i32, user: bool) -> Result<Vec<(&'static str, OwnedFd)>> {
    let mut kinds = Vec::new();
    if user {
        kinds.push("user");
    }
    // Mount last: after it, relative paths to the host are gone.
    kinds.extend(["ipc", "uts", "net", "pid", "cgroup", "mnt"]);
    let mut out = Vec::new();
    for k in kinds {
        let path = format!("/proc/{pid}/ns/{k}");
        let f = std::fs::File::open(&path)
            .map_err(|e| Error::new(e.kind(), format!("open {path}: {e}")))?;
        out.push((k, OwnedFd::from(f)));
    }
    Ok(out)
}

fn join(kind: &str, fd: &OwnedFd) -> Result<()> {
    // SAFETY: setns on an owned namespace fd.
    if unsafe { libc::setns(fd.as_raw_fd(), 0) } != 0 {
        let e = Error::last_os_error();
        return Err(Error::new(e.kind(), format!("setns {kind}: {e}")));
    }
    Ok(())
}

pub fn unshare_cgroup() -> Result<()> {
    // SAFETY: plain syscall.
    if unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } != 0 {
        return Err(Error::last_os_error());
    }
    Ok(())
}

/// Brings `lo` up in the current network namespace.
pub fn loopback_up() -> Result<()> {
    // SAFETY: socket/ioctl with a zeroed, correctly sized ifreq; the fd is owned right away.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(Error::last_os_error());
        }
        let sock = OwnedFd::from_raw_fd(s);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        let name: &CStr = c"lo";
        for (d, s) in ifr.ifr_name.iter_mut().zip(name.to_bytes_with_nul()) {
            *d = *s as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            return Err(Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) < 0 {
            return Err(Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_process_enters_the_namespaces_of_the_target() {
        use std::os::unix::fs::MetadataExt;
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: joining another process's namespaces needs root");
            return;
        }
        let ino = |pid: &str, kind: &str| {
            std::fs::metadata(format!("/proc/{pid}/ns/{kind}"))
                .map(|m| m.ino())
                .unwrap_or(0)
        };
        let mut target = std::process::Command::new("unshare")
            .args(["--uts", "--ipc", "--net", "sleep", "30"])
            .spawn()
            .expect("unshare(1) runs");
        let pid = target.id() as i32;
        let kinds = ["uts", "ipc", "net"];
        // Its namespaces are the new ones once unshare has executed sleep.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default() != "sleep\n"
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let want: Vec<u64> = kinds.iter().map(|k| ino(&pid.to_string(), k)).collect();
        assert!(kinds.iter().zip(&want).all(|(k, w)| *w != ino("self", k)));
        let paths: Vec<CString> = kinds
            .iter()
            .map(|k| CString::new(format!("/proc/self/ns/{k}")).unwrap())
            .collect();
        // In a child: the mount namespace is only joined by a single-threaded process.
        // SAFETY: the child only makes syscalls on memory prepared before the fork.
        let child = unsafe { libc::fork() };
        if child == 0 {
            let joined = join_process(pid, false).is_ok();
            let same = paths.iter().zip(&want).all(|(p, w)| {
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                unsafe { libc::stat(p.as_ptr(), &mut st) == 0 && st.st_ino == *w }
            });
            unsafe { libc::_exit(if joined && same { 0 } else { 1 }) };
        }
        let mut status = 0;
        unsafe { libc::waitpid(child, &mut status, 0) };
        let _ = target.kill();
        let _ = target.wait();
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    #[test]
    fn sources_go_above_every_target() {
        let dup = dup_above_targets(0).unwrap();
        assert!(dup.as_raw_fd() >= MAX_TARGET_FD);
        assert!(check_target(MAX_TARGET_FD - 1).is_ok());
        assert!(check_target(MAX_TARGET_FD).is_err());
        assert!(check_target(-1).is_err());
    }
}
