//! Container lifecycle: start, exec, destroy, and the re-executed init helper.
//!
//! The daemon is multi-threaded, so `start`/`exec` get their helper, which does the real
//! setup single-threaded, from the fork server (see [`crate::forkserver`]), or else clone
//! a child that only dup2s its fds and re-executes `/proc/self/exe` with [`INIT_ARG`]
//! ([`init_main`]). Fixed descriptors in the helper:
//! 0-2 stdio, 3 the control pipe (one sync byte, then a JSON [`InitMsg`]), 4 the status
//! pipe (close-on-exec: EOF without data means the container command was executed), and
//! from 5 the cgroup v1 `tasks` files it moves itself into (their number is argv[2]).

use crate::cgroups::{self, CgroupManager};
use crate::forkserver;
use crate::namespaces::{self, PreparedExec};
use crate::rootfs;
use crate::security;
use crate::spec::{ContainerSpec, Limits, NetworkMode, ProcessSpec};
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// argv[1] with which the binary is re-executed as the container init helper;
/// the binary's `main` must call [`init_main`] when it sees it (before anything else).
pub const INIT_ARG: &str = "__ltv-init";

const CTL_FD: RawFd = 3;
const STATUS_FD: RawFd = 4;
const SELF_MOVE_FD: RawFd = 5;
/// How long `start`/`exec` wait for the helper to report, in seconds; see
/// [`set_setup_timeout`].
static SETUP_TIMEOUT_SECS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(30);

/// Where kernel code is slow (an emulated guest kernel on kvm-pvm hosts, every mount and
/// clone taking a thousand times longer), setup needs more than the default 30 s.
pub fn set_setup_timeout(timeout: Duration) {
    SETUP_TIMEOUT_SECS.store(timeout.as_secs(), std::sync::atomic::Ordering::Relaxed);
}

fn setup_timeout() -> Duration {
    Duration::from_secs(SETUP_TIMEOUT_SECS.load(std::sync::atomic::Ordering::Relaxed))
}
/// Docker's PATH when the spec's env has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The three stdio descriptors handed to a container process.
pub struct Stdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// A process the caller must wait for (it is the caller's child).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    pub pid: i32,
    /// Field 22 of /proc/PID/stat, to tell a re-used pid from ours.
    pub start_time: u64,
    /// The interface index of the host end of its veth, if it got one.
    pub veth: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command is not in the image; callers report exit code 127.
    #[error("{0}")]
    CommandNotFound(String),
    /// The command exists but cannot be executed (permission denied); Docker reports 126.
    #[error("{0}")]
    CommandNotExecutable(String),
    #[error("invalid container spec: {0}")]
    InvalidSpec(String),
    #[error("{stage}: {source}")]
    Setup {
        stage: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("container init failed: {0}")]
    Init(String),
}

fn setup(stage: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Setup { stage, source }
}

/// What the parent sends the helper on the control pipe.
#[derive(Serialize, Deserialize)]
enum InitMsg {
    /// Comes with the rootfs as a detached mount (after the stdio fds), which the helper
    /// attaches in its own mount namespace: the host's mount table never holds it.
    Start {
        spec: ContainerSpec,
        cgroup_mounts: rootfs::CgroupMounts,
    },
    Exec {
        spec: ContainerSpec,
        init_pid: i32,
        process: ProcessSpec,
    },
}

/// Status-pipe tags written by the helper before it gives up.
const TAG_NOT_FOUND: u8 = b'N';
const TAG_NOT_EXEC: u8 = b'X';
const TAG_ERROR: u8 = b'E';

fn validate_process(p: &ProcessSpec) -> Result<(), Error> {
    let bad = |m: String| Err(Error::InvalidSpec(m));
    if p.args.is_empty() || p.args[0].is_empty() {
        return bad("process args are empty".into());
    }
    if p.args.iter().chain(&p.env).any(|s| s.contains('\0')) {
        return bad("NUL byte in process args or env".into());
    }
    if !p.cwd.is_empty() && !p.cwd.starts_with('/') {
        return bad(format!("cwd {:?} must be absolute", p.cwd));
    }
    Ok(())
}

fn validate(spec: &ContainerSpec) -> Result<(), Error> {
    validate_process(&spec.process)?;
    rootfs::validate(&spec.rootfs).map_err(Error::InvalidSpec)?;
    cgroups::validate_path(&spec.cgroup).map_err(|e| Error::InvalidSpec(e.to_string()))?;
    if spec.hostname.len() > 64 || spec.hostname.contains('\0') {
        return Err(Error::InvalidSpec(format!(
            "bad hostname {:?}",
            spec.hostname
        )));
    }
    if let Some(m) = spec.idmap {
        if m.size == 0 {
            return Err(Error::InvalidSpec("idmap size is 0".into()));
        }
    }
    if spec.nesting && spec.idmap.is_none() {
        return Err(Error::InvalidSpec(
            "nesting needs a user namespace: a privileged container cannot nest".into(),
        ));
    }
    if spec.nesting && spec.rootfs.readonly {
        // Its root would hold CAP_SYS_ADMIN over the mount and could remount the image
        // read-write; only an overlay's upper dir keeps the image out of its reach.
        return Err(Error::InvalidSpec(
            "a read-only rootfs is for containers that cannot remount it, not nesting ones".into(),
        ));
    }
    crate::spec::check_tmpfs(&spec.tmpfs).map_err(Error::InvalidSpec)?;
    for b in &spec.binds {
        if !crate::spec::is_mount_target(&b.target) {
            return Err(Error::InvalidSpec(format!(
                "bind target {:?} must be absolute, without '..'",
                b.target
            )));
        }
    }
    Ok(())
}

fn pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| setup("create pipe")(e.into()))
}

/// A spawned helper and the parent's pipe ends.
struct Helper {
    pid: i32,
    ctl: Option<OwnedFd>,
    status: OwnedFd,
    reaped: bool,
    /// Cloned straight into the container's cgroup (v2).
    in_cgroup: bool,
}

