//! The microVM guest's `/init`: the `ltv` binary itself, run by the guest kernel as PID 1.
//!
//! Every system call and every fork is slow under kvm-pvm (guest kernel code is emulated),
//! so this does the least it can with direct libc calls, and never forks.

use std::ffi::CString;

/// `/init` as PID 1: this is the guest init, not a host command.
pub fn is_guest_init() -> bool {
    // SAFETY: getpid has no preconditions.
    let pid1 = unsafe { libc::getpid() } == 1;
    // Exactly the kernel's `/init` (the initramfs entry), never a container's PID 1: the
    // kernel may pass unknown command-line words as arguments, so those cannot tell them
    // apart; /proc can, as nothing has mounted it yet when the kernel starts /init.
    pid1 && std::env::args_os().next().is_some_and(|a| a == "/init")
        && !std::path::Path::new("/proc/self").exists()
}

/// What `ltv.init=` on the kernel command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Then {
    PowerOff,
    Exec(String),
}

/// `(hostname, then)` from /proc/cmdline.
pub fn parse_cmdline(cmdline: &str) -> (Option<String>, Then) {
    let mut hostname = None;
    let mut then = None;
    for word in cmdline.split_whitespace() {
        if let Some(h) = word.strip_prefix("ltv.hostname=") {
            hostname = Some(h.to_string());
        } else if let Some(v) = word.strip_prefix("ltv.init=") {
            then = Some(if v == "poweroff" {
                Then::PowerOff
            } else {
                Then::Exec(v.to_string())
            });
        }
    }
    (hostname, then.unwrap_or(Then::Exec(String::new())))
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn mount(source: &str, target: &str, fstype: &str) {
    let (s, t, f) = (c(source), c(target), c(fstype));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            f.as_ptr(),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        console(&format!("ltv-init: mount {fstype} on {target}: {e}\n"));
    }
}

fn console(msg: &str) {
    // SAFETY: writing a valid buffer to fd 1 (the console, set up below).
    unsafe { libc::write(1, msg.as_ptr().cast(), msg.len()) };
}

/// Runs the guest init; never returns.
pub fn main() -> ! {
    // devtmpfs must allow device nodes, so it gets no MS_NODEV either.
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    let (dev, t, f) = (c("devtmpfs"), c("/dev"), c("devtmpfs"));
    // SAFETY: valid NUL-terminated strings.
    unsafe {
        libc::mount(
            dev.as_ptr(),
            t.as_ptr(),
            f.as_ptr(),
            libc::MS_NOSUID,
            std::ptr::null(),
        )
    };
    // The kernel opened the initramfs' /dev/console; reopen it on devtmpfs for what we exec.
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
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2");
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (hostname, then) = parse_cmdline(&cmdline);
    if let Some(h) = hostname {
        // SAFETY: a valid buffer and its length.
        unsafe { libc::sethostname(h.as_ptr().cast(), h.len()) };
    }
    console("LTV-READY\n");
    let program = match then {
        Then::PowerOff => {
            // SAFETY: sync and reboot take no pointers. RB_AUTOBOOT with the VMM's
            // `reboot=k` resets through the i8042, which the VMM turns into exit 0
            // (there is no ACPI power-off device).
            unsafe {
                libc::sync();
                libc::reboot(libc::RB_AUTOBOOT);
            }
            halt()
        }
        Then::Exec(p) if !p.is_empty() => p,
        Then::Exec(_) => {
            if std::path::Path::new("/sbin/init").exists() {
                "/sbin/init".into()
            } else {
                "/bin/sh".into()
            }
        }
    };
    let prog = c(&program);
    let argv: [*const libc::c_char; 2] = [prog.as_ptr(), std::ptr::null()];
    let envs = [
        c("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        c("HOME=/root"),
        c("TERM=linux"),
    ];
    let envp: Vec<*const libc::c_char> = envs
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    // SAFETY: NULL-terminated argv and envp of valid strings that outlive the call.
    unsafe { libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    let e = std::io::Error::last_os_error();
    console(&format!("ltv-init: exec {program}: {e}\n"));
    halt()
}

/// PID 1 must not exit (the kernel would panic): wait here.
fn halt() -> ! {
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_knobs() {
        let (h, t) = parse_cmdline("console=ttyS0 quiet ltv.hostname=vm1 ltv.init=poweroff nopv");
        assert_eq!((h.as_deref(), t), (Some("vm1"), Then::PowerOff));
        let (h, t) = parse_cmdline("ltv.init=/sbin/init");
        assert_eq!((h, t), (None, Then::Exec("/sbin/init".into())));
        assert_eq!(parse_cmdline("quiet").1, Then::Exec(String::new()));
    }
}
