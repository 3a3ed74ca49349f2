//! The backend driven by hand: a minimal driver fills the queues in guest memory, real Unix
//! sockets play the host side, and the epoll loop is run until it has nothing left to do.
//!
//! The driver side is written here rather than taken from `virtio_queue::mock`: its
//! `MockSplitQueue` places the used ring 256 bytes after the avail ring (element count
//! taken as bytes), so the two overlap once more than 128 buffers went round.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::virtio::vsock::conn::BUF_ALLOC;

const GUEST_CID: u64 = 3;
const QSIZE: u16 = 256;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const RX_BUF_BASE: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x2000;
/// What Linux posts: a header plus 4 KiB.
const RX_BUF_LEN: u32 = 4096 + HDR_LEN as u32;
const TX_BUF_BASE: u64 = 0x40_0000;
const TX_SLOT: u64 = 0x1_1000;
const TX_SLOTS: u16 = QSIZE / 2;

fn test_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap()
}

/// The driver's view of one split queue: descriptor table, avail ring and used ring in
/// separate pages from `base`.
struct Ring<'a> {
    mem: &'a GuestMemoryMmap,
    base: u64,
}

impl Ring<'_> {
    fn avail(&self) -> u64 {
        self.base + 0x1000
    }

    fn used(&self) -> u64 {
        self.base + 0x2000
    }

    fn create_queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.try_set_desc_table_address(GuestAddress(self.base))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail()))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used()))
            .unwrap();
        q.set_ready(true);
        assert!(q.is_valid(self.mem));
        q
    }

    /// Stores descriptors (addr, len, flags) as one chain from index `head` and makes it
    /// available.
    fn publish(&self, head: u16, descs: &[(u64, u32, u16)]) {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = head + i as u16;
            let last = i + 1 == descs.len();
            let flags = if last { flags } else { flags | F_NEXT };
            let mut d = Vec::with_capacity(16);
            d.extend_from_slice(&addr.to_le_bytes());
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&flags.to_le_bytes());
            d.extend_from_slice(&(idx + 1).to_le_bytes());
            let at = GuestAddress(self.base + u64::from(idx) * 16);
            self.mem.write_slice(&d, at).unwrap();
        }
        let idx: u16 = self.mem.read_obj(GuestAddress(self.avail() + 2)).unwrap();
        let slot = GuestAddress(self.avail() + 4 + u64::from(idx % QSIZE) * 2);
        self.mem.write_obj(head, slot).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(self.avail() + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used() + 2)).unwrap()
    }

    /// The i-th used element, as (id, len).
    fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used() + 4 + u64::from(i % QSIZE) * 8;
        let id = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }
}