impl Helper {
    /// `cgroup`: the container's group, which the helper is cloned straight into (v2) or
    /// moves itself into before it reports (v1); `in_cgroup` in the result tells whether
    /// one of those happens. The helper gets its stdio later, with its message, so that a
    /// spare one can wait in a pool before anyone asks for it.
    fn spawn(flags: libc::c_int, cgroup: Option<&dyn CgroupManager>) -> Result<Helper, Error> {
        let (ctl_parent, ctl_child) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| setup("create control socket")(std::io::Error::from(e)))?;
        let (st_r, st_w) = pipe()?;
        let null = std::fs::File::open("/dev/null").map_err(setup("open /dev/null"))?;
        let v2_dir = cgroup.and_then(cgroup_dir_fd);
        let self_move = match (cgroup, &v2_dir) {
            (Some(cg), None) => self_move_fds(cg),
            _ => vec![],
        };
        let mut fds = vec![
            (null.as_raw_fd(), 0),
            (null.as_raw_fd(), 1),
            (null.as_raw_fd(), 2),
            (ctl_child.as_raw_fd(), CTL_FD),
            (st_w.as_raw_fd(), STATUS_FD),
        ];
        fds.extend(
            (SELF_MOVE_FD..)
                .zip(&self_move)
                .map(|(n, f)| (f.as_raw_fd(), n)),
        );
        let moves = self_move.len() as RawFd;
        let forked = match forkserver::spawn(flags, &fds, Some(CTL_FD), moves, v2_dir.as_ref()) {
            Some(forked) => forked,
            None => PreparedExec::new(
                "/proc/self/exe",
                &["ltv-init", INIT_ARG, &moves.to_string()],
                &[],
                &fds,
                Some(CTL_FD),
            )
            .and_then(|prep| prep.spawn(flags, v2_dir.as_ref())),
        }
        .map_err(setup("clone container process"))?;
        let namespaces::Forked::Parent { pid, in_cgroup } = forked else {
            unreachable!("spawn returns in the parent only")
        };
        let in_cgroup = in_cgroup || !self_move.is_empty();
        // Our copies must go, or EOF on the status pipe would never come.
        drop((ctl_child, st_w, null, self_move));
        Ok(Helper {
            pid,
            ctl: Some(ctl_parent),
            status: st_r,
            reaped: false,
            in_cgroup,
        })
    }

    /// A helper outside any namespace of a container (for `exec`), already released: it
    /// execs our binary now and then waits for its message.
    fn spawn_released(cgroup: Option<&dyn CgroupManager>) -> Result<Helper, Error> {
        let mut h = Helper::spawn(0, cgroup)?;
        if let Err(e) = h.release() {
            h.kill_and_reap();
            return Err(e);
        }
        Ok(h)
    }

    /// Lets the child exec the helper (one sync byte). The helper then blocks reading the
    /// message, so the cgroup move can overlap with its execve.
    fn release(&mut self) -> Result<(), Error> {
        self.write_ctl(b"G", false)
    }

    /// Sends the message with the process's stdio and `extra` descriptors attached
    /// (SCM_RIGHTS) and closes the socket: the helper reads to EOF.
    fn send(&mut self, msg: &InitMsg, stdio: Stdio, extra: &[OwnedFd]) -> Result<(), Error> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let buf =
            serde_json::to_vec(msg).map_err(|e| setup("encode spec")(std::io::Error::other(e)))?;
        let Some(fd) = self.ctl.take() else {
            return Ok(());
        };
        let mut fds = vec![
            stdio.stdin.as_raw_fd(),
            stdio.stdout.as_raw_fd(),
            stdio.stderr.as_raw_fd(),
        ];
        fds.extend(extra.iter().map(|f| f.as_raw_fd()));
        let iov = [std::io::IoSlice::new(&buf)];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let sent = match sendmsg::<()>(fd.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => n,
            // The helper died: its status (if any) tells why.
            Err(nix::errno::Errno::EPIPE) | Err(nix::errno::Errno::ECONNRESET) => return Ok(()),
            Err(e) => {
                return Err(setup("send spec to container init")(std::io::Error::from(
                    e,
                )))
            }
        };
        self.ctl = Some(fd);
        if sent < buf.len() {
            self.write_ctl(&buf[sent..], true)
        } else {
            self.ctl = None;
            Ok(())
        }
    }

    fn write_ctl(&mut self, buf: &[u8], close: bool) -> Result<(), Error> {
        let Some(fd) = self.ctl.take() else {
            return Ok(());
        };
        let mut f = std::fs::File::from(fd);
        // EPIPE means the helper died: its status (if any) tells why.
        let r = match f.write_all(buf) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(setup("send spec to container init")(e)),
        };
        if !close {
            self.ctl = Some(f.into());
        }
        r
    }

    /// Waits for EOF on the status pipe; Ok when the command was executed.
    fn wait_status(&mut self) -> Result<(), Error> {
        let timeout = setup_timeout();
        let msg = read_with_timeout(&self.status, timeout)
            .map_err(setup("read container init status"))?;
        match msg {
            None => Err(Error::Init(format!(
                "container init did not finish setup within {timeout:?}"
            ))),
            Some(m) if m.is_empty() => Ok(()),
            Some(m) => {
                let text = String::from_utf8_lossy(&m[1..]).into_owned();
                Err(match m[0] {
                    TAG_NOT_FOUND => Error::CommandNotFound(text),
                    TAG_NOT_EXEC => Error::CommandNotExecutable(text),
                    _ => Error::Init(text),
                })
            }
        }
    }

    /// Reaps the helper if it exits by itself within `timeout`.
    fn reap_within(&mut self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while !self.reaped && std::time::Instant::now() < deadline {
            // SAFETY: our own child, not reaped yet.
            if unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), libc::WNOHANG) } == self.pid {
                self.reaped = true;
            } else {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    fn kill_and_reap(&mut self) {
        if self.reaped {
            return;
        }
        // SAFETY: our own child, not reaped yet, so the pid cannot be reused.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
        self.reaped = true;
    }
}

/// Reads until EOF; `None` on timeout.
fn read_with_timeout(fd: &OwnedFd, timeout: Duration) -> std::io::Result<Option<Vec<u8>>> {
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            continue;
        }
        // SAFETY: reading into a stack buffer of the given size.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(Some(out));
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
}

