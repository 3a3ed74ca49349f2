//! virtio-net over a host TAP device.
//!
//! Two queues (rx 0, tx 1), features VIRTIO_F_VERSION_1 and VIRTIO_NET_F_MAC only: no
//! checksum or segmentation offloads and no mergeable rx buffers. Every frame therefore
//! carries the 12-byte `virtio_net_hdr_v1` and fits one rx chain (a driver without
//! MRG_RXBUF posts buffers big enough for a whole frame).
//!
//! The TAP is opened with IFF_VNET_HDR and a vnet header size of 12, so its header and the
//! virtio one are the same bytes and frames pass through unchanged in both directions. The
//! TAP's own offloads stay off (TUNSETOFFLOAD 0), so it never hands us GSO or
//! partially-checksummed frames the driver did not negotiate.
//!
//! The device runs on its own worker thread: an epoll loop over the TAP (edge-triggered)
//! and the two queue kicks. Nothing the guest puts in a chain can make it panic: chains it
//! cannot use are logged (rate-limited) and completed with length 0.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::worker::{self, EventLoop};
use super::{
    add_used_and_notify, read_config_bytes, Activation, ActiveQueue, Interrupt, VirtioDevice,
    TYPE_NET, VIRTIO_F_VERSION_1,
};

/// The device has a MAC address in its config space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;

/// Size of `virtio_net_hdr_v1` (flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers), which is also the TAP's vnet header size.
pub const NET_HDR_LEN: usize = 12;
/// The largest frame plus header we move: a 64 KiB frame (the TAP's maximum MTU, 65535,
/// plus the 14-byte Ethernet header) and the 12-byte header, as the virtio spec sizes
/// big rx buffers.
pub const MAX_BUFFER: usize = 65562;

const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];

const TOKEN_TAP: u64 = 0;
const TOKEN_RX_KICK: u64 = 1;
const TOKEN_TX_KICK: u64 = 2;

/// How many warnings a worker prints before it goes quiet (a guest can cause them at will).
const WARN_LIMIT: u32 = 20;

/// A virtio-net device bound to an existing TAP interface.
pub struct Net {
    tap: Option<File>,
    tap_name: String,
    /// mac[6] then status u16 (always 0: VIRTIO_NET_F_STATUS is not offered).
    config: [u8; 8],
}

impl Net {
    /// Opens the existing (persistent) TAP `tap_name` through /dev/net/tun. The interface
    /// must exist: a missing one is reported as NotFound instead of being created here (a
    /// TAP created by TUNSETIFF would vanish with the VMM and belong to no bridge).
    /// The caller needs CAP_NET_ADMIN unless the TAP was given to its user.
    pub fn new(tap_name: &str, mac: [u8; 6]) -> io::Result<Self> {
        let tap = open_tap(tap_name)?;
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        Ok(Net {
            tap: Some(tap),
            tap_name: tap_name.to_string(),
            config,
        })
    }
}

fn open_tap(name: &str) -> io::Result<File> {
    let invalid =
        |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?}: {what}"));
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(invalid("an interface name is 1 to 15 bytes"));
    }
    if name.bytes().any(|b| b == 0 || b == b'%' || b == b'/') {
        return Err(invalid("not a plain interface name"));
    }
    let cname = std::ffi::CString::new(name).map_err(|_| invalid("contains NUL"))?;
    // SAFETY: a valid NUL-terminated string.
    if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {name} (the TAP must exist before the VM starts)"),
        ));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| io::Error::new(e.kind(), format!("opening /dev/net/tun: {e}")))?;
    let ctx = |what: &str| {
        let e = io::Error::last_os_error();
        io::Error::new(e.kind(), format!("TAP {name}: {what}: {e}"))
    };
    // SAFETY: ifreq is plain old data; all zeros is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which outlives the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(ctx("TUNSETIFF (is it a TAP, and may we use it?)"));
    }
    let hdr_len = NET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
        return Err(ctx("TUNSETVNETHDRSZ"));
    }
    // No offloads: the driver negotiated none, so the TAP must not give it GSO frames or
    // frames with a partial checksum. The argument is passed by value.
    // SAFETY: TUNSETOFFLOAD takes its flags as the integer argument.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
        return Err(ctx("TUNSETOFFLOAD"));
    }
    Ok(tun)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    }

    fn queue_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), String> {
        let Activation {
            mem,
            queues,
            interrupt,
            ..
        } = activation;
        // Queue 0 receives, queue 1 transmits.
        let [rx, tx]: [ActiveQueue; 2] = queues
            .try_into()
            .map_err(|q: Vec<_>| format!("virtio-net wants 2 queues, got {}", q.len()))?;
        let tap = self
            .tap
            .take()
            .ok_or_else(|| format!("virtio-net on {}: already activated", self.tap_name))?;
        let event_loop = EventLoop::new().map_err(|e| format!("epoll: {e}"))?;
        let w = NetWorker::new(mem, rx, tx, tap, interrupt);
        w.register(&event_loop)
            .map_err(|e| format!("virtio-net on {}: epoll_ctl: {e}", self.tap_name))?;
        worker::spawn("ltv-virtio-net", move || w.run(&event_loop))
    }
}

