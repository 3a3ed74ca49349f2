//! The suites. Each kind is described by name only (`app`, `system`, `vm`, and nested
//! `app-in-system-in-vm`), so a kind starts to be measured as soon as the daemon runs it.

use crate::harness::{interrupted, timed, Harness};
use crate::meminfo;
use crate::peers::{self, Lxc};
use crate::plot::{self, Line};
use crate::report::Report;
use crate::stats::{percentile, Summary};
use crate::BenchArgs;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

const IMAGE: &str = "busybox";

fn bar(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// A kind as a launch chain, outermost first: `app-in-system-in-vm` → [vm, system, app].
#[derive(Debug, Clone)]
pub struct KindSpec {
    pub name: String,
    pub chain: Vec<String>,
}

impl KindSpec {
    pub fn parse(name: &str) -> KindSpec {
        let mut chain: Vec<String> = name.split("-in-").map(String::from).collect();
        chain.reverse();
        KindSpec {
            name: name.to_string(),
            chain,
        }
    }

    pub fn leaf(&self) -> &str {
        self.chain.last().map(String::as_str).unwrap_or("app")
    }

    pub fn nested(&self) -> bool {
        self.chain.len() > 1
    }
}

/// `ltv launch` arguments for one instance of `kind` at path `name`.
pub fn launch_args(kind: &str, name: &str, image: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["launch", image, name, "--kind", kind]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    if kind == "app" {
        // An app container needs a long-running command to stay up idle.
        a.extend(["--", "sleep", "1d"].iter().map(|s| s.to_string()));
    }
    a
}

fn not_supported(err: &str) -> bool {
    let e = err.to_ascii_lowercase();
    e.contains("501") || e.contains("not implemented") || e.contains("not supported")
}

/// Err(reason) when the daemon does not list every kind of the chain.
fn check_kind(h: &Harness, k: &KindSpec) -> Result<(), String> {
    let kinds = h.kinds();
    match k.chain.iter().find(|c| !kinds.contains(c)) {
        Some(missing) => Err(format!(
            "not supported by this daemon yet (kind {missing:?}; daemon runs: {})",
            kinds.join(", ")
        )),
        None => Ok(()),
    }
}

/// Launches the parents of a nested kind once; returns the path prefix of the leaf.
fn launch_parents(h: &Harness, k: &KindSpec, tag: &str) -> Result<String, String> {
    let mut prefix = String::new();
    for kind in &k.chain[..k.chain.len() - 1] {
        let name = if prefix.is_empty() {
            // Named after the whole chain: `{tag}-system` is the plain system kind's.
            format!("{tag}-{}", k.name)
        } else {
            format!("{prefix}/{kind}")
        };
        h.ltv_ok(&launch_args(kind, &name, IMAGE, &[]))?;
        prefix = name;
    }
    Ok(prefix)
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}/{name}")
    }
}

fn skip_reason(err: &str) -> String {
    if not_supported(err) {
        format!("not supported by this daemon yet: {err}")
    } else {
        err.to_string()
    }
}

/// Peers that are usable now; the others are reported as skipped.
fn usable_peers(args: &BenchArgs, report: &mut Report, allowed: &[&str]) -> Vec<String> {
    let mut v = Vec::new();
    for p in &args.peers {
        if !allowed.contains(&p.as_str()) {
            report.skip(p, format!("not a peer of the {} suite", args.suite));
            continue;
        }
        match peers::ensure(p, args.install_peers, args.kernel.as_deref()) {
            Ok(()) => v.push(p.clone()),
            Err(e) => report.skip(p, e),
        }
    }
    v
}

fn kinds(args: &BenchArgs, h: &mut Harness, report: &mut Report) -> Vec<KindSpec> {
    let mut v = Vec::new();
    for k in &args.kinds {
        let spec = KindSpec::parse(k);
        match check_kind(h, &spec) {
            Ok(()) => v.push(spec),
            Err(e) => report.skip(k, e),
        }
    }
    v
}

// ---------------------------------------------------------------- start

enum Subject {
    Kind { spec: KindSpec, prefix: String },
    Oci { tool: String, bundle: PathBuf },
    Lxc(Lxc),
    Qemu,
}

impl Subject {
    fn name(&self) -> String {
        match self {
            Subject::Kind { spec, .. } => spec.name.clone(),
            Subject::Oci { tool, .. } => tool.clone(),
            Subject::Lxc(_) => "lxc".into(),
            Subject::Qemu => "qemu".into(),
        }
    }

    fn class(&self) -> &'static str {
        match self {
            Subject::Kind { .. } => "kind",
            _ => "peer",
        }
    }

    /// One sample of each of the subject's metrics.
    fn sample(
        &self,
        h: &mut Harness,
        args: &BenchArgs,
        i: usize,
    ) -> Vec<(&'static str, Result<f64, String>)> {
        let mut out = Vec::new();
        match self {
            Subject::Kind { spec, prefix } => {
                if spec.leaf() == "app" && !spec.nested() {
                    let mut c = h.ltv_cmd(&["run", "--rm", IMAGE, "--", "/bin/true"]);
                    settle(args);
                    out.push(("run", timed(&mut c).map(|r| r.0)));
                }
                let name = join(prefix, &format!("st{i}"));
                settle(args);
                let t = Instant::now();
                let r = h
                    .ltv_ok(&launch_args(spec.leaf(), &name, IMAGE, &[]))
                    .and_then(|_| h.ltv_ok(&["exec", &name, "--", "/bin/true"]))
                    .map(|_| t.elapsed().as_secs_f64() * 1e3);
                let booted = r.is_ok();
                out.push(("launch+exec", r));
                if booted && spec.leaf() == "vm" && !spec.nested() {
                    out.push(("VMM start to LTV-READY", vmm_ready_ms(h, &name)));
                }
                let mut c = h.ltv_cmd(&["delete", "--force", &name]);
                settle(args);
                out.push(("delete", timed(&mut c).map(|r| r.0)));
            }
            Subject::Oci { tool, bundle } => {
                let name = format!("ltvb-true-{i}");
                settle(args);
                out.push(("run", peers::oci_run(h, tool, bundle, &name)));
            }
            Subject::Lxc(l) => {
                let name = format!("ltvb-lxc-{i}");
                settle(args);
                let r = l.start_exec(h, &name);
                out.push(("launch+exec", r));
                settle(args);
                out.push(("delete", l.stop(h, &name)));
            }
            Subject::Qemu => {
                let k = args.kernel.as_deref().unwrap_or(Path::new("bzImage"));
                out.push((
                    "launch+exec",
                    peers::qemu_boot(h, k, args.initrd.as_deref()),
                ));
            }
        }
        out
    }
}

