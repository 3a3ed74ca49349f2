//! The vsock device's state and packet logic, driven by the worker's epoll events but
//! callable directly (tests drive it without a thread).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::conn::{write_packet, Conn, ConnKey, State, BUF_ALLOC};
use super::packet::*;
use crate::devices::virtio::worker::EventLoop;
use crate::devices::virtio::{ActiveQueue, Interrupt};

// Epoll tokens; every Unix socket gets its own from FIRST_SOCKET_TOKEN on.
pub const TOKEN_RX: u64 = 0;
pub const TOKEN_TX: u64 = 1;
pub const TOKEN_EVENT: u64 = 2;
pub const TOKEN_LISTENER: u64 = 3;
pub const TOKEN_TIMER: u64 = 4;
const FIRST_SOCKET_TOKEN: u64 = 16;

/// Host ports we hand out to host-initiated connections, well above the ones guests
/// listen on.
pub const FIRST_HOST_PORT: u32 = 1 << 30;
/// Time a host client gets to send its `CONNECT <port>\n` line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Time the guest gets to answer our REQUEST.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest acceptable CONNECT line ("CONNECT 4294967295\r\n" is 20 bytes).
const MAX_LINE: usize = 32;
/// Bounds on what a guest (or host clients) can make us hold.
const MAX_CONNS: usize = 1024;
const MAX_HANDSHAKES: usize = 64;
const MAX_ORPHAN_RSTS: usize = 256;
/// Largest guest packet payload we take; Linux sends at most 64 KiB, and our credit caps
/// any honest sender at BUF_ALLOC.
const MAX_TX_PAYLOAD: usize = BUF_ALLOC as usize;
/// Largest payload we put in one rx packet.
const MAX_RX_PAYLOAD: usize = 64 * 1024;
/// How often pending deadlines are checked while there are any.
const TICK: Duration = Duration::from_millis(500);

/// A host client that connected but has not sent its CONNECT line yet.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// What a socket token refers to.
enum Slot {
    Handshake(Handshake),
    Conn(ConnKey),
}

/// Why a tx chain was dropped.
enum TxError {
    /// Nothing usable: the chain is dropped.
    Chain(String),
    /// The header is fine but the payload is not; the connection cannot go on.
    Payload(Header, String),
}

pub struct Backend {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    /// The event queue: we never post events (no transport reset to report), but keep it.
    _evq: Queue,
    kicks: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    timer: TimerFd,
    timer_armed: bool,
    /// The listener is off the loop after an accept error (EMFILE...): being level
    /// triggered, it would otherwise wake us in a loop. The next tick puts it back.
    listener_paused: bool,
    pub(super) conns: HashMap<ConnKey, Conn>,
    slots: HashMap<u64, Slot>,
    /// RSTs answering packets for connections we do not know.
    orphan_rsts: VecDeque<Header>,
    next_token: u64,
    next_host_port: u32,
    tx_scratch: Vec<u8>,
    rx_scratch: Vec<u8>,
}

