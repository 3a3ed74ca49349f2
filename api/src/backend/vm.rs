//! microVMs (Firecracker-style): one `ltv vmm` child process per instance, booting the
//! project's guest kernel from a root disk made of the image (see `rootdisk`), with `ltv`
//! as the guest's `/init` and agent. Exec, power-off and guest facts go to the agent over
//! the VM's hybrid vsock socket.

use super::{blocking, Backend, Started};
use crate::client::{Client, Endpoint};
use crate::daemon::error::ApiError;
use crate::types::{
    parse_size, ExecPost, GuestFacts, Image, Instance, InstanceConfig, Kind, Usage,
};
use async_trait::async_trait;
use ltv_containers::network::{self, BridgeConfig};
use ltv_containers::process::Stdio;
use ltv_vmm::{Flavour, VmConfig};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Firecracker's default too. On kvm-pvm the guest kernel's memory setup is emulated and
/// grows with the size: `LTV-READY` 17.4 / 17.4 s at 128 MiB, 19.3 / 22.2 s at 256 MiB (same
/// runs, 2026-11-28; 8.5 s at 128 MiB since 2026-11-29).
const DEFAULT_MEMORY: u64 = 128 << 20;
/// The guest memory an instance asks for, or the default.
fn guest_memory_bytes(config: &InstanceConfig) -> Result<u64, String> {
    config
        .memory
        .as_deref()
        .map_or(Ok(DEFAULT_MEMORY), parse_size)
}

// Boots to a running agent take minutes on kvm-pvm hosts (guest kernel code is emulated),
// well under a second on hardware KVM.
const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// The guest's vsock context id; each VM has its own vsock device, so all can use 3.
const GUEST_CID: u64 = 3;

pub struct VmBackend {
    /// `<state>/instances`
    instances_dir: PathBuf,
    /// `<state>/images`, the image store root.
    images_dir: PathBuf,
    /// `--kernel` / `LTV_KERNEL`; else the newest cached build.
    kernel: Option<PathBuf>,
    flavour: Flavour,
    /// The bridge each VM's TAP joins, as the containers' veths do.
    bridge: Option<BridgeConfig>,
    /// `<state>/bundle`: our binary and libraries for the guest's disk.
    bundle_cache: PathBuf,
}

impl VmBackend {
    pub fn new(
        instances_dir: PathBuf,
        images_dir: PathBuf,
        kernel: Option<PathBuf>,
        bridge: Option<BridgeConfig>,
        bundle_cache: PathBuf,
    ) -> Self {
        VmBackend {
            bundle_cache,
            instances_dir,
            images_dir,
            kernel,
            flavour: ltv_vmm::kvm_flavour(),
            bridge,
        }
    }

