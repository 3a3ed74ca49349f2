//! virtio-blk over a raw image file: read, write, flush and get-id, served on the device's
//! worker thread. The file is locked (flock) for the VMM's lifetime so two VMs never share a
//! writable disk; the lock goes with the process.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::epoll::EventSet;

use super::worker::{self, EventLoop};
use super::{add_used_and_notify, read_config_bytes, Activation, Interrupt, VirtioDevice};

/// Room for a whole 1 MiB request of scattered pages in one chain (header, 256 pages, status;
/// a chain may not be longer than the queue, indirect or not): with 256 entries such a read was
/// split in two requests whenever the guest's buffer was fragmented, which cost the emulated
/// guest kernel on kvm-pvm about a third more instructions per MiB.
const QUEUE_SIZE: u16 = 512;
const SECTOR: u64 = 512;
/// type, reserved, sector
const HEADER: usize = 16;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Length of the serial the guest reads with GET_ID.
const ID_BYTES: usize = 20;

pub struct Block {
    file: Option<File>,
    read_only: bool,
    sectors: u64,
    id: String,
    config: Vec<u8>,
}

impl Block {
    /// Opens and locks `path`; `id` becomes the disk serial (`/sys/block/vdX/serial`).
    pub fn new(path: &Path, read_only: bool, id: &str) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("disk {}: {e}", path.display())))?;
        let lock = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("disk {} is in use by another VM: {e}", path.display()),
            ));
        }
        let len = file.metadata()?.len();
        let sectors = len / SECTOR;
        let mut config = Vec::with_capacity(16);
        config.extend_from_slice(&sectors.to_le_bytes());
        config.extend_from_slice(&0u32.to_le_bytes()); // size_max (not offered)
        config.extend_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        Ok(Block {
            file: Some(file),
            read_only,
            sectors,
            id: id.to_string(),
            config,
        })
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        super::TYPE_BLOCK
    }

    fn features(&self) -> u64 {
        // Event idx: one interrupt for requests completed while the guest still handles
        // the previous one; its kernel code is what costs on kvm-pvm. Indirect: a request
        // of many scattered pages takes one ring slot, so several fit in the ring at once.
        let mut f = super::VIRTIO_F_VERSION_1
            | super::VIRTIO_RING_F_EVENT_IDX
            | super::VIRTIO_RING_F_INDIRECT_DESC
            | F_FLUSH
            | F_SEG_MAX;
        if self.read_only {
            f |= F_RO;
        }
        f
    }

    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), String> {
        let file = self.file.take().ok_or("the disk was already started")?;
        let mut q = a.queues.into_iter().next().ok_or("no request queue")?;
        let mut disk = Disk {
            file,
            read_only: self.read_only,
            sectors: self.sectors,
            id: self.id.clone(),
        };
        let (mem, irq) = (a.mem, a.interrupt);
        let events = EventLoop::new().map_err(|e| format!("epoll: {e}"))?;
        events
            .add(q.kick.as_raw_fd(), 0, EventSet::IN)
            .map_err(|e| format!("epoll add: {e}"))?;
        worker::spawn("virtio-blk", move || {
            events.run(
                -1,
                |_, _, _| {
                    let _ = q.kick.read();
                    disk.process_queue(&mut q.queue, &mem, &irq);
                    true
                },
                |_| true,
            )
        })
    }
}

/// The worker's half: the open image and what it serves.
struct Disk {
    file: File,
    read_only: bool,
    sectors: u64,
    id: String,
}

