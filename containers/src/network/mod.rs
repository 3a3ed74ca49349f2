//! Container networking: a host bridge with NAT, and veth pairs into container netns.
//!
//! Typical wiring (all synchronous, root only):
//! 1. once per daemon: [`ensure_bridge`] with a [`BridgeConfig`];
//! 2. per container, after its init process exists in its own netns:
//!    `let addr = allocate(&cfg.subnet, &used)?;` then
//!    `attach(pid, &cfg.name, &cfg.attachment(instance, addr))`, and write
//!    [`hosts_file`] into the rootfs;
//!    ([`Veth::create`] ahead of time, then [`Veth::connect`], splits `attach` in two.)
//! 3. on stop: [`detach`] with [`host_ifname`] of the instance (the veth also dies
//!    with the container's netns, so this is cleanup, not a requirement).
//!
//! A microVM gets a persistent TAP on the same bridge instead: [`create_tap`] with
//! [`tap_ifname`] of the instance before the VMM starts, [`detach`] after it ended; the
//! guest's init calls [`configure_interface`] on its virtio-net interface.
//!
//! Netlink is spoken through the rust-netlink packet crates over a blocking socket
//! (no async runtime). Work inside a container's netns happens on a short-lived
//! thread that `setns`es into it, since a netlink socket binds to its creator's netns.

mod nat;
mod netlink;

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use self::netlink::Netlink;

/// Default bridge name.
pub const DEFAULT_BRIDGE: &str = "ltvbr0";
/// Default bridge subnet.
pub const DEFAULT_SUBNET: &str = "10.87.0.0/24";
/// Name of the container side of the veth pair.
pub const CONTAINER_IFNAME: &str = "eth0";
/// Linux interface names are at most IFNAMSIZ - 1 bytes.
pub const MAX_IFNAME_LEN: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid subnet {input:?}: {reason}")]
    InvalidSubnet { input: String, reason: String },
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidIfname { name: String, reason: &'static str },
    #[error("invalid address configuration for {ifname}: {reason}")]
    InvalidAttachment { ifname: String, reason: String },
    #[error("interface {name} does not exist in {netns}")]
    NoSuchInterface { name: String, netns: String },
    #[error("interface {name} already exists in {netns}")]
    InterfaceExists { name: String, netns: String },
    #[error("interface {name} exists but is not a bridge")]
    NotABridge { name: String },
    #[error("cannot use the network namespace of pid {pid} (/proc/{pid}/ns/net): {source}")]
    Namespace { pid: i32, source: io::Error },
    #[error("pid {pid} shares the caller's network namespace; refusing to configure it")]
    SameNamespace { pid: i32 },
    #[error("netlink: {op} in {netns}: {source}")]
    Netlink {
        op: String,
        netns: String,
        source: io::Error,
    },
    #[error("NAT: {0}")]
    Nat(String),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

const HOST_NS: &str = "the caller's netns";

fn pid_ns(pid: i32) -> String {
    format!("the netns of pid {pid}")
}

fn nl_err(op: impl Into<String>, netns: &str) -> impl FnOnce(io::Error) -> Error {
    let op = op.into();
    let netns = netns.to_string();
    move |source| Error::Netlink { op, netns, source }
}

fn is_errno(e: &Error, errno: i32) -> bool {
    matches!(e, Error::Netlink { source, .. } if source.raw_os_error() == Some(errno))
}

/// An IPv4 network: its network address and prefix length (e.g. 10.87.0.0/24).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Subnet {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Subnet {
    /// Prefixes outside 8..=30 are refused: /31 and /32 leave no room for gateway + hosts.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, Error> {
        let input = format!("{addr}/{prefix}");
        if !(8..=30).contains(&prefix) {
            return Err(Error::InvalidSubnet {
                input,
                reason: "prefix must be between 8 and 30".into(),
            });
        }
        let s = Self { addr, prefix };
        if s.network() != addr {
            return Err(Error::InvalidSubnet {
                input,
                reason: format!("not a network address (did you mean {}?)", s.network()),
            });
        }
        Ok(s)
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - self.prefix))
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & u32::from(self.netmask()))
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) | !u32::from(self.netmask()))
    }

    /// The bridge's own address: the first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) + 1)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & u32::from(self.netmask()) == u32::from(self.network())
    }
}

