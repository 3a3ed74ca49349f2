//! Plain data describing a container. The daemon fills it; the runtime only reads it.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Everything needed to create one container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// Instance name; also used in log messages.
    pub name: String,
    pub hostname: String,
    pub rootfs: RootfsSpec,
    pub process: ProcessSpec,
    pub limits: Limits,
    /// Cgroup path relative to each hierarchy's root, e.g. `ltv/app1`.
    pub cgroup: String,
    pub network: NetworkMode,
    /// `None` runs the container without a user namespace (privileged).
    pub idmap: Option<IdMap>,
    /// It may run containers itself: LXC's unprivileged profile instead of Docker's, and
    /// its own cgroup delegated to its root. Needs `idmap`.
    #[serde(default)]
    pub nesting: bool,
    /// Its init halts with `reboot()` (a system container): allowed, as it only ends the
    /// container's own pid namespace.
    #[serde(default)]
    pub init_may_reboot: bool,
    /// A fresh tmpfs at `/run` before the first process runs (a system container, as
    /// systemd-nspawn does): boot scripts then find it mounted and leave it, so nothing
    /// put there after start (a nested daemon's socket) is hidden by a later mount.
    #[serde(default)]
    pub run_tmpfs: bool,
    /// Host directories bind-mounted into the container.
    #[serde(default)]
    pub binds: Vec<Bind>,
    /// Fresh tmpfs mounts inside it (Docker's `--tmpfs`).
    #[serde(default)]
    pub tmpfs: Vec<Tmpfs>,
}

impl ContainerSpec {
    pub fn profile(&self) -> crate::security::Profile {
        use crate::security::Profile;
        match (self.nesting, self.init_may_reboot) {
            (true, _) => Profile::Nesting,
            (false, true) => Profile::SystemInit,
            (false, false) => Profile::Default,
        }
    }
}

/// A bind mount of a host directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    pub source: PathBuf,
    /// Absolute path inside the container.
    pub target: String,
    #[serde(default)]
    pub readonly: bool,
}

/// A fresh tmpfs inside the container, owned by its root; nosuid and nodev always.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tmpfs {
    /// Absolute path inside the container.
    pub target: String,
    /// `None`: the kernel's default, half of RAM (charged to the container's memory).
    pub size_bytes: Option<u64>,
    /// Permission bits of its root.
    pub mode: u32,
    /// Programs may run from it (Docker's tmpfs is `noexec` unless asked).
    pub exec: bool,
    pub readonly: bool,
}

/// A path inside the container as a mount target: absolute, without '..'.
pub fn is_mount_target(t: &str) -> bool {
    let t = std::path::Path::new(t);
    t.is_absolute() && !t.components().any(|c| c == std::path::Component::ParentDir)
}

/// Checks tmpfs mounts: each target a mount target other than /, none given twice.
pub fn check_tmpfs(all: &[Tmpfs]) -> Result<(), String> {
    for (i, t) in all.iter().enumerate() {
        if !is_mount_target(&t.target) || std::path::Path::new(&t.target).parent().is_none() {
            return Err(format!(
                "tmpfs {:?} must be absolute, not /, without '..'",
                t.target
            ));
        }
        if all[..i].iter().any(|o| o.target == t.target) {
            return Err(format!("tmpfs {} given twice", t.target));
        }
    }
    Ok(())
}

/// An overlayfs rootfs: read-only image layers below, a per-instance upper dir on top;
/// or, `readonly`, the image layers alone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootfsSpec {
    /// Lower layers, topmost first (overlayfs `lowerdir` order).
    pub lowerdirs: Vec<PathBuf>,
    pub upperdir: PathBuf,
    pub workdir: PathBuf,
    /// Where the merged rootfs is mounted on the host before `pivot_root`.
    pub mountpoint: PathBuf,
    /// The upper dir is thrown away with the container (`run --rm`): mounted `volatile`,
    /// so that the overlay's end does not sync the whole upper filesystem (a journal
    /// commit and a disk flush on every container exit).
    #[serde(default)]
    pub volatile: bool,
    /// Docker's `--read-only`: the image as it is, read-only, with no upper dir at all.
    #[serde(default)]
    pub readonly: bool,
}

/// One process: the container's first process, or one started by `exec`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessSpec {
    /// argv; `args[0]` is looked up in `PATH` from `env` when it has no `/`.
    pub args: Vec<String>,
    /// `KEY=VALUE` pairs.
    pub env: Vec<String>,
    /// Working directory inside the container.
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    #[serde(default)]
    pub additional_gids: Vec<u32>,
    /// The stdio given is a terminal (the caller owns the pty master).
    #[serde(default)]
    pub tty: bool,
}

/// Resource limits; `None` means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    /// CPU bandwidth in CPUs, e.g. 0.5.
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// A private network namespace with only `lo`, brought up.
    Loopback,
    /// A private network namespace with nothing configured.
    None,
    /// `lo` plus `eth0`, a veth into `bridge` (which must exist), with a static address
    /// and a default route through the gateway.
    Bridge {
        bridge: String,
        host_ifname: String,
        address: std::net::Ipv4Addr,
        prefix: u8,
        gateway: std::net::Ipv4Addr,
    },
}

/// A user-namespace mapping of container ids `0..size` to host ids `host_uid..`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    pub host_uid: u32,
    pub host_gid: u32,
    pub size: u32,
}