impl Backend {
    /// `queues` are rx, tx and event, in that order.
    pub fn new(
        mem: GuestMemoryMmap,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<Interrupt>,
        guest_cid: u64,
        uds_path: &Path,
        listener: UnixListener,
    ) -> io::Result<Self> {
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx), Some(ev), None) =
            (queues.next(), queues.next(), queues.next(), queues.next())
        else {
            return Err(io::Error::other("vsock needs exactly 3 queues"));
        };
        let timer = TimerFd::new()?;
        // A stale readiness after disarming must not block the worker on read.
        set_nonblocking(timer.as_raw_fd())?;
        listener.set_nonblocking(true)?;
        Ok(Backend {
            mem,
            rxq: rx.queue,
            txq: tx.queue,
            _evq: ev.queue,
            kicks: vec![rx.kick, tx.kick, ev.kick],
            interrupt,
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            timer,
            timer_armed: false,
            listener_paused: false,
            conns: HashMap::new(),
            slots: HashMap::new(),
            orphan_rsts: VecDeque::new(),
            next_token: FIRST_SOCKET_TOKEN,
            next_host_port: FIRST_HOST_PORT,
            tx_scratch: Vec::new(),
            rx_scratch: vec![0; MAX_RX_PAYLOAD],
        })
    }

    /// Puts the kicks, the listener and the timer on the loop.
    pub fn register(&self, el: &EventLoop) -> io::Result<()> {
        for (i, k) in self.kicks.iter().enumerate() {
            el.add(k.as_raw_fd(), TOKEN_RX + i as u64, EventSet::IN)?;
        }
        el.add(self.listener.as_raw_fd(), TOKEN_LISTENER, EventSet::IN)?;
        el.add(self.timer.as_raw_fd(), TOKEN_TIMER, EventSet::IN)
    }

    /// Handles one epoll event, then sends what became sendable and drops what ended.
    pub fn handle_event(&mut self, el: &EventLoop, token: u64, events: EventSet) {
        match token {
            TOKEN_RX | TOKEN_TX | TOKEN_EVENT => {
                // Drain the kick first: buffers added after this will kick again.
                let _ = self.kicks[token as usize].read();
                if token == TOKEN_TX {
                    self.process_tx(el);
                }
            }
            TOKEN_LISTENER => self.accept(el),
            TOKEN_TIMER => {
                let _ = self.timer.wait();
                return self.on_timer(el, Instant::now());
            }
            _ => self.on_socket_event(el, token, events),
        }
        self.settle(el);
    }

    /// A timer tick as of `now`.
    pub fn on_timer(&mut self, el: &EventLoop, now: Instant) {
        if self.listener_paused
            && el
                .add(self.listener.as_raw_fd(), TOKEN_LISTENER, EventSet::IN)
                .is_ok()
        {
            self.listener_paused = false;
        }
        self.check_deadlines(now);
        self.settle(el);
    }

    /// After any change: send what became sendable, drop what ended, re-arm the timer.
    fn settle(&mut self, el: &EventLoop) {
        self.fill_rx();
        self.reap(el);
        self.update_timer();
    }

    /// Takes every packet the guest queued on tx. Each chain is returned at once (the data
    /// is copied out), so the guest gets its buffers back before the host reads.
    pub fn process_tx(&mut self, el: &EventLoop) {
        let mut used = false;
        while let Some(chain) = self.txq.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let parsed = read_tx_packet(chain, &self.mem, &mut self.tx_scratch);
            if let Err(e) = self.txq.add_used(&self.mem, head, 0) {
                eprintln!("ltv-vmm: vsock: tx add_used: {e:?}");
            }
            used = true;
            match parsed {
                Ok(h) => {
                    let payload = std::mem::take(&mut self.tx_scratch);
                    self.on_guest_packet(el, h, &payload);
                    self.tx_scratch = payload;
                }
                Err(TxError::Chain(why)) => {
                    eprintln!("ltv-vmm: vsock: dropped a tx chain: {why}");
                }
                Err(TxError::Payload(h, why)) => {
                    eprintln!("ltv-vmm: vsock: dropped a tx packet: {why}");
                    self.reset(&h);
                }
            }
        }
        if used && self.txq.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_used();
        }
    }

    /// One guest packet; `payload` holds exactly `h.len` bytes.
    fn on_guest_packet(&mut self, el: &EventLoop, h: Header, payload: &[u8]) {
        if h.src_cid != self.guest_cid {
            // Not from our guest's address: answering would only help spoofing.
            eprintln!("ltv-vmm: vsock: dropped a packet from cid {}", h.src_cid);
            return;
        }
        let key = ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        if h.dst_cid != HOST_CID || h.type_ != TYPE_STREAM {
            self.reset(&h);
            return;
        }
        let now = Instant::now();
        let Some(conn) = self.conns.get_mut(&key) else {
            if h.op == OP_REQUEST {
                self.connect_to_host(el, &h, key);
            } else {
                self.reset(&h);
            }
            return;
        };
        conn.update_peer_credit(&h);
        match h.op {
            OP_RESPONSE if conn.state == State::Connecting => {
                // Tell the host client which port it got, then data may flow.
                let ok = format!("OK {}\n", key.local_port);
                if write_line(&mut conn.stream, ok.as_bytes()) {
                    conn.state = State::Established;
                    conn.deadline = None;
                } else {
                    conn.send_rst = true;
                }
            }
            OP_RW if conn.state != State::Connecting => {
                if conn.push_guest_data(payload).is_err() {
                    eprintln!(
                        "ltv-vmm: vsock: guest port {} overran its credit; reset",
                        key.peer_port
                    );
                    conn.send_rst = true;
                }
            }
            OP_CREDIT_UPDATE => {} // the credit was taken above
            OP_CREDIT_REQUEST => conn.send_credit_update = true,
            OP_SHUTDOWN => conn.on_peer_shutdown(h.flags, now),
            OP_RST => conn.dead = true,
            // A REQUEST on a live connection, a RESPONSE we did not ask for, an unknown
            // op: the connection's state is lost, so end it.
            _ => conn.send_rst = true,
        }
    }

    /// A guest REQUEST to host port P: connect to `<uds_path>_P`.
    fn connect_to_host(&mut self, el: &EventLoop, h: &Header, key: ConnKey) {
        if self.conns.len() >= MAX_CONNS {
            self.reset(h);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", h.dst_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(_) => {
                // Nobody listens there (or the backlog is full): refuse like a closed port.
                self.reset(h);
                return;
            }
        };
        let token = self.new_token();
        if let Err(e) = el.add(stream.as_raw_fd(), token, socket_events()) {
            eprintln!("ltv-vmm: vsock: epoll add: {e}");
            self.reset(h);
            return;
        }
        let mut conn = Conn::new(stream, token, key, State::Established);
        conn.update_peer_credit(h);
        conn.send_response = true;
        self.conns.insert(key, conn);
        self.slots.insert(token, Slot::Conn(key));
    }

    /// Answers a packet with a RST: through its connection if there is one, else as an
    /// orphan. A RST is never answered.
    fn reset(&mut self, h: &Header) {
        if h.op == OP_RST {
            return;
        }
        let key = ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        if h.dst_cid == HOST_CID {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.send_rst = true;
                return;
            }
        }
        if self.orphan_rsts.len() >= MAX_ORPHAN_RSTS {
            return;
        }
        self.orphan_rsts.push_back(Header {
            src_cid: h.dst_cid,
            dst_cid: self.guest_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    fn accept(&mut self, el: &EventLoop) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // EMFILE and the like: leave the rest queued until the next tick.
                    eprintln!("ltv-vmm: vsock: accept: {e}");
                    if el.remove(self.listener.as_raw_fd()).is_ok() {
                        self.listener_paused = true;
                    }
                    return;
                }
            };
            let handshakes = self
                .slots
                .values()
                .filter(|s| matches!(s, Slot::Handshake(_)))
                .count();
            if handshakes >= MAX_HANDSHAKES || stream.set_nonblocking(true).is_err() {
                continue; // dropping closes it
            }
            let token = self.new_token();
            if el.add(stream.as_raw_fd(), token, socket_events()).is_err() {
                continue;
            }
            let hs = Handshake {
                stream,
                line: Vec::new(),
                deadline: Instant::now() + HANDSHAKE_TIMEOUT,
            };
            self.slots.insert(token, Slot::Handshake(hs));
        }
    }

    pub fn on_socket_event(&mut self, el: &EventLoop, token: u64, events: EventSet) {
        match self.slots.get_mut(&token) {
            Some(Slot::Handshake(_)) => self.handshake(el, token),
            Some(Slot::Conn(key)) => {
                let Some(conn) = self.conns.get_mut(key) else {
                    return;
                };
                if events.intersects(
                    EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                ) {
                    conn.readable = true;
                }
                if events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
                    conn.flush();
                }
            }
            None => {}
        }
    }

    /// Reads the CONNECT line a byte at a time, so that nothing after the newline (data
    /// the client sends before our OK) is taken out of the socket here.
    fn handshake(&mut self, el: &EventLoop, token: u64) {
        let Some(Slot::Handshake(hs)) = self.slots.get_mut(&token) else {
            return;
        };
        let port = loop {
            let mut b = [0u8];
            match hs.stream.read(&mut b) {
                Ok(0) => break None,
                Ok(_) if b[0] == b'\n' => break parse_connect(&hs.line),
                Ok(_) if hs.line.len() >= MAX_LINE => break None,
                Ok(_) => hs.line.push(b[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => break None,
            }
        };
        let Some(Slot::Handshake(hs)) = self.slots.remove(&token) else {
            return;
        };
        let Some(port) = port else {
            let _ = el.remove(hs.stream.as_raw_fd());
            return; // garbage or EOF: dropping the stream closes it
        };
        if self.conns.len() >= MAX_CONNS {
            let _ = el.remove(hs.stream.as_raw_fd());
            return;
        }
        let key = ConnKey {
            local_port: self.alloc_host_port(),
            peer_port: port,
        };
        let mut conn = Conn::new(hs.stream, token, key, State::Connecting);
        conn.send_request = true;
        conn.deadline = Some(Instant::now() + RESPONSE_TIMEOUT);
        self.conns.insert(key, conn);
        self.slots.insert(token, Slot::Conn(key));
    }

    fn alloc_host_port(&mut self) -> u32 {
        loop {
            let p = self.next_host_port;
            self.next_host_port = p.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.conns.keys().any(|k| k.local_port == p) {
                return p;
            }
        }
    }

    fn new_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    /// Fills guest rx buffers: orphan RSTs first, then the connections in turn, one packet
    /// each per round so one busy stream does not starve the others. Stops when the guest
    /// has no buffers left (its rx kick brings us back) or nobody has anything to send.
    pub fn fill_rx(&mut self) {
        let now = Instant::now();
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        let mut next = 0usize;
        let mut idle = 0usize;
        let mut used = false;
        loop {
            let key = if self.orphan_rsts.is_empty() {
                if idle >= keys.len() {
                    break;
                }
                let k = keys[next % keys.len()];
                next += 1;
                if !self.conns.get(&k).is_some_and(Conn::wants_rx) {
                    idle += 1;
                    continue;
                }
                Some(k)
            } else {
                None
            };
            let Some(chain) = self.rxq.pop_descriptor_chain(&self.mem) else {
                break;
            };
            let head = chain.head_index();
            let mut w = match chain.writer(&self.mem) {
                Ok(w) if w.available_bytes() >= HDR_LEN => w,
                _ => {
                    eprintln!("ltv-vmm: vsock: dropped an rx chain with no room for a header");
                    let _ = self.rxq.add_used(&self.mem, head, 0);
                    used = true;
                    continue;
                }
            };
            let header_only = w.available_bytes() == HDR_LEN;
            let written = match key {
                None => self
                    .orphan_rsts
                    .pop_front()
                    .map(|h| write_packet(&mut w, &h, &[])),
                Some(k) => self
                    .conns
                    .get_mut(&k)
                    .and_then(|c| c.next_packet(&mut w, self.guest_cid, &mut self.rx_scratch, now)),
            };
            match written {
                Some(len) => {
                    let _ = self.rxq.add_used(&self.mem, head, len);
                    used = true;
                    idle = 0;
                }
                None if header_only => {
                    // Only data was due and this buffer cannot carry any; giving it back
                    // would wedge the queue on it.
                    eprintln!("ltv-vmm: vsock: dropped an rx chain too small for data");
                    let _ = self.rxq.add_used(&self.mem, head, 0);
                    used = true;
                    idle += 1;
                }
                None => {
                    // Nothing after all (the socket would block): the buffer stays the
                    // guest's for the next packet.
                    self.rxq.go_to_previous_position();
                    idle += 1;
                }
            }
        }
        if used && self.rxq.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_used();
        }
    }

    /// Gives up on waits that took too long: handshakes are closed, connections reset.
    fn check_deadlines(&mut self, now: Instant) {
        self.slots.retain(|_, s| match s {
            Slot::Handshake(hs) => hs.deadline > now,
            Slot::Conn(_) => true,
        });
        for conn in self.conns.values_mut() {
            if conn.deadline.is_some_and(|d| d <= now) {
                conn.deadline = None;
                conn.send_rst = true;
            }
        }
    }

    /// Forgets finished connections; dropping the stream closes it and leaves the epoll set.
    fn reap(&mut self, el: &EventLoop) {
        let slots = &mut self.slots;
        self.conns.retain(|_, c| {
            if c.dead {
                let _ = el.remove(c.stream.as_raw_fd());
                slots.remove(&c.token);
            }
            !c.dead
        });
    }

    /// The timer ticks only while something has a deadline.
    fn update_timer(&mut self) {
        let waiting = self.listener_paused
            || self.slots.values().any(|s| matches!(s, Slot::Handshake(_)))
            || self.conns.values().any(|c| c.deadline.is_some());
        if waiting == self.timer_armed {
            return;
        }
        let res = if waiting {
            self.timer.reset(TICK, Some(TICK))
        } else {
            self.timer.clear()
        };
        match res {
            Ok(()) => self.timer_armed = waiting,
            Err(e) => eprintln!("ltv-vmm: vsock: timerfd: {e}"),
        }
    }

    #[cfg(test)]
    pub(super) fn handshakes(&self) -> usize {
        self.slots
            .values()
            .filter(|s| matches!(s, Slot::Handshake(_)))
            .count()
    }
}

