//! COM1: a vm-superio 16550 whose output goes to the console log (and optionally stdout),
//! with its interrupt raised through an irqfd. The console also watches for the kernel's
//! halt/power-off and panic lines, since without ACPI a guest `poweroff` only halts the CPU.

use std::fs::File;
use std::io::Write;
use std::sync::mpsc::Sender;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::VmmEvent;

/// Raises the UART interrupt by signalling an eventfd wired to the IRQ via KVM_IRQFD.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The line the project's guest /init prints once it is up (guest-kernel/init.c).
pub const READY_MARKER: &str = "LTV-READY";

/// Kernel lines that mean the guest is done, and whether that is a clean stop.
const MARKERS: &[(&str, bool)] = &[
    ("reboot: Power down", true),
    // Also "reboot: Power off not available: System halted instead" (no ACPI/pm_power_off).
    ("System halted", true),
    ("Kernel panic - not syncing", false),
];

/// Console sink: log file, optional stdout, and a line watcher.
pub struct Console {
    log: File,
    stdout: bool,
    line: Vec<u8>,
    events: Sender<VmmEvent>,
}

impl Console {
    pub fn new(log: File, stdout: bool, events: Sender<VmmEvent>) -> Self {
        Console {
            log,
            stdout,
            line: Vec::with_capacity(256),
            events,
        }
    }

    fn watch(&mut self, byte: u8) {
        if byte != b'\n' {
            if self.line.len() < 1024 {
                self.line.push(byte);
            }
            return;
        }
        let line = String::from_utf8_lossy(&self.line);
        if line.trim_end() == READY_MARKER {
            let _ = self.events.send(VmmEvent::GuestReady);
        }
        for (marker, clean) in MARKERS {
            if line.contains(marker) {
                let ev = if *clean {
                    VmmEvent::GuestHalted
                } else {
                    VmmEvent::GuestPanic(line.trim().to_string())
                };
                let _ = self.events.send(ev);
            }
        }
        self.line.clear();
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.log.write_all(buf)?;
        if self.stdout {
            let _ = std::io::stdout().write_all(buf);
        }
        for b in buf {
            self.watch(*b);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // File writes are unbuffered; stdout is flushed so `console_stdout` is live.
        if self.stdout {
            let _ = std::io::stdout().flush();
        }
        Ok(())
    }
}

pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, Console>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, console: Console) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger(irq), console),
        }
    }
}

impl SerialDevice {
    /// Queues guest input; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(input).unwrap_or(0)
    }
}

/// Feeds our stdin into the guest UART (for `ltv.init=shell`), a FIFO's worth at a time.
pub fn spawn_stdin_reader(
    dev: std::sync::Arc<std::sync::Mutex<SerialDevice>>,
) -> std::io::Result<()> {
    use std::io::Read;
    std::thread::Builder::new()
        .name("ltv-stdin".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin().lock();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 {
                    return;
                }
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let k = dev
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .enqueue_input(rest);
                    rest = &rest[k..];
                    if k == 0 {
                        // FIFO full: the guest has not read yet.
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
        })?;
    Ok(())
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.serial.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            // An output error (full disk) must not kill the guest; drop the byte.
            let _ = self.serial.write(offset as u8, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn writes_log_and_detects_markers() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        let console = Console::new(tmp.reopen().unwrap(), false, tx);
        let mut dev = SerialDevice::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), console);
        for b in b"hello\nLTV-READY\r\nreboot: Power off not available: System halted instead\n" {
            dev.write(0, &[*b]);
        }
        assert!(matches!(rx.try_recv(), Ok(VmmEvent::GuestReady)));
        let mut s = String::new();
        tmp.read_to_string(&mut s).unwrap();
        assert!(s.starts_with("hello\n"));
        assert!(matches!(rx.try_recv(), Ok(VmmEvent::GuestHalted)));
        // LSR (offset 5) reports the transmitter empty so the guest keeps writing.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        // Input lands in the receive buffer: LSR data-ready, then RBR (offset 0) returns it.
        assert_eq!(dev.enqueue_input(b"ls"), 2);
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x01, 0);
        let mut rbr = [0u8];
        dev.read(0, &mut rbr);
        assert_eq!(rbr[0], b'l');
    }
}
