//! System containers, unprivileged containers and bridge networking, end to end. Every
//! daemon runs in a network namespace the harness made, so no packet leaves it.

use ltv_e2e::{require_root, stderr, stdout, TestDaemon};
use std::time::Duration;

fn daemon_with_busybox() -> TestDaemon {
    let d = TestDaemon::start();
    d.build_busybox();
    d
}

fn host_uid_of(pid: i64) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn system_container_runs_init_unprivileged_and_stops_cleanly() {
    require_root!();
    let d = daemon_with_busybox();
    // `launch` defaults to a system container.
    d.ok(&["launch", "busybox", "sys1"]);
    let v = d.wait_status("sys1", "Running", Duration::from_secs(5));
    assert_eq!(v["kind"], "system");
    let pid = v["pid"].as_i64().unwrap();
    let base = v["idmap_base"].as_u64().expect("an id range") as u32;
    assert!(base >= 1_000_000, "{v}");
    assert_eq!(
        host_uid_of(pid),
        base,
        "root inside is an unprivileged uid on the host"
    );
    assert_eq!(
        stdout(&d.ltv(&["exec", "sys1", "--", "cat", "/proc/1/comm"])),
        "init\n"
    );
    let map = stdout(&d.ltv(&["exec", "sys1", "--", "cat", "/proc/self/uid_map"]));
    assert_eq!(
        map.split_whitespace().collect::<Vec<_>>(),
        ["0", &base.to_string(), "65536"]
    );
    assert!(d.ok(&["info", "sys1"]).contains("Privileged: no"));

    // Files the container creates are owned by the mapped ids on the host.
    d.ok(&[
        "exec",
        "sys1",
        "--",
        "sh",
        "-c",
        "echo hi > /root/made-inside",
    ]);
    let meta =
        std::fs::metadata(d.state_dir.join("instances/sys1/upper/root/made-inside")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), base);

    // A second container gets a range that does not overlap.
    d.ok(&["launch", "busybox", "sys2"]);
    let base2 = d.instance("sys2")["idmap_base"].as_u64().unwrap() as u32;
    assert!(base2.abs_diff(base) >= 65536, "{base} vs {base2}");
    // So does one of another daemon on this host (its own state dir).
    let other = daemon_with_busybox();
    other.ok(&["launch", "busybox", "sys3", "--network", "none"]);
    let base3 = other.instance("sys3")["idmap_base"].as_u64().unwrap() as u32;
    for b in [base, base2] {
        assert!(
            base3.abs_diff(b) >= 65536,
            "{b} vs {base3} of another daemon"
        );
    }
    other.ok(&["delete", "--force", "sys3"]);

    // Stop: busybox init gets its poweroff signal and goes by itself (no kill needed).
    d.ok(&["stop", "sys1", "--timeout", "20"]);
    let v = d.wait_status("sys1", "Stopped", Duration::from_secs(1));
    assert_ne!(
        v["exit_code"], 137,
        "init powered off rather than being killed: {v}"
    );
    assert!(d.cgroup_dirs("sys1").is_empty());
    // start reuses the upper dir.
    d.ok(&["start", "sys1"]);
    d.wait_status("sys1", "Running", Duration::from_secs(5));
    assert_eq!(
        stdout(&d.ltv(&["exec", "sys1", "--", "cat", "/root/made-inside"])),
        "hi\n"
    );

    // --privileged opts out, and says so.
    d.ok(&["launch", "busybox", "priv", "--privileged"]);
    let v = d.wait_status("priv", "Running", Duration::from_secs(5));
    assert!(v.get("idmap_base").is_none(), "{v}");
    assert_eq!(host_uid_of(v["pid"].as_i64().unwrap()), 0);
    assert!(d.ok(&["info", "priv"]).contains("Privileged: yes"));
    // Its init halts by itself too: reboot() ends its own pid namespace (SIGINT, 130),
    // where a kill after the timeout would give 137.
    d.ok(&["stop", "priv", "--timeout", "8"]);
    assert_eq!(d.instance("priv")["exit_code"], 130);

    for n in ["sys1", "sys2", "priv"] {
        d.ok(&["delete", "--force", n]);
        d.assert_no_leftovers(n);
    }
}