/// Prints the first [`WARN_LIMIT`] warnings of a worker, then one line saying it stopped.
struct Warn {
    left: u32,
}

impl Warn {
    fn new() -> Self {
        Warn { left: WARN_LIMIT }
    }

    fn warn(&mut self, msg: std::fmt::Arguments) {
        if self.left == 0 {
            return;
        }
        self.left -= 1;
        eprintln!("ltv-vmm: virtio-net: {msg}");
        if self.left == 0 {
            eprintln!("ltv-vmm: virtio-net: further warnings suppressed");
        }
    }
}

/// The rx side's one-frame buffer: a frame read from the TAP that no rx chain took yet.
struct RxFrame {
    buf: Vec<u8>,
    /// Header plus frame bytes in `buf`; 0 when nothing is pending.
    len: usize,
}

impl RxFrame {
    fn new() -> Self {
        RxFrame {
            buf: vec![0; MAX_BUFFER],
            len: 0,
        }
    }
}

/// Why a chain was completed with length 0.
#[derive(Debug, PartialEq, Eq)]
enum ChainError {
    /// The chain's buffers are not in guest memory (or overflow).
    Invalid,
    /// tx: fewer readable bytes than a header; rx: fewer writable bytes than the frame.
    TooShort { have: usize, need: usize },
    /// tx: more readable bytes than [`MAX_BUFFER`].
    TooLong(usize),
}

impl std::fmt::Display for ChainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainError::Invalid => write!(f, "descriptors outside guest memory"),
            ChainError::TooShort { have, need } => write!(f, "{have} bytes, {need} needed"),
            ChainError::TooLong(n) => write!(f, "{n} bytes, more than {MAX_BUFFER}"),
        }
    }
}

/// Gathers the device-readable part of a tx chain (header and frame) into `buf`. The
/// header's offload fields are cleared: none were negotiated, so the host only ever gets
/// plain frames.
fn gather_tx(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    buf: &mut Vec<u8>,
) -> Result<(), ChainError> {
    let mut reader = chain.reader(mem).map_err(|_| ChainError::Invalid)?;
    let n = reader.available_bytes();
    if n < NET_HDR_LEN {
        return Err(ChainError::TooShort {
            have: n,
            need: NET_HDR_LEN,
        });
    }
    if n > MAX_BUFFER {
        return Err(ChainError::TooLong(n));
    }
    buf.clear();
    buf.resize(n, 0);
    reader.read_exact(buf).map_err(|_| ChainError::Invalid)?;
    buf[..NET_HDR_LEN].fill(0);
    Ok(())
}

/// Copies `frame` (header included) into the device-writable part of an rx chain and
/// returns the byte count for the used ring.
fn fill_rx(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    frame: &[u8],
) -> Result<u32, ChainError> {
    let mut writer = chain.writer(mem).map_err(|_| ChainError::Invalid)?;
    let have = writer.available_bytes();
    if have < frame.len() {
        return Err(ChainError::TooShort {
            have,
            need: frame.len(),
        });
    }
    writer.write_all(frame).map_err(|_| ChainError::Invalid)?;
    Ok(frame.len() as u32)
}