/// When the guest's /init printed its readiness marker, from the VMM's control socket (the
/// daemon starts the VMM a few tens of ms after the launch request).
fn vmm_ready_ms(h: &Harness, name: &str) -> Result<f64, String> {
    use ltv_vmm::control::{ask, ControlRequest};
    let path = h.state_dir.join("instances").join(name).join("vmm.sock");
    let line = ask(
        &path,
        ControlRequest::Status,
        std::time::Duration::from_secs(5),
    )
    .map_err(|e| format!("vmm status {}: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| format!("vmm status {line:?}: {e}"))?;
    v["ready_ms"]
        .as_f64()
        .ok_or_else(|| format!("vmm status has no ready_ms: {line}"))
}

/// Each measured container operation starts on a quiet host, so that what the one
/// before left running in the background (ltv's spare helpers being refilled, a veth
/// being deleted, LXC's monitor exiting) is not counted against the next subject.
/// Measured: crun's `run` took 18 ms interleaved with ltv without this, 11 ms alone.
/// The pause leaves the CPUs idle, which costs the peers more than ltv: their moves into
/// a cgroup wait for an RCU grace period, which takes longer on an idle host.
fn settle(args: &BenchArgs) {
    std::thread::sleep(std::time::Duration::from_millis(args.settle_ms));
}

pub fn start(
    args: &BenchArgs,
    h: &mut Harness,
    rootfs: &Path,
    report: &mut Report,
) -> Result<(), String> {
    let count = args.count.unwrap_or(30).max(1);
    let mut subjects = Vec::new();
    for spec in kinds(args, h, report) {
        match launch_parents(h, &spec, "start") {
            Ok(prefix) => subjects.push(Subject::Kind { spec, prefix }),
            Err(e) => report.skip(&spec.name, skip_reason(&e)),
        }
    }
    for p in usable_peers(args, report, &["crun", "runc", "lxc", "qemu"]) {
        let s = match p.as_str() {
            "crun" | "runc" => {
                peers::oci_bundle(h, &p, rootfs, "true", &["/bin/true"]).map(|bundle| {
                    Subject::Oci {
                        tool: p.clone(),
                        bundle,
                    }
                })
            }
            "lxc" => Lxc::new(h, rootfs).map(Subject::Lxc),
            _ => Ok(Subject::Qemu),
        };
        match s {
            Ok(s) => subjects.push(s),
            Err(e) => report.skip(&p, e),
        }
    }
    let mut samples: BTreeMap<(usize, &'static str), (Vec<f64>, usize)> = BTreeMap::new();
    let mut dead = vec![false; subjects.len()];
    let mut taken = vec![0usize; subjects.len()];
    let order = start_order(subjects.len(), args.warmup, count, args.settle_ms == 0);
    let pb = bar(order.len(), "start");
    for (seq, &(si, measured)) in order.iter().enumerate() {
        if interrupted() {
            break;
        }
        pb.inc(1);
        if dead[si] {
            continue;
        }
        let s = &subjects[si];
        pb.set_message(format!(
            "{} (sample {}{})",
            s.name(),
            taken[si],
            if measured { "" } else { ", discarded" }
        ));
        taken[si] += 1;
        let res = s.sample(h, args, seq + 1);
        if taken[si] == 1 && res.iter().all(|r| r.1.is_err()) {
            let err = res
                .iter()
                .find_map(|r| r.1.clone().err())
                .unwrap_or_default();
            pb.suspend(|| report.skip(&s.name(), skip_reason(&err)));
            dead[si] = true;
            continue;
        }
        for (metric, r) in res {
            let e = samples.entry((si, metric)).or_default();
            match r {
                Ok(ms) if measured => e.0.push(ms),
                Ok(_) => {}
                Err(err) => {
                    e.1 += 1;
                    if e.1 <= 3 {
                        pb.suspend(|| eprintln!("{} {metric}: {err}", s.name()));
                    }
                }
            }
        }
    }
    pb.finish_and_clear();
    for ((si, metric), (v, fails)) in samples {
        let s = &subjects[si];
        if !dead[si] {
            report.add_series(&s.name(), s.class(), metric, "ms", v, fails);
        }
    }
    // One box plot per metric, kinds and peers side by side.
    let mut metrics: Vec<String> = report.series.iter().map(|s| s.metric.clone()).collect();
    metrics.sort();
    metrics.dedup();
    for m in metrics {
        let groups: Vec<(String, Vec<f64>)> = report
            .series
            .iter()
            .filter(|s| s.metric == m && !s.samples.is_empty())
            .map(|s| (format!("{} ({})", s.subject, s.class), s.samples.clone()))
            .collect();
        let file = format!(
            "start-{}.svg",
            m.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
        );
        let title = match m.as_str() {
            "run" => "run to exit of /bin/true (ltv run --rm vs crun/runc run)",
            "launch+exec" => "launch until exec -- /bin/true returns",
            _ => "delete --force of a running instance",
        };
        plot::boxplot(&args.out.join(&file), title, "ms", &groups)?;
        report.plots.push(file);
    }
    report.results = json!({
        "rounds": count,
        "warmup_rounds": args.warmup,
        "settle_ms": args.settle_ms,
        "order": if args.settle_ms == 0 {
            format!("blocks of {START_BLOCK} samples per subject, taking turns; the first of each block discarded")
        } else {
            "round-robin, the first subject rotating each round".to_string()
        },
    });
    Ok(())
}

/// Back to back, consecutive samples of one subject: a stream of its own operations.
const START_BLOCK: usize = 10;

/// The start suite's order: (subject, measured) pairs giving each subject `warmup`
/// discarded and `count` measured samples. With a pause, round-robin with the first subject
/// rotating, so that drift and noise spread evenly. Back to back, what one operation
/// leaves running (ltv refilling its spare helpers, LXC's monitor exiting) lands on the
/// next one, so each subject runs in blocks of [`START_BLOCK`], taking turns, and the first
/// sample of a block, which follows another subject's, is discarded too: interleaved,
/// LXC's `launch` + `exec` took a median 9.0 ms after its own stop and 17.3 ms after
/// ltv's delete, whose deferred spare refill it paid for.
fn start_order(subjects: usize, warmup: usize, count: usize, blocks: bool) -> Vec<(usize, bool)> {
    let mut order = Vec::new();
    if !blocks {
        for round in 0..warmup + count {
            for j in 0..subjects {
                order.push(((round + j) % subjects, round >= warmup));
            }
        }
        return order;
    }
    let mut left = vec![(warmup, count); subjects];
    while left.iter().any(|&(_, c)| c > 0) {
        for (si, (warm, measure)) in left.iter_mut().enumerate() {
            if *measure == 0 {
                continue;
            }
            // The block's first sample follows another subject: one more warm-up.
            let lead = (*warm).max(1);
            *warm = 0;
            let n = (*measure).min(START_BLOCK);
            *measure -= n;
            order.extend(std::iter::repeat_n((si, false), lead));
            order.extend(std::iter::repeat_n((si, true), n));
        }
    }
    order
}

// ---------------------------------------------------------------- density

/// Memory usage of the cgroup a process is in: v1 memory controller or v2.
fn cgroup_memory(pid: i32) -> Option<u64> {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for l in cg.lines() {
        let mut f = l.splitn(3, ':');
        let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
        if ctrl.split(',').any(|c| c == "memory") {
            let p = format!("/sys/fs/cgroup/memory{path}/memory.usage_in_bytes");
            if let Ok(s) = std::fs::read_to_string(p) {
                return s.trim().parse().ok();
            }
        }
    }
    for l in cg.lines() {
        if let Some(path) = l.strip_prefix("0::") {
            for base in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
                if let Ok(s) = std::fs::read_to_string(format!("{base}{path}/memory.current")) {
                    return s.trim().parse().ok();
                }
            }
        }
    }
    None
}

/// Page cache charged to the memory cgroup of a process, bytes (v1 `cache`, v2 `file`).
fn cgroup_cache(pid: i32) -> Option<u64> {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let stat = |file: &str, key: &str| -> Option<u64> {
        std::fs::read_to_string(file)
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
    };
    for l in cg.lines() {
        let mut f = l.splitn(3, ':');
        let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
        if ctrl.split(',').any(|c| c == "memory") {
            return stat(
                &format!("/sys/fs/cgroup/memory{path}/memory.stat"),
                "cache ",
            );
        }
        if ctrl.is_empty() {
            for base in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
                if let Some(v) = stat(&format!("{base}{path}/memory.stat"), "file ") {
                    return Some(v);
                }
            }
        }
    }
    None
}

/// Proportional set size of a process, KiB (smaps_rollup).
fn pss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| meminfo::parse(&s).get("Pss").copied())
        .unwrap_or(0)
}

