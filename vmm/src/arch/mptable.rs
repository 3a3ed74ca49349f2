//! Intel MultiProcessor table (spec 1.4) at the EBDA, so Linux finds every vCPU and the IOAPIC
//! without ACPI. Linux scans 639 KiB..640 KiB for the "_MP_" floating pointer on both boot paths.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR};

pub const MPTABLE_START: u64 = EBDA_START;
const MPTABLE_LIMIT: usize = 1024; // EBDA_START..640 KiB
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const IRQ_MAX: u8 = 23;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
const BUS_ISA: u8 = 0;
const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("MP table for {0} vCPUs does not fit below 640 KiB")]
    TooManyCpus(u32),
    #[error("writing MP table: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// IOAPIC id: one past the last CPU's APIC id.
pub fn ioapic_id(num_cpus: u32) -> u8 {
    num_cpus as u8 + 1
}

/// Builds the floating pointer + config table as bytes for a table placed at `base`.
pub fn build(num_cpus: u32, base: u64) -> Result<Vec<u8>, MptableError> {
    let ioapic = ioapic_id(num_cpus);
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&(CPU_STEPPING).to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, BUS_ISA]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..=IRQ_MAX {
        // type, irqtype, irqflag(u16), srcbus, srcbusirq, dstapic, dstirq
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, BUS_ISA, irq, ioapic, irq]);
        count += 1;
    }
    // LINT0 = ExtINT on the BSP, LINT1 = NMI on every LAPIC.
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, BUS_ISA, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, BUS_ISA, 0, 0xff, 1]);
    count += 2;

    let table_len = HEADER_LEN + entries.len();
    if FLOATING_LEN + table_len > MPTABLE_LIMIT {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let table_addr = base + FLOATING_LEN as u64;

    let mut fp = Vec::with_capacity(FLOATING_LEN);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length (16-byte units), spec 1.4, checksum
    fp[10] = checksum(&fp);

    let mut hdr = Vec::with_capacity(HEADER_LEN);
    hdr.extend_from_slice(b"PCMP");
    hdr.extend_from_slice(&(table_len as u16).to_le_bytes());
    hdr.extend_from_slice(&[4, 0]); // spec rev, checksum
    hdr.extend_from_slice(b"LTVMMP  ");
    hdr.extend_from_slice(b"000000000000");
    hdr.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    hdr.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    hdr.extend_from_slice(&count.to_le_bytes());
    hdr.extend_from_slice(&APIC_ADDR.to_le_bytes());
    hdr.extend_from_slice(&[0u8; 4]); // extended length, checksum, reserved
    let mut table = hdr;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = fp;
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `num_cpus` vCPUs at [`MPTABLE_START`].
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u32) -> Result<(), MptableError> {
    let bytes = build(num_cpus, MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_contents() {
        for cpus in [1u32, 2, 4, 32] {
            let t = build(cpus, MPTABLE_START).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, MPTABLE_START + 16);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "config table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]) as u32;
            assert_eq!(count, cpus + 1 + 1 + 24 + 2);
            assert_eq!(
                u32::from_le_bytes(table[36..40].try_into().unwrap()),
                APIC_ADDR
            );

            // Walk the entries: processors first, then bus, IOAPIC, interrupts.
            let mut off = 44;
            let mut procs = vec![];
            let mut ioapics = vec![];
            let mut intsrc = 0;
            while off < len {
                let size = if table[off] == MP_PROCESSOR { 20 } else { 8 };
                match table[off] {
                    MP_PROCESSOR => procs.push((table[off + 1], table[off + 3])),
                    MP_IOAPIC => ioapics.push((
                        table[off + 1],
                        u32::from_le_bytes(table[off + 4..off + 8].try_into().unwrap()),
                    )),
                    MP_INTSRC => intsrc += 1,
                    _ => {}
                }
                off += size;
            }
            assert_eq!(off, len);
            assert_eq!(procs.len() as u32, cpus);
            assert_eq!(procs[0], (0, CPU_ENABLED | CPU_BOOTPROCESSOR));
            for (i, p) in procs.iter().enumerate().skip(1) {
                assert_eq!(*p, (i as u8, CPU_ENABLED));
            }
            assert_eq!(ioapics, vec![(cpus as u8 + 1, IOAPIC_ADDR)]);
            assert_eq!(intsrc, 24);
            assert!(t.len() <= MPTABLE_LIMIT);
        }
    }

    #[test]
    fn written_to_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_mptable(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
