//! Density and overhead harness (`ltv bench`): drives the real `ltv` binary against a
//! private daemon (own state dir, socket, cgroup root and network namespace) and
//! compares instance kinds with peer runtimes measured in the same run.

pub mod harness;
pub mod meminfo;
pub mod peers;
pub mod plot;
pub mod report;
pub mod stats;
mod suites;

use clap::Args;
use harness::Harness;
use report::Report;
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// start, density, overhead, pagecache, isolation
    pub suite: String,
    /// Instance kinds, comma-separated: app,system,vm,app-in-system,system-in-vm,app-in-system-in-vm
    #[arg(long, value_delimiter = ',', default_value = "app")]
    pub kinds: Vec<String>,
    /// Samples per kind (start: 30, overhead: 5) or instances (density: 64, pagecache: 8).
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
    /// Discarded warm-up rounds before the measured ones (start suite).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Density: stop when the instances use this share of MemAvailable (percent).
    #[arg(long, default_value_t = 50.0)]
    pub memory_budget: f64,
    /// Guest kernel for the qemu peer (and later VMs).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs for the qemu peer.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Start suite: pause before each measured container operation (ms), so that what
    /// the previous one left running in the background is not counted against the next.
    /// 0 measures back to back.
    #[arg(long, default_value_t = 100)]
    pub settle_ms: u64,
    /// Networking of ltv's instances: `bridge` (a veth each, the daemon's default) or
    /// `none` (loopback only, like the crun and LXC peers' configurations).
    #[arg(long, default_value = "bridge", value_parser = ["bridge", "none"])]
    pub network: String,
}

pub const SUITES: &[&str] = &["start", "density", "overhead", "pagecache", "isolation"];

/// Runs a suite with `ltv` (the binary itself) as the subject; returns the exit code.
pub fn run(args: &BenchArgs, ltv: &Path) -> i32 {
    if !SUITES.contains(&args.suite.as_str()) {
        eprintln!(
            "Error: unknown suite {:?} (expected one of {})",
            args.suite,
            SUITES.join(", ")
        );
        return 2;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("Error: ltv bench needs root (namespaces, cgroups, drop_caches)");
        return 1;
    }
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        eprintln!("Error: {}: {e}", args.out.display());
        return 1;
    }
    harness::install_signal_flag();
    let mut h = match Harness::start(ltv, args.network == "none") {
        Ok(h) => h,
        Err(e) => {
            eprintln!("Error: starting the daemon under test: {e}");
            return 1;
        }
    };
    let code = match suite(args, &mut h) {
        Ok(report) => {
            let r = report.write(&args.out);
            match r {
                Ok(files) => {
                    for f in files {
                        println!("wrote {}", f.display());
                    }
                    if harness::interrupted() {
                        130
                    } else {
                        0
                    }
                }
                Err(e) => {
                    eprintln!("Error: writing results: {e}");
                    1
                }
            }
        }
        Err(e) => {
            eprintln!("Error: {e}");
            1
        }
    };
    eprintln!(
        "cleaning up (instances, daemon, netns {}, cgroups, temp dir)",
        h.netns
    );
    h.cleanup();
    code
}

fn suite(args: &BenchArgs, h: &mut Harness) -> Result<Report, String> {
    let mut report = Report::new(args, h);
    eprintln!("building the busybox image ...");
    h.ltv_ok(&["image", "build", "busybox"])?;
    let rootfs = h
        .image_rootfs("busybox")
        .ok_or("busybox image rootfs not found under the state dir")?;
    let t = std::time::Instant::now();
    match args.suite.as_str() {
        "start" => suites::start(args, h, &rootfs, &mut report)?,
        "density" => suites::density(args, h, &rootfs, &mut report)?,
        "overhead" => suites::overhead(args, h, &rootfs, &mut report)?,
        "pagecache" => suites::pagecache(args, h, &rootfs, &mut report)?,
        _ => suites::isolation(args, h, &rootfs, &mut report)?,
    }
    report.duration_s = t.elapsed().as_secs_f64();
    report.interrupted = harness::interrupted();
    Ok(report)
}
