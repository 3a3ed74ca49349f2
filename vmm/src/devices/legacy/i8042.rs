//! Just enough i8042 for `reboot=k`: a write of 0xFE to port 0x64 (CPU reset) stops the VM.

use std::sync::mpsc::Sender;

use crate::devices::bus::BusDevice;
use crate::VmmEvent;

pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
const CMD_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    events: Sender<VmmEvent>,
}

impl I8042 {
    pub fn new(events: Sender<VmmEvent>) -> Self {
        I8042 { events }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty; data 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == CMD_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            let _ = self.events.send(VmmEvent::GuestReset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut d = I8042::new(tx);
        d.write(0, &[0xfe]);
        assert!(rx.try_recv().is_err());
        d.write(4, &[0xfe]);
        assert!(matches!(rx.try_recv(), Ok(VmmEvent::GuestReset)));
    }
}
