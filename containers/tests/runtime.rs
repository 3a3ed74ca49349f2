//! Root-only end-to-end tests: real containers on a busybox rootfs.
//! `harness = false`: this binary is also the re-executed container init helper.

use ltv_containers::cgroups::{self, Layout};
use ltv_containers::process::{self, Error, Started, Stdio, INIT_ARG};
use ltv_containers::security;
use ltv_containers::spec::*;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(INIT_ARG) {
        process::init_main();
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("runtime tests: skipped (need root)");
        return;
    }
    if !Path::new("/bin/busybox").exists() {
        eprintln!("runtime tests: skipped (no /bin/busybox)");
        return;
    }
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-')).cloned();
    type Test = (&'static str, fn(&Env));
    let tests: &[Test] = &[
        (
            "container_basics_exec_destroy",
            container_basics_exec_destroy,
        ),
        ("missing_command_cleans_up", missing_command_cleans_up),
        ("user_namespace", user_namespace),
        ("run_symlink_is_kept", run_symlink_is_kept),
        ("volatile_upper", volatile_upper),
        ("readonly_rootfs", readonly_rootfs),
        (
            "user_namespace_on_attached_layers",
            user_namespace_on_attached_layers,
        ),
        ("nesting_profile", nesting_profile),
        ("tty", tty),
        ("cgroup_v2_on_real_mount", cgroup_v2_on_real_mount),
        (
            "pool_spare_becomes_the_container",
            pool_spare_becomes_the_container,
        ),
        ("timing", timing),
        ("concurrent_from_threads", concurrent_from_threads),
        (
            "non_root_user_and_tight_memory",
            non_root_user_and_tight_memory,
        ),
        ("fork_server", fork_server),
        // Last: it moves this process into a private mount namespace.
        ("pure_v2_in_private_mount_ns", pure_v2_in_private_mount_ns),
    ];
    let env = Env::new();
    let mut failed = 0;
    for (name, f) in tests {
        if filter.as_deref().is_some_and(|x| !name.contains(x)) {
            continue;
        }
        eprintln!("test {name} ...");
        let r = std::panic::catch_unwind(|| f(&env));
        match r {
            Ok(()) => eprintln!("test {name} ... ok"),
            Err(_) => {
                eprintln!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    env.cleanup();
    drop(env);
    if failed > 0 {
        std::process::exit(1);
    }
}

struct Env {
    dir: tempfile::TempDir,
    lower: PathBuf,
    cg_parent: String,
    specs: std::sync::Mutex<Vec<ContainerSpec>>,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("ltv-rt-")
            .tempdir()
            .unwrap();
        // A user-namespaced container must be able to walk down to its rootfs.
        chmod(dir.path(), 0o755);
        let lower = dir.path().join("lower");
        let bin = lower.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        for d in ["etc", "tmp", "proc", "sys", "dev", "root"] {
            std::fs::create_dir_all(lower.join(d)).unwrap();
        }
        chmod(&lower.join("tmp"), 0o1777);
        std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
        for a in [
            "sh", "true", "echo", "cat", "hostname", "id", "ls", "sleep", "grep", "head", "test",
            "mknod", "cut", "tail", "tr", "touch", "pwd", "wc", "unshare", "mount", "stat",
        ] {
            std::os::unix::fs::symlink("busybox", bin.join(a)).unwrap();
        }
        std::fs::write(bin.join("notexec"), "#!/bin/sh\n").unwrap();
        let cg_parent = format!("ltv-test/{}-{}", std::process::id(), nanos());
        Env {
            dir,
            lower,
            cg_parent,
            specs: Default::default(),
        }
    }

    fn spec(&self, name: &str, args: &[&str]) -> ContainerSpec {
        let c = self.dir.path().join(name);
        let s = ContainerSpec {
            name: name.into(),
            hostname: format!("host-{name}"),
            rootfs: RootfsSpec {
                lowerdirs: vec![self.lower.clone()],
                upperdir: c.join("upper"),
                workdir: c.join("work"),
                mountpoint: c.join("rootfs"),
                volatile: false,
                readonly: false,
            },
            process: ProcessSpec {
                args: args.iter().map(|s| s.to_string()).collect(),
                env: vec!["PATH=/bin".into(), "HOME=/root".into()],
                cwd: "/".into(),
                uid: 0,
                gid: 0,
                additional_gids: vec![],
                tty: false,
            },
            limits: Limits {
                memory_bytes: Some(64 << 20),
                cpus: Some(0.5),
                pids: Some(100),
            },
            cgroup: format!("{}/{name}", self.cg_parent),
            network: NetworkMode::Loopback,
            idmap: None,
            nesting: false,
            init_may_reboot: false,
            run_tmpfs: false,
            binds: vec![],
            tmpfs: vec![],
        };
        self.specs.lock().unwrap().push(s.clone());
        s
    }

    fn cleanup(&self) {
        // Whatever a failed test left behind.
        for s in self.specs.lock().unwrap().iter() {
            if let Err(e) = process::destroy(s) {
                eprintln!("cleanup {}: {e}", s.name);
            }
        }
        // Our per-run parent groups; the shared `ltv-test` only if empty.
        for root in cgroup_roots() {
            let _ = std::fs::remove_dir(root.join(&self.cg_parent));
            let _ = std::fs::remove_dir(root.join("ltv-test"));
        }
        let m = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !m.contains(self.dir.path().to_str().unwrap()),
            "mounts left under the test dir"
        );
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn cgroup_roots() -> Vec<PathBuf> {
    let m = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut v = Vec::new();
    for l in m.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        let Some(dash) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f[dash + 1].starts_with("cgroup") {
            v.push(PathBuf::from(f[4]));
        }
    }
    v
}

/// A cgroup directory of `spec` exists somewhere.
fn cgroup_dirs(spec: &ContainerSpec) -> Vec<PathBuf> {
    cgroup_roots()
        .into_iter()
        .map(|r| r.join(&spec.cgroup))
        .filter(|p| p.exists())
        .collect()
}

/// stdin from /dev/null, stdout+stderr into one pipe; returns the read end.
fn stdio() -> (Stdio, OwnedFd) {
    let (r, w) = nix::unistd::pipe().unwrap();
    let null: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    let w2 = w.try_clone().unwrap();
    (
        Stdio {
            stdin: null,
            stdout: w,
            stderr: w2,
        },
        r,
    )
}

fn read_all(fd: OwnedFd) -> String {
    let mut s = String::new();
    std::fs::File::from(fd).read_to_string(&mut s).unwrap();
    s
}

/// Reads until a line equal to `marker`.
fn read_until(f: &mut std::fs::File, marker: &str) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = f.read(&mut b).unwrap();
        assert!(
            n == 1,
            "EOF before {marker:?}: {}",
            String::from_utf8_lossy(&out)
        );
        out.push(b[0]);
        if out.ends_with(format!("{marker}\n").as_bytes()) {
            return String::from_utf8(out).unwrap();
        }
    }
}