/// Creates the container (cgroup, overlay, namespaces) and runs its first process.
/// With a `pool`, a pre-spawned helper is used when one fits (see [`Pool`]).
pub fn start(spec: &ContainerSpec, stdio: Stdio, pool: Option<&Pool>) -> Result<Started, Error> {
    validate(spec)?;
    let cg = cgroups::manager(&spec.cgroup);
    // A group that already holds processes belongs to a running container: refuse, and
    // leave it alone in the cleanup below. (Usually there is none: a stat per hierarchy.)
    let existed = cg.exists();
    if existed && cg.processes().is_ok_and(|p| !p.is_empty()) {
        return Err(Error::Setup {
            stage: "create cgroup",
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("cgroup {} is in use by running processes", spec.cgroup),
            ),
        });
    }
    let mut helper: Option<Helper> = None;
    let spare = pool.and_then(|p| p.take_for(spec));
    tracing::debug!(container = %spec.name, spare = spare.is_some(), "helper");
    // A new group has no limits: without any to set, there is nothing to write.
    let limits = (existed || spec.limits != Limits::default()).then_some(&spec.limits);
    let r = start_inner(spec, stdio, cg.as_ref(), limits, spare, &mut helper);
    if r.is_err() {
        if let Some(h) = helper.as_mut() {
            h.kill_and_reap();
        }
        let _ = cg.kill_all();
        if let Err(e) = cg.remove() {
            tracing::warn!("{}: cleanup: {e}", spec.name);
        }
    }
    r
}

fn start_inner(
    spec: &ContainerSpec,
    stdio: Stdio,
    cg: &dyn CgroupManager,
    limits: Option<&Limits>,
    spare: Option<Spare>,
    helper: &mut Option<Helper>,
) -> Result<Started, Error> {
    // The veth is made (or a spare's, made ahead, connected) on a second thread as soon as
    // the helper (so its network namespace) exists, while this one sets up the cgroup and
    // the rootfs; the helper execs meanwhile.
    std::thread::scope(|scope| {
        let attach_network = |pid: i32, veth: Option<crate::network::Veth>| {
            let NetworkMode::Bridge {
                bridge,
                host_ifname,
                address,
                prefix,
                gateway,
            } = &spec.network
            else {
                return None;
            };
            let att = crate::network::Attachment {
                host_ifname: host_ifname.clone(),
                address: *address,
                prefix: *prefix,
                gateway: *gateway,
            };
            Some(scope.spawn(move || {
                // The host end's name is this container's: one left by its previous run
                // (deleted off the request path after it stopped) goes first.
                crate::network::detach(&att.host_ifname)?;
                match veth {
                    Some(veth) => veth.connect(bridge, &att),
                    None => crate::network::attach(pid, bridge, &att),
                }
            }))
        };
        let network;
        let h = match spare {
            // Its cgroup was made and joined ahead of time: it only needs our name, and a
            // user-namespaced one its id map, before it may exec the helper.
            Some(spare) => {
                let h = helper.insert(spare.helper);
                if let Err(e) = spare.cgroup.rename_to(&spec.cgroup) {
                    h.kill_and_reap();
                    let _ = cgroups::manager(&spare.cgroup.path).remove();
                    return Err(setup("claim spare cgroup")(e));
                }
                network = attach_network(h.pid, spare.veth);
                if let Some(limits) = limits {
                    cg.apply(limits).map_err(setup("apply cgroup limits"))?;
                }
                delegate_if_nesting(spec, cg)?;
                if let Some(m) = &spec.idmap {
                    namespaces::write_id_maps(h.pid, m)
                        .map_err(setup("write user namespace id maps"))?;
                    h.release()?;
                }
                h
            }
            None => {
                cg.create().map_err(setup("create cgroup"))?;
                if let Some(limits) = limits {
                    cg.apply(limits).map_err(setup("apply cgroup limits"))?;
                }
                delegate_if_nesting(spec, cg)?;
                let h = helper.insert(Helper::spawn(
                    namespaces::clone_flags(spec.idmap.is_some()),
                    Some(cg),
                )?);
                network = attach_network(h.pid, None);
                if let Some(m) = &spec.idmap {
                    namespaces::write_id_maps(h.pid, m)
                        .map_err(setup("write user namespace id maps"))?;
                }
                h.release()?;
                if !h.in_cgroup {
                    cg.add_process(h.pid).map_err(setup("add init to cgroup"))?;
                }
                h
            }
        };
        // The helper's user namespace has the container's id map by now.
        let userns = match &spec.idmap {
            Some(_) => Some(
                std::fs::File::open(format!("/proc/{}/ns/user", h.pid))
                    .map_err(setup("open the container's user namespace"))?,
            ),
            None => None,
        };
        let idmap = spec.idmap.as_ref().zip(userns.as_ref().map(|f| f.as_fd()));
        let rootfs =
            rootfs::detached_overlay(&spec.rootfs, idmap).map_err(setup("mount rootfs"))?;
        let cgroup_mounts = rootfs::CgroupMounts::detect().map_err(setup("read mountinfo"))?;
        let start_time = proc_start_time(h.pid)
            .ok_or_else(|| Error::Init(format!("container init (pid {}) vanished", h.pid)))?;
        // Before the container runs anything: its first process sees eth0 up. The veth
        // goes with the network namespace if anything fails.
        let veth = match network {
            Some(attaching) => Some(
                attaching
                    .join()
                    .map_err(|_| Error::Init("attaching the network panicked".into()))?
                    .map_err(|e| setup("attach network")(std::io::Error::other(e.to_string())))?,
            ),
            None => None,
        };
        let msg = InitMsg::Start {
            spec: spec.clone(),
            cgroup_mounts,
        };
        h.send(&msg, stdio, std::slice::from_ref(&rootfs.mount))?;
        // While the helper sets up the container.
        drop(rootfs.layers);
        h.wait_status()?;
        Ok(Started {
            pid: h.pid,
            start_time,
            veth,
        })
    })
}

/// A helper cloned ahead of time (namespaces made, cgroup joined), waiting for a spec.
struct Spare {
    helper: Helper,
    cgroup: SpareCgroup,
    /// Its veth, made ahead too when the pool is for bridged containers.
    veth: Option<crate::network::Veth>,
}

/// The spare's cgroup, `<root>/.spare-<n>`, renamed to the container's on claim.
struct SpareCgroup {
    path: String,
}

