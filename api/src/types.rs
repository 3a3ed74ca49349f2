//! REST API types, shared by the daemon and the CLI (Incus-style `shared/api`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub const API_VERSION: &str = "1.0";

/// `GET /1.0`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerInfo {
    pub api_version: String,
    pub version: String,
    /// `hardware`, `pvm` or `none`.
    pub kvm: String,
    /// `v1-hybrid`, `v1` or `v2`.
    pub cgroup: String,
    pub kernel: String,
    /// Instance kinds this daemon can run.
    pub kinds: Vec<Kind>,
    /// The machine the daemon runs on (inside a microVM: the guest).
    pub machine: MachineFacts,
    /// True for a microVM's guest agent.
    #[serde(default)]
    pub agent: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MachineFacts {
    pub uptime_secs: f64,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    App,
    System,
    Vm,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::App => "app",
            Kind::System => "system",
            Kind::Vm => "vm",
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "app" => Ok(Kind::App),
            "system" => Ok(Kind::System),
            "vm" => Ok(Kind::Vm),
            other => Err(format!(
                "unknown kind {other:?} (expected app, system or vm)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Status {
    Created,
    Running,
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "Created",
            Status::Running => "Running",
            Status::Stopped => "Stopped",
        }
    }
}

impl std::str::FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "Created" => Ok(Status::Created),
            "Running" => Ok(Status::Running),
            "Stopped" => Ok(Status::Stopped),
            other => Err(format!("unknown status {other:?}")),
        }
    }
}

/// User-settable configuration of an instance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InstanceConfig {
    /// Memory limit, e.g. `64MiB` (at least 4 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// CPU bandwidth in CPUs, e.g. 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Extra environment, `KEY=VALUE`.
    #[serde(default)]
    pub env: Vec<String>,
    /// Overrides the image's command (Docker's CMD); empty keeps the image's.
    #[serde(default)]
    pub command: Vec<String>,
    /// Overrides the image's working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Runs without a user namespace: root inside is root on the host. Off by default.
    #[serde(default)]
    pub privileged: bool,
    /// The root filesystem is the image itself, read-only (Docker's `--read-only`), with
    /// /etc/hosts and /etc/hostname bound over the image's; app containers only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// Fresh tmpfs mounts, Docker's `--tmpfs PATH[:OPTIONS]` (options `size=64m`,
    /// `mode=1777`, `exec`, `ro`); `noexec`, `nosuid` and `nodev` by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tmpfs: Vec<String>,
    /// `bridge` (default: a veth on the daemon's bridge with an address) or `none`
    /// (only loopback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// `GET /1.0/instances/{name}`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Instance {
    pub name: String,
    pub kind: Kind,
    /// The image alias the instance was created from.
    pub image: String,
    /// Fingerprint of that image.
    pub image_fingerprint: String,
    pub parent: Option<String>,
    pub config: InstanceConfig,
    pub status: Status,
    pub pid: Option<i32>,
    /// Exit code of the last run; null while running or when unknown.
    pub exit_code: Option<i32>,
    pub created_at: String,
    /// Removed automatically when its process exits (`ltv run --rm`).
    pub auto_remove: bool,
    /// First host uid/gid of the instance's private 65536-id range (unprivileged
    /// containers); root inside is this uid on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idmap_base: Option<u32>,
    /// IPv4 address on the daemon's bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Live usage, present while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// The instances nested in this one, named by their full path
    /// (`GET /1.0/instances?recursion=tree`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(no_recursion)]
    pub children: Vec<Instance>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub memory_bytes: u64,
    pub memory_limit_bytes: Option<u64>,
    pub pids: u64,
    pub cpu_time_ns: u64,
    /// Pid namespaces between its kernel's root and its main process: 1 for a container
    /// on the host, 2 for one nested in a container, 0 for a microVM (its own kernel).
    /// Measured by each daemon on the way down for its own level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_ns_depth: Option<u32>,
    /// A microVM's own view, from its guest agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestFacts>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GuestFacts {
    pub kernel: String,
    #[serde(flatten)]
    pub machine: MachineFacts,
}

