//! Density and overhead harness (`ltv bench`); grows with each backend.
//! INTERFACE ONLY: being written (owner: bench helper).

use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// start, density, overhead, pagecache, isolation
    pub suite: String,
    /// Instance kinds, comma-separated: app,system,vm,app-in-system,system-in-vm,app-in-system-in-vm
    #[arg(long, value_delimiter = ',', default_value = "app")]
    pub kinds: Vec<String>,
    #[arg(long)]
    pub count: Option<usize>,
    /// Peers measured in the same run: crun,runc,lxc,qemu
    #[arg(long, value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Install missing peers from Debian.
    #[arg(long)]
    pub install_peers: bool,
    #[arg(long, default_value = "bench/out")]
    pub out: PathBuf,
}

/// Runs a suite with `ltv` (the binary itself) as the subject; returns the exit code.
pub fn run(_args: &BenchArgs, _ltv: &Path) -> i32 {
    unimplemented!("bench helper")
}