impl SpareCgroup {
    fn rename_to(&self, target: &str) -> std::io::Result<()> {
        let mounts = crate::mountinfo::read_self()?;
        let dirs: Vec<PathBuf> = mounts
            .iter()
            .filter(|m| m.fs_type == "cgroup" || m.fs_type == "cgroup2")
            .map(|m| m.mount_point.clone())
            .filter(|mp| mp.join(&self.path).is_dir())
            .collect();
        if dirs.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("spare cgroup {} is gone", self.path),
            ));
        }
        for mp in &dirs {
            std::fs::rename(mp.join(&self.path), mp.join(target))?;
        }
        Ok(())
    }
}

/// Pre-spawned container helpers (cgroup v1), with or without a user namespace.
///
/// A spare is cloned with its namespaces ahead of time, with the `tasks` files of a
/// cgroup of its own, which is renamed to the container's when claimed (renaming is
/// cheap); the helper moves itself in once it runs (see `self_move_fds`), which for a
/// user-namespaced spare is after the claim. A start without a spare makes the
/// namespaces then. On v2, CLONE_INTO_CGROUP makes the move free and the pool stays unused.
pub struct Pool {
    /// Parent of the spares' cgroups: a claim must be for a container under it.
    root: String,
    spares: Reserve<Spare>,
    /// Spares for user-namespaced containers: they wait for their id map before they
    /// exec the helper.
    userns: bool,
    /// Spares come with a veth (see [`crate::network::Veth`]) and serve only containers
    /// with a bridged network.
    veths: bool,
}

/// What a `Reserve` holds: a process spawned ahead of time, and how to get rid of it.
trait Reserved {
    fn pid(&self) -> i32;
    fn discard(&mut self);
}

impl Reserved for Spare {
    fn pid(&self) -> i32 {
        self.helper.pid
    }

    fn discard(&mut self) {
        self.helper.kill_and_reap();
        let _ = cgroups::manager(&self.cgroup.path).remove();
    }
}

impl Reserved for Helper {
    fn pid(&self) -> i32 {
        self.pid
    }

    fn discard(&mut self) {
        self.kill_and_reap();
    }
}

/// Processes spawned ahead of time and topped up to `size` off the request path.
struct Reserve<T> {
    size: usize,
    items: std::sync::Mutex<Vec<T>>,
    /// One refill at a time; a refill asked for meanwhile is covered by its loop.
    refilling: std::sync::atomic::AtomicBool,
    /// Drained for good (the daemon is going): a refill stops, and what it was making
    /// meanwhile is discarded rather than left behind.
    closed: std::sync::atomic::AtomicBool,
}

impl<T: Reserved> Reserve<T> {
    fn new(size: usize) -> Self {
        Reserve {
            size,
            items: std::sync::Mutex::new(Vec::new()),
            refilling: std::sync::atomic::AtomicBool::new(false),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn items(&self) -> std::sync::MutexGuard<'_, Vec<T>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A live one; those that died meanwhile (killed from outside) are discarded.
    fn take(&self) -> Option<T> {
        let mut items = self.items();
        while let Some(mut item) = items.pop() {
            if proc_start_time(item.pid()).is_some() {
                return Some(item);
            }
            item.discard();
        }
        None
    }

    /// Discards every spare and refuses new ones; returns once a refill in progress
    /// has ended (its spare discarded), so nothing is made after this.
    fn drain(&self) {
        use std::sync::atomic::Ordering;
        self.closed.store(true, Ordering::Release);
        // Bounded: a spawn that hangs must not hold up the daemon's exit for ever.
        for _ in 0..1000 {
            if !self.refilling.load(Ordering::Acquire) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        for mut item in std::mem::take(&mut *self.items()) {
            item.discard();
        }
    }

    /// Tops up to `count` (the size at most) with `spawn`, blocking; the first failure is
    /// logged and ends it.
    fn refill(&self, what: &str, count: usize, spawn: impl Fn() -> Result<T, Error>) {
        use std::sync::atomic::Ordering;
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let count = count.min(self.size);
        while !self.closed.load(Ordering::Acquire) && self.items().len() < count {
            match spawn() {
                Ok(mut item) => {
                    // Checked under the lock that `drain` takes after closing.
                    let mut items = self.items();
                    if self.closed.load(Ordering::Acquire) {
                        drop(items);
                        item.discard();
                        break;
                    }
                    items.push(item);
                }
                Err(e) => {
                    tracing::warn!("{what}: cannot spawn a spare helper: {e}");
                    break;
                }
            }
        }
        self.refilling.store(false, Ordering::Release);
    }
}

impl Pool {
    /// A pool of `size` spares under cgroup `root`, with veths made ahead if `veths`;
    /// `None` where it would not help (v2).
    pub fn new(root: &str, size: usize, userns: bool, veths: bool) -> Option<Pool> {
        if size == 0 || cgroups::Layout::detect() == cgroups::Layout::V2 {
            return None;
        }
        Some(Pool {
            root: root.trim_matches('/').to_string(),
            spares: Reserve::new(size),
            userns,
            veths,
        })
    }

    /// Whether the spares are for user-namespaced containers.
    pub fn userns(&self) -> bool {
        self.userns
    }

    /// Whether the spares come with a veth (for bridged containers only).
    pub fn veths(&self) -> bool {
        self.veths
    }

    fn take_for(&self, spec: &ContainerSpec) -> Option<Spare> {
        let parent = spec
            .cgroup
            .trim_matches('/')
            .rsplit_once('/')
            .map(|(p, _)| p);
        if spec.idmap.is_some() != self.userns || parent != Some(self.root.as_str()) {
            return None;
        }
        // A spare's eth0 must not show up in a container meant to have none.
        if self.veths && !matches!(spec.network, NetworkMode::Bridge { .. }) {
            return None;
        }
        self.spares.take()
    }

    /// Tops the pool up to `count` spares (its size at most); blocking (each spare costs a
    /// clone of its namespaces). Call it off the request path, e.g. after each start.
    pub fn refill(&self, count: usize) {
        self.spares
            .refill("container pool", count, || self.spawn_spare());
    }

    fn spawn_spare(&self) -> Result<Spare, Error> {
        // One counter for every pool of the process: two pools under one root must never
        // share a spare's cgroup.
        static SPARES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SPARES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = format!("{}/.spare-{}-{n}", self.root, std::process::id());
        let cg = cgroups::manager(&path);
        cg.create().map_err(setup("create spare cgroup"))?;
        let spare = (|| {
            // It moves itself in once it runs (see `self_move_fds`): a move by pid would hold
            // the kernel's cgroup_mutex through an RCU grace period (6-16 ms here), stalling
            // every other cgroup operation, those of requests too.
            let mut h = Helper::spawn(namespaces::clone_flags(self.userns), Some(cg.as_ref()))?;
            // A user-namespaced spare may not run before its id map exists.
            let released = if self.userns { Ok(()) } else { h.release() };
            let joined = released.and_then(|_| {
                if h.in_cgroup {
                    return Ok(());
                }
                cg.add_process(h.pid)
                    .map_err(setup("add spare helper to cgroup"))
            });
            if let Err(e) = joined {
                h.kill_and_reap();
                return Err(e);
            }
            Ok(h)
        })();
        match spare {
            Ok(helper) => {
                // Without one, a start makes the veth itself, as without a spare.
                let veth = self
                    .veths
                    .then(|| {
                        crate::network::Veth::create(helper.pid, &format!("ltvs{}", helper.pid))
                    })
                    .and_then(|made| {
                        made.map_err(|e| tracing::warn!("container pool: no veth ahead: {e}"))
                            .ok()
                    });
                Ok(Spare {
                    helper,
                    cgroup: SpareCgroup { path },
                    veth,
                })
            }
            Err(e) => {
                let _ = cg.remove();
                Err(e)
            }
        }
    }

    /// Kills the spares and removes their cgroups, also those a previous daemon left.
    pub fn drain(&self) {
        self.spares.drain();
        remove_stale_spares(&self.root);
    }
}

/// Exec helpers started ahead of time (cgroup v1): an `exec` then skips forking the
/// daemon and executing our binary (about 2 ms here), and the helper joins the
/// container's cgroup itself through the `tasks` files sent with its message. They are
/// in no namespace or cgroup of any container until then. On v2 an exec helper is
/// cloned straight into the cgroup, which a spare could not do, so there are none.
pub struct ExecSpares(Reserve<Helper>);

impl ExecSpares {
    /// `size` spares; `None` where they would not help (v2, or a size of 0).
    pub fn new(size: usize) -> Option<ExecSpares> {
        if size == 0 || cgroups::Layout::detect() == cgroups::Layout::V2 {
            return None;
        }
        Some(ExecSpares(Reserve::new(size)))
    }

    /// Tops the spares up to `count` (their size at most); blocking, so call it off the
    /// request path.
    pub fn refill(&self, count: usize) {
        self.0
            .refill("exec helpers", count, || Helper::spawn_released(None));
    }

    fn take(&self) -> Option<Helper> {
        self.0.take()
    }

    /// Kills the spares.
    pub fn drain(&self) {
        self.0.drain();
    }
}

/// Spare cgroups under `root` whose processes are gone or not ours: kill and remove.
pub fn remove_stale_spares(root: &str) {
    let Ok(mounts) = crate::mountinfo::read_self() else {
        return;
    };
    let mut names = std::collections::BTreeSet::new();
    for m in mounts
        .iter()
        .filter(|m| m.fs_type == "cgroup" || m.fs_type == "cgroup2")
    {
        if let Ok(dir) = std::fs::read_dir(m.mount_point.join(root.trim_matches('/'))) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".spare-") {
                    names.insert(name);
                }
            }
        }
    }
    for name in names {
        let cg = cgroups::manager(&format!("{}/{name}", root.trim_matches('/')));
        let _ = cg.kill_all();
        let _ = cg.remove();
    }
}

