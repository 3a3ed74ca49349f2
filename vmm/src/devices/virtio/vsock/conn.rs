//! One stream connection between a guest port and a host Unix socket, with the credit
//! accounting of both directions and the control packets it still owes the guest.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use virtio_queue::Writer;

use super::packet::*;

/// Receive buffer we advertise per connection: the most guest→host bytes we ever hold.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// How far our fwd_cnt may advance before we tell the guest without being asked: a
/// quarter keeps a guest sender busy without a packet per write.
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;
/// How long we wait for the guest's RST after our SHUTDOWN, or for our buffer to drain
/// after the guest's, before resetting the connection ourselves.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Our end: the host port (the guest's dst_port).
    pub local_port: u32,
    /// The guest's port (its src_port).
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent (or owed), waiting for the guest's RESPONSE.
    Connecting,
    Established,
    /// A SHUTDOWN went one way or the other; waiting for RST or a drained buffer.
    Closing,
}

pub struct Conn {
    pub stream: UnixStream,
    pub token: u64,
    pub key: ConnKey,
    pub state: State,
    /// When the current wait (RESPONSE, RST, drain) gives up with a RST.
    pub deadline: Option<Instant>,

    // Control packets owed to the guest, sent as rx buffers allow.
    pub send_request: bool,
    pub send_response: bool,
    pub send_shutdown: bool,
    pub send_rst: bool,
    pub send_credit_update: bool,
    /// A CREDIT_REQUEST is out and no new credit arrived since: don't ask again.
    credit_requested: bool,

    /// The socket may have bytes to read: edge-triggered epoll only tells us once, so this
    /// stays set until a read would block, across stalls on credit or rx buffers.
    pub readable: bool,
    uds_eof: bool,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    write_shut: bool,
    /// The connection is finished; the backend drops it (closing the socket).
    pub dead: bool,

    /// Guest→host bytes the socket has not taken yet; the guest honouring our credit keeps
    /// it within BUF_ALLOC.
    tx_buf: VecDeque<u8>,
    /// Bytes written to the socket (our fwd_cnt), and the value the guest last saw.
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Host→guest bytes sent, and the guest's receive window as of its last packet.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
}

impl Conn {
    pub fn new(stream: UnixStream, token: u64, key: ConnKey, state: State) -> Self {
        Conn {
            stream,
            token,
            key,
            state,
            deadline: None,
            send_request: false,
            send_response: false,
            send_shutdown: false,
            send_rst: false,
            send_credit_update: false,
            credit_requested: false,
            readable: true,
            uds_eof: false,
            peer_shutdown: 0,
            write_shut: false,
            dead: false,
            tx_buf: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
        }
    }

    /// Takes the guest's receive window from any packet it sent on this connection.
    pub fn update_peer_credit(&mut self, h: &Header) {
        if h.buf_alloc != self.peer_buf_alloc || h.fwd_cnt != self.peer_fwd_cnt {
            self.credit_requested = false;
        }
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }

