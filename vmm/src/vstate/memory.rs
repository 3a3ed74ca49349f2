//! Guest memory: anonymous (optionally MAP_HUGETLB) mappings, one per RAM range.

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::memmap::ram_regions;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("mmap of {size} MiB guest memory failed{hint}: {source}")]
    Mmap {
        size: u64,
        hint: &'static str,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest memory layout: {0}")]
    Layout(String),
}

/// Allocates guest RAM of `mem_size` bytes, split around the MMIO gap.
pub fn create_guest_memory(mem_size: u64, hugepages: bool) -> Result<GuestMemoryMmap, MemoryError> {
    // Hugetlb mappings must reserve up front: without a reservation a missing hugepage is a
    // SIGBUS on first touch instead of a clean mmap error here.
    let flags = if hugepages {
        libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_HUGETLB
    } else {
        libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE
    };
    let mut regions = Vec::new();
    for (start, size) in ram_regions(mem_size) {
        let mapping = MmapRegionBuilder::new(size as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_hugetlbfs(hugepages)
            .build()
            .map_err(|source| MemoryError::Mmap {
                size: size >> 20,
                hint: if hugepages {
                    " (are enough 2 MiB hugepages reserved in /proc/sys/vm/nr_hugepages?)"
                } else {
                    ""
                },
                source,
            })?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| MemoryError::Layout(format!("region at {start:#x} overflows")))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Layout(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn single_region() {
        let m = create_guest_memory(64 << 20, false).unwrap();
        assert_eq!(m.num_regions(), 1);
        assert_eq!(m.iter().next().unwrap().len(), 64 << 20);
    }
}
