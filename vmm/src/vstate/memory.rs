//! Guest memory: anonymous (optionally MAP_HUGETLB) mappings, one per RAM range, and a reader
//! that loads files into it copy-on-write.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    ReadVolatile, VolatileMemoryError, VolatileSlice,
};

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

const PAGE: usize = 4096;
/// Smaller reads are copied: mapping them saves little and splits the guest RAM mapping.
const MIN_MAP_LEN: usize = 64 << 10;

/// A file reader that, instead of copying, maps the file MAP_PRIVATE over page-aligned reads
/// into anonymous guest RAM (kernel segments, initrd).
///
/// Copying a 15 MiB vmlinux costs milliseconds of page faults and zeroing before the guest
/// starts; a mapping costs one mmap, and pages the guest only reads stay shared with the page
/// cache (and with other VMs booting the same file). The file must not be rewritten in place
/// while the VM runs (replace it by rename); other reads fall back to copying.
pub struct CowFileReader {
    file: File,
    pos: u64,
    file_len: u64,
    /// Host (start, len) of each guest RAM region a read may be mapped into.
    ram: Vec<(usize, usize)>,
}

impl CowFileReader {
    /// Reads `file` into `mem`; only use it while no vCPU or device touches guest memory.
    pub fn new(file: File, mem: &GuestMemoryMmap) -> std::io::Result<Self> {
        let file_len = file.metadata()?.len();
        let ram = mem
            .iter()
            .filter(|r| r.file_offset().is_none() && r.is_hugetlbfs() != Some(true))
            .map(|r| (r.as_ptr() as usize, r.len() as usize))
            .collect();
        Ok(CowFileReader {
            file,
            pos: 0,
            file_len,
            ram,
        })
    }

    /// Maps `len` bytes at the current position over `dst`; Ok(false) if it may not or cannot.
    fn map_over(&self, dst: usize, len: usize) -> std::io::Result<bool> {
        let in_ram = self
            .ram
            .iter()
            .any(|&(start, size)| dst >= start && dst + len <= start + size);
        if len < MIN_MAP_LEN
            || !dst.is_multiple_of(PAGE)
            || !self.pos.is_multiple_of(PAGE as u64)
            || self.pos + len as u64 > self.file_len
            || !in_ram
        {
            return Ok(false);
        }
        let map_len = len.next_multiple_of(PAGE);
        // The mapping covers the whole last page: keep what follows the read there.
        let tail = map_len - len;
        let mut saved = vec![0u8; tail];
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE;
        // SAFETY: [dst, dst + map_len) lies in a private anonymous guest RAM mapping this process
        // owns (regions are page multiples, so rounding up stays inside); no vCPU or device runs
        // yet, and guest memory is only reached through raw pointers, never references.
        unsafe {
            std::ptr::copy_nonoverlapping((dst + len) as *const u8, saved.as_mut_ptr(), tail);
            let fd = self.file.as_raw_fd();
            let p = libc::mmap(dst as _, map_len, prot, flags, fd, self.pos as libc::off_t);
            let mapped = p != libc::MAP_FAILED;
            if !mapped {
                // A failed MAP_FIXED may have unmapped the range: put anonymous RAM back.
                let p = libc::mmap(dst as _, map_len, prot, flags | libc::MAP_ANONYMOUS, -1, 0);
                if p == libc::MAP_FAILED {
                    return Err(std::io::Error::last_os_error());
                }
            }
            std::ptr::copy_nonoverlapping(saved.as_ptr(), (dst + len) as *mut u8, tail);
            Ok(mapped)
        }
    }
}

impl Read for CowFileReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for CowFileReader {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.pos = self.file.seek(to)?;
        Ok(self.pos)
    }
}

impl ReadVolatile for CowFileReader {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let len = buf.len();
        let dst = buf.ptr_guard_mut().as_ptr() as usize;
        if self
            .map_over(dst, len)
            .map_err(VolatileMemoryError::IOError)?
        {
            self.file
                .seek(SeekFrom::Current(len as i64))
                .map_err(VolatileMemoryError::IOError)?;
            self.pos += len as u64;
            buf.bitmap().mark_dirty(0, len);
            return Ok(len);
        }
        let n = self.file.read_volatile(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    #[test]
    fn single_region() {
        let m = create_guest_memory(64 << 20, false).unwrap();
        assert_eq!(m.num_regions(), 1);
        assert_eq!(m.iter().next().unwrap().len(), 64 << 20);
    }

    fn file_of(data: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(data).unwrap();
        f
    }

    fn mapped_from(path: &std::path::Path) -> bool {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines().any(|l| l.ends_with(path.to_str().unwrap()))
    }

    #[test]
    fn maps_aligned_reads_and_keeps_the_rest_of_the_last_page() {
        let data: Vec<u8> = (0..(300u32 << 10) + 123).map(|i| (i % 251) as u8).collect();
        let f = file_of(&data);
        let mem = create_guest_memory(16 << 20, false).unwrap();
        let at = GuestAddress(1 << 20);
        // From file offset 4096 to the end: the read ends mid-page.
        let n = data.len() - 4096;
        let after = GuestAddress(at.0 + n as u64);
        mem.write_slice(&[0xab; 8], after).unwrap();
        let mut r = CowFileReader::new(File::open(f.path()).unwrap(), &mem).unwrap();
        r.seek(SeekFrom::Start(4096)).unwrap();
        mem.read_exact_volatile_from(at, &mut r, n).unwrap();
        assert!(mapped_from(f.path()));
        let mut got = vec![0u8; n];
        mem.read_slice(&mut got, at).unwrap();
        assert_eq!(got, data[4096..]);
        let mut tail = [0u8; 8];
        mem.read_slice(&mut tail, after).unwrap();
        assert_eq!(tail, [0xab; 8]);
        // Guest writes stay private: the file is unchanged.
        mem.write_slice(&[1, 2, 3], at).unwrap();
        assert_eq!(std::fs::read(f.path()).unwrap(), data);
        // The reader's position moved past the mapped bytes.
        let mut rest = [0u8; 1];
        assert_eq!(r.read(&mut rest).unwrap(), 0);
    }

    #[test]
    fn copies_unaligned_and_small_reads() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        let f = file_of(&data);
        let mem = create_guest_memory(16 << 20, false).unwrap();
        let mut r = CowFileReader::new(File::open(f.path()).unwrap(), &mem).unwrap();
        mem.read_exact_volatile_from(GuestAddress(0x10_0010), &mut r, 100_000)
            .unwrap();
        mem.read_exact_volatile_from(GuestAddress(0x20_0000), &mut r, 1000)
            .unwrap();
        assert!(!mapped_from(f.path()));
        let mut got = vec![0u8; 1000];
        mem.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(got, data[100_000..101_000]);
    }
}
