//! Application containers (Docker-style): one process tree from an image, on an
//! overlay rootfs, in its own namespaces and cgroup.

use super::refill::{Quiet, RefillJob, Refiller};
use super::{blocking, Backend, Started};
use crate::client::Client;
use crate::daemon::error::ApiError;
use crate::daemon::reaper::Exit;
use crate::db::IDMAP_SIZE;
use crate::types::{parse_size, ExecPost, Image, Instance, Kind, ServerInfo, Usage};
use async_trait::async_trait;
use ltv_containers::cgroups;
use ltv_containers::image::ImageStore;
use ltv_containers::network::{self, BridgeConfig};
use ltv_containers::process::{self, Stdio};
use ltv_containers::spec::{
    check_tmpfs, Bind, ContainerSpec, IdMap, Limits, NetworkMode, ProcessSpec, RootfsSpec, Tmpfs,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct ContainerBackend {
    /// `<state>/instances`
    instances_dir: PathBuf,
    /// `<state>/images`, the image store root.
    images: Arc<ImageStore>,
    /// Our top-level cgroup, relative to each hierarchy root.
    cgroup_root: String,
    /// Pre-spawned helpers (cgroup v1 only), refilled after each start: one pool for
    /// unprivileged (user-namespaced) containers, one for privileged ones.
    pools: Vec<Arc<process::Pool>>,
    /// Exec helpers started ahead of time (cgroup v1 only), refilled after each exec.
    exec_spares: Option<Arc<process::ExecSpares>>,
    /// Starts and execs in progress: refills wait for them (see [`Quiet`]).
    quiet: Arc<Quiet>,
    /// Tops up the pools (by index) and, last, the exec spares.
    refiller: Refiller,
    /// The bridge instances attach to (`None`: loopback only).
    bridge: Option<BridgeConfig>,
    /// `<state>/bundle`: the `ltv` that system containers get at `/.ltv`.
    bundle_cache: PathBuf,
    /// The bundle of our binary, once made (our binary does not change under us).
    bundle: std::sync::OnceLock<PathBuf>,
    /// Our own user namespace's id range when we are nested in a container: ours to give
    /// out as it is, there being no room for private ranges in it.
    own_idmap: Option<IdMap>,
    /// We run in a kvm-pvm guest: every container process gets the glibc tunables that
    /// keep it off AVX (see `PVM_GLIBC_TUNABLES`), as the guest's own processes do.
    pvm_guest: bool,
    /// Held while a system container's nested daemon is being started.
    nested_starts: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Busybox inits killed in their shutdown pause (see `end_busybox_shutdown_pause`).
    powered_off: Arc<std::sync::Mutex<std::collections::HashSet<i32>>>,
    /// The host end of each running container's veth, by interface index: its release
    /// needs no lookup, which waited for the RTNL lock that the kernel holds while it
    /// tears down the exited container's network namespace (0.3-0.7 ms off a bridged
    /// `run --rm`).
    veths: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

/// Where a nesting system container's own daemon listens, inside it.
const NESTED_SOCKET: &str = "run/ltv/ltv.sock";
/// Where it keeps its state (its default state dir).
const NESTED_STATE: &str = "/var/lib/ltv";

impl ContainerBackend {
    /// `pool_size` spare helpers are kept ready (0: none).
    pub fn new(
        instances_dir: PathBuf,
        images: Arc<ImageStore>,
        cgroup_root: String,
        pool_size: usize,
        bridge: Option<BridgeConfig>,
        bundle_cache: PathBuf,
    ) -> Self {
        // Spares a previous daemon left behind are not ours to claim, and the groups it
        // died making are nobody's.
        process::remove_stale_spares(&cgroup_root);
        cgroups::remove_unpublished_levels(&cgroup_root);
        // Before the spares, which it clones. Like them, it costs a process up front,
        // which a guest whose kernel is emulated (pool 0) would rather not pay at boot.
        if pool_size > 0 {
            if let Err(e) = ltv_containers::forkserver::start() {
                tracing::warn!("no fork server ({e}): each container helper is an exec of ltv");
            }
        }
        let pvm_guest = crate::daemon::agent::pvm_guest();
        if pvm_guest {
            // Measured: a system container's setup in such a guest took over 30 s while
            // the host was busy.
            process::set_setup_timeout(std::time::Duration::from_secs(300));
        }
        // Most containers are unprivileged: that pool gets the size, the others one spare
        // each. With a bridge, spares come with their veth made, and those of two more
        // pools without, for `--network none`.
        let bridged = bridge.is_some();
        let unbridged = if bridged { pool_size.min(1) } else { 0 };
        let pools = [
            (true, bridged, pool_size),
            (false, bridged, pool_size.min(1)),
            (true, false, unbridged),
            (false, false, unbridged),
        ]
        .into_iter()
        .filter_map(|(userns, veths, size)| process::Pool::new(&cgroup_root, size, userns, veths))
        .map(Arc::new)
        .collect::<Vec<Arc<process::Pool>>>();
        let exec_spares = process::ExecSpares::new(pool_size).map(Arc::new);
        let mut jobs: Vec<RefillJob> = pools
            .iter()
            .map(|pool| {
                let pool = pool.clone();
                Box::new(move |count| pool.refill(count)) as RefillJob
            })
            .collect();
        if let Some(spares) = exec_spares.clone() {
            jobs.push(Box::new(move |count| spares.refill(count)));
        }
        let quiet = Arc::new(Quiet::default());
        let backend = ContainerBackend {
            instances_dir,
            images,
            cgroup_root,
            refiller: Refiller::new(quiet.clone(), jobs),
            quiet,
            pools,
            exec_spares,
            bridge,
            bundle_cache,
            bundle: std::sync::OnceLock::new(),
            own_idmap: own_idmap(),
            pvm_guest,
            nested_starts: Default::default(),
            powered_off: Default::default(),
            veths: Default::default(),
        };
        for job in 0..=backend.pools.len() {
            backend.refiller.request(job);
        }
        backend
    }

    /// The index of the pool that has spares for `instance`.
    fn pool_for(&self, instance: &Instance) -> Option<usize> {
        let userns = instance.idmap_base.is_some();
        let veth = self.bridge.is_some() && self.wants_address(instance);
        self.pools
            .iter()
            .position(|p| p.userns() == userns && p.veths() == veth)
    }

    fn refill_exec_spares(&self) {
        // Its job comes after the pools'.
        self.refiller.request(self.pools.len());
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.instances_dir.join(name)
    }

    fn veths(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, u32>> {
        self.veths.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cgroup(&self, name: &str) -> String {
        format!("{}/{}", self.cgroup_root, name)
    }

    /// Frees what a run held: its mounts and cgroups, then the host end of its veth (the
    /// veth goes with the container's network namespace; this covers a namespace that
    /// something else still holds). Deleting a link waits for the network stack to quiesce
    /// (tens of ms): unless `wait_for_veth`, that goes on a thread, by index, so a veth of
    /// the next start (`start` removes a leftover first) is never hit.
    async fn release(&self, instance: &Instance, wait_for_veth: bool) -> Result<(), ApiError> {
        let spec = self.skeleton(&instance.name);
        blocking(move || process::destroy(&spec))
            .await?
            .map_err(runtime_error)?;
        // Without an address (`--network none`) it never had a veth.
        if instance.address.is_none() {
            return Ok(());
        }
        let ifname = network::host_ifname(&instance.name);
        // Looked up only when this daemon did not start it (it was restarted since).
        let known = self.veths().remove(&instance.name);
        let veth = match known {
            Some(index) => network::HostLink::at(&ifname, index),
            None => {
                let found = blocking(move || network::HostLink::find(&ifname))
                    .await?
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                let Some(veth) = found else {
                    return Ok(());
                };
                veth
            }
        };
        if wait_for_veth {
            blocking(move || veth.delete())
                .await?
                .map_err(|e| ApiError::internal(e.to_string()))
        } else {
            std::thread::spawn(move || veth.delete());
            Ok(())
        }
    }

    /// Names, paths and cgroup of an instance; enough for `destroy`.
    fn skeleton(&self, name: &str) -> ContainerSpec {
        let dir = self.dir(name);
        ContainerSpec {
            name: name.to_string(),
            hostname: name.to_string(),
            rootfs: RootfsSpec {
                lowerdirs: vec![],
                upperdir: dir.join("upper"),
                workdir: dir.join("work"),
                mountpoint: dir.join("rootfs"),
                volatile: false,
                readonly: false,
            },
            process: ProcessSpec {
                args: vec![],
                env: vec![],
                cwd: "/".into(),
                uid: 0,
                gid: 0,
                additional_gids: vec![],
                tty: false,
            },
            limits: Limits::default(),
            cgroup: self.cgroup(name),
            network: NetworkMode::Loopback,
            idmap: None,
            nesting: false,
            init_may_reboot: false,
            run_tmpfs: false,
            binds: vec![],
            tmpfs: vec![],
        }
    }

    async fn spec(
        &self,
        instance: &Instance,
        image: &Image,
        process: ProcessSpec,
    ) -> Result<ContainerSpec, ApiError> {
        let mut spec = self.skeleton(&instance.name);
        spec.rootfs.lowerdirs = vec![self.rootfs_of(image)];
        spec.rootfs.volatile = instance.auto_remove;
        spec.rootfs.readonly = instance.config.read_only;
        spec.tmpfs = tmpfs_of(instance)?;
        spec.process = process;
        spec.limits = limits_of(instance)?;
        spec.idmap = self.idmap(instance);
        spec.network = self.network_of(instance)?;
        spec.init_may_reboot = instance.kind == Kind::System;
        spec.run_tmpfs = instance.kind == Kind::System;
        if instance.config.read_only {
            spec.binds = self.name_files(instance, image);
        }
        if nests(instance) {
            let bundle = match self.bundle.get() {
                Some(b) => b.clone(),
                None => {
                    let cache = self.bundle_cache.clone();
                    let b = blocking(move || super::bundle::ensure(&cache))
                        .await?
                        .map_err(|e| {
                            ApiError::internal(format!("the ltv bundle for containers: {e}"))
                        })?;
                    self.bundle.get_or_init(|| b).clone()
                }
            };
            spec.nesting = true;
            spec.binds = vec![
                Bind {
                    source: bundle,
                    target: super::bundle::GUEST_DIR.into(),
                    readonly: true,
                },
                Bind {
                    source: self.nested_state_dir(instance)?,
                    target: NESTED_STATE.into(),
                    readonly: false,
                },
            ];
        }
        Ok(spec)
    }

    /// The state of a nesting container's own daemon, on our filesystem rather than in its
    /// overlay rootfs: overlayfs refuses an upper dir on overlayfs. Owned by its root.
    fn nested_state_dir(&self, instance: &Instance) -> Result<PathBuf, ApiError> {
        let dir = self.dir(&instance.name).join("nested");
        let io = |e: std::io::Error| ApiError::internal(format!("{}: {e}", dir.display()));
        if !dir.exists() {
            std::fs::create_dir(&dir).map_err(io)?;
            let root = self.idmap(instance).map(|m| m.host_uid);
            std::os::unix::fs::chown(&dir, root, root).map_err(io)?;
        }
        Ok(dir)
    }

    /// The instance's user-namespace map: its private range, or ours when nested.
    fn idmap(&self, instance: &Instance) -> Option<IdMap> {
        let base = instance.idmap_base?;
        Some(self.own_idmap.unwrap_or(IdMap {
            host_uid: base,
            host_gid: base,
            size: IDMAP_SIZE,
        }))
    }

    fn network_of(&self, instance: &Instance) -> Result<NetworkMode, ApiError> {
        // Docker's and LXD's `none`: no interface but `lo`, which is up.
        if instance.config.network.as_deref() == Some("none") {
            return Ok(NetworkMode::Loopback);
        }
        let (Some(address), Some(bridge)) = (&instance.address, &self.bridge) else {
            return Ok(NetworkMode::Loopback);
        };
        let address = address
            .parse()
            .map_err(|_| ApiError::internal(format!("stored address {address:?} is not IPv4")))?;
        let att = bridge.attachment(&instance.name, address);
        Ok(NetworkMode::Bridge {
            bridge: bridge.name.clone(),
            host_ifname: att.host_ifname,
            address: att.address,
            prefix: att.prefix,
            gateway: att.gateway,
        })
    }

    /// /etc/hosts and /etc/hostname name the instance, written into
    /// the upper dir before the rootfs is mounted (the image's stay untouched), owned by
    /// the container's root. A read-only rootfs has no upper dir: they are written beside
    /// it and bound over the image's (see `name_files`), as Docker does for every container.
    fn write_hosts(&self, instance: &Instance) -> Result<(), ApiError> {
        let address = instance.address.as_deref().and_then(|a| a.parse().ok());
        let etc = match instance.config.read_only {
            true => self.dir(&instance.name),
            false => self.dir(&instance.name).join("upper/etc"),
        };
        let owner = self.idmap(instance).map(|m| m.host_uid);
        let io =
            |e: std::io::Error| ApiError::internal(format!("write {}/hosts: {e}", etc.display()));
        if !etc.exists() {
            std::fs::create_dir_all(&etc).map_err(io)?;
            std::fs::set_permissions(&etc, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .map_err(io)?;
            std::os::unix::fs::chown(&etc, owner, owner).map_err(io)?;
        }
        let mut files = vec![(
            etc.join("hosts"),
            network::hosts_file(&instance.name, address),
        )];
        if !etc.join("hostname").exists() {
            // A system container's init sets the hostname from here, as on a machine;
            // written once, as LXD's templates do, so a change made inside persists.
            files.push((etc.join("hostname"), format!("{}\n", instance.name)));
        }
        for (path, text) in files {
            std::fs::write(&path, text).map_err(io)?;
            std::os::unix::fs::chown(&path, owner, owner).map_err(io)?;
        }
        Ok(())
    }

    /// Binds of the files `write_hosts` wrote for a read-only rootfs over the image's own,
    /// where the image has them as plain files: nothing can be made in a read-only root.
    fn name_files(&self, instance: &Instance, image: &Image) -> Vec<Bind> {
        let rootfs = self.rootfs_of(image);
        let dir = self.dir(&instance.name);
        ["hosts", "hostname"]
            .into_iter()
            .filter(|f| {
                std::fs::symlink_metadata(rootfs.join("etc").join(f))
                    .is_ok_and(|m| m.file_type().is_file())
            })
            .map(|f| Bind {
                source: dir.join(f),
                target: format!("/etc/{f}"),
                readonly: false,
            })
            .collect()
    }

    fn rootfs_of(&self, image: &Image) -> PathBuf {
        self.images.root().join(&image.fingerprint).join("rootfs")
    }

    /// A system container runs the image's init; `command` overrides it.
    fn system_init(&self, instance: &Instance, image: &Image) -> Result<Vec<String>, ApiError> {
        if !instance.config.command.is_empty() {
            return Ok(instance.config.command.clone());
        }
        let init = image.init.clone().unwrap_or_else(|| "/sbin/init".into());
        let path = self.rootfs_of(image).join(init.trim_start_matches('/'));
        // A symlink into the image (busybox's init) is fine: only its presence matters.
        if std::fs::symlink_metadata(&path).is_err() {
            return Err(ApiError::bad_request(format!(
                "image {:?} has no init: {init} is missing (a system container runs it as PID 1; use --kind app or give a command)",
                instance.image
            )));
        }
        Ok(vec![init])
    }

    /// The signal that asks the image's init to power off, as LXC sends it.
    fn poweroff_signal(&self, fingerprint: &str) -> nix::sys::signal::Signal {
        use nix::sys::signal::Signal;
        let init = self
            .images
            .get(fingerprint)
            .ok()
            .and_then(|i| i.config.init);
        let init = init.unwrap_or_else(|| "/sbin/init".into());
        let path = self
            .images
            .root()
            .join(fingerprint)
            .join("rootfs")
            .join(init.trim_start_matches('/'));
        let target = std::fs::read_link(&path)
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default();
        if target.contains("busybox") {
            Signal::SIGUSR2
        } else if target.contains("systemd") {
            // SIGRTMIN+4: systemd's poweroff; nix has no name for realtime signals.
            Signal::try_from(libc::SIGRTMIN() + 4).unwrap_or(Signal::SIGTERM)
        } else {
            Signal::SIGPWR
        }
    }

    fn main_process(
        &self,
        instance: &Instance,
        image: &Image,
        tty: bool,
    ) -> Result<ProcessSpec, ApiError> {
        if instance.kind == Kind::System {
            let args = self.system_init(instance, image)?;
            return self.process(instance, image, args, &[], None, tty);
        }
        let cmd = if instance.config.command.is_empty() {
            &image.cmd
        } else {
            &instance.config.command
        };
        let args: Vec<String> = image.entrypoint.iter().chain(cmd.iter()).cloned().collect();
        if args.is_empty() {
            return Err(ApiError::bad_request(
                "no command: the image has none and none was given",
            ));
        }
        self.process(instance, image, args, &[], None, tty)
    }

    fn process(
        &self,
        instance: &Instance,
        image: &Image,
        args: Vec<String>,
        extra_env: &[String],
        cwd: Option<&str>,
        tty: bool,
    ) -> Result<ProcessSpec, ApiError> {
        let rootfs = self.rootfs_of(image);
        let (uid, gid) = resolve_user(&rootfs, &image.user)?;
        let mut env = merge_env(&image.env, &instance.config.env);
        env = merge_env(&env, extra_env);
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        }
        env = merge_env(
            &[format!("HOSTNAME={}", instance.name), "HOME=/root".into()],
            &env,
        );
        if self.pvm_guest {
            // Underneath: an image or a caller that sets its own tunables keeps them.
            env = merge_env(&[crate::daemon::agent::PVM_GLIBC_TUNABLES.into()], &env);
        }
        if tty && !env.iter().any(|e| e.starts_with("TERM=")) {
            env.push("TERM=xterm".into());
        }
        let cwd = cwd
            .map(str::to_string)
            .or_else(|| instance.config.workdir.clone())
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| {
                if image.working_dir.is_empty() {
                    "/".into()
                } else {
                    image.working_dir.clone()
                }
            });
        if !cwd.starts_with('/') {
            return Err(ApiError::bad_request(format!(
                "working directory {cwd:?} must be absolute"
            )));
        }
        Ok(ProcessSpec {
            args,
            env,
            cwd,
            uid,
            gid,
            additional_gids: vec![],
            tty,
        })
    }
}

/// Unprivileged system containers may run containers themselves (an app container in a
/// system container), through their own `ltv daemon`.
fn nests(instance: &Instance) -> bool {
    instance.kind == Kind::System && instance.idmap_base.is_some()
}

/// How many pid namespaces below ours `pid` is: its `NSpid` has one entry per level.
fn pid_ns_depth(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    Some(line.split_whitespace().count().checked_sub(2)? as u32)
}

/// Our user namespace's uid range from 0, when we run in one that is not the host's.
fn own_idmap() -> Option<IdMap> {
    let map = std::fs::read_to_string("/proc/self/uid_map").ok()?;
    let first: Vec<u64> = map
        .lines()
        .next()?
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    match first[..] {
        [0, 0, 4294967295] => None,
        [0, _, size] => Some(IdMap {
            host_uid: 0,
            host_gid: 0,
            size: size.min(u32::MAX as u64) as u32,
        }),
        _ => None,
    }
}

/// The instance's `--tmpfs` mounts, validated.
fn tmpfs_of(instance: &Instance) -> Result<Vec<Tmpfs>, ApiError> {
    let all = instance
        .config
        .tmpfs
        .iter()
        .map(|arg| parse_tmpfs(arg))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::bad_request)?;
    check_tmpfs(&all).map_err(ApiError::bad_request)?;
    Ok(all)
}

/// Docker's `--tmpfs PATH[:OPTIONS]`: options `size=` (as `--memory`, at least 4 KiB),
/// `mode=` (octal), `exec`, `noexec`, `ro`, `rw`, and `nosuid`, `nodev`, which always hold.
fn parse_tmpfs(arg: &str) -> Result<Tmpfs, String> {
    let (target, options) = arg.split_once(':').unwrap_or((arg, ""));
    let mut t = Tmpfs {
        target: target.to_string(),
        size_bytes: None,
        mode: 0o1777,
        exec: false,
        readonly: false,
    };
    for o in options.split(',').filter(|o| !o.is_empty()) {
        let bad = || format!("tmpfs {arg:?}: bad option {o:?}");
        match o.split_once('=') {
            Some(("size", v)) => {
                t.size_bytes = Some(parse_size(v).ok().filter(|b| *b >= 4096).ok_or_else(bad)?)
            }
            Some(("mode", v)) => {
                t.mode = u32::from_str_radix(v, 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(bad)?
            }
            None if o == "exec" || o == "noexec" => t.exec = o == "exec",
            None if o == "ro" || o == "rw" => t.readonly = o == "ro",
            None if o == "nosuid" || o == "nodev" => {}
            _ => return Err(bad()),
        }
    }
    check_tmpfs(std::slice::from_ref(&t))?;
    Ok(t)
}

/// The instance's limits, validated (the API validates at create; this re-checks stored config).
pub fn limits_of(instance: &Instance) -> Result<Limits, ApiError> {
    let c = &instance.config;
    let memory_bytes = match &c.memory {
        None => None,
        Some(text) => {
            let bytes = parse_size(text).map_err(ApiError::bad_request)?;
            if bytes < 4 << 20 {
                return Err(ApiError::bad_request(format!(
                    "memory limit {text} is below the minimum of 4MiB"
                )));
            }
            Some(bytes)
        }
    };
    if let Some(cpus) = c.cpus {
        let host = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1) as f64;
        if !(cpus > 0.0 && cpus <= host) {
            return Err(ApiError::bad_request(format!(
                "cpus {cpus} is out of range: use more than 0 and at most {host}"
            )));
        }
    }
    if c.pids == Some(0) {
        return Err(ApiError::bad_request("pids must be at least 1"));
    }
    Ok(Limits {
        memory_bytes,
        cpus: c.cpus,
        pids: c.pids,
    })
}

/// `base` with `overrides` applied by key.
fn merge_env(base: &[String], overrides: &[String]) -> Vec<String> {
    let key = |e: &str| e.split('=').next().unwrap_or("").to_string();
    let mut out: Vec<String> = base.to_vec();
    for o in overrides {
        let k = key(o);
        match out.iter_mut().find(|e| key(e) == k) {
            Some(slot) => *slot = o.clone(),
            None => out.push(o.clone()),
        }
    }
    out
}

/// OCI `User`: `uid`, `uid:gid`, `name` or `name:group`, names looked up in the image.
fn resolve_user(rootfs: &Path, user: &str) -> Result<(u32, u32), ApiError> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let lookup = |file: &str, name: &str| -> Option<(u32, u32)> {
        let text = std::fs::read_to_string(rootfs.join("etc").join(file)).ok()?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == name)
                .then(|| (f[2].parse().ok(), f[3].parse().ok()))
                .and_then(|(a, b)| Some((a?, b.unwrap_or(0))))
        })
    };
    let (uid, default_gid) = match u.parse::<u32>() {
        Ok(uid) => (uid, lookup_gid_of_uid(rootfs, uid).unwrap_or(uid)),
        Err(_) => lookup("passwd", u).ok_or_else(|| {
            ApiError::bad_request(format!("user {u:?} is not in the image's /etc/passwd"))
        })?,
    };
    let gid = match g {
        None => default_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup("group", g).map(|(gid, _)| gid).ok_or_else(|| {
                ApiError::bad_request(format!("group {g:?} is not in the image's /etc/group"))
            })?,
        },
    };
    Ok((uid, gid))
}

