//! Per-vCPU CPUID from KVM_GET_SUPPORTED_CPUID: topology and APIC ids, hypervisor bit, PV leaves,
//! and the TSC frequency.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_TSC: u32 = 0x15;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const EBX_APIC_ID_SHIFT: u32 = 24;
const EBX_LOGICAL_COUNT_SHIFT: u32 = 16;
/// KVM's local APIC timer runs at 1 GHz (one bus cycle per ns) unless a VMM changes it, which
/// we do not; the guest takes the CPUID crystal as its APIC timer clock.
const CRYSTAL_HZ: u32 = 1_000_000_000;

/// CPUID leaf 0x15 (eax denominator, ebx numerator, ecx crystal Hz) for a TSC of `tsc_khz`.
///
/// With it the guest knows its TSC and APIC timer rates and skips calibrating them against
/// the PIT and jiffies (on kvm-pvm about 0.4 s of emulated busy loops, and the calibration
/// fails there, which leaves the guest on the jiffies clocksource). Linux computes
/// `crystal_khz * numerator / denominator` in 32 bits, so the numerator stays below
/// 2^32 / 1e6; the best such fraction gives the guest its TSC rate within about 2 ppm.
fn tsc_leaf(tsc_khz: u32) -> (u32, u32, u32) {
    let crystal_khz = u64::from(CRYSTAL_HZ / 1000);
    let max_num = u32::MAX as u64 / crystal_khz;
    let tsc = u64::from(tsc_khz);
    let (mut best, mut best_err) = ((1, 1), u64::MAX);
    for den in 1..=max_num {
        let num = (tsc * den + crystal_khz / 2) / crystal_khz;
        if num == 0 || num > max_num {
            continue;
        }
        // What the guest will compute, truncating as it does.
        let err = tsc.abs_diff(crystal_khz * num / den);
        if err < best_err {
            (best, best_err) = ((den, num), err);
        }
    }
    (best.0 as u32, best.1 as u32, CRYSTAL_HZ)
}