impl FromStr for Ipv4Subnet {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::InvalidSubnet {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let (a, p) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| bad("expected ADDRESS/PREFIX"))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad("bad IPv4 address"))?;
        let prefix: u8 = p.parse().map_err(|_| bad("bad prefix length"))?;
        Self::new(addr, prefix)
    }
}

impl fmt::Display for Ipv4Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The host bridge and the subnet behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeConfig {
    pub name: String,
    pub subnet: Ipv4Subnet,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            name: DEFAULT_BRIDGE.to_string(),
            subnet: DEFAULT_SUBNET.parse().expect("valid default subnet"),
        }
    }
}

impl BridgeConfig {
    pub fn new(name: &str, subnet: &str) -> Result<Self, Error> {
        validate_ifname(name)?;
        Ok(Self {
            name: name.to_string(),
            subnet: subnet.parse()?,
        })
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.gateway()
    }

    /// The attachment for `instance` at `address` on this bridge.
    pub fn attachment(&self, instance: &str, address: Ipv4Addr) -> Attachment {
        Attachment {
            host_ifname: host_ifname(instance),
            address,
            prefix: self.subnet.prefix(),
            gateway: self.gateway(),
        }
    }
}

/// One container's veth: the host end's name and the container's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub host_ifname: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

/// Checks what the kernel's dev_valid_name() would refuse.
pub fn validate_ifname(name: &str) -> Result<(), Error> {
    let bad = |reason| {
        Err(Error::InvalidIfname {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > MAX_IFNAME_LEN {
        return bad("must be 1 to 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("reserved name");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return bad("contains '/', ':' or whitespace");
    }
    Ok(())
}

/// The host-side veth name of `instance`: "veth" + 11 hex digits of its SHA-256 (15 bytes).
pub fn host_ifname(instance: &str) -> String {
    hashed_ifname("veth", instance)
}

/// The TAP name of microVM `instance`: "ltvtap" + 9 hex digits of its SHA-256 (15 bytes).
/// The prefix is not "veth", so a VM's TAP never takes the name of a container's veth.
pub fn tap_ifname(instance: &str) -> String {
    hashed_ifname("ltvtap", instance)
}

/// `prefix` followed by as many hex digits of SHA-256(`instance`) as fit in an ifname.
fn hashed_ifname(prefix: &str, instance: &str) -> String {
    let digest = Sha256::digest(instance.as_bytes());
    let mut name = String::from(prefix);
    name.push_str(&hex::encode(digest)[..MAX_IFNAME_LEN - prefix.len()]);
    name
}

/// The lowest host address of `subnet` not in `used`, skipping network, gateway and broadcast.
pub fn allocate(subnet: &Ipv4Subnet, used: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    let used: HashSet<u32> = used.iter().map(|a| u32::from(*a)).collect();
    let first = u32::from(subnet.gateway()) + 1;
    let last = u32::from(subnet.broadcast()) - 1;
    (first..=last)
        .find(|a| !used.contains(a))
        .map(Ipv4Addr::from)
}

/// /etc/hosts for a container named `hostname` with `address` (Debian's 127.0.1.1 if none).
pub fn hosts_file(hostname: &str, address: Option<Ipv4Addr>) -> String {
    let own = address.unwrap_or(Ipv4Addr::new(127, 0, 1, 1));
    format!(
        "127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         ff02::1\tip6-allnodes\n\
         ff02::2\tip6-allrouters\n\
         {own}\t{hostname}\n"
    )
}

/// The index of `name` in `netns`, which must exist.
fn existing_link(nl: &mut Netlink, name: &str, netns: &str) -> Result<u32, Error> {
    nl.link_index(name)
        .map_err(nl_err(format!("looking up {name}"), netns))?
        .ok_or_else(|| Error::NoSuchInterface {
            name: name.to_string(),
            netns: netns.to_string(),
        })
}

fn open_netlink(netns: &str) -> Result<Netlink, Error> {
    Netlink::open().map_err(nl_err("opening a netlink socket", netns))
}

/// Creates (if missing) and configures the bridge and its NAT in the caller's netns.
/// Idempotent. Changing the subnet of an existing bridge adds the new gateway address
/// but does not remove the old one.
pub fn ensure_bridge(cfg: &BridgeConfig) -> Result<(), Error> {
    validate_ifname(&cfg.name)?;
    let mut nl = open_netlink(HOST_NS)?;
    let name = &cfg.name;
    let index = match nl
        .link_index(name)
        .map_err(nl_err(format!("looking up {name}"), HOST_NS))?
    {
        Some(i) => i,
        None => {
            match nl
                .create_bridge(name, bridge_mac(name))
                .map_err(nl_err(format!("creating bridge {name}"), HOST_NS))
            {
                // Another caller may have won the race; that is fine.
                Err(e) if !is_errno(&e, libc::EEXIST) => return Err(e),
                _ => {}
            }
            existing_link(&mut nl, name, HOST_NS)?
        }
    };
    if !nl
        .is_bridge(index)
        .map_err(nl_err(format!("inspecting {name}"), HOST_NS))?
    {
        return Err(Error::NotABridge { name: name.clone() });
    }
    let gw = cfg.gateway();
    match nl
        .add_address(index, gw, cfg.subnet.prefix())
        .map_err(nl_err(format!("adding {gw} to {name}"), HOST_NS))
    {
        Err(e) if !is_errno(&e, libc::EEXIST) => return Err(e),
        _ => {}
    }
    nl.set_link(index, None, true)
        .map_err(nl_err(format!("bringing {name} up"), HOST_NS))?;
    enable_ip_forward();
    // Instances still reach each other without NAT (e.g. a nested daemon in an image
    // that has neither nft nor iptables).
    if let Err(e) = nat::setup(cfg) {
        tracing::warn!("{name}: no NAT to the outside: {e}");
    }
    Ok(())
}

/// The MAC of a bridge we create: fixed, as Docker and LXD set theirs. Without one, a
/// Linux bridge takes the lowest MAC among its ports, which changes as containers come and
/// go, and every container's ARP entry for the gateway goes stale. Derived from the
/// host's machine-id and the bridge's name, so it is the same after a reboot.
fn bridge_mac(name: &str) -> [u8; 6] {
    let machine = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let digest = Sha256::digest(format!("ltv bridge {} {name}", machine.trim()).as_bytes());
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&digest[..6]);
    // Unicast, locally administered.
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// `cfg`, or the first following /24 (or /prefix) block when its subnet overlaps a route
/// of another interface: a nested daemon's default subnet would shadow its parent's.
pub fn avoid_routed_subnets(cfg: &BridgeConfig) -> BridgeConfig {
    let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let taken: Vec<(u32, u32)> = routes
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 || f[0] == cfg.name {
                return None;
            }
            // Little-endian hex, as the kernel prints them.
            let dest = u32::from_be(u32::from_str_radix(f[1], 16).ok()?);
            let mask = u32::from_be(u32::from_str_radix(f[7], 16).ok()?);
            (mask != 0).then_some((dest, mask))
        })
        .collect();
    let mut out = cfg.clone();
    let step = 1u32 << (32 - cfg.subnet.prefix());
    for _ in 0..256 {
        let net = u32::from(out.subnet.network());
        let mask = u32::from(out.subnet.netmask());
        if !taken
            .iter()
            .any(|(d, m)| (net & m) == *d || (d & mask) == net)
        {
            return out;
        }
        match Ipv4Subnet::new(Ipv4Addr::from(net.wrapping_add(step)), cfg.subnet.prefix()) {
            Ok(s) => out.subnet = s,
            Err(_) => break,
        }
    }
    cfg.clone()
}

/// Turns on IPv4 forwarding if it is off and the sysctl is writable (it may be read-only).
fn enable_ip_forward() {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(PATH).is_ok_and(|v| v.trim() == "1") {
        return;
    }
    if let Err(e) = std::fs::write(PATH, "1") {
        tracing::warn!("cannot enable IPv4 forwarding ({PATH}): {e}");
    }
}

/// Deletes the bridge if it exists.
pub fn remove_bridge(name: &str) -> Result<(), Error> {
    validate_ifname(name)?;
    delete_if_exists(name)
}

/// Removes the bridge's NAT rule if present.
pub fn remove_nat(cfg: &BridgeConfig) -> Result<(), Error> {
    nat::remove(cfg)
}

fn delete_if_exists(name: &str) -> Result<(), Error> {
    match HostLink::find(name)? {
        Some(link) => link.delete(),
        None => Ok(()),
    }
}

/// A link of the host namespace as it was when found: deleting it later removes that
/// link and never a namesake made meanwhile (the kernel hands out interface indices
/// cyclically, so a new link does not get the old one's).
#[derive(Debug)]
pub struct HostLink {
    name: String,
    index: u32,
}

impl HostLink {
    /// The host-namespace link called `name`, if there is one.
    pub fn find(name: &str) -> Result<Option<HostLink>, Error> {
        validate_ifname(name)?;
        let index = open_netlink(HOST_NS)?
            .link_index(name)
            .map_err(nl_err(format!("looking up {name}"), HOST_NS))?;
        Ok(index.map(|index| HostLink::at(name, index)))
    }

    /// The link `name` with interface index `index` (as [`attach`] returns it).
    pub fn at(name: &str, index: u32) -> HostLink {
        HostLink {
            name: name.to_string(),
            index,
        }
    }

    /// Deletes the link; returns once the kernel has unlisted it (tens of ms: the
    /// network stack quiesces first). A veth's peer goes with it.
    pub fn delete(self) -> Result<(), Error> {
        match open_netlink(HOST_NS)?.delete_link(self.index) {
            // Gone meanwhile (e.g. its veth peer's netns died): that is what we wanted.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
            r => r.map_err(nl_err(format!("deleting {}", self.name), HOST_NS)),
        }
    }
}

/// Deletes the host end of a veth pair (the container end goes with it), or a TAP made by
/// [`create_tap`]: RTM_DELLINK removes a persistent TAP too, even while a VMM still holds
/// it open (its fd then reads EBADFD and the VMM's device goes quiet). Idempotent.
pub fn detach(host_ifname: &str) -> Result<(), Error> {
    validate_ifname(host_ifname)?;
    delete_if_exists(host_ifname)
}

/// Connects the netns of `pid` to `bridge` through a new veth pair (see [`Attachment`]).
/// On failure the veth is deleted again.
/// Returns the host end's interface index.
pub fn attach(pid: i32, bridge: &str, att: &Attachment) -> Result<u32, Error> {
    validate_attachment(bridge, att)?;
    Veth::create(pid, &att.host_ifname)?.connect(bridge, att)
}

fn validate_attachment(bridge: &str, att: &Attachment) -> Result<(), Error> {
    validate_ifname(&att.host_ifname)?;
    validate_ifname(bridge)?;
    if !(1..=32).contains(&att.prefix) {
        return Err(Error::InvalidAttachment {
            ifname: att.host_ifname.clone(),
            reason: format!("prefix /{} out of range", att.prefix),
        });
    }
    Ok(())
}

/// A veth pair whose host end is down and on no bridge, and whose peer is `eth0`, down,
/// inside the netns of a process, where `lo` is already up. [`Veth::connect`] finishes it.
/// Made ahead of time for a spare container helper, it leaves only a rename and four
/// quick netlink requests to a container's start (creating a veth pair takes the network
/// stack 1-2 ms here). Dropped unconnected, the pair goes with that netns (the socket
/// held here keeps the netns alive until then).
pub struct Veth {
    host_name: String,
    host_index: u32,
    /// A socket opened inside the peer's netns (a netlink socket acts on its creator's).
    inside: Netlink,
    inside_index: u32,
    netns: String,
}

impl Veth {
    /// Creates the pair with host end `host_name`; the peer is born inside the netns of
    /// `pid` under its final name, so no stray interface ever shows up in ours.
    pub fn create(pid: i32, host_name: &str) -> Result<Veth, Error> {
        validate_ifname(host_name)?;
        let ns = open_netns(pid)?;
        let mut nl = open_netlink(HOST_NS)?;
        if nl
            .link_index(host_name)
            .map_err(nl_err(format!("looking up {host_name}"), HOST_NS))?
            .is_some()
        {
            return Err(Error::InterfaceExists {
                name: host_name.to_string(),
                netns: HOST_NS.into(),
            });
        }
        nl.create_veth(host_name, CONTAINER_IFNAME, ns.as_raw_fd())
            .map_err(|source| {
                if source.raw_os_error() == Some(libc::EEXIST) {
                    Error::InterfaceExists {
                        name: CONTAINER_IFNAME.into(),
                        netns: pid_ns(pid),
                    }
                } else {
                    Error::Netlink {
                        op: format!("creating veth {host_name} with peer {CONTAINER_IFNAME}"),
                        netns: format!("{HOST_NS} and {}", pid_ns(pid)),
                        source,
                    }
                }
            })?;
        let host_index = match existing_link(&mut nl, host_name, HOST_NS) {
            Ok(index) => index,
            Err(e) => {
                if let Err(cleanup) = delete_if_exists(host_name) {
                    tracing::warn!("veth {host_name}: cleanup after failure failed: {cleanup}");
                }
                return Err(e);
            }
        };
        disable_ipv6(host_name);
        let half = HostLink::at(host_name, host_index);
        match open_inside(pid, ns) {
            Ok((inside, inside_index)) => Ok(Veth {
                host_name: host_name.to_string(),
                host_index,
                inside,
                inside_index,
                netns: pid_ns(pid),
            }),
            Err(e) => {
                if let Err(cleanup) = half.delete() {
                    tracing::warn!("veth {host_name}: cleanup after failure failed: {cleanup}");
                }
                Err(e)
            }
        }
    }

    /// Names the host end `att.host_ifname` (if it is not already), enslaves it to
    /// `bridge` and sets it up, all in one request; inside: eth0's address, eth0 up, the
    /// default route. On failure the pair is deleted.
    /// Returns the host end's interface index (a rename keeps it).
    pub fn connect(mut self, bridge: &str, att: &Attachment) -> Result<u32, Error> {
        validate_attachment(bridge, att)?;
        let host = &att.host_ifname;
        let result = (|| {
            let mut nl = open_netlink(HOST_NS)?;
            let br = existing_link(&mut nl, bridge, HOST_NS)?;
            let rename = (*host != self.host_name).then_some(host.as_str());
            nl.set_link_named(self.host_index, rename, Some(br), true)
                .map_err(|source| {
                    if rename.is_some() && source.raw_os_error() == Some(libc::EEXIST) {
                        Error::InterfaceExists {
                            name: host.clone(),
                            netns: HOST_NS.into(),
                        }
                    } else {
                        nl_err(format!("attaching {host} to {bridge}"), HOST_NS)(source)
                    }
                })?;
            address_link(
                &mut self.inside,
                &self.netns,
                CONTAINER_IFNAME,
                self.inside_index,
                att.address,
                att.prefix,
                Some(att.gateway),
            )
        })();
        if let Err(e) = result {
            let half = HostLink::at(host, self.host_index);
            if let Err(cleanup) = half.delete() {
                tracing::warn!("attach {host}: cleanup after failure failed: {cleanup}");
            }
            return Err(e);
        }
        Ok(self.host_index)
    }
}

/// Turns IPv6 off on `ifname` (still down) in the calling thread's netns, as Docker does on
/// networks without IPv6: the bridge is IPv4 only, and a link-local address per bridge port
/// only costs: its setup and DAD when the port goes up and, when a host end goes away, one more
/// walk of the whole conntrack table by the NAT masquerade rule's address notifier. Best
/// effort: a read-only /proc/sys (a daemon nested in a container) or no IPv6 leaves it on.
fn disable_ipv6(ifname: &str) {
    let knob = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
    if let Err(e) = std::fs::write(&knob, "1") {
        tracing::debug!("{knob}: {e}; IPv6 stays on");
    }
}

/// Opens /proc/PID/ns/net, refusing the caller's own netns (we would reconfigure the host).
fn open_netns(pid: i32) -> Result<File, Error> {
    let ns_err = |source| Error::Namespace { pid, source };
    if pid <= 0 {
        return Err(ns_err(io::Error::from_raw_os_error(libc::ESRCH)));
    }
    let ns = File::open(format!("/proc/{pid}/ns/net")).map_err(ns_err)?;
    let theirs = ns.metadata().map_err(ns_err)?;
    let ours = std::fs::metadata("/proc/thread-self/ns/net").map_err(|source| Error::Io {
        what: "reading /proc/thread-self/ns/net".into(),
        source,
    })?;
    if (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()) {
        return Err(Error::SameNamespace { pid });
    }
    Ok(ns)
}

/// Inside the netns of `pid`, on a thread that enters it and exits right after: a netlink
/// socket bound to that netns, with `lo` brought up, and the index of eth0.
fn open_inside(pid: i32, ns: File) -> Result<(Netlink, u32), Error> {
    let thread = std::thread::Builder::new()
        .name("ltv-netns".into())
        .spawn(move || -> Result<(Netlink, u32), Error> {
            let netns = pid_ns(pid);
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                Error::Namespace {
                    pid,
                    source: io::Error::from(e),
                }
            })?;
            let mut nl = open_netlink(&netns)?;
            loopback_up(&mut nl, &netns)?;
            let index = existing_link(&mut nl, CONTAINER_IFNAME, &netns)?;
            disable_ipv6(CONTAINER_IFNAME);
            Ok((nl, index))
        })
        .map_err(|source| Error::Io {
            what: "spawning the netns thread".into(),
            source,
        })?;
    thread.join().unwrap_or_else(|_| {
        Err(Error::Io {
            what: "netns thread panicked".into(),
            source: io::Error::other("panic"),
        })
    })
}
/// Configures `ifname` in the caller's (the current thread's) netns: lo up, `ifname` up
/// with `address`/`prefix`, and a default route via `gateway` if given. This is what a
/// microVM's init runs on its virtio-net interface. Not idempotent: an address or default
/// route that already exists is reported as a netlink EEXIST error.
pub fn configure_interface(
    ifname: &str,
    address: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
) -> Result<(), Error> {
    validate_ifname(ifname)?;
    if !(1..=32).contains(&prefix) {
        return Err(Error::InvalidAttachment {
            ifname: ifname.to_string(),
            reason: format!("prefix /{prefix} out of range"),
        });
    }
    let mut nl = open_netlink(HOST_NS)?;
    configure_link(&mut nl, HOST_NS, ifname, address, prefix, gateway)
}

