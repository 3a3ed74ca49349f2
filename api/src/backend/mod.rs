//! One `Backend` per instance kind. Handlers and the instance service only talk to this
//! trait; the container and VM runtimes sit behind it.

pub mod bundle;
pub mod container;
mod refill;
pub mod rootdisk;
pub mod vm;

use crate::daemon::error::ApiError;
use crate::daemon::reaper::Exit;
use crate::types::{ExecPost, Image, Instance, Usage};
use async_trait::async_trait;
use ltv_containers::process::Stdio;

/// Where deleted instances' directories wait for their removal, inside the instances dir
/// (so a rename gets them there).
const TRASH: &str = ".trash";

/// Removes an instance's directory; one that is already gone is fine. It is renamed into
/// [`TRASH`] at once, which frees its name and leaves nothing under its path, and deleted
/// there by a thread of its own: freeing a tree's blocks can wait on the disk (this host's
/// ext4, without a journal and mounted with `discard`, trims each freed block before
/// unlink returns), which made up 0.5 ms of every `run --rm`.
pub fn remove_instance_dir(dir: &std::path::Path) -> Result<(), ApiError> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut trashed = name.to_os_string();
        trashed.push(format!(".{}.{n}", std::process::id()));
        let trashed = parent.join(TRASH).join(trashed);
        if std::fs::rename(dir, &trashed).is_ok() {
            remove_later(trashed);
            return Ok(());
        }
    }
    remove_now(dir)
}

fn remove_now(dir: &std::path::Path) -> Result<(), ApiError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ApiError::internal(format!("remove {}: {e}", dir.display()))),
    }
}

/// Directories queued for the trash thread and not removed yet, and a signal when that
/// drops to none.
static TRASH_PENDING: (std::sync::Mutex<usize>, std::sync::Condvar) =
    (std::sync::Mutex::new(0), std::sync::Condvar::new());

fn trash_pending() -> std::sync::MutexGuard<'static, usize> {
    TRASH_PENDING.0.lock().unwrap_or_else(|p| p.into_inner())
}

/// Queues `dir` for the trash thread, or removes it now if that thread cannot start.
fn remove_later(dir: std::path::PathBuf) {
    use std::sync::mpsc::Sender;
    static QUEUE: std::sync::OnceLock<Option<Sender<std::path::PathBuf>>> =
        std::sync::OnceLock::new();
    let remove = |dir: &std::path::Path| {
        if let Err(e) = remove_now(dir) {
            // The next daemon's start tries again (see empty_trash).
            tracing::warn!("trash: {e}");
        }
    };
    let queue = QUEUE.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<std::path::PathBuf>();
        let spawned = std::thread::Builder::new()
            .name("ltv-trash".into())
            .spawn(move || {
                for dir in rx {
                    remove(&dir);
                    *trash_pending() -= 1;
                    TRASH_PENDING.1.notify_all();
                }
            });
        spawned.ok().map(|_| tx)
    });
    *trash_pending() += 1;
    let unsent = match queue {
        Some(tx) => tx.send(dir).err().map(|e| e.0),
        None => Some(dir),
    };
    if let Some(dir) = unsent {
        *trash_pending() -= 1;
        remove(&dir);
    }
}

/// Waits up to `timeout` for the trash thread to remove what it was given, so that a
/// daemon that stops leaves none of it to the next one.
pub fn wait_for_trash(timeout: std::time::Duration) {
    let pending = trash_pending();
    let _ = TRASH_PENDING
        .1
        .wait_timeout_while(pending, timeout, |n| *n > 0);
}

/// Makes the instances dir's trash, and queues what an earlier daemon left in it.
pub fn empty_trash(instances_dir: &std::path::Path) -> std::io::Result<()> {
    let trash = instances_dir.join(TRASH);
    std::fs::create_dir_all(&trash)?;
    for entry in std::fs::read_dir(&trash)?.flatten() {
        remove_later(entry.path());
    }
    Ok(())
}

/// Runs blocking runtime work (syscalls, netlink, file trees) off the async executor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("runtime task failed: {e}")))
}

/// A process the daemon started and must wait for (its child).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    pub pid: i32,
    pub start_time: u64,
}

#[async_trait]
pub trait Backend: Send + Sync {
    /// Whether this host can run the kind at all (listed in `GET /1.0` `kinds`).
    fn available(&self) -> bool {
        true
    }
    /// Whether the instance gets an address on the daemon's bridge.
    fn wants_address(&self, _instance: &Instance) -> bool {
        false
    }
    /// Whether the instance needs a private user-namespace id range.
    fn wants_idmap(&self, _instance: &Instance) -> bool {
        false
    }
    /// Checks the request against what this backend supports, before anything is created.
    fn validate(&self, instance: &Instance, image: &Image) -> Result<(), ApiError>;
    /// Creates the instance's storage.
    async fn create(&self, instance: &Instance, image: &Image) -> Result<(), ApiError>;
    /// Starts the instance's main process with the given stdio (`tty`: it is a terminal).
    async fn start(
        &self,
        instance: &Instance,
        image: &Image,
        stdio: Stdio,
        tty: bool,
    ) -> Result<Started, ApiError>;
    /// How the main process `pid` is recorded to have ended, given how it did (by default
    /// as it did).
    fn recorded_exit(&self, _pid: i32, exit: Exit) -> Exit {
        exit
    }
    /// Asks the main process to stop (SIGTERM, poweroff); `kill` ends it at once.
    async fn signal_stop(&self, instance: &Instance, pid: i32, kill: bool) -> Result<(), ApiError>;
    /// Frees what a run held (mounts, cgroups) once the main process has ended. Idempotent.
    async fn cleanup(&self, instance: &Instance) -> Result<(), ApiError>;
    /// Removes the instance's storage. Idempotent.
    async fn delete(&self, instance: &Instance) -> Result<(), ApiError>;
    /// Runs another process inside the running instance.
    async fn exec(
        &self,
        instance: &Instance,
        image: &Image,
        pid: i32,
        req: &ExecPost,
        stdio: Stdio,
    ) -> Result<Started, ApiError>;
    /// The daemon inside the running instance that serves it (a microVM's guest agent):
    /// exec, power-off and guest facts are forwarded there.
    fn agent(&self, _instance: &Instance) -> Option<crate::client::Client> {
        None
    }
    /// The daemon that owns the instances nested in this running one: a system container's
    /// own `ltv daemon` (with `start`, started on first use), a microVM's guest agent.
    async fn nested_daemon(
        &self,
        instance: &Instance,
        _image: &Image,
        _pid: i32,
        _start: bool,
    ) -> Result<crate::client::Client, ApiError> {
        Err(ApiError::bad_request(format!(
            "{:?} is {} {} instance and cannot hold instances: only unprivileged system containers and microVMs can",
            instance.name,
            if instance.kind == crate::types::Kind::App { "an" } else { "a" },
            instance.kind.as_str()
        )))
    }
    /// The daemon is stopping: free what the backend holds for itself (instances stay).
    async fn shutdown(&self) {}
    /// Applies the instance's (new) limits to it while it runs.
    async fn update_limits(&self, instance: &Instance) -> Result<(), ApiError> {
        Err(ApiError::not_implemented(format!(
            "changing limits of a running {} instance is not supported",
            instance.kind.as_str()
        )))
    }
    /// Current resource usage of a running instance.
    async fn usage(&self, instance: &Instance) -> Option<Usage>;
}
