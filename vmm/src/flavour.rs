//! Which KVM this host has, and what each flavour needs from us.

use std::path::Path;

/// The kind of KVM behind /dev/kvm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// kvm-intel / kvm-amd: hardware virtualization.
    Hardware,
    /// kvm-pvm: guest CPL0 is emulated; the guest needs the compat command line.
    Pvm,
    /// /dev/kvm missing or not openable.
    None,
}

/// Detects the KVM flavour of this host.
pub fn kvm_flavour() -> Flavour {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Flavour::None;
    }
    let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    if Path::new("/sys/module/kvm_pvm").exists() || modules_has_pvm(&modules) {
        Flavour::Pvm
    } else {
        Flavour::Hardware
    }
}

fn modules_has_pvm(proc_modules: &str) -> bool {
    proc_modules
        .lines()
        .any(|l| l.split_whitespace().next() == Some("kvm_pvm"))
}

/// Command line a PVM guest needs: keeps the kernel off instructions the
/// PVM emulator lacks (xsave, popcnt, cmpxchg16b, smap/clac, pku) and off KVM PV hypercalls.
/// `erms,fsrm,rep_good` only speed it up: the emulator runs `rep movsb`/`stosb` a byte per
/// step, so the kernel's plain `mov` loops copy faster (clearcpuid is read once: one list).
pub const PVM_COMPAT_CMDLINE: &str =
    "noxsave clearcpuid=popcnt,cx16,smap,smep,pku,umip,erms,fsrm,rep_good nopku nopv";

/// Boot-time switches for PVM, where every kernel instruction is emulated (each measured on
/// the guest kernel): no rewrite of ~4000 `lock` prefixes on a 1-vCPU guest, no page-table
/// split for read-only kernel data, per-cpu areas from 4K pages instead of a zeroed 2 MiB
/// block per CPU, no IO-APIC timer self-test (a delay loop).
pub const PVM_FAST_BOOT_CMDLINE: &str = "noreplace-smp rodata=off percpu_alloc=page no_timer_check";

/// Defaults for a PVM guest that the user's command line may override (same key wins): the
/// jiffies clocksource, because every TSC read in the emulated kernel is expensive there
/// (kernel work of a disk read ran 1.5x faster per instruction without it; see
/// vmm/README.md). Time in the guest then advances by ticks (10 ms at HZ=100).
pub const PVM_DEFAULT_ARGS: &[&str] = &["clocksource=refined-jiffies"];

/// Switch that turns on the guest-kernel patches for PVM (skip the int3
/// self-test and fwait, run syscalls from the LSTAR page fault); named in guest-kernel/README.md.
pub const PVM_GUEST_PATCH_SWITCH: &str = "ltv_pvm_compat";

/// What the builder appends to the command line on a PVM host (the patch switch goes first).
pub fn pvm_compat_cmdline() -> String {
    format!("{PVM_COMPAT_CMDLINE} {PVM_FAST_BOOT_CMDLINE}")
}

/// vCPU limit for a flavour, with the reason when it is lower than the config allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuLimit {
    pub max: u32,
    pub reason: Option<&'static str>,
}

/// How many vCPUs a guest may have on this flavour.
///
/// On PVM the guest kernel is emulated instruction by instruction, so each vCPU needs a host
/// CPU of its own: more vCPUs than host CPUs starve each other into RCU stalls. 2 vCPUs on
/// this 2-CPU host boot fine, just 2-4x slower than 1 vCPU.
pub fn max_vcpus_for(flavour: Flavour) -> VcpuLimit {
    match flavour {
        Flavour::Pvm => {
            let host = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
            VcpuLimit {
                max: host.clamp(1, crate::config::MAX_VCPUS),
                reason: Some(PVM_SMP_REASON),
            }
        }
        Flavour::Hardware => VcpuLimit {
            max: crate::config::MAX_VCPUS,
            reason: None,
        },
        Flavour::None => VcpuLimit {
            max: 0,
            reason: Some("/dev/kvm is missing or cannot be opened"),
        },
    }
}

/// Why PVM guests are held to the host's CPU count.
pub const PVM_SMP_REASON: &str = "kvm-pvm emulates guest kernel code, so each vCPU needs its own \
     host CPU (more vCPUs than host CPUs stall the guest; SMP boots are 2-4x slower than 1 vCPU)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_modules_parsing() {
        assert!(modules_has_pvm(
            "kvm_pvm 123 0 - Live 0x0\nkvm 1 1 kvm_pvm, Live 0x0\n"
        ));
        assert!(!modules_has_pvm(
            "kvm_intel 1 0 - Live 0x0\nkvm 1 1 kvm_intel, Live 0x0\n"
        ));
    }

    #[test]
    fn limits() {
        assert_eq!(max_vcpus_for(Flavour::Hardware).max, 32);
        assert!(max_vcpus_for(Flavour::Hardware).reason.is_none());
        let pvm = max_vcpus_for(Flavour::Pvm);
        assert!(pvm.max >= 1 && pvm.reason.is_some());
        assert_eq!(max_vcpus_for(Flavour::None).max, 0);
        assert!(pvm_compat_cmdline().starts_with(PVM_COMPAT_CMDLINE));
    }
}