/// The netlink part shared by containers and microVM guests, in the netns `nl` was opened
/// in: lo up, `ifname`'s address, `ifname` up, default route via `gateway`.
fn configure_link(
    nl: &mut Netlink,
    netns: &str,
    ifname: &str,
    address: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
) -> Result<(), Error> {
    loopback_up(nl, netns)?;
    let index = existing_link(nl, ifname, netns)?;
    address_link(nl, netns, ifname, index, address, prefix, gateway)
}

fn loopback_up(nl: &mut Netlink, netns: &str) -> Result<(), Error> {
    let lo = existing_link(nl, "lo", netns)?;
    nl.set_link(lo, None, true)
        .map_err(nl_err("bringing lo up", netns))
}

/// `ifname` (at `index`): its address, up, and the default route via `gateway`.
fn address_link(
    nl: &mut Netlink,
    netns: &str,
    ifname: &str,
    index: u32,
    address: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
) -> Result<(), Error> {
    nl.add_address(index, address, prefix).map_err(nl_err(
        format!("adding {address}/{prefix} to {ifname}"),
        netns,
    ))?;
    nl.set_link(index, None, true)
        .map_err(nl_err(format!("bringing {ifname} up"), netns))?;
    if let Some(gw) = gateway {
        nl.add_default_route(index, gw)
            .map_err(nl_err(format!("adding default route via {gw}"), netns))?;
    }
    Ok(())
}

