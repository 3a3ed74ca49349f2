//! End-to-end tests of the `ltv-vmm` binary: config errors, and a real boot of the project's
//! guest kernel (skipped with a printed reason when the kernel or KVM is not available).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ltv-vmm");
/// A boot takes 10-40 s on the PVM development host; leave plenty of room.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// Scratch space under the target dir: on a shared host other jobs may clean /tmp mid-boot.
fn scratch_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn write_config(dir: &Path, body: serde_json::Value) -> PathBuf {
    let p = dir.join("vm.json");
    std::fs::write(&p, body.to_string()).unwrap();
    p
}

fn run_to_end(cfg: &Path) -> (i32, String) {
    let out = Command::new(BIN).arg("--config").arg(cfg).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn corrupt_kernel_is_bad_config() {
    let dir = scratch_dir();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, vec![0x5au8; 8192]).unwrap();
    let cfg = write_config(
        dir.path(),
        serde_json::json!({"kernel": kernel, "memory_mib": 64, "vcpus": 1,
                           "console_log": dir.path().join("console.log")}),
    );
    let (code, err) = run_to_end(&cfg);
    assert_eq!(code, 2, "stderr: {err}");
    assert!(
        err.contains("neither an ELF vmlinux nor a bzImage"),
        "stderr: {err}"
    );
}

#[test]
fn vcpu_count_out_of_range_is_bad_config() {
    let dir = scratch_dir();
    let kernel = dir.path().join("vmlinux");
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[18] = 62;
    std::fs::write(&kernel, elf).unwrap();
    for n in [0, 33] {
        let cfg = write_config(
            dir.path(),
            serde_json::json!({"kernel": kernel, "memory_mib": 64, "vcpus": n,
                               "console_log": dir.path().join("console.log")}),
        );
        let (code, err) = run_to_end(&cfg);
        assert_eq!(code, 2, "vcpus={n} stderr: {err}");
        assert!(
            err.contains("vcpus must be between 1 and 32"),
            "stderr: {err}"
        );
    }
}

#[test]
fn malformed_json_and_missing_file_are_bad_config() {
    let dir = scratch_dir();
    let p = dir.path().join("vm.json");
    std::fs::write(&p, "{not json").unwrap();
    assert_eq!(run_to_end(&p).0, 2);
    assert_eq!(run_to_end(&dir.path().join("missing.json")).0, 2);
}

/// Newest guest kernel built by guest-kernel/build.sh, if any.
fn guest_kernel() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LTV_TEST_VMLINUX") {
        return Some(PathBuf::from(p));
    }
    let cache = std::env::var("LTV_CACHE_DIR").unwrap_or_else(|_| "/var/cache/ltv".into());
    let mut found: Vec<(std::time::SystemTime, PathBuf)> =
        std::fs::read_dir(Path::new(&cache).join("kernel"))
            .ok()?
            .flatten()
            .map(|e| e.path().join("vmlinux"))
            .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
            .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

/// Builds the initramfs with guest-kernel/initramfs.sh into `dir`.
fn guest_initramfs(dir: &Path) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("LTV_TEST_INITRAMFS") {
        return Ok(PathBuf::from(p));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-kernel/initramfs.sh");
    if !script.exists() {
        return Err(format!("{} does not exist yet", script.display()));
    }
    let out = dir.join("initramfs.cpio");
    let status = Command::new("bash")
        .arg(&script)
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .map_err(|e| e.to_string())?;
    if status.success() && out.is_file() {
        Ok(out)
    } else {
        Err(format!("{} failed ({status})", script.display()))
    }
}