/// (pid, ppid) of every process.
fn process_table() -> Vec<(i32, i32)> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if let Some(ppid) = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1))
                .and_then(|p| p.parse().ok())
            {
                v.push((pid, ppid));
            }
        }
    }
    v
}

/// Anonymous memory + page tables (KiB) of every process outside the trees rooted at
/// `roots` (daemon, instances): what other work on the host adds to the meminfo delta.
fn foreign_kib(roots: &[i32]) -> f64 {
    let table = process_table();
    let mut ours: std::collections::HashSet<i32> = roots.iter().copied().collect();
    // Children can precede parents in /proc order; iterate to a fixed point.
    loop {
        let before = ours.len();
        for &(pid, ppid) in &table {
            if ours.contains(&ppid) {
                ours.insert(pid);
            }
        }
        if ours.len() == before {
            break;
        }
    }
    let me = std::process::id() as i32;
    table
        .iter()
        .filter(|(pid, _)| !ours.contains(pid) && *pid != me)
        .map(|(pid, _)| {
            let st = meminfo::parse(
                &std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default(),
            );
            (meminfo::get(&st, "RssAnon") + meminfo::get(&st, "VmPTE")) as f64
        })
        .sum()
}

/// Parent pids of `pids` (deduplicated, pid 1 left out).
fn parents_of(pids: &[i32]) -> Vec<i32> {
    let mut v: Vec<i32> = process_table()
        .into_iter()
        .filter(|(pid, ppid)| pids.contains(pid) && *ppid > 1)
        .map(|(_, ppid)| ppid)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn children_of(ppid: u32) -> Vec<i32> {
    process_table()
        .into_iter()
        .filter(|&(_, parent)| parent == ppid as i32)
        .map(|(pid, _)| pid)
        .collect()
}

struct Point {
    count: usize,
    host_kib: f64,
    host_raw_kib: f64,
    /// Median: the first instance is also charged for shared pages (busybox itself).
    cgroup_kib: f64,
    cgroup_mean_kib: f64,
    daemon_pss_kib: f64,
    /// Daemon children that are not instances (shared helpers, later VMMs): count, PSS.
    helpers: usize,
    helper_pss_kib: f64,
    launch: Vec<f64>,
}

pub fn density(
    args: &BenchArgs,
    h: &mut Harness,
    rootfs: &Path,
    report: &mut Report,
) -> Result<(), String> {
    let count = args.count.unwrap_or(64).max(1);
    let mut subjects: Vec<(String, Option<KindSpec>)> = kinds(args, h, report)
        .into_iter()
        .map(|k| (k.name.clone(), Some(k)))
        .collect();
    // One OCI bundle per peer: crun's and runc's differ.
    let mut bundles = std::collections::HashMap::new();
    let mut lxc = None;
    for p in usable_peers(args, report, &["crun", "runc", "lxc"]) {
        if p == "lxc" {
            // Idle LXC containers (same config as the start suite's), each with its monitor.
            match Lxc::new(h, rootfs) {
                Ok(l) => {
                    lxc = Some(l);
                    subjects.push((p, None));
                }
                Err(e) => report.skip(&p, e),
            }
            continue;
        }
        match peers::oci_bundle(h, &p, rootfs, "sleep", &["/bin/sleep", "1d"]) {
            Ok(b) => {
                bundles.insert(p.clone(), b);
                subjects.push((p, None));
            }
            Err(e) => report.skip(&p, e),
        }
    }
    let mut targets = Vec::new();
    let mut t = 1;
    while t < count {
        targets.push(t);
        t *= 2;
    }
    targets.push(count);
    let mut all: Vec<(String, &'static str, Vec<Point>, f64)> = Vec::new();
    for (subject, spec) in subjects {
        if interrupted() {
            break;
        }
        let class = if spec.is_some() { "kind" } else { "peer" };
        let prefix = match &spec {
            Some(k) => match launch_parents(h, k, "dens") {
                Ok(p) => p,
                Err(e) => {
                    report.skip(&subject, skip_reason(&e));
                    continue;
                }
            },
            None => String::new(),
        };
        meminfo::settle();
        let m0 = meminfo::read();
        let base = meminfo::kernel_anon_kib(&m0) as f64;
        let daemon0 = h.daemon_pid().map(|p| pss_kib(p as i32)).unwrap_or(0) as f64;
        let foreign0 = foreign_kib(&h.daemon_pid().map(|p| vec![p as i32]).unwrap_or_default());
        let budget = meminfo::get(&m0, "MemAvailable") as f64 * args.memory_budget / 100.0;
        let pb = bar(count, &subject);
        let mut names: Vec<String> = Vec::new();
        let mut points = Vec::new();
        let mut failed = None;
        'batches: for &target in &targets {
            let mut lat = Vec::new();
            while names.len() < target {
                if interrupted() {
                    break 'batches;
                }
                let i = names.len();
                let r = match &spec {
                    Some(k) => {
                        let name = join(&prefix, &format!("idle{i}"));
                        let mut c = h.ltv_cmd(&launch_args(k.leaf(), &name, IMAGE, &[]));
                        let r = timed(&mut c).map(|r| r.0);
                        names.push(name);
                        r
                    }
                    None if subject == "lxc" => {
                        let name = format!("ltvb-idle-{i}");
                        let r = lxc.as_ref().unwrap().start(h, &name);
                        names.push(name);
                        r
                    }
                    None => {
                        let name = format!("ltvb-idle-{i}");
                        let r = peers::oci_detach(h, &subject, &bundles[&subject], &name);
                        names.push(name);
                        r
                    }
                };
                pb.inc(1);
                match r {
                    Ok(ms) => lat.push(ms),
                    Err(e) => {
                        failed = Some(e);
                        names.pop();
                        break 'batches;
                    }
                }
            }
            pb.set_message(format!("settling at {target}"));
            meminfo::settle();
            let m = meminfo::read();
            let used = meminfo::kernel_anon_kib(&m) as f64 - base;
            let n = names.len() as f64;
            let pids: Vec<i32> = names
                .iter()
                .filter_map(|name| match &spec {
                    Some(_) => h.instance_pid(name),
                    None if subject == "lxc" => lxc.as_ref().unwrap().pid(h, name),
                    None => peers::oci_pid(h, &subject, name),
                })
                .collect();
            let cg: Vec<f64> = pids
                .iter()
                .filter_map(|&p| cgroup_memory(p))
                .map(|b| b as f64 / 1024.0)
                .collect();
            let mut ours = pids.clone();
            ours.extend(h.daemon_pid().map(|p| p as i32));
            // Per-instance helpers (monitors, VMMs): daemon children that are not instances.
            let helpers: Vec<i32> = match (&spec, h.daemon_pid()) {
                (Some(_), Some(d)) => children_of(d)
                    .into_iter()
                    .filter(|p| !pids.contains(p))
                    .collect(),
                // LXC: each container's init is a child of its own monitor process.
                (None, _) if subject == "lxc" => parents_of(&pids),
                _ => Vec::new(),
            };
            // Helpers are ours too: their memory is part of the instance's cost.
            ours.extend(&helpers);
            points.push(Point {
                count: names.len(),
                host_kib: (used - (foreign_kib(&ours) - foreign0)) / n,
                host_raw_kib: used / n,
                cgroup_kib: percentile(&cg, 50.0),
                cgroup_mean_kib: if cg.is_empty() {
                    f64::NAN
                } else {
                    cg.iter().sum::<f64>() / cg.len() as f64
                },
                daemon_pss_kib: match (&spec, h.daemon_pid()) {
                    (Some(_), Some(d)) => (pss_kib(d as i32) as f64 - daemon0) / n,
                    _ => 0.0,
                },
                helper_pss_kib: helpers.iter().map(|&p| pss_kib(p)).sum::<u64>() as f64,
                helpers: helpers.len(),
                launch: lat,
            });
            if used * 1024.0 > budget * 1024.0 {
                pb.suspend(|| eprintln!("{subject}: memory budget reached at {}", names.len()));
                break;
            }
        }
        pb.finish_and_clear();
        if let Some(e) = failed {
            if points.is_empty() {
                report.skip(&subject, skip_reason(&e));
            } else {
                eprintln!("{subject}: launch failed after {}: {e}", names.len());
            }
        }
        let mut all_lat = Vec::new();
        for p in &points {
            all_lat.extend(p.launch.iter().copied());
        }
        if !points.is_empty() {
            report.add_series(&subject, class, "launch (idle, detached)", "ms", all_lat, 0);
        }
        // Remove this subject's instances before the next one is measured, and measure
        // what that frees: averaging the way up and the way down cancels linear drift
        // from other work on the host.
        let mut roots: Vec<i32> = h.daemon_pid().map(|p| vec![p as i32]).unwrap_or_default();
        if spec.is_none() {
            // Peer containers (and LXC monitors) are not under the daemon: their memory
            // going away is what is measured, not other work.
            let pids: Vec<i32> = names
                .iter()
                .filter_map(|name| match subject.as_str() {
                    "lxc" => lxc.as_ref().unwrap().pid(h, name),
                    _ => peers::oci_pid(h, &subject, name),
                })
                .collect();
            roots.extend(parents_of(&pids).into_iter().filter(|_| subject == "lxc"));
            roots.extend(pids);
        }
        let full = meminfo::kernel_anon_kib(&meminfo::read()) as f64;
        let foreign_full = foreign_kib(&roots);
        let n = names.len();
        match &spec {
            Some(_) => h.delete_all(),
            None if subject == "lxc" => {
                for n in &names {
                    let _ = lxc.as_ref().unwrap().stop(h, n);
                }
            }
            None => {
                for n in &names {
                    peers::oci_delete(h, &subject, n);
                }
            }
        }
        let mut teardown = f64::NAN;
        if n > 0 && !interrupted() {
            meminfo::settle();
            let freed = full - meminfo::kernel_anon_kib(&meminfo::read()) as f64;
            teardown = (freed - (foreign_full - foreign_kib(&roots))) / n as f64;
        }
        all.push((subject, class, points, teardown));
    }
    let mut md = String::from("Density (memory per idle instance, KiB). raw host = delta of AnonPages+Slab+KernelStack+PageTables+Shmem / count (includes the daemon's growth); host = the same minus the change in anonymous memory and page tables of every process that is neither the daemon nor an instance (other work on this host); cgroup = median per-instance memory cgroup usage; daemon = daemon PSS growth / count; helpers = daemon children that are not instances (a helper count that grows with the instances means a per-instance process):\n\n| subject | count | host KiB/inst | raw host KiB/inst | cgroup KiB/inst (median) | daemon PSS KiB/inst | helpers | helpers PSS KiB (total) | launch p50 ms | p95 ms |\n|---|---|---|---|---|---|---|---|---|---|\n");
    let mut jpoints = serde_json::Map::new();
    let mut md_td = String::new();
    for (s, class, pts, teardown) in &all {
        if let Some(last) = pts.last() {
            md_td += &format!(
                "| {s} ({class}) | {} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
                last.count,
                last.host_kib,
                teardown,
                (last.host_kib + teardown) / 2.0,
                last.cgroup_kib
            );
        }
        let mut arr = Vec::new();
        for p in pts {
            let l = Summary::of(&p.launch);
            md += &format!(
                "| {s} ({class}) | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.0} | {} | {} |\n",
                p.count,
                p.host_kib,
                p.host_raw_kib,
                p.cgroup_kib,
                p.daemon_pss_kib,
                p.helpers,
                p.helper_pss_kib,
                plot::fmt_num(l.p50),
                plot::fmt_num(l.p95)
            );
            arr.push(json!({
                "count": p.count, "host_kib_per_instance": p.host_kib, "host_raw_kib_per_instance": p.host_raw_kib,
                "cgroup_kib_per_instance": if p.cgroup_kib.is_finite() { json!(p.cgroup_kib) } else { Value::Null },
                "cgroup_kib_mean": if p.cgroup_mean_kib.is_finite() { json!(p.cgroup_mean_kib) } else { Value::Null },
                "daemon_pss_kib_per_instance": p.daemon_pss_kib,
                "helpers": p.helpers, "helpers_pss_kib_total": p.helper_pss_kib,
                "launch_ms": p.launch, "launch_summary": l,
            }));
        }
        jpoints.insert(s.clone(), json!({"class": class, "points": arr,
            "teardown_host_kib_per_instance": if teardown.is_finite() { json!(teardown) } else { Value::Null }}));
    }
    md += "\nAt the largest count, memory per instance measured on the way up (launch), on the way down (delete all) and their mean, KiB (the best host-wide estimate on a busy host):\n\n| subject | count | up | down | mean | cgroup median |\n|---|---|---|---|---|---|\n";
    md += &md_td;
    report.sections.push(md);
    report.results = json!({ "density": jpoints });
    let mut mem = Vec::new();
    let mut lat = Vec::new();
    // The host delta is noisy at small counts on a busy host: scale to the cgroup
    // numbers and the largest-count host deltas, clipping the rest.
    let mem_cap = all
        .iter()
        .flat_map(|(_, _, pts, td)| {
            let last = pts.last().map(|p| p.host_kib.abs()).unwrap_or(0.0);
            pts.iter()
                .map(|p| p.cgroup_kib)
                .chain([last, td.abs()])
                .collect::<Vec<_>>()
        })
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        * 1.5
        / 1024.0;
    for (i, (s, _, pts, _)) in all.iter().enumerate() {
        mem.push(Line {
            label: format!("{s}: host delta"),
            points: pts
                .iter()
                .map(|p| (p.count as f64, p.host_kib / 1024.0))
                .collect(),
            color: i,
            dashed: false,
        });
        mem.push(Line {
            label: format!("{s}: cgroup (median)"),
            points: pts
                .iter()
                .map(|p| (p.count as f64, p.cgroup_kib / 1024.0))
                .collect(),
            color: i,
            dashed: true,
        });
        lat.push(Line {
            label: s.clone(),
            points: pts
                .iter()
                .filter(|p| !p.launch.is_empty())
                .map(|p| (p.count as f64, percentile(&p.launch, 50.0)))
                .collect(),
            color: i,
            dashed: false,
        });
    }
    plot::lines(
        &args.out.join("density-memory.svg"),
        "memory per idle instance vs instances running",
        "instances",
        "MiB per instance",
        &mem,
        Some(mem_cap),
    )?;
    plot::lines(
        &args.out.join("density-latency.svg"),
        "launch latency (p50 of each batch) vs instances running",
        "instances",
        "ms",
        &lat,
        None,
    )?;
    report.plots.push("density-memory.svg".into());
    report.plots.push("density-latency.svg".into());
    Ok(())
}

// ---------------------------------------------------------------- workload helpers

/// Builds the static workload binary with rustc (std only, +crt-static).
fn workload(h: &Harness) -> Result<PathBuf, String> {
    let src = h.dir.join("workload.rs");
    let bin = h.dir.join("ltv-bench-workload");
    if bin.exists() {
        return Ok(bin);
    }
    std::fs::write(&src, include_str!("bin/workload.rs")).map_err(|e| e.to_string())?;
    let mut c = std::process::Command::new("rustc");
    c.args([
        "-O",
        "--edition",
        "2021",
        "-C",
        "target-feature=+crt-static",
        "-o",
    ])
    .arg(&bin)
    .arg(&src);
    timed(&mut c).map_err(|e| format!("building the workload (needs rustc): {e}"))?;
    Ok(bin)
}

/// Copies the workload to /tmp/w inside an instance (`exec -i` forwards stdin).
fn install_workload(h: &Harness, name: &str, bin: &Path) -> Result<(), String> {
    let f = std::fs::File::open(bin).map_err(|e| e.to_string())?;
    let mut c = h.ltv_cmd(&[
        "exec",
        "-i",
        name,
        "--",
        "sh",
        "-c",
        "cat > /tmp/w && chmod +x /tmp/w",
    ]);
    c.stdin(f);
    let out = c.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(crate::harness::failure(&c, &out));
    }
    Ok(())
}