/// `POST /1.0/instances`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InstancesPost {
    /// Generated when absent.
    #[serde(default)]
    pub name: Option<String>,
    pub kind: Kind,
    pub image: String,
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub config: InstanceConfig,
    /// Start right away (detached, output to the instance log).
    #[serde(default)]
    pub start: bool,
    /// Start and stream stdio over this connection (HTTP upgrade to `ltv-stdio`).
    #[serde(default)]
    pub attach: Option<AttachOptions>,
    #[serde(default)]
    pub auto_remove: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AttachOptions {
    /// Forward the client's stdin.
    #[serde(default)]
    pub stdin: bool,
    /// Give the process a terminal.
    #[serde(default)]
    pub tty: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StateAction {
    Start,
    Stop,
    Restart,
}

/// `PATCH /1.0/instances/{name}`: the keys given replace the instance's.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct InstancePatch {
    #[serde(default)]
    pub memory: Option<String>,
    #[serde(default)]
    pub cpus: Option<f64>,
    #[serde(default)]
    pub pids: Option<u64>,
}

/// `PUT /1.0/instances/{name}/state`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StatePut {
    pub action: StateAction,
    #[serde(default)]
    pub force: bool,
    /// Seconds to wait for a clean stop before killing (default 10).
    #[serde(default)]
    pub timeout: Option<u64>,
}

/// `POST /1.0/instances/{name}/exec`; answered by an upgrade to `ltv-stdio`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ExecPost {
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub tty: bool,
    /// Forward the client's stdin (otherwise the process reads /dev/null).
    #[serde(default)]
    pub stdin: bool,
}

/// `PUT /1.0/state` on a guest agent.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GuestStatePut {
    pub action: String,
}

/// `GET /1.0/images` entries.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Image {
    pub alias: String,
    pub fingerprint: String,
    pub size_bytes: u64,
    pub source: String,
    pub created_at: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
    pub init: Option<String>,
}

/// `POST /1.0/images`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImagesPost {
    /// Defaults to the builder's name for builds.
    #[serde(default)]
    pub alias: Option<String>,
    pub source: ImageSource,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ImageSource {
    /// Build from Debian packages: `busybox` or `debian`.
    Build {
        builder: String,
        #[serde(default)]
        suite: Option<String>,
        #[serde(default)]
        include: Vec<String>,
        #[serde(default)]
        mirror: Option<String>,
    },
    /// Import an OCI layout directory, a tar of one, or a docker-archive tar
    /// from a path on the daemon's host.
    Import { path: String },
}

/// One line of an `application/x-ndjson` progress stream (image builds).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ProgressEvent {
    Stage { message: String },
    Advance { done: u64, total: Option<u64> },
    Done { image: Box<Image> },
    Error { code: u16, error: String },
}

/// `GET /1.0/operations` entries: long or state-changing requests, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Operation {
    pub id: i64,
    pub action: String,
    pub target: String,
    pub status: String,
    pub error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// Every error body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
    pub code: u16,
}

/// Instance names: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn validate_name(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: use 1 to 63 characters from [a-z0-9-], starting with a letter or digit"
        ))
    }
}

/// Parses `64MiB`, `1G`, `512k`, `1048576` into bytes (binary units, as Docker and Incus).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("invalid size {text:?}: expected a number with an optional unit like 64MiB")
    })?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("invalid size {text:?}: unknown unit {other:?}")),
    };
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("invalid size {text:?}: out of range"));
    }
    Ok(bytes as u64)
}

pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("a").is_ok());
        assert!(validate_name("web-1").is_ok());
        assert!(validate_name(&"a".repeat(63)).is_ok());
        assert!(validate_name(&"a".repeat(64)).is_err());
        assert!(validate_name("-a").is_err());
        assert!(validate_name("Web").is_err());
        assert!(validate_name("a_b").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name("a/b").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0.5GiB"), Ok(512 << 20));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(format_size(64 << 20), "64.0MiB");
    }

    #[test]
    fn kind_round_trip() {
        for k in [Kind::App, Kind::System, Kind::Vm] {
            assert_eq!(k.as_str().parse::<Kind>(), Ok(k));
        }
        assert!("docker".parse::<Kind>().is_err());
    }
}
