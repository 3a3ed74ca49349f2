//! Lightervisor's container runtime. It knows nothing of the daemon: it takes a
//! [`spec::ContainerSpec`] and turns it into namespaced processes on a rootfs.
//!
//! Entry points:
//! - [`process::start`] creates a container and runs its first process;
//! - [`process::exec`] runs another process inside a running container;
//! - [`process::destroy`] removes what `start` created (processes, mounts, cgroup);
//! - [`process::init_main`] must be called by the binary when it is re-executed as the
//!   container's init helper (see [`process::INIT_ARG`]).
//! - [`image`] builds, imports and stores unpacked, read-only images.

pub mod cgroups;
pub mod forkserver;
pub mod image;
pub mod mountinfo;
pub mod namespaces;
pub mod network;
pub mod process;
pub mod rootfs;
pub mod security;
pub mod spec;

/// `name` found in `$PATH`, like the shell's `command -v`. Checking first is much cheaper
/// than spawning a missing tool, above all in a guest whose kernel is emulated.
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.is_file())
}