/// Launches one long-lived instance of the kind (parents first); returns its path.
fn one_instance(h: &Harness, k: &KindSpec, tag: &str, extra: &[&str]) -> Result<String, String> {
    let prefix = launch_parents(h, k, tag)?;
    let name = join(&prefix, &format!("{tag}-{}", k.leaf()));
    h.ltv_ok(&launch_args(k.leaf(), &name, IMAGE, extra))?;
    Ok(name)
}

fn ns_of(out: &str) -> Result<u64, String> {
    out.trim()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| format!("workload printed {out:?}"))
}

// ---------------------------------------------------------------- overhead

const MODES: &[(&str, &str)] = &[
    ("getppid", "getppid ×1M"),
    ("forkexec", "fork+exec /bin/true ×300"),
    ("compute", "xorshift ×200M"),
    ("fileio", "write+fsync+read 64 MiB"),
];

fn mode_args(mode: &str, inside: bool, h: &Harness, rootfs: &Path) -> Vec<String> {
    let v: Vec<String> = match mode {
        "getppid" => vec!["getppid".into(), "1000000".into()],
        // The same static busybox /bin/true on both sides.
        "forkexec" => vec![
            "forkexec".into(),
            "300".into(),
            if inside {
                "/bin/true".into()
            } else {
                rootfs.join("bin/true").to_string_lossy().into_owned()
            },
        ],
        "compute" => vec!["compute".into(), "200000000".into()],
        _ => vec![
            "fileio".into(),
            "64".into(),
            if inside {
                "/tmp/w-io".into()
            } else {
                h.dir.join("w-io").to_string_lossy().into_owned()
            },
        ],
    };
    v
}

