//! Initial CPU state for the two boot protocols: segments, GDT, page tables, control registers.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("writing boot tables to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Packs a GDT descriptor (flags in Intel's 0xFxFF layout as Firecracker uses them).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Unpacks a GDT descriptor into the KVM segment form; `index` gives the selector.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry >> 32) & 0xf_0000) as u32 | (entry & 0xffff) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
    }
}

/// GDT for 64-bit Linux boot: null, 64-bit code, data, TSS.
pub const LONG_MODE_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// GDT for PVH: null, flat 32-bit code, data, TSS (PVH enters in 32-bit protected mode).
pub const PVH_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xffff_ffff),
    gdt_entry(0xc093, 0, 0xffff_ffff),
    gdt_entry(0x008b, 0, 0x67),
];

/// Page-table entries identity-mapping the first 1 GiB with 2 MiB pages.
pub fn page_table_entries() -> (u64, u64, Vec<u64>) {
    let pml4 = PDPTE_START | 0x03; // present + writable
    let pdpte = PDE_START | 0x03;
    let pdes = (0..512u64).map(|i| (i << 21) | 0x83).collect(); // + page size
    (pml4, pdpte, pdes)
}

fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let (pml4, pdpte, pdes) = page_table_entries();
    mem.write_obj(pml4, GuestAddress(PML4_START))?;
    mem.write_obj(pdpte, GuestAddress(PDPTE_START))?;
    for (i, pde) in pdes.iter().enumerate() {
        mem.write_obj(*pde, GuestAddress(PDE_START + (i as u64) * 8))?;
    }
    Ok(())
}

fn write_gdt(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), RegsError> {
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + (i as u64) * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    Ok(())
}

fn load_segments(sregs: &mut kvm_sregs, gdt: &[u64; 4]) {
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
}

/// Writes GDT + page tables and sets long mode with paging (64-bit Linux boot protocol).
pub fn setup_long_mode(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    write_gdt(mem, &LONG_MODE_GDT)?;
    write_page_tables(mem)?;
    load_segments(sregs, &LONG_MODE_GDT);
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(())
}

/// Writes the GDT and sets 32-bit protected mode, paging off (PVH entry state).
pub fn setup_pvh_mode(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    write_gdt(mem, &PVH_GDT)?;
    load_segments(sregs, &PVH_GDT);
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    Ok(())
}

/// General registers at the kernel entry.
pub fn boot_regs(entry: u64, pvh: bool) -> kvm_regs {
    let mut r = kvm_regs {
        rflags: 0x2, // bit 1 is reserved-one
        rip: entry,
        ..Default::default()
    };
    if pvh {
        r.rbx = PVH_INFO_START;
    } else {
        r.rsp = BOOT_STACK_POINTER;
        r.rbp = BOOT_STACK_POINTER;
        r.rsi = ZERO_PAGE_START;
    }
    r
}

/// x87 control word and MXCSR at their reset defaults.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let m = mem();
        let mut s = kvm_sregs::default();
        setup_long_mode(&m, &mut s).unwrap();
        assert_eq!(m.read_obj::<u64>(GuestAddress(PML4_START)).unwrap(), 0xa003);
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(PDPTE_START)).unwrap(),
            0xb003
        );
        assert_eq!(m.read_obj::<u64>(GuestAddress(PDE_START)).unwrap(), 0x83);
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(PDE_START + 8)).unwrap(),
            0x20_0083
        );
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(PDE_START + 511 * 8))
                .unwrap(),
            (511 << 21) | 0x83
        );
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cr0 & 0x8000_0001, 0x8000_0001);
        assert_eq!(s.efer & 0x500, 0x500);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.cs.selector, 8);
        assert_eq!(s.ds.selector, 0x10);
        assert_eq!(s.tr.selector, 0x18);
    }

    #[test]
    fn gdt_encoding() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        let seg = segment_from_gdt(gdt_entry(0xc09b, 0, 0xffff_ffff), 1);
        assert_eq!((seg.db, seg.l, seg.g, seg.present), (1, 0, 1, 1));
        assert_eq!(seg.limit, 0xffff_ffff);
    }

    #[test]
    fn pvh_state() {
        let m = mem();
        let mut s = kvm_sregs::default();
        setup_pvh_mode(&m, &mut s).unwrap();
        assert_eq!(s.cr0 & 1, 1);
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.cs.db, 1);
        assert_eq!(boot_regs(0x100_0000, true).rbx, PVH_INFO_START);
        assert_eq!(boot_regs(0x100_0000, false).rsi, ZERO_PAGE_START);
    }
}
