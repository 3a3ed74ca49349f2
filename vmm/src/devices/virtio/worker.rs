//! The event loop each virtio device runs on its own thread: epoll over the queue kick
//! eventfds and the device's backend fds (TAP, files, Unix sockets).

use std::io;
use std::os::fd::RawFd;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

pub struct EventLoop {
    epoll: Epoll,
}

impl EventLoop {
    pub fn new() -> io::Result<Self> {
        Ok(EventLoop {
            epoll: Epoll::new()?,
        })
    }

    pub fn add(&self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    pub fn modify(&self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    /// Waits for events and hands each one to `on_event(self, token, events)` until it
    /// returns false. `timeout_ms` of -1 waits forever; on a timeout `on_idle` runs.
    pub fn run(
        &self,
        timeout_ms: i32,
        mut on_event: impl FnMut(&EventLoop, u64, EventSet) -> bool,
        mut on_idle: impl FnMut(&EventLoop) -> bool,
    ) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(timeout_ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("ltv-vmm: virtio worker: epoll_wait: {e}");
                    return;
                }
            };
            if n == 0 && !on_idle(self) {
                return;
            }
            for ev in &events[..n] {
                if !on_event(self, ev.data(), ev.event_set()) {
                    return;
                }
            }
        }
    }
}

/// Runs a device worker on a named thread.
pub fn spawn(name: &str, work: impl FnOnce() + Send + 'static) -> Result<(), String> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(work)
        .map(|_| ())
        .map_err(|e| format!("spawning the {name} worker thread: {e}"))
}
