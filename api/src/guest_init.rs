//! The microVM guest's `/init`: the `ltv` binary itself, run by the guest kernel as PID 1.
//!
//! It mounts the API filesystems, configures the NIC the host described on the kernel
//! command line, starts the guest agent (`ltv agent`, the daemon on vsock), and then hands
//! PID 1 to the image's init. Without one it stays PID 1 itself: reaps orphans and powers
//! off on SIGUSR2/SIGTERM. Every system call and fork is slow under kvm-pvm (guest kernel
//! code is emulated), so it does the least it can, with direct libc calls.

use ltv::daemon::agent::PVM_GLIBC_TUNABLES;
use std::ffi::CString;

/// `/init` as PID 1: this is the guest init, not a host command.
pub fn is_guest_init() -> bool {
    // SAFETY: getpid has no preconditions.
    let pid1 = unsafe { libc::getpid() } == 1;
    // Exactly the kernel's `init=/init`, never a container's PID 1: the kernel may pass
    // unknown command-line words as arguments, so those cannot tell them apart; /proc can,
    // as nothing has mounted it yet when the kernel starts /init.
    pid1 && std::env::args_os().next().is_some_and(|a| a == "/init")
        && !std::path::Path::new("/proc/self").exists()
}

/// What the host put on the kernel command line for us.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BootArgs {
    pub hostname: Option<String>,
    /// The image's init; empty: `/sbin/init` if there is one.
    pub init: String,
    /// `address/prefix` for eth0, and the gateway.
    pub ip: Option<(std::net::Ipv4Addr, u8)>,
    pub gateway: Option<std::net::Ipv4Addr>,
    /// `LTV_LOG` for the agent (default `warn`), to debug a guest from the host.
    pub log: Option<String>,
}

pub fn parse_cmdline(cmdline: &str) -> BootArgs {
    let mut args = BootArgs::default();
    for word in cmdline.split_whitespace() {
        if let Some(h) = word.strip_prefix("ltv.hostname=") {
            args.hostname = Some(h.to_string());
        } else if let Some(v) = word.strip_prefix("ltv.init=") {
            args.init = v.to_string();
        } else if let Some(v) = word.strip_prefix("ltv.ip=") {
            args.ip = v
                .split_once('/')
                .and_then(|(a, p)| Some((a.parse().ok()?, p.parse().ok()?)));
        } else if let Some(v) = word.strip_prefix("ltv.gw=") {
            args.gateway = v.parse().ok();
        } else if let Some(v) = word.strip_prefix("ltv.log=") {
            args.log = Some(v.to_string());
        }
    }
    args
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong) {
    let (s, t, f) = (c(source), c(target), c(fstype));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, std::ptr::null()) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            console(&format!("ltv-init: mount {fstype} on {target}: {e}\n"));
        }
    }
}

fn console(msg: &str) {
    // SAFETY: writing a valid buffer to fd 1 (the console, set up below).
    unsafe { libc::write(1, msg.as_ptr().cast(), msg.len()) };
}

const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs the guest init; never returns.
pub fn main() -> ! {
    let nosuid_noexec = libc::MS_NOSUID | libc::MS_NOEXEC;
    mount("proc", "/proc", "proc", nosuid_noexec);
    mount("sysfs", "/sys", "sysfs", nosuid_noexec);
    // devtmpfs must allow device nodes, so no MS_NODEV.
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID);
    // The kernel opened the disk's /dev/console; reopen it on devtmpfs for what we exec.
    let path = c("/dev/console");
    // SAFETY: plain open/dup2 on descriptors we own.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        if fd >= 0 {
            for target in 0..3 {
                libc::dup2(fd, target);
            }
            if fd > 2 {
                libc::close(fd);
            }
        }
    }
    mount("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV);
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid_noexec);
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let args = parse_cmdline(&cmdline);
    if let Some(h) = &args.hostname {
        // SAFETY: a valid buffer and its length.
        unsafe { libc::sethostname(h.as_ptr().cast(), h.len()) };
    }
    if let Some((ip, prefix)) = args.ip {
        if let Err(e) =
            ltv_containers::network::configure_interface("eth0", ip, prefix, args.gateway)
        {
            console(&format!("ltv-init: eth0 {ip}/{prefix}: {e}\n"));
        }
    }
    start_agent(args.log.as_deref().unwrap_or("warn"));
    console("LTV-READY\n");
    let program = match args.init.as_str() {
        "" if std::path::Path::new("/sbin/init").exists() => "/sbin/init".to_string(),
        "" | "none" => minimal_init(),
        p => p.to_string(),
    };
    exec(&program, &[], &[]);
    let e = std::io::Error::last_os_error();
    console(&format!(
        "ltv-init: exec {program}: {e}; staying as a minimal init\n"
    ));
    minimal_init()
}

