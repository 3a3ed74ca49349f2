//! Application containers end to end: the real `ltv` binary, a real daemon, real
//! namespaces, overlayfs and cgroups.

use ltv_e2e::{cgroup_mounts, require_root, stderr, stdout, TestDaemon};
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

fn daemon_with_busybox() -> TestDaemon {
    let d = TestDaemon::start();
    d.build_busybox();
    d
}

#[test]
fn server_info_and_openapi() {
    require_root!();
    let d = TestDaemon::start();
    let (status, info) = d.api_json("GET", "/1.0", None);
    assert_eq!(status, 200);
    assert!(
        ["hardware", "pvm", "none"].contains(&info["kvm"].as_str().unwrap()),
        "{info}"
    );
    assert!(
        ["v1-hybrid", "v1", "v2"].contains(&info["cgroup"].as_str().unwrap()),
        "{info}"
    );
    let (status, spec) = d.api_json("GET", "/1.0/openapi.json", None);
    assert_eq!(status, 200);
    assert!(
        spec["openapi"].as_str().unwrap().starts_with("3."),
        "{spec}"
    );
    for path in [
        "/1.0/instances",
        "/1.0/instances/{name}/exec",
        "/1.0/images",
    ] {
        assert!(spec["paths"][path].is_object(), "openapi lacks {path}");
    }
    assert!(spec["components"]["schemas"]["Instance"].is_object());
    let (status, err) = d.api_json("GET", "/1.0/nothing-here", None);
    assert_eq!((status, err["code"].as_u64()), (404, Some(404)), "{err}");
}

#[test]
fn socket_is_0660() {
    require_root!();
    use std::os::unix::fs::PermissionsExt;
    let d = TestDaemon::start();
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
}

#[test]
fn run_foreground_isolation_and_exit_code() {
    require_root!();
    let d = daemon_with_busybox();
    let out = d.ltv(&[
        "run", "--rm", "--name", "iso", "busybox", "--", "sh", "-c",
        "hostname; echo pid=$$; ls /proc | grep -c '^[0-9]'; cut -d: -f1 /proc/net/dev | tail -n +3 | tr -d ' '; \
         grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; ls /dev; touch /sys/x 2>/dev/null || echo sys-ro; \
         echo keys=$(wc -c < /proc/keys); awk '$5 == \"/proc/sys\" { print \"proc-sys-\" $6 }' /proc/self/mountinfo; \
         echo cgroup-entries=$(ls /sys/fs/cgroup | wc -l); \
         grep ' / ' /proc/self/mountinfo | grep -c overlay; exit 42",
    ]);
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(42),
        "stdout: {text}\nstderr: {}",
        stderr(&out)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "iso", "hostname is the instance name");
    assert_eq!(lines[1], "pid=1", "own pid namespace");
    assert!(
        lines[2].parse::<u32>().unwrap() <= 3,
        "only the container's processes: {text}"
    );
    assert_eq!(lines[3], "lo", "loopback only: {text}");
    // Docker's default capability set is 0xa80425fb.
    assert!(text.contains("CapEff:\t00000000a80425fb"), "{text}");
    assert!(text.contains("NoNewPrivs:\t1"), "{text}");
    assert!(text.contains("Seccomp:\t2"), "{text}");
    for dev in [
        "null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm",
    ] {
        assert!(lines.contains(&dev), "/dev/{dev} missing: {text}");
    }
    assert!(text.contains("sys-ro"), "/sys must be read-only: {text}");
    // Docker's masked and read-only /proc paths.
    assert!(lines.contains(&"keys=0"), "/proc/keys is masked: {text}");
    assert!(
        lines.iter().any(|l| l.starts_with("proc-sys-ro,")),
        "/proc/sys is mounted read-only: {text}"
    );
    assert!(
        !lines.contains(&"cgroup-entries=0"),
        "the container sees its cgroup: {text}"
    );
    assert_eq!(lines.last(), Some(&"1"), "rootfs is an overlay: {text}");
    d.assert_no_leftovers("iso");
    assert_eq!(
        d.api("GET", "/1.0/instances/iso", None).0,
        404,
        "--rm removed it"
    );
}

