//! vCPUs: boot-time register state, and the KVM_RUN loop that runs on each vCPU's own thread.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{
    CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;

use super::vm::Vm;
use crate::arch::{msr, regs};
use crate::devices::bus::Bus;
use crate::VmmEvent;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU {0}: {1}")]
    Create(u32, kvm_ioctls::Error),
    #[error("vCPU {0}: {1} failed: {2}")]
    Setup(u32, &'static str, kvm_ioctls::Error),
    #[error("vCPU {0}: boot tables: {1}")]
    Regs(u32, regs::RegsError),
    #[error("spawning vCPU thread: {0}")]
    Spawn(std::io::Error),
}

/// Why a vCPU stopped running the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// KVM_EXIT_SHUTDOWN: triple fault (what `reboot=t` does).
    TripleFault,
    /// KVM_EXIT_HLT (only seen without an in-kernel LAPIC): the guest halted for good.
    Halt,
    /// KVM_EXIT_SYSTEM_EVENT with this type: reset/shutdown are clean, crash is not.
    SystemEvent(u32),
    /// KVM_EXIT_INTERNAL_ERROR or another exit we cannot continue from: a diagnosis.
    Error(String),
}

impl VcpuStop {
    /// True when the guest asked to stop, false when it failed.
    pub fn is_clean(&self) -> bool {
        match self {
            VcpuStop::TripleFault | VcpuStop::Halt => true,
            VcpuStop::SystemEvent(t) => {
                *t == KVM_SYSTEM_EVENT_SHUTDOWN || *t == KVM_SYSTEM_EVENT_RESET
            }
            VcpuStop::Error(_) => false,
        }
    }
}

/// What the VMM wants the vCPUs to do; they check it around every KVM_RUN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    Stopping,
}

/// Shared run state plus a count of vCPUs parked in `Paused`, so pause can be acknowledged.
pub struct RunControl {
    state: Mutex<(RunState, u32)>,
    cond: Condvar,
}

impl Default for RunControl {
    fn default() -> Self {
        Self::new()
    }
}

