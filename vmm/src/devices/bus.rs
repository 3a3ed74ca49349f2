//! An address-range bus (PIO or MMIO) dispatching vCPU exits to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a bus; offsets are relative to its base.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus range {0:#x}+{1:#x} overlaps an existing device")]
    Overlap(u64, u64),
}

struct Entry {
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// Devices keyed by base address. Unclaimed reads return zeros, unclaimed writes are dropped,
/// as on real hardware with nothing decoding the address.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base + len;
        let clash = self
            .devices
            .iter()
            .any(|(b, e)| base < b + e.len && *b < end);
        if len == 0 || clash {
            return Err(BusError::Overlap(base, len));
        }
        self.devices.insert(base, Entry { len, dev });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Entry)> {
        let (base, e) = self.devices.range(..=addr).next_back()?;
        (addr < base + e.len).then_some((addr - base, e))
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((off, e)) => e
                .dev
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read(off, data),
            None => data.fill(0),
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((off, e)) = self.find(addr) {
            e.dev
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write(off, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, off: u64, d: &mut [u8]) {
            d[0] = self.0 + off as u8;
        }
        fn write(&mut self, _: u64, d: &[u8]) {
            self.0 = d[0];
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Reg(10))), 0x3f8, 8).unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Reg(0))), 0x3ff, 2).is_err());
        bus.insert(Arc::new(Mutex::new(Reg(0))), 0x400, 1).unwrap();
        let mut d = [0xffu8];
        bus.read(0x3fa, &mut d);
        assert_eq!(d[0], 12);
        bus.write(0x3f8, &[20]);
        bus.read(0x3f8, &mut d);
        assert_eq!(d[0], 20);
        bus.read(0x500, &mut d);
        assert_eq!(d[0], 0);
    }
}
