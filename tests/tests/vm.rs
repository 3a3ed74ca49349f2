//! microVMs end to end: the real daemon spawns `ltv vmm` per instance, the guest boots the
//! project kernel from a root disk with guest-kernel/init.c as `/init` and `ltv` as its
//! agent. Boots are slow on kvm-pvm hosts (a minute or more), so there are only two, in
//! one test.

use ltv_e2e::{check_chain, require_root, stderr, TestDaemon};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn cached_kernel() -> Option<PathBuf> {
    let cache = std::env::var_os("LTV_CACHE_DIR").unwrap_or_else(|| "/var/cache/ltv".into());
    std::fs::read_dir(PathBuf::from(cache).join("kernel"))
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("vmlinux")))
        .find(|p| p.is_file())
}

fn post(d: &TestDaemon, name: &str, config: &str) -> (u16, serde_json::Value) {
    let body = format!(
        r#"{{"name":"{name}","kind":"vm","image":"busybox","config":{config},"start":true}}"#
    );
    d.api_json("POST", "/1.0/instances", Some(&body))
}

fn assert_nothing_left(d: &TestDaemon, name: &str) {
    let (status, _) = d.api_json("GET", &format!("/1.0/instances/{name}"), None);
    assert_eq!(status, 404, "{name} was recorded");
    assert!(!d.state_dir.join("instances").join(name).exists());
}

