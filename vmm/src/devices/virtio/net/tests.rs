use std::collections::VecDeque;
use std::time::{Duration, Instant};

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const MEM_SIZE: u64 = 0x40_0000;

fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// Puts one chain made of `(addr, len, device-writable)` parts into the descriptor table
/// at `first` and makes it available.
fn add_chain(vq: &MockSplitQueue<GuestMemoryMmap>, first: u16, parts: &[(u64, u32, bool)]) {
    let descs: Vec<RawDescriptor> = parts
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, writable))| {
            let last = i + 1 == parts.len();
            let mut flags = if writable { F_WRITE } else { 0 };
            let mut next = 0;
            if !last {
                flags |= F_NEXT;
                next = first + i as u16 + 1;
            }
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
        })
        .collect();
    vq.add_desc_chains(&descs, first).unwrap();
}

/// The (head, len) pairs in the used ring so far.
fn used(vq: &MockSplitQueue<GuestMemoryMmap>) -> Vec<(u32, u32)> {
    let n = vq.used().idx().load();
    (0..n)
        .map(|i| {
            let e = vq.used().ring().ref_at(usize::from(i)).unwrap().load();
            (e.id(), e.len())
        })
        .collect()
}

fn interrupt() -> (Interrupt, EventFd) {
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    (Interrupt::new(irqfd.try_clone().unwrap()), irqfd)
}

/// A TAP stand-in for rx: one frame per read(), WouldBlock once empty.
struct Frames(VecDeque<Vec<u8>>);

impl Read for Frames {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let f = self.0.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(n)
    }
}