impl RunControl {
    pub fn new() -> Self {
        RunControl {
            state: Mutex::new((RunState::Running, 0)),
            cond: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (RunState, u32)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> RunState {
        self.lock().0
    }

    pub fn set(&self, s: RunState) {
        let mut g = self.lock();
        if g.0 != RunState::Stopping {
            g.0 = s;
        }
        self.cond.notify_all();
    }

    /// Blocks until `parked` vCPUs are parked, or the state leaves Paused, or the timeout passes.
    pub fn wait_parked(&self, parked: u32, timeout: std::time::Duration) -> bool {
        let g = self.lock();
        let (g, _) = self
            .cond
            .wait_timeout_while(g, timeout, |s| s.0 == RunState::Paused && s.1 < parked)
            .unwrap_or_else(|p| p.into_inner());
        g.1 >= parked
    }

    /// Parks while Paused; returns false when the vCPU should exit.
    fn wait_runnable(&self) -> bool {
        let mut g = self.lock();
        if g.0 == RunState::Paused {
            g.1 += 1;
            self.cond.notify_all();
            while g.0 == RunState::Paused {
                g = self.cond.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            g.1 -= 1;
        }
        g.0 == RunState::Running
    }
}

/// Set to print each vCPU's registers when the VMM stops it (where was a hung guest?).
pub const DEBUG_ENV: &str = "LTV_VMM_DEBUG";

/// Signal used to kick a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int) {}

/// Installs the no-op kick handler (no SA_RESTART, so KVM_RUN returns EINTR).
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler pointer is a valid argument.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = noop_handler as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

pub struct Vcpu {
    id: u32,
    fd: VcpuFd,
}

impl Vcpu {
    pub fn new(vm: &Vm, id: u32) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(|e| VcpuError::Create(id, e))?;
        Ok(Vcpu { id, fd })
    }

    /// The vCPU's TSC rate, if KVM can tell (KVM_CAP_GET_TSC_KHZ).
    pub fn tsc_khz(&self) -> Option<u32> {
        self.fd.get_tsc_khz().ok().filter(|&k| k > 0)
    }

    /// Sets CPUID, MSRs, FPU, LAPIC LINT pins and the entry state for the chosen protocol.
    pub fn configure(
        &self,
        mem: &GuestMemoryMmap,
        cpuid: &CpuId,
        entry: u64,
        pvh: bool,
    ) -> Result<(), VcpuError> {
        let id = self.id;
        let fail = |what| move |e| VcpuError::Setup(id, what, e);
        self.fd.set_cpuid2(cpuid).map_err(fail("KVM_SET_CPUID2"))?;
        let msrs = msr::boot_msrs();
        let n = self.fd.set_msrs(&msrs).map_err(fail("KVM_SET_MSRS"))?;
        if n != msrs.as_slice().len() {
            // Some KVMs (PVM) refuse a few boot MSRs; the kernel copes, so only report it.
            let failed = msrs.as_slice()[n].index;
            eprintln!(
                "ltv-vmm: vCPU {id}: KVM took {n} of {} boot MSRs (stopped at {failed:#x})",
                msrs.as_slice().len()
            );
        }
        let mut sregs = self.fd.get_sregs().map_err(fail("KVM_GET_SREGS"))?;
        if pvh {
            regs::setup_pvh_mode(mem, &mut sregs).map_err(|e| VcpuError::Regs(id, e))?;
        } else {
            regs::setup_long_mode(mem, &mut sregs).map_err(|e| VcpuError::Regs(id, e))?;
        }
        self.fd.set_sregs(&sregs).map_err(fail("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&regs::boot_regs(entry, pvh))
            .map_err(fail("KVM_SET_REGS"))?;
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(fail("KVM_SET_FPU"))?;
        self.set_lints().map_err(fail("KVM_SET_LAPIC"))?;
        Ok(())
    }

    /// LINT0 = ExtINT (the PIC), LINT1 = NMI, as a BIOS would leave them.
    fn set_lints(&self) -> Result<(), kvm_ioctls::Error> {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const MODE_EXTINT: u32 = 0x7;
        const MODE_NMI: u32 = 0x4;
        let mut lapic = self.fd.get_lapic()?;
        for (reg, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
            let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
            let v = u32::from_le_bytes(bytes);
            let v = (v & !0x700) | (mode << 8);
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + i] = *b as _;
            }
        }
        self.fd.set_lapic(&lapic)
    }

    /// Starts the vCPU thread. The thread hands the Vcpu back on join, so the kvm_run
    /// mapping that `kick` writes to outlives every kick.
    pub fn start(
        mut self,
        ctl: Arc<RunControl>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        events: Sender<VmmEvent>,
    ) -> Result<VcpuHandle, VcpuError> {
        let immediate_exit = &mut self.fd.get_kvm_run().immediate_exit as *mut u8 as usize;
        let tid = Arc::new(Mutex::new(None::<libc::pthread_t>));
        let tid2 = tid.clone();
        let ready = Arc::new((Mutex::new(false), Condvar::new()));
        let ready2 = ready.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ltv-vcpu{}", self.id))
            .spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                *tid2.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(unsafe { libc::pthread_self() });
                *ready2.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
                ready2.1.notify_all();
                let stop = self.run_loop(&ctl, &pio, &mmio);
                if let Some(stop) = stop {
                    let _ = events.send(VmmEvent::VcpuStopped(self.id, stop));
                }
                self
            })
            .map_err(VcpuError::Spawn)?;
        let mut r = ready.0.lock().unwrap_or_else(|p| p.into_inner());
        while !*r {
            r = ready.1.wait(r).unwrap_or_else(|p| p.into_inner());
        }
        drop(r);
        let pthread = tid.lock().unwrap_or_else(|p| p.into_inner()).unwrap_or(0);
        Ok(VcpuHandle {
            thread: Some(thread),
            pthread,
            immediate_exit: AtomicU8Ptr(immediate_exit),
        })
    }

