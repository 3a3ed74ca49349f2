//! The fork server: a single-threaded copy of our binary, executed once, that clones the
//! container helpers on the daemon's behalf. A helper cloned from it is already a running
//! copy of the helper binary, so it skips the execve of our binary that a clone from the
//! multi-threaded daemon needs: mapping and relocating 16 MB, and glibc's start-up CPU
//! probing (about 90 CPUID instructions, each a VM exit: about 1 ms per helper on a
//! kvm-pvm host). The helpers are cloned with CLONE_PARENT, so they are the daemon's
//! children as before: it waits for them, and nothing else changes.
//!
//! Protocol, over a SOCK_SEQPACKET pair, one request at a time: the daemon sends
//! `[flags, moves, sync_fd, has_cgroup, target...]` (i32 each) with one descriptor per
//! target (and the cgroup v2 directory last); the server answers `[pid or -errno,
//! in_cgroup]`. It exits when the daemon's end closes.

use crate::namespaces::{self, Forked};
use std::io::{Error, ErrorKind, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// argv[2] (after [`crate::process::INIT_ARG`]) of the fork server.
pub(crate) const ARG: &str = "fork-server";
/// The server's end of the socket.
const SOCKET_FD: RawFd = 3;
/// Most descriptors a request carries (as the helper's own message).
const MAX_FDS: usize = 32;
/// A clone takes milliseconds; no answer by then means the server is stuck.
const ANSWER_TIMEOUT_SECS: i64 = 10;

/// The daemon's end of the socket, and the server's pid (reaped when it is dropped).
struct Server {
    socket: OwnedFd,
    pid: libc::pid_t,
}

static SERVER: Mutex<Option<Server>> = Mutex::new(None);
/// Helpers the server has cloned for this process.
static CLONED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The running server's pid.
pub fn pid() -> Option<libc::pid_t> {
    server().as_ref().map(|s| s.pid)
}

/// How many helpers the fork server has cloned for this process so far.
pub fn helpers_cloned() -> u64 {
    CLONED.load(std::sync::atomic::Ordering::Relaxed)
}

fn server() -> std::sync::MutexGuard<'static, Option<Server>> {
    SERVER.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts the fork server, once. Containers work without one: each helper is then an
/// execve of our binary.
pub fn start() -> Result<()> {
    let mut server = server();
    if server.is_some() {
        return Ok(());
    }
    let (ours, theirs) = socketpair()?;
    // A server that stops answering (stopped, say) must not hang every start.
    nix::sys::socket::setsockopt(
        &ours,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(ANSWER_TIMEOUT_SECS, 0),
    )
    .map_err(Error::from)?;
    let null = std::fs::File::open("/dev/null")?;
    let prep = namespaces::PreparedExec::new(
        "/proc/self/exe",
        &["ltv-fork-server", crate::process::INIT_ARG, ARG],
        &[],
        &[
            (null.as_raw_fd(), 0),
            (null.as_raw_fd(), 1),
            // Its errors go to our log.
            (2, 2),
            (theirs.as_raw_fd(), SOCKET_FD),
        ],
        None,
    )?;
    let Forked::Parent { pid, .. } = prep.spawn(0, None)? else {
        unreachable!("spawn returns in the parent only")
    };
    *server = Some(Server { socket: ours, pid });
    Ok(())
}

/// Stops the fork server (closing its socket ends it) and reaps it.
pub fn stop() {
    if let Some(s) = server().take() {
        s.end(false);
    }
}

impl Server {
    /// Closes our end, which ends a working server, and reaps it; `kill`: one that
    /// stopped answering.
    fn end(self, kill: bool) {
        drop(self.socket);
        // SAFETY: our own child, not reaped yet, so the pid is still its.
        unsafe {
            if kill {
                libc::kill(self.pid, libc::SIGKILL);
            }
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// A helper cloned by the server with `flags`: `fds` are (descriptor, number it gets in
/// the child), `sync_fd` the target it reads one byte from before it goes on, `moves` the
/// helper's number of cgroup `tasks` files, `cgroup` a v2 directory to clone it into.
/// `None` when there is no server (or it died): the caller execs the helper itself.
/// Public for tests; containers get theirs through [`crate::process`].
#[doc(hidden)]
pub fn spawn(
    flags: libc::c_int,
    fds: &[(RawFd, RawFd)],
    sync_fd: Option<RawFd>,
    moves: RawFd,
    cgroup: Option<&OwnedFd>,
) -> Option<Result<Forked>> {
    let mut server = server();
    let socket = server.as_ref()?.socket.as_raw_fd();
    match request(socket, flags, fds, sync_fd, moves, cgroup) {
        Ok(reply) => {
            if reply.is_ok() {
                CLONED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Some(reply)
        }
        Err(e) => {
            tracing::warn!("fork server gone ({e}); helpers are executed from now on");
            if let Some(s) = server.take() {
                s.end(true);
            }
            None
        }
    }
}

/// Outer error: the server cannot be reached. Inner: the clone failed.
fn request(
    socket: RawFd,
    flags: libc::c_int,
    fds: &[(RawFd, RawFd)],
    sync_fd: Option<RawFd>,
    moves: RawFd,
    cgroup: Option<&OwnedFd>,
) -> Result<Result<Forked>> {
    use nix::sys::socket::{recv, sendmsg, ControlMessage, MsgFlags};
    let mut words = vec![flags, moves, sync_fd.unwrap_or(-1), cgroup.is_some() as i32];
    words.extend(fds.iter().map(|(_, target)| *target));
    let mut sources: Vec<RawFd> = fds.iter().map(|(src, _)| *src).collect();
    sources.extend(cgroup.map(|c| c.as_raw_fd()));
    let payload = encode(&words);
    let iov = [std::io::IoSlice::new(&payload)];
    sendmsg::<()>(
        socket,
        &iov,
        &[ControlMessage::ScmRights(&sources)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(Error::from)?;
    let mut buf = [0u8; 8];
    let n = recv(socket, &mut buf, MsgFlags::empty()).map_err(Error::from)?;
    let reply = decode(&buf[..n]);
    let [pid, in_cgroup] = reply[..] else {
        return Err(Error::new(ErrorKind::UnexpectedEof, "no answer"));
    };
    Ok(if pid > 0 {
        Ok(Forked::Parent {
            pid,
            in_cgroup: in_cgroup != 0,
        })
    } else {
        Err(Error::from_raw_os_error(-pid))
    })
}

/// The server's loop, in the re-executed binary; exits when the daemon's end closes.
pub(crate) fn serve() -> ! {
    // Once here rather than in every helper, which inherits them.
    crate::security::precompile();
    loop {
        let (words, mut fds) = match receive() {
            Ok(Some(r)) => r,
            Ok(None) => std::process::exit(0),
            Err(e) => {
                eprintln!("ltv fork server: {e}");
                std::process::exit(1);
            }
        };
        let reply = match clone_helper(&words, &mut fds) {
            Ok(Forked::Child) => unreachable!("the child went on as the helper"),
            Ok(Forked::Parent { pid, in_cgroup }) => [pid, in_cgroup as i32],
            Err(e) => [-e.raw_os_error().unwrap_or(libc::EINVAL), 0],
        };
        drop(fds);
        // SAFETY: writing a local buffer to our socket.
        let payload = encode(&reply);
        if unsafe { libc::write(SOCKET_FD, payload.as_ptr().cast(), payload.len()) } < 0 {
            std::process::exit(1);
        }
    }
}

/// Clones one helper; in the child, goes on as the helper and never returns.
fn clone_helper(words: &[i32], fds: &mut Vec<OwnedFd>) -> Result<Forked> {
    let [flags, moves, sync_fd, has_cgroup, ref targets @ ..] = words[..] else {
        return Err(Error::from_raw_os_error(libc::EINVAL));
    };
    let cgroup = match has_cgroup {
        0 => None,
        _ => Some(fds.pop().ok_or(Error::from_raw_os_error(libc::EINVAL))?),
    };
    if targets.len() != fds.len() {
        return Err(Error::from_raw_os_error(libc::EINVAL));
    }
    let dups = fds
        .drain(..)
        .zip(targets)
        .map(|(fd, &t)| {
            let target =
                namespaces::check_target(t).map_err(|_| Error::from_raw_os_error(libc::EINVAL))?;
            Ok((namespaces::dup_above_targets(fd.as_raw_fd())?, target))
        })
        .collect::<Result<Vec<_>>>()?;
    // SAFETY: we are single-threaded, so the child may do anything; it only returns
    // through `helper_main`, which exits.
    let forked = unsafe { namespaces::fork(flags | libc::CLONE_PARENT, cgroup.as_ref())? };
    if let Forked::Child = forked {
        // SAFETY: a fresh child of a fork-like clone; the sources are above the targets.
        unsafe {
            namespaces::setup_child(
                &dups,
                (sync_fd >= 0).then_some(sync_fd),
                flags & libc::CLONE_NEWUSER != 0,
            )
        };
        crate::process::helper_main(moves)
    }
    Ok(forked)
}

/// One request: its words and descriptors; `None` at EOF.
fn receive() -> Result<Option<(Vec<i32>, Vec<OwnedFd>)>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut buf = [0u8; 4 * (4 + MAX_FDS)];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS + 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = loop {
        match recvmsg::<()>(
            SOCKET_FD,
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r.map_err(Error::from)?,
        }
    };
    let n = msg.bytes;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = c {
            // SAFETY: descriptors just received, owned here from now on.
            fds.extend(
                received
                    .iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) }),
            );
        }
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some((decode(&buf[..n]), fds)))
}

fn socketpair() -> Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType};
    nix::sys::socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(Error::from)
}

fn encode(words: &[i32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn decode(bytes: &[u8]) -> Vec<i32> {
    bytes
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip() {
        let w = [libc::CLONE_NEWUSER | libc::CLONE_NEWNS, 3, -1, 1, 0, 1, 2];
        assert_eq!(decode(&encode(&w)), w);
        // A short tail is not a word.
        assert_eq!(decode(&[1, 0, 0, 0, 9]), [1]);
    }
}
