//! Per-vCPU CPUID from KVM_GET_SUPPORTED_CPUID: topology and APIC ids, hypervisor bit, PV leaves.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const EBX_APIC_ID_SHIFT: u32 = 24;
const EBX_LOGICAL_COUNT_SHIFT: u32 = 16;

/// Bits needed to number `n` items (ceil(log2 n)).
fn width(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts one entry for vCPU `id` of `count` (one socket, one thread per core).
pub fn filter_entry(e: &mut kvm_cpuid_entry2, id: u32, count: u32, pvm: bool) {
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
        // PVM needs `nopv`: advertise no KVM paravirt features so nothing hypercalls.
        LEAF_KVM_FEATURES if pvm => {
            e.eax = 0;
            e.edx = 0;
        }
        _ => {}
    }
}

/// Returns the CPUID for vCPU `id`.
pub fn vcpu_cpuid(supported: &CpuId, id: u32, count: u32, pvm: bool) -> CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        filter_entry(e, id, count, pvm);
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
            let c = vcpu_cpuid(&s, id, 4, false);
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
        let c = vcpu_cpuid(&supported(), 0, 1, false);
        assert_eq!(c.as_slice()[0].edx & EDX_HTT, 0);
        assert_eq!(c.as_slice()[2].eax, 0);
    }

    #[test]
    fn pvm_hides_kvm_pv_features() {
        let mut s = supported();
        s.as_mut_slice()[4].eax = 0xffff;
        assert_eq!(vcpu_cpuid(&s, 0, 1, true).as_slice()[4].eax, 0);
        assert_eq!(vcpu_cpuid(&s, 0, 1, false).as_slice()[4].eax, 0xffff);
    }

    #[test]
    fn widths() {
        assert_eq!(
            (width(1), width(2), width(3), width(4), width(32)),
            (0, 1, 2, 2, 5)
        );
    }
}