/// A nesting container's root gets its cgroup to make groups for its own containers.
fn delegate_if_nesting(spec: &ContainerSpec, cg: &dyn CgroupManager) -> Result<(), Error> {
    match (spec.nesting, &spec.idmap) {
        (true, Some(m)) => cg
            .delegate(m.host_uid, m.host_gid)
            .map_err(setup("delegate cgroup")),
        _ => Ok(()),
    }
}

/// An fd of the v2 cgroup directory for CLONE_INTO_CGROUP; `None` on v1 or on error
/// (the caller then moves the process the classic way).
fn cgroup_dir_fd(cg: &dyn CgroupManager) -> Option<OwnedFd> {
    let dir = cg.v2_dir()?;
    std::fs::File::open(dir).ok().map(OwnedFd::from)
}

/// The v1 `tasks` files for the helper to move itself; opened by us, because the kernel
/// checks the opener's credentials, and the helper may already be in a user namespace.
/// Empty when one cannot be opened: the caller then moves the helper by pid.
fn self_move_fds(cg: &dyn CgroupManager) -> Vec<OwnedFd> {
    let open = |p: &PathBuf| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .map(OwnedFd::from)
    };
    cg.self_move_files()
        .and_then(|files| files.iter().map(open).collect())
        .unwrap_or_default()
}

/// Runs `process` inside the running container whose init is `init_pid`. The returned
/// pid is a helper that exits with the process's exit code (128+signal if killed).
pub fn exec(
    spec: &ContainerSpec,
    init_pid: i32,
    process: &ProcessSpec,
    stdio: Stdio,
    spares: Option<&ExecSpares>,
) -> Result<Started, Error> {
    validate_process(process)?;
    if init_pid <= 0 {
        return Err(Error::InvalidSpec(format!("bad init pid {init_pid}")));
    }
    let cg = cgroups::manager(&spec.cgroup);
    let (mut h, tasks_files) = match spares.and_then(ExecSpares::take) {
        Some(mut h) => {
            let files = self_move_fds(cg.as_ref());
            h.in_cgroup = !files.is_empty();
            (h, files)
        }
        None => (Helper::spawn_released(Some(cg.as_ref()))?, vec![]),
    };
    let r = (|| {
        if !h.in_cgroup {
            cg.add_process(h.pid)
                .map_err(setup("add exec helper to cgroup"))?;
        }
        let start_time = proc_start_time(h.pid)
            .ok_or_else(|| Error::Init(format!("exec helper (pid {}) vanished", h.pid)))?;
        h.send(
            &InitMsg::Exec {
                spec: spec.clone(),
                init_pid,
                process: process.clone(),
            },
            stdio,
            &tasks_files,
        )?;
        h.wait_status()?;
        Ok(Started {
            pid: h.pid,
            start_time,
            veth: None,
        })
    })();
    if r.is_err() {
        // A grandchild that already failed exits at once, and so does the helper once it
        // has reaped it. Killing the helper first would orphan the grandchild to us.
        h.reap_within(Duration::from_secs(2));
        h.kill_and_reap();
    }
    r
}