fn lookup_gid_of_uid(rootfs: &Path, uid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(rootfs.join("etc/passwd")).ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[2].parse() == Ok(uid))
            .then(|| f[3].parse().ok())
            .flatten()
    })
}

fn runtime_error(e: process::Error) -> ApiError {
    match e {
        process::Error::CommandNotFound(msg) => ApiError::cannot_exec(127, msg),
        process::Error::CommandNotExecutable(msg) => ApiError::cannot_exec(126, msg),
        process::Error::InvalidSpec(msg) => ApiError::bad_request(msg),
        other => ApiError::internal(other.to_string()),
    }
}

/// Kills every process of a container. Killing the init of its pid namespace kills
/// everything in it, and nothing can be made there afterwards: that usually empties the
/// group without the freezer, whose freeze and thaw each patch kernel text with IPIs to
/// every CPU (`delete --force` 0.85x as long). What is left after 100 ms (a process that
/// joined the group from outside) gets the freezer kill.
fn kill_through_init(cg: &dyn cgroups::CgroupManager, init: i32) -> std::io::Result<()> {
    let in_group = || cg.processes().is_ok_and(|p| p.contains(&init));
    let _ = crate::daemon::reaper::kill_pinned(init, in_group);
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(100);
    while std::time::Instant::now() < deadline {
        if cg.processes().is_ok_and(|p| p.is_empty()) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    cg.kill_all()
}

/// Busybox init pauses 2 s while it powers off: 1 s after its SIGTERM to all and 1 s
/// before reboot(2), for its messages to reach a console. Once it is the last process of
/// its container and asleep in that pause, its shutdown is done (and no sync is pending:
/// the container's files are the host's), so it is killed instead of waited for. Any
/// doubt (it is gone, /proc unreadable, others still run) leaves the normal stop alone.
/// An init killed here goes into `powered_off` first (see `recorded_exit`).
fn end_busybox_shutdown_pause(
    cg: &dyn cgroups::CgroupManager,
    init: i32,
    powered_off: &std::sync::Mutex<std::collections::HashSet<i32>>,
) {
    let powered_off = || powered_off.lock().unwrap_or_else(|p| p.into_inner());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let Ok(syscall) = std::fs::read_to_string(format!("/proc/{init}/syscall")) else {
            return;
        };
        let nr = syscall
            .split(' ')
            .next()
            .and_then(|n| n.parse::<i64>().ok());
        let asleep = nr == Some(libc::SYS_nanosleep) || nr == Some(libc::SYS_clock_nanosleep);
        if asleep && cg.processes().is_ok_and(|p| p == [init]) {
            powered_off().insert(init);
            if let Err(e) = kill_through_init(cg, init) {
                tracing::warn!("ending busybox init's shutdown pause: {e}");
                powered_off().remove(&init);
            }
            return;
        }
    }
}