fn wait(pid: i32) -> i32 {
    let mut st = 0;
    let r = unsafe { libc::waitpid(pid, &mut st, 0) };
    assert_eq!(r, pid);
    if libc::WIFEXITED(st) {
        libc::WEXITSTATUS(st)
    } else {
        128 + libc::WTERMSIG(st)
    }
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key:?} in output:\n{out}"))
        .trim()
}

fn assert_gone(spec: &ContainerSpec) {
    let m = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mp = spec.rootfs.mountpoint.to_str().unwrap();
    assert!(!m.contains(mp), "mount left at {mp}:\n{m}");
    assert_eq!(cgroup_dirs(spec), Vec::<PathBuf>::new(), "cgroup dirs left");
}

const REPORT: &str = "echo hostname=$(hostname); echo pid=$$; \
    read s1 rest < /proc/self/stat; echo stat1=$s1; \
    echo ifaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ,); \
    echo loflags=$(cat /sys/class/net/lo/flags); \
    grep -E '^(CapEff|CapBnd|CapPrm|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status; \
    echo dev=$(ls /dev | tr '\\n' ,); echo id=$(id); echo cwd=$(pwd); \
    echo sysro=$(touch /sys/x 2>&1 | grep -c Read-only); \
    mknod /tmp/blk b 8 0 && head -c1 /tmp/blk >/dev/null 2>&1; echo blk=$?; \
    echo cgmem=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max 2>/dev/null); \
    echo cgro=$(touch /sys/fs/cgroup/x 2>&1 | grep -c Read-only); \
    echo masked=$(cat /proc/interrupts 2>/dev/null | wc -c); \
    unshare -U true 2>/dev/null; echo unshare=$?; \
    mount -t tmpfs none /tmp 2>/dev/null; echo mount=$?; \
    echo procsysro=$(grep -c ' /proc/sys ro,' /proc/self/mountinfo); \
    echo END";

