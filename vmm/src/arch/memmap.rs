//! Guest RAM regions and the E820 / PVH memory map derived from them.

use super::layout::*;

pub const E820_RAM: u32 = 1;

/// One memory-map entry, shared by boot_params (e820) and PVH (hvm_memmap_table_entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// RAM backing ranges for `mem_size` bytes, skipping the 32-bit MMIO gap.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

/// The map the guest sees: RAM below the EBDA, the legacy hole, RAM from 1 MiB, RAM above 4 GiB.
pub fn memory_map(mem_size: u64) -> Vec<MemEntry> {
    let ram = |addr, size| MemEntry {
        addr,
        size,
        kind: E820_RAM,
    };
    let mut map = vec![ram(0, EBDA_START)];
    let low_end = mem_size.min(MMIO_GAP_START);
    if low_end > HIMEM_START {
        map.push(ram(HIMEM_START, low_end - HIMEM_START));
    }
    if mem_size > MMIO_GAP_START {
        map.push(ram(MMIO_GAP_END, mem_size - MMIO_GAP_START));
    }
    map
}

/// Highest address below the MMIO gap that is RAM (end of the low region).
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest() {
        let m = memory_map(128 << 20);
        assert_eq!(
            m,
            vec![
                MemEntry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: 1
                },
                MemEntry {
                    addr: 0x10_0000,
                    size: (128 << 20) - 0x10_0000,
                    kind: 1
                },
            ]
        );
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
    }

    #[test]
    fn guest_spanning_mmio_gap() {
        let size = 6u64 << 30;
        let m = memory_map(size);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].addr + m[1].size, MMIO_GAP_START);
        assert_eq!(m[2].addr, 1 << 32);
        assert_eq!(m[2].size, size - MMIO_GAP_START);
        let total: u64 = ram_regions(size).iter().map(|r| r.1).sum();
        assert_eq!(total, size);
        assert_eq!(ram_regions(size)[1], (1 << 32, size - MMIO_GAP_START));
    }

    #[test]
    fn exactly_gap_start() {
        assert_eq!(ram_regions(MMIO_GAP_START).len(), 1);
        assert_eq!(memory_map(MMIO_GAP_START).len(), 2);
    }
}
