//! Nesting through one API: an app container inside an unprivileged system container,
//! addressed by path. The three-level chain through a microVM is in vm.rs.

use ltv_e2e::{check_chain, require_root, stderr, TestDaemon};
use std::time::Duration;

/// Host processes whose uid lies in `[base, base + 65536)`.
fn processes_in_range(base: u64) -> Vec<String> {
    let mut found = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let uid: Option<u64> = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
        if uid.is_some_and(|u| u >= base && u < base + 65536) {
            found.push(status.lines().next().unwrap_or_default().to_string());
        }
    }
    found
}

#[test]
fn app_in_system_container_through_one_api() {
    require_root!();
    let d = TestDaemon::start();
    d.build_busybox();
    d.ok(&["launch", "busybox", "sys1"]);
    // Both spellings: a path, and --parent.
    d.ok(&[
        "launch",
        "busybox",
        "sys1/app1",
        "--kind",
        "app",
        "--",
        "sleep",
        "1000",
    ]);
    d.ok(&[
        "launch",
        "busybox",
        "app2",
        "--parent",
        "sys1",
        "--kind",
        "app",
        "--",
        "sh",
        "-c",
        "echo hello-from-app2; exec sleep 1000",
    ]);
    let sys1 = d.instance("sys1");
    // Its output, from the daemon inside sys1, through ours.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !d.ok(&["logs", "sys1/app2"]).contains("hello-from-app2") {
        assert!(
            std::time::Instant::now() < deadline,
            "no logs from sys1/app2"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let base = sys1["idmap_base"].as_u64().unwrap();

    check_chain(&d, &[("sys1", "system"), ("sys1/app1", "app")]);

    // The app containers inside are on the system container's own bridge.
    let addr = |path: &str| {
        let (status, v) = d.api_json(
            "GET",
            &format!("/1.0/instances/{}", path.replace('/', "%2F")),
            None,
        );
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["name"], path, "answers name the full path: {v}");
        v["address"].as_str().unwrap_or_default().to_string()
    };
    let (a1, a2) = (addr("sys1/app1"), addr("sys1/app2"));
    assert_ne!(a1, a2);
    d.ok(&["exec", "sys1/app2", "--", "ping", "-c1", "-W2", &a1]);

    // `run --parent` in the foreground: its output and exit code come back through both
    // daemons; its address is on sys1's bridge, like app1's; --rm leaves nothing inside
    // (the tree below).
    let out = d.ltv(&[
        "run",
        "--rm",
        "--parent",
        "sys1",
        "busybox",
        "--",
        "sh",
        "-c",
        "tail -n1 /etc/hosts; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let hosts_line = String::from_utf8_lossy(&out.stdout).to_string();
    let subnet = |a: &str| a.rsplit_once('.').map(|(net, _)| net.to_string());
    let run_addr = hosts_line.split_whitespace().next().unwrap_or_default();
    assert_eq!(subnet(run_addr), subnet(&a1), "{hosts_line}");
    let sys1_addr = sys1["address"].as_str().unwrap_or_default();
    assert_ne!(
        subnet(run_addr),
        subnet(sys1_addr),
        "not on our bridge: {hosts_line}"
    );
    assert_ne!(run_addr, a1);

    // The tree, through the API and the CLI.
    let (status, tree) = d.api_json("GET", "/1.0/instances?recursion=tree", None);
    assert_eq!(status, 200, "{tree}");
    let children = tree[0]["children"].as_array().cloned().unwrap_or_default();
    let mut names: Vec<&str> = children.iter().filter_map(|c| c["name"].as_str()).collect();
    names.sort();
    assert_eq!(names, ["sys1/app1", "sys1/app2"], "{tree}");
    assert!(
        children
            .iter()
            .all(|c| c["status"] == "Running" && c["usage"]["memory_bytes"].as_u64() > Some(0)),
        "{tree}"
    );
    // Pid namespace depth, each level measured by the daemon that owns it.
    assert_eq!(tree[0]["usage"]["pid_ns_depth"], 1, "{tree}");
    assert!(
        children.iter().all(|c| c["usage"]["pid_ns_depth"] == 2),
        "{tree}"
    );
    let listed = d.ok(&["list", "--tree"]);
    assert!(
        listed.contains("  sys1/app1") && listed.contains("app"),
        "{listed}"
    );
    let inside = d.ok(&["list", "sys1"]);
    assert!(
        inside.contains("sys1/app1") && inside.contains("sys1/app2"),
        "{inside}"
    );
    assert!(d
        .ok(&["info", "sys1/app1"])
        .contains("Name:       sys1/app1"));

    // Bad input, each level named.
    let out = d.ltv(&["exec", "sys1/nope", "--", "true"]);
    assert!(
        !out.status.success() && stderr(&out).contains("\"nope\" not found"),
        "{}",
        stderr(&out)
    );
    let (status, v) = d.api_json("GET", "/1.0/instances/nope%2Fapp1", None);
    assert_eq!(status, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("\"nope\""), "{v}");
    let (status, v) = d.api_json(
        "POST",
        "/1.0/instances",
        Some(r#"{"name":"app1","parent":"sys1","kind":"app","image":"busybox","config":{"command":["true"]},"start":false}"#),
    );
    assert_eq!(status, 409, "a name taken inside: {v}");
    let (status, v) = d.api_json(
        "POST",
        "/1.0/instances",
        Some(r#"{"name":"sys1/vm1","kind":"vm","image":"busybox","config":{},"start":true}"#),
    );
    assert_eq!(status, 400, "no KVM inside a container: {v}");
    assert!(v["error"].as_str().unwrap().contains("kvm"), "{v}");
    let (status, v) = d.api_json(
        "POST",
        "/1.0/instances",
        Some(r#"{"name":"sys1/app1/x","kind":"app","image":"busybox","config":{"command":["true"]},"start":true}"#),
    );
    assert_eq!(status, 400, "an app container holds nothing: {v}");

    // A parent with running children stops or goes only with --force.
    let out = d.ltv(&["stop", "sys1", "--timeout", "2"]);
    assert!(
        !out.status.success() && stderr(&out).contains("running instances inside"),
        "{}",
        stderr(&out)
    );
    let out = d.ltv(&["delete", "sys1"]);
    assert!(!out.status.success());
    assert_eq!(d.instance("sys1")["status"], "Running");
    d.ok(&["stop", "sys1/app2"]);
    d.ok(&["delete", "sys1/app2"]);
    assert_eq!(d.api_json("GET", "/1.0/instances/sys1%2Fapp2", None).0, 404);

    d.ok(&["delete", "--force", "sys1"]);
    d.assert_no_leftovers("sys1");
    // Nothing of the nested daemon or its container runs on under sys1's ids.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !processes_in_range(base).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(processes_in_range(base), Vec::<String>::new());
}