/// Creates the persistent TAP `name` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, as
/// `ltv_vmm`'s virtio-net opens it) in the caller's netns, sets it up and enslaves it to
/// `bridge`. An existing interface of that name is refused; on any later failure the TAP
/// is deleted again. Remove it with [`detach`]. Only root (CAP_NET_ADMIN) may attach to
/// it afterwards: no owner is set.
pub fn create_tap(name: &str, bridge: &str) -> Result<(), Error> {
    validate_ifname(name)?;
    validate_ifname(bridge)?;
    let mut nl = open_netlink(HOST_NS)?;
    let br = existing_link(&mut nl, bridge, HOST_NS)?;
    let exists = || Error::InterfaceExists {
        name: name.to_string(),
        netns: HOST_NS.into(),
    };
    if nl
        .link_index(name)
        .map_err(nl_err(format!("looking up {name}"), HOST_NS))?
        .is_some()
    {
        return Err(exists());
    }
    match make_persistent_tap(name) {
        // IFF_TUN_EXCL: someone took the name since the lookup.
        Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::EBUSY) => {
            return Err(exists())
        }
        r => r?,
    }
    disable_ipv6(name);
    let result = (|| {
        let index = existing_link(&mut nl, name, HOST_NS)?;
        nl.set_link(index, Some(br), true)
            .map_err(nl_err(format!("attaching {name} to {bridge}"), HOST_NS))
    })();
    if let Err(e) = result {
        if let Err(cleanup) = delete_if_exists(name) {
            tracing::warn!("create_tap {name}: cleanup after failure failed: {cleanup}");
        }
        return Err(e);
    }
    Ok(())
}

/// TUNSETIFF (refusing an existing name) then TUNSETPERSIST, so the TAP outlives the fd.
fn make_persistent_tap(name: &str) -> Result<(), Error> {
    // errno first: building the message may allocate.
    let io_err = |source: io::Error, what: String| Error::Io { what, source };
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|source| Error::Io {
            what: "opening /dev/net/tun".into(),
            source,
        })?;
    // SAFETY: ifreq is plain old data; all zeros is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL;
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which outlives the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io_err(e, format!("creating TAP {name} (TUNSETIFF)")));
    }
    // SAFETY: TUNSETPERSIST takes its flag as the integer argument.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        // Closing the fd deletes the not yet persistent TAP.
        let e = io::Error::last_os_error();
        return Err(io_err(
            e,
            format!("making TAP {name} persistent (TUNSETPERSIST)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