    /// Bytes the guest can still take: its buffer minus what is in flight. Saturating, so a
    /// guest that shrinks its buffer or reports a bogus fwd_cnt just stops the flow.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.uds_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    fn credit_update_due(&self) -> bool {
        self.state != State::Connecting
            && (self.send_credit_update
                || self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD)
    }

    /// Data waits on the socket but the guest gave no credit: ask once.
    fn credit_request_due(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.uds_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() == 0
            && !self.credit_requested
    }

    /// Whether `next_packet` may have something for an rx buffer.
    pub fn wants_rx(&self) -> bool {
        !self.dead
            && (self.send_rst
                || self.send_request
                || self.send_response
                || self.send_shutdown
                || self.can_send_data()
                || self.credit_update_due()
                || self.credit_request_due())
    }

    /// Writes the next packet this connection owes the guest into `w` (which has room for
    /// at least a header) and returns its length, or None if there is nothing to send now.
    /// Data comes straight from the socket, bounded by the guest's credit and the buffer.
    pub fn next_packet(
        &mut self,
        w: &mut Writer,
        guest_cid: u64,
        scratch: &mut [u8],
        now: Instant,
    ) -> Option<u32> {
        if self.dead {
            return None;
        }
        if self.send_rst {
            return Some(self.emit_rst(w, guest_cid));
        }
        if self.send_request {
            self.send_request = false;
            return Some(self.emit(w, guest_cid, OP_REQUEST, 0, &[]));
        }
        if self.send_response {
            self.send_response = false;
            return Some(self.emit(w, guest_cid, OP_RESPONSE, 0, &[]));
        }
        if self.can_send_data() {
            let room = w.available_bytes().saturating_sub(HDR_LEN);
            let cap = room.min(self.peer_credit() as usize).min(scratch.len());
            if cap > 0 {
                if let Some(n) = self.read_socket(&mut scratch[..cap]) {
                    self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                    return Some(self.emit(w, guest_cid, OP_RW, 0, &scratch[..n]));
                }
                if self.send_rst {
                    return Some(self.emit_rst(w, guest_cid));
                }
            }
        }
        if self.send_shutdown {
            self.send_shutdown = false;
            self.state = State::Closing;
            self.deadline = Some(now + CLOSE_TIMEOUT);
            return Some(self.emit(w, guest_cid, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, &[]));
        }
        if self.credit_update_due() {
            return Some(self.emit(w, guest_cid, OP_CREDIT_UPDATE, 0, &[]));
        }
        if self.credit_request_due() {
            self.credit_requested = true;
            return Some(self.emit(w, guest_cid, OP_CREDIT_REQUEST, 0, &[]));
        }
        None
    }

    /// Reads host bytes; None when there are none now, with the flags saying why (would
    /// block, EOF → SHUTDOWN owed, error → RST owed).
    fn read_socket(&mut self, buf: &mut [u8]) -> Option<usize> {
        loop {
            match self.stream.read(buf) {
                Ok(0) => {
                    self.readable = false;
                    self.uds_eof = true;
                    self.send_shutdown = true;
                    return None;
                }
                Ok(n) => return Some(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return None;
                }
                Err(_) => {
                    self.readable = false;
                    self.send_rst = true;
                    return None;
                }
            }
        }
    }

    fn emit_rst(&mut self, w: &mut Writer, guest_cid: u64) -> u32 {
        self.send_rst = false;
        self.dead = true;
        self.emit(w, guest_cid, OP_RST, 0, &[])
    }

    /// Every packet carries our current window, so it also counts as a credit update.
    fn emit(&mut self, w: &mut Writer, guest_cid: u64, op: u16, flags: u32, data: &[u8]) -> u32 {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.send_credit_update = false;
        let h = Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: data.len() as u32,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        };
        write_packet(w, &h, data)
    }

    /// Takes guest→host bytes: straight to the socket when nothing is queued, the rest
    /// buffered. Err when the guest overran the credit we gave it.
    pub fn push_guest_data(&mut self, data: &[u8]) -> Result<(), ()> {
        if self.tx_buf.len() + data.len() > BUF_ALLOC as usize {
            return Err(());
        }
        let mut rest = data;
        if self.tx_buf.is_empty() {
            let (n, failed) = write_to(&mut self.stream, rest);
            self.delivered(n, failed);
            rest = &rest[n..];
        }
        self.tx_buf.extend(rest);
        Ok(())
    }

    fn delivered(&mut self, n: usize, failed: bool) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        if failed {
            // The host end went away (EPIPE, ...): nothing more can be delivered.
            self.send_rst = true;
        }
    }

    /// Moves buffered guest bytes to the socket (on EPOLLOUT), then carries out a shutdown
    /// the guest asked for once nothing is left to deliver.
    pub fn flush(&mut self) {
        while !self.tx_buf.is_empty() && !self.send_rst {
            let (front, _) = self.tx_buf.as_slices();
            let len = front.len();
            let (n, failed) = write_to(&mut self.stream, front);
            self.tx_buf.drain(..n);
            self.delivered(n, failed);
            if n < len {
                break;
            }
        }
        if !self.tx_buf.is_empty() || self.send_rst || self.dead {
            return;
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.write_shut {
            // The host reader sees EOF, and may still answer if the guest reads on.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.write_shut = true;
        }
        if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
            // Fully closed by the guest and all delivered: the RST ends it for both sides.
            self.send_rst = true;
        }
    }

    /// The guest's SHUTDOWN: stop what it said, closing for good once both ways are off.
    pub fn on_peer_shutdown(&mut self, flags: u32, now: Instant) {
        self.peer_shutdown |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
        if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
            self.state = State::Closing;
            self.deadline = Some(now + CLOSE_TIMEOUT);
        }
        self.flush();
    }

    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.tx_buf.len()
    }

    #[cfg(test)]
    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt
    }
}

/// Writes what the socket takes now; the count, and whether the socket failed for good.
fn write_to(stream: &mut UnixStream, data: &[u8]) -> (usize, bool) {
    let mut done = 0;
    while done < data.len() {
        match stream.write(&data[done..]) {
            Ok(0) => return (done, true),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => return (done, true),
        }
    }
    (done, false)
}

/// Writes one packet into an rx chain and returns the bytes written. The caller checked
/// the room for the header and sized the payload, so a failure here is a guest memory
/// fault; it is logged and the buffer returned short.
pub fn write_packet(w: &mut Writer, h: &Header, data: &[u8]) -> u32 {
    if let Err(e) = w.write_all(&h.to_bytes()).and_then(|_| w.write_all(data)) {
        eprintln!("ltv-vmm: vsock: writing an rx packet: {e}");
    }
    w.bytes_written() as u32
}
