//! Instance lifecycle: create, start, stop, exec, delete and supervision, on top of
//! the `Backend` of each kind. Handlers call these; backends never see HTTP.

use super::error::ApiError;
use super::reaper::{self, Exit};
use super::{pio, Daemon};
use crate::backend::Started;
use crate::db::{now, InstanceRow};
use crate::types::{validate_name, ExecPost, Image, Instance, InstancesPost, Kind, Status};
use ltv_containers::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Where an exec runs: a child of this daemon, or behind another daemon (a guest agent),
/// whose `ltv-stdio` stream is relayed.
pub enum ExecStarted {
    Local(i32),
    Remote(crate::client::Upgraded),
}

pub const DEFAULT_STOP_TIMEOUT: u64 = 10;

impl Daemon {
    pub fn instance_row(&self, name: &str) -> Result<InstanceRow, ApiError> {
        self.db
            .instance(name)?
            .ok_or_else(|| ApiError::not_found(format!("instance {name:?} not found")))
    }

    pub fn image_of(&self, reference: &str) -> Result<Image, ApiError> {
        self.db.image(reference)?.ok_or_else(|| {
            ApiError::not_found(format!("image {reference:?} not found (see `ltv image list`, or `ltv image build busybox`)"))
        })
    }

    pub(super) fn instance_image(&self, instance: &Instance) -> Result<Image, ApiError> {
        // By fingerprint (64 hex digits, never an alias): the alias may since point elsewhere.
        self.db.image(&instance.image_fingerprint)?.ok_or_else(|| {
            ApiError::internal(format!(
                "the image of {:?} is gone from the store",
                instance.name
            ))
        })
    }

    pub fn log_path(&self, name: &str) -> std::path::PathBuf {
        self.config
            .state_dir
            .join("instances")
            .join(name)
            .join("console.log")
    }

    /// Validates and records a new instance and creates its storage. On failure nothing is left.
    pub async fn create_instance(&self, req: &InstancesPost) -> Result<Instance, ApiError> {
        let name = match &req.name {
            Some(n) => n.clone(),
            None => generated_name(),
        };
        validate_name(&name).map_err(ApiError::bad_request)?;
        if let Some(parent) = &req.parent {
            // Nesting arrives with the system-container and VM backends.
            self.instance_row(parent)?;
            return Err(ApiError::not_implemented(
                "nested instances are not supported yet",
            ));
        }
        let backend = self.backend(req.kind)?;
        let image = self.image_of(&req.image)?;
        let mut config = req.config.clone();
        // A daemon started with `--bridge none` has only loopback to give.
        if self.config.bridge.is_none() && config.network.is_none() {
            config.network = Some("none".into());
        }
        let instance = Instance {
            name: name.clone(),
            kind: req.kind,
            image: req.image.clone(),
            image_fingerprint: image.fingerprint.clone(),
            parent: None,
            config,
            status: Status::Created,
            pid: None,
            exit_code: None,
            created_at: now(),
            auto_remove: req.auto_remove,
            idmap_base: None,
            address: None,
            usage: None,
            children: vec![],
        };
        let t = std::time::Instant::now();
        backend.validate(&instance, &image)?;
        let mut instance = instance;
        let subnet = if backend.wants_address(&instance) {
            match &self.bridge {
                Ok(b) => Some(b.subnet),
                Err(why) => {
                    return Err(ApiError::new(
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        format!("{why} (use --network none)"),
                    ))
                }
            }
        } else {
            None
        };
        let inserted = self
            .db
            .insert_instance(&instance, backend.wants_idmap(&instance), subnet.as_ref())
            .map_err(|e| {
                let text = format!("{e:#}");
                if text.starts_with("no free address") {
                    ApiError::conflict(text)
                } else {
                    ApiError::internal(text)
                }
            })?;
        match inserted {
            None => {
                return Err(ApiError::conflict(format!(
                    "instance {name:?} already exists"
                )))
            }
            Some(a) => {
                instance.idmap_base = a.idmap_base;
                instance.address = a.address;
            }
        }
        if let Err(e) = backend.create(&instance, &image).await {
            let _ = backend.delete(&instance).await;
            let _ = self.db.delete_instance(&name);
            return Err(e);
        }
        tracing::debug!(instance = %name, ms = t.elapsed().as_secs_f64() * 1e3, "created");
        Ok(instance)
    }