pub fn overhead(
    args: &BenchArgs,
    h: &mut Harness,
    rootfs: &Path,
    report: &mut Report,
) -> Result<(), String> {
    let reps = args.count.unwrap_or(5).max(1);
    let bin = workload(h)?;
    let mut targets: Vec<(String, Option<String>)> = vec![("host".into(), None)];
    for k in kinds(args, h, report) {
        match one_instance(h, &k, "ovh", &[]).and_then(|n| install_workload(h, &n, &bin).map(|_| n))
        {
            Ok(n) => targets.push((k.name.clone(), Some(n))),
            Err(e) => report.skip(&k.name, skip_reason(&e)),
        }
    }
    for p in &args.peers {
        report.skip(p, "peers are not measured by the overhead suite yet");
    }
    let mut samples: BTreeMap<(usize, &str), Vec<f64>> = BTreeMap::new();
    let pb = bar(reps * MODES.len() * targets.len(), "overhead");
    'outer: for _ in 0..reps {
        for (mode, _) in MODES {
            for (ti, (label, inst)) in targets.iter().enumerate() {
                if interrupted() {
                    break 'outer;
                }
                pb.set_message(format!("{mode} on {label}"));
                pb.inc(1);
                let r = match inst {
                    None => {
                        let mut c = std::process::Command::new(&bin);
                        c.args(mode_args(mode, false, h, rootfs));
                        timed(&mut c).and_then(|(_, o)| ns_of(&String::from_utf8_lossy(&o.stdout)))
                    }
                    Some(name) => {
                        let mut a = vec![
                            "exec".to_string(),
                            name.clone(),
                            "--".into(),
                            "/tmp/w".into(),
                        ];
                        a.extend(mode_args(mode, true, h, rootfs));
                        h.ltv_ok(&a).and_then(|o| ns_of(&o))
                    }
                };
                match r {
                    Ok(ns) => samples.entry((ti, mode)).or_default().push(ns as f64 / 1e6),
                    Err(e) => pb.suspend(|| eprintln!("{label} {mode}: {e}")),
                }
            }
        }
    }
    pb.finish_and_clear();
    let mut md = String::from("Overhead: median time inside each kind / on the host (1.00 = no overhead):\n\n| workload | host ms |");
    for (l, _) in &targets[1..] {
        md += &format!(" {l} ms | {l} ratio |");
    }
    md += "\n|---|---|";
    for _ in &targets[1..] {
        md += "---|---|";
    }
    md += "\n";
    let mut ratios: Vec<(String, Vec<f64>)> = targets[1..]
        .iter()
        .map(|t| (t.0.clone(), Vec::new()))
        .collect();
    let mut jr = serde_json::Map::new();
    for (mode, desc) in MODES {
        let host = samples
            .get(&(0, *mode))
            .map(|v| percentile(v, 50.0))
            .unwrap_or(f64::NAN);
        md += &format!("| {desc} | {} |", plot::fmt_num(host));
        let mut jm = serde_json::Map::new();
        jm.insert(
            "host_ms".into(),
            json!(samples.get(&(0, *mode)).cloned().unwrap_or_default()),
        );
        for (ti, (label, _)) in targets.iter().enumerate().skip(1) {
            let v = samples.get(&(ti, *mode)).cloned().unwrap_or_default();
            let med = percentile(&v, 50.0);
            let ratio = med / host;
            md += &format!(" {} | {:.2}x |", plot::fmt_num(med), ratio);
            ratios[ti - 1].1.push(ratio);
            jm.insert(label.clone(), json!({"ms": v, "ratio_to_host": if ratio.is_finite() { json!(ratio) } else { Value::Null }}));
        }
        md += "\n";
        jr.insert(mode.to_string(), Value::Object(jm));
    }
    for ((ti, mode), v) in &samples {
        report.add_series(
            &targets[*ti].0,
            if *ti == 0 { "host" } else { "kind" },
            mode,
            "ms",
            v.clone(),
            0,
        );
    }
    report.sections.push(md);
    report.results = json!({ "overhead": jr, "repetitions": reps });
    let cats: Vec<String> = MODES.iter().map(|m| m.0.to_string()).collect();
    plot::bars(
        &args.out.join("overhead.svg"),
        "time inside / time on the host (median)",
        "ratio to host",
        &cats,
        &ratios,
        Some(1.0),
    )?;
    report.plots.push("overhead.svg".into());
    Ok(())
}

