//! Container lifecycle: start, exec, destroy, and the re-executed init helper.
//! INTERFACE ONLY: bodies are being written (owner: runtime helper).

use crate::spec::{ContainerSpec, ProcessSpec};
use std::os::fd::OwnedFd;

/// argv[1] with which the binary is re-executed as the container init helper;
/// the binary's `main` must call [`init_main`] when it sees it (before anything else).
pub const INIT_ARG: &str = "__ltv-init";

/// The three stdio descriptors handed to a container process.
pub struct Stdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// A process the caller must wait for (it is the caller's child).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    pub pid: i32,
    /// Field 22 of /proc/PID/stat, to tell a re-used pid from ours.
    pub start_time: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command is not in the image; callers report exit code 127.
    #[error("{0}")]
    CommandNotFound(String),
    #[error("invalid container spec: {0}")]
    InvalidSpec(String),
    #[error("{stage}: {source}")]
    Setup {
        stage: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("container init failed: {0}")]
    Init(String),
}

pub fn start(_spec: &ContainerSpec, _stdio: Stdio) -> Result<Started, Error> {
    unimplemented!("runtime helper")
}

pub fn exec(
    _spec: &ContainerSpec,
    _init_pid: i32,
    _process: &ProcessSpec,
    _stdio: Stdio,
) -> Result<Started, Error> {
    unimplemented!("runtime helper")
}

pub fn destroy(_spec: &ContainerSpec) -> Result<(), Error> {
    unimplemented!("runtime helper")
}

pub fn proc_start_time(_pid: i32) -> Option<u64> {
    unimplemented!("runtime helper")
}

pub fn init_main() -> ! {
    unimplemented!("runtime helper")
}
