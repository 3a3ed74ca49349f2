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
pub mod image;
pub mod mountinfo;
pub mod namespaces;
pub mod network;
pub mod process;
pub mod rootfs;
pub mod security;
pub mod spec;