// ---------------------------------------------------------------- pagecache

/// An OCI layout holding the busybox rootfs plus a 50 MiB /data file.
fn pagecache_image(h: &Harness, rootfs: &Path) -> Result<PathBuf, String> {
    let dir = h.dir.join("pc");
    let tree = dir.join("rootfs");
    let layout = dir.join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).map_err(|e| e.to_string())?;
    let sh = |cmd: &str| -> Result<String, String> {
        let mut c = std::process::Command::new("sh");
        c.arg("-c").arg(cmd);
        timed(&mut c).map(|(_, o)| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    sh(&format!(
        "cp -a '{}' '{}'",
        rootfs.display(),
        tree.display()
    ))?;
    // Incompressible-ish, non-zero data; the page cache does not care, but sparse would.
    let mut data = Vec::with_capacity(50 << 20);
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    while data.len() < 50 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(tree.join("data"), &data).map_err(|e| e.to_string())?;
    let layer = dir.join("layer.tar");
    sh(&format!(
        "tar -C '{}' -cf '{}' .",
        tree.display(),
        layer.display()
    ))?;
    let put = |path: &Path| -> Result<(String, u64), String> {
        let d = sh(&format!("sha256sum '{}' | cut -d' ' -f1", path.display()))?;
        let size = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
        std::fs::rename(path, layout.join("blobs/sha256").join(&d)).map_err(|e| e.to_string())?;
        Ok((d, size))
    };
    let (ldig, lsize) = put(&layer)?;
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["sh"], "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{ldig}")]},
    });
    let cpath = dir.join("config.json");
    std::fs::write(&cpath, serde_json::to_vec(&config).unwrap()).map_err(|e| e.to_string())?;
    let (cdig, csize) = put(&cpath)?;
    let manifest = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{cdig}"), "size": csize},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{ldig}"), "size": lsize}],
    });
    let mpath = dir.join("manifest.json");
    std::fs::write(&mpath, serde_json::to_vec(&manifest).unwrap()).map_err(|e| e.to_string())?;
    let (mdig, msize) = put(&mpath)?;
    let index = json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{mdig}"), "size": msize}]});
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&tree);
    Ok(layout)
}

