//! Image store: unpacked, read-only root filesystems shared by instances as overlay lowers.
//!
//! Layout: `<root>/<fingerprint>/rootfs/` and `<root>/<fingerprint>/image.json`. Every
//! build or import happens in `<root>/.tmp-<pid>-<n>/` and is renamed into place only
//! when complete, so a failure (or a crash, cleaned at the next `open`) leaves nothing.

mod busybox;
mod debian;
mod export;
pub use export::INIT_LABEL;
mod fsutil;
mod layer;
mod oci;
#[cfg(test)]
mod tests;

pub use debian::{host_apt_mirror, parse_apt_sources, DEFAULT_SUITE};

use serde::{Deserialize, Serialize};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What the image says about how to run it (from the OCI config, or our builders).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    /// `user`, `uid`, `user:group` or `uid:gid`, as in OCI; empty means root.
    pub user: String,
    /// Path of the init inside the image, for system containers (e.g. `/sbin/init`).
    pub init: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// sha256 hex of the image content; also its directory name in the store.
    pub fingerprint: String,
    /// The unpacked root filesystem (an overlay lower).
    pub rootfs: PathBuf,
    pub config: ImageConfig,
    pub size_bytes: u64,
    /// Human-readable origin, e.g. `busybox-static 1:1.35.0-4+b3` or `oci:/path`.
    pub source: String,
}

#[derive(Debug, Clone, Default)]
pub struct DebianOptions {
    pub suite: String,
    pub include: Vec<String>,
    /// Mirror URL; `None` reads it from the host's apt configuration.
    pub mirror: Option<String>,
}

/// Progress of a long image operation; the daemon streams it to the CLI.
pub trait Progress: Send + Sync {
    fn stage(&self, message: &str);
    fn advance(&self, done: u64, total: Option<u64>);
}

/// A [`Progress`] that discards everything.
pub struct NoProgress;

