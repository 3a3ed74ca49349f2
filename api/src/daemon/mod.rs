//! The daemon: state, backends and the HTTP server on a Unix socket.

pub mod agent;
pub mod error;
pub mod handlers;
pub mod images;
pub mod instances;
pub mod nested;
pub mod pio;
pub mod reaper;

use crate::backend::container::ContainerBackend;
use crate::backend::vm::VmBackend;
use crate::backend::Backend;
use crate::db::Db;
use crate::types::Kind;
use anyhow::{bail, Context, Result};
use ltv_containers::image::ImageStore;
use ltv_containers::network::BridgeConfig;
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/ltv";
pub const DEFAULT_SOCKET: &str = "/run/ltv/ltv.sock";

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// Top-level cgroup of this daemon's instances, relative to each hierarchy root.
    pub cgroup_root: String,
    /// Container helpers kept pre-spawned to cut start latency (cgroup v1 only).
    pub pool_size: usize,
    /// Guest kernel for microVMs; `None`: the newest one guest-kernel/build.sh cached.
    pub kernel: Option<PathBuf>,
    /// The bridge that instances get a veth on; `None`: loopback only.
    pub bridge: Option<BridgeConfig>,
    /// Also serve the API on this vsock port: the daemon is a microVM's guest agent.
    pub vsock_port: Option<u32>,
}

pub struct Daemon {
    pub config: DaemonConfig,
    /// The bridge in use, or why there is none.
    pub bridge: Result<BridgeConfig, String>,
    pub db: Db,
    pub images: Arc<ImageStore>,
    backends: HashMap<Kind, Arc<dyn Backend>>,
    /// Exit of each running instance's main process, by name.
    exits: Mutex<HashMap<String, watch::Receiver<Option<reaper::Exit>>>>,
    /// Serialises state changes of one instance.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Daemon {
    pub fn open(config: DaemonConfig) -> Result<Arc<Daemon>> {
        let state = &config.state_dir;
        std::fs::create_dir_all(state).with_context(|| format!("create {}", state.display()))?;
        std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("chmod {}", state.display()))?;
        let instances_dir = state.join("instances");
        std::fs::create_dir_all(&instances_dir)
            .with_context(|| format!("create {}", instances_dir.display()))?;
        check_traversable(&instances_dir)?;
        crate::backend::empty_trash(&instances_dir)
            .with_context(|| format!("trash in {}", instances_dir.display()))?;
        let images = Arc::new(ImageStore::open(&state.join("images"))?);
        tracing::debug!("images opened");
        let db_path = state.join("ltv.db");
        let mut db = Db::open(&db_path)?;
        let ranges = std::path::Path::new(crate::db::ID_RANGES_DIR);
        if let Err(e) = db.share_id_ranges(ranges, &db_path) {
            tracing::warn!("id ranges are not shared with other daemons of this host: {e:#}");
        }
        tracing::debug!("database opened");
        db.fail_interrupted_operations()?;
        tracing::debug!("state opened");
        // In the daemon's own network namespace (a test's, or the host's).
        let bridge = match &config.bridge {
            None => Err("the daemon runs without a bridge (--bridge none)".to_string()),
            Some(b) => match ltv_containers::network::ensure_bridge(&default_subnet_free(b)) {
                Ok(()) => Ok(default_subnet_free(b)),
                Err(e) => {
                    tracing::error!("bridge {}: {e}; instances get loopback only", b.name);
                    Err(format!("bridge {} is unavailable: {e}", b.name))
                }
            },
        };
        tracing::debug!("bridge done");
        // Nested in a container: its cgroup was delegated to us.
        if let Err(e) = ltv_containers::cgroups::claim_delegated_root() {
            tracing::warn!(
                "cgroup delegated to us: {e}; our containers get no limits of their own"
            );
        }
        let mut backends: HashMap<Kind, Arc<dyn Backend>> = HashMap::new();
        // One runtime serves both container kinds; the kind decides the first process.
        let containers: Arc<dyn Backend> = Arc::new(ContainerBackend::new(
            instances_dir.clone(),
            images.clone(),
            config.cgroup_root.clone(),
            config.pool_size,
            bridge.as_ref().ok().cloned(),
            state.join("bundle"),
        ));
        backends.insert(Kind::App, containers.clone());
        backends.insert(Kind::System, containers);
        backends.insert(
            Kind::Vm,
            Arc::new(VmBackend::new(
                instances_dir,
                images.root().to_path_buf(),
                config.kernel.clone(),
                bridge.as_ref().ok().cloned(),
                state.join("bundle"),
            )),
        );
        Ok(Arc::new(Daemon {
            config,
            bridge,
            db,
            images,
            backends,
            exits: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
        }))
    }

    pub fn kinds(&self) -> Vec<Kind> {
        let mut k: Vec<Kind> = self
            .backends
            .iter()
            .filter(|(_, b)| b.available())
            .map(|(k, _)| *k)
            .collect();
        k.sort_by_key(|k| k.as_str());
        k
    }

    pub fn backend(&self, kind: Kind) -> Result<Arc<dyn Backend>, error::ApiError> {
        self.backends.get(&kind).cloned().ok_or_else(|| {
            error::ApiError::not_implemented(format!(
                "instances of kind {:?} are not supported by this daemon yet",
                kind.as_str()
            ))
        })
    }

    fn lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(name.to_string()).or_default().clone()
    }
}

