//! Root-only tests of container networking. Every test runs on a thread that first
//! unshares a fresh network namespace, so no interface, route or nft table is ever made
//! in the host's netns, and all traffic stays between namespaces the test created.

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use ltv_containers::network::{self, Attachment, BridgeConfig, Error};
use nix::sched::{unshare, CloneFlags};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs `f` on a thread inside a new, private network namespace.
fn in_private_netns(f: impl FnOnce() + Send + 'static) {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let t = std::thread::spawn(move || {
        let host = netns_ino("/proc/self/ns/net");
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        // Refuse to go on unless this thread really left the host's netns.
        assert_ne!(netns_ino("/proc/thread-self/ns/net"), host);
        f()
    });
    if let Err(panic) = t.join() {
        std::panic::resume_unwind(panic);
    }
}

fn netns_ino(path: &str) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

/// A `sleep` child that we spawned, optionally in its own new netns; killed on drop.
struct Sleeper(Child);

impl Sleeper {
    fn spawn(own_netns: bool) -> Self {
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        if own_netns {
            // Before exec, so the netns exists by the time spawn() returns.
            unsafe {
                cmd.pre_exec(|| unshare(CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from));
            }
        }
        Sleeper(cmd.spawn().expect("spawn sleep"))
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// Runs a command inside this child's netns.
    fn run(&self, args: &[&str]) -> (bool, String) {
        let ns = format!("--net=/proc/{}/ns/net", self.pid());
        run("nsenter", &[&[ns.as_str()], args].concat())
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn link_exists(name: &str) -> bool {
    run("ip", &["link", "show", "dev", name]).0
}

fn test_bridge() -> BridgeConfig {
    BridgeConfig::new("ltvtest0", "10.213.7.0/24").unwrap()
}

#[test]
fn two_containers_talk_over_the_bridge() {
    in_private_netns(|| {
        let cfg = test_bridge();
        network::ensure_bridge(&cfg).unwrap();
        // Idempotent: a second call changes nothing and does not fail.
        network::ensure_bridge(&cfg).unwrap();
        let (ok, out) = run("ip", &["-4", "addr", "show", "dev", "ltvtest0"]);
        assert!(ok && out.contains("10.213.7.1/24"), "{out}");
        assert!(out.contains("UP"), "{out}");
        let (ok, out) = run("nft", &["list", "table", "ip", "ltv"]);
        assert!(ok, "{out}");
        assert!(
            out.contains("ip saddr 10.213.7.0/24 oifname != \"ltvtest0\" masquerade"),
            "{out}"
        );
        assert_eq!(out.matches("masquerade").count(), 1, "{out}");

        let a = Sleeper::spawn(true);
        let b = Sleeper::spawn(true);
        let addr_a = network::allocate(&cfg.subnet, &[]).unwrap();
        let addr_b = network::allocate(&cfg.subnet, &[addr_a]).unwrap();
        assert_eq!(
            (addr_a, addr_b),
            (Ipv4Addr::new(10, 213, 7, 2), Ipv4Addr::new(10, 213, 7, 3))
        );
        let att_a = cfg.attachment("test-a", addr_a);
        let att_b = cfg.attachment("test-b", addr_b);
        network::attach(a.pid(), &cfg.name, &att_a).unwrap();
        network::attach(b.pid(), &cfg.name, &att_b).unwrap();

        // Host ends: enslaved to the bridge and up.
        for att in [&att_a, &att_b] {
            let (ok, out) = run("ip", &["-o", "link", "show", "dev", &att.host_ifname]);
            assert!(ok && out.contains("master ltvtest0"), "{out}");
            assert!(out.contains(",UP"), "{out}");
        }
        // Inside: eth0 with the address, lo up, default route via the gateway.
        let (ok, out) = a.run(&["ip", "-4", "addr", "show", "dev", "eth0"]);
        assert!(ok && out.contains("10.213.7.2/24"), "{out}");
        let (_, out) = a.run(&["ip", "-o", "link", "show", "dev", "lo"]);
        assert!(out.contains(",UP"), "{out}");
        let (ok, out) = b.run(&["ip", "-4", "route", "show", "default"]);
        assert!(
            ok && out.contains("default via 10.213.7.1 dev eth0"),
            "{out}"
        );

        // Container to container, and container to gateway (all inside our namespaces).
        let (ok, out) = a.run(&["busybox", "ping", "-c1", "-W2", "10.213.7.3"]);
        assert!(ok, "a -> b: {out}");
        let (ok, out) = b.run(&["busybox", "ping", "-c1", "-W2", "10.213.7.2"]);
        assert!(ok, "b -> a: {out}");
        let (ok, out) = b.run(&["busybox", "ping", "-c1", "-W2", "10.213.7.1"]);
        assert!(ok, "b -> gateway: {out}");

        // Attaching the same instance twice is refused, and leaves the first veth alone.
        let err = network::attach(b.pid(), &cfg.name, &att_a).unwrap_err();
        assert!(matches!(err, Error::InterfaceExists { .. }), "{err}");
        assert!(link_exists(&att_a.host_ifname));

        network::detach(&att_a.host_ifname).unwrap();
        network::detach(&att_b.host_ifname).unwrap();
        network::detach(&att_a.host_ifname).unwrap();
        for att in [&att_a, &att_b] {
            assert!(!link_exists(&att.host_ifname));
        }
        let (ok, _) = a.run(&["ip", "link", "show", "dev", "eth0"]);
        assert!(!ok, "eth0 should be gone with its veth peer");

        network::remove_nat(&cfg).unwrap();
        network::remove_nat(&cfg).unwrap();
        assert!(!run("nft", &["list", "table", "ip", "ltv"]).0);
        network::remove_bridge(&cfg.name).unwrap();
        network::remove_bridge(&cfg.name).unwrap();
        assert!(!link_exists(&cfg.name));
    });
}

fn veths() -> String {
    run("ip", &["-o", "link", "show", "type", "veth"]).1
}

#[test]
fn failures_leave_no_veth() {
    in_private_netns(|| {
        let cfg = test_bridge();
        network::ensure_bridge(&cfg).unwrap();
        let att = cfg.attachment("test-fail", Ipv4Addr::new(10, 213, 7, 9));

        // No such process: nothing is created.
        let err = network::attach(999_999_999, &cfg.name, &att).unwrap_err();
        assert!(matches!(err, Error::Namespace { .. }), "{err}");
        assert!(err.to_string().contains("999999999"), "{err}");

        // A process in the caller's own netns is refused.
        let same = Sleeper::spawn(false);
        let err = network::attach(same.pid(), &cfg.name, &att).unwrap_err();
        assert!(matches!(err, Error::SameNamespace { .. }), "{err}");

        // A name taken by a non-bridge is refused by ensure_bridge.
        let args = [
            "link",
            "add",
            "ltvnotbr0",
            "type",
            "veth",
            "peer",
            "name",
            "ltvnotbr1",
        ];
        let (ok, out) = run("ip", &args);
        assert!(ok, "{out}");
        let notbr = BridgeConfig::new("ltvnotbr0", "10.213.8.0/24").unwrap();
        let err = network::ensure_bridge(&notbr).unwrap_err();
        assert!(matches!(err, Error::NotABridge { .. }), "{err}");
        network::detach("ltvnotbr0").unwrap();

        // Missing bridge.
        let c = Sleeper::spawn(true);
        let err = network::attach(c.pid(), "nobridge", &att).unwrap_err();
        assert!(matches!(err, Error::NoSuchInterface { .. }), "{err}");

        // Failure after the veth exists (unreachable gateway): the veth is rolled back.
        let bad = Attachment {
            gateway: Ipv4Addr::new(192, 0, 2, 1),
            ..att.clone()
        };
        let err = network::attach(c.pid(), &cfg.name, &bad).unwrap_err();
        assert!(
            err.to_string().contains("default route"),
            "unexpected error: {err}"
        );
        assert!(!link_exists(&att.host_ifname));
        assert!(!c.run(&["ip", "link", "show", "dev", "eth0"]).0);
        let left = veths();
        assert!(left.trim().is_empty(), "veths left: {left}");

        // The same attachment then works.
        network::attach(c.pid(), &cfg.name, &att).unwrap();
        network::detach(&att.host_ifname).unwrap();
        assert!(veths().trim().is_empty());
    });
}

#[test]
fn veth_made_ahead_then_connected() {
    in_private_netns(|| {
        let cfg = test_bridge();
        network::ensure_bridge(&cfg).unwrap();
        let a = Sleeper::spawn(true);
        let att = cfg.attachment("test-ahead", Ipv4Addr::new(10, 213, 7, 20));

        // Made ahead: the host end under a temporary name, down and on no bridge; inside,
        // eth0 down and without an address, lo already up.
        let veth = network::Veth::create(a.pid(), "ltvstest").unwrap();
        let line = link_line("ltvstest");
        assert!(!line.contains("master") && !line.contains(",UP"), "{line}");
        let (ok, out) = a.run(&["ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
        assert!(ok && out.trim().is_empty(), "{out}");
        assert!(link_line_in(&a, "lo").contains(",UP"));
        assert!(!link_line_in(&a, "eth0").contains(",UP"));

        // Connected: renamed to the instance's name, on the bridge, up; inside configured.
        veth.connect(&cfg.name, &att).unwrap();
        assert!(!link_exists("ltvstest"));
        let line = link_line(&att.host_ifname);
        assert!(
            line.contains("master ltvtest0") && line.contains(",UP"),
            "{line}"
        );
        let (ok, out) = a.run(&["ip", "-4", "addr", "show", "dev", "eth0"]);
        assert!(ok && out.contains("10.213.7.20/24"), "{out}");
        let (ok, out) = a.run(&["ip", "-4", "route", "show", "default"]);
        assert!(
            ok && out.contains("default via 10.213.7.1 dev eth0"),
            "{out}"
        );
        let (ok, out) = a.run(&["busybox", "ping", "-c1", "-W2", "10.213.7.1"]);
        assert!(ok, "to the gateway: {out}");

        // The instance's name is taken (by the veth above): refused, and the pair made
        // ahead is deleted, while the other one is left alone.
        let b = Sleeper::spawn(true);
        let veth = network::Veth::create(b.pid(), "ltvstest").unwrap();
        let err = veth.connect(&cfg.name, &att).unwrap_err();
        assert!(matches!(err, Error::InterfaceExists { .. }), "{err}");
        assert!(!link_exists("ltvstest"));
        assert!(!b.run(&["ip", "link", "show", "dev", "eth0"]).0);
        assert!(link_line(&att.host_ifname).contains(",UP"));

        network::detach(&att.host_ifname).unwrap();
        assert!(veths().trim().is_empty(), "{}", veths());
    });
}

fn link_line_in(s: &Sleeper, name: &str) -> String {
    let (ok, out) = s.run(&["ip", "-o", "link", "show", "dev", name]);
    assert!(ok, "{name}: {out}");
    out
}

fn link_line(name: &str) -> String {
    let (ok, out) = run("ip", &["-d", "-o", "link", "show", "dev", name]);
    assert!(ok, "{name}: {out}");
    out
}

#[test]
fn tap_on_the_bridge_then_detached() {
    in_private_netns(|| {
        let (ok, out) = run("ip", &["link", "add", "ltvtbr0", "type", "bridge"]);
        assert!(ok, "{out}");
        let tap = network::tap_ifname("vm-a");

        network::create_tap(&tap, "ltvtbr0").unwrap();
        let line = link_line(&tap);
        assert!(line.contains("master ltvtbr0"), "{line}");
        assert!(line.contains(",UP"), "{line}");
        // What the VMM's virtio-net expects to attach to.
        assert!(line.contains("tun type tap"), "{line}");
        assert!(line.contains("persist on"), "{line}");

        // The name is taken now; the TAP is left as it was.
        let err = network::create_tap(&tap, "ltvtbr0").unwrap_err();
        assert!(matches!(err, Error::InterfaceExists { .. }), "{err}");
        assert!(link_line(&tap).contains("master ltvtbr0"));
        // So is the name of any other interface.
        let err = network::create_tap("ltvtbr0", "ltvtbr0").unwrap_err();
        assert!(matches!(err, Error::InterfaceExists { .. }), "{err}");

        // detach deletes a persistent TAP, and is idempotent.
        network::detach(&tap).unwrap();
        assert!(!link_exists(&tap));
        network::detach(&tap).unwrap();

        // Bad names, a missing bridge: nothing is created.
        for (name, bridge) in [("bad/name", "ltvtbr0"), (tap.as_str(), "a-bridge-too-long")] {
            let err = network::create_tap(name, bridge).unwrap_err();
            assert!(matches!(err, Error::InvalidIfname { .. }), "{err}");
        }
        let err = network::create_tap(&tap, "nobridge").unwrap_err();
        assert!(matches!(err, Error::NoSuchInterface { .. }), "{err}");
        assert!(!link_exists(&tap));

        // Enslaving fails after the TAP exists (the "bridge" is a veth): it is deleted again.
        let (ok, out) = run(
            "ip",
            &[
                "link",
                "add",
                "ltvnotbr0",
                "type",
                "veth",
                "peer",
                "name",
                "ltvnotbr1",
            ],
        );
        assert!(ok, "{out}");
        let err = network::create_tap(&tap, "ltvnotbr0").unwrap_err();
        assert!(err.to_string().contains("attaching"), "{err}");
        assert!(!link_exists(&tap));

        // The same TAP then works; removing the bridge releases it but does not delete it.
        network::create_tap(&tap, "ltvtbr0").unwrap();
        network::remove_bridge("ltvtbr0").unwrap();
        assert!(
            link_exists(&tap),
            "deleting the bridge releases the TAP, not deletes it"
        );
        network::detach(&tap).unwrap();
        assert!(!link_exists(&tap));
    });
}

#[test]
fn configure_interface_in_the_current_netns() {
    in_private_netns(|| {
        let (ok, out) = run(
            "ip",
            &[
                "link", "add", "ltvcfg0", "type", "veth", "peer", "name", "ltvcfg1",
            ],
        );
        assert!(ok, "{out}");

        network::configure_interface(
            "ltvcfg0",
            Ipv4Addr::new(10, 213, 9, 5),
            24,
            Some(Ipv4Addr::new(10, 213, 9, 1)),
        )
        .unwrap();
        let (ok, out) = run("ip", &["-4", "addr", "show", "dev", "ltvcfg0"]);
        assert!(
            ok && out.contains("inet 10.213.9.5/24 brd 10.213.9.255"),
            "{out}"
        );
        assert!(link_line("ltvcfg0").contains(",UP"));
        assert!(link_line("lo").contains(",UP"));
        let (ok, out) = run("ip", &["-4", "route", "show", "default"]);
        assert!(
            ok && out.contains("default via 10.213.9.1 dev ltvcfg0"),
            "{out}"
        );

        // Without a gateway: address and link only, the default route is left alone.
        network::configure_interface("ltvcfg1", Ipv4Addr::new(10, 213, 10, 5), 30, None).unwrap();
        let (_, out) = run("ip", &["-4", "addr", "show", "dev", "ltvcfg1"]);
        assert!(out.contains("inet 10.213.10.5/30"), "{out}");
        assert!(link_line("ltvcfg1").contains(",UP"));
        let (_, out) = run("ip", &["-4", "route", "show", "default"]);
        assert_eq!(out.lines().count(), 1, "{out}");

        // Errors: a missing interface, a bad prefix, a bad name, a second default route.
        let err = network::configure_interface("nosuch0", Ipv4Addr::new(10, 0, 0, 2), 24, None)
            .unwrap_err();
        assert!(matches!(err, Error::NoSuchInterface { .. }), "{err}");
        let err = network::configure_interface("ltvcfg1", Ipv4Addr::new(10, 0, 0, 2), 33, None)
            .unwrap_err();
        assert!(matches!(err, Error::InvalidAttachment { .. }), "{err}");
        let err =
            network::configure_interface("a b", Ipv4Addr::new(10, 0, 0, 2), 24, None).unwrap_err();
        assert!(matches!(err, Error::InvalidIfname { .. }), "{err}");
        let err = network::configure_interface(
            "ltvcfg1",
            Ipv4Addr::new(10, 213, 10, 6),
            30,
            Some(Ipv4Addr::new(10, 213, 10, 5)),
        )
        .unwrap_err();
        assert!(err.to_string().contains("default route"), "{err}");
    });
}