#[test]
fn killing_init_from_the_host_stops_the_instance() {
    require_root!();
    let d = daemon_with_busybox();
    d.ok(&["launch", "busybox", "victim"]);
    let pid = d.wait_status("victim", "Running", Duration::from_secs(5))["pid"]
        .as_i64()
        .unwrap();
    // SAFETY: kill on the init of the container this test launched.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    d.wait_status("victim", "Stopped", Duration::from_secs(10));
    assert!(d.cgroup_dirs("victim").is_empty(), "resources freed");
    d.ok(&["delete", "victim"]);
    d.assert_no_leftovers("victim");
}

#[test]
fn forced_delete_also_kills_what_joined_the_group_from_outside() {
    require_root!();
    let d = daemon_with_busybox();
    d.ok(&["launch", "busybox", "mixed"]);
    d.wait_status("mixed", "Running", Duration::from_secs(5));
    // A host process in the container's cgroup but not in its pid namespace: killing the
    // container's init does not take it, so the forced stop has to.
    let mut outsider = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let dirs = d.cgroup_dirs("mixed");
    assert!(!dirs.is_empty());
    for dir in &dirs {
        std::fs::write(dir.join("cgroup.procs"), outsider.id().to_string()).unwrap();
    }
    d.ok(&["delete", "--force", "mixed"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = outsider.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = outsider.kill();
            panic!("the outsider survived the forced delete");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    d.assert_no_leftovers("mixed");
}

#[test]
fn image_without_init_is_a_clear_error() {
    require_root!();
    let d = daemon_with_busybox();
    // A docker-archive with only busybox and sh: an app image without /sbin/init.
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root/bin");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy("/bin/busybox", root.join("busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("sh")).unwrap();
    let sh = |script: &str| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(work.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}: {}", stderr(&out));
        stdout(&out)
    };
    sh("tar -C root -cf layer.tar bin");
    let diff = sh("sha256sum layer.tar | cut -d' ' -f1").trim().to_string();
    std::fs::write(
        work.path().join("config.json"),
        format!(r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:{diff}"]}}}}"#),
    )
    .unwrap();
    std::fs::write(
        work.path().join("manifest.json"),
        r#"[{"Config":"config.json","Layers":["layer.tar"]}]"#,
    )
    .unwrap();
    sh("tar -cf image.tar manifest.json config.json layer.tar");
    d.ok(&[
        "image",
        "import",
        work.path().join("image.tar").to_str().unwrap(),
        "--alias",
        "noinit",
    ]);

    let out = d.ltv(&["launch", "noinit", "sys"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/sbin/init is missing"),
        "{}",
        stderr(&out)
    );
    d.assert_no_leftovers("sys");
    // As an app container the same image runs.
    let out = d.ltv(&["run", "--rm", "noinit", "--", "sh", "-c", "echo ok"]);
    assert_eq!(stdout(&out), "ok\n", "{}", stderr(&out));
}

#[test]
fn bridge_networking_between_containers() {
    require_root!();
    let d = daemon_with_busybox();
    let bridge_mac = || -> String {
        let text = d.ip(&["-o", "link", "show", "ltvbr0"]);
        let mut words = text.split_whitespace();
        words.find(|w| *w == "link/ether");
        words
            .next()
            .unwrap_or_else(|| panic!("no MAC: {text}"))
            .to_string()
    };
    // The gateway's MAC is the bridge's own, not its lowest port's: it must not change as
    // containers come and go, or their ARP entries for it go stale.
    let gateway_mac = bridge_mac();
    let first_octet = u8::from_str_radix(&gateway_mac[..2], 16).unwrap();
    assert_eq!(
        first_octet & 3,
        2,
        "unicast, locally administered: {gateway_mac}"
    );
    d.ok(&[
        "launch",
        "busybox",
        "web",
        "--kind",
        "app",
        "--",
        "sh",
        "-c",
        "echo hello-from-web > /tmp/index.html; cd /tmp; exec httpd -f -p 8080",
    ]);
    d.ok(&["launch", "busybox", "box"]);
    let web = d.wait_status("web", "Running", Duration::from_secs(5));
    d.wait_status("box", "Running", Duration::from_secs(5));
    assert_eq!(bridge_mac(), gateway_mac, "ports joined, the MAC stays");
    let web_ip = web["address"].as_str().expect("an address").to_string();
    let box_ip = d.instance("box")["address"].as_str().unwrap().to_string();
    assert_ne!(web_ip, box_ip);
    assert!(
        d.ok(&["list"]).contains(&web_ip),
        "ltv list shows addresses"
    );

    let ip = stdout(&d.ltv(&[
        "exec", "box", "--", "ip", "-4", "-o", "addr", "show", "eth0",
    ]));
    assert!(ip.contains(&format!("{box_ip}/24")), "{ip}");
    let route = stdout(&d.ltv(&["exec", "box", "--", "ip", "route"]));
    assert!(route.contains("default via 10.87.0.1"), "{route}");
    let hosts = stdout(&d.ltv(&["exec", "box", "--", "cat", "/etc/hosts"]));
    assert!(
        hosts.contains(&format!("{box_ip}\tbox")) || hosts.contains(&format!("{box_ip} box")),
        "{hosts}"
    );

    // A container's first process finds its network ready: the start waits for it.
    let first = d.ltv(&[
        "run",
        "--rm",
        "busybox",
        "--",
        "sh",
        "-c",
        "ip -4 -o addr show eth0; ip route",
    ]);
    let first = stdout(&first);
    assert!(
        first.contains("eth0    inet 10.87.0.") && first.contains("default via 10.87.0.1"),
        "{first}"
    );

    let out = d.ltv(&["exec", "box", "--", "ping", "-c", "1", "-W", "2", &web_ip]);
    assert!(
        out.status.success(),
        "ping {web_ip}: {} {}",
        stdout(&out),
        stderr(&out)
    );
    let page = d.ltv(&[
        "exec",
        "box",
        "--",
        "wget",
        "-q",
        "-O",
        "-",
        &format!("http://{web_ip}:8080/index.html"),
    ]);
    assert_eq!(stdout(&page), "hello-from-web\n", "{}", stderr(&page));

    // --network none: loopback only, no address handed out.
    d.ok(&[
        "launch",
        "busybox",
        "alone",
        "--kind",
        "app",
        "--network",
        "none",
        "--",
        "sleep",
        "600",
    ]);
    let v = d.wait_status("alone", "Running", Duration::from_secs(5));
    assert!(v.get("address").is_none(), "{v}");
    let ifaces = stdout(&d.ltv(&[
        "exec",
        "alone",
        "--",
        "sh",
        "-c",
        "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '",
    ]));
    assert_eq!(ifaces, "lo\n");
    // ... and `lo` is up, as with Docker's `--network none`.
    let local = d.ltv(&[
        "exec",
        "alone",
        "--",
        "sh",
        "-c",
        "httpd -p 127.0.0.1:8081 -h /etc && wget -q -O - http://127.0.0.1:8081/hostname",
    ]);
    assert_eq!(stdout(&local), "alone\n", "{}", stderr(&local));

    // Deleting frees the address and the veth, before `delete` returns.
    let links = || -> Vec<String> {
        d.ip(&["-o", "link", "show", "type", "veth"])
            .lines()
            .map(str::to_string)
            .collect()
    };
    let named = |prefix: &'static str| {
        move |l: &String| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|n| n.starts_with(prefix))
        }
    };
    // The instances' veths; the daemon's spare helpers have theirs made ahead, down and
    // on no bridge, under names of their own.
    let veths = || -> Vec<String> { links().into_iter().filter(named("veth")).collect() };
    let spares: Vec<String> = links().into_iter().filter(named("ltvs")).collect();
    // Spares exist on cgroup v1 only (v2 clones straight into a cgroup instead).
    let v1 = d.api_json("GET", "/1.0", None).1["cgroup"] != "v2";
    assert!(!v1 || !spares.is_empty(), "{:?}", links());
    for s in &spares {
        assert!(!s.contains("master") && !s.contains(",UP"), "{s}");
    }
    assert_eq!(veths().len(), 2, "web and box: {:?}", veths());
    d.ok(&["delete", "--force", "web"]);
    d.assert_no_leftovers("web");
    assert_eq!(veths().len(), 1, "box only: {:?}", veths());
    d.ok(&[
        "launch", "busybox", "web2", "--kind", "app", "--", "sleep", "600",
    ]);
    assert_eq!(
        d.instance("web2")["address"].as_str(),
        Some(web_ip.as_str()),
        "the freed address is reused"
    );
    for n in ["box", "alone", "web2"] {
        d.ok(&["delete", "--force", n]);
    }
    assert_eq!(veths(), Vec::<String>::new(), "no veth left");
    assert_eq!(bridge_mac(), gateway_mac, "the bridge kept its MAC");
}