fn container_basics_exec_destroy(env: &Env) {
    let spec = env.spec(
        "basic",
        &["sh", "-c", &format!("{REPORT}; exec sleep 1000")],
    );
    let (io, r) = stdio();
    let Started {
        pid, start_time, ..
    } = process::start(&spec, io, None).expect("start");
    assert_eq!(process::proc_start_time(pid), Some(start_time));
    let mut f = std::fs::File::from(r);
    let out = read_until(&mut f, "END");
    eprint!("{out}");
    assert_eq!(field(&out, "hostname="), "host-basic");
    assert_eq!(field(&out, "pid="), "1");
    assert_eq!(field(&out, "ifaces="), "lo,");
    // IFF_LOOPBACK | IFF_UP
    assert_eq!(field(&out, "loflags="), "0x9");
    let cap_eff = u64::from_str_radix(field(&out, "CapEff:"), 16).unwrap();
    assert_eq!(cap_eff, security::default_caps_mask());
    assert_eq!(
        u64::from_str_radix(field(&out, "CapBnd:"), 16).unwrap(),
        security::default_caps_mask()
    );
    assert_eq!(field(&out, "CapAmb:"), "0000000000000000");
    assert_eq!(field(&out, "NoNewPrivs:"), "1");
    assert_eq!(field(&out, "Seccomp:"), "2");
    let dev = field(&out, "dev=");
    for d in [
        "null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "fd",
    ] {
        assert!(dev.split(',').any(|x| x == d), "/dev lacks {d}: {dev}");
    }
    assert!(
        field(&out, "id=").starts_with("uid=0(root) gid=0(root)")
            || field(&out, "id=").starts_with("uid=0 gid=0")
    );
    assert_eq!(field(&out, "sysro="), "1");
    assert_eq!(field(&out, "stat1="), "1");
    assert_eq!(field(&out, "procsysro="), "1");
    assert_eq!(field(&out, "cgmem="), "67108864");
    assert_eq!(field(&out, "cgro="), "1");
    if Path::new("/proc/interrupts").exists() {
        assert_eq!(field(&out, "masked="), "0");
    }
    // Refused by seccomp (unshare) or by the dropped CAP_SYS_ADMIN (mount).
    assert_ne!(field(&out, "unshare="), "0");
    assert_ne!(field(&out, "mount="), "0");
    // mknod is allowed (Docker's set) but the devices cgroup refuses a disk.
    if Layout::detect() != Layout::V2 {
        assert_ne!(field(&out, "blk="), "0");
    }

    // Limits were written.
    match Layout::detect() {
        Layout::V2 => {
            let d = Path::new("/sys/fs/cgroup").join(&spec.cgroup);
            assert_eq!(
                std::fs::read_to_string(d.join("memory.max"))
                    .unwrap()
                    .trim(),
                "67108864"
            );
        }
        _ => {
            let d = Path::new("/sys/fs/cgroup/memory").join(&spec.cgroup);
            let v = std::fs::read_to_string(d.join("memory.limit_in_bytes")).unwrap();
            assert_eq!(v.trim(), "67108864");
            let q = Path::new("/sys/fs/cgroup/cpu")
                .join(&spec.cgroup)
                .join("cpu.cfs_quota_us");
            assert_eq!(std::fs::read_to_string(q).unwrap().trim(), "50000");
        }
    }
    let cg = cgroups::manager(&spec.cgroup);
    assert!(cg.processes().unwrap().contains(&pid));
    // A second start on the same cgroup must not touch the running container.
    let (io, _r) = stdio();
    match process::start(&spec, io, None) {
        Err(Error::Setup { stage, source }) => {
            assert_eq!(stage, "create cgroup");
            assert_eq!(source.kind(), std::io::ErrorKind::AlreadyExists);
        }
        other => panic!("expected a busy cgroup error, got {other:?}"),
    }
    assert!(cg.processes().unwrap().contains(&pid));
    let st = cg.stats().unwrap();
    assert!(st.pids >= 1 && st.memory_limit == Some(64 << 20), "{st:?}");

    // exec: exit codes, namespaces, stdout.
    let p = |args: &[&str]| ProcessSpec {
        args: args.iter().map(|s| s.to_string()).collect(),
        ..spec.process.clone()
    };
    let (io, r) = stdio();
    let e = process::exec(&spec, pid, &p(&["sh", "-c", "exit 7"]), io, None).expect("exec");
    drop(r);
    assert_eq!(wait(e.pid), 7);
    // The rest through helpers started ahead of time, where there are any (cgroup v1).
    let spares = process::ExecSpares::new(2);
    if let Some(s) = &spares {
        s.refill(usize::MAX);
    }
    let (io, r) = stdio();
    let e = process::exec(
        &spec,
        pid,
        &p(&["sh", "-c", "hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo; grep -E '^(CapEff|Seccomp)' /proc/self/status; grep -E '^[0-9]+:(memory)?:' /proc/self/cgroup"]),
        io,
        spares.as_ref(),
    )
    .expect("exec");
    assert_eq!(wait(e.pid), 0);
    let out = read_all(r);
    eprint!("{out}");
    assert!(out.starts_with("host-basic\nsleep 1000"), "{out}");
    // In the container's cgroup: the root of its cgroup namespace.
    let memory_cgroup = out.lines().last().unwrap();
    assert!(memory_cgroup.ends_with(":/"), "{out}");
    assert_eq!(
        u64::from_str_radix(field(&out, "CapEff:"), 16).unwrap(),
        cap_eff
    );
    assert_eq!(field(&out, "Seccomp:"), "2");
    // A killed exec'd process: 128+9.
    let (io, r) = stdio();
    let e = process::exec(
        &spec,
        pid,
        &p(&["sh", "-c", "kill -9 $$"]),
        io,
        spares.as_ref(),
    )
    .expect("exec");
    drop(r);
    assert_eq!(wait(e.pid), 137);
    // Missing command.
    let (io, _r) = stdio();
    match process::exec(&spec, pid, &p(&["nope"]), io, spares.as_ref()) {
        Err(Error::CommandNotFound(m)) => {
            assert_eq!(m, "exec: \"nope\": executable file not found in $PATH")
        }
        other => panic!("expected CommandNotFound, got {other:?}"),
    }

    process::destroy(&spec).expect("destroy");
    assert_eq!(wait(pid), 137);
    assert_gone(&spec);
    process::destroy(&spec).expect("destroy is idempotent");
}

