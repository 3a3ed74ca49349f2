//! Runs `ltv bench` with the real binary (as root) and checks what it writes.

use ltv_e2e::{is_root, ltv_bin};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn bench(args: &[&str], out: &Path) -> Value {
    let child = Command::new(ltv_bin())
        .arg("bench")
        .args(args)
        .arg("--out")
        .arg(out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run ltv bench");
    let pid = child.id();
    let res = child.wait_with_output().expect("wait for ltv bench");
    assert!(
        res.status.success(),
        "ltv bench {args:?} failed ({}):\n{}\n{}",
        res.status,
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
    let text = std::fs::read_to_string(out.join("results.json")).expect("results.json");
    let v: Value = serde_json::from_str(&text).expect("results.json is JSON");
    // Its network namespace and cgroup root are gone.
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let name = format!("ltv-bench-{pid}");
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&name),
        "netns {name} left behind"
    );
    assert!(
        !Path::new("/sys/fs/cgroup/memory").join(&name).exists(),
        "cgroup {name} left behind"
    );
    for k in [
        "suite",
        "environment",
        "series",
        "skipped",
        "results",
        "plots",
    ] {
        assert!(v.get(k).is_some(), "results.json lacks {k}: {v}");
    }
    let env = &v["environment"];
    for k in [
        "hostname",
        "kernel",
        "kvm",
        "cgroup",
        "cpu_model",
        "mem_total_kib",
    ] {
        assert!(!env[k].is_null(), "environment lacks {k}: {env}");
    }
    assert!(out.join("summary.md").exists());
    let svgs: Vec<_> = std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "svg"))
        .collect();
    assert!(!svgs.is_empty(), "no .svg in {}", out.display());
    for s in svgs {
        let t = std::fs::read_to_string(s.path()).unwrap();
        assert!(t.contains("<svg"), "{} is not an SVG", s.path().display());
    }
    v
}

fn series<'a>(v: &'a Value, subject: &str, metric: &str) -> &'a Value {
    v["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["subject"] == subject && s["metric"] == metric)
        .unwrap_or_else(|| panic!("no series {subject}/{metric} in {}", v["series"]))
}

fn sane_ms(x: &Value) {
    let ms = x.as_f64().expect("number");
    assert!(ms > 0.0 && ms < 10_000.0, "latency {ms} ms out of range");
}

/// Where a test's bench output goes. Not /tmp: other test suites on shared hosts clean it.
fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ltv-bench-e2e-")
        .tempdir_in(if Path::new("/var/tmp").is_dir() {
            "/var/tmp"
        } else {
            "/tmp"
        })
        .unwrap()
}

#[test]
fn start_and_density_with_the_real_binary() {
    if !is_root() {
        eprintln!("skipped: ltv bench needs root (namespaces, cgroups, drop_caches)");
        return;
    }
    let dir = scratch_dir();

    let out = dir.path().join("start");
    let v = bench(
        &["start", "--kinds", "app", "--count", "3", "--warmup", "1"],
        &out,
    );
    assert_eq!(v["suite"], "start");
    for metric in ["run", "launch+exec", "delete"] {
        let s = series(&v, "app", metric);
        let samples = s["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 3, "{metric}: {s}");
        samples.iter().for_each(sane_ms);
        sane_ms(&s["summary"]["p50"]);
    }

    let out = dir.path().join("density");
    let v = bench(&["density", "--kinds", "app", "--count", "4"], &out);
    let pts = v["results"]["density"]["app"]["points"]
        .as_array()
        .expect("density points");
    assert!(!pts.is_empty());
    let last = pts.last().unwrap();
    assert_eq!(last["count"], 4);
    // The cgroup charge is per instance and immune to other work on the host,
    // unlike the host-wide meminfo delta.
    let kib = last["cgroup_kib_per_instance"]
        .as_f64()
        .expect("cgroup memory");
    assert!(
        kib > 0.0 && kib < 1024.0 * 1024.0,
        "cgroup KiB/instance {kib}"
    );
    assert!(last["host_kib_per_instance"].as_f64().is_some());
    for p in pts {
        p["launch_ms"].as_array().unwrap().iter().for_each(sane_ms);
    }
}

/// The other suites, with tiny counts, over a plain and a nested kind.
#[test]
fn overhead_pagecache_and_isolation_with_the_real_binary() {
    if !is_root() {
        eprintln!("skipped: ltv bench needs root (namespaces, cgroups, drop_caches)");
        return;
    }
    let dir = scratch_dir();
    let kinds = ["--kinds", "app,app-in-system"];

    let out = dir.path().join("overhead");
    let v = bench(&[&["overhead", "--count", "1"][..], &kinds].concat(), &out);
    assert_eq!(v["skipped"], serde_json::json!([]), "{v}");
    let modes = v["results"]["overhead"]
        .as_object()
        .expect("overhead modes");
    assert!(modes.len() >= 4, "{modes:?}");
    for (mode, m) in modes {
        assert!(
            m["host_ms"][0].as_f64().is_some_and(|x| x > 0.0),
            "{mode}: {m}"
        );
        for kind in ["app", "app-in-system"] {
            let ratio = m[kind]["ratio_to_host"].as_f64();
            assert!(
                ratio.is_some_and(|r| r > 0.0 && r < 100.0),
                "{mode} {kind}: {m}"
            );
        }
    }

    let out = dir.path().join("pagecache");
    let v = bench(&[&["pagecache", "--count", "2"][..], &kinds].concat(), &out);
    let pts = v["results"]["pagecache"]["app"]
        .as_array()
        .expect("app points");
    assert_eq!(pts.len(), 2, "{pts:?}");
    // Both containers read one 50 MiB file: its cache is charged about once.
    let charged = pts[1]["charged_cache_mib"].as_f64().unwrap();
    assert!((40.0..80.0).contains(&charged), "{pts:?}");

    let out = dir.path().join("isolation");
    let v = bench(&[&["isolation"][..], &kinds].concat(), &out);
    let iso = &v["results"]["isolation"];
    let host_pid_ns = iso["host"]["inside"]["ns"]["pid"].as_str().unwrap();
    for kind in ["app", "app-in-system"] {
        let inside = &iso[kind]["inside"];
        assert_ne!(
            inside["ns"]["pid"].as_str(),
            Some(host_pid_ns),
            "{kind}: {inside}"
        );
        assert_eq!(
            inside["syscalls"]["kexec_load"], "blocked (EPERM)",
            "{kind}: {inside}"
        );
    }
    let root_uid: u64 = iso["app"]["host_uid_of_root"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(root_uid >= 1_000_000, "unprivileged: {iso}");
}
