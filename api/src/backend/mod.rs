//! One `Backend` per instance kind. Handlers and the instance service only talk to this
//! trait; the container and VM runtimes sit behind it.

pub mod bundle;
pub mod container;
pub mod rootdisk;
pub mod vm;

use crate::daemon::error::ApiError;
use crate::daemon::reaper::Exit;
use crate::types::{ExecPost, Image, Instance, Usage};
use async_trait::async_trait;
use ltv_containers::process::Stdio;

/// Where deleted instances' directories wait for the background thread, beside them.
const REMOVING: &str = ".removing";

/// Removes an instance's directory; one that is already gone is fine. It is renamed into
/// `.removing/` beside it at once, so that its name is free and nothing is left under it
/// when this returns, then deleted on the background thread: unlinking a container's
/// upper and work trees took 0.7 ms of every `run --rm` here (a dozen ext4 inodes), a
/// VM's disk image longer. What a daemon that stopped left there, [`sweep_removed`] takes.
pub fn remove_instance_dir(dir: &std::path::Path) -> Result<(), ApiError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static MOVED: AtomicU64 = AtomicU64::new(0);
    let remove_now = |dir: &std::path::Path| match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ApiError::internal(format!("remove {}: {e}", dir.display()))),
    };
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return remove_now(dir);
    };
    let mut moved_name = name.to_os_string();
    moved_name.push(format!(
        "-{}-{}",
        std::process::id(),
        MOVED.fetch_add(1, Ordering::Relaxed)
    ));
    let moved = parent.join(REMOVING).join(moved_name);
    let renamed =
        std::fs::create_dir_all(parent.join(REMOVING)).and_then(|()| std::fs::rename(dir, &moved));
    match renamed {
        Ok(()) => {
            ltv_containers::background::run(move || {
                if let Err(e) = std::fs::remove_dir_all(&moved) {
                    tracing::warn!("remove {}: {e}", moved.display());
                }
            });
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        // Say, a mount still on it (EBUSY): the error comes from deleting in place.
        Err(_) => remove_now(dir),
    }
}

/// Deletes, on the background thread, what deleted instances left in `.removing/` of
/// `instances_dir` when a daemon stopped before its background thread got to them.
pub fn sweep_removed(instances_dir: &std::path::Path) {
    let removing = instances_dir.join(REMOVING);
    if removing.exists() {
        ltv_containers::background::run(move || {
            if let Err(e) = std::fs::remove_dir_all(&removing) {
                tracing::warn!("remove {}: {e}", removing.display());
            }
        });
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn gone_soon(path: &std::path::Path) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while path.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        !path.exists()
    }

    #[test]
    fn instance_dir_goes_at_once_and_its_tree_soon_after() {
        let instances = tempfile::tempdir().unwrap();
        let dir = instances.path().join("c1");
        std::fs::create_dir_all(dir.join("upper/etc")).unwrap();
        std::fs::write(dir.join("upper/etc/hosts"), "127.0.0.1 c1\n").unwrap();
        remove_instance_dir(&dir).unwrap();
        assert!(!dir.exists());
        // The name is free at once.
        std::fs::create_dir(&dir).unwrap();
        let removing = instances.path().join(REMOVING);
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_dir(&removing).unwrap().next().is_some() {
            assert!(Instant::now() < deadline, "the moved tree stays");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Already gone: fine.
        std::fs::remove_dir(&dir).unwrap();
        remove_instance_dir(&dir).unwrap();
    }

    #[test]
    fn a_previous_daemons_leftovers_are_swept() {
        let instances = tempfile::tempdir().unwrap();
        let left = instances.path().join(REMOVING).join("c2-1-0");
        std::fs::create_dir_all(left.join("work")).unwrap();
        sweep_removed(instances.path());
        assert!(gone_soon(&instances.path().join(REMOVING)));
    }
}