/// The driver's side of the rx and tx queues.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    rx: Ring<'a>,
    tx: Ring<'a>,
    ev: Ring<'a>,
    rx_free: Vec<u16>,
    rx_seen: u16,
    tx_seq: u16,
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        Guest {
            mem,
            rx: Ring { mem, base: 0 },
            tx: Ring {
                mem,
                base: 0x1_0000,
            },
            ev: Ring {
                mem,
                base: 0x2_0000,
            },
            rx_free: (0..QSIZE).rev().collect(),
            rx_seen: 0,
            tx_seq: 0,
        }
    }

    fn add_rx(&mut self, n: usize) {
        for _ in 0..n {
            let id = self.rx_free.pop().expect("rx descriptors left");
            self.add_rx_desc(id, RX_BUF_LEN, F_WRITE);
        }
    }

    fn add_rx_desc(&mut self, id: u16, len: u32, flags: u16) {
        self.rx
            .publish(id, &[(RX_BUF_BASE + u64::from(id) * RX_SLOT, len, flags)]);
    }

    /// Used rx buffers since the last call, as (id, len); the ids go back to the free list.
    fn recv_raw(&mut self) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        while self.rx.used_idx() != self.rx_seen {
            let (id, len) = self.rx.used_elem(self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let id = u16::try_from(id).expect("a valid head index");
            out.push((id, len));
            self.rx_free.push(id);
        }
        out
    }

    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.recv_raw()
            .into_iter()
            .map(|(id, len)| {
                assert!(len as usize >= HDR_LEN, "a used rx buffer of {len} bytes");
                let addr = GuestAddress(RX_BUF_BASE + u64::from(id) * RX_SLOT);
                let mut b = vec![0u8; len as usize];
                self.mem.read_slice(&mut b, addr).unwrap();
                let h = Header::from_bytes(b[..HDR_LEN].try_into().unwrap());
                assert_eq!(h.len as usize, b.len() - HDR_LEN, "header len matches");
                (h, b[HDR_LEN..].to_vec())
            })
            .collect()
    }

    /// Queues raw descriptors (addr, len, flags) as one tx chain, contents already written.
    fn send_descs(&mut self, descs: &[(u64, u32, u16)]) {
        let base = (self.tx_seq % TX_SLOTS) * 2;
        assert!(descs.len() <= 2);
        self.tx_seq = self.tx_seq.wrapping_add(1);
        self.tx.publish(base, descs);
    }

    fn slot_addr(&self) -> u64 {
        TX_BUF_BASE + u64::from(self.tx_seq % TX_SLOTS) * TX_SLOT
    }

    /// Queues a packet with the header and the payload in separate descriptors.
    fn send(&mut self, mut h: Header, payload: &[u8]) {
        h.len = payload.len() as u32;
        let a = self.slot_addr();
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(a))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(a + 0x100))
            .unwrap();
        if payload.is_empty() {
            self.send_descs(&[(a, HDR_LEN as u32, 0)]);
        } else {
            self.send_descs(&[(a, HDR_LEN as u32, 0), (a + 0x100, payload.len() as u32, 0)]);
        }
    }

    /// Queues a packet with the header and the payload in one descriptor.
    fn send_flat(&mut self, mut h: Header, payload: &[u8]) {
        h.len = payload.len() as u32;
        let a = self.slot_addr();
        let mut b = h.to_bytes().to_vec();
        b.extend_from_slice(payload);
        self.mem.write_slice(&b, GuestAddress(a)).unwrap();
        self.send_descs(&[(a, b.len() as u32, 0)]);
    }

    fn tx_used(&self) -> Vec<(u32, u32)> {
        (0..self.tx.used_idx())
            .map(|i| self.tx.used_elem(i))
            .collect()
    }
}

/// A guest packet from `guest_port` to host port `host_port`.
fn pkt(op: u16, guest_port: u32, host_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    uds: PathBuf,
    backend: Backend,
    el: EventLoop,
    kicks: Vec<EventFd>,
    irq: EventFd,
}

impl Harness {
    fn new(mem: &GuestMemoryMmap, g: &Guest) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let mut queues = Vec::new();
        let mut kicks = Vec::new();
        for q in [&g.rx, &g.tx, &g.ev] {
            let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            kicks.push(kick.try_clone().unwrap());
            queues.push(ActiveQueue {
                queue: q.create_queue(),
                kick,
            });
        }
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let backend =
            Backend::new(mem.clone(), queues, interrupt, GUEST_CID, &uds, listener).unwrap();
        let el = EventLoop::new().unwrap();
        backend.register(&el).unwrap();
        Harness {
            _dir: dir,
            uds,
            backend,
            el,
            kicks,
            irq,
        }
    }

    /// Runs the loop until no event is pending.
    fn drive(&mut self) {
        let b = &mut self.backend;
        self.el.run(
            0,
            |el, token, events| {
                b.handle_event(el, token, events);
                true
            },
            |_| false,
        );
    }

    fn kick_tx(&mut self) {
        self.kicks[1].write(1).unwrap();
        self.drive();
    }

    fn kick_rx(&mut self) {
        self.kicks[0].write(1).unwrap();
        self.drive();
    }

    fn interrupted(&self) -> bool {
        self.irq.read().is_ok()
    }

    fn host_listener(&self, port: u32) -> UnixListener {
        let mut p = self.uds.clone().into_os_string();
        p.push(format!("_{port}"));
        UnixListener::bind(p).unwrap()
    }

    fn conn(&self, local_port: u32, peer_port: u32) -> Option<&Conn> {
        self.backend.conns.get(&ConnKey {
            local_port,
            peer_port,
        })
    }
}