/// Bits needed to number `n` items (ceil(log2 n)).
fn width(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts one entry for vCPU `id` of `count` (one socket, one thread per core).
pub fn filter_entry(
    e: &mut kvm_cpuid_entry2,
    id: u32,
    count: u32,
    pvm: bool,
    tsc_khz: Option<u32>,
) {
    match e.function {
        LEAF_FEATURES => {
            e.ebx = (e.ebx & 0x0000_ffff)
                | (id << EBX_APIC_ID_SHIFT)
                | ((count & 0xff) << EBX_LOGICAL_COUNT_SHIFT);
            e.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE => {
            // EAX[31:26] = cores per package - 1; EAX[25:14] = threads sharing this cache - 1.
            let cache_level = (e.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 { count - 1 } else { 0 };
            e.eax = (e.eax & 0x0000_3fff) | (sharing << 14) | ((count - 1) << 26);
        }
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
            e.edx = id; // x2APIC id
            match e.index {
                0 => {
                    // SMT level: one thread per core.
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = 1 << 8;
                }
                1 => {
                    // Core level: all vCPUs in one package.
                    e.eax = width(count);
                    e.ebx = count;
                    e.ecx = 1 | (2 << 8);
                }
                n => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = n;
                }
            }
        }
        // Only where KVM leaves it empty (as it does): a host-reported ratio is kept.
        LEAF_TSC if e.ebx == 0 || e.eax == 0 => {
            if let Some(khz) = tsc_khz.filter(|&k| k > 0) {
                (e.eax, e.ebx, e.ecx) = tsc_leaf(khz);
            }
        }
        // PVM needs `nopv`: advertise no KVM paravirt features so nothing hypercalls.
        LEAF_KVM_FEATURES if pvm => {
            e.eax = 0;
            e.edx = 0;
        }
        _ => {}
    }
}

/// Returns the CPUID for vCPU `id`; `tsc_khz` is the vCPU's TSC rate (KVM_GET_TSC_KHZ).
pub fn vcpu_cpuid(
    supported: &CpuId,
    id: u32,
    count: u32,
    pvm: bool,
    tsc_khz: Option<u32>,
) -> CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        filter_entry(e, id, count, pvm, tsc_khz);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0000_0800,
            eax: 0x1234_5678,
            ..Default::default()
        }
    }

    fn supported() -> CpuId {
        CpuId::from_entries(&[
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0x4000_0001, 0),
        ])
        .unwrap()
    }

    #[test]
    fn apic_ids_per_vcpu() {
        let s = supported();
        for id in 0..4 {
            let c = vcpu_cpuid(&s, id, 4, false, None);
            let l1 = c.as_slice()[0];
            assert_eq!(l1.ebx >> 24, id);
            assert_eq!((l1.ebx >> 16) & 0xff, 4);
            assert_eq!(l1.ebx & 0xffff, 0x0800, "clflush size kept");
            assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
            assert_ne!(l1.edx & EDX_HTT, 0);
            let t0 = c.as_slice()[1];
            let t1 = c.as_slice()[2];
            let t2 = c.as_slice()[3];
            assert_eq!((t0.eax, t0.ebx, t0.ecx, t0.edx), (0, 1, 0x100, id));
            assert_eq!((t1.eax, t1.ebx, t1.ecx, t1.edx), (2, 4, 0x201, id));
            assert_eq!((t2.eax, t2.ebx, t2.ecx), (0, 0, 2));
        }
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let c = vcpu_cpuid(&supported(), 0, 1, false, None);
        assert_eq!(c.as_slice()[0].edx & EDX_HTT, 0);
        assert_eq!(c.as_slice()[2].eax, 0);
    }

    #[test]
    fn pvm_hides_kvm_pv_features() {
        let mut s = supported();
        s.as_mut_slice()[4].eax = 0xffff;
        assert_eq!(vcpu_cpuid(&s, 0, 1, true, None).as_slice()[4].eax, 0);
        assert_eq!(vcpu_cpuid(&s, 0, 1, false, None).as_slice()[4].eax, 0xffff);
    }

    #[test]
    fn tsc_leaf_gives_the_rate_in_linux_arithmetic() {
        for khz in [
            2_596_130u32,
            1_000_000,
            3_000_000,
            2_100_003,
            4_200_000,
            800_123,
        ] {
            let (den, num, hz) = tsc_leaf(khz);
            let crystal_khz = hz / 1000;
            // native_calibrate_tsc(): unsigned int throughout.
            let got = crystal_khz
                .checked_mul(num)
                .expect("32-bit overflow in the guest")
                / den;
            let ppm = (f64::from(got) - f64::from(khz)).abs() / f64::from(khz) * 1e6;
            assert!(
                ppm < 2.0,
                "{khz} kHz -> {num}/{den} -> {got} kHz ({ppm} ppm)"
            );
            assert_eq!(
                crystal_khz * 1000 / 100,
                10_000_000,
                "APIC timer period per jiffy"
            );
        }
    }

    #[test]
    fn tsc_leaf_filled_only_when_empty() {
        let mut empty = entry(LEAF_TSC, 0);
        (empty.eax, empty.ebx) = (0, 0);
        filter_entry(&mut empty, 0, 1, true, Some(2_596_130));
        assert_eq!(empty.ecx, CRYSTAL_HZ);
        assert!(empty.eax > 0 && empty.ebx > 0);
        let mut host = entry(LEAF_TSC, 0);
        (host.eax, host.ebx, host.ecx) = (2, 216, 0);
        filter_entry(&mut host, 0, 1, true, Some(2_596_130));
        assert_eq!((host.eax, host.ebx, host.ecx), (2, 216, 0));
        let mut unknown = entry(LEAF_TSC, 0);
        (unknown.eax, unknown.ebx) = (0, 0);
        filter_entry(&mut unknown, 0, 1, true, None);
        assert_eq!((unknown.eax, unknown.ebx), (0, 0));
    }

    #[test]
    fn widths() {
        assert_eq!(
            (width(1), width(2), width(3), width(4), width(32)),
            (0, 1, 2, 2, 5)
        );
    }
}