/// Copies a tx packet out of its chain: the header into a Header, the payload into
/// `payload` (resized to exactly `len`).
fn read_tx_packet(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    payload: &mut Vec<u8>,
) -> Result<Header, TxError> {
    let mut r = chain
        .reader(mem)
        .map_err(|e| TxError::Chain(format!("{e:?}")))?;
    let mut hb = [0u8; HDR_LEN];
    if r.available_bytes() < HDR_LEN {
        return Err(TxError::Chain(format!(
            "{} readable bytes, less than a header",
            r.available_bytes()
        )));
    }
    r.read_exact(&mut hb)
        .map_err(|e| TxError::Chain(e.to_string()))?;
    let h = Header::from_bytes(&hb);
    let len = h.len as usize;
    if len > r.available_bytes() || len > MAX_TX_PAYLOAD {
        return Err(TxError::Payload(
            h,
            format!("len {len} but {} bytes follow", r.available_bytes()),
        ));
    }
    payload.resize(len, 0);
    r.read_exact(payload)
        .map_err(|e| TxError::Payload(h, e.to_string()))?;
    Ok(h)
}

/// `CONNECT <port>`, with an optional `\r` before the newline.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    line.strip_prefix("CONNECT ")?.trim().parse().ok()
}

/// Writes a short reply on a fresh socket, whose empty send buffer takes it whole.
fn write_line(stream: &mut UnixStream, line: &[u8]) -> bool {
    use std::io::Write;
    stream.write_all(line).is_ok()
}

fn socket_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

fn set_nonblocking(fd: i32) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own, with no pointers involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Connects a nonblocking Unix stream socket. A Unix connect completes or fails at once
/// (EAGAIN when the listener's backlog is full), so the worker never waits on a host peer.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns; the stream closes it from here on.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data, valid all zeros.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: addr is a valid sockaddr_un and len stays within it.
    let rc = unsafe {
        libc::connect(
            fd,
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests;