pub fn pagecache(
    args: &BenchArgs,
    h: &mut Harness,
    rootfs: &Path,
    report: &mut Report,
) -> Result<(), String> {
    let count = args.count.unwrap_or(8).max(1);
    eprintln!("building the pagecache image (busybox + 50 MiB /data) ...");
    let layout = pagecache_image(h, rootfs)?;
    h.ltv_ok(&[
        std::ffi::OsStr::new("image"),
        "import".as_ref(),
        layout.as_os_str(),
        "--alias".as_ref(),
        "pagecache".as_ref(),
    ])?;
    for p in &args.peers {
        report.skip(p, "peers are not measured by the pagecache suite yet");
    }
    let mut lines = Vec::new();
    let mut jr = serde_json::Map::new();
    let mut md = String::from("Page cache: host `Cached` growth while N instances of one image each read the same 50 MiB file (after drop_caches):\n\n| kind | N | host Cached growth MiB | cache charged to the instances MiB | charged MiB per instance |\n|---|---|---|---|---|\n");
    for k in kinds(args, h, report) {
        if interrupted() {
            break;
        }
        let prefix = match launch_parents(h, &k, "pc") {
            Ok(p) => p,
            Err(e) => {
                report.skip(&k.name, skip_reason(&e));
                continue;
            }
        };
        meminfo::settle();
        let c0 = meminfo::get(&meminfo::read(), "Cached") as f64;
        let pb = bar(count, &k.name);
        let mut pts = Vec::new();
        let mut cpts = Vec::new();
        let mut names = Vec::new();
        for n in 1..=count {
            if interrupted() {
                break;
            }
            let name = join(&prefix, &format!("pc{n}"));
            let r = h
                .ltv_ok(&launch_args(k.leaf(), &name, "pagecache", &[]))
                .and_then(|_| {
                    h.ltv_ok(&["exec", &name, "--", "sh", "-c", "cat /data > /dev/null"])
                });
            pb.inc(1);
            if let Err(e) = r {
                if n == 1 {
                    pb.suspend(|| report.skip(&k.name, skip_reason(&e)));
                } else {
                    pb.suspend(|| eprintln!("{}: {e}", k.name));
                }
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
            let grow = (meminfo::get(&meminfo::read(), "Cached") as f64 - c0) / 1024.0;
            names.push(name);
            // Robust against other work on the host: the page cache charged to the
            // instances' cgroups (a shared page is charged once, to its first reader).
            let charged: u64 = names
                .iter()
                .filter_map(|n| h.instance_pid(n))
                .filter_map(cgroup_cache)
                .sum();
            let charged = charged as f64 / (1024.0 * 1024.0);
            md += &format!(
                "| {} | {n} | {grow:.1} | {charged:.1} | {:.1} |\n",
                k.name,
                charged / n as f64
            );
            pts.push((n as f64, grow));
            cpts.push((n as f64, charged));
        }
        pb.finish_and_clear();
        h.delete_all();
        jr.insert(
            k.name.clone(),
            json!(pts
                .iter()
                .zip(&cpts)
                .map(|(p, c)| json!({"instances": p.0, "cached_growth_mib": p.1, "charged_cache_mib": c.1}))
                .collect::<Vec<_>>()),
        );
        let color = lines.len() / 2;
        lines.push(Line {
            label: format!("{}: host Cached growth", k.name),
            points: pts,
            color,
            dashed: false,
        });
        lines.push(Line {
            label: format!("{}: cache charged to instances", k.name),
            points: cpts,
            color,
            dashed: true,
        });
    }
    md += "\nFlat near 50 MiB means the instances share one copy of the file. Host `Cached` also moves with any other file I/O on the host; the charged column does not.\n";
    report.sections.push(md);
    report.results = json!({ "pagecache": jr, "file_mib": 50 });
    let c = lines.len() / 2 + 1;
    lines.push(Line {
        label: "one shared copy (50 MiB)".into(),
        points: vec![(1.0, 50.0), (count as f64, 50.0)],
        color: c,
        dashed: true,
    });
    lines.push(Line {
        label: "no sharing (N × 50 MiB)".into(),
        points: vec![(1.0, 50.0), (count as f64, 50.0 * count as f64)],
        color: c + 1,
        dashed: true,
    });
    plot::lines(
        &args.out.join("pagecache.svg"),
        "host page cache growth, N instances reading one 50 MiB file",
        "instances",
        "MiB",
        &lines,
        None,
    )?;
    report.plots.push("pagecache.svg".into());
    Ok(())
}

// ---------------------------------------------------------------- isolation

fn host_uid_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1).map(String::from))
        .unwrap_or_else(|| "?".into())
}