fn missing_command_cleans_up(env: &Env) {
    let spec = env.spec("missing", &["does-not-exist"]);
    let (io, _r) = stdio();
    match process::start(&spec, io, None) {
        Err(Error::CommandNotFound(m)) => {
            assert_eq!(
                m,
                "exec: \"does-not-exist\": executable file not found in $PATH"
            )
        }
        other => panic!("expected CommandNotFound, got {other:?}"),
    }
    assert_gone(&spec);
    let spec = env.spec("noexec", &["/bin/notexec"]);
    let (io, _r) = stdio();
    assert!(matches!(
        process::start(&spec, io, None),
        Err(Error::CommandNotExecutable(_))
    ));
    assert_gone(&spec);
    // A broken spec fails before anything is created.
    let mut spec = env.spec("bad", &["true"]);
    spec.cgroup = "../escape".into();
    let (io, _r) = stdio();
    assert!(matches!(
        process::start(&spec, io, None),
        Err(Error::InvalidSpec(_))
    ));
}

/// An image whose `/run` is a symlink starts with it as it is: no tmpfs is mounted
/// through it.
fn run_symlink_is_kept(env: &Env) {
    let mut spec = env.spec(
        "runlink",
        &[
            "sh",
            "-c",
            "readlink /run; grep -c ' /tmp tmpfs' /proc/mounts",
        ],
    );
    spec.run_tmpfs = true;
    std::fs::create_dir_all(&spec.rootfs.upperdir).unwrap();
    std::os::unix::fs::symlink("tmp", spec.rootfs.upperdir.join("run")).unwrap();
    let (io, r) = stdio();
    let s = process::start(&spec, io, None).expect("start with /run a symlink");
    assert_eq!(wait(s.pid), 1, "grep found no tmpfs on /tmp");
    assert_eq!(read_all(r), "tmp\n0\n");
    process::destroy(&spec).expect("destroy");
    assert_gone(&spec);
}

/// A throwaway container's overlay is volatile (no sync of the upper filesystem when it
/// ends); a kept one's is not. Writes land in the upper dir either way.
fn volatile_upper(env: &Env) {
    for volatile in [true, false] {
        let name = if volatile { "throwaway" } else { "kept" };
        let mut spec = env.spec(
            name,
            &[
                "sh",
                "-c",
                "echo data > /written; grep -cE ' / / .*(,volatile|fsync=volatile)' /proc/self/mountinfo",
            ],
        );
        spec.rootfs.volatile = volatile;
        let (io, r) = stdio();
        let s = process::start(&spec, io, None).expect("start");
        let code = wait(s.pid);
        assert_eq!(read_all(r).trim(), if volatile { "1" } else { "0" });
        assert_eq!(code, if volatile { 0 } else { 1 });
        assert_eq!(
            std::fs::read_to_string(spec.rootfs.upperdir.join("written")).unwrap(),
            "data\n"
        );
        process::destroy(&spec).expect("destroy");
        assert_gone(&spec);
    }
}

/// A read-only rootfs: the image layer itself (idmapped or not), or the layers alone in
/// an overlay without an upper dir; writes fail, reads see every layer, no upper is made.
fn readonly_rootfs(env: &Env) {
    let extra = env.dir.path().join("extra-layer");
    std::fs::create_dir_all(extra.join("etc")).unwrap();
    std::fs::write(extra.join("etc/extra"), "from the upper layer\n").unwrap();
    let userns = IdMap {
        host_uid: 200000,
        host_gid: 200000,
        size: 65536,
    };
    for (name, two_layers, idmap) in [
        ("ro-plain", false, None),
        ("ro-idmapped", false, Some(userns)),
        ("ro-layers", true, Some(userns)),
    ] {
        let mut spec = env.spec(
            name,
            &[
                "sh",
                "-c",
                "touch /x 2>/dev/null; echo touch=$?; cat /etc/extra 2>/dev/null; id -u; \
                 grep -c ' / ro,' /proc/self/mountinfo",
            ],
        );
        spec.rootfs.readonly = true;
        spec.idmap = idmap;
        if two_layers {
            spec.rootfs.lowerdirs.insert(0, extra.clone());
        }
        let (io, r) = stdio();
        let s = process::start(&spec, io, None).expect("start");
        let code = wait(s.pid);
        let out = read_all(r);
        assert_eq!(code, 0, "{name}: {out}");
        let layer = if two_layers {
            "from the upper layer\n"
        } else {
            ""
        };
        assert_eq!(out, format!("touch=1\n{layer}0\n1\n"), "{name}");
        assert!(!spec.rootfs.upperdir.exists(), "{name}: no upper dir");
        process::destroy(&spec).expect("destroy");
        assert_gone(&spec);
    }
    // A tmpfs where the read-only root has a directory; a path that leaves the root is refused.
    let mut spec = env.spec("ro-tmpfs", &["sh", "-c", "echo x > /tmp/f && cat /tmp/f"]);
    spec.rootfs.readonly = true;
    spec.tmpfs = vec![ltv_containers::spec::Tmpfs {
        target: "/tmp".into(),
        size_bytes: Some(1 << 20),
        mode: 0o1777,
        exec: false,
        readonly: false,
    }];
    let (io, r) = stdio();
    let s = process::start(&spec, io, None).expect("start");
    assert_eq!((wait(s.pid), read_all(r).as_str()), (0, "x\n"));
    process::destroy(&spec).expect("destroy");
    assert_gone(&spec);
    spec.tmpfs[0].target = "/tmp/../../x".into();
    let (io, _r) = stdio();
    let refused = process::start(&spec, io, None);
    assert!(matches!(&refused, Err(process::Error::InvalidSpec(m)) if m.contains("tmpfs")));
    // A nesting container's root could remount it read-write.
    let mut spec = env.spec("ro-nesting", &["true"]);
    spec.rootfs.readonly = true;
    spec.idmap = Some(userns);
    spec.nesting = true;
    let (io, _r) = stdio();
    let refused = process::start(&spec, io, None);
    assert!(
        matches!(&refused, Err(process::Error::InvalidSpec(m)) if m.contains("read-only")),
        "a read-only nesting container is refused"
    );
    assert!(
        !spec.rootfs.mountpoint.exists(),
        "and nothing was made for it"
    );
}