impl Disk {
    fn process_queue(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap, irq: &Interrupt) {
        loop {
            // Keep going until no request arrived while we re-enabled notifications.
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let written = self.handle(chain, mem);
                add_used_and_notify(queue, mem, head, written, irq);
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
    }

    /// Serves one request; returns the bytes written into the guest's buffers (data + status).
    fn handle(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let request = chain.clone();
        let mut reader = match chain.clone().reader(mem) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("ltv-vmm: virtio-blk: bad request chain: {e:?}");
                return 0;
            }
        };
        let mut writer = match chain.writer(mem) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("ltv-vmm: virtio-blk: bad request chain: {e:?}");
                return 0;
            }
        };
        // The status byte is the last writable byte; everything before it is data.
        let Some(data_len) = writer.available_bytes().checked_sub(1) else {
            eprintln!("ltv-vmm: virtio-blk: request without a status byte; dropped");
            return 0;
        };
        let mut status_w = match writer.split_at(data_len) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("ltv-vmm: virtio-blk: {e:?}");
                return 0;
            }
        };
        let mut header = [0u8; HEADER];
        let (status, data_written) = if reader.read_exact(&mut header).is_err() {
            eprintln!("ltv-vmm: virtio-blk: request header shorter than 16 bytes");
            (S_IOERR, 0)
        } else {
            let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
            let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
            match self.execute(kind, sector, &request, mem, &mut reader, &mut writer) {
                Ok(written) => (S_OK, written),
                Err(status) => (status, 0),
            }
        };
        if status_w.write_all(&[status]).is_err() {
            return data_written as u32;
        }
        (data_written + 1) as u32
    }

    fn execute(
        &mut self,
        kind: u32,
        sector: u64,
        request: &DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        reader: &mut virtio_queue::Reader<'_>,
        writer: &mut virtio_queue::Writer<'_>,
    ) -> Result<usize, u8> {
        let in_range = |len: u64| {
            len.is_multiple_of(SECTOR)
                && sector
                    .checked_add(len / SECTOR)
                    .is_some_and(|end| end <= self.sectors)
        };
        match kind {
            T_IN => {
                let len = writer.available_bytes();
                if !in_range(len as u64) {
                    return Err(S_IOERR);
                }
                let mut iov = guest_iovecs(request, mem, true, 0, len).ok_or(S_IOERR)?;
                transfer_at(&self.file, &mut iov, sector * SECTOR, false)
                    .map_err(|e| io_error("read", e))?;
                Ok(len)
            }
            T_OUT => {
                if self.read_only {
                    return Err(S_IOERR);
                }
                let len = reader.available_bytes();
                if !in_range(len as u64) {
                    return Err(S_IOERR);
                }
                let mut iov = guest_iovecs(request, mem, false, HEADER, len).ok_or(S_IOERR)?;
                transfer_at(&self.file, &mut iov, sector * SECTOR, true)
                    .map_err(|e| io_error("write", e))?;
                Ok(0)
            }
            T_FLUSH => {
                if !self.read_only {
                    self.file.sync_data().map_err(|e| io_error("flush", e))?;
                }
                Ok(0)
            }
            T_GET_ID => {
                let mut id = [0u8; ID_BYTES];
                let n = self.id.len().min(ID_BYTES);
                id[..n].copy_from_slice(&self.id.as_bytes()[..n]);
                let n = writer.available_bytes().min(ID_BYTES);
                writer.write_all(&id[..n]).map_err(|_| S_IOERR)?;
                Ok(n)
            }
            _ => Err(S_UNSUPP),
        }
    }
}

