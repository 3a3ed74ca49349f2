//! Virtio 1.x devices on the MMIO transport. The transport ([`mmio::MmioTransport`]) owns the
//! registers and hands the queues to a device once the driver sets DRIVER_OK; from then on the
//! device serves them on its own worker thread, woken by ioeventfds, and interrupts the guest
//! through an irqfd.

pub mod blk;
pub mod mmio;
pub mod net;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// used_event/avail_event suppression: the transport turns it on in the queues when the
/// driver accepts it; a device offers it only if its loop re-checks the queue after
/// `enable_notification` (as blk does).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Indirect descriptor tables: a request of many segments takes one ring slot, so several
/// are in flight at once (virtio-queue follows the tables when it walks a chain).
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_VSOCK: u32 = 19;

/// InterruptStatus bit: the device used buffers in a queue.
pub const INT_VRING: u32 = 1;

/// The guest-facing interrupt of one device: the status bits the driver reads and acks, and
/// the irqfd that raises its GSI without a vCPU exit.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Tells the driver that used buffers are waiting.
    pub fn signal_used(&self) {
        self.status.fetch_or(INT_VRING, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            eprintln!("ltv-vmm: virtio: raising the interrupt failed: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// A queue the driver made ready, with the eventfd the guest's notifications arrive on.
pub struct ActiveQueue {
    pub queue: Queue,
    pub kick: EventFd,
}

/// What a device gets when the driver finishes feature negotiation and sets DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub acked_features: u64,
    pub queues: Vec<ActiveQueue>,
    pub interrupt: std::sync::Arc<Interrupt>,
}

/// One virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (1 net, 2 block, 19 vsock).
    fn device_type(&self) -> u32;
    /// Feature bits offered to the driver (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_sizes(&self) -> &[u16];
    /// Device config space, read at `offset` from 0x100.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let _ = offset;
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving the queues, normally on a worker thread of its own.
    fn activate(&mut self, activation: Activation) -> Result<(), String>;
}

/// Hands every used buffer back and interrupts the guest when the queue asks for it.
pub fn add_used_and_notify(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
    interrupt: &Interrupt,
) {
    if let Err(e) = queue.add_used(mem, head, len) {
        eprintln!("ltv-vmm: virtio: add_used failed: {e:?}");
        return;
    }
    if queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used();
    }
}

/// Copies a config space image into a read at `offset`; out of range reads as zeros.
pub fn read_config_bytes(space: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| space.get(o + i))
            .copied()
            .unwrap_or(0);
    }
}