fn user_namespace(env: &Env) {
    let mut spec = env.spec(
        "userns",
        &["sh", "-c", "id; cat /proc/self/uid_map; echo loflags=$(cat /sys/class/net/lo/flags); echo ok > /tmp/f && echo wrote; echo bb=$(stat -c %u:%g /bin/busybox); echo x > /etc/new && echo etcok; grep CapEff /proc/self/status; echo run=$(grep ' /run ' /proc/mounts | cut -d' ' -f3,4); touch /run/x && echo runok=$(stat -c %u /run); echo $$; sleep 2"],
    );
    spec.run_tmpfs = true;
    spec.idmap = Some(IdMap {
        host_uid: 200000,
        host_gid: 200000,
        size: 65536,
    });
    spec.network = NetworkMode::None;
    let (io, r) = stdio();
    let s = process::start(&spec, io, None).expect("start userns");
    let (io2, r2) = stdio();
    let mut p = spec.process.clone();
    p.args = vec![
        "sh".into(),
        "-c".into(),
        "cat /proc/self/uid_map; id -u".into(),
    ];
    // Through a spare helper where there are any: it joins the user namespace by setns.
    let spares = process::ExecSpares::new(1);
    if let Some(s) = &spares {
        s.refill(usize::MAX);
    }
    let e = process::exec(&spec, s.pid, &p, io2, spares.as_ref()).expect("exec in userns");
    assert_eq!(wait(e.pid), 0);
    let o = read_all(r2);
    assert!(o.contains("200000") && o.ends_with("\n0\n"), "{o}");
    let code = wait(s.pid);
    let out = read_all(r);
    eprint!("{out}");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("uid=0"), "{out}");
    assert!(out.contains("200000"), "{out}");
    assert!(out.contains("wrote"), "{out}");
    // NetworkMode::None: lo is there, and down (IFF_LOOPBACK alone).
    assert!(out.contains("loflags=0x8\n"), "{out}");
    // Idmapped image layers: host-root files are root's inside.
    assert!(out.contains("bb=0:0") && out.contains("etcok"), "{out}");
    // A system container's /run: our tmpfs, its root's, writable.
    assert!(out.contains("run=tmpfs rw,nosuid,nodev"), "{out}");
    assert!(out.contains("runok=0"), "{out}");
    process::destroy(&spec).expect("destroy");
    assert_gone(&spec);
}

/// Kernels before 6.15 take idmapped layers only once attached (in a private mount
/// namespace of ours): the same container works that way, and leaves no mount behind.
fn user_namespace_on_attached_layers(env: &Env) {
    ltv_containers::rootfs::attach_layers_first(true);
    let mut spec = env.spec(
        "attached-layers",
        &[
            "sh",
            "-c",
            "echo bb=$(stat -c %u:%g /bin/busybox); echo x > /etc/new && echo etcok",
        ],
    );
    spec.idmap = Some(IdMap {
        host_uid: 210000,
        host_gid: 210000,
        size: 65536,
    });
    let (io, r) = stdio();
    let started = process::start(&spec, io, None);
    ltv_containers::rootfs::attach_layers_first(false);
    let s = started.expect("start on attached layers");
    assert_eq!(wait(s.pid), 0);
    let out = read_all(r);
    assert!(out.contains("bb=0:0") && out.contains("etcok"), "{out}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(".layer-"),
        "a layer stayed attached: {mounts}"
    );
    let dir = spec.rootfs.upperdir.parent().unwrap().join(".layer-0");
    assert!(!dir.exists(), "{} left", dir.display());
    process::destroy(&spec).expect("destroy");
    assert_gone(&spec);
}