/// Sends every available tx chain to `tap`, one write per frame. Frames the TAP refuses
/// are dropped (as a NIC drops what it cannot send); every chain is completed.
fn process_tx<W: Write>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    tap: &mut W,
    buf: &mut Vec<u8>,
    interrupt: &Interrupt,
    warn: &mut Warn,
) {
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        match gather_tx(mem, chain, buf) {
            Ok(()) => loop {
                match tap.write(buf) {
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // A full TAP queue: drop, as the host stack does on overload.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        warn.warn(format_args!("tx: writing a {}-byte frame: {e}", buf.len()));
                        break;
                    }
                }
            },
            Err(e) => warn.warn(format_args!("tx: chain {head} dropped: {e}")),
        }
        add_used_and_notify(queue, mem, head, 0, interrupt);
    }
}

/// Moves frames from `tap` into rx chains while both have some. A frame read while no
/// chain is available stays in `pending` until the driver posts buffers (its kick calls
/// this again). Returns when the TAP is drained or the queue is empty.
fn process_rx<R: Read>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    tap: &mut R,
    pending: &mut RxFrame,
    interrupt: &Interrupt,
    warn: &mut Warn,
) {
    loop {
        if pending.len == 0 {
            match tap.read(&mut pending.buf) {
                Ok(n) if n >= NET_HDR_LEN => {
                    pending.len = n;
                    // num_buffers: the TAP skips these two bytes; without MRG_RXBUF a frame
                    // always takes exactly one buffer.
                    pending.buf[10..12].copy_from_slice(&1u16.to_le_bytes());
                }
                Ok(0) => return,
                Ok(n) => {
                    warn.warn(format_args!("rx: a {n}-byte read from the TAP; skipped"));
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn.warn(format_args!("rx: reading the TAP: {e}"));
                    return;
                }
            }
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            // Keep the frame; the driver's next rx kick brings us back.
            return;
        };
        let head = chain.head_index();
        let frame = &pending.buf[..pending.len];
        let used = match fill_rx(mem, chain, frame) {
            Ok(n) => n,
            Err(e) => {
                // The frame goes with the unusable chain: a driver posting buffers too
                // small for its MTU would otherwise stall the queue on this one frame.
                warn.warn(format_args!(
                    "rx: chain {head} unusable, frame dropped: {e}"
                ));
                0
            }
        };
        pending.len = 0;
        add_used_and_notify(queue, mem, head, used, interrupt);
    }
}

struct NetWorker<T> {
    mem: GuestMemoryMmap,
    rx: ActiveQueue,
    tx: ActiveQueue,
    tap: T,
    interrupt: Arc<Interrupt>,
    rx_frame: RxFrame,
    tx_buf: Vec<u8>,
    warn: Warn,
}

impl<T: Read + Write + AsRawFd> NetWorker<T> {
    fn new(
        mem: GuestMemoryMmap,
        rx: ActiveQueue,
        tx: ActiveQueue,
        tap: T,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        NetWorker {
            mem,
            rx,
            tx,
            tap,
            interrupt,
            rx_frame: RxFrame::new(),
            tx_buf: Vec::with_capacity(MAX_BUFFER),
            warn: Warn::new(),
        }
    }

    fn register(&self, ev: &EventLoop) -> io::Result<()> {
        ev.add(
            self.tap.as_raw_fd(),
            TOKEN_TAP,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )?;
        ev.add(self.rx.kick.as_raw_fd(), TOKEN_RX_KICK, EventSet::IN)?;
        ev.add(self.tx.kick.as_raw_fd(), TOKEN_TX_KICK, EventSet::IN)
    }

    fn rx(&mut self) {
        process_rx(
            &mut self.rx.queue,
            &self.mem,
            &mut self.tap,
            &mut self.rx_frame,
            &self.interrupt,
            &mut self.warn,
        );
    }

    fn tx(&mut self) {
        process_tx(
            &mut self.tx.queue,
            &self.mem,
            &mut self.tap,
            &mut self.tx_buf,
            &self.interrupt,
            &mut self.warn,
        );
    }

    fn run(mut self, ev: &EventLoop) {
        // Whatever was queued before the loop existed.
        self.tx();
        self.rx();
        ev.run(
            -1,
            |_, token, _| {
                match token {
                    TOKEN_TAP => self.rx(),
                    TOKEN_RX_KICK => {
                        let _ = self.rx.kick.read();
                        self.rx();
                    }
                    TOKEN_TX_KICK => {
                        let _ = self.tx.kick.read();
                        self.tx();
                    }
                    _ => {}
                }
                true
            },
            |_| true,
        );
    }
}

#[cfg(test)]
mod tests;