fn timeout_stream(s: &UnixStream) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
}

/// The device closed its end: EOF, or a reset when it left our bytes unread.
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

fn ops(pkts: &[(Header, Vec<u8>)]) -> Vec<u16> {
    pkts.iter().map(|(h, _)| h.op).collect()
}

/// Reads the host's `OK <port>\n` reply.
fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8];
    while b[0] != b'\n' {
        s.read_exact(&mut b).unwrap();
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

#[test]
fn guest_connects_to_a_host_listener_and_data_flows_both_ways() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let mut h = Harness::new(&mem, &g);
    let listener = h.host_listener(52);
    g.add_rx(8);

    g.send(pkt(OP_REQUEST, 1234, 52), &[]);
    h.kick_tx();
    assert_eq!(g.tx_used().len(), 1, "the tx chain is returned");
    assert!(h.interrupted());
    let p = g.recv();
    assert_eq!(ops(&p), [OP_RESPONSE]);
    let r = p[0].0;
    assert_eq!((r.src_cid, r.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!((r.src_port, r.dst_port), (52, 1234));
    assert_eq!(
        (r.type_, r.buf_alloc, r.fwd_cnt),
        (TYPE_STREAM, BUF_ALLOC, 0)
    );
    let (mut s, _) = listener.accept().unwrap();
    timeout_stream(&s);

    // Header and payload split across descriptors, then sharing one.
    g.send(pkt(OP_RW, 1234, 52), b"hello ");
    g.send_flat(pkt(OP_RW, 1234, 52), b"from guest");
    h.kick_tx();
    let mut got = [0u8; 16];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello from guest");

    s.write_all(b"hello from host").unwrap();
    h.drive();
    let p = g.recv();
    assert_eq!(ops(&p), [OP_RW]);
    assert_eq!(p[0].1, b"hello from host");
    assert_eq!((p[0].0.src_port, p[0].0.dst_port), (52, 1234));
    assert_eq!(
        p[0].0.fwd_cnt, 16,
        "every packet reports the bytes delivered"
    );

    // The guest closes: the host sees EOF, the guest gets its RST, the connection is gone.
    let mut sd = pkt(OP_SHUTDOWN, 1234, 52);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(sd, &[]);
    h.kick_tx();
    assert_eq!(ops(&g.recv()), [OP_RST]);
    assert!(closed(&mut s));
    assert!(h.backend.conns.is_empty());
}

#[test]
fn refused_and_unknown_connections_get_rst() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let mut h = Harness::new(&mem, &g);
    g.add_rx(8);

    g.send(pkt(OP_REQUEST, 1000, 99), &[]); // nobody listens on _99
    g.send(pkt(OP_RW, 1001, 98), b"stray"); // no such connection
    g.send(pkt(OP_RST, 1002, 97), &[]); // a RST is never answered
    let mut spoofed = pkt(OP_REQUEST, 1003, 96);
    spoofed.src_cid = 7; // not our guest: dropped silently
    g.send(spoofed, &[]);
    h.kick_tx();
    let p = g.recv();
    assert_eq!(ops(&p), [OP_RST, OP_RST]);
    assert_eq!((p[0].0.src_port, p[0].0.dst_port), (99, 1000));
    assert_eq!((p[1].0.src_port, p[1].0.dst_port), (98, 1001));
    assert_eq!(p[0].0.dst_cid, GUEST_CID);
    assert!(h.backend.conns.is_empty());
}

#[test]
fn host_connect_gets_a_port_after_the_guest_accepts() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let mut h = Harness::new(&mem, &g);
    g.add_rx(8);

    let mut c = UnixStream::connect(&h.uds).unwrap();
    timeout_stream(&c);
    // Data right behind the CONNECT line must wait for the guest, not get lost.
    c.write_all(b"CONNECT 1234\nearly").unwrap();
    h.drive();
    let p = g.recv();
    assert_eq!(ops(&p), [OP_REQUEST]);
    let r = p[0].0;
    assert_eq!((r.src_cid, r.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!((r.src_port, r.dst_port), (FIRST_HOST_PORT, 1234));
    assert_eq!(r.type_, TYPE_STREAM);

    g.send(pkt(OP_RESPONSE, 1234, FIRST_HOST_PORT), &[]);
    h.kick_tx();
    assert_eq!(read_line(&mut c), format!("OK {FIRST_HOST_PORT}\n"));
    let p = g.recv();
    assert_eq!(ops(&p), [OP_RW]);
    assert_eq!(p[0].1, b"early");

    g.send(pkt(OP_RW, 1234, FIRST_HOST_PORT), b"pong");
    h.kick_tx();
    let mut b = [0u8; 4];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");

    // A second client gets the next port.
    let mut c2 = UnixStream::connect(&h.uds).unwrap();
    c2.write_all(b"CONNECT 1234\r\n").unwrap();
    h.drive();
    let p = g.recv();
    assert_eq!(ops(&p), [OP_REQUEST]);
    assert_eq!(p[0].0.src_port, FIRST_HOST_PORT + 1);

    // Host EOF: SHUTDOWN both ways to the guest, whose RST ends it.
    drop(c);
    h.drive();
    let p = g.recv();
    assert_eq!(ops(&p), [OP_SHUTDOWN]);
    assert_eq!(p[0].0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    g.send(pkt(OP_RST, 1234, FIRST_HOST_PORT), &[]);
    h.kick_tx();
    assert!(h.conn(FIRST_HOST_PORT, 1234).is_none());
    assert!(h.conn(FIRST_HOST_PORT + 1, 1234).is_some());
}

#[test]
fn host_connect_garbage_refusal_and_timeouts_close_the_socket() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let mut h = Harness::new(&mem, &g);
    g.add_rx(8);

    let mut garbage = UnixStream::connect(&h.uds).unwrap();
    timeout_stream(&garbage);
    garbage.write_all(b"HELLO 5\n").unwrap();
    let mut too_big = UnixStream::connect(&h.uds).unwrap();
    timeout_stream(&too_big);
    too_big.write_all(b"CONNECT 99999999999\n").unwrap();
    let mut endless = UnixStream::connect(&h.uds).unwrap();
    timeout_stream(&endless);
    endless.write_all(&[b'7'; 100]).unwrap();
    h.drive();
    assert!(closed(&mut garbage));
    assert!(closed(&mut too_big));
    assert!(closed(&mut endless));
    assert!(g.recv().is_empty(), "nothing reaches the guest");

    // The guest refuses.
    let mut refused = UnixStream::connect(&h.uds).unwrap();
    timeout_stream(&refused);
    refused.write_all(b"CONNECT 5\n").unwrap();
    h.drive();
    let p = g.recv();
    assert_eq!(ops(&p), [OP_REQUEST]);
    g.send(pkt(OP_RST, 5, p[0].0.src_port), &[]);
    h.kick_tx();
    assert!(closed(&mut refused));

    // A silent client, and a guest that never answers: both time out.
    let mut silent = UnixStream::connect(&h.uds).unwrap();
    timeout_stream(&silent);
    let mut unanswered = UnixStream::connect(&h.uds).unwrap();
    timeout_stream(&unanswered);
    unanswered.write_all(b"CONNECT 6\n").unwrap();
    h.drive();
    assert_eq!(h.backend.handshakes(), 1);
    let p = g.recv();
    assert_eq!(ops(&p), [OP_REQUEST]);
    h.backend
        .on_timer(&h.el, Instant::now() + Duration::from_secs(10));
    h.drive();
    assert_eq!(h.backend.handshakes(), 0);
    assert!(closed(&mut silent));
    assert_eq!(ops(&g.recv()), [OP_RST], "the guest hears the give-up");
    assert!(closed(&mut unanswered));
    assert!(h.backend.conns.is_empty());
}

#[test]
fn malformed_chains_are_dropped_without_harm() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let mut h = Harness::new(&mem, &g);

    // A header shorter than 44 bytes.
    let a = g.slot_addr();
    mem.write_slice(&pkt(OP_REQUEST, 1, 2).to_bytes(), GuestAddress(a))
        .unwrap();
    g.send_descs(&[(a, 20, 0)]);
    // Write-only where the device must read.
    let a = g.slot_addr();
    mem.write_slice(&pkt(OP_REQUEST, 1, 2).to_bytes(), GuestAddress(a))
        .unwrap();
    g.send_descs(&[(a, HDR_LEN as u32, F_WRITE)]);
    // A buffer outside guest memory.
    g.send_descs(&[(1 << 40, HDR_LEN as u32, 0)]);
    h.kick_tx();
    assert_eq!(g.tx_used().len(), 3, "every chain is returned");
    assert!(g.tx_used().iter().all(|&(_, len)| len == 0));
    assert!(h.backend.conns.is_empty());

    // A header claiming more payload than the chain holds: dropped, and the claimed
    // connection reset. The rx side gets a read-only buffer and a 10-byte one first,
    // which are skipped, then a good one.
    let a = g.slot_addr();
    let mut lying = pkt(OP_RW, 1, 2);
    lying.len = 100;
    mem.write_slice(&lying.to_bytes(), GuestAddress(a)).unwrap();
    g.send_descs(&[(a, HDR_LEN as u32 + 10, 0)]);
    g.add_rx_desc(200, RX_BUF_LEN, 0);
    g.add_rx_desc(201, 10, F_WRITE);
    g.add_rx(1);
    h.kick_tx();
    let raw = g.recv_raw();
    assert_eq!(raw.len(), 3);
    assert_eq!(raw[0], (200, 0));
    assert_eq!(raw[1], (201, 0));
    assert_eq!(raw[2].1, HDR_LEN as u32);
    let mut b = [0u8; HDR_LEN];
    mem.read_slice(
        &mut b,
        GuestAddress(RX_BUF_BASE + u64::from(raw[2].0) * RX_SLOT),
    )
    .unwrap();
    let rst = Header::from_bytes(&b);
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, 2, 1));

    // Still working afterwards.
    let _l = h.host_listener(7);
    g.add_rx(1);
    g.send(pkt(OP_REQUEST, 1, 7), &[]);
    h.kick_tx();
    assert_eq!(ops(&g.recv()), [OP_RESPONSE]);
}