/// Removes what `start` created: processes, mounts, cgroup. Idempotent.
pub fn destroy(spec: &ContainerSpec) -> Result<(), Error> {
    let cg = cgroups::manager(&spec.cgroup);
    let unmounted = rootfs::unmount_all(&spec.rootfs.mountpoint).map_err(setup("unmount rootfs"));
    // Usually every process is gone already (a pid namespace dies with its init) and an
    // rmdir per directory does; otherwise kill what is left first.
    if !cg.remove_if_empty() {
        cg.kill_all().map_err(setup("kill container processes"))?;
        cg.remove().map_err(setup("remove cgroup"))?;
    }
    unmounted
}

/// Field 22 (starttime) of /proc/PID/stat.
pub fn proc_start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    // One read: the file is well under a page, and std's read-to-end grows its buffer
    // from 32 bytes (six reads), on every start and exec.
    let mut buf = [0u8; 1024];
    let n = std::io::Read::read(
        &mut std::fs::File::open(format!("/proc/{pid}/stat")).ok()?,
        &mut buf,
    )
    .ok()?;
    parse_start_time(&String::from_utf8_lossy(&buf[..n]))
}

/// comm (field 2) may hold spaces and parens: fields resume after the LAST ')'.
fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

// ---------------------------------------------------------------------------------------
// Command lookup

#[derive(Debug, PartialEq, Eq)]
enum Probe {
    Missing,
    NotExecutable,
    Executable,
}

#[derive(Debug, PartialEq, Eq)]
enum LookupError {
    NotFound(String),
    NotExecutable(String),
}

fn env_path(env: &[String]) -> &str {
    env.iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
}

/// Resolves `cmd` like Go's exec.LookPath (what runc and Docker report on).
fn lookup(cmd: &str, path: &str, probe: impl Fn(&Path) -> Probe) -> Result<PathBuf, LookupError> {
    if cmd.contains('/') {
        return match probe(Path::new(cmd)) {
            Probe::Executable => Ok(cmd.into()),
            Probe::NotExecutable => Err(LookupError::NotExecutable(format!(
                "exec: \"{cmd}\": permission denied"
            ))),
            Probe::Missing => Err(LookupError::NotFound(format!(
                "exec: \"{cmd}\": stat {cmd}: no such file or directory"
            ))),
        };
    }
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let cand = Path::new(dir).join(cmd);
        if probe(&cand) == Probe::Executable {
            return Ok(cand);
        }
    }
    Err(LookupError::NotFound(format!(
        "exec: \"{cmd}\": executable file not found in $PATH"
    )))
}

fn probe_fs(p: &Path) -> Probe {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {
            // access(2) checks as the (already switched) real ids, including noexec mounts.
            let c = match CString::new(p.as_os_str().as_encoded_bytes()) {
                Ok(c) => c,
                Err(_) => return Probe::Missing,
            };
            // SAFETY: valid C string.
            if unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0 {
                Probe::Executable
            } else {
                Probe::NotExecutable
            }
        }
        Ok(_) => Probe::NotExecutable,
        Err(_) => Probe::Missing,
    }
}

// ---------------------------------------------------------------------------------------
// The helper (runs in the re-executed binary, single-threaded)

/// Why the helper gave up; becomes the status-pipe message.
enum InitError {
    NotFound(String),
    NotExecutable(String),
    Other(String),
}