impl Progress for NoProgress {
    fn stage(&self, _message: &str) {}
    fn advance(&self, _done: u64, _total: Option<u64>) {}
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input is not a valid image (corrupt, truncated, unsupported): a 400.
    #[error("invalid image: {0}")]
    Invalid(String),
    #[error("image not found: {0}")]
    NotFound(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Tool(String),
}

pub struct ImageStore {
    root: PathBuf,
}

const INFO_FILE: &str = "image.json";
const TMP_PREFIX: &str = ".tmp-";

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

fn valid_fingerprint(fp: &str) -> bool {
    fp.len() == 64
        && fp
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A build directory that removes itself unless committed.
pub(crate) struct TmpDir {
    path: PathBuf,
    armed: bool,
}

impl TmpDir {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
    pub(crate) fn rootfs(&self) -> PathBuf {
        self.path.join("rootfs")
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if self.armed {
            // A killed debootstrap may leave proc/sys/dev mounted inside.
            fsutil::unmount_below(&self.path);
            if let Err(e) = fsutil::remove_tree(&self.path) {
                tracing::warn!("could not remove {}: {e}", self.path.display());
            }
        }
    }
}

impl ImageStore {
    pub fn open(root: &Path) -> Result<ImageStore, Error> {
        std::fs::create_dir_all(root).map_err(io_err(format!("creating {}", root.display())))?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("chmod {}", root.display())))?;
        let store = ImageStore {
            root: root.to_path_buf(),
        };
        store.clean_stale();
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn build_busybox(&self, progress: &dyn Progress) -> Result<ImageInfo, Error> {
        busybox::build(self, progress)
    }

    pub fn build_debian(
        &self,
        opts: &DebianOptions,
        progress: &dyn Progress,
    ) -> Result<ImageInfo, Error> {
        debian::build(self, opts, progress)
    }

    /// An OCI image layout directory, a tar of one, or a docker-archive tar.
    pub fn import(&self, path: &Path, progress: &dyn Progress) -> Result<ImageInfo, Error> {
        oci::import(self, path, progress)
    }

    pub fn get(&self, fingerprint: &str) -> Result<ImageInfo, Error> {
        if !valid_fingerprint(fingerprint) {
            return Err(Error::NotFound(fingerprint.to_string()));
        }
        let file = self.root.join(fingerprint).join(INFO_FILE);
        let data = match std::fs::read(&file) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(fingerprint.to_string()))
            }
            Err(e) => return Err(io_err(format!("reading {}", file.display()))(e)),
        };
        let mut info: ImageInfo = serde_json::from_slice(&data).map_err(|e| Error::Io {
            context: format!("parsing {}", file.display()),
            source: e.into(),
        })?;
        // The store may have been moved since the image was written.
        info.rootfs = self.root.join(fingerprint).join("rootfs");
        Ok(info)
    }

    /// All images in the store, sorted by fingerprint.
    pub fn list(&self) -> Result<Vec<ImageInfo>, Error> {
        let mut out = Vec::new();
        for ent in std::fs::read_dir(&self.root)
            .map_err(io_err(format!("reading {}", self.root.display())))?
        {
            let ent = ent.map_err(io_err("reading image store"))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            if valid_fingerprint(name) {
                match self.get(name) {
                    Ok(i) => out.push(i),
                    Err(Error::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        out.sort_by(|a, b| a.fingerprint.cmp(&b.fingerprint));
        Ok(out)
    }

    pub fn delete(&self, fingerprint: &str) -> Result<(), Error> {
        if !valid_fingerprint(fingerprint) || !self.root.join(fingerprint).is_dir() {
            return Err(Error::NotFound(fingerprint.to_string()));
        }
        // Rename first so a half-deleted image is never visible under its name.
        let tmp = self.tmp_dir_path();
        match std::fs::rename(self.root.join(fingerprint), &tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(fingerprint.to_string()))
            }
            Err(e) => return Err(io_err(format!("deleting image {fingerprint}"))(e)),
        }
        fsutil::remove_tree(&tmp).map_err(io_err(format!("removing {}", tmp.display())))
    }

    fn tmp_dir_path(&self) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        self.root.join(format!(
            "{TMP_PREFIX}{}-{n}-{nanos:08x}",
            std::process::id()
        ))
    }

    /// A fresh build directory with an empty `rootfs/` inside.
    pub(crate) fn tmp(&self) -> Result<TmpDir, Error> {
        loop {
            let path = self.tmp_dir_path();
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    let t = TmpDir { path, armed: true };
                    std::fs::create_dir(t.rootfs())
                        .map_err(io_err(format!("creating {}", t.rootfs().display())))?;
                    std::fs::set_permissions(t.rootfs(), std::fs::Permissions::from_mode(0o755))
                        .map_err(io_err("chmod rootfs"))?;
                    return Ok(t);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(format!("creating {}", path.display()))(e)),
            }
        }
    }

    pub(crate) fn exists(&self, fingerprint: &str) -> bool {
        self.root.join(fingerprint).join(INFO_FILE).is_file()
    }

    /// Moves a finished build into place; if another build of the same content won,
    /// ours is dropped and the existing image returned.
    pub(crate) fn commit(
        &self,
        mut tmp: TmpDir,
        fingerprint: &str,
        config: ImageConfig,
        source: String,
    ) -> Result<ImageInfo, Error> {
        if self.exists(fingerprint) {
            return self.get(fingerprint);
        }
        let final_dir = self.root.join(fingerprint);
        let info = ImageInfo {
            fingerprint: fingerprint.to_string(),
            rootfs: final_dir.join("rootfs"),
            config,
            size_bytes: tree_size(&tmp.rootfs()).map_err(io_err("measuring rootfs"))?,
            source,
        };
        let json = serde_json::to_vec_pretty(&info).expect("serializable");
        std::fs::write(tmp.path().join(INFO_FILE), json).map_err(io_err("writing image.json"))?;
        match std::fs::rename(tmp.path(), &final_dir) {
            Ok(()) => {
                tmp.armed = false;
                Ok(info)
            }
            Err(e) if self.exists(fingerprint) => {
                tracing::debug!("image {fingerprint} appeared concurrently: {e}");
                self.get(fingerprint)
            }
            Err(e) => Err(io_err(format!("moving image into {}", final_dir.display()))(e)),
        }
    }

    /// Removes build directories left by processes that no longer exist.
    fn clean_stale(&self) {
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return;
        };
        for ent in rd.flatten() {
            let name = ent.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TMP_PREFIX)) else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            let alive = pid > 0
                && (unsafe { libc::kill(pid, 0) } == 0
                    || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM));
            if !alive {
                let path = ent.path();
                fsutil::unmount_below(&path);
                if let Err(e) = fsutil::remove_tree(&path) {
                    tracing::warn!("could not remove stale {}: {e}", path.display());
                }
            }
        }
    }
}

/// Apparent size of a tree: regular files (each inode once) plus symlink lengths.
pub(crate) fn tree_size(root: &Path) -> std::io::Result<u64> {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for ent in std::fs::read_dir(&dir)? {
            let ent = ent?;
            let md = ent.path().symlink_metadata()?;
            let ft = md.file_type();
            if ft.is_dir() {
                stack.push(ent.path());
            } else if ft.is_file() {
                if md.nlink() <= 1 || seen.insert((md.dev(), md.ino())) {
                    total += md.len();
                }
            } else if ft.is_symlink() {
                total += md.len();
            }
        }
    }
    Ok(total)
}

/// Config `init` for a rootfs: `/sbin/init` if the image has one.
pub(crate) fn detect_init(rootfs: &Path) -> Option<String> {
    fsutil::exists_in_root(rootfs, "/sbin/init").then(|| "/sbin/init".to_string())
}