#[async_trait]
impl Backend for ContainerBackend {
    /// A busybox init whose shutdown pause was cut short is recorded as having powered
    /// off: as the kernel reports a pid namespace's init after its reboot(2), killed by
    /// SIGINT (130), not as killed (137).
    fn recorded_exit(&self, pid: i32, exit: Exit) -> Exit {
        let mut powered_off = self.powered_off.lock().unwrap_or_else(|p| p.into_inner());
        if powered_off.remove(&pid) {
            Exit::Code(128 + libc::SIGINT)
        } else {
            exit
        }
    }

    fn wants_idmap(&self, instance: &Instance) -> bool {
        !instance.config.privileged
    }

    fn wants_address(&self, instance: &Instance) -> bool {
        instance.config.network.as_deref() != Some("none")
    }

    fn validate(&self, instance: &Instance, image: &Image) -> Result<(), ApiError> {
        limits_of(instance)?;
        if let Some(n) = instance
            .config
            .network
            .as_deref()
            .filter(|n| !["bridge", "none"].contains(n))
        {
            return Err(ApiError::bad_request(format!(
                "network {n:?}: use bridge or none"
            )));
        }
        tmpfs_of(instance)?;
        if instance.config.read_only && instance.kind != Kind::App {
            return Err(ApiError::bad_request(
                "--read-only is for app containers: a system container's init writes its root filesystem",
            ));
        }
        self.main_process(instance, image, false).map(|_| ())
    }