#[test]
fn host_to_guest_never_exceeds_the_guest_credit() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let mut h = Harness::new(&mem, &g);
    let listener = h.host_listener(52);
    g.add_rx(4);
    let mut req = pkt(OP_REQUEST, 1234, 52);
    const GUEST_BUF: u32 = 10_000;
    req.buf_alloc = GUEST_BUF;
    g.send(req, &[]);
    h.kick_tx();
    assert_eq!(ops(&g.recv()), [OP_RESPONSE]);
    let (mut s, _) = listener.accept().unwrap();
    let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
    s.write_all(&data).unwrap();

    let mut got = Vec::new();
    let mut fwd = 0u32; // what the guest application has consumed
    let mut credit_requests = 0;
    for _ in 0..100 {
        h.drive();
        // Only 4 buffers posted at a time: the rest waits for the rx kick.
        for (hd, payload) in g.recv() {
            match hd.op {
                OP_RW => got.extend_from_slice(&payload),
                OP_CREDIT_REQUEST => credit_requests += 1,
                op => panic!("unexpected op {op}"),
            }
            assert!(
                got.len() as u32 - fwd <= GUEST_BUF,
                "in flight {} over the guest's {GUEST_BUF}",
                got.len() as u32 - fwd
            );
        }
        if got.len() == data.len() {
            break;
        }
        g.add_rx(4);
        h.kick_rx();
        if got.len() as u32 - fwd == GUEST_BUF {
            // Window full: the guest reads it all and says so.
            fwd = got.len() as u32;
            let mut cu = pkt(OP_CREDIT_UPDATE, 1234, 52);
            cu.buf_alloc = GUEST_BUF;
            cu.fwd_cnt = fwd;
            g.send(cu, &[]);
            h.kick_tx();
        }
    }
    assert_eq!(got, data, "byte-exact");
    assert!(credit_requests >= 1, "a stalled sender asks for credit");
}