/// The default subnet moves aside when another interface routes it (a nested daemon
/// inside an instance on its parent's bridge); a subnet the user chose stays.
fn default_subnet_free(b: &BridgeConfig) -> BridgeConfig {
    if b.subnet == BridgeConfig::default().subnet {
        ltv_containers::network::avoid_routed_subnets(b)
    } else {
        b.clone()
    }
}

/// An unprivileged container's root is an ordinary host uid: it must be able to walk down
/// to its rootfs. Say so at start-up rather than failing every container later.
fn check_traversable(dir: &Path) -> Result<()> {
    let dir = std::fs::canonicalize(dir)?;
    for d in dir.ancestors() {
        let mode = std::fs::metadata(d)?.permissions().mode();
        if mode & 0o001 == 0 {
            bail!(
                "{} (mode {:o}) is not searchable by others, so unprivileged containers could not reach their root filesystems below it: chmod o+x it, or use another --state-dir",
                d.display(),
                mode & 0o7777
            );
        }
    }
    Ok(())
}

/// Binds the API socket (mode 0660), replacing a stale socket but never a live daemon's.
pub async fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!("another daemon is already listening on {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("remove stale socket {}", path.display()))?;
    }
    let listener =
        tokio::net::UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}

/// Runs the daemon until `shutdown` resolves. Running instances are left running;
/// the next daemon re-adopts them.
pub async fn serve(
    config: DaemonConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    if let Err(e) = reaper::become_subreaper() {
        tracing::warn!("cannot become a child subreaper: {e}");
    }
    reaper::spawn_orphan_reaper();
    let listener = bind_socket(&config.socket).await?;
    let daemon = Daemon::open(config.clone())?;
    tracing::debug!("backends ready");
    instances::readopt(&daemon).await;
    tracing::info!(socket = %config.socket.display(), state = %config.state_dir.display(), "ltv daemon listening");
    let app = handlers::router(daemon.clone());
    // One shutdown signal for every listener.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    if let Some(port) = config.vsock_port {
        let vsock = agent::bind(port).with_context(|| format!("bind vsock port {port}"))?;
        tracing::info!(port, "guest agent listening on vsock");
        agent::serving();
        tokio::spawn(agent::say_ready());
        let (app, rx) = (app.clone(), stop_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(vsock, app)
                .with_graceful_shutdown(stopped(rx))
                .await
            {
                tracing::error!("vsock API: {e}");
            }
        });
    }
    // Served from a worker thread, not the one in `block_on`: each connection's task then
    // starts on the worker that accepted it instead of waking another thread.
    let serving = axum::serve(listener, app).with_graceful_shutdown(stopped(stop_rx));
    let result = match tokio::spawn(std::future::IntoFuture::into_future(serving)).await {
        Ok(r) => r,
        Err(e) => Err(std::io::Error::other(e)),
    };
    let _ = std::fs::remove_file(&config.socket);
    for backend in daemon.backends.values() {
        backend.shutdown().await;
    }
    let trash = std::time::Duration::from_secs(10);
    let _ = tokio::task::spawn_blocking(move || crate::backend::wait_for_trash(trash)).await;
    remove_empty_cgroup_root(&config.cgroup_root);
    result.context("serve API")
}

/// Our top-level cgroup goes with the daemon once no instance is left in it; a plain
/// rmdir fails on a group that still has children, so running instances are safe.
fn remove_empty_cgroup_root(root: &str) {
    let Ok(mounts) = ltv_containers::mountinfo::read_self() else {
        return;
    };
    for m in mounts
        .iter()
        .filter(|m| m.fs_type == "cgroup" || m.fs_type == "cgroup2")
    {
        let _ = std::fs::remove_dir(m.mount_point.join(root));
    }
}