    /// Runs until the guest stops (Some) or the VMM asks us to (None).
    fn run_loop(&mut self, ctl: &RunControl, pio: &Bus, mmio: &Bus) -> Option<VcpuStop> {
        loop {
            self.fd.set_kvm_immediate_exit(0);
            if !ctl.wait_runnable() {
                if std::env::var_os(DEBUG_ENV).is_some() {
                    eprintln!(
                        "ltv-vmm: vCPU {} stopped at {}",
                        self.id,
                        self.regs_summary()
                    );
                }
                return None;
            }
            match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoIn(port, data) => pio.read(u64::from(port), data),
                    VcpuExit::IoOut(port, data) => pio.write(u64::from(port), data),
                    VcpuExit::MmioRead(addr, data) => mmio.read(addr, data),
                    VcpuExit::MmioWrite(addr, data) => mmio.write(addr, data),
                    VcpuExit::Hlt => return Some(VcpuStop::Halt),
                    VcpuExit::Shutdown => return Some(VcpuStop::TripleFault),
                    VcpuExit::SystemEvent(t, _) => {
                        if t == KVM_SYSTEM_EVENT_CRASH {
                            return Some(VcpuStop::Error(format!(
                                "vCPU {}: guest crash event",
                                self.id
                            )));
                        }
                        return Some(VcpuStop::SystemEvent(t));
                    }
                    VcpuExit::InternalError => return Some(VcpuStop::Error(self.internal_error())),
                    VcpuExit::FailEntry(reason, cpu) => {
                        return Some(VcpuStop::Error(format!(
                            "vCPU {}: KVM_EXIT_FAIL_ENTRY reason {reason:#x} on host cpu {cpu}; {}",
                            self.id,
                            self.regs_summary()
                        )))
                    }
                    VcpuExit::Intr => {}
                    other => {
                        let what = format!("{other:?}");
                        return Some(VcpuStop::Error(format!(
                            "vCPU {}: unhandled exit {what}; {}",
                            self.id,
                            self.regs_summary()
                        )));
                    }
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    return Some(VcpuStop::Error(format!(
                        "vCPU {}: KVM_RUN failed: {e}",
                        self.id
                    )))
                }
            }
        }
    }

    fn internal_error(&mut self) -> String {
        // SAFETY: on KVM_EXIT_INTERNAL_ERROR the `internal` member of the exit union is the valid one.
        let (sub, data) = unsafe {
            let i = &self.fd.get_kvm_run().__bindgen_anon_1.internal;
            let n = (i.ndata as usize).min(i.data.len());
            (i.suberror, i.data[..n].to_vec())
        };
        let what = match sub {
            1 => "emulation failure (the host KVM could not emulate a guest instruction)",
            2 => "simultaneous exception",
            3 => "delivery event failure",
            4 => "unexpected exit reason",
            _ => "unknown",
        };
        let insn = if sub == 1 {
            emulation_failure_insn(&data)
                .map(|(bytes, name)| {
                    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    let hint = name.map(|n| format!(" = {n}")).unwrap_or_default();
                    format!(", instruction bytes [{}]{hint}", hex.join(" "))
                })
                .unwrap_or_default()
        } else {
            String::new()
        };
        let data: Vec<String> = data.iter().map(|d| format!("{d:#x}")).collect();
        format!(
            "vCPU {}: KVM_EXIT_INTERNAL_ERROR suberror {sub} ({what}){insn}, data [{}]; {}",
            self.id,
            data.join(", "),
            self.regs_summary()
        )
    }

    fn regs_summary(&self) -> String {
        let r = self.fd.get_regs();
        let s = self.fd.get_sregs();
        match (r, s) {
            (Ok(r), Ok(s)) => format!(
                "RIP={:#x} RSP={:#x} RFLAGS={:#x} CS={:#x} CR0={:#x} CR3={:#x} CR4={:#x} EFER={:#x}",
                r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr3, s.cr4, s.efer
            ),
            (Err(e), _) | (_, Err(e)) => format!("registers unavailable: {e}"),
        }
    }

    pub fn id(&self) -> u32 {
        self.id
    }
}

/// Instruction bytes of an emulation failure, and a name for the ones kvm-pvm is known to
/// lack. Layout (kvm_run.emulation_failure): data[0] = flags (bit 0: bytes valid), then
/// insn_size and up to 15 bytes packed little-endian into data[1..3].
pub fn emulation_failure_insn(data: &[u64]) -> Option<(Vec<u8>, Option<&'static str>)> {
    if data.len() < 2 || data[0] & 1 == 0 {
        return None;
    }
    let raw: Vec<u8> = data[1..data.len().min(3)]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let size = usize::from(raw[0]).min(raw.len() - 1);
    let bytes = raw[1..=size].to_vec();
    Some((bytes.clone(), known_unemulated(&bytes)))
}