/// Sends guest data while honouring the device's credit as last reported; returns the bytes
/// accepted. `fwd` is the device's fwd_cnt as the guest knows it.
fn guest_send_within_credit(
    g: &mut Guest,
    h: &mut Harness,
    port: (u32, u32),
    data: &[u8],
    sent: &mut u32,
    fwd: &mut u32,
) -> usize {
    let mut off = 0;
    while off < data.len() {
        for (hd, _) in g.recv() {
            assert_eq!(hd.buf_alloc, BUF_ALLOC);
            *fwd = hd.fwd_cnt;
        }
        let credit = (BUF_ALLOC - sent.wrapping_sub(*fwd)) as usize;
        if credit == 0 {
            break;
        }
        let n = credit.min(64 * 1024).min(data.len() - off);
        g.send(pkt(OP_RW, port.0, port.1), &data[off..off + n]);
        h.kick_tx();
        *sent += n as u32;
        off += n;
        g.add_rx(g.rx_free.len().min(8));
        h.kick_rx();
    }
    off
}

#[test]
fn guest_to_host_is_buffered_within_credit_and_overrun_resets() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let mut h = Harness::new(&mem, &g);
    let listener = h.host_listener(52);
    g.add_rx(8);
    g.send(pkt(OP_REQUEST, 1234, 52), &[]);
    h.kick_tx();
    assert_eq!(ops(&g.recv()), [OP_RESPONSE]);
    let (mut s, _) = listener.accept().unwrap();

    // The host reads nothing: the guest fills the socket and then our buffer.
    let data: Vec<u8> = (0..2u32 << 20).map(|i| (i % 253) as u8).collect();
    let (mut sent, mut fwd) = (0u32, 0u32);
    let n = guest_send_within_credit(&mut g, &mut h, (1234, 52), &data, &mut sent, &mut fwd);
    // Ask for the exact window and fill it to the byte.
    g.send(pkt(OP_CREDIT_REQUEST, 1234, 52), &[]);
    h.kick_tx();
    let m = guest_send_within_credit(&mut g, &mut h, (1234, 52), &data[n..], &mut sent, &mut fwd);
    let conn = h.conn(52, 1234).unwrap();
    assert_eq!(
        conn.buffered(),
        BUF_ALLOC as usize,
        "holds exactly its window"
    );
    assert_eq!(conn.fwd_cnt() as usize + conn.buffered(), n + m);

    // One byte past the credit: the connection is reset rather than buffering more.
    g.send(pkt(OP_RW, 1234, 52), b"x");
    h.kick_tx();
    assert!(ops(&g.recv()).contains(&OP_RST));
    assert!(h.conn(52, 1234).is_none());
    s.set_nonblocking(true).unwrap();
    let mut host = Vec::new();
    let _ = s.read_to_end(&mut host);
    assert!(host.len() < n + m, "buffered bytes die with the reset");
    assert_eq!(
        &host[..],
        &data[..host.len()],
        "but what arrived is in order"
    );
}

