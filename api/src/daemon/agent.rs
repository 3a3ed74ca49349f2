//! The guest agent: inside a microVM, the same daemon also listens on a vsock port and
//! serves, besides the normal API, what only makes sense for the machine it runs on: exec
//! on the guest itself, power-off, and guest facts (kernel, memory, uptime) in `GET /1.0`.

use super::error::ApiError;
use crate::types::ExecPost;
use ltv_containers::process::Stdio;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;

/// The vsock port the agent listens on, and the host daemon connects to.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Once it serves, the agent connects to this port on the host (hybrid vsock: the host's
/// `<uds>_<port>` socket) to say so, and the host stops waiting at once instead of at its
/// next probe.
pub const READY_VSOCK_PORT: u32 = 1025;

/// Tells the host the agent serves; a host that does not listen for it probes instead.
pub async fn say_ready() {
    const VMADDR_CID_HOST: u32 = 2;
    match connect(VMADDR_CID_HOST, READY_VSOCK_PORT).await {
        Ok(mut s) => {
            use tokio::io::AsyncWriteExt;
            let _ = s.write_all(b"ready\n").await;
        }
        Err(e) => tracing::debug!("no readiness listener on the host: {e}"),
    }
}

/// The guest init starts the agent with this nice value, so it is up before the image's
/// own boot work; see [`serving`].
pub const STARTUP_NICE: i32 = -10;

/// Once the agent serves, it (every thread: nice is per thread on Linux) and what it
/// starts get the normal priority back.
pub fn serving() {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for tid in tasks
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse::<u32>().ok())
    {
        // SAFETY: setpriority on one of our own threads; no pointers.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 0) };
    }
}

/// `axum::serve` over vsock. Written here, not with tokio-vsock: a connected vsock socket
/// is an ordinary stream socket, so tokio's Unix stream type drives it (read, write,
/// shutdown) and only socket/bind/accept need the vsock address type.
pub struct VsockListener(tokio::io::unix::AsyncFd<OwnedFd>, u32);