/// A TAP stand-in for tx: records each write() as one frame.
#[derive(Default)]
struct Sink(Vec<Vec<u8>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

#[test]
fn config_space_and_features() {
    let net = Net {
        tap: None,
        tap_name: "t".into(),
        config: [2, 0, 0, 0xaa, 0xbb, 0xcc, 0, 0],
    };
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.features(), (1 << 32) | (1 << 5));
    assert_eq!(net.queue_sizes(), &[256, 256]);
    let mut mac = [0u8; 6];
    net.read_config(0, &mut mac);
    assert_eq!(mac, [2, 0, 0, 0xaa, 0xbb, 0xcc]);
    let mut status = [0xffu8; 2];
    net.read_config(6, &mut status);
    assert_eq!(status, [0, 0]);
    let mut past = [0xffu8; 4];
    net.read_config(100, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn tx_gathers_each_chain_into_one_write() {
    let mem = guest_mem();
    let vq = MockSplitQueue::new(&mem, 256);
    // Frame 1: header in its own descriptor (offload fields set, which must not reach the
    // TAP), the frame over two more.
    let hdr: Vec<u8> = (1..=12).collect();
    let body = pattern(1500, 3);
    mem.write_slice(&hdr, GuestAddress(0x10_0000)).unwrap();
    mem.write_slice(&body[..1000], GuestAddress(0x11_0000))
        .unwrap();
    mem.write_slice(&body[1000..], GuestAddress(0x12_0000))
        .unwrap();
    add_chain(
        &vq,
        0,
        &[
            (0x10_0000, 12, false),
            (0x11_0000, 1000, false),
            (0x12_0000, 500, false),
        ],
    );
    // Frame 2: header and frame in one descriptor, then a writable descriptor (ignored).
    let two = pattern(12 + 60, 9);
    mem.write_slice(&two, GuestAddress(0x13_0000)).unwrap();
    add_chain(&vq, 3, &[(0x13_0000, 72, false), (0x14_0000, 100, true)]);

    let mut q: Queue = vq.create_queue().unwrap();
    let (int, irqfd) = interrupt();
    let mut sink = Sink::default();
    let mut buf = Vec::new();
    process_tx(&mut q, &mem, &mut sink, &mut buf, &int, &mut Warn::new());

    assert_eq!(sink.0.len(), 2);
    let mut want = vec![0u8; 12];
    want.extend_from_slice(&body);
    assert_eq!(sink.0[0], want);
    assert_eq!(&sink.0[1][..12], &[0u8; 12]);
    assert_eq!(&sink.0[1][12..], &two[12..]);
    assert_eq!(used(&vq), vec![(0, 0), (3, 0)]);
    assert_eq!(
        int.status() & super::super::INT_VRING,
        super::super::INT_VRING
    );
    assert!(irqfd.read().unwrap() >= 1);
}

#[test]
fn tx_malformed_chains_are_completed_with_zero_and_not_sent() {
    let mem = guest_mem();
    let vq = MockSplitQueue::new(&mem, 256);
    // Only a device-writable descriptor: nothing to send.
    add_chain(&vq, 0, &[(0x10_0000, 2000, true)]);
    // Shorter than a header.
    add_chain(&vq, 1, &[(0x10_0000, 4, false)]);
    // Outside guest memory.
    add_chain(&vq, 2, &[(MEM_SIZE + 0x1000, 100, false)]);
    // Crossing the end of guest memory.
    add_chain(&vq, 3, &[(MEM_SIZE - 10, 100, false)]);
    // Longer than the largest frame.
    add_chain(
        &vq,
        4,
        &[(0x10_0000, 40_000, false), (0x20_0000, 40_000, false)],
    );
    // A good one after all that still goes out.
    mem.write_slice(&pattern(80, 1), GuestAddress(0x30_0000))
        .unwrap();
    add_chain(&vq, 6, &[(0x30_0000, 80, false)]);

    let mut q: Queue = vq.create_queue().unwrap();
    let (int, _irqfd) = interrupt();
    let mut sink = Sink::default();
    let mut buf = Vec::new();
    process_tx(&mut q, &mem, &mut sink, &mut buf, &int, &mut Warn::new());

    assert_eq!(sink.0.len(), 1);
    assert_eq!(&sink.0[0][12..], &pattern(80, 1)[12..]);
    assert_eq!(
        used(&vq),
        vec![(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (6, 0)]
    );
}

#[test]
fn tx_survives_a_failing_tap() {
    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mem = guest_mem();
    let vq = MockSplitQueue::new(&mem, 256);
    add_chain(&vq, 0, &[(0x10_0000, 60, false)]);
    add_chain(&vq, 1, &[(0x10_0000, 60, false)]);
    let mut q: Queue = vq.create_queue().unwrap();
    let (int, _irqfd) = interrupt();
    process_tx(
        &mut q,
        &mem,
        &mut Broken,
        &mut Vec::new(),
        &int,
        &mut Warn::new(),
    );
    assert_eq!(used(&vq), vec![(0, 0), (1, 0)]);
}

#[test]
fn rx_copies_whole_frames_into_chains() {
    let mem = guest_mem();
    let vq = MockSplitQueue::new(&mem, 256);
    // The first chain splits the header across descriptors; the second is one buffer.
    add_chain(&vq, 0, &[(0x10_0000, 10, true), (0x11_0000, 2000, true)]);
    add_chain(&vq, 2, &[(0x12_0000, 1526, true)]);
    add_chain(&vq, 3, &[(0x13_0000, 1526, true)]);
    let f1 = pattern(12 + 1514, 5);
    let f2 = pattern(12 + 42, 6);
    let mut tap = Frames(VecDeque::from([f1.clone(), f2.clone()]));

    let mut q: Queue = vq.create_queue().unwrap();
    let (int, irqfd) = interrupt();
    let mut pending = RxFrame::new();
    process_rx(&mut q, &mem, &mut tap, &mut pending, &int, &mut Warn::new());

    assert_eq!(used(&vq), vec![(0, 1526), (2, 54)]);
    assert_eq!(pending.len, 0);
    // num_buffers (bytes 10..12) is 1; everything else is the TAP's bytes.
    let mut want1 = f1.clone();
    want1[10..12].copy_from_slice(&[1, 0]);
    let mut got = vec![0u8; 10];
    mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
    let mut rest = vec![0u8; f1.len() - 10];
    mem.read_slice(&mut rest, GuestAddress(0x11_0000)).unwrap();
    got.extend(rest);
    assert_eq!(got, want1);
    let mut got2 = vec![0u8; f2.len()];
    mem.read_slice(&mut got2, GuestAddress(0x12_0000)).unwrap();
    assert_eq!(&got2[..10], &f2[..10]);
    assert_eq!(&got2[10..12], &[1, 0]);
    assert_eq!(&got2[12..], &f2[12..]);
    assert!(irqfd.read().unwrap() >= 1);
}

#[test]
fn rx_keeps_a_frame_until_the_driver_posts_a_buffer() {
    let mem = guest_mem();
    let vq = MockSplitQueue::new(&mem, 256);
    let mut q: Queue = vq.create_queue().unwrap();
    let (int, _irqfd) = interrupt();
    let f1 = pattern(100, 1);
    let f2 = pattern(200, 2);
    let mut tap = Frames(VecDeque::from([f1.clone(), f2.clone()]));
    let mut pending = RxFrame::new();
    let mut warn = Warn::new();

    // No buffers: one frame is read and held, the other stays in the TAP.
    process_rx(&mut q, &mem, &mut tap, &mut pending, &int, &mut warn);
    assert_eq!(pending.len, 100);
    assert_eq!(tap.0.len(), 1);
    assert!(used(&vq).is_empty());

    // One buffer: the held frame goes first, the next one is held.
    add_chain(&vq, 0, &[(0x10_0000, 1526, true)]);
    process_rx(&mut q, &mem, &mut tap, &mut pending, &int, &mut warn);
    assert_eq!(used(&vq), vec![(0, 100)]);
    let mut got = vec![0u8; 100];
    mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(&got[12..], &f1[12..]);
    assert_eq!(pending.len, 200);
    assert!(tap.0.is_empty());

    add_chain(&vq, 1, &[(0x11_0000, 1526, true)]);
    process_rx(&mut q, &mem, &mut tap, &mut pending, &int, &mut warn);
    assert_eq!(used(&vq), vec![(0, 100), (1, 200)]);
    assert_eq!(pending.len, 0);
}

#[test]
fn rx_malformed_chains_are_completed_with_zero() {
    let mem = guest_mem();
    let vq = MockSplitQueue::new(&mem, 256);
    // Device-readable only: nowhere to write.
    add_chain(&vq, 0, &[(0x10_0000, 2000, false)]);
    // Writable but smaller than the frame.
    add_chain(&vq, 1, &[(0x11_0000, 64, true)]);
    // Outside guest memory.
    add_chain(&vq, 2, &[(MEM_SIZE + 0x1000, 2000, true)]);
    // A good chain.
    add_chain(&vq, 3, &[(0x12_0000, 1526, true)]);
    let frames: Vec<Vec<u8>> = (0..4).map(|i| pattern(500, i)).collect();
    let mut tap = Frames(frames.iter().cloned().collect());
    // A runt shorter than a header is skipped without using a chain.
    tap.0.push_front(vec![0; 4]);

    let mut q: Queue = vq.create_queue().unwrap();
    let (int, _irqfd) = interrupt();
    let mut pending = RxFrame::new();
    process_rx(&mut q, &mem, &mut tap, &mut pending, &int, &mut Warn::new());

    // Each bad chain took (and dropped) one frame; the fourth frame landed in the good one.
    assert_eq!(used(&vq), vec![(0, 0), (1, 0), (2, 0), (3, 500)]);
    let mut got = vec![0u8; 500];
    mem.read_slice(&mut got, GuestAddress(0x12_0000)).unwrap();
    assert_eq!(&got[12..], &frames[3][12..]);
    // The readable-only chain's memory was not written.
    let mut untouched = vec![0xffu8; 16];
    mem.read_slice(&mut untouched, GuestAddress(0x10_0000))
        .unwrap();
    assert_eq!(untouched, vec![0; 16]);
}

#[test]
fn a_missing_or_bad_tap_name_is_refused() {
    let err = Net::new("ltv-no-such-if", [2, 0, 0, 0, 0, 1])
        .err()
        .unwrap();
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    for bad in ["", "a-name-far-too-long", "tap%d", "a/b"] {
        let err = Net::new(bad, [2, 0, 0, 0, 0, 1]).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}: {err}");
    }
    // "lo" exists but is not a TAP.
    if unsafe { libc::geteuid() } == 0 {
        assert!(Net::new("lo", [2, 0, 0, 0, 0, 1]).is_err());
    }
}

/// Runs `f` on a thread in a new network namespace of its own (root only), so the test's
/// TAP never appears in the host's netns.
fn in_private_netns(f: impl FnOnce() + Send + 'static) -> bool {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root");
        return false;
    }
    let t = std::thread::spawn(move || {
        let host = std::fs::read_link("/proc/self/ns/net").unwrap();
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
        assert_ne!(
            std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
            host
        );
        f()
    });
    if let Err(p) = t.join() {
        std::panic::resume_unwind(p);
    }
    true
}

fn sh(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
}

/// A raw AF_PACKET socket on one interface: what the host stack sees on the TAP.
struct PacketSocket(std::os::fd::OwnedFd);

impl PacketSocket {
    fn bind(ifname: &str) -> Self {
        use std::os::fd::FromRawFd;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0, "{}", io::Error::last_os_error());
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).unwrap();
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        PacketSocket(fd)
    }

    fn send(&self, frame: &[u8]) {
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "{}", io::Error::last_os_error());
    }

    fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 2048];
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        (n > 0).then(|| {
            buf.truncate(n as usize);
            buf
        })
    }
}