fn request(sock: &Path, action: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(sock).unwrap();
    writeln!(s, "{{\"action\":\"{action}\"}}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

#[test]
fn boots_guest_kernel_to_ready_and_powers_off() {
    if !Path::new("/dev/kvm").exists() {
        println!("SKIP: no /dev/kvm on this host");
        return;
    }
    let Some(kernel) = guest_kernel().filter(|p| p.is_file()) else {
        println!(
            "SKIP: no guest kernel in /var/cache/ltv/kernel/*/vmlinux (run guest-kernel/build.sh)"
        );
        return;
    };
    let dir = scratch_dir();
    let initrd = match guest_initramfs(dir.path()) {
        Ok(p) => p,
        Err(why) => {
            println!("SKIP: no initramfs: {why}");
            return;
        }
    };
    let console = dir.path().join("console.log");
    let sock = dir.path().join("ctl.sock");
    let cfg = write_config(
        dir.path(),
        serde_json::json!({"kernel": kernel, "initrd": initrd, "memory_mib": 128, "vcpus": 1,
                           "cmdline": "console=ttyS0 quiet ltv.init=poweroff",
                           "console_log": console, "control_socket": sock}),
    );
    let start = Instant::now();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Control socket: status, then a pause/resume cycle while the guest boots.
    while !sock.exists() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = request(&sock, "status");
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["vcpus"], 1);
    assert_eq!(st["memory_mib"], 128);
    let p = request(&sock, "pause");
    assert_eq!(p["state"], "paused", "{p}");
    assert_eq!(request(&sock, "status")["state"], "paused");
    // A parked vCPU burns no CPU: its thread's utime+stime stays put (1 tick of slack).
    let cpu_paused = vcpu_cpu_ticks(child.id()).expect("vCPU thread ltv-vcpu0");
    std::thread::sleep(Duration::from_millis(700));
    let cpu_after = vcpu_cpu_ticks(child.id()).unwrap();
    assert!(
        cpu_after - cpu_paused <= 1,
        "vCPU ran while paused: {cpu_paused} -> {cpu_after} ticks"
    );
    assert_eq!(request(&sock, "resume")["state"], "running");

    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if start.elapsed() > BOOT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "guest did not stop within {BOOT_TIMEOUT:?}; console:\n{}",
                std::fs::read_to_string(&console).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    println!("boot + poweroff took {:?}", start.elapsed());
    assert!(
        log.contains("LTV-READY"),
        "no LTV-READY; stderr:\n{err}\nconsole:\n{log}"
    );
    assert_eq!(
        code,
        Some(0),
        "stderr:\n{err}\nconsole tail:\n{}",
        tail(&log)
    );
    assert!(!sock.exists(), "control socket left behind");
}

/// utime+stime (clock ticks) of thread `ltv-vcpu0` in process `pid`.
fn vcpu_cpu_ticks(pid: u32) -> Option<u64> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == "ltv-vcpu0" {
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            // Fields after the ")" that closes comm: state is field 3, utime 14, stime 15.
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            return Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?);
        }
    }
    None
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Env var that turns on the slow boots (2 vCPUs, Linux boot protocol): each is 1-3 minutes on PVM.
const SLOW_ENV: &str = "LTV_TEST_SLOW_BOOTS";

/// Boots kernel + initramfs with `extra` config fields; returns (exit code, stderr, console).
fn boot_with(extra: serde_json::Value) -> Option<(Option<i32>, String, String)> {
    if std::env::var_os(SLOW_ENV).is_none() {
        println!("SKIP: set {SLOW_ENV}=1 for this boot (slow on kvm-pvm)");
        return None;
    }
    let Some(kernel) = guest_kernel().filter(|p| p.is_file()) else {
        println!("SKIP: no guest kernel in /var/cache/ltv/kernel/*/vmlinux");
        return None;
    };
    let dir = scratch_dir();
    let initrd = match guest_initramfs(dir.path()) {
        Ok(p) => p,
        Err(why) => {
            println!("SKIP: no initramfs: {why}");
            return None;
        }
    };
    let console = dir.path().join("console.log");
    let mut cfg = serde_json::json!({"kernel": kernel, "initrd": initrd, "memory_mib": 128,
        "vcpus": 1, "cmdline": "console=ttyS0 ltv.init=poweroff", "console_log": console});
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    let cfg = write_config(dir.path(), cfg);
    let out = Command::new("timeout")
        .arg("400")
        .arg(BIN)
        .arg("--config")
        .arg(&cfg)
        .env("LTV_PVM_ALLOW_SMP", "1")
        .output()
        .unwrap();
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    Some((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        log,
    ))
}

#[test]
fn boots_guest_kernel_with_two_vcpus() {
    let Some((code, err, log)) = boot_with(serde_json::json!({"vcpus": 2})) else {
        return;
    };
    assert!(log.contains("Brought up 1 node, 2 CPUs"), "console:\n{log}");
    assert!(log.contains("LTV-READY"), "console:\n{log}");
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn boots_guest_kernel_with_linux_boot_protocol() {
    let Some((code, err, log)) = boot_with(serde_json::json!({"boot_protocol": "linux"})) else {
        return;
    };
    assert!(err.contains("Linux 64-bit boot"), "{err}");
    assert!(log.contains("LTV-READY"), "console:\n{log}");
    assert_eq!(code, Some(0), "{err}");
}