/// Bytes `skip..skip + len` of a request's device-writable (or readable) buffers, as iovecs
/// into guest memory: the disk is read into and written from the guest's pages directly,
/// without a bounce buffer. None if the buffers are shorter or outside guest memory.
fn guest_iovecs(
    request: &DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    device_writable: bool,
    mut skip: usize,
    mut len: usize,
) -> Option<Vec<libc::iovec>> {
    let access = if device_writable {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let mut iov = Vec::new();
    for desc in request.clone() {
        if desc.is_write_only() != device_writable || len == 0 {
            continue;
        }
        for slice in mem
            .get_slices(desc.addr(), desc.len() as usize, access)
            .ok()?
        {
            let slice = slice.ok()?;
            if skip >= slice.len() {
                skip -= slice.len();
                continue;
            }
            let take = (slice.len() - skip).min(len);
            let part = slice.subslice(skip, take).ok()?;
            if device_writable {
                part.bitmap().mark_dirty(0, take);
            }
            iov.push(libc::iovec {
                iov_base: part.ptr_guard_mut().as_ptr().cast(),
                iov_len: take,
            });
            skip = 0;
            len -= take;
            if len == 0 {
                break;
            }
        }
    }
    (len == 0).then_some(iov)
}

/// preadv/pwritev at `offset` until every iovec is done (a call may do less).
fn transfer_at(
    file: &File,
    mut iov: &mut [libc::iovec],
    mut offset: u64,
    write: bool,
) -> io::Result<()> {
    while !iov.is_empty() {
        let count = iov.len().min(1024) as libc::c_int; // IOV_MAX
        let at = offset as libc::off_t;
        // SAFETY: every iovec lies in guest RAM, which stays mapped while the device runs; the
        // kernel reads or writes only those bytes.
        let n = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), iov.as_ptr(), count, at)
            } else {
                libc::preadv(file.as_raw_fd(), iov.as_ptr(), count, at)
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(if write {
                io::ErrorKind::WriteZero
            } else {
                io::ErrorKind::UnexpectedEof
            }));
        }
        let mut done = n as usize;
        offset += done as u64;
        while done > 0 {
            if done >= iov[0].iov_len {
                done -= iov[0].iov_len;
                iov = &mut iov[1..];
            } else {
                // SAFETY: stays inside the same iovec's buffer.
                iov[0].iov_base = unsafe { iov[0].iov_base.cast::<u8>().add(done) }.cast();
                iov[0].iov_len -= done;
                done = 0;
            }
        }
    }
    Ok(())
}