    /// Starts the main process. `stdio` is `None` for a detached start (output to the log).
    /// A command that cannot be executed leaves it `Stopped` with exit code 127 or 126.
    pub async fn start_instance(
        self: &Arc<Self>,
        name: &str,
        stdio: Option<(Stdio, bool)>,
    ) -> Result<i32, ApiError> {
        let lock = self.lock(name);
        let _guard = lock.lock().await;
        let row = self.instance_row(name)?;
        let instance = row.instance;
        if instance.status == Status::Running {
            return Err(ApiError::conflict(format!(
                "instance {name:?} is already running"
            )));
        }
        let backend = self.backend(instance.kind)?;
        let image = self.instance_image(&instance)?;
        // Detached: output to the log, no terminal.
        let (stdio, tty) = match stdio {
            Some(s) => s,
            None => {
                let log = pio::detached(&self.log_path(name))
                    .map_err(|e| ApiError::internal(format!("open log: {e}")))?;
                (log, false)
            }
        };
        let t = std::time::Instant::now();
        match backend.start(&instance, &image, stdio, tty).await {
            Ok(Started { pid, start_time }) => {
                tracing::debug!(
                    instance = name,
                    pid,
                    ms = t.elapsed().as_secs_f64() * 1e3,
                    "started"
                );
                self.db.set_running(name, pid, start_time)?;
                self.supervise(name, instance.kind, pid);
                Ok(pid)
            }
            Err(e) => {
                let _ = backend.cleanup(&instance).await;
                let code = e.exec_exit;
                self.db.set_stopped(name, code)?;
                if instance.auto_remove {
                    let _ = backend.delete(&instance).await;
                    let _ = self.db.delete_instance(name);
                }
                Err(e)
            }
        }
    }