#[test]
fn run_env_workdir_stdin_and_tty() {
    require_root!();
    let d = daemon_with_busybox();
    let out = d.ltv(&[
        "run",
        "--rm",
        "-e",
        "GREETING=hi there",
        "-w",
        "/tmp",
        "busybox",
        "--",
        "sh",
        "-c",
        "echo \"$GREETING\"; pwd",
    ]);
    assert_eq!(stdout(&out), "hi there\n/tmp\n", "{}", stderr(&out));

    let mut child = d
        .ltv_cmd(&[
            "run",
            "--rm",
            "-i",
            "busybox",
            "--",
            "sh",
            "-c",
            "tr a-z A-Z; echo done >&2",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello stdin\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(stdout(&out), "HELLO STDIN\n");
    assert_eq!(stderr(&out), "done\n", "stderr is kept apart");
    assert!(out.status.success());

    // -t: stdin and stdout are a terminal, and the shell's job control has it as its
    // controlling terminal.
    let out = d.ltv(&[
        "run",
        "--rm",
        "-t",
        "busybox",
        "--",
        "sh",
        "-c",
        "test -t 0 && test -t 1 && tty && stty size && ps -o tty= -p 1 | head -1",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text:?} {}", stderr(&out));
    assert!(text.starts_with("/dev/"), "a terminal: {text:?}");
    assert!(
        text.contains("\r\n"),
        "the terminal translates newlines: {text:?}"
    );
}

#[test]
fn limits_are_enforced_in_cgroups() {
    require_root!();
    let d = daemon_with_busybox();
    d.ok(&[
        "launch", "busybox", "lim", "--kind", "app", "--memory", "64MiB", "--cpus", "0.5",
        "--pids", "100", "--", "sleep", "600",
    ]);
    let mounts = cgroup_mounts();
    let v1 = mounts.iter().any(|m| m.ends_with("memory"));
    let read = |ctrl: &str, file: &str| -> String {
        let dir = mounts
            .iter()
            .find(|m| if v1 { m.ends_with(ctrl) } else { true })
            .unwrap_or_else(|| panic!("no {ctrl} hierarchy"));
        std::fs::read_to_string(dir.join(&d.cgroup_root).join("lim").join(file))
            .unwrap()
            .trim()
            .to_string()
    };
    if v1 {
        assert_eq!(
            read("memory", "memory.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
        assert_eq!(read("pids", "pids.max"), "100");
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "50000");
    } else {
        assert_eq!(read("", "memory.max"), (64u64 << 20).to_string());
        assert_eq!(read("", "pids.max"), "100");
        assert!(read("", "cpu.max").starts_with("50000 "));
    }
    // The pids limit bites inside: 150 background sleeps cannot all start.
    d.ltv(&[
        "exec",
        "lim",
        "--",
        "sh",
        "-c",
        "for i in $(seq 150); do sleep 60 & done 2>/dev/null; echo ok",
    ]);
    let info = d.instance("lim");
    let pids = info["usage"]["pids"].as_u64().unwrap();
    assert!((90..=100).contains(&pids), "pids {pids}: {info}");
    assert_eq!(
        info["usage"]["memory_limit_bytes"].as_u64(),
        Some(64 << 20),
        "{info}"
    );
    d.ok(&["delete", "--force", "lim"]);
    d.assert_no_leftovers("lim");
}

#[test]
fn lifecycle_launch_exec_logs_stop_start_delete() {
    require_root!();
    let d = daemon_with_busybox();
    d.ok(&[
        "launch",
        "busybox",
        "life",
        "--kind",
        "app",
        "--",
        "sh",
        "-c",
        "echo started; trap 'echo bye; exit 0' TERM; while true; do sleep 0.2; done",
    ]);
    let v = d.wait_status("life", "Running", Duration::from_secs(5));
    let pid = v["pid"].as_i64().unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());

    let out = d.ltv(&[
        "exec",
        "life",
        "--",
        "sh",
        "-c",
        "echo data > /root/keep; cat /root/keep; exit 3",
    ]);
    assert_eq!(
        (out.status.code(), stdout(&out).as_str()),
        (Some(3), "data\n")
    );
    let out = d.ltv(&["exec", "life", "--", "does-not-exist"]);
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    assert!(stderr(&out).contains("does-not-exist"), "{}", stderr(&out));

    let list = d.ok(&["list"]);
    assert!(list.contains("life") && list.contains("Running"), "{list}");
    assert!(d.ok(&["info", "life"]).contains("Memory:"));

    d.ok(&["stop", "life", "--timeout", "5"]);
    let v = d.wait_status("life", "Stopped", Duration::from_secs(1));
    assert_eq!(v["exit_code"], 0, "clean stop through the TERM trap: {v}");
    assert!(
        d.ok(&["logs", "life"]).contains("started\n"),
        "logs keep the output"
    );
    assert!(d.ok(&["logs", "life"]).contains("bye"));
    assert!(
        d.cgroup_dirs("life").is_empty(),
        "a stopped instance holds no cgroup"
    );
    assert!(
        d.mounts().iter().all(|m| !m.contains("/life/")),
        "a stopped instance holds no mount"
    );

    d.ok(&["start", "life"]);
    d.wait_status("life", "Running", Duration::from_secs(5));
    let out = d.ltv(&["exec", "life", "--", "cat", "/root/keep"]);
    assert_eq!(stdout(&out), "data\n", "the upper dir survives a restart");

    d.ok(&["restart", "life", "--timeout", "5"]);
    d.wait_status("life", "Running", Duration::from_secs(5));

    let out = d.ltv(&["delete", "life"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("running"), "{}", stderr(&out));
    let (status, _) = d.api_json("DELETE", "/1.0/instances/life", None);
    assert_eq!(status, 409, "deleting a running instance without force");
    d.ok(&["delete", "--force", "life"]);
    d.assert_no_leftovers("life");
}

#[test]
fn stop_kills_after_timeout() {
    require_root!();
    let d = daemon_with_busybox();
    // sleep as PID 1 ignores TERM: the stop must kill it after the timeout.
    d.ok(&[
        "launch", "busybox", "stubborn", "--kind", "app", "--", "sleep", "600",
    ]);
    let t = std::time::Instant::now();
    d.ok(&["stop", "stubborn", "--timeout", "1"]);
    assert!(t.elapsed() >= Duration::from_secs(1));
    let v = d.wait_status("stubborn", "Stopped", Duration::from_secs(1));
    assert_eq!(v["exit_code"], 137, "killed: {v}");
    d.ok(&["delete", "stubborn"]);
    d.assert_no_leftovers("stubborn");
}

#[test]
fn daemon_restart_readopts_running_containers() {
    require_root!();
    let mut d = daemon_with_busybox();
    d.ok(&[
        "launch", "busybox", "keep", "--kind", "app", "--", "sleep", "600",
    ]);
    let pid = d.wait_status("keep", "Running", Duration::from_secs(5))["pid"]
        .as_i64()
        .unwrap();
    d.kill_daemon();
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the container outlives its daemon"
    );
    d.spawn();
    let v = d.instance("keep");
    assert_eq!(
        (v["status"].as_str(), v["pid"].as_i64()),
        (Some("Running"), Some(pid)),
        "{v}"
    );
    assert_eq!(
        stdout(&d.ltv(&["exec", "keep", "--", "hostname"])),
        "keep\n"
    );
    d.ok(&["stop", "keep", "--force"]);
    d.wait_status("keep", "Stopped", Duration::from_secs(5));
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}/stat")).exists() || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.contains(") Z ")
        }
    );
    d.ok(&["delete", "keep"]);
    d.assert_no_leftovers("keep");

    // An instance that ended while the daemon was down is marked Stopped on return.
    d.ok(&[
        "launch", "busybox", "gone", "--kind", "app", "--", "sleep", "600",
    ]);
    let pid = d.wait_status("gone", "Running", Duration::from_secs(5))["pid"]
        .as_i64()
        .unwrap();
    d.stop_daemon();
    // SAFETY: kill on the pid of the container we launched.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    // What a daemon queued for removal but did not get to goes when the next one starts.
    let left = d.state_dir.join("instances/.trash/left.1.0/upper/etc");
    std::fs::create_dir_all(&left).unwrap();
    std::fs::write(left.join("hosts"), "127.0.0.1 left\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    d.spawn();
    d.assert_no_leftovers("left");
    d.wait_status("gone", "Stopped", Duration::from_secs(5));
    assert!(d.cgroup_dirs("gone").is_empty());
    d.ok(&["delete", "gone"]);
    d.assert_no_leftovers("gone");
}