/// `execve` with our fixed environment plus `env`; returns only on failure.
fn exec(program: &str, extra: &[&str], env: &[&str]) {
    let prog = c(program);
    let owned: Vec<CString> = extra.iter().map(|a| c(a)).collect();
    let argv: Vec<*const libc::c_char> = std::iter::once(prog.as_ptr())
        .chain(owned.iter().map(|a| a.as_ptr()))
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let mut envs: Vec<CString> = [PATH, "HOME=/root", "TERM=linux"]
        .iter()
        .chain(env)
        .map(|e| c(e))
        .collect();
    if ltv::daemon::agent::pvm_guest() {
        envs.push(c(PVM_GLIBC_TUNABLES));
    }
    let envp: Vec<*const libc::c_char> = envs
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    // SAFETY: NULL-terminated argv and envp of valid strings that outlive the call.
    unsafe { libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
}

/// Forks `ltv agent` into its own session; its log goes to /var/log/ltv-agent.log, not the
/// (slow, emulated) serial console.
fn start_agent(log_filter: &str) {
    let log = c("/var/log/ltv-agent.log");
    let filter = format!("LTV_LOG={log_filter}");
    // SAFETY: the child only calls async-signal-safe functions before execve.
    unsafe {
        match libc::fork() {
            0 => {
                libc::setsid();
                // The agent starts ahead of the image's init, whose boot scripts fork
                // (about a second each on kvm-pvm) and would share the vCPU with it; it
                // drops back to the normal priority once it serves (agent::serving).
                libc::setpriority(libc::PRIO_PROCESS, 0, ltv::daemon::agent::STARTUP_NICE);
                let fd = libc::open(
                    log.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
                    0o644,
                );
                if fd >= 0 {
                    libc::dup2(fd, 1);
                    libc::dup2(fd, 2);
                }
                exec(ltv::backend::rootdisk::GUEST_LTV, &["agent"], &[&filter]);
                libc::_exit(127);
            }
            -1 => console(&format!(
                "ltv-init: cannot start the agent: {}\n",
                std::io::Error::last_os_error()
            )),
            _ => {}
        }
    }
}

/// PID 1 without an image init: reaps whatever is orphaned to it, and powers the machine
/// off on SIGUSR2 (busybox's convention, which the agent uses), SIGTERM or SIGINT.
fn minimal_init() -> ! {
    // SAFETY: signal masks and sigwait on sets we initialise; reboot/sync/kill take no
    // pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGCHLD, libc::SIGUSR2, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        loop {
            while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
            let mut sig = 0;
            if libc::sigwait(&set, &mut sig) != 0 || sig == libc::SIGCHLD {
                continue;
            }
            console("ltv-init: powering off\n");
            libc::kill(-1, libc::SIGTERM);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
            while std::time::Instant::now() < deadline
                && libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) >= 0
            {
                libc::usleep(50_000);
            }
            libc::kill(-1, libc::SIGKILL);
            libc::sync();
            libc::reboot(libc::RB_POWER_OFF);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_knobs() {
        let a = parse_cmdline(
            "console=ttyS0 quiet ltv.hostname=vm1 ltv.init=none ltv.ip=10.87.0.9/24 ltv.gw=10.87.0.1 ltv.log=ltv=debug",
        );
        assert_eq!(a.hostname.as_deref(), Some("vm1"));
        assert_eq!(a.init, "none");
        assert_eq!(a.ip, Some(("10.87.0.9".parse().unwrap(), 24)));
        assert_eq!(a.gateway, Some("10.87.0.1".parse().unwrap()));
        assert_eq!(a.log.as_deref(), Some("ltv=debug"));
        assert_eq!(parse_cmdline("quiet ltv.ip=garbage"), BootArgs::default());
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
