//! A user-space virtio-vsock device speaking Firecracker's "hybrid vsock" convention: the
//! guest's vsock is reached through one Unix socket on the host.
//!
//! - Host → guest: a client connects to `uds_path` and writes `CONNECT <port>\n`; once the
//!   guest accepts, it reads `OK <host port>\n` and the socket is the stream.
//! - Guest → host: a guest connecting to CID 2 port P reaches a listener at `<uds_path>_P`.
//!
//! Both directions use the virtio credit scheme, so neither side can make the other buffer
//! more than it advertised.

mod backend;
mod conn;
mod packet;

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use super::worker::{self, EventLoop};
use super::{read_config_bytes, Activation, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1};
use backend::Backend;

const QUEUE_SIZES: [u16; 3] = [256; 3];

pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    /// Moves to the worker on activation.
    listener: Option<UnixListener>,
}

impl Vsock {
    /// Binds the host-side listener at `uds_path`, replacing a stale socket left there by an
    /// earlier run (but refusing to delete anything that is not a socket).
    pub fn new(guest_cid: u64, uds_path: &Path) -> io::Result<Self> {
        match std::fs::symlink_metadata(uds_path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(uds_path)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", uds_path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(uds_path)?;
        listener.set_nonblocking(true)?;
        Ok(Vsock {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener: Some(listener),
        })
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    /// The config space is the guest's CID, a little-endian u64.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), String> {
        let listener = self
            .listener
            .take()
            .ok_or("vsock: activated twice".to_string())?;
        let mut backend = Backend::new(
            activation.mem,
            activation.queues,
            activation.interrupt,
            self.guest_cid,
            &self.uds_path,
            listener,
        )
        .map_err(|e| format!("vsock: {e}"))?;
        let el = EventLoop::new().map_err(|e| format!("vsock: epoll: {e}"))?;
        backend
            .register(&el)
            .map_err(|e| format!("vsock: epoll: {e}"))?;
        worker::spawn("vsock", move || {
            // Deadlines come from the backend's timerfd, so the loop can sleep indefinitely.
            el.run(
                -1,
                |el, token, events| {
                    backend.handle_event(el, token, events);
                    true
                },
                |_| true,
            );
        })
    }
}