pub fn isolation(
    args: &BenchArgs,
    h: &mut Harness,
    _rootfs: &Path,
    report: &mut Report,
) -> Result<(), String> {
    let bin = workload(h)?;
    let probe = |o: &str| -> Result<Value, String> {
        serde_json::from_str(o.trim()).map_err(|e| format!("bad workload output {o:?}: {e}"))
    };
    let mut c = std::process::Command::new(&bin);
    c.arg("isolation");
    let host = timed(&mut c).and_then(|(_, o)| probe(&String::from_utf8_lossy(&o.stdout)))?;
    for p in &args.peers {
        report.skip(p, "peers are not measured by the isolation suite yet");
    }
    let mut cols = vec!["host".to_string()];
    let mut views = vec![(host.clone(), "0".to_string())];
    for k in kinds(args, h, report) {
        // Limits on, to see whether /proc shows them.
        let r = one_instance(h, &k, "iso", &["--memory", "256MiB", "--cpus", "1"])
            .and_then(|n| install_workload(h, &n, &bin).map(|_| n))
            .and_then(|n| {
                h.ltv_ok(&["exec", &n, "--", "/tmp/w", "isolation"])
                    .map(|o| (n, o))
            })
            .and_then(|(n, o)| probe(&o).map(|v| (n, v)));
        match r {
            Ok((n, v)) => {
                let uid = h
                    .instance_pid(&n)
                    .map(host_uid_of)
                    .unwrap_or_else(|| "?".into());
                cols.push(k.name.clone());
                views.push((v, uid));
            }
            Err(e) => report.skip(&k.name, skip_reason(&e)),
        }
    }
    let s = |v: &Value, k: &str| {
        v[k].as_str()
            .map(String::from)
            .unwrap_or_else(|| v[k].to_string())
    };
    let mut rows: Vec<plot::GridRow> = Vec::new();
    let row = |label: &str,
               f: &dyn Fn(&Value, &str, bool) -> plot::Cell|
     -> (String, Vec<(String, Option<bool>)>) {
        (
            label.to_string(),
            views
                .iter()
                .enumerate()
                .map(|(i, (v, uid))| f(v, uid, i == 0))
                .collect(),
        )
    };
    rows.push(row("shared kernel", &|v, _, is_host| {
        let same = v["boot_id"] == host["boot_id"];
        (
            if same {
                "yes (same boot_id)".into()
            } else {
                "no (own kernel)".into()
            },
            if is_host { None } else { Some(!same) },
        )
    }));
    rows.push(row("kernel release", &|v, _, _| (s(v, "kernel"), None)));
    rows.push(row("own namespaces", &|v, _, is_host| {
        let own: Vec<&str> = ["cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts"]
            .into_iter()
            .filter(|n| v["ns"][n] != host["ns"][n])
            .collect();
        let t = if own.is_empty() {
            "none".into()
        } else {
            own.join(",")
        };
        (t, if is_host { None } else { Some(own.len() >= 6) })
    }));
    rows.push(row("root's host uid", &|_, uid, is_host| {
        (
            uid.to_string(),
            if is_host { None } else { Some(uid != "0") },
        )
    }));
    rows.push(row("seccomp mode", &|v, _, is_host| {
        let m = s(v, "seccomp");
        let good = m == "2";
        (
            format!("{m}{}", if good { " (filter)" } else { "" }),
            if is_host { None } else { Some(good) },
        )
    }));
    rows.push(row("CapEff", &|v, _, is_host| {
        let c = s(v, "cap_eff");
        let full = c == host["cap_eff"].as_str().unwrap_or("");
        (c, if is_host { None } else { Some(!full) })
    }));
    rows.push(row("MemTotal (limit 256MiB)", &|v, _, is_host| {
        let kib: u64 = s(v, "mem_total_kib").parse().unwrap_or(0);
        let t = format!("{} MiB", kib / 1024);
        (
            t,
            if is_host {
                None
            } else {
                Some(kib <= 256 * 1024)
            },
        )
    }));
    rows.push(row("CPUs in cpuinfo (limit 1)", &|v, _, is_host| {
        let n = v["cpus"].as_u64().unwrap_or(0);
        (n.to_string(), if is_host { None } else { Some(n <= 1) })
    }));
    for sc in [
        "unshare",
        "mount",
        "reboot",
        "kexec_load",
        "init_module",
        "bpf",
        "perf_event_open",
    ] {
        rows.push(row(sc, &|v, _, is_host| {
            let t = v["syscalls"][sc].as_str().unwrap_or("?").to_string();
            let blocked = !t.starts_with("allowed");
            (t, if is_host { None } else { Some(blocked) })
        }));
    }
    let mut md = String::from("Isolation, measured from inside (green in the SVG = isolated / host's view hidden):\n\n| check |");
    for c in &cols {
        md += &format!(" {c} |");
    }
    md += "\n|---|";
    for _ in &cols {
        md += "---|";
    }
    md += "\n";
    for (label, cells) in &rows {
        md += &format!("| {label} |");
        for (t, _) in cells {
            md += &format!(" {t} |");
        }
        md += "\n";
    }
    report.sections.push(md);
    report.results = json!({
        "isolation": cols.iter().zip(views.iter()).map(|(c, (v, uid))| (c.clone(), json!({"inside": v, "host_uid_of_root": uid}))).collect::<serde_json::Map<_, _>>(),
        "table": rows.iter().map(|(l, cells)| json!({"check": l, "values": cells.iter().map(|c| c.0.clone()).collect::<Vec<_>>()})).collect::<Vec<_>>(),
    });
    plot::grid(
        &args.out.join("isolation.svg"),
        "isolation measured from inside each kind",
        &cols,
        &rows,
    )?;
    report.plots.push("isolation.svg".into());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_order_counts_and_shapes() {
        // Paused: round-robin, first subject rotating, warm-up rounds first.
        let o = start_order(2, 1, 2, false);
        assert_eq!(
            o,
            [
                (0, false),
                (1, false),
                (1, true),
                (0, true),
                (0, true),
                (1, true)
            ]
        );
        // Back to back: blocks, each led by a discarded sample.
        let o = start_order(2, 3, 25, true);
        for si in 0..2 {
            let mine: Vec<bool> = o.iter().filter(|x| x.0 == si).map(|x| x.1).collect();
            assert_eq!(mine.iter().filter(|m| **m).count(), 25);
            // 3 warm-up, then one lead for each of the two later blocks.
            assert_eq!(mine.iter().filter(|m| !**m).count(), 5);
        }
        let mut runs = vec![];
        for w in o.chunk_by(|a, b| a.0 == b.0) {
            assert!(!w[0].1, "a block starts with a discarded sample");
            runs.push((w[0].0, w.len()));
        }
        assert_eq!(runs, [(0, 13), (1, 13), (0, 11), (1, 11), (0, 6), (1, 6)]);
    }

    #[test]
    fn kind_chains() {
        let k = KindSpec::parse("app-in-system-in-vm");
        assert_eq!(k.chain, ["vm", "system", "app"]);
        assert_eq!(k.leaf(), "app");
        assert!(k.nested());
        assert!(!KindSpec::parse("system").nested());
        assert_eq!(
            launch_args("app", "a/b", "busybox", &[]),
            ["launch", "busybox", "a/b", "--kind", "app", "--", "sleep", "1d"]
        );
        assert_eq!(launch_args("vm", "v", "busybox", &[]).len(), 5);
    }
}