impl<E: std::fmt::Display> From<(&'static str, E)> for InitError {
    fn from((stage, e): (&'static str, E)) -> Self {
        InitError::Other(format!("{stage}: {e}"))
    }
}

type InitResult<T> = Result<T, InitError>;

fn report(err: &InitError) {
    let (tag, msg) = match err {
        InitError::NotFound(m) => (TAG_NOT_FOUND, m),
        InitError::NotExecutable(m) => (TAG_NOT_EXEC, m),
        InitError::Other(m) => (TAG_ERROR, m),
    };
    let mut buf = vec![tag];
    buf.extend_from_slice(msg.as_bytes());
    // SAFETY: writing a local buffer to the status fd (it may already be closed: harmless).
    unsafe { libc::write(STATUS_FD, buf.as_ptr().cast(), buf.len()) };
}

fn exit_code(err: &InitError) -> i32 {
    match err {
        InitError::NotFound(_) => 127,
        InitError::NotExecutable(_) => 126,
        InitError::Other(_) => 1,
    }
}

/// Entry point of the re-executed helper (or of the fork server); never returns.
pub fn init_main() -> ! {
    let arg = std::env::args().nth(2);
    if arg.as_deref() == Some(forkserver::ARG) {
        forkserver::serve()
    }
    helper_main(arg.and_then(|n| n.parse().ok()).unwrap_or(0))
}

/// The helper: `moves` cgroup `tasks` files to join from fd 5 on, then the message.
pub(crate) fn helper_main(moves: RawFd) -> ! {
    let r = std::panic::catch_unwind(|| {
        let (msg, extra) = helper_prologue(moves)?;
        match msg {
            InitMsg::Start {
                spec,
                cgroup_mounts,
            } => init_start(&spec, &cgroup_mounts, extra.first()),
            InitMsg::Exec {
                spec,
                init_pid,
                process,
            } => {
                // A spare helper gets the container's cgroup `tasks` files with the message.
                join_cgroup(extra.iter().map(|f| f.as_raw_fd()))?;
                init_exec(&spec, init_pid, &process)
            }
        }
    });
    let err = match r {
        Ok(Err(e)) => e,
        Ok(Ok(never)) => match never {},
        Err(p) => InitError::Other(format!(
            "container init panicked: {}",
            p.downcast_ref::<&str>()
                .copied()
                .or(p.downcast_ref::<String>().map(|s| s.as_str()))
                .unwrap_or("?")
        )),
    };
    report(&err);
    std::process::exit(exit_code(&err))
}

fn helper_prologue(moves: RawFd) -> InitResult<(InitMsg, Vec<OwnedFd>)> {
    // SAFETY: fd flag changes and closing descriptors nobody else in this process uses.
    unsafe {
        libc::fcntl(STATUS_FD, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::fcntl(CTL_FD, libc::F_SETFD, libc::FD_CLOEXEC);
        // Until the container command runs, /proc/PID/exe is the daemon binary: keep
        // container processes from opening it (the CVE-2019-5736 pattern).
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    join_cgroup(SELF_MOVE_FD..SELF_MOVE_FD + moves)?;
    // SAFETY: closing descriptors nobody else in this process uses.
    unsafe {
        // Anything else inherited from the daemon must not reach the container.
        libc::syscall(libc::SYS_close_range, 5u32, u32::MAX, 0u32);
    }
    let (buf, extra) = receive_message().map_err(|e| ("read spec", e))?;
    let msg = serde_json::from_slice(&buf).map_err(|e| ("decode spec", e))?;
    Ok((msg, extra))
}

/// Moves this process into a cgroup v1 group by writing `0` to each of its `tasks` files
/// (see `self_move_fds`). Still single-threaded, so moving this thread moves the process.
fn join_cgroup(tasks_files: impl Iterator<Item = RawFd>) -> InitResult<()> {
    for fd in tasks_files {
        // SAFETY: writing one byte from a static buffer to a descriptor we own.
        if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err((
                "join the container's cgroup",
                std::io::Error::last_os_error(),
            )
                .into());
        }
    }
    Ok(())
}

/// Most descriptors a message carries: stdio, and a rootfs mount or a `tasks` file per
/// cgroup v1 hierarchy.
const MAX_MESSAGE_FDS: usize = 32;

/// Reads the message to EOF; the stdio descriptors that come with it become 0, 1 and 2,
/// and the others (a rootfs mount, or cgroup `tasks` files) are returned.
fn receive_message() -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut stdio_set = false;
    let mut extra = Vec::new();
    loop {
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_MESSAGE_FDS]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            CTL_FD,
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let n = msg.bytes;
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for (i, fd) in fds.iter().enumerate() {
                    if i >= 3 && !stdio_set {
                        // SAFETY: a descriptor we just received, now owned here.
                        extra.push(unsafe { OwnedFd::from_raw_fd(*fd) });
                        continue;
                    }
                    if i < 3 && !stdio_set {
                        // SAFETY: dup2 onto our stdio, then close the received copy.
                        unsafe {
                            libc::dup2(*fd, i as RawFd);
                        }
                    }
                    // SAFETY: closing a descriptor we just received.
                    unsafe { libc::close(*fd) };
                }
                stdio_set = true;
            }
        }
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    // SAFETY: done with the control socket.
    unsafe { libc::close(CTL_FD) };
    Ok((out, extra))
}

fn init_start(
    spec: &ContainerSpec,
    cg_mounts: &rootfs::CgroupMounts,
    rootfs_mount: Option<&OwnedFd>,
) -> InitResult<std::convert::Infallible> {
    // Built first: a filter that cannot compile must fail before anything else.
    let filter = security::seccomp(spec.profile()).map_err(|e| ("seccomp", e))?;
    namespaces::unshare_cgroup().map_err(|e| ("unshare cgroup namespace", e))?;
    nix::unistd::sethostname(&spec.hostname)
        .map_err(|e| ("set hostname", std::io::Error::from(e)))?;
    if spec.network == NetworkMode::Loopback {
        namespaces::loopback_up().map_err(|e| ("bring lo up", e))?;
    }
    let Some(rootfs_mount) = rootfs_mount else {
        return Err(InitError::Other(
            "no rootfs mount came with the spec".into(),
        ));
    };
    // Private first: nothing from here may propagate back to the host.
    rootfs::make_private().map_err(|e| ("rootfs", e))?;
    rootfs::attach_detached(rootfs_mount, &spec.rootfs.mountpoint)
        .map_err(|e| ("mount rootfs", e))?;
    rootfs::setup(&spec.rootfs.mountpoint, spec, cg_mounts).map_err(|e| ("rootfs", e))?;
    session(spec.process.tty)?;
    finish_and_exec(&spec.process, spec.profile(), &filter)
}

fn session(tty: bool) -> InitResult<()> {
    nix::unistd::setsid().map_err(|e| ("setsid", std::io::Error::from(e)))?;
    if tty {
        // SAFETY: ioctl on stdin with an integer argument.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
            return Err(("set controlling terminal", std::io::Error::last_os_error()).into());
        }
    }
    Ok(())
}

/// cwd, ids, capabilities, no_new_privs, seccomp, then execve. Only returns on failure.
fn finish_and_exec(
    p: &ProcessSpec,
    profile: security::Profile,
    filter: &seccompiler::BpfProgram,
) -> InitResult<std::convert::Infallible> {
    let cwd = rootfs::ensure_dir(&p.cwd).map_err(|e| ("working directory", e))?;
    let argv: Vec<CString> = p
        .args
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<_, _>>()
        .map_err(|e| ("args", e))?;
    let envp: Vec<CString> = p
        .env
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<_, _>>()
        .map_err(|e| ("env", e))?;

    security::drop_bounding(profile).map_err(|e| ("capabilities", e))?;
    security::keep_caps(true).map_err(|e| ("capabilities", e))?;
    let groups: Vec<nix::unistd::Gid> = p
        .additional_gids
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups).map_err(|e| ("setgroups", std::io::Error::from(e)))?;
    let gid = nix::unistd::Gid::from_raw(p.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| ("setgid", std::io::Error::from(e)))?;
    let uid = nix::unistd::Uid::from_raw(p.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| ("setuid", std::io::Error::from(e)))?;
    security::set_caps(profile).map_err(|e| ("capabilities", e))?;
    std::env::set_current_dir(&cwd).map_err(|e| ("chdir", format!("{}: {e}", cwd.display())))?;

    let path = lookup(&p.args[0], env_path(&p.env), probe_fs).map_err(|e| match e {
        LookupError::NotFound(m) => InitError::NotFound(m),
        LookupError::NotExecutable(m) => InitError::NotExecutable(m),
    })?;
    let cpath = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| ("path", e))?;
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
    envp_p.push(std::ptr::null());

    security::set_no_new_privs().map_err(|e| ("no_new_privs", e))?;
    reset_signals();
    security::install_seccomp(filter).map_err(|e| ("seccomp", e))?;
    // SAFETY: NUL-terminated pointer arrays over live CStrings.
    unsafe { libc::execve(cpath.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr()) };
    let e = std::io::Error::last_os_error();
    let cmd = &p.args[0];
    Err(match e.raw_os_error() {
        // e.g. a script whose interpreter is missing.
        Some(libc::ENOENT) => InitError::NotFound(format!("exec: \"{cmd}\": {e}")),
        Some(libc::EACCES) => InitError::NotExecutable(format!("exec: \"{cmd}\": {e}")),
        _ => InitError::Other(format!("exec {cmd:?}: {e}")),
    })
}