fn io_error(op: &str, e: io::Error) -> u8 {
    eprintln!("ltv-vmm: virtio-blk: {op}: {e}");
    S_IOERR
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    const F_WRITE: u16 = 2;
    const F_NEXT: u16 = 1;

    fn disk(len: u64, ro: bool) -> (tempfile::NamedTempFile, Disk) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        let b = Block::new(f.path(), ro, "ltv-test").unwrap();
        let d = Disk {
            file: b.file.unwrap(),
            read_only: ro,
            sectors: b.sectors,
            id: b.id,
        };
        (f, d)
    }

    /// Puts a chain of (addr, len, flags) descriptors on a fresh queue and serves it.
    fn serve(d: &mut Disk, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> u32 {
        let vq = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = if i + 1 < descs.len() { F_NEXT } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags | next, i as u16 + 1))
            })
            .collect();
        vq.build_desc_chain(&raw).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let irq = Interrupt::new(EventFd::new(0).unwrap());
        d.process_queue(&mut q, mem, &Arc::new(irq));
        let used = vq.used();
        let elem = used.ring().ref_at(0).unwrap().load();
        elem.len()
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    #[test]
    fn write_then_read_back_and_out_of_range() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (_f, mut d) = disk(8 * SECTOR, false);
        header(&mem, 0x8000, T_OUT, 2);
        mem.write_slice(&[0xab; 512], GuestAddress(0x9000)).unwrap();
        let n = serve(
            &mut d,
            &mem,
            &[(0x8000, 16, 0), (0x9000, 512, 0), (0xa000, 1, F_WRITE)],
        );
        assert_eq!(n, 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0xa000)).unwrap(), S_OK);

        header(&mem, 0x8000, T_IN, 2);
        let n = serve(
            &mut d,
            &mem,
            &[
                (0x8000, 16, 0),
                (0xb000, 512, F_WRITE),
                (0xa000, 1, F_WRITE),
            ],
        );
        assert_eq!(n, 513);
        let mut back = [0u8; 512];
        mem.read_slice(&mut back, GuestAddress(0xb000)).unwrap();
        assert_eq!(back, [0xab; 512]);

        // Sector 8 is past the end of an 8-sector disk.
        header(&mem, 0x8000, T_IN, 8);
        serve(
            &mut d,
            &mem,
            &[
                (0x8000, 16, 0),
                (0xb000, 512, F_WRITE),
                (0xa000, 1, F_WRITE),
            ],
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0xa000)).unwrap(), S_IOERR);
    }

    #[test]
    fn header_data_and_status_may_share_descriptors() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (f, mut d) = disk(8 * SECTOR, false);
        // A write whose data follows the header in the same buffer.
        header(&mem, 0x8000, T_OUT, 5);
        mem.write_slice(&[0x3c; 512], GuestAddress(0x8010)).unwrap();
        let n = serve(&mut d, &mem, &[(0x8000, 16 + 512, 0), (0xa000, 1, F_WRITE)]);
        assert_eq!(n, 1);
        let mut on_disk = [0u8; 512];
        f.as_file().read_exact_at(&mut on_disk, 5 * SECTOR).unwrap();
        assert_eq!(on_disk, [0x3c; 512]);
        // A read whose status byte follows the data in the same buffer.
        header(&mem, 0x8000, T_IN, 5);
        let n = serve(&mut d, &mem, &[(0x8000, 16, 0), (0xb000, 512 + 1, F_WRITE)]);
        assert_eq!(n, 513);
        let mut back = [0u8; 512];
        mem.read_slice(&mut back, GuestAddress(0xb000)).unwrap();
        assert_eq!(back, [0x3c; 512]);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0xb200)).unwrap(), S_OK);
    }

    #[test]
    fn read_only_refuses_writes_and_malformed_chains_do_not_panic() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (_f, mut d) = disk(8 * SECTOR, true);
        header(&mem, 0x8000, T_OUT, 0);
        serve(
            &mut d,
            &mem,
            &[(0x8000, 16, 0), (0x9000, 512, 0), (0xa000, 1, F_WRITE)],
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0xa000)).unwrap(), S_IOERR);
        // No writable status byte at all.
        assert_eq!(serve(&mut d, &mem, &[(0x8000, 16, 0)]), 0);
        // A header of 4 bytes.
        serve(&mut d, &mem, &[(0x8000, 4, 0), (0xa000, 1, F_WRITE)]);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0xa000)).unwrap(), S_IOERR);
        // A descriptor pointing outside guest memory.
        assert_eq!(
            serve(
                &mut d,
                &mem,
                &[(0x8000, 16, 0), (0xffff_0000, 512, F_WRITE)]
            ),
            0
        );
    }

    #[test]
    fn a_request_in_an_indirect_table_is_served() {
        const F_INDIRECT: u16 = 4;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (f, mut d) = disk(8 * SECTOR, false);
        f.as_file().write_all_at(&[0x5a; 1024], 3 * SECTOR).unwrap();
        header(&mem, 0x8000, T_IN, 3);
        // Header, two data segments and the status byte, in a table the ring points to.
        let table = [
            (0x8000, 16, F_NEXT),
            (0xb000, 512, F_WRITE | F_NEXT),
            (0xc000, 512, F_WRITE | F_NEXT),
            (0xa000, 1, F_WRITE),
        ];
        for (i, &(addr, len, flags)) in table.iter().enumerate() {
            let desc = SplitDescriptor::new(addr, len, flags, i as u16 + 1);
            mem.write_obj(desc, GuestAddress(0x20000 + 16 * i as u64))
                .unwrap();
        }
        let n = serve(&mut d, &mem, &[(0x20000, 16 * 4, F_INDIRECT)]);
        assert_eq!(n, 1025);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0xa000)).unwrap(), S_OK);
        for seg in [0xb000, 0xc000] {
            let mut back = [0u8; 512];
            mem.read_slice(&mut back, GuestAddress(seg)).unwrap();
            assert_eq!(back, [0x5a; 512]);
        }
    }

    #[test]
    fn second_writer_is_locked_out() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4096).unwrap();
        let _a = Block::new(f.path(), false, "a").unwrap();
        let err = Block::new(f.path(), false, "b").err().unwrap();
        assert!(err.to_string().contains("in use"), "{err}");
    }
}