/// A nesting container can make a container of its own (user, mount and pid namespaces, a
/// fresh /proc) and a sub-cgroup of its own; a default one can do neither. Its binds are
/// there, a read-only one refusing writes.
fn nesting_profile(env: &Env) {
    let nested = "unshare -U -m -p -f -r --mount-proc sh -c 'cat /proc/self/uid_map; echo pid=$$' && echo NESTED-OK";
    let sub_cgroup =
        "d=/sys/fs/cgroup; [ -d $d/pids ] && d=$d/pids; mkdir $d/sub && echo CGROUP-OK";
    let binds = "cat /bound/ro/marker; touch /bound/ro/x 2>/dev/null || echo RO-OK; touch /bound/rw/x && echo RW-OK";
    let script = format!("{nested}; {sub_cgroup}; {binds}");
    let ro = env.dir.path().join("bind-ro");
    let rw = env.dir.path().join("bind-rw");
    for d in [&ro, &rw] {
        std::fs::create_dir_all(d).unwrap();
        chmod(d, 0o777);
    }
    std::fs::write(ro.join("marker"), "MARKER\n").unwrap();
    for nesting in [false, true] {
        let mut spec = env.spec(
            if nesting { "nesting" } else { "not-nesting" },
            &["sh", "-c", &script],
        );
        spec.idmap = Some(IdMap {
            host_uid: 400000,
            host_gid: 400000,
            size: 65536,
        });
        spec.nesting = nesting;
        spec.binds = vec![
            Bind {
                source: ro.clone(),
                target: "/bound/ro".into(),
                readonly: true,
            },
            Bind {
                source: rw.clone(),
                target: "/bound/rw".into(),
                readonly: false,
            },
        ];
        let (io, r) = stdio();
        let s = process::start(&spec, io, None).expect("start");
        wait(s.pid);
        let out = read_all(r);
        eprint!("{out}");
        assert_eq!(out.contains("NESTED-OK"), nesting, "{out}");
        assert_eq!(out.contains("CGROUP-OK"), nesting, "{out}");
        if nesting {
            assert!(out.contains("pid=1"), "a pid namespace of its own: {out}");
        }
        assert!(
            out.contains("MARKER") && out.contains("RO-OK") && out.contains("RW-OK"),
            "{out}"
        );
        process::destroy(&spec).expect("destroy removes the sub-cgroup too");
        assert_gone(&spec);
    }
    let mut privileged = env.spec("nesting-privileged", &["true"]);
    privileged.nesting = true;
    let (io, _r) = stdio();
    assert!(
        matches!(
            process::start(&privileged, io, None),
            Err(Error::InvalidSpec(_))
        ),
        "nesting without a user namespace is refused"
    );
}

/// The same containers (plain, in a user namespace, from a pool spare, with an exec)
/// with their helpers cloned by the fork server instead of executed; after the server
/// is stopped or killed, executed again.
fn fork_server(env: &Env) {
    use ltv_containers::forkserver;
    forkserver::start().expect("start the fork server");
    let before = forkserver::helpers_cloned();
    container_basics_exec_destroy(env);
    user_namespace(env);
    pool_spare_becomes_the_container(env);
    let cloned = forkserver::helpers_cloned() - before;
    assert!(cloned >= 4, "helpers came from the fork server: {cloned}");
    forkserver::stop();
    assert_eq!(forkserver::pid(), None);
    missing_command_cleans_up(env);
    assert_eq!(forkserver::helpers_cloned() - before, cloned);

    forkserver::start().expect("start it again");
    fork_server_into_v2_cgroup(env);
    let cloned = forkserver::helpers_cloned() - before;
    let pid = forkserver::pid().expect("running");
    // SAFETY: our own child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    container_basics_exec_destroy(env);
    assert_eq!(forkserver::pid(), None, "a dead server is dropped");
    assert_eq!(forkserver::helpers_cloned() - before, cloned);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the dead server was reaped"
    );
}

/// A helper the server clones straight into a cgroup v2 group (CLONE_INTO_CGROUP with
/// CLONE_PARENT) is there from its first instruction, and still our child.
fn fork_server_into_v2_cgroup(env: &Env) {
    use ltv_containers::cgroups::CgroupManager;
    use ltv_containers::forkserver;
    use ltv_containers::namespaces::Forked;
    use std::os::fd::AsRawFd;
    let Some(root) = cgroup2_root() else {
        eprintln!("no cgroup2 mount: skipped");
        return;
    };
    let m = cgroups::v2::V2Manager::new(root, &format!("{}/v2-clone", env.cg_parent));
    m.create().unwrap();
    let dir: std::os::fd::OwnedFd = std::fs::File::open(root.join(&env.cg_parent).join("v2-clone"))
        .unwrap()
        .into();
    // The helper waits for its message on this socket; closing our end ends it.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    let n = null.as_raw_fd();
    let fds = [(n, 0), (n, 1), (n, 2), (theirs.as_raw_fd(), 3)];
    let forked = forkserver::spawn(0, &fds, None, 0, Some(&dir))
        .expect("a server")
        .expect("cloned");
    drop(theirs);
    let Forked::Parent { pid, in_cgroup } = forked else {
        unreachable!()
    };
    assert!(in_cgroup, "cloned into the group");
    assert_eq!(m.processes().unwrap(), vec![pid]);
    drop(ours);
    assert_ne!(wait(pid), 0, "a helper without a message gives up");
    m.remove().unwrap();
    let _ = std::fs::remove_dir(root.join(&env.cg_parent));
}

fn pool_spare_becomes_the_container(env: &Env) {
    for userns in [false, true] {
        pool_spare_run(env, userns);
    }
}