/// Default dispositions and an empty mask: ignored signals (Rust ignores SIGPIPE) and
/// the daemon thread's mask would otherwise survive execve.
fn reset_signals() {
    // SAFETY: resetting signal dispositions in a single-threaded process.
    unsafe {
        for sig in 1..libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

fn init_exec(
    spec: &ContainerSpec,
    init_pid: i32,
    p: &ProcessSpec,
) -> InitResult<std::convert::Infallible> {
    let filter = security::seccomp(spec.profile()).map_err(|e| ("seccomp", e))?;
    namespaces::join_process(init_pid, spec.idmap.is_some()).map_err(|e| ("join container", e))?;

    // Block what we forward (and SIGCHLD) before fork, so none is lost.
    // SAFETY: signal mask manipulation in a single-threaded process.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD] {
            libc::sigaddset(&mut set, s);
            libc::signal(s, libc::SIG_DFL);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    // Joining a pid namespace only applies to children: fork once.
    // SAFETY: single-threaded process.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(("fork", std::io::Error::last_os_error()).into());
    }
    if child == 0 {
        let r = session(p.tty).and_then(|_| finish_and_exec(p, spec.profile(), &filter));
        let err = match r {
            Err(e) => e,
            Ok(never) => match never {},
        };
        report(&err);
        std::process::exit(exit_code(&err));
    }
    // Only the grandchild reports from here on.
    // SAFETY: closing our copy of the status fd.
    unsafe { libc::close(STATUS_FD) };
    std::process::exit(forward_and_wait(child, &set))
}

/// Forwards SIGTERM/SIGINT/SIGHUP to `child` until it exits; returns its exit code.
fn forward_and_wait(child: libc::pid_t, set: &libc::sigset_t) -> i32 {
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if r == child {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            if libc::WIFSIGNALED(status) {
                return 128 + libc::WTERMSIG(status);
            }
        } else if r < 0 {
            return 255;
        }
        // SAFETY: waiting on a blocked signal set.
        let sig = unsafe { libc::sigwaitinfo(set, std::ptr::null_mut()) };
        if sig > 0 && sig != libc::SIGCHLD {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child, sig) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for a spare: alive (our own pid) until discarded.
    struct Token;

    impl Reserved for Token {
        fn pid(&self) -> i32 {
            std::process::id() as i32
        }

        fn discard(&mut self) {}
    }

    #[test]
    fn reserve_tops_up_to_the_count_asked_within_its_size() {
        let reserve = Reserve::new(3);
        let made = std::sync::atomic::AtomicUsize::new(0);
        let spawn = || {
            made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(Token)
        };
        reserve.refill("test", 1, spawn);
        assert_eq!(reserve.items().len(), 1);
        // Already one: nothing to make.
        reserve.refill("test", 1, spawn);
        assert_eq!(made.load(std::sync::atomic::Ordering::Relaxed), 1);
        reserve.refill("test", usize::MAX, spawn);
        assert_eq!(reserve.items().len(), 3, "never more than its size");
        assert!(reserve.take().is_some());
        assert_eq!(reserve.items().len(), 2);
        reserve.drain();
        reserve.refill("test", usize::MAX, spawn);
        assert!(reserve.items().is_empty(), "a drained reserve stays empty");
    }

    #[test]
    fn stat_start_time_with_nasty_comm() {
        let tail = "S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 777 19 20";
        let s = format!("42 (a) b (c)) {tail}\n");
        assert_eq!(parse_start_time(&s), Some(777));
        assert_eq!(parse_start_time("42 (x"), None);
        assert_eq!(parse_start_time("garbage"), None);
        let me = proc_start_time(std::process::id() as i32).unwrap();
        assert!(me > 0);
        assert_eq!(proc_start_time(-1), None);
    }

    #[test]
    fn path_lookup() {
        let fs = |p: &Path| match p.to_str().unwrap() {
            "/usr/bin/sh" | "/bin/ok" | "./rel" => Probe::Executable,
            "/bin/sh" | "/bin/noexec" => Probe::NotExecutable,
            _ => Probe::Missing,
        };
        assert_eq!(lookup("sh", "/bin:/usr/bin", fs), Ok("/usr/bin/sh".into()));
        assert_eq!(lookup("rel", ":/bin", fs), Ok("./rel".into()));
        assert_eq!(lookup("/bin/ok", "", fs), Ok("/bin/ok".into()));
        assert_eq!(
            lookup("foo", "/bin", fs),
            Err(LookupError::NotFound(
                "exec: \"foo\": executable file not found in $PATH".into()
            ))
        );
        assert!(matches!(
            lookup("/nope", "/bin", fs),
            Err(LookupError::NotFound(_))
        ));
        assert!(matches!(
            lookup("/bin/noexec", "/bin", fs),
            Err(LookupError::NotExecutable(_))
        ));
        assert_eq!(env_path(&["A=1".into(), "PATH=/x".into()]), "/x");
        assert_eq!(env_path(&[]), DEFAULT_PATH);
    }

    #[test]
    fn spec_validation() {
        let p = ProcessSpec {
            args: vec![],
            env: vec![],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            additional_gids: vec![],
            tty: false,
        };
        assert!(matches!(validate_process(&p), Err(Error::InvalidSpec(_))));
        let p2 = ProcessSpec {
            args: vec!["a\0b".into()],
            ..p.clone()
        };
        assert!(validate_process(&p2).is_err());
        let p3 = ProcessSpec {
            args: vec!["sh".into()],
            cwd: "rel".into(),
            ..p
        };
        assert!(validate_process(&p3).is_err());
    }
}