#[test]
fn both_directions_are_byte_exact_under_flow_control() {
    // 100 MiB each way; what the device holds for a connection stays within its credit.
    const SIZE: usize = 100 << 20;
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let mut h = Harness::new(&mem, &g);
    let listener = h.host_listener(52);
    g.add_rx(8);
    let mut req = pkt(OP_REQUEST, 1234, 52);
    req.buf_alloc = 128 * 1024;
    g.send(req, &[]);
    h.kick_tx();
    assert_eq!(ops(&g.recv()), [OP_RESPONSE]);
    let (s, _) = listener.accept().unwrap();
    let host_out: Vec<u8> = (0..SIZE).map(|i| (i * 13 % 241) as u8).collect();
    let guest_out: Vec<u8> = (0..SIZE).map(|i| (i * 17 % 239) as u8).collect();

    // The host writes its half and reads the guest's on other threads.
    let mut w = s.try_clone().unwrap();
    let to_write = host_out.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&to_write).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut r = s;
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        r.read_to_end(&mut v).unwrap();
        v
    });

    let (mut sent, mut fwd, mut got) = (0u32, 0u32, Vec::new());
    let mut guest_fwd = 0u32;
    let mut peer_shutdown = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (sent as usize) < SIZE || !peer_shutdown {
        assert!(Instant::now() < deadline, "transfer stalled");
        h.drive();
        for (hd, payload) in g.recv() {
            fwd = hd.fwd_cnt;
            match hd.op {
                OP_RW => got.extend_from_slice(&payload),
                OP_SHUTDOWN => peer_shutdown = true,
                OP_CREDIT_UPDATE | OP_CREDIT_REQUEST => {}
                op => panic!("unexpected op {op}"),
            }
            assert!(
                got.len() as u32 - guest_fwd <= 128 * 1024,
                "guest credit exceeded"
            );
            assert!(h.conn(52, 1234).unwrap().buffered() <= BUF_ALLOC as usize);
        }
        // The guest application consumes what arrived and reports it.
        if got.len() as u32 != guest_fwd {
            guest_fwd = got.len() as u32;
            let mut cu = pkt(OP_CREDIT_UPDATE, 1234, 52);
            cu.buf_alloc = 128 * 1024;
            cu.fwd_cnt = guest_fwd;
            g.send(cu, &[]);
            h.kick_tx();
        }
        g.add_rx(g.rx_free.len().min(16));
        h.kick_rx();
        let credit = (BUF_ALLOC - sent.wrapping_sub(fwd)) as usize;
        let n = credit.min(16 * 1024).min(SIZE - sent as usize);
        if n > 0 {
            let mut p = pkt(OP_RW, 1234, 52);
            p.buf_alloc = 128 * 1024;
            p.fwd_cnt = guest_fwd;
            g.send(p, &guest_out[sent as usize..sent as usize + n]);
            h.kick_tx();
            sent += n as u32;
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    writer.join().unwrap();
    assert_eq!(got, host_out, "host → guest byte-exact");
    // The guest closes too; our RST follows once its bytes are delivered.
    let mut sd = pkt(OP_SHUTDOWN, 1234, 52);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(sd, &[]);
    h.kick_tx();
    let mut rst = false;
    while !rst {
        assert!(Instant::now() < deadline, "no RST");
        h.drive();
        rst = ops(&g.recv()).contains(&OP_RST);
        g.add_rx(g.rx_free.len().min(16));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(reader.join().unwrap(), guest_out, "guest → host byte-exact");
    assert!(h.backend.conns.is_empty());
}

#[test]
fn guest_half_close_lets_the_host_answer() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let mut h = Harness::new(&mem, &g);
    let listener = h.host_listener(52);
    g.add_rx(8);
    g.send(pkt(OP_REQUEST, 1234, 52), &[]);
    h.kick_tx();
    g.recv();
    let (mut s, _) = listener.accept().unwrap();
    timeout_stream(&s);

    g.send(pkt(OP_RW, 1234, 52), b"question");
    let mut sd = pkt(OP_SHUTDOWN, 1234, 52);
    sd.flags = SHUTDOWN_SEND;
    g.send(sd, &[]);
    h.kick_tx();
    let mut q = Vec::new();
    s.read_to_end(&mut q).unwrap();
    assert_eq!(q, b"question", "the request, then EOF");
    s.write_all(b"answer").unwrap();
    drop(s);
    h.drive();
    let p = g.recv();
    assert_eq!(ops(&p), [OP_RW, OP_SHUTDOWN]);
    assert_eq!(p[0].1, b"answer");

    // The guest never sends its RST: we give up after the close timeout.
    h.backend
        .on_timer(&h.el, Instant::now() + Duration::from_secs(10));
    assert_eq!(ops(&g.recv()), [OP_RST]);
    h.drive();
    assert!(h.backend.conns.is_empty());
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn the_device_serves_both_directions_on_its_worker() {
    use crate::devices::virtio::vsock::Vsock;
    use crate::devices::virtio::{Activation, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1};

    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    // A socket left by an earlier run is replaced; a regular file is not touched.
    drop(UnixListener::bind(&uds).unwrap());
    let plain = dir.path().join("plain");
    std::fs::write(&plain, b"keep").unwrap();
    assert!(Vsock::new(GUEST_CID, &plain).is_err());
    assert_eq!(std::fs::read(&plain).unwrap(), b"keep");
    let mut dev = Vsock::new(GUEST_CID, &uds).unwrap();

    assert_eq!(dev.device_type(), TYPE_VSOCK);
    assert_eq!(dev.features(), VIRTIO_F_VERSION_1);
    assert_eq!(dev.queue_sizes(), &[256, 256, 256]);
    let mut cfg = [0xffu8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), GUEST_CID);
    let mut hi = [0xffu8; 4];
    dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);

    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let mut queues = Vec::new();
    let mut kicks = Vec::new();
    for q in [&g.rx, &g.tx, &g.ev] {
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        kicks.push(kick.try_clone().unwrap());
        queues.push(ActiveQueue {
            queue: q.create_queue(),
            kick,
        });
    }
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    dev.activate(Activation {
        mem: mem.clone(),
        acked_features: VIRTIO_F_VERSION_1,
        queues,
        interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
    })
    .unwrap();

    // Guest → host.
    let mut lp = uds.clone().into_os_string();
    lp.push("_52");
    let listener = UnixListener::bind(lp).unwrap();
    g.add_rx(8);
    kicks[0].write(1).unwrap();
    g.send(pkt(OP_REQUEST, 1234, 52), &[]);
    kicks[1].write(1).unwrap();
    let mut p = Vec::new();
    wait_for("RESPONSE", || {
        p.extend(g.recv());
        !p.is_empty()
    });
    assert_eq!(ops(&p), [OP_RESPONSE]);
    assert!(irq.read().is_ok(), "the guest was interrupted");
    let (mut s, _) = listener.accept().unwrap();
    timeout_stream(&s);
    g.send(pkt(OP_RW, 1234, 52), b"ping");
    kicks[1].write(1).unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");

    // Host → guest.
    let mut c = UnixStream::connect(&uds).unwrap();
    timeout_stream(&c);
    c.write_all(b"CONNECT 77\n").unwrap();
    let mut p = Vec::new();
    wait_for("REQUEST", || {
        p.extend(g.recv());
        !p.is_empty()
    });
    assert_eq!(ops(&p), [OP_REQUEST]);
    assert_eq!((p[0].0.src_port, p[0].0.dst_port), (FIRST_HOST_PORT, 77));
    g.send(pkt(OP_RESPONSE, 77, FIRST_HOST_PORT), &[]);
    kicks[1].write(1).unwrap();
    assert_eq!(read_line(&mut c), format!("OK {FIRST_HOST_PORT}\n"));
}