impl axum::serve::Listener for VsockListener {
    type Io = tokio::net::UnixStream;
    type Addr = u32;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.accept_one().await {
                Ok(c) => return (c, self.1),
                Err(e) => {
                    tracing::warn!("vsock accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.1)
    }
}

impl VsockListener {
    async fn accept_one(&self) -> std::io::Result<tokio::net::UnixStream> {
        loop {
            let mut ready = self.0.readable().await?;
            // SAFETY: accept4 on our listening socket; no address is asked for.
            let fd = unsafe {
                libc::accept4(
                    self.0.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: accept4 just returned this descriptor to us.
                let std = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
                return tokio::net::UnixStream::from_std(std);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(e);
            }
            ready.clear_ready();
        }
    }
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; zero is a valid start.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn vsock_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socket(2) just returned it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn bind(port: u32) -> std::io::Result<VsockListener> {
    let fd = vsock_socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: bind/listen on our socket with a valid sockaddr_vm.
    unsafe {
        if libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            len,
        ) != 0
            || libc::listen(fd.as_raw_fd(), 128) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }?;
    Ok(VsockListener(fd, port))
}

/// A connected vsock stream (inside a guest, CID 2 is the host).
pub async fn connect(cid: u32, port: u32) -> std::io::Result<tokio::net::UnixStream> {
    let fd = vsock_socket()?;
    let addr = vsock_addr(cid, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: connect on our socket with a valid sockaddr_vm.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            len,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    let std = std::os::unix::net::UnixStream::from(fd);
    let stream = tokio::net::UnixStream::from_std(std)?;
    stream.writable().await?;
    match stream.take_error()? {
        Some(e) => Err(e),
        None => Ok(stream),
    }
}

/// Starts `req.command` on this machine in a process group of its own (with a tty: a
/// session whose controlling terminal it is); returns its pid. The daemon waits for it
/// like for any child.
pub fn spawn_on_guest(req: &ExecPost, stdio: Stdio) -> Result<i32, ApiError> {
    let program = &req.command[0];
    // Never fork the agent: on kvm-pvm hosts a forked child's writes can show up in the
    // parent's memory (stale shadow page tables after copy-on-write), and the agent then
    // crashes. std starts a process with posix_spawn (vfork-like) when no closure has to
    // run before exec; a tty session is set up by our own trampoline after the spawn.
    let mut cmd = if req.tty {
        let mut c = std::process::Command::new("/proc/self/exe");
        c.arg(TTY_EXEC_ARG).arg("--").arg(program);
        c
    } else {
        let mut c = std::process::Command::new(program);
        c.process_group(0);
        c
    };
    cmd.args(&req.command[1..])
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/root")
        .env("TERM", if req.tty { "xterm" } else { "dumb" })
        .current_dir(req.cwd.as_deref().unwrap_or("/"))
        .stdin(std::process::Stdio::from(stdio.stdin))
        .stdout(std::process::Stdio::from(stdio.stdout))
        .stderr(std::process::Stdio::from(stdio.stderr));
    // The guest init's workaround for kvm-pvm guests holds for every process it runs.
    if let Some(t) = std::env::var_os("GLIBC_TUNABLES") {
        cmd.env("GLIBC_TUNABLES", t);
    }
    for kv in &req.env {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }

    match cmd.spawn() {
        // Waited for through its pidfd by the caller, not through `Child`.
        Ok(child) => Ok(child.id() as i32),
        Err(e) => {
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => 127,
                std::io::ErrorKind::PermissionDenied => 126,
                _ => return Err(ApiError::internal(format!("exec {program:?}: {e}"))),
            };
            Err(ApiError::cannot_exec(
                code,
                format!("exec {program:?}: {e}"),
            ))
        }
    }
}

/// `ltv __ltv-tty-exec -- PROGRAM ARGS...`: a new session with stdin as its controlling
/// terminal, then exec. Never returns; 127/126 as a shell would when PROGRAM cannot run.
pub const TTY_EXEC_ARG: &str = "__ltv-tty-exec";

pub fn tty_exec_main() -> ! {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(3).collect();
    // SAFETY: setsid and ioctl on our own stdin; no memory is passed.
    unsafe {
        libc::setsid();
        libc::ioctl(0, libc::TIOCSCTTY, 0);
    }
    let Some(program) = args.first() else {
        std::process::exit(127)
    };
    let e = std::process::Command::new(program).args(&args[1..]).exec();
    eprintln!("ltv: exec {}: {e}", program.to_string_lossy());
    std::process::exit(if e.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

/// Asks PID 1 to power the machine off the way it understands: busybox init and our own
/// guest init (`/init`, guest-kernel/init.c) take SIGUSR2, systemd SIGRTMIN+4; any other
/// init gets `poweroff` run.
pub fn power_off() -> Result<(), ApiError> {
    let init = std::fs::read_link("/proc/1/exe")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sig = if init.contains("systemd") {
        libc::SIGRTMIN() + 4
    } else if init.contains("busybox") || init == "/init" {
        libc::SIGUSR2
    } else {
        return std::process::Command::new("poweroff")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .spawn()
            .map(|_| ())
            .map_err(|e| ApiError::internal(format!("run poweroff: {e}")));
    };
    // SAFETY: kill has no memory preconditions.
    if unsafe { libc::kill(1, sig) } != 0 {
        return Err(ApiError::internal(format!(
            "signal {sig} to init: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// For every guest process on kvm-pvm hosts, the containers' inside a guest included:
/// glibc must not pick its AVX/AVX-512 string functions. The compat kernel runs with
/// `noxsave` and saves only the FXSAVE area (x87, XMM0-15) on a context switch, while
/// user space runs natively and sees the host's CPUID and XCR0 (no VMM setting or guest
/// XSETBV changes them there): a task preempted inside an AVX-512 memcpy resumes with
/// another task's YMM16-31 and corrupts memory. `AVX_Fast_Unaligned_Load` is a preference glibc sets from the CPU before it
/// reads tunables and that turning AVX off leaves set (`ld.so --list-diagnostics`); its
/// memcpy/memmove choose their YMM variants by it alone, so it must go too.
/// The guest's /init (guest-kernel/init.c) gets the same text from the same file and
/// gives it to every process it starts.
pub const PVM_GLIBC_TUNABLES: &str = include_str!("pvm-glibc-tunables");

/// eth0's address and gateway, as the host put them on the guest kernel command line.
pub fn guest_address(
    cmdline: &str,
) -> Option<(std::net::Ipv4Addr, u8, Option<std::net::Ipv4Addr>)> {
    let word = |key: &str| cmdline.split_whitespace().find_map(|w| w.strip_prefix(key));
    let (ip, prefix) = word("ltv.ip=")?.split_once('/')?;
    let gateway = word("ltv.gw=").and_then(|g| g.parse().ok());
    Some((ip.parse().ok()?, prefix.parse().ok()?, gateway))
}

/// Configures the guest's NIC from the kernel command line, before the agent serves.
pub fn configure_guest_network() {
    if let Some((ip, prefix, gateway)) = guest_address(kernel_cmdline()) {
        if let Err(e) = ltv_containers::network::configure_interface("eth0", ip, prefix, gateway) {
            tracing::error!("eth0 {ip}/{prefix}: {e}");
        }
    }
}

/// Booted with the kvm-pvm compat switches; also true inside containers in such a guest,
/// which see the guest kernel's command line.
pub fn pvm_guest() -> bool {
    kernel_cmdline()
        .split_whitespace()
        .any(|w| w == "ltv_pvm_compat")
}

/// The running kernel's command line, read once: it does not change while we run, and
/// in a kvm-pvm guest every read is emulated kernel work (the agent asks three times).
fn kernel_cmdline() -> &'static str {
    static CMDLINE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CMDLINE.get_or_init(|| std::fs::read_to_string("/proc/cmdline").unwrap_or_default())
}

/// Guest facts for `GET /1.0`: uptime and memory from /proc.
pub fn machine_facts() -> crate::types::MachineFacts {
    let uptime_secs = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or_default()
            * 1024
    };
    crate::types::MachineFacts {
        uptime_secs,
        memory_total_bytes: kib("MemTotal:"),
        memory_available_bytes: kib("MemAvailable:"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_address_from_the_command_line() {
        let a = guest_address(
            "console=ttyS0 quiet ltv.hostname=vm1 ltv.ip=10.87.0.9/24 ltv.gw=10.87.0.1",
        );
        assert_eq!(
            a,
            Some((
                "10.87.0.9".parse().unwrap(),
                24,
                Some("10.87.0.1".parse().unwrap())
            ))
        );
        assert_eq!(
            guest_address("quiet ltv.ip=10.87.0.9/24").map(|a| a.2),
            Some(None)
        );
        assert_eq!(guest_address("quiet ltv.ip=garbage ltv.gw=10.87.0.1"), None);
        assert_eq!(guest_address("quiet"), None);
    }

    /// One environment word, whole: the C init passes it on as it is.
    #[test]
    fn the_pvm_tunables_are_one_word() {
        assert!(PVM_GLIBC_TUNABLES.starts_with("GLIBC_TUNABLES=glibc.cpu.hwcaps="));
        assert!(!PVM_GLIBC_TUNABLES.contains(char::is_whitespace));
    }

    /// glibc, as the guest gets it (linked in from this host's libc), must pick no AVX code
    /// under our tunables: the preference its memcpy goes by included. The host's loader
    /// is the same glibc and can say what it would pick.
    #[test]
    fn the_pvm_tunables_leave_glibc_no_avx() {
        let loader = "/lib64/ld-linux-x86-64.so.2";
        let tunables = PVM_GLIBC_TUNABLES.strip_prefix("GLIBC_TUNABLES=").unwrap();
        let out = std::process::Command::new(loader)
            .arg("--list-diagnostics")
            .env("GLIBC_TUNABLES", tunables)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let preferred = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("x86.cpu_features.preferred.{name}=")))
                .map(str::to_string)
        };
        assert_eq!(
            preferred("AVX_Fast_Unaligned_Load").as_deref(),
            Some("0x0"),
            "{text}"
        );
    }
}
