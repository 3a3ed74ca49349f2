//! Lightervisor microVM monitor: one process per microVM, built on the rust-vmm crates.
//!
//! Entry point: [`vmm_main`] (`ltv vmm --config FILE`). Library API: [`VmConfig`] →
//! [`VmConfig::validate`] → [`builder::build_microvm`] → [`vmm::Vmm`].

pub mod arch;
pub mod boot;
pub mod builder;
pub mod config;
pub mod control;
pub mod devices;
pub mod flavour;
pub mod vmm;
pub mod vstate;

use std::path::Path;
use std::sync::mpsc::Sender;

pub use config::{BootProtocol, ConfigError, ValidatedConfig, VmConfig};
pub use flavour::{
    kvm_flavour, max_vcpus_for, pvm_compat_cmdline, Flavour, VcpuLimit, PVM_COMPAT_CMDLINE,
};

/// Guest powered off / rebooted, or `stop` on the control socket.
pub const EXIT_OK: i32 = 0;
/// Guest or internal error (KVM internal error, kernel panic, host failure).
pub const EXIT_ERROR: i32 = 1;
/// Bad config.
pub const EXIT_BAD_CONFIG: i32 = 2;

/// What devices, vCPU threads and the control socket tell the VMM loop.
#[derive(Debug)]
pub enum VmmEvent {
    /// Guest wrote 0xFE to the i8042 command port (`reboot=k`).
    GuestReset,
    /// The guest's /init printed `LTV-READY`.
    GuestReady,
    /// Kernel printed its halt / power-down line (no ACPI, so this is how poweroff looks).
    GuestHalted,
    /// Kernel printed a panic line.
    GuestPanic(String),
    /// A vCPU thread left its run loop.
    VcpuStopped(u32, vstate::vcpu::VcpuStop),
    /// A control socket request and where to send the JSON answer.
    Control(control::ControlRequest, Sender<String>),
}

/// Runs one microVM from a JSON config file; returns the process exit code
/// (0 clean stop, 1 guest/internal error, 2 bad config). Never panics on bad input.
pub fn vmm_main(config_path: &Path) -> i32 {
    let started = std::time::Instant::now();
    let term = match TermSignals::block() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ltv-vmm: blocking SIGTERM/SIGINT: {e}");
            return EXIT_ERROR;
        }
    };
    let cfg = match VmConfig::from_file(config_path).and_then(VmConfig::validate) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ltv-vmm: bad config {}: {e}", config_path.display());
            return EXIT_BAD_CONFIG;
        }
    };
    let flavour = kvm_flavour();
    let vm = match builder::build_microvm(&cfg, flavour) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("ltv-vmm: cannot build microVM: {e}");
            return if e.is_config_error() {
                EXIT_BAD_CONFIG
            } else {
                EXIT_ERROR
            };
        }
    };
    if std::env::var_os("LTV_VMM_TIMING").is_some() {
        eprintln!(
            "ltv-vmm: timing: built in {:.1} ms wall, {:.1} ms CPU before first KVM_RUN",
            started.elapsed().as_secs_f64() * 1e3,
            process_cpu_ms()
        );
    }
    eprintln!(
        "ltv-vmm: {:?} KVM, {} boot, {} vCPU(s), {} MiB, cmdline: {}",
        vm.flavour,
        if vm.pvh { "PVH" } else { "Linux 64-bit" },
        cfg.config.vcpus,
        cfg.config.memory_mib,
        vm.cmdline
    );
    if vm.flavour == Flavour::Pvm
        && vm
            .cmdline
            .split_whitespace()
            .any(|a| a.starts_with("reboot=t"))
    {
        eprintln!(
            "ltv-vmm: warning: reboot=t on kvm-pvm ends in a KVM internal error (the triple \
             fault goes through int3, which PVM cannot emulate); use reboot=k"
        );
    }
    term.forward_to(vm.events_tx.clone());
    let _raw = cfg.config.console_stdin.then(RawTerminal::enter).flatten();
    match vmm::Vmm::start(vm) {
        Ok(v) => v.run(),
        Err(e) => {
            eprintln!("ltv-vmm: cannot start vCPUs: {e}");
            EXIT_ERROR
        }
    }
}

/// Stdin in raw mode while the guest owns the console; restored on drop.
struct RawTerminal(libc::termios);

impl RawTerminal {
    fn enter() -> Option<Self> {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a termios we own.
        unsafe {
            if libc::isatty(0) != 1 {
                return None;
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            // Keep output post-processing so our own stderr lines still start at column 0.
            t.c_oflag = saved.c_oflag;
            libc::tcsetattr(0, libc::TCSANOW, &t);
            Some(RawTerminal(saved))
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the attributes saved in `enter`.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.0);
        }
    }
}

fn process_cpu_ms() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// SIGTERM/SIGINT/SIGHUP become a `stop` request: blocked in every thread, taken by sigwait.
struct TermSignals(libc::sigset_t);

impl TermSignals {
    /// Blocks the signals in this thread and every thread it spawns from now on.
    fn block() -> std::io::Result<Self> {
        // SAFETY: the sigset is initialised by sigemptyset before use.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::sigaddset(&mut set, s);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
            Ok(TermSignals(set))
        }
    }

    fn forward_to(self, events: Sender<VmmEvent>) {
        let set = self.0;
        let _ = std::thread::Builder::new()
            .name("ltv-signals".into())
            .spawn(move || loop {
                let mut sig = 0;
                // SAFETY: `set` is a valid, initialised sigset.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    return;
                }
                eprintln!("ltv-vmm: got signal {sig}, stopping the microVM");
                let (tx, _rx) = std::sync::mpsc::channel();
                if events
                    .send(VmmEvent::Control(control::ControlRequest::Stop, tx))
                    .is_err()
                {
                    return;
                }
            });
    }
}