fn known_unemulated(b: &[u8]) -> Option<&'static str> {
    // Skip legacy/REX prefixes to find the opcode.
    let mut i = 0;
    let mut rex_w = false;
    while let Some(&p) = b.get(i) {
        match p {
            0xf0 | 0xf2 | 0xf3 | 0x66 | 0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65 => i += 1,
            0x40..=0x4f => {
                rex_w = p & 8 != 0;
                i += 1;
            }
            _ => break,
        }
    }
    let op = &b[i.min(b.len())..];
    let modrm_reg = |m: u8| (m >> 3) & 7;
    match op {
        [0xcc, ..] => Some("int3 (alternatives self-test without ltv_pvm_compat, or reboot=t)"),
        [0x9b, ..] => Some("fwait (fpu__drop without ltv_pvm_compat)"),
        [0x0f, 0x01, 0xca, ..] => Some("clac (needs clearcpuid=smap)"),
        [0x0f, 0x01, 0xcb, ..] => Some("stac (needs clearcpuid=smap)"),
        [0x0f, 0xb8, ..] if b[..i].contains(&0xf3) => Some("popcnt (needs clearcpuid=popcnt)"),
        [0x0f, 0xc7, m, ..] if modrm_reg(*m) == 1 && rex_w => {
            Some("cmpxchg16b (needs clearcpuid=cx16)")
        }
        [0x0f, 0xae, m, ..] if modrm_reg(*m) == 5 && *m < 0xc0 => Some("xrstor (needs noxsave)"),
        [0x0f, 0xc7, m, ..] if modrm_reg(*m) == 3 => Some("xrstors (needs noxsave)"),
        _ => None,
    }
}

/// Address of a vCPU's kvm_run.immediate_exit byte.
#[derive(Clone, Copy)]
struct AtomicU8Ptr(usize);

/// The VMM's grip on a running vCPU thread.
pub struct VcpuHandle {
    thread: Option<JoinHandle<Vcpu>>,
    pthread: libc::pthread_t,
    immediate_exit: AtomicU8Ptr,
}

impl VcpuHandle {
    /// Makes the vCPU leave KVM_RUN soon: immediate_exit covers a kick that lands just before
    /// KVM_RUN is entered, the signal covers one that is already inside.
    pub fn kick(&self) {
        if self.thread.is_none() {
            return;
        }
        // SAFETY: the kvm_run mapping lives inside the Vcpu, which the thread returns rather
        // than drops, and we only kick before join.
        let flag = unsafe { &*(self.immediate_exit.0 as *const AtomicU8) };
        flag.store(1, Ordering::SeqCst);
        // SAFETY: the thread has not been joined, so its pthread_t is valid.
        unsafe {
            libc::pthread_kill(self.pthread, kick_signal());
        }
    }

    /// Waits for the thread to finish (after a Stopping kick), up to `timeout`.
    pub fn join(&mut self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while let Some(t) = &self.thread {
            if t.is_finished() {
                let _ = self.thread.take().map(|t| t.join());
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            self.kick();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_emulation_failure_bytes() {
        // Seen on kvm-pvm: int3 in the alternatives self-test.
        let data = [0x1, 0x7c83_9090_9090_cc0f, 0x480b_0f02_7401_0424, 0x1000];
        let (bytes, name) = emulation_failure_insn(&data).unwrap();
        assert_eq!(bytes.len(), 15);
        assert_eq!(&bytes[..3], &[0xcc, 0x90, 0x90]);
        assert!(name.unwrap().starts_with("int3"));
        assert!(emulation_failure_insn(&[0x0, 0x1]).is_none());
    }

    #[test]
    fn names_known_instructions() {
        assert!(known_unemulated(&[0x48, 0x0f, 0xc7, 0x0e])
            .unwrap()
            .starts_with("cmpxchg16b"));
        assert!(known_unemulated(&[0xf3, 0x48, 0x0f, 0xb8, 0xc7])
            .unwrap()
            .starts_with("popcnt"));
        assert!(known_unemulated(&[0x0f, 0x01, 0xcb])
            .unwrap()
            .starts_with("stac"));
        assert!(known_unemulated(&[0x48, 0x0f, 0xae, 0x2f])
            .unwrap()
            .starts_with("xrstor"));
        assert!(known_unemulated(&[0x9b]).unwrap().starts_with("fwait"));
        assert_eq!(known_unemulated(&[0x90]), None);
        assert_eq!(known_unemulated(&[]), None);
    }
}