/// An Ethernet frame of the local experimental ethertype carrying `marker`.
fn test_frame(marker: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[2, 0, 0, 0, 0, 0x42, 0x88, 0xb5]);
    f.extend_from_slice(marker);
    f.resize(60, 0);
    f
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_real_tap_carries_frames_both_ways() {
    in_private_netns(|| {
        sh(&["ip", "tuntap", "add", "dev", "ltvnt0", "mode", "tap"]);
        sh(&["ip", "link", "set", "ltvnt0", "up"]);
        let mut net = Net::new("ltvnt0", [2, 0, 0, 0, 0, 7]).unwrap();

        let mem = guest_mem();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 256);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 256);
        // Plenty of rx buffers: the kernel may send its own frames (IPv6 solicitations).
        for i in 0..32u16 {
            add_chain(&rxq, i, &[(0x10_0000 + u64::from(i) * 0x1000, 1526, true)]);
        }
        let kicks = [
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ];
        let (int, _irqfd) = interrupt();
        let activation = Activation {
            mem: mem.clone(),
            acked_features: net.features(),
            queues: vec![
                ActiveQueue {
                    queue: rxq.create_queue().unwrap(),
                    kick: kicks[0].try_clone().unwrap(),
                },
                ActiveQueue {
                    queue: txq.create_queue().unwrap(),
                    kick: kicks[1].try_clone().unwrap(),
                },
            ],
            interrupt: Arc::new(int),
        };
        net.activate(activation).unwrap();
        let sock = PacketSocket::bind("ltvnt0");

        // Host -> guest: a frame sent on the interface lands in an rx chain, behind a
        // 12-byte header of zeros (num_buffers 1).
        let to_guest = test_frame(b"ltv-to-guest");
        sock.send(&to_guest);
        wait_for("the frame in the rx queue", || {
            used(&rxq).iter().any(|&(id, len)| {
                let mut got = vec![0u8; len as usize];
                mem.read_slice(&mut got, GuestAddress(0x10_0000 + u64::from(id) * 0x1000))
                    .unwrap();
                len as usize == 12 + to_guest.len()
                    && got[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
                    && got[12..] == to_guest[..]
            })
        });

        // Guest -> host: a tx chain shows up on the interface.
        let from_guest = test_frame(b"ltv-from-guest");
        let mut chain = vec![0u8; 12];
        chain.extend_from_slice(&from_guest);
        mem.write_slice(&chain, GuestAddress(0x30_0000)).unwrap();
        add_chain(&txq, 0, &[(0x30_0000, chain.len() as u32, false)]);
        kicks[1].write(1).unwrap();
        wait_for("the frame on the interface", || {
            std::iter::from_fn(|| sock.recv()).any(|f| f == from_guest)
        });
        // The chain is completed right after the write.
        wait_for("the tx chain completed", || used(&txq) == vec![(0, 0)]);

        // A second activation has no TAP left to serve.
        let queues = (0..2)
            .map(|_| ActiveQueue {
                queue: rxq.create_queue().unwrap(),
                kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            })
            .collect();
        let err = net
            .activate(Activation {
                mem: mem.clone(),
                acked_features: 0,
                queues,
                interrupt: Arc::new(interrupt().0),
            })
            .unwrap_err();
        assert!(err.contains("already activated"), "{err}");
    });
}
