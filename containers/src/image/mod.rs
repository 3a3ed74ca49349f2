//! Image store: unpacked, read-only root filesystems shared by instances as overlay lowers.
//! INTERFACE ONLY: bodies are being written (owner: images helper).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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

impl ImageStore {
    pub fn open(root: &Path) -> Result<ImageStore, Error> {
        let _ = root;
        unimplemented!("images helper")
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn build_busybox(&self, _progress: &dyn Progress) -> Result<ImageInfo, Error> {
        unimplemented!("images helper")
    }
    pub fn build_debian(&self, _opts: &DebianOptions, _progress: &dyn Progress) -> Result<ImageInfo, Error> {
        unimplemented!("images helper")
    }
    /// An OCI image layout directory, a tar of one, or a docker-archive tar.
    pub fn import(&self, _path: &Path, _progress: &dyn Progress) -> Result<ImageInfo, Error> {
        unimplemented!("images helper")
    }
    pub fn get(&self, _fingerprint: &str) -> Result<ImageInfo, Error> {
        unimplemented!("images helper")
    }
    pub fn delete(&self, _fingerprint: &str) -> Result<(), Error> {
        unimplemented!("images helper")
    }
}
