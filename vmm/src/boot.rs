//! Loads kernel, initrd and command line, and writes the boot protocol's parameters:
//! PVH (start_info + memmap + modules) when the ELF has the PVH note, else Linux boot_params.

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::layout::*;
use crate::arch::memmap::{low_ram_end, memory_map, MemEntry};
use crate::config::{BootProtocol, KernelFormat};
use crate::vstate::memory::CowFileReader;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// bzImage: the 64-bit entry sits 0x200 past the 32-bit protected-mode start.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("opening {0}: {1}")]
    Open(String, std::io::Error),
    #[error("loading kernel: {0}")]
    Kernel(linux_loader::loader::Error),
    #[error(
        "kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) but boot_protocol is \"pvh\""
    )]
    NoPvhNote,
    #[error("command line: {0}")]
    Cmdline(String),
    #[error("initrd of {0} bytes does not fit in guest memory above the kernel")]
    InitrdTooBig(u64),
    #[error("initrd: {0}")]
    Initrd(String),
    #[error("writing boot parameters: {0}")]
    Params(String),
}

/// Where the kernel starts and how.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KernelEntry {
    pub entry: u64,
    pub pvh: bool,
    pub kernel_end: u64,
    pub setup_header: Option<setup_header>,
}

/// Loads the kernel image into guest memory and picks the entry point.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    format: KernelFormat,
    proto: BootProtocol,
) -> Result<KernelEntry, BootError> {
    let mut f = File::open(path)
        .and_then(|f| CowFileReader::new(f, mem))
        .map_err(|e| BootError::Open(path.display().to_string(), e))?;
    let himem = Some(GuestAddress(HIMEM_START));
    match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut f, himem).map_err(BootError::Kernel)?;
            let pvh_entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
                _ => None,
            };
            let (entry, pvh) = match (proto, pvh_entry) {
                (BootProtocol::Pvh, None) => return Err(BootError::NoPvhNote),
                (BootProtocol::Linux, _) | (BootProtocol::Auto, None) => (r.kernel_load.0, false),
                (_, Some(a)) => (a, true),
            };
            Ok(KernelEntry {
                entry,
                pvh,
                kernel_end: r.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut f, himem).map_err(BootError::Kernel)?;
            Ok(KernelEntry {
                entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                pvh: false,
                kernel_end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
    }
}

/// Places the initrd page-aligned at the top of low RAM; returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel_end: u64,
    path: &Path,
) -> Result<(u64, u64), BootError> {
    // Straight into guest memory: no intermediate buffer.
    let open_err = |e| BootError::Open(path.display().to_string(), e);
    let file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let addr = initrd_address(mem_size, kernel_end, size).ok_or(BootError::InitrdTooBig(size))?;
    let mut reader = CowFileReader::new(file, mem).map_err(open_err)?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut reader, size as usize)
        .map_err(|e| BootError::Initrd(e.to_string()))?;
    Ok((addr, size))
}

/// Page-aligned address for an initrd of `size` at the top of low RAM, above the kernel.
pub fn initrd_address(mem_size: u64, kernel_end: u64, size: u64) -> Option<u64> {
    let top = low_ram_end(mem_size);
    let addr = top.checked_sub(size)? & !0xfff;
    (addr >= kernel_end.max(HIMEM_START)).then_some(addr)
}

/// Builds the command line and writes it at CMDLINE_START; returns its length (no NUL).
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, BootError> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    c.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &c)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    Ok(cmdline.len())
}