    /// The instance's NIC: its TAP on the bridge, created now, and the guest's address for
    /// the kernel command line. `None` without a bridge or an address (`--network none`).
    fn plug_nic(
        &self,
        instance: &Instance,
    ) -> Result<Option<(ltv_vmm::config::NetConfig, String)>, ApiError> {
        let (Some(bridge), Some(address)) = (&self.bridge, &instance.address) else {
            return Ok(None);
        };
        let ip: std::net::Ipv4Addr = address
            .parse()
            .map_err(|_| ApiError::internal(format!("stored address {address:?} is not IPv4")))?;
        let tap = network::tap_ifname(&instance.name);
        // A TAP left by a VMM that died with the daemon down.
        let _ = network::detach(&tap);
        network::create_tap(&tap, &bridge.name)
            .map_err(|e| ApiError::internal(format!("TAP for {:?}: {e}", instance.name)))?;
        let o = ip.octets();
        // Locally administered, unique per address on the bridge.
        let mac = format!("02:4c:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
        let args = format!(
            " ltv.ip={ip}/{} ltv.gw={}",
            bridge.subnet.prefix(),
            bridge.gateway()
        );
        Ok(Some((ltv_vmm::config::NetConfig { tap, mac }, args)))
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.instances_dir.join(name)
    }

    /// The guest kernel to boot, if there is one.
    fn kernel(&self) -> Option<PathBuf> {
        match &self.kernel {
            Some(k) => k.is_file().then(|| k.clone()),
            None => newest_cached_kernel(),
        }
    }

    /// (memory MiB, vCPUs), checked against this host.
    fn sizing(&self, instance: &Instance) -> Result<(u64, u32), ApiError> {
        let c = &instance.config;
        let mib = guest_memory_bytes(c).map_err(ApiError::bad_request)? >> 20;
        if mib < ltv_vmm::config::MIN_MEMORY_MIB {
            return Err(ApiError::bad_request(format!(
                "memory {} is below the microVM minimum of {} MiB",
                c.memory.as_deref().unwrap_or_default(),
                ltv_vmm::config::MIN_MEMORY_MIB
            )));
        }
        if let Some(avail) = ltv_vmm::config::host_mem_available_mib() {
            if mib > avail {
                return Err(ApiError::bad_request(format!(
                    "memory {mib} MiB is more than the host has available ({avail} MiB)"
                )));
            }
        }
        let vcpus = match c.cpus {
            None => 1,
            Some(n) if n >= 1.0 && n.fract() == 0.0 && n <= u32::MAX as f64 => n as u32,
            Some(n) => {
                return Err(ApiError::bad_request(format!(
                    "cpus {n} is invalid for a microVM: use a whole number of vCPUs, at least 1"
                )))
            }
        };
        let limit = ltv_vmm::max_vcpus_for(self.flavour);
        if vcpus > limit.max {
            return Err(ApiError::bad_request(format!(
                "{vcpus} vCPUs is more than this host allows ({}): {}",
                limit.max,
                limit.reason.unwrap_or("the VMM's limit")
            )));
        }
        Ok((mib, vcpus))
    }

    fn vm_config(&self, instance: &Instance, image: &Image) -> Result<VmConfig, ApiError> {
        let (memory_mib, vcpus) = self.sizing(instance)?;
        let kernel = self.kernel().ok_or_else(no_kernel)?;
        let dir = self.dir(&instance.name);
        let mut cmdline = format!(
            "console=ttyS0 quiet root=/dev/vda rw rootfstype=ext4 init=/init ltv.hostname={}",
            instance.name
        );
        let init = instance
            .config
            .env
            .iter()
            .find_map(|e| e.strip_prefix("LTV_INIT="))
            .map(str::to_string)
            .or_else(|| image.init.clone());
        // Without one, the guest's /init stays PID 1 itself (guest-kernel/init.c).
        let init = init.filter(|i| !i.is_empty() && !i.contains(char::is_whitespace));
        cmdline.push_str(&format!(" ltv.init={}", init.as_deref().unwrap_or("none")));
        // Extra guest kernel arguments for every VM of this daemon (e.g. to debug a guest).
        if let Ok(extra) = std::env::var("LTV_VM_KERNEL_ARGS") {
            cmdline.push(' ');
            cmdline.push_str(&extra);
        }
        Ok(VmConfig {
            kernel,
            initrd: None,
            cmdline,
            memory_mib,
            vcpus,
            console_log: dir.join("console.log"),
            console_stdout: false,
            console_stdin: false,
            control_socket: Some(dir.join("vmm.sock")),
            hugepages: false,
            boot_protocol: Default::default(),
            disks: vec![ltv_vmm::config::DiskConfig {
                path: dir.join("disk.img"),
                read_only: false,
                id: "ltv-root".into(),
            }],
            net: None,
            vsock: Some(ltv_vmm::config::VsockConfig {
                guest_cid: GUEST_CID,
                uds_path: dir.join("vsock.sock"),
            }),
        })
    }
}

impl VmBackend {
    /// Spawns the VMM and waits until the guest agent answers; on failure the VMM is gone.
    async fn boot(&self, instance: &Instance, config: VmConfig) -> Result<Started, ApiError> {
        let dir = self.dir(&instance.name);
        let console = config.console_log.clone();
        let vmm_log = dir.join("vmm.log");
        let config_path = dir.join("vmm.json");
        // The console log shows this boot only.
        let _ = std::fs::remove_file(&console);
        if let Some(sock) = &config.control_socket {
            let _ = std::fs::remove_file(sock);
        }
        remove_vsock_sockets(&dir);
        // Where the agent says it is up (hybrid vsock: guest-initiated connections to a
        // port arrive on `<uds>_<port>`). Without it we only probe.
        let ready_path = dir.join(format!(
            "vsock.sock_{}",
            crate::daemon::agent::READY_VSOCK_PORT
        ));
        let ready = tokio::net::UnixListener::bind(&ready_path)
            .inspect_err(|e| tracing::warn!("readiness socket {}: {e}", ready_path.display()))
            .ok();
        let json = serde_json::to_vec_pretty(&config)
            .map_err(|e| ApiError::internal(format!("VMM config: {e}")))?;
        std::fs::write(&config_path, json)
            .map_err(|e| ApiError::internal(format!("write {}: {e}", config_path.display())))?;
        let log = std::fs::File::create(&vmm_log)
            .map_err(|e| ApiError::internal(format!("create {}: {e}", vmm_log.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| ApiError::internal(format!("vmm log: {e}")))?;
        let t = Instant::now();
        // Its own process group: a Ctrl-C on the daemon's terminal must not reach it.
        let mut child = std::process::Command::new("/proc/self/exe")
            .arg("vmm")
            .arg("--config")
            .arg(&config_path)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .map_err(|e| ApiError::internal(format!("spawn the VMM: {e}")))?;
        let pid = child.id() as i32;
        let start_time = ltv_containers::process::proc_start_time(pid).unwrap_or_default();
        let deadline = t + timeout_from_env();
        let agent = self.agent_client(&instance.name);
        // Probes cost the guest work while it boots, so they are rare; the agent's hello
        // on the readiness socket triggers one at once.
        const PROBE_EVERY: Duration = Duration::from_secs(3);
        let mut next_probe = Instant::now() + PROBE_EVERY;
        let failure = loop {
            let hello = match &ready {
                Some(l) => matches!(
                    tokio::time::timeout(Duration::from_millis(200), l.accept()).await,
                    Ok(Ok(_))
                ),
                None => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    false
                }
            };
            if hello || Instant::now() >= next_probe {
                // Until the guest's vsock driver is up the handshake gets no answer at all, so
                // a blind probe gives up soon. After the agent's hello it serves: its first
                // answer runs code the guest has not paged in yet (over 2 s on kvm-pvm), and
                // giving up on it only cost a second request and a wait for the next probe.
                let patience = if hello {
                    deadline.saturating_duration_since(Instant::now())
                } else {
                    Duration::from_secs(2)
                };
                let probe =
                    tokio::time::timeout(patience, agent.get::<crate::types::ServerInfo>("/1.0"))
                        .await;
                next_probe = Instant::now() + PROBE_EVERY;
                if let Ok(Ok(info)) = probe {
                    tracing::info!(instance = %instance.name, pid, kernel = %info.kernel,
                        secs = t.elapsed().as_secs_f64(), "microVM ready: its agent answers");
                    let _ = std::fs::remove_file(&ready_path);
                    // The supervisor waits for it from here on.
                    drop(child);
                    return Ok(Started { pid, start_time });
                }
            }
            if exited(pid) {
                break "the VMM exited before the guest agent was up".to_string();
            }
            if Instant::now() > deadline {
                break format!(
                    "the guest agent did not answer within {:.0} s",
                    timeout_from_env().as_secs_f64()
                );
            }
        };
        let _ = std::fs::remove_file(&ready_path);
        // Not supervised yet, so we reap it ourselves.
        kill9(pid);
        let _ = blocking(move || child.wait()).await;
        Err(ApiError::internal(format!(
            "microVM {:?} did not boot: {failure}\n--- VMM log (tail) ---\n{}\n--- console (last 20 lines) ---\n{}",
            instance.name,
            tail(&vmm_log, 10),
            tail(&console, 20)
        )))
    }

    /// The guest agent, through the VM's hybrid vsock socket.
    fn agent_client(&self, name: &str) -> Client {
        Client::to(Endpoint::HybridVsock {
            uds: self.dir(name).join("vsock.sock"),
            port: crate::daemon::agent::AGENT_VSOCK_PORT,
        })
    }
}

/// The hybrid vsock socket and the `<uds>_<port>` listeners of guest-initiated connections.
fn remove_vsock_sockets(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with("vsock.sock") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn no_kernel() -> ApiError {
    ApiError::bad_request("no guest kernel: build it with guest-kernel/build.sh (or pass --kernel)")
}

/// The newest `<cache>/kernel/*/vmlinux` that guest-kernel/build.sh left.
fn newest_cached_kernel() -> Option<PathBuf> {
    let cache = std::env::var_os("LTV_CACHE_DIR").unwrap_or_else(|| "/var/cache/ltv".into());
    std::fs::read_dir(Path::new(&cache).join("kernel"))
        .ok()?
        .filter_map(|e| {
            let p = e.ok()?.path().join("vmlinux");
            let mtime = p.metadata().ok()?.modified().ok()?;
            Some((mtime, p))
        })
        .max()
        .map(|(_, p)| p)
}

/// Is `pid` gone or a zombie (exited, not yet reaped)?
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .is_none_or(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn timeout_from_env() -> Duration {
    std::env::var("LTV_VM_BOOT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map_or(DEFAULT_BOOT_TIMEOUT, Duration::from_secs_f64)
}

fn kill9(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

#[async_trait]
impl Backend for VmBackend {
    fn available(&self) -> bool {
        self.flavour != Flavour::None
    }

    fn validate(&self, instance: &Instance, image: &Image) -> Result<(), ApiError> {
        debug_assert_eq!(instance.kind, Kind::Vm);
        if !self.available() {
            return Err(ApiError::bad_request("no usable /dev/kvm on this host"));
        }
        if !instance.config.command.is_empty() {
            return Err(ApiError::bad_request(
                "a command for a microVM arrives with the guest agent: launch it without one",
            ));
        }
        if instance.config.pids.is_some() {
            return Err(ApiError::bad_request(
                "a pids limit does not apply to microVMs",
            ));
        }
        if instance.config.read_only {
            return Err(ApiError::bad_request(
                "--read-only is for app containers: a microVM boots from its own root disk",
            ));
        }
        if !instance.config.tmpfs.is_empty() {
            return Err(ApiError::bad_request(
                "--tmpfs is for containers: a microVM's guest mounts its own",
            ));
        }
        self.vm_config(instance, image).map(|_| ())
    }

    async fn create(&self, instance: &Instance, image: &Image) -> Result<(), ApiError> {
        let dir = self.dir(&instance.name);
        let rootfs = self.images_dir.join(&image.fingerprint).join("rootfs");
        let name = instance.name.clone();
        let cache = self.bundle_cache.clone();
        blocking(move || {
            std::fs::create_dir_all(&dir)?;
            let bundle = super::bundle::ensure(&cache)?;
            super::rootdisk::build(&rootfs, &dir.join("disk.img"), &name, &bundle)
        })
        .await?
        .map_err(|e| ApiError::internal(format!("build the root disk: {e}")))
    }

    async fn start(
        &self,
        instance: &Instance,
        image: &Image,
        _stdio: Stdio,
        _tty: bool,
    ) -> Result<Started, ApiError> {
        let mut config = self.vm_config(instance, image)?;
        if let Some((net, args)) = self.plug_nic(instance)? {
            config.net = Some(net);
            config.cmdline.push_str(&args);
        }
        let result = self.boot(instance, config).await;
        if result.is_err() {
            let _ = network::detach(&network::tap_ifname(&instance.name));
        }
        result
    }

    fn wants_address(&self, instance: &Instance) -> bool {
        instance.config.network.as_deref() != Some("none")
    }
    async fn signal_stop(&self, instance: &Instance, pid: i32, kill: bool) -> Result<(), ApiError> {
        if !kill {
            // A clean shutdown through the guest's own init; the VMM exits when the guest
            // powers off. The daemon kills it if that takes longer than the stop timeout.
            let asked = tokio::time::timeout(
                Duration::from_secs(5),
                self.agent_client(&instance.name).call::<serde_json::Value>(
                    hyper::Method::PUT,
                    "/1.0/state",
                    Some(&crate::types::GuestStatePut {
                        action: "poweroff".into(),
                    }),
                ),
            )
            .await;
            match asked {
                Ok(Ok(_)) => return Ok(()),
                other => tracing::warn!(instance = %instance.name, ?other,
                    "the guest agent did not take the power-off; stopping the VMM"),
            }
            let sock = self.dir(&instance.name).join("vmm.sock");
            let asked = blocking(move || {
                ltv_vmm::control::ask(
                    &sock,
                    ltv_vmm::control::ControlRequest::Stop,
                    Duration::from_secs(5),
                )
            })
            .await?;
            match asked {
                Ok(answer) if answer.contains("\"ok\":true") => return Ok(()),
                other => {
                    tracing::warn!(instance = %instance.name, ?other, "VMM stop request failed; killing it")
                }
            }
        }
        kill9(pid);
        Ok(())
    }

    async fn cleanup(&self, instance: &Instance) -> Result<(), ApiError> {
        if let Err(e) = network::detach(&network::tap_ifname(&instance.name)) {
            tracing::warn!(instance = %instance.name, "removing the TAP: {e}");
        }
        let dir = self.dir(&instance.name);
        let _ = std::fs::remove_file(dir.join("vmm.sock"));
        remove_vsock_sockets(&dir);
        Ok(())
    }

    fn agent(&self, instance: &Instance) -> Option<Client> {
        Some(self.agent_client(&instance.name))
    }

    /// The agent is the guest's daemon: it holds the VM's nested instances too.
    async fn nested_daemon(
        &self,
        instance: &Instance,
        _image: &Image,
        _pid: i32,
        _start: bool,
    ) -> Result<Client, ApiError> {
        Ok(self.agent_client(&instance.name))
    }

    async fn delete(&self, instance: &Instance) -> Result<(), ApiError> {
        let dir = self.dir(&instance.name);
        super::remove_instance_dir(&dir)
    }

    async fn exec(
        &self,
        _instance: &Instance,
        _image: &Image,
        _pid: i32,
        _req: &ExecPost,
        _stdio: Stdio,
    ) -> Result<Started, ApiError> {
        Err(ApiError::internal(
            "a microVM's processes are started by its guest agent",
        ))
    }

    async fn usage(&self, instance: &Instance) -> Option<Usage> {
        let pid = instance.pid?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name: state is 3rd, utime 14th, stime 15th.
        let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: u64 = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let memory_limit = guest_memory_bytes(&instance.config).ok();
        // A short wait: `info` must not hang on a guest that is busy or shutting down.
        let guest = tokio::time::timeout(
            Duration::from_secs(2),
            self.agent_client(&instance.name)
                .get::<crate::types::ServerInfo>("/1.0"),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .map(|i| GuestFacts {
            kernel: i.kernel,
            machine: i.machine,
        });
        Some(Usage {
            memory_bytes: rss_kib * 1024,
            memory_limit_bytes: memory_limit,
            pids: 1,
            cpu_time_ns: ticks * (1_000_000_000 / hz),
            pid_ns_depth: Some(0),
            guest,
        })
    }
}