#[test]
fn vm_bad_input_is_refused_without_booting() {
    require_root!();
    let d = TestDaemon::start();
    d.build_busybox();
    let (_, info) = d.api_json("GET", "/1.0", None);
    let kinds = info["kinds"].as_array().cloned().unwrap_or_default();
    if !kvm_usable() {
        assert!(!kinds.contains(&"vm".into()), "{info}");
        let (status, err) = post(&d, "novm", "{}");
        assert_eq!(status, 400, "{err}");
        assert!(err["error"].to_string().contains("/dev/kvm"), "{err}");
        eprintln!("skipped the rest: no usable /dev/kvm");
        return;
    }
    assert!(kinds.contains(&"vm".into()), "{info}");
    for (config, needle) in [
        (r#"{"cpus":0}"#, "whole number"),
        (r#"{"cpus":1.5}"#, "whole number"),
        (r#"{"memory":"1TiB"}"#, "available"),
        (r#"{"memory":"8MiB"}"#, "minimum"),
    ] {
        let (status, err) = post(&d, "bad", config);
        assert_eq!(status, 400, "{config}: {err}");
        assert!(err.to_string().contains(needle), "{config}: {err}");
        assert_nothing_left(&d, "bad");
    }
    if info["kvm"] == "pvm" {
        let too_many = std::thread::available_parallelism().unwrap().get() + 1;
        let (status, err) = post(&d, "bad", &format!(r#"{{"cpus":{too_many}}}"#));
        assert_eq!(status, 400, "{err}");
        assert!(
            err.to_string().contains("kvm-pvm"),
            "the reason is given: {err}"
        );
        assert_nothing_left(&d, "bad");
    }
    // The CLI shows the daemon's message.
    let out = d.ltv(&["launch", "busybox", "bad", "--kind", "vm", "--cpus", "0"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("whole number"), "{}", stderr(&out));

    let nok = TestDaemon::start_with_env(&[("LTV_KERNEL", "/nonexistent/vmlinux")]);
    nok.build_busybox();
    let (status, err) = post(&nok, "nokernel", "{}");
    assert_eq!(status, 400, "{err}");
    assert!(err.to_string().contains("no guest kernel"), "{err}");
    assert_nothing_left(&nok, "nokernel");
}

/// The guest agent's transfer size: the whole 100 MiB on hardware KVM; a smaller one where
/// the guest kernel is emulated (kvm-pvm copies about 1 MiB/s through a guest pipe).
fn transfer_bytes(kvm: &str) -> usize {
    if kvm == "hardware" {
        100 << 20
    } else {
        4 << 20
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn md5(data: &[u8]) -> String {
    let mut child = std::process::Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// After the VMM of `name` (pid `pid`) was SIGKILLed: the instance is Stopped with 137, its
/// TAP, sockets and disk lock are gone, and after `delete` nothing is left.
fn assert_killed_vmm_left_nothing(d: &TestDaemon, name: &str, pid: i32) {
    let v = d.wait_status(name, "Stopped", Duration::from_secs(30));
    assert_eq!(v["exit_code"], 137, "{v}");
    assert!(!d.ip(&["link", "show"]).contains("ltvtap"), "TAP removed");
    let dir = d.state_dir.join("instances").join(name);
    assert!(!dir.join("vsock.sock").exists() && !dir.join("vmm.sock").exists());
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("disk.img"))
        .unwrap();
    // SAFETY: flock on a file we just opened.
    let locked = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&disk),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    assert_eq!(locked, 0, "the disk lock went with the VMM");
    drop(disk);
    d.ok(&["delete", name]);
    d.assert_no_leftovers(name);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the VMM is gone"
    );
}

/// Launches a 256 MiB busybox microVM, prints how long it took to a running agent, and
/// returns the instance, asserted Running.
/// A daemon for tests that talk to the guest agent a lot.
fn daemon_for_agent_tests() -> Option<TestDaemon> {
    // PVM hosts under load take a minute or more per boot.
    Some(TestDaemon::start_with_env(&[(
        "LTV_VM_BOOT_TIMEOUT",
        "400",
    )]))
}

/// The whole chain: an app container in a system container in a microVM, one API.
#[test]
fn app_in_system_container_in_a_microvm() {
    require_root!();
    if !kvm_usable() || cached_kernel().is_none() {
        eprintln!("skipped: no usable /dev/kvm, or no guest kernel in the cache");
        return;
    }
    let Some(d) = daemon_for_agent_tests() else {
        return;
    };
    d.build_busybox();
    launch_vm(&d, "vm1");
    // The image goes down with the requests; nothing to do by hand.
    d.ok(&["launch", "busybox", "vm1/sys1"]);
    d.ok(&[
        "launch",
        "busybox",
        "vm1/sys1/app1",
        "--kind",
        "app",
        "--",
        "sleep",
        "1000",
    ]);
    check_chain(
        &d,
        &[
            ("vm1", "vm"),
            ("vm1/sys1", "system"),
            ("vm1/sys1/app1", "app"),
        ],
    );
    let (status, tree) = d.api_json("GET", "/1.0/instances?recursion=tree", None);
    assert_eq!(status, 200, "{tree}");
    assert_eq!(tree[0]["children"][0]["name"], "vm1/sys1", "{tree}");
    assert_eq!(
        tree[0]["children"][0]["children"][0]["name"], "vm1/sys1/app1",
        "{tree}"
    );
    let (status, v) = d.api_json(
        "POST",
        "/1.0/instances",
        Some(r#"{"name":"vm1/vm2","kind":"vm","image":"busybox","config":{},"start":true}"#),
    );
    assert_eq!(status, 400, "no nested KVM in the guest: {v}");
    let out = d.ltv(&["delete", "vm1"]);
    assert!(!out.status.success(), "a running VM with running children");
    d.ok(&["delete", "--force", "vm1"]);
    assert_nothing_left(&d, "vm1");
    assert!(!d.ip(&["link", "show"]).contains("ltvt"), "TAP removed");
}

fn launch_vm(d: &TestDaemon, name: &str) -> serde_json::Value {
    let t = Instant::now();
    d.ok(&[
        "launch", "busybox", name, "--kind", "vm", "--memory", "256MiB",
    ]);
    eprintln!(
        "{name}: launch to agent ready in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let v = d.instance(name);
    assert_eq!(v["status"], "Running", "{v}");
    v
}

/// Two boots: exec, info, vsock both ways, networking with a container, graceful stop,
/// disk persistence across a restart, and a VMM killed in the middle of an exec.
#[test]
fn vm_runs_commands_keeps_its_disk_talks_to_containers_and_stops_cleanly() {
    require_root!();
    if !kvm_usable() {
        eprintln!("skipped: no usable /dev/kvm");
        return;
    }
    if cached_kernel().is_none() {
        eprintln!("skipped: no guest kernel in the cache (run guest-kernel/build.sh)");
        return;
    }
    let Some(d) = daemon_for_agent_tests() else {
        return;
    };
    let (_, host) = d.api_json("GET", "/1.0", None);
    let kvm = host["kvm"].as_str().unwrap().to_string();
    d.build_busybox();

    let v = launch_vm(&d, "vm1");
    let guest_kernel = v["usage"]["guest"]["kernel"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!guest_kernel.is_empty(), "info has the guest's facts: {v}");
    assert!(
        v["usage"]["guest"]["memory_total_bytes"].as_u64().unwrap() > 100 << 20,
        "{v}"
    );

    // exec: the guest's kernel, not the host's; exit codes; a missing command.
    let release = d.ok(&["exec", "vm1", "--", "uname", "-r"]);
    assert_eq!(release.trim(), guest_kernel);
    assert_ne!(
        release.trim(),
        host["kernel"].as_str().unwrap(),
        "a VM has its own kernel"
    );
    assert_eq!(d.ok(&["exec", "vm1", "--", "hostname"]).trim(), "vm1");
    let out = d.ltv(&["exec", "vm1", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    let out = d.ltv(&["exec", "vm1", "--", "/no/such/thing"]);
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    let info = d.ok(&["info", "vm1"]);
    assert!(info.contains(&guest_kernel), "{info}");

    // Host → guest through vsock: exec stdin, checksummed inside.
    let size = transfer_bytes(&kvm);
    let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4093) as u8).collect();
    let mut child = d
        .ltv_cmd(&["exec", "-i", "vm1", "--", "md5sum"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let payload = data.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&payload).unwrap());
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    eprintln!(
        "vm1: {} KiB host -> guest in {:.1} s",
        size >> 10,
        t.elapsed().as_secs_f64()
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&md5(&data)));

    // Flow control: 100 MiB offered to a guest reader that stalls. Credits hold the host
    // back at every hop (CLI, daemon, VMM), so it gets little ahead and nothing grows.
    let vmm = d.instance("vm1")["pid"].as_i64().unwrap() as u32;
    let daemon = d.pid().unwrap();
    let (vmm_rss, daemon_rss) = (rss_kib(vmm), rss_kib(daemon));
    let mut child = d
        .ltv_cmd(&[
            "exec",
            "-i",
            "vm1",
            "--",
            "sh",
            "-c",
            "sleep 25; head -c 1 >/dev/null",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = written.clone();
    let writer = std::thread::spawn(move || {
        let chunk = vec![0x5a_u8; 64 << 10];
        while counter.load(std::sync::atomic::Ordering::Relaxed) < 100 << 20 {
            if stdin.write_all(&chunk).is_err() {
                break; // the guest command ended
            }
            counter.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
        }
    });
    std::thread::sleep(Duration::from_secs(12));
    let ahead = written.load(std::sync::atomic::Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        written.load(std::sync::atomic::Ordering::Relaxed),
        ahead,
        "the writer is held back while the guest does not read"
    );
    eprintln!(
        "vm1: a stalled guest reader let the host get {} KiB ahead; VMM RSS {} -> {} KiB, daemon {} -> {} KiB",
        ahead >> 10,
        vmm_rss,
        rss_kib(vmm),
        daemon_rss,
        rss_kib(daemon)
    );
    assert!(ahead < 16 << 20, "{} KiB ahead", ahead >> 10);
    assert!(
        rss_kib(vmm) < vmm_rss + (16 << 10),
        "the VMM buffers nothing unbounded"
    );
    assert!(
        rss_kib(daemon) < daemon_rss + (16 << 10),
        "the daemon neither"
    );
    assert!(child.wait().unwrap().success());
    writer.join().unwrap();

    // Guest → host: a guest connection to CID 2 port 5000 arrives at `vsock.sock_5000`.
    let listen = d.state_dir.join("instances/vm1/vsock.sock_5000");
    let listener = std::os::unix::net::UnixListener::bind(&listen).unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    let sent = d.ok(&[
        "exec",
        "vm1",
        "--",
        "sh",
        "-c",
        &format!(
            "head -c {size} /dev/urandom > /tmp/blob && md5sum /tmp/blob \
             && /.ltv/ltv vsock-pipe 2 5000 < /tmp/blob"
        ),
    ]);
    let got = receiver.join().unwrap();
    assert_eq!(got.len(), size);
    assert!(
        sent.starts_with(&md5(&got)),
        "guest md5 {sent} vs received {} bytes",
        got.len()
    );

    // A container on the same bridge: ping both ways and TCP.
    d.ok(&[
        "launch", "busybox", "c1", "--kind", "app", "--", "httpd", "-f", "-p", "8080", "-h", "/etc",
    ]);
    let vm_ip = d.instance("vm1")["address"].as_str().unwrap().to_string();
    let c1_ip = d.instance("c1")["address"].as_str().unwrap().to_string();
    assert!(
        d.ip(&["link", "show", "master", "ltvbr0"]).contains("ltvt"),
        "the TAP is on the bridge"
    );
    d.ok(&["exec", "vm1", "--", "ping", "-c", "1", "-W", "10", &c1_ip]);
    d.ok(&["exec", "c1", "--", "ping", "-c", "1", "-W", "10", &vm_ip]);
    let page = d.ok(&[
        "exec",
        "vm1",
        "--",
        "wget",
        "-q",
        "-O",
        "-",
        &format!("http://{c1_ip}:8080/hostname"),
    ]);
    assert_eq!(page.trim(), "c1");
    d.ok(&["delete", "--force", "c1"]);

    // Data on the root disk survives a graceful stop and a new boot.
    d.ok(&[
        "exec",
        "vm1",
        "--",
        "sh",
        "-c",
        "echo kept > /root/persist && sync",
    ]);
    let t = Instant::now();
    d.ok(&["stop", "vm1", "--timeout", "120"]);
    let v = d.instance("vm1");
    eprintln!("vm1: graceful stop in {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(v["status"], "Stopped", "{v}");
    assert_eq!(
        v["exit_code"],
        0,
        "powered off by its init, not killed: {v}\n{}",
        d.ok(&["logs", "vm1"])
    );
    assert!(
        !d.ip(&["link", "show"]).contains("ltvt"),
        "TAP removed at stop"
    );
    let t = Instant::now();
    d.ok(&["start", "vm1"]);
    eprintln!(
        "vm1: restart to agent ready in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        d.ok(&["exec", "vm1", "--", "cat", "/root/persist"]).trim(),
        "kept"
    );

    // The VMM killed while an exec streams: the exec fails, the VM is Stopped, and its
    // TAP, sockets and disk lock are gone.
    let exec = d
        .ltv_cmd(&["exec", "vm1", "--", "sleep", "300"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let pid = d.instance("vm1")["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill on the VMM pid the daemon reported.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let out = exec.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("agent"), "{}", stderr(&out));
    assert_killed_vmm_left_nothing(&d, "vm1", pid);
}

/// What holds on every KVM flavour with one boot and a single agent request (the
/// readiness probe): the root disk boots, the guest's NIC is on the bridge with the address
/// the daemon gave it (a container pings it), and a killed VMM leaves no TAP, socket or
/// disk lock behind.
#[test]
fn vm_boots_on_its_disk_joins_the_bridge_and_cleans_up() {
    require_root!();
    if !kvm_usable() || cached_kernel().is_none() {
        eprintln!("skipped: no usable /dev/kvm or no guest kernel in the cache");
        return;
    }
    let d = TestDaemon::start_with_env(&[("LTV_VM_BOOT_TIMEOUT", "400")]);
    d.build_busybox();
    d.ok(&[
        "launch", "busybox", "c1", "--kind", "app", "--", "sleep", "1000",
    ]);
    let v = launch_vm(&d, "vm1");
    let vm_ip = v["address"].as_str().unwrap().to_string();
    assert!(d.ok(&["list"]).contains(&vm_ip));
    let taps = d.ip(&["link", "show", "master", "ltvbr0"]);
    assert!(taps.contains("ltvtap"), "the TAP is on the bridge: {taps}");
    d.ok(&["exec", "c1", "--", "ping", "-c", "1", "-W", "10", &vm_ip]);
    let dir = d.state_dir.join("instances/vm1");
    assert!(dir.join("disk.img").is_file() && dir.join("vsock.sock").exists());

    let pid = v["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill on the VMM pid the daemon reported.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    assert_killed_vmm_left_nothing(&d, "vm1", pid);
    d.ok(&["delete", "--force", "c1"]);
}

/// A guest whose agent does not answer in time: launch fails with the console's tail, the
/// VMM and TAP are gone, and the instance is left Stopped (as `docker run` and
/// `incus launch` leave theirs) until deleted.
#[test]
fn vm_without_an_agent_in_time_fails_and_leaves_nothing() {
    require_root!();
    if !kvm_usable() || cached_kernel().is_none() {
        eprintln!("skipped: no usable /dev/kvm or no guest kernel in the cache");
        return;
    }
    let d = TestDaemon::start_with_env(&[("LTV_VM_BOOT_TIMEOUT", "2")]);
    d.build_busybox();
    let (status, err) = post(&d, "slow", "{}");
    assert_eq!(status, 500, "{err}");
    let msg = err["error"].as_str().unwrap();
    assert!(
        msg.contains("agent did not answer") && msg.contains("console"),
        "{msg}"
    );
    let v = d.instance("slow");
    assert_eq!(v["status"], "Stopped", "{v}");
    assert!(v["pid"].is_null(), "{v}");
    assert!(!d.ip(&["link", "show"]).contains("ltvt"), "TAP removed");
    let vmm_config = d.state_dir.join("instances/slow/vmm.json");
    let left = ltv_e2e::pids_with_cmdline(&vmm_config.to_string_lossy());
    assert!(left.is_empty(), "the VMM is gone: {left:?}");
    d.ok(&["delete", "slow"]);
    assert_nothing_left(&d, "slow");
}