#[test]
fn read_only_rootfs_is_the_image_itself() {
    require_root!();
    let d = daemon_with_busybox();
    let image_hostname = || {
        let images = d.state_dir.join("images");
        let fp = std::fs::read_dir(&images)
            .unwrap()
            .flatten()
            .find(|e| e.path().join("rootfs/etc/hostname").exists())
            .expect("the busybox image")
            .path();
        std::fs::read_to_string(fp.join("rootfs/etc/hostname")).unwrap()
    };
    let before = image_hostname();
    let probe = "touch /x; echo touch=$?; mount -o remount,rw / 2>/dev/null; echo remount=$?; \
                 cat /etc/hostname; grep -c \"$(hostname)\" /etc/hosts; echo changed > /etc/hostname";
    // Unprivileged (an idmapped clone of the image) and privileged (a plain clone).
    for (name, privileged) in [("ro1", false), ("ro2", true)] {
        let mut args = vec!["run", "--rm", "--read-only", "--name", name];
        if privileged {
            args.push("--privileged");
        }
        args.extend(["busybox", "--", "sh", "-c", probe]);
        let out = d.ltv(&args);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(
            stdout(&out),
            format!("touch=1\nremount=1\n{name}\n1\n"),
            "{name}: the root refuses writes and a remount, /etc/hostname and /etc/hosts \
             name the instance; stderr: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("Read-only file system"),
            "{}",
            stderr(&out)
        );
        d.assert_no_leftovers(name);
    }
    assert_eq!(image_hostname(), before, "the shared image is untouched");

    d.ok(&[
        "launch",
        "busybox",
        "ro3",
        "--kind",
        "app",
        "--read-only",
        "--",
        "sleep",
        "600",
    ]);
    d.wait_status("ro3", "Running", Duration::from_secs(5));
    assert!(d.ok(&["info", "ro3"]).contains("Root fs:    read-only"));
    assert_eq!(d.instance("ro3")["config"]["read_only"], true);
    let out = d.ltv(&["exec", "ro3", "--", "sh", "-c", "echo x > /tmp/f"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    d.ok(&["restart", "ro3", "--timeout", "1"]);
    d.wait_status("ro3", "Running", Duration::from_secs(5));
    let out = d.ltv(&["exec", "ro3", "--", "sh", "-c", "touch /root/f || hostname"]);
    assert_eq!(stdout(&out), "ro3\n", "still read-only after a restart");
    d.ok(&["delete", "--force", "ro3"]);
    d.assert_no_leftovers("ro3");

    // A system container's init writes its root filesystem.
    let out = d.ltv(&["launch", "busybox", "ro4", "--read-only"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--read-only is for app containers"),
        "{}",
        stderr(&out)
    );
    let (s, _) = d.api_json(
        "POST",
        "/1.0/instances",
        Some(r#"{"name":"ro4","kind":"system","image":"busybox","config":{"read_only":true}}"#),
    );
    assert_eq!(s, 400);
    d.assert_no_leftovers("ro4");
}

#[test]
fn tmpfs_mounts_are_fresh_and_owned_by_the_containers_root() {
    require_root!();
    let d = daemon_with_busybox();
    let out = d.ltv(&[
        "run",
        "--rm",
        "--name",
        "tf1",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/run:size=4m,mode=755,exec",
        "busybox",
        "--",
        "sh",
        "-c",
        "echo hi > /tmp/f && cat /tmp/f; stat -c '%u %a' /tmp /run; \
         grep -E ' /(tmp|run) ' /proc/mounts | cut -d' ' -f2,4 | cut -d, -f1-5; \
         cp /bin/busybox /tmp/true; /tmp/true 2>/dev/null; echo tmp-exec=$?; \
         cp /bin/busybox /run/true; /run/true; echo run-exec=$?",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let o = stdout(&out);
    assert!(
        o.starts_with("hi\n0 1777\n0 755\n"),
        "written, owned by its root: {o}"
    );
    assert!(o.contains("/tmp rw,nosuid,nodev,noexec,"), "{o}");
    assert!(
        o.contains("/run rw,nosuid,nodev,relatime,size=4096k"),
        "{o}"
    );
    assert!(
        o.ends_with("tmp-exec=126\nrun-exec=0\n"),
        "noexec unless exec: {o}"
    );
    d.assert_no_leftovers("tf1");

    d.ok(&[
        "launch", "busybox", "tf2", "--kind", "app", "--tmpfs", "/scratch", "--", "sleep", "600",
    ]);
    assert!(d.ok(&["info", "tf2"]).contains("Tmpfs:      /scratch"));
    assert_eq!(d.instance("tf2")["config"]["tmpfs"][0], "/scratch");
    d.ok(&["delete", "--force", "tf2"]);
    d.assert_no_leftovers("tf2");

    for bad in [
        r#"["tmp"]"#,
        r#"["/"]"#,
        r#"["/a:size=lots"]"#,
        r#"["/a:suid"]"#,
        r#"["/a","/a"]"#,
    ] {
        let (s, e) = d.api_json(
            "POST",
            "/1.0/instances",
            Some(&format!(
                r#"{{"name":"tf3","kind":"app","image":"busybox","config":{{"tmpfs":{bad}}},"start":true}}"#
            )),
        );
        assert_eq!(s, 400, "tmpfs {bad}: {e}");
        assert!(e["error"].as_str().unwrap().contains("tmpfs"), "{e}");
        d.assert_no_leftovers("tf3");
    }
}

#[test]
fn bad_input_is_rejected_and_leaves_nothing() {
    require_root!();
    let d = daemon_with_busybox();
    let post = |body: &str| d.api_json("POST", "/1.0/instances", Some(body));

    let (s, e) = post(r#"{"name":"a1","kind":"app","image":"no-such-image","start":true}"#);
    assert_eq!(
        (s, e["code"].as_u64()),
        (404, Some(404)),
        "unknown image: {e}"
    );
    assert!(e["error"].as_str().unwrap().contains("no-such-image"));

    for bad in ["Bad", "-x", "a_b", &"a".repeat(64)] {
        let (s, e) = post(&format!(
            r#"{{"name":"{bad}","kind":"app","image":"busybox"}}"#
        ));
        assert_eq!(s, 400, "name {bad:?}: {e}");
    }
    for mem in ["lots", "1MiB", "12XB"] {
        let (s, e) = post(&format!(
            r#"{{"name":"m1","kind":"app","image":"busybox","config":{{"memory":"{mem}"}}}}"#
        ));
        assert_eq!(s, 400, "memory {mem:?}: {e}");
    }
    let (s, _) = post(r#"{"name":"c1","kind":"app","image":"busybox","config":{"cpus":0}}"#);
    assert_eq!(s, 400, "cpus 0");
    let (s, _) = post(r#"{"name":"p1","kind":"app","image":"busybox","config":{"pids":0}}"#);
    assert_eq!(s, 400, "pids 0");
    let (s, e) = post("{not json");
    assert_eq!((s, e["code"].as_u64()), (400, Some(400)), "bad JSON: {e}");

    let (s, _) = post(
        r#"{"name":"dup","kind":"app","image":"busybox","config":{"command":["sleep","600"]},"start":true}"#,
    );
    assert_eq!(s, 201);
    let (s, e) = post(
        r#"{"name":"dup","kind":"app","image":"busybox","config":{"command":["sleep","600"]},"start":true}"#,
    );
    assert_eq!(s, 409, "duplicate: {e}");
    assert_eq!(
        d.instance("dup")["status"],
        "Running",
        "the first one is untouched"
    );

    let out = d.ltv(&[
        "run",
        "--rm",
        "--name",
        "nf",
        "busybox",
        "--",
        "/no/such/cmd",
    ]);
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    assert!(stderr(&out).contains("/no/such/cmd"), "{}", stderr(&out));
    d.assert_no_leftovers("nf");

    let (s, e) = post(
        r#"{"name":"nf2","kind":"app","image":"busybox","config":{"command":["nope"]},"start":true}"#,
    );
    assert_eq!(s, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("nope"));
    assert!(d.cgroup_dirs("nf2").is_empty() && d.mounts().iter().all(|m| !m.contains("/nf2/")));

    for name in ["a1", "m1", "c1", "p1"] {
        d.assert_no_leftovers(name);
    }
    let (s, _) = d.api_json(
        "PUT",
        "/1.0/instances/ghost/state",
        Some(r#"{"action":"start"}"#),
    );
    assert_eq!(s, 404);
    let (s, _) = d.api_json("DELETE", "/1.0/instances/dup", None);
    assert_eq!(s, 409, "running, no force");
    let (s, _) = d.api_json("DELETE", "/1.0/instances/dup?force=true", None);
    assert_eq!(s, 200);
    d.assert_no_leftovers("dup");
}

#[test]
fn state_dir_unprivileged_containers_cannot_reach_is_refused() {
    require_root!();
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = std::process::Command::new(ltv_e2e::ltv_bin())
        .args(["daemon", "--bridge", "none", "--state-dir"])
        .arg(dir.path().join("state"))
        .env("LTV_SOCKET", dir.path().join("ltv.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("chmod o+x"), "{}", stderr(&out));
}

#[test]
fn daemon_without_bridge_gives_loopback_only_by_default() {
    require_root!();
    // On the host's network with `--bridge none`: nothing is attached to it.
    let d = TestDaemon::start_with_host_network();
    d.build_busybox();
    d.ok(&[
        "launch", "busybox", "lo-only", "--kind", "app", "--", "sleep", "60",
    ]);
    let i = d.instance("lo-only");
    assert_eq!(i["config"]["network"], "none", "{i}");
    assert!(i["address"].is_null(), "{i}");
    let links = d.ok(&["exec", "lo-only", "--", "ls", "/sys/class/net"]);
    assert_eq!(
        links.split_whitespace().collect::<Vec<_>>(),
        ["lo"],
        "{links}"
    );
    // Up (IFF_LOOPBACK | IFF_UP), as Docker's `--network none` has it.
    let flags = d.ok(&["exec", "lo-only", "--", "cat", "/sys/class/net/lo/flags"]);
    assert_eq!(flags.trim(), "0x9");
    // Asking for the bridge it does not have is still an error.
    let out = d.ltv(&[
        "launch",
        "busybox",
        "br",
        "--kind",
        "app",
        "--network",
        "bridge",
        "--",
        "sleep",
        "60",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("without a bridge"),
        "{}",
        stderr(&out)
    );
    d.ok(&["delete", "--force", "lo-only"]);
    d.assert_no_leftovers("lo-only");
    d.assert_no_leftovers("br");
}
