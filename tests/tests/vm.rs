//! microVMs end to end: the real daemon spawns `ltv vmm` per instance, the guest boots the
//! project kernel with `ltv` as `/init`. Boots are slow on kvm-pvm hosts (10-90 s), so there
//! are only two, in one test.

use ltv_e2e::{require_root, stderr, TestDaemon};
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

#[test]
fn vm_boots_to_running_then_is_killed_and_powers_off() {
    require_root!();
    if !kvm_usable() {
        eprintln!("skipped: no usable /dev/kvm");
        return;
    }
    if cached_kernel().is_none() {
        eprintln!("skipped: no guest kernel in the cache (run guest-kernel/build.sh)");
        return;
    }
    // PVM hosts under load take a minute or more per boot.
    let d = TestDaemon::start_with_env(&[("LTV_VM_BOOT_TIMEOUT", "400")]);
    d.build_busybox();

    let t = Instant::now();
    d.ok(&[
        "launch", "busybox", "vm1", "--kind", "vm", "--memory", "128MiB",
    ]);
    eprintln!(
        "vm1: launch to Running in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let v = d.instance("vm1");
    assert_eq!(v["status"], "Running", "{v}");
    assert!(d.ok(&["logs", "vm1"]).contains("LTV-READY"));
    assert!(v["usage"]["memory_bytes"].as_u64().unwrap_or(0) > 0, "{v}");
    let out = d.ltv(&["exec", "vm1", "--", "true"]);
    assert!(stderr(&out).contains("guest agent"), "{}", stderr(&out));
    let pid = v["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill on the VMM pid the daemon reported.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let v = d.wait_status("vm1", "Stopped", Duration::from_secs(30));
    assert_eq!(v["exit_code"], 137, "{v}");
    d.ok(&["delete", "vm1"]);
    d.assert_no_leftovers("vm1");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the VMM is gone"
    );

    // The guest ends itself: Stopped with exit code 0, no one asked.
    let t = Instant::now();
    d.ok(&[
        "launch",
        "busybox",
        "vm2",
        "--kind",
        "vm",
        "--memory",
        "128MiB",
        "-e",
        "LTV_INIT=poweroff",
    ]);
    eprintln!(
        "vm2: launch to Running in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let v = d.wait_status("vm2", "Stopped", Duration::from_secs(120));
    assert_eq!(v["exit_code"], 0, "{v}\n{}", d.ok(&["logs", "vm2"]));
    d.ok(&["delete", "vm2"]);
    d.assert_no_leftovers("vm2");
}