/// The Linux boot protocol's zero page.
pub fn linux_boot_params(
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    mem_map: &[MemEntry],
) -> boot_params {
    let mut p = boot_params::default();
    if let Some(h) = header {
        p.hdr = h;
    }
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    p.hdr.header = KERNEL_HDR_MAGIC;
    p.hdr.cmd_line_ptr = CMDLINE_START as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    for (slot, e) in p.e820_table.iter_mut().zip(mem_map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    p.e820_entries = mem_map.len().min(p.e820_table.len()) as u8;
    p
}

/// PVH start_info, memory map and module list (the initrd is module 0).
pub fn pvh_start_info(
    initrd: Option<(u64, u64)>,
    mem_map: &[MemEntry],
) -> (
    hvm_start_info,
    Vec<hvm_memmap_table_entry>,
    Vec<hvm_modlist_entry>,
) {
    let memmap: Vec<hvm_memmap_table_entry> = mem_map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mods: Vec<hvm_modlist_entry> = initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        nr_modules: mods.len() as u32,
        modlist_paddr: if mods.is_empty() { 0 } else { MODLIST_START },
        ..Default::default()
    };
    (info, memmap, mods)
}

/// Writes the boot parameters for the chosen protocol.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &KernelEntry,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let map = memory_map(mem_size);
    let err = |e: linux_loader::configurator::Error| BootError::Params(e.to_string());
    if kernel.pvh {
        let (info, memmap, mods) = pvh_start_info(initrd, &map);
        let mut bp = BootParams::new(&info, GuestAddress(PVH_INFO_START));
        bp.set_sections(&memmap, GuestAddress(MEMMAP_START));
        if !mods.is_empty() {
            bp.set_modules(&mods, GuestAddress(MODLIST_START));
        }
        PvhBootConfigurator::write_bootparams(&bp, mem).map_err(err)
    } else {
        let p = linux_boot_params(kernel.setup_header, cmdline_len, initrd, &map);
        let bp = BootParams::new(&p, GuestAddress(ZERO_PAGE_START));
        LinuxBootConfigurator::write_bootparams(&bp, mem).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_params_fields() {
        let map = memory_map(256 << 20);
        let p = linux_boot_params(None, 42, Some((0xf00_0000, 0x12345)), &map);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0xf00_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x12345);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!(p.hdr.type_of_loader, 0xff);
        assert_eq!(p.e820_entries, 2);
        let e0 = p.e820_table[0];
        let e1 = p.e820_table[1];
        assert_eq!(({ e0.addr }, { e0.size }, { e0.r#type }), (0, 0x9fc00, 1));
        assert_eq!(
            ({ e1.addr }, { e1.size }),
            (0x10_0000, (256 << 20) - 0x10_0000)
        );
    }

    #[test]
    fn boot_params_written_at_zero_page() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let k = KernelEntry {
            entry: 0x100_0000,
            pvh: false,
            kernel_end: 0x200_0000,
            setup_header: None,
        };
        write_boot_params(&mem, 32 << 20, &k, 10, None).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
    }

    #[test]
    fn pvh_info_and_modules() {
        let map = memory_map(128 << 20);
        let (info, memmap, mods) = pvh_start_info(Some((0x0700_0000, 4096)), &map);
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.memmap_entries, 2);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, MODLIST_START);
        assert_eq!(memmap[1].addr, HIMEM_START);
        assert_eq!((mods[0].paddr, mods[0].size), (0x0700_0000, 4096));
        let (info, _, mods) = pvh_start_info(None, &map);
        assert_eq!((info.nr_modules, info.modlist_paddr, mods.len()), (0, 0, 0));
        // start_info and its module list must not overlap the memmap.
        assert!(PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64 <= MODLIST_START);
    }

    #[test]
    fn initrd_placement() {
        let a = initrd_address(128 << 20, 0x200_0000, 0x1801).unwrap();
        assert_eq!(a % 4096, 0);
        assert!(a + 0x1801 <= 128 << 20);
        assert!(initrd_address(32 << 20, 0x1f0_0001, 1 << 20).is_none());
        // Above the MMIO gap the initrd still goes below 3.25 GiB.
        let a = initrd_address(8 << 30, 0x200_0000, 4096).unwrap();
        assert_eq!(a, MMIO_GAP_START - 4096);
    }

    #[test]
    fn cmdline_written() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let n = write_cmdline(&mem, "console=ttyS0 quiet").unwrap();
        let mut buf = vec![0u8; n + 1];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0 quiet\0");
    }
}
