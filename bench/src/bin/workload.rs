//! Static workload copied into instances (std only, so `rustc` alone can build it with
//! `+crt-static` for a busybox rootfs). Prints elapsed nanoseconds, or a JSON report.
//! Usage: w getppid N | forkexec N PATH | compute N | fileio MIB PATH | isolation

use std::io::{Read, Write};
use std::time::Instant;

extern "C" {
    fn syscall(num: i64, ...) -> i64;
    fn __errno_location() -> *mut i32;
}

// x86-64 system call numbers.
const SYS_GETPPID: i64 = 110;
const SYS_MOUNT: i64 = 165;
const SYS_REBOOT: i64 = 169;
const SYS_INIT_MODULE: i64 = 175;
const SYS_KEXEC_LOAD: i64 = 246;
const SYS_UNSHARE: i64 = 272;
const SYS_PERF_EVENT_OPEN: i64 = 298;
const SYS_BPF: i64 = 321;

fn errno() -> i32 {
    // SAFETY: glibc's thread-local errno.
    unsafe { *__errno_location() }
}

fn arg(i: usize) -> String {
    std::env::args().nth(i).unwrap_or_default()
}

fn num(i: usize, default: u64) -> u64 {
    arg(i).parse().unwrap_or(default)
}

fn main() {
    let t = Instant::now();
    match arg(1).as_str() {
        "getppid" => {
            let mut acc = 0i64;
            for _ in 0..num(2, 1_000_000) {
                // SAFETY: getppid takes no arguments.
                acc = acc.wrapping_add(unsafe { syscall(SYS_GETPPID) });
            }
            std::hint::black_box(acc);
        }
        "forkexec" => {
            let path = arg(3);
            for _ in 0..num(2, 500) {
                let st = std::process::Command::new(&path).status().expect("spawn");
                assert!(st.success());
            }
        }
        "compute" => {
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            for _ in 0..num(2, 100_000_000) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
            }
            std::hint::black_box(x);
        }
        "fileio" => {
            let path = arg(3);
            let buf = vec![0x5au8; 1 << 20];
            let mut f = std::fs::File::create(&path).expect("create");
            for _ in 0..num(2, 64) {
                f.write_all(&buf).expect("write");
            }
            f.sync_all().expect("fsync");
            drop(f);
            let mut r = std::fs::File::open(&path).expect("open");
            let mut rb = vec![0u8; 1 << 20];
            while r.read(&mut rb).expect("read") > 0 {}
            std::fs::remove_file(&path).ok();
        }
        "isolation" => {
            println!("{}", isolation());
            return;
        }
        _ => {
            eprintln!(
                "usage: w getppid N | forkexec N PATH | compute N | fileio MIB PATH | isolation"
            );
            std::process::exit(2);
        }
    }
    println!("{}", t.elapsed().as_nanos());
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn field(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace(|c: char| c.is_control(), " ")
}

/// Outcome of a probe call whose arguments are invalid on purpose: a permitted call
/// fails with EINVAL/EFAULT/ENOENT, a blocked one with EPERM/EACCES/ENOSYS.
fn probe(name: &str, r: i64) -> String {
    let e = if r == -1 { errno() } else { 0 };
    let verdict = match e {
        0 => "allowed",
        1 | 13 => "blocked",
        38 => "unavailable",
        _ => "allowed",
    };
    let ename = match e {
        0 => "ok",
        1 => "EPERM",
        2 => "ENOENT",
        13 => "EACCES",
        14 => "EFAULT",
        22 => "EINVAL",
        38 => "ENOSYS",
        _ => "other",
    };
    format!("\"{name}\":\"{verdict} ({ename})\"")
}

fn isolation() -> String {
    let mut ns = Vec::new();
    for n in ["cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts"] {
        let l = std::fs::read_link(format!("/proc/self/ns/{n}"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        ns.push(format!("\"{n}\":\"{}\"", esc(&l)));
    }
    let status = read("/proc/self/status");
    let meminfo = read("/proc/meminfo");
    let cpus = read("/proc/cpuinfo")
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mut probes = Vec::new();
    // SAFETY: each call has deliberately invalid arguments (see `probe`); the only
    // one that can succeed, unshare(CLONE_NEWNS), affects this short-lived process only.
    unsafe {
        probes.push(probe("unshare", syscall(SYS_UNSHARE, 0x0002_0000i64)));
        probes.push(probe(
            "mount",
            syscall(
                SYS_MOUNT,
                c"none".as_ptr(),
                c"/nonexistent-ltv-bench".as_ptr(),
                c"tmpfs".as_ptr(),
                0i64,
                0i64,
            ),
        ));
        probes.push(probe("reboot", syscall(SYS_REBOOT, 0i64, 0i64, 0i64, 0i64)));
        probes.push(probe(
            "kexec_load",
            syscall(SYS_KEXEC_LOAD, 0i64, 0i64, 0i64, 0x100i64),
        ));
        probes.push(probe(
            "init_module",
            syscall(SYS_INIT_MODULE, 0i64, 0i64, c"".as_ptr()),
        ));
        probes.push(probe("bpf", syscall(SYS_BPF, 0i64, 0i64, 0i64)));
        probes.push(probe(
            "perf_event_open",
            syscall(SYS_PERF_EVENT_OPEN, 0i64, 0i64, -1i64, -1i64, 0i64),
        ));
    }
    format!(
        "{{\"kernel\":\"{}\",\"boot_id\":\"{}\",\"hostname\":\"{}\",\"ns\":{{{}}},\"uid\":\"{}\",\"seccomp\":\"{}\",\"cap_eff\":\"{}\",\"no_new_privs\":\"{}\",\"mem_total_kib\":\"{}\",\"cpus\":{},\"syscalls\":{{{}}}}}",
        esc(read("/proc/sys/kernel/osrelease").trim()),
        esc(read("/proc/sys/kernel/random/boot_id").trim()),
        esc(read("/proc/sys/kernel/hostname").trim()),
        ns.join(","),
        esc(&field(&status, "Uid:")),
        esc(&field(&status, "Seccomp:")),
        esc(&field(&status, "CapEff:")),
        esc(&field(&status, "NoNewPrivs:")),
        esc(field(&meminfo, "MemTotal:").trim_end_matches(" kB")),
        cpus,
        probes.join(",")
    )
}