fn pool_spare_run(env: &Env, userns: bool) {
    let Some(pool) = process::Pool::new(&env.cg_parent, 1, userns, false) else {
        eprintln!("pool: skipped (cgroup v2 host: CLONE_INTO_CGROUP makes the pool moot)");
        return;
    };
    pool.refill(usize::MAX);
    let spares = || {
        cgroup_roots()
            .iter()
            .filter_map(|r| std::fs::read_dir(r.join(&env.cg_parent)).ok())
            .flat_map(|d| d.flatten())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".spare-"))
            .count()
    };
    assert!(spares() > 0, "a spare cgroup exists after refill");
    let name = if userns { "pooled-userns" } else { "pooled" };
    let mut spec = env.spec(name, &["sh", "-c", &format!("{REPORT}; exec sleep 1000")]);
    if userns {
        spec.idmap = Some(IdMap {
            host_uid: 300000,
            host_gid: 300000,
            size: 65536,
        });
    }
    let (io, r) = stdio();
    let s = process::start(&spec, io, Some(&pool)).expect("start from the pool");
    let out = read_until(&mut std::fs::File::from(r), "END");
    assert_eq!(field(&out, "hostname="), format!("host-{name}"));
    assert_eq!(field(&out, "pid="), "1");
    assert_eq!(field(&out, "Seccomp:"), "2");
    assert_eq!(
        spares(),
        0,
        "the spare's cgroup was renamed to the container's"
    );
    let procs = cgroup_dirs(&spec)
        .iter()
        .map(|d| std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default())
        .collect::<Vec<_>>();
    assert!(
        procs.iter().all(|p| p.contains(&s.pid.to_string())),
        "init in every hierarchy: {procs:?}"
    );
    // The overlay lives only in the container's mount namespace.
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!host_mounts.contains(spec.rootfs.mountpoint.to_str().unwrap()));
    process::destroy(&spec).expect("destroy");
    assert_eq!(wait(s.pid), 137);
    assert_gone(&spec);
    pool.refill(usize::MAX);
    assert!(spares() > 0);
    pool.drain();
    assert_eq!(spares(), 0, "drain removes spares");
    pool.refill(usize::MAX);
    assert_eq!(spares(), 0, "a drained pool stays empty");
    // The daemon's exit drains while a refill may be running: nothing is left after.
    let pool = process::Pool::new(&env.cg_parent, 3, userns, false).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| pool.refill(usize::MAX));
        std::thread::sleep(std::time::Duration::from_millis(2));
        pool.drain();
        assert_eq!(spares(), 0, "nothing made after drain returned");
    });
    assert_eq!(spares(), 0, "nothing made after drain returned");
}

fn tty(env: &Env) {
    let mut spec = env.spec(
        "tty",
        &[
            "sh",
            "-c",
            "test -t 0 && echo istty; test -c /dev/console && echo console; echo END",
        ],
    );
    spec.process.tty = true;
    let pty = nix::pty::openpty(None, None).unwrap();
    let io = Stdio {
        stdin: pty.slave.try_clone().unwrap(),
        stdout: pty.slave.try_clone().unwrap(),
        stderr: pty.slave,
    };
    let s = process::start(&spec, io, None).expect("start with tty");
    assert_eq!(wait(s.pid), 0);
    let mut f = std::fs::File::from(pty.master);
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    // EIO once the last slave descriptor is gone.
    while let Ok(n) = f.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    let out = String::from_utf8_lossy(&out);
    eprint!("{out}");
    assert!(out.contains("istty") && out.contains("console"), "{out}");
    process::destroy(&spec).expect("destroy");
    assert_gone(&spec);
}

/// The cgroup2 hierarchy: /sys/fs/cgroup on a v2 host, the unified mount of a hybrid one.
fn cgroup2_root() -> Option<&'static Path> {
    let unified = Path::new("/sys/fs/cgroup/unified");
    if Layout::detect() == Layout::V2 {
        Some(Path::new("/sys/fs/cgroup"))
    } else if unified.join("cgroup.procs").exists() {
        Some(unified)
    } else {
        None
    }
}

/// The hybrid host's cgroup2 mount (hugetlb only) still exercises the real v2 file
/// semantics: mkdir, cgroup.procs, cgroup.kill, rmdir.
fn cgroup_v2_on_real_mount(env: &Env) {
    let Some(root) = cgroup2_root() else {
        eprintln!("no cgroup2 mount: skipped");
        return;
    };
    use ltv_containers::cgroups::CgroupManager;
    let path = format!("{}/v2", env.cg_parent);
    let m = cgroups::v2::V2Manager::new(root, &path);
    m.create().unwrap();
    assert!(m.exists());
    m.apply(&Limits::default()).unwrap();
    let mut child = std::process::Command::new("/bin/busybox")
        .args(["sleep", "100"])
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    m.add_process(pid).unwrap();
    assert_eq!(m.processes().unwrap(), vec![pid]);
    assert!(m.stats().unwrap().pids >= 1);
    m.kill_all().unwrap();
    let st = child.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
    m.remove().unwrap();
    assert!(!m.exists());
    let _ = std::fs::remove_dir(root.join(&env.cg_parent));
}