    /// Waits for the main process in the background, then frees its resources.
    fn supervise(self: &Arc<Self>, name: &str, kind: Kind, pid: i32) {
        let (tx, rx) = watch::channel(None);
        self.exits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), rx);
        let daemon = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let exit = reaper::wait(pid).await;
            let exit = match daemon.backend(kind) {
                Ok(backend) => backend.recorded_exit(pid, exit),
                Err(_) => exit,
            };
            daemon.finish(&name, exit).await;
            let _ = tx.send(Some(exit));
        });
    }

    async fn finish(&self, name: &str, exit: Exit) {
        let Ok(Some(row)) = self.db.instance(name) else {
            return;
        };
        let instance = row.instance;
        let t = std::time::Instant::now();
        if let Ok(backend) = self.backend(instance.kind) {
            if instance.auto_remove {
                // delete() cleans up too.
                if let Err(e) = backend.delete(&instance).await {
                    tracing::error!(instance = name, "auto-remove failed: {e}");
                }
                let _ = self.db.delete_instance(name);
                tracing::debug!(
                    instance = name,
                    ?exit,
                    ms = t.elapsed().as_secs_f64() * 1e3,
                    "exited and removed"
                );
                return;
            }
            if let Err(e) = backend.cleanup(&instance).await {
                tracing::error!(instance = name, "cleanup after exit failed: {e}");
            }
        }
        let _ = self.db.set_stopped(name, exit.code());
        tracing::debug!(
            instance = name,
            ?exit,
            ms = t.elapsed().as_secs_f64() * 1e3,
            "exited and cleaned up"
        );
    }

    /// The main process's exit, once the instance's resources are freed.
    pub fn exit_watch(&self, name: &str) -> Option<watch::Receiver<Option<Exit>>> {
        self.exits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    async fn wait_exit(&self, name: &str, timeout: Duration) -> bool {
        let Some(mut rx) = self.exit_watch(name) else {
            return true;
        };
        let done = tokio::time::timeout(timeout, rx.wait_for(|e| e.is_some()))
            .await
            .is_ok();
        done
    }

    /// Stops a running instance: a clean stop request, then a kill after `timeout`.
    pub async fn stop_instance(
        &self,
        name: &str,
        force: bool,
        timeout: Duration,
    ) -> Result<(), ApiError> {
        let lock = self.lock(name);
        let _guard = lock.lock().await;
        self.stop_locked(name, force, timeout).await
    }

    async fn stop_locked(
        &self,
        name: &str,
        force: bool,
        timeout: Duration,
    ) -> Result<(), ApiError> {
        let instance = self.instance_row(name)?.instance;
        let Some(pid) = instance.pid.filter(|_| instance.status == Status::Running) else {
            return Ok(());
        };
        let backend = self.backend(instance.kind)?;
        self.stop_nested(&instance, force).await?;
        if !force {
            backend.signal_stop(&instance, pid, false).await?;
            if self.wait_exit(name, timeout).await {
                return Ok(());
            }
        }
        backend.signal_stop(&instance, pid, true).await?;
        if self.wait_exit(name, Duration::from_secs(30)).await {
            Ok(())
        } else {
            Err(ApiError::internal(format!(
                "instance {name:?} did not stop after being killed"
            )))
        }
    }

    pub async fn restart_instance(
        self: &Arc<Self>,
        name: &str,
        force: bool,
        timeout: Duration,
    ) -> Result<(), ApiError> {
        self.stop_instance(name, force, timeout).await?;
        self.start_instance(name, None).await.map(|_| ())
    }

    pub async fn delete_instance(&self, name: &str, force: bool) -> Result<(), ApiError> {
        let lock = self.lock(name);
        let _guard = lock.lock().await;
        let instance = self.instance_row(name)?.instance;
        if instance.status == Status::Running {
            if !force {
                return Err(ApiError::conflict(format!(
                    "instance {name:?} is running: stop it first or delete with --force"
                )));
            }
            self.stop_locked(name, true, Duration::ZERO).await?;
        }
        let backend = self.backend(instance.kind)?;
        backend.delete(&instance).await?;
        self.db.delete_instance(name)?;
        self.exits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        Ok(())
    }

    /// Starts `req.command` inside the running instance; returns its pid (our child).
    pub async fn exec_instance(
        &self,
        name: &str,
        req: &ExecPost,
        stdio: Stdio,
    ) -> Result<ExecStarted, ApiError> {
        if req.command.is_empty() {
            return Err(ApiError::bad_request("exec needs a command"));
        }
        let instance = self.instance_row(name)?.instance;
        let pid = match (instance.status, instance.pid) {
            (Status::Running, Some(pid)) => pid,
            _ => {
                return Err(ApiError::conflict(format!(
                    "instance {name:?} is not running"
                )))
            }
        };
        let backend = self.backend(instance.kind)?;
        if let Some(agent) = backend.agent(&instance) {
            let io = agent
                .upgrade("/1.0/exec", req)
                .await
                .map_err(|e| match e.status {
                    Some(code) => ApiError::from_status(code, e.message),
                    None => {
                        ApiError::conflict(format!("the agent of {name:?} is unreachable: {e}"))
                    }
                })?;
            return Ok(ExecStarted::Remote(io));
        }
        let image = self.instance_image(&instance)?;
        Ok(ExecStarted::Local(
            backend.exec(&instance, &image, pid, req, stdio).await?.pid,
        ))
    }

    /// Changes limits; a running instance gets them at once, and a refused change
    /// (e.g. a memory limit below current use) leaves the old config in place.
    pub async fn update_config(
        &self,
        name: &str,
        patch: &crate::types::InstancePatch,
    ) -> Result<(), ApiError> {
        let lock = self.lock(name);
        let _guard = lock.lock().await;
        let mut instance = self.instance_row(name)?.instance;
        let old = instance.clone();
        if let Some(m) = &patch.memory {
            instance.config.memory = Some(m.clone());
        }
        if patch.cpus.is_some() {
            instance.config.cpus = patch.cpus;
        }
        if patch.pids.is_some() {
            instance.config.pids = patch.pids;
        }
        let backend = self.backend(instance.kind)?;
        backend.validate(&instance, &self.instance_image(&instance)?)?;
        if instance.status == Status::Running {
            if let Err(e) = backend.update_limits(&instance).await {
                let _ = backend.update_limits(&old).await;
                return Err(e);
            }
        }
        self.db.set_config(name, &instance.config)?;
        Ok(())
    }

    pub async fn instance_with_usage(&self, name: &str) -> Result<Instance, ApiError> {
        let mut instance = self.instance_row(name)?.instance;
        if instance.status == Status::Running {
            if let Ok(backend) = self.backend(instance.kind) {
                instance.usage = backend.usage(&instance).await;
            }
        }
        Ok(instance)
    }
}

/// After a daemon restart: keep supervising what still runs, free what ended meanwhile.
pub async fn readopt(daemon: &Arc<Daemon>) {
    let Ok(rows) = daemon.db.instances() else {
        return;
    };
    for row in rows
        .into_iter()
        .filter(|r| r.instance.status == Status::Running)
    {
        let name = row.instance.name.clone();
        let alive = match (row.instance.pid, row.pid_start) {
            (Some(pid), Some(start)) => {
                ltv_containers::process::proc_start_time(pid) == Some(start)
            }
            _ => false,
        };
        if alive {
            tracing::info!(instance = %name, pid = row.instance.pid, "re-adopted running instance");
            daemon.supervise(
                &name,
                row.instance.kind,
                row.instance.pid.unwrap_or_default(),
            );
        } else {
            tracing::info!(instance = %name, "instance ended while the daemon was away");
            daemon.finish(&name, Exit::Unknown).await;
        }
    }
}

/// Docker-style random names for `ltv run` without `--name`.
fn generated_name() -> String {
    let mut bytes = [0u8; 6];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    format!(
        "run-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}