#[test]
fn limits_change_while_running_and_oom_stays_inside() {
    require_root!();
    let d = daemon_with_busybox();
    d.ok(&[
        "launch", "busybox", "lim", "--memory", "64MiB", "--pids", "50",
    ]);
    d.ok(&["launch", "busybox", "bystander"]);
    d.wait_status("lim", "Running", Duration::from_secs(5));
    let mem_file = |name: &str| -> Option<String> {
        ltv_e2e::cgroup_mounts()
            .iter()
            .map(|m| m.join(&d.cgroup_root).join(name))
            .find_map(|dir| {
                std::fs::read_to_string(dir.join("memory.limit_in_bytes"))
                    .or_else(|_| std::fs::read_to_string(dir.join("memory.max")))
                    .ok()
            })
            .map(|s| s.trim().to_string())
    };
    assert_eq!(mem_file("lim").as_deref(), Some("67108864"));
    d.ok(&["config", "set", "lim", "memory", "32MiB"]);
    assert_eq!(
        mem_file("lim").as_deref(),
        Some("33554432"),
        "applied while running"
    );
    assert!(d.ok(&["info", "lim"]).contains("memory=32MiB"));
    let (s, e) = d.api_json("PATCH", "/1.0/instances/lim", Some(r#"{"pids":0}"#));
    assert_eq!(s, 400, "{e}");
    let (s, _) = d.api_json("PATCH", "/1.0/instances/lim", Some(r#"{"cpus":999}"#));
    assert_eq!(s, 400, "more CPUs than the host has");
    assert!(!d
        .ltv(&["config", "set", "lim", "memory", "lots"])
        .status
        .success());
    assert_eq!(
        mem_file("lim").as_deref(),
        Some("33554432"),
        "refused changes change nothing"
    );

    // A 64 MiB allocation in a 32 MiB container: the kernel kills it inside.
    let out = d.ltv(&[
        "exec",
        "lim",
        "--",
        "dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=64M",
        "count=1",
    ]);
    assert_eq!(out.status.code(), Some(137), "OOM-killed: {}", stderr(&out));
    assert_eq!(
        d.instance("lim")["status"],
        "Running",
        "the container itself carries on"
    );
    assert_eq!(
        stdout(&d.ltv(&["exec", "bystander", "--", "echo", "fine"])),
        "fine\n"
    );
    for n in ["lim", "bystander"] {
        d.ok(&["delete", "--force", n]);
        d.assert_no_leftovers(n);
    }
}