    async fn create(&self, instance: &Instance, _image: &Image) -> Result<(), ApiError> {
        let dir = self.dir(&instance.name);
        let subs: &[&str] = match instance.config.read_only {
            true => &["rootfs"],
            false => &["upper", "work", "rootfs"],
        };
        for sub in subs {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| {
                ApiError::internal(format!("create {}: {e}", dir.join(sub).display()))
            })?;
        }
        Ok(())
    }

    async fn start(
        &self,
        instance: &Instance,
        image: &Image,
        stdio: Stdio,
        tty: bool,
    ) -> Result<Started, ApiError> {
        let _busy = self.quiet.enter();
        let process = self.main_process(instance, image, tty)?;
        let spec = self.spec(instance, image, process).await?;
        self.write_hosts(instance)?;
        let pool = self.pool_for(instance);
        let claimed = pool.map(|i| self.pools[i].clone());
        let started = blocking(move || process::start(&spec, stdio, claimed.as_deref())).await?;
        if let Some(pool) = pool {
            self.refiller.request(pool);
        }
        let started = started.map_err(runtime_error)?;
        if let Some(index) = started.veth {
            self.veths().insert(instance.name.clone(), index);
        }
        Ok(Started {
            pid: started.pid,
            start_time: started.start_time,
        })
    }

    async fn signal_stop(&self, instance: &Instance, pid: i32, kill: bool) -> Result<(), ApiError> {
        if kill {
            let cg = cgroups::manager(&self.cgroup(&instance.name));
            blocking(move || kill_through_init(cg.as_ref(), pid))
                .await?
                .map_err(|e| ApiError::internal(format!("kill: {e}")))
        } else {
            // PID 1 of a pid namespace only gets signals it handles; the timeout covers the rest.
            let signal = match instance.kind {
                Kind::System => self.poweroff_signal(&instance.image_fingerprint),
                _ => nix::sys::signal::Signal::SIGTERM,
            };
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
            // SIGUSR2 goes to busybox init alone (poweroff_signal).
            if instance.kind == Kind::System && signal == nix::sys::signal::Signal::SIGUSR2 {
                let cg = cgroups::manager(&self.cgroup(&instance.name));
                let powered_off = self.powered_off.clone();
                std::thread::spawn(move || {
                    end_busybox_shutdown_pause(cg.as_ref(), pid, &powered_off)
                });
            }
            Ok(())
        }
    }

    async fn cleanup(&self, instance: &Instance) -> Result<(), ApiError> {
        self.release(instance, false).await
    }

    async fn delete(&self, instance: &Instance) -> Result<(), ApiError> {
        // An explicit delete returns once the veth is gone too. `run --rm` does not wait
        // for it (it would add the network stack's quiescing to every run's exit).
        self.release(instance, !instance.auto_remove).await?;
        // Nothing of the container runs any more to write there; the removal itself is a
        // rename (see `remove_instance_dir`).
        super::remove_instance_dir(&self.dir(&instance.name))
    }

    async fn exec(
        &self,
        instance: &Instance,
        image: &Image,
        pid: i32,
        req: &ExecPost,
        stdio: Stdio,
    ) -> Result<Started, ApiError> {
        let _busy = self.quiet.enter();
        let process = self.process(
            instance,
            image,
            req.command.clone(),
            &req.env,
            req.cwd.as_deref(),
            req.tty,
        )?;
        let spec = self.spec(instance, image, process.clone()).await?;
        let spares = self.exec_spares.clone();
        let started =
            blocking(move || process::exec(&spec, pid, &process, stdio, spares.as_deref()))
                .await?
                .map_err(runtime_error);
        self.refill_exec_spares();
        let started = started?;
        Ok(Started {
            pid: started.pid,
            start_time: started.start_time,
        })
    }

    async fn nested_daemon(
        &self,
        instance: &Instance,
        image: &Image,
        pid: i32,
        start: bool,
    ) -> Result<Client, ApiError> {
        if !nests(instance) {
            return Err(ApiError::bad_request(format!(
                "{:?} is {} and cannot hold instances: only unprivileged system containers and microVMs can",
                instance.name,
                if instance.kind == Kind::App { "an app container" } else { "a privileged system container" }
            )));
        }
        // Through the container's root: the socket lives in its mount namespace.
        let client = Client::new(format!("/proc/{pid}/root/{NESTED_SOCKET}"));
        let answers = |c: Client| async move { c.get::<ServerInfo>("/1.0").await.is_ok() };
        if answers(client.clone()).await || !start {
            return Ok(client);
        }
        let lock = self
            .nested_starts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(instance.name.clone())
            .or_default()
            .clone();
        let _starting = lock.lock().await;
        if answers(client.clone()).await {
            return Ok(client);
        }
        let log = self.dir(&instance.name).join("nested-daemon.log");
        let stdio = crate::daemon::pio::detached(&log)
            .map_err(|e| ApiError::internal(format!("open {}: {e}", log.display())))?;
        let req = ExecPost {
            command: vec![super::bundle::GUEST_LTV.into(), "daemon".into()],
            env: vec![],
            cwd: None,
            tty: false,
            stdin: false,
        };
        let started = self.exec(instance, image, pid, &req, stdio).await?;
        // Our child (the exec helper); it ends with the daemon.
        let exited = tokio::spawn(crate::daemon::reaper::wait(started.pid));
        // Well under a second here; a guest kernel emulated on kvm-pvm takes its time.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while std::time::Instant::now() < deadline && !exited.is_finished() {
            if answers(client.clone()).await {
                tracing::info!(instance = %instance.name, "nested daemon started");
                return Ok(client);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        if !exited.is_finished() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(started.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(5).collect();
        Err(ApiError::internal(format!(
            "the daemon inside {:?} did not start; its log ends: {}",
            instance.name,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )))
    }

    async fn update_limits(&self, instance: &Instance) -> Result<(), ApiError> {
        let limits = limits_of(instance)?;
        let cg = cgroups::manager(&self.cgroup(&instance.name));
        blocking(move || cg.apply(&limits))
            .await?
            .map_err(|e| ApiError::bad_request(format!("apply limits: {e}")))
    }

    async fn shutdown(&self) {
        for pool in self.pools.clone() {
            let _ = blocking(move || pool.drain()).await;
        }
        if let Some(spares) = self.exec_spares.clone() {
            let _ = blocking(move || spares.drain()).await;
        }
        let _ = blocking(ltv_containers::forkserver::stop).await;
    }

    async fn usage(&self, instance: &Instance) -> Option<Usage> {
        let cg = cgroups::manager(&self.cgroup(&instance.name));
        let stats = blocking(move || cg.stats()).await.ok()?.ok()?;
        Some(Usage {
            memory_bytes: stats.memory_bytes,
            memory_limit_bytes: stats.memory_limit,
            pids: stats.pids,
            cpu_time_ns: stats.cpu_usage_ns,
            pid_ns_depth: instance.pid.and_then(pid_ns_depth),
            guest: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmpfs_options() {
        let t = parse_tmpfs("/tmp").unwrap();
        assert_eq!(
            (t.target.as_str(), t.size_bytes, t.mode, t.exec, t.readonly),
            ("/tmp", None, 0o1777, false, false)
        );
        let t = parse_tmpfs("/run:size=64m,mode=755,exec,nosuid").unwrap();
        assert_eq!(
            (t.size_bytes, t.mode, t.exec),
            (Some(64 << 20), 0o755, true)
        );
        assert_eq!(
            parse_tmpfs("/c:size=65536k,ro").unwrap().size_bytes,
            Some(64 << 20)
        );
        assert!(parse_tmpfs("/c:ro").unwrap().readonly);
        for bad in [
            "tmp",
            "/",
            "/a/../b",
            "/a:size=lots",
            "/a:size=1",
            "/a:mode=999",
            "/a:suid",
        ] {
            assert!(parse_tmpfs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_overrides_by_key() {
        let base = vec!["PATH=/bin".to_string(), "A=1".to_string()];
        let merged = merge_env(&base, &["A=2".to_string(), "B=3".to_string()]);
        assert_eq!(merged, vec!["PATH=/bin", "A=2", "B=3"]);
    }

    #[test]
    fn users_resolve_through_the_image() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nweb:x:33:34::/:/bin/false\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(resolve_user(dir.path(), "").unwrap(), (0, 0));
        assert_eq!(resolve_user(dir.path(), "web").unwrap(), (33, 34));
        assert_eq!(resolve_user(dir.path(), "33").unwrap(), (33, 34));
        assert_eq!(resolve_user(dir.path(), "1000:1000").unwrap(), (1000, 1000));
        assert_eq!(resolve_user(dir.path(), "web:staff").unwrap(), (33, 50));
        assert!(resolve_user(dir.path(), "nobody").is_err());
    }
}
