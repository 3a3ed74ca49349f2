//! The virtio-mmio transport, version 2 (virtio 1.x "modern"): one 4 KiB register window per
//! device, declared to the guest with `virtio_mmio.device=4K@<base>:<irq>` on its command line.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, ActiveQueue, Interrupt, VirtioDevice};
use crate::devices::bus::BusDevice;

/// Size of one device's register window.
pub const MMIO_LEN: u64 = 0x1000;
/// Offset of QueueNotify: the address the queue ioeventfds are registered on.
pub const QUEUE_NOTIFY: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x4c54_5600; // "LTV"

// Device status bits.
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const FAILED: u32 = 0x80;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    /// One per queue; KVM signals them on a QueueNotify write (ioeventfd).
    kicks: Vec<EventFd>,
    features_sel: u32,
    acked_sel: u32,
    acked: u64,
    queue_sel: u32,
    status: u32,
    activated: bool,
    name: String,
}

impl MmioTransport {
    /// `irqfd` must already be registered on the device's GSI.
    pub fn new(
        name: &str,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irqfd: EventFd,
    ) -> std::io::Result<Self> {
        let mut queues = Vec::new();
        let mut kicks = Vec::new();
        for &size in device.queue_sizes() {
            queues.push(
                Queue::new(size)
                    .map_err(|e| std::io::Error::other(format!("queue of {size}: {e:?}")))?,
            );
            kicks.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            queues,
            kicks,
            features_sel: 0,
            acked_sel: 0,
            acked: 0,
            queue_sel: 0,
            status: 0,
            activated: false,
            name: name.to_string(),
        })
    }

    /// The eventfd of each queue, to register as ioeventfds at QueueNotify with the queue index.
    pub fn kick_fds(&self) -> &[EventFd] {
        &self.kicks
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        if self.activated {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            0x00 => MAGIC,
            0x04 => 2,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => match self.features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x34 => q.map_or(0, |q| u32::from(q.max_size())),
            0x44 => q.map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => 0, // ConfigGeneration: our config spaces never change under the driver
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            0x14 => self.features_sel = v,
            0x20 => {
                // Only what we offered can be acked.
                let offered = self.device.features();
                match self.acked_sel {
                    0 => self.acked = (self.acked & !0xffff_ffff) | (u64::from(v) & offered),
                    1 => self.acked = (self.acked & 0xffff_ffff) | ((u64::from(v) << 32) & offered),
                    _ => {}
                }
            }
            0x24 => self.acked_sel = v,
            0x30 => self.queue_sel = v,
            0x38 => {
                if let Some(q) = self.selected() {
                    q.set_size(v as u16);
                }
            }
            0x44 => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            QUEUE_NOTIFY => {
                // Reached only when the ioeventfd did not match (or is not registered).
                if let Some(k) = self.kicks.get(v as usize) {
                    let _ = k.write(1);
                }
            }
            0x64 => self.interrupt.ack(v),
            0x70 => self.set_status(v),
            0x80 => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            0x84 => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            0x90 => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            0x94 => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            0xa4 => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => {}
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected() {
            f(q);
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            if self.activated {
                // The worker owns the queues now; taking them back is not supported, so the
                // device stays as it is (a rebooting guest ends the VMM anyway).
                eprintln!(
                    "ltv-vmm: {}: the driver reset an active device; ignored",
                    self.name
                );
                return;
            }
            self.status = 0;
            self.acked = 0;
            for q in &mut self.queues {
                q.reset();
            }
            return;
        }
        let newly = v & !self.status;
        self.status = v;
        if newly & FEATURES_OK != 0 && self.acked & super::VIRTIO_F_VERSION_1 == 0 {
            // A legacy driver: refuse, it would misread our modern layout.
            self.status &= !FEATURES_OK;
            return;
        }
        if newly & DRIVER_OK != 0
            && v & (ACKNOWLEDGE | DRIVER | FEATURES_OK) == ACKNOWLEDGE | DRIVER | FEATURES_OK
            && v & FAILED == 0
            && !self.activated
        {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let mut queues = Vec::new();
        for (i, (q, k)) in self.queues.iter().zip(&self.kicks).enumerate() {
            if !q.is_valid(&self.mem) {
                eprintln!(
                    "ltv-vmm: {}: queue {i} is not valid (ready {}, size {}); device not started",
                    self.name,
                    q.ready(),
                    q.size()
                );
                self.status |= FAILED;
                return;
            }
            let kick = match k.try_clone() {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("ltv-vmm: {}: eventfd clone: {e}", self.name);
                    self.status |= FAILED;
                    return;
                }
            };
            let queue = match Queue::try_from(q.state()) {
                Ok(mut q) => {
                    q.set_event_idx(self.acked & super::VIRTIO_RING_F_EVENT_IDX != 0);
                    q
                }
                Err(e) => {
                    eprintln!("ltv-vmm: {}: queue {i}: {e:?}", self.name);
                    self.status |= FAILED;
                    return;
                }
            };
            queues.push(ActiveQueue { queue, kick });
        }
        let activation = Activation {
            mem: self.mem.clone(),
            acked_features: self.acked,
            queues,
            interrupt: self.interrupt.clone(),
        };
        match self.device.activate(activation) {
            Ok(()) => self.activated = true,
            Err(e) => {
                eprintln!("ltv-vmm: {}: cannot start: {e}", self.name);
                self.status |= FAILED;
            }
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            self.device.write_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(offset, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    /// Records the acked features and whether event idx is on in its queue.
    struct Dummy {
        activated: Arc<Mutex<Option<(u64, bool)>>>,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            2
        }
        fn features(&self) -> u64 {
            super::super::VIRTIO_F_VERSION_1 | super::super::VIRTIO_RING_F_EVENT_IDX | 1
        }
        fn queue_sizes(&self) -> &[u16] {
            &[16]
        }
        fn activate(&mut self, a: Activation) -> Result<(), String> {
            let event_idx = a.queues.iter().all(|q| q.queue.event_idx_enabled());
            *self.activated.lock().unwrap() = Some((a.acked_features, event_idx));
            Ok(())
        }
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    #[test]
    fn negotiates_and_activates() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let activated = Arc::new(Mutex::new(None));
        let dev = Dummy {
            activated: activated.clone(),
        };
        let mut t = MmioTransport::new("t", Box::new(dev), mem, EventFd::new(0).unwrap()).unwrap();
        assert_eq!(rd(&mut t, 0), MAGIC);
        assert_eq!(rd(&mut t, 4), 2);
        assert_eq!(rd(&mut t, 8), 2);
        wr(&mut t, 0x70, ACKNOWLEDGE | DRIVER);
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10), 1, "VERSION_1 offered in the high word");
        // Ack bit 0, event idx and an unoffered bit 3: bit 3 does not stick.
        wr(&mut t, 0x24, 0);
        wr(&mut t, 0x20, 0b1001 | 1 << 29);
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1);
        wr(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(rd(&mut t, 0x70) & FEATURES_OK, FEATURES_OK);
        wr(&mut t, 0x30, 0);
        assert_eq!(rd(&mut t, 0x34), 16);
        wr(&mut t, 0x38, 16);
        wr(&mut t, 0x80, 0x1000);
        wr(&mut t, 0x90, 0x2000);
        wr(&mut t, 0xa0, 0x3000);
        wr(&mut t, 0x44, 1);
        wr(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(
            *activated.lock().unwrap(),
            Some(((1 << 32) | (1 << 29) | 1, true)),
            "acked features, and event idx on in the queue"
        );
        // Queue registers are frozen once the device runs.
        wr(&mut t, 0x38, 8);
        assert_eq!(t.queues[0].size(), 16);
    }

    #[test]
    fn legacy_driver_is_refused_and_bad_queue_fails() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let activated = Arc::new(Mutex::new(None));
        let dev = Dummy {
            activated: activated.clone(),
        };
        let mut t = MmioTransport::new("t", Box::new(dev), mem, EventFd::new(0).unwrap()).unwrap();
        wr(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(
            rd(&mut t, 0x70) & FEATURES_OK,
            0,
            "no VERSION_1, no FEATURES_OK"
        );
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1);
        wr(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        // Queue never set up: DRIVER_OK must fail the device, not start it.
        wr(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(activated.lock().unwrap().is_none());
        assert_eq!(rd(&mut t, 0x70) & FAILED, FAILED);
    }
}
