//! `ltv image build debian`: debootstrap minbase from the host's apt mirror (a minute or
//! two), with sysvinit as the init of a system container.

use ltv_e2e::{require_root, stderr, stdout, TestDaemon};
use std::process::Command;
use std::time::{Duration, Instant};

/// Restarts the daemon on the same state in a network namespace of its own: only the
/// build needed the host network.
fn into_own_netns(d: &mut TestDaemon) {
    d.stop_daemon();
    let ns = format!("ltv-e2e-debian-{}", std::process::id());
    let added = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .expect("run ip");
    assert!(added.success(), "ip netns add {ns} failed");
    // Drop deletes it.
    d.netns = Some(ns);
    d.spawn();
}

/// Polls `runlevel` inside until it reports runlevel 2; returns the time it took.
fn wait_runlevel_2(d: &TestDaemon, name: &str, since: Instant) -> Duration {
    let deadline = since + Duration::from_secs(60);
    loop {
        let out = d.ltv(&["exec", name, "--", "runlevel"]);
        let text = stdout(&out);
        if out.status.success() && text.split_whitespace().last() == Some("2") {
            return since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not reach runlevel 2: {text:?} {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// (user, new runlevel) of the run-level records in a wtmp file (glibc's 384-byte
/// `struct utmp`: type at 0, pid at 4, user at 44).
fn runlevel_records(wtmp: &[u8]) -> Vec<(String, char)> {
    const RUN_LVL: i32 = 1;
    wtmp.chunks_exact(384)
        .filter(|r| i32::from_le_bytes(r[0..4].try_into().unwrap()) == RUN_LVL)
        .map(|r| {
            let pid = i32::from_le_bytes(r[4..8].try_into().unwrap());
            let user = r[44..76].split(|&b| b == 0).next().unwrap_or_default();
            (
                String::from_utf8_lossy(user).into_owned(),
                (pid & 0xff) as u8 as char,
            )
        })
        .collect()
}

/// Stops `name` and checks that its init halted by itself: well within the timeout, and
/// ended by the halt's reboot(2), which in a PID namespace kills its init with SIGINT
/// (exit 130; the kill after the timeout would give 137).
fn stop_cleanly(d: &TestDaemon, name: &str) -> Duration {
    let t = Instant::now();
    d.ok(&["stop", name, "--timeout", "20"]);
    let took = t.elapsed();
    let v = d.wait_status(name, "Stopped", Duration::from_secs(1));
    assert_eq!(
        v["exit_code"], 130,
        "init halted rather than being killed: {v}"
    );
    assert!(took < Duration::from_secs(10), "stop took {took:?}");
    assert!(d.cgroup_dirs(name).is_empty());
    took
}

#[test]
fn debian_image_builds_and_boots_sysvinit() {
    require_root!();
    // debootstrap fetches from the host's apt mirror, so this daemon needs the host network.
    let mut d = TestDaemon::start_with_host_network();
    let out = d.ltv(&[
        "image",
        "build",
        "debian",
        "--suite",
        "bookworm",
        "--include",
        "procps",
    ]);
    assert!(
        out.status.success(),
        "debootstrap build failed: {}",
        stderr(&out)
    );
    let list = d.ok(&["image", "list"]);
    assert!(list.contains("debian"), "{list}");
    let (_, images) = d.api_json("GET", "/1.0/images", None);
    let image = images
        .as_array()
        .and_then(|a| a.iter().find(|i| i["alias"] == "debian"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(image["init"], "/sbin/init", "{image}");
    assert!(
        image["source"]
            .as_str()
            .unwrap_or("")
            .contains("sysvinit-core"),
        "sysvinit is the default init: {image}"
    );
    into_own_netns(&mut d);

    let out = d.ltv(&[
        "run",
        "--rm",
        "debian",
        "--",
        "sh",
        "-c",
        "cat /etc/debian_version; ps -o pid= -p 1",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text} {}", stderr(&out));
    let mut lines = text.lines();
    assert!(
        lines.next().unwrap_or("").starts_with("12."),
        "bookworm: {text}"
    );
    assert_eq!(
        lines.next().map(str::trim),
        Some("1"),
        "procps from --include works, in our pid namespace: {text}"
    );

    // A system container, unprivileged by default.
    let t = Instant::now();
    d.ok(&["launch", "debian", "deb1"]);
    let v = d.wait_status("deb1", "Running", Duration::from_secs(5));
    let running = t.elapsed();
    assert!(v["idmap_base"].as_u64().is_some(), "unprivileged: {v}");
    let booted = wait_runlevel_2(&d, "deb1", t);
    eprintln!("deb1: Running after {running:?}, runlevel 2 after {booted:?}");

    // PID 1 is sysvinit's init.
    let out = d.ltv(&[
        "exec",
        "deb1",
        "--",
        "sh",
        "-c",
        // dpkg knows the pre-merged-/usr path.
        "cat /proc/1/comm; [ \"$(readlink /proc/1/exe)\" = \"$(readlink -f /sbin/init)\" ] && dpkg -S /sbin/init",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text} {}", stderr(&out));
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("init"), "{text}");
    assert!(
        lines.next().unwrap_or("").starts_with("sysvinit-core: "),
        "{text}"
    );
    // The boot scripts ran: mountkernfs.sh mounts /run/lock.
    let mounts = d.ok(&["exec", "deb1", "--", "cat", "/proc/mounts"]);
    assert!(mounts.contains(" /run/lock tmpfs "), "{mounts}");
    assert_eq!(d.ok(&["exec", "deb1", "--", "hostname"]), "deb1\n");
    assert_eq!(d.ok(&["exec", "deb1", "--", "echo", "hi"]), "hi\n");

    let took = stop_cleanly(&d, "deb1");
    eprintln!("deb1: clean stop in {took:?}");
    let wtmp = std::fs::read(d.state_dir.join("instances/deb1/upper/var/log/wtmp"))
        .expect("init keeps wtmp");
    let records = runlevel_records(&wtmp);
    assert!(
        records.contains(&("runlevel".into(), '2')) && records.contains(&("runlevel".into(), '0')),
        "init went from runlevel 2 to 0: {records:?}"
    );

    // It boots again from its kept upper dir, and stops cleanly again.
    let t = Instant::now();
    d.ok(&["start", "deb1"]);
    wait_runlevel_2(&d, "deb1", t);
    stop_cleanly(&d, "deb1");
    d.ok(&["delete", "deb1"]);
    d.assert_no_leftovers("deb1");
}