/// Prints start-to-exit and destroy times of `/bin/true` (informational).
fn timing(env: &Env) {
    let mut t = Vec::new();
    for i in 0..5 {
        let spec = env.spec(&format!("timing{i}"), &["true"]);
        let (io, _r) = stdio();
        let t0 = std::time::Instant::now();
        let s = process::start(&spec, io, None).expect("start");
        let t1 = t0.elapsed();
        assert_eq!(wait(s.pid), 0);
        let t2 = t0.elapsed();
        process::destroy(&spec).expect("destroy");
        t.push((t1, t2, t0.elapsed()));
        assert_gone(&spec);
    }
    for (a, b, c) in &t {
        eprintln!("start {a:?}, exited {b:?}, destroyed {c:?}");
    }
}

/// Pretends to be a pure cgroup v2 host: in a private mount namespace, the unified
/// hierarchy is mounted over /sys/fs/cgroup. On this hybrid host it has no memory/cpu/pids
/// controllers, so the container runs without limits, but everything else is real v2.
fn pure_v2_in_private_mount_ns(env: &Env) {
    use nix::mount::{mount, MsFlags};
    if Layout::detect() == Layout::V2 {
        eprintln!("already v2: covered by the other tests");
        return;
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare mount ns");
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .unwrap();
    mount(
        Some("cgroup2"),
        "/sys/fs/cgroup",
        Some("cgroup2"),
        MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount cgroup2");
    // Uncover the v1 hierarchies again afterwards, even on failure (cleanup needs them).
    struct Unmount;
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2("/sys/fs/cgroup", nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount;
    assert_eq!(Layout::detect(), Layout::V2);
    let mut spec = env.spec(
        "v2",
        &["sh", "-c", "cat /proc/self/cgroup; ls /sys/fs/cgroup | grep -c cgroup.procs; echo END; exec sleep 100"],
    );
    spec.limits = Limits::default();
    let (io, r) = stdio();
    let s = process::start(&spec, io, None).expect("start on v2");
    let mut f = std::fs::File::from(r);
    let out = read_until(&mut f, "END");
    eprint!("{out}");
    // (v1 lines too on this hybrid host: the cgroup namespace covers every hierarchy.)
    assert!(out.lines().any(|l| l == "0::/"), "{out}");
    assert!(out.ends_with("\n1\nEND\n"), "{out}");
    let dir = Path::new("/sys/fs/cgroup").join(&spec.cgroup);
    assert!(dir.join("cgroup.procs").exists());
    assert!(cgroups::manager(&spec.cgroup)
        .processes()
        .unwrap()
        .contains(&s.pid));
    let (io, r) = stdio();
    let p = ProcessSpec {
        args: vec!["sh".into(), "-c".into(), "cat /proc/self/cgroup".into()],
        ..spec.process.clone()
    };
    let e = process::exec(&spec, s.pid, &p, io, None).expect("exec on v2");
    assert_eq!(wait(e.pid), 0);
    assert!(read_all(r).lines().any(|l| l == "0::/"));
    process::destroy(&spec).expect("destroy on v2");
    assert_eq!(wait(s.pid), 137);
    assert_gone(&spec);
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(&env.cg_parent));
}

/// The daemon starts containers from several threads at once: the raw clone must not
/// deadlock, and each start must see only its own pipes.
fn concurrent_from_threads(env: &Env) {
    let specs: Vec<ContainerSpec> = (0..6)
        .map(|i| {
            env.spec(
                &format!("conc{i}"),
                &["sh", "-c", &format!("echo c{i}; sleep 0.2")],
            )
        })
        .collect();
    std::thread::scope(|sc| {
        let hs: Vec<_> = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                sc.spawn(move || {
                    let (io, r) = stdio();
                    let s = process::start(spec, io, None).expect("start");
                    // Allocating and locking in parallel while others clone.
                    let v: Vec<String> = (0..1000).map(|n| n.to_string()).collect();
                    assert_eq!(v.len(), 1000);
                    assert_eq!(wait(s.pid), 0);
                    assert_eq!(read_all(r), format!("c{i}\n"));
                    process::destroy(spec).expect("destroy");
                    assert_gone(spec);
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    });
}

fn non_root_user_and_tight_memory(env: &Env) {
    let mut spec = env.spec(
        "user1000",
        &[
            "sh",
            "-c",
            "id; grep -E '^(CapEff|CapBnd)' /proc/self/status; pwd",
        ],
    );
    spec.process.uid = 1000;
    spec.process.gid = 1001;
    spec.process.additional_gids = vec![10, 20];
    spec.process.cwd = "/home/u".into();
    // The daemon's minimum.
    spec.limits.memory_bytes = Some(4 << 20);
    let (io, r) = stdio();
    let s = process::start(&spec, io, None).expect("start as uid 1000");
    assert_eq!(wait(s.pid), 0);
    let out = read_all(r);
    eprint!("{out}");
    assert!(out.starts_with("uid=1000 gid=1001 groups=10,20\n"), "{out}");
    assert_eq!(field(&out, "CapEff:"), "0000000000000000");
    assert_eq!(
        u64::from_str_radix(field(&out, "CapBnd:"), 16).unwrap(),
        security::default_caps_mask()
    );
    assert!(out.ends_with("/home/u\n"), "{out}");
    process::destroy(&spec).expect("destroy");
    assert_gone(&spec);
}
