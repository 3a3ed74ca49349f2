//! Privilege reduction for container processes: capabilities, no_new_privs, seccomp.

use caps::{CapSet, Capability, CapsHashSet};
use seccompiler::{sock_filter, BpfProgram};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("capabilities: {0}")]
    Caps(String),
    #[error("build seccomp filter: {0}")]
    SeccompBuild(String),
    #[error("install seccomp filter: {0}")]
    SeccompInstall(String),
    #[error("prctl({0}): {1}")]
    Prctl(&'static str, std::io::Error),
}

/// Docker's default capability set.
pub const DEFAULT_CAPS: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FSETID,
    Capability::CAP_FOWNER,
    Capability::CAP_MKNOD,
    Capability::CAP_NET_RAW,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_KILL,
    Capability::CAP_AUDIT_WRITE,
];

/// Capabilities a nesting container loses, as LXC drops them for unprivileged containers:
/// the rest only act on what its user namespace owns.
const NESTING_DROPPED: &[Capability] = &[
    Capability::CAP_MAC_ADMIN,
    Capability::CAP_MAC_OVERRIDE,
    Capability::CAP_SYS_TIME,
    Capability::CAP_SYS_MODULE,
    Capability::CAP_SYS_RAWIO,
];

/// How much a container's processes may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Docker's defaults: a few capabilities, no mounts or new namespaces.
    Default,
    /// Docker's defaults plus `reboot()` (and CAP_SYS_BOOT), for a privileged system
    /// container's init: in a pid namespace of its own, the kernel turns its halt into the
    /// end of that namespace, as LXC relies on.
    SystemInit,
    /// LXC's defaults for unprivileged containers, so it can run containers itself:
    /// every capability of its own user namespace but [`NESTING_DROPPED`], and only the
    /// syscalls that reach the host kernel's global state denied.
    Nesting,
}

/// The bit mask of [`DEFAULT_CAPS`], as shown in `CapEff` of /proc/PID/status.
pub fn default_caps_mask() -> u64 {
    DEFAULT_CAPS.iter().fold(0, |m, c| m | c.bitmask())
}

/// The capabilities a profile keeps, as a mask.
pub fn caps_mask(profile: Profile) -> u64 {
    match profile {
        Profile::Default => default_caps_mask(),
        Profile::SystemInit => default_caps_mask() | Capability::CAP_SYS_BOOT.bitmask(),
        Profile::Nesting => caps::all()
            .iter()
            .filter(|c| !NESTING_DROPPED.contains(c))
            .fold(0, |m, c| m | c.bitmask()),
    }
}

/// Drops every capability outside the profile's set from the bounding set.
/// Needs CAP_SETPCAP, so it runs before the ids change.
pub fn drop_bounding(profile: Profile) -> Result<(), Error> {
    let keep = caps_mask(profile);
    for cap in 0..64u32 {
        if keep & (1u64 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            // EINVAL: the kernel knows no capability this high.
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(Error::Prctl("PR_CAPBSET_DROP", e));
        }
    }
    Ok(())
}

/// Keeps permitted capabilities across a change from uid 0 (undone by [`set_caps`]).
pub fn keep_caps(on: bool) -> Result<(), Error> {
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, on as libc::c_ulong, 0, 0, 0) };
    if r != 0 {
        return Err(Error::Prctl(
            "PR_SET_KEEPCAPS",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Sets effective, permitted and inheritable to the profile's set and clears ambient.
pub fn set_caps(profile: Profile) -> Result<(), Error> {
    let keep = caps_mask(profile);
    let set: CapsHashSet = caps::all()
        .into_iter()
        .filter(|c| keep & c.bitmask() != 0)
        .collect();
    let e = |e: caps::errors::CapsError| Error::Caps(e.to_string());
    // Effective must shrink first: it has to stay a subset of permitted.
    caps::set(None, CapSet::Effective, &set).map_err(e)?;
    caps::set(None, CapSet::Permitted, &set).map_err(e)?;
    caps::set(None, CapSet::Inheritable, &set).map_err(e)?;
    caps::clear(None, CapSet::Ambient).map_err(e)?;
    keep_caps(false)
}

pub fn set_no_new_privs() -> Result<(), Error> {
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if r != 0 {
        return Err(Error::Prctl(
            "PR_SET_NO_NEW_PRIVS",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Syscalls refused with EPERM, like Docker's default profile for a container without
/// CAP_SYS_ADMIN and friends.
fn denied_syscalls() -> Vec<i64> {
    let mut v: Vec<libc::c_long> = vec![
        libc::SYS_acct,
        libc::SYS_add_key,
        libc::SYS_bpf,
        libc::SYS_clock_adjtime,
        libc::SYS_clock_settime,
        libc::SYS_settimeofday,
        libc::SYS_delete_module,
        libc::SYS_finit_module,
        libc::SYS_init_module,
        libc::SYS_fanotify_init,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fsopen,
        libc::SYS_fspick,
        libc::SYS_move_pages,
        libc::SYS_kcmp,
        libc::SYS_kexec_file_load,
        libc::SYS_kexec_load,
        libc::SYS_keyctl,
        libc::SYS_request_key,
        libc::SYS_lookup_dcookie,
        libc::SYS_mount,
        libc::SYS_mount_setattr,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_umount2,
        libc::SYS_name_to_handle_at,
        libc::SYS_open_by_handle_at,
        libc::SYS_perf_event_open,
        libc::SYS_pivot_root,
        libc::SYS_quotactl,
        libc::SYS_reboot,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_syslog,
        libc::SYS_userfaultfd,
        libc::SYS_vhangup,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS__sysctl,
        libc::SYS_sysfs,
        libc::SYS_uselib,
        libc::SYS_ustat,
        libc::SYS_nfsservctl,
    ]);
    // c_long is i64 on the 64-bit targets seccompiler supports.
    v
}

/// Namespace-creating clone flags (CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET).
const CLONE_NS_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u32;

/// The `AUDIT_ARCH_*` value a filter expects in `seccomp_data.arch` (linux/audit.h).
fn audit_arch() -> Result<u32, Error> {
    if cfg!(target_arch = "x86_64") {
        Ok(0xC000_003E)
    } else if cfg!(target_arch = "aarch64") {
        Ok(0xC000_00B7)
    } else {
        Err(Error::SeccompBuild("unsupported architecture".into()))
    }
}

/// What LXC's default policy denies: loading kernels and modules, and reaching files by
/// handle (which escapes a chroot).
fn nesting_denied_syscalls() -> Vec<i64> {
    vec![
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_open_by_handle_at,
    ]
}

/// The profile's filter, compiled. Built early so a failure shows up before the container
/// is set up. Compiled once per process: the fork server compiles them before it clones
/// any helper (see [`precompile`]), so the helpers find them made.
pub fn seccomp(profile: Profile) -> Result<BpfProgram, Error> {
    static COMPILED: [std::sync::OnceLock<Result<BpfProgram, String>>; 3] =
        [const { std::sync::OnceLock::new() }; 3];
    let slot = match profile {
        Profile::Default => 0,
        Profile::SystemInit => 1,
        Profile::Nesting => 2,
    };
    COMPILED[slot]
        .get_or_init(|| {
            compile(profile).map_err(|e| match e {
                Error::SeccompBuild(why) => why,
                other => other.to_string(),
            })
        })
        .clone()
        .map_err(Error::SeccompBuild)
}

/// Compiles every profile's filter ahead of the first container.
pub fn precompile() {
    for p in [Profile::Default, Profile::SystemInit, Profile::Nesting] {
        let _ = seccomp(p);
    }
}

fn compile(profile: Profile) -> Result<BpfProgram, Error> {
    let eperm = Verdict::Errno(libc::EPERM as u32);
    let mut rules = BTreeMap::new();
    match profile {
        Profile::Default | Profile::SystemInit => {
            for nr in denied_syscalls() {
                if !(profile == Profile::SystemInit && nr == libc::SYS_reboot) {
                    rules.insert(nr, eperm);
                }
            }
            rules.insert(libc::SYS_clone, Verdict::EpermIfFlags(CLONE_NS_FLAGS));
            // clone3 hides its flags in memory; ENOSYS makes libc fall back to clone().
            rules.insert(libc::SYS_clone3, Verdict::Errno(libc::ENOSYS as u32));
        }
        Profile::Nesting => {
            for nr in nesting_denied_syscalls() {
                rules.insert(nr, eperm);
            }
        }
    }
    if x32_abi_enabled() {
        // The x32 ABI reaches the same syscalls with bit 30 set, under the x86_64 audit arch.
        let x32: Vec<_> = rules
            .iter()
            .map(|(nr, v)| (nr | X32_SYSCALL_BIT, *v))
            .collect();
        rules.extend(x32);
    }
    let rules: Vec<(u32, Verdict)> = rules.into_iter().map(|(nr, v)| (nr as u32, v)).collect();
    Ok(filter(audit_arch()?, &rules))
}

/// What a filter does with one syscall number; every number without one is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Refused with this errno.
    Errno(u32),
    /// Refused with EPERM if the first argument has any of these flag bits (in its low
    /// 32 bits, where all clone flags that make namespaces are).
    EpermIfFlags(u32),
}

/// Compiles `rules` (sorted by number) to classic BPF: the architecture check, then a
/// binary search over the syscall numbers. Written here, not with seccompiler's
/// `SeccompFilter`, because that emits one linear chain, and the kernel runs a new filter
/// once per syscall number to cache which ones it always allows: the search tree makes
/// each container start's install a third as long (~80 µs against ~270 µs here).
fn filter(arch: u32, rules: &[(u32, Verdict)]) -> BpfProgram {
    debug_assert!(
        rules.windows(2).all(|w| w[0].0 < w[1].0),
        "rules not sorted"
    );
    let mut prog = vec![
        bpf_stmt(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            SECCOMP_DATA_ARCH,
        ),
        bpf_jump(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, arch, 1, 0),
        bpf_stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_KILL_PROCESS),
        bpf_stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, SECCOMP_DATA_NR),
    ];
    prog.extend(search(rules));
    prog
}

const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;
/// The low 32 bits of `args[0]` (both supported architectures are little-endian).
const SECCOMP_DATA_ARG0_LOW: u32 = 16;
/// Rules a search node tests one by one rather than splitting further.
const LEAF_RULES: usize = 3;

/// The search over `rules` for the number in the accumulator.
fn search(rules: &[(u32, Verdict)]) -> BpfProgram {
    if rules.len() <= LEAF_RULES {
        // A JEQ per rule, each jumping past the others and the final ALLOW to its verdict.
        let verdicts: Vec<BpfProgram> = rules.iter().map(|(_, v)| verdict(*v)).collect();
        let mut prog = Vec::new();
        // From the instruction after the first JEQ: the other JEQs and the ALLOW.
        let mut to_verdict = rules.len();
        for (i, (nr, _)) in rules.iter().enumerate() {
            let jt = u8::try_from(to_verdict).expect("a leaf's jumps are short");
            prog.push(bpf_jump(
                libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
                *nr,
                jt,
                0,
            ));
            // The next JEQ is one nearer the verdicts, which this rule's pushes away.
            to_verdict = to_verdict - 1 + verdicts[i].len();
        }
        prog.push(bpf_stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ALLOW,
        ));
        prog.extend(verdicts.into_iter().flatten());
        return prog;
    }
    let mid = rules.len() / 2;
    let (below, from) = (search(&rules[..mid]), search(&rules[mid..]));
    let split = rules[mid].0;
    let mut prog = match u8::try_from(below.len()) {
        Ok(skip) => vec![bpf_jump(
            libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
            split,
            skip,
            0,
        )],
        // Conditional jumps reach 255 instructions; a longer branch goes through JA.
        Err(_) => vec![
            bpf_jump(libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K, split, 0, 1),
            bpf_stmt(libc::BPF_JMP | libc::BPF_JA, below.len() as u32),
        ],
    };
    prog.extend(below);
    prog.extend(from);
    prog
}

fn verdict(v: Verdict) -> BpfProgram {
    let errno = |e: u32| bpf_stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ERRNO | e);
    match v {
        Verdict::Errno(e) => vec![errno(e)],
        Verdict::EpermIfFlags(flags) => vec![
            bpf_stmt(
                libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
                SECCOMP_DATA_ARG0_LOW,
            ),
            bpf_jump(libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K, flags, 0, 1),
            errno(libc::EPERM as u32),
            bpf_stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
        ],
    }
}

fn bpf_stmt(code: u32, k: u32) -> sock_filter {
    bpf_jump(code, k, 0, 0)
}

fn bpf_jump(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

const X32_SYSCALL_BIT: i64 = 0x4000_0000;

/// Whether this kernel runs x32 system calls (most do not: not built in, or off by
/// default as on Debian). Where it does not, an x32 number fails with ENOSYS whatever a
/// filter says, and leaving those numbers out halves the filter, which the kernel
/// checks, JIT-compiles and runs once per syscall number at every container start.
fn x32_abi_enabled() -> bool {
    if !cfg!(target_arch = "x86_64") {
        return false;
    }
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        // Tried in a child: a filter above us (systemd's SystemCallArchitectures=, say)
        // may kill the caller of a foreign-ABI system call.
        // SAFETY: the child makes two system calls and _exits; the parent reaps it.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: getpid under its x32 number: no arguments, no side effects.
            let r = unsafe { libc::syscall(X32_SYSCALL_BIT | libc::SYS_getpid) };
            let enosys =
                r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS);
            // SAFETY: leaving the child at once.
            unsafe { libc::_exit(if enosys { 0 } else { 1 }) };
        }
        if pid < 0 {
            return true;
        }
        let mut status = 0;
        // SAFETY: our own child.
        if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
            return true;
        }
        // ENOSYS, or killed for trying: no x32 call reaches the kernel from here or from
        // any container below us (filters are inherited). Anything else (a pid, an outer
        // filter's refusal): keep the x32 rules.
        let unreachable = (libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0)
            || (libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS);
        !unreachable
    })
}

/// Installs a compiled filter on the calling thread (needs no_new_privs or CAP_SYS_ADMIN).
pub fn install_seccomp(filter: &BpfProgram) -> Result<(), Error> {
    seccompiler::apply_filter(filter).map_err(|e| Error::SeccompInstall(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `prog` the way the kernel does, for the instructions [`filter`] emits.
    fn run(prog: &[sock_filter], arch: u32, nr: u32, arg0: u64) -> u32 {
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = &prog[pc];
            pc += 1;
            let code = u32::from(i.code);
            let jump = |taken: bool| usize::from(if taken { i.jt } else { i.jf });
            match code {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    acc = match i.k {
                        SECCOMP_DATA_NR => nr,
                        SECCOMP_DATA_ARCH => arch,
                        SECCOMP_DATA_ARG0_LOW => arg0 as u32,
                        k => panic!("load from offset {k}"),
                    }
                }
                c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => pc += jump(acc == i.k),
                c if c == libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K => pc += jump(acc >= i.k),
                c if c == libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K => {
                    pc += jump(acc & i.k != 0)
                }
                c if c == libc::BPF_JMP | libc::BPF_JA => pc += i.k as usize,
                c if c == libc::BPF_RET | libc::BPF_K => return i.k,
                c => panic!("instruction {c:#x}"),
            }
        }
    }

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;

    #[test]
    fn search_tree_gives_every_number_its_rule() {
        // Sizes from one rule to one whose branches need JA, numbers spread and clustered.
        for count in [1, 2, 3, 4, 7, 46, 300, 700] {
            let rules: Vec<(u32, Verdict)> = (0..count as u32)
                .map(|i| (i * 7 + (i % 5), Verdict::Errno(i % 100 + 1)))
                .collect();
            let prog = filter(0xC000_003E, &rules);
            assert!(
                prog.len() <= 4096,
                "{count} rules: {} instructions",
                prog.len()
            );
            let ja = libc::BPF_JMP | libc::BPF_JA;
            assert_eq!(prog.iter().any(|i| u32::from(i.code) == ja), count >= 300);
            let top = rules.last().unwrap().0 + 5;
            for nr in 0..top {
                let want = rules
                    .iter()
                    .find(|(n, _)| *n == nr)
                    .map_or(ALLOW, |(_, v)| match v {
                        Verdict::Errno(e) => libc::SECCOMP_RET_ERRNO | e,
                        Verdict::EpermIfFlags(_) => unreachable!(),
                    });
                assert_eq!(
                    run(&prog, 0xC000_003E, nr, 0),
                    want,
                    "{count} rules, nr {nr}"
                );
            }
            assert_eq!(
                run(&prog, 0xC000_00B7, rules[0].0, 0),
                libc::SECCOMP_RET_KILL_PROCESS
            );
        }
    }

    #[test]
    fn profiles_refuse_what_docker_and_lxc_refuse() {
        let arch = audit_arch().unwrap();
        let default = seccomp(Profile::Default).unwrap();
        let init = seccomp(Profile::SystemInit).unwrap();
        let nesting = seccomp(Profile::Nesting).unwrap();
        let x32 = x32_abi_enabled();
        for nr in denied_syscalls() {
            let nr = nr as u32;
            let x32_nr = nr | X32_SYSCALL_BIT as u32;
            assert_eq!(run(&default, arch, nr, 0), EPERM, "nr {nr}");
            assert_eq!(run(&default, arch, x32_nr, 0) == EPERM, x32, "nr {nr}");
            if nr != libc::SYS_reboot as u32 {
                assert_eq!(run(&init, arch, nr, 0), EPERM, "nr {nr}");
            }
        }
        assert_eq!(run(&init, arch, libc::SYS_reboot as u32, 0), ALLOW);
        let clone = libc::SYS_clone as u32;
        let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64;
        assert_eq!(run(&default, arch, clone, thread), ALLOW);
        assert_eq!(run(&default, arch, clone, libc::SIGCHLD as u64), ALLOW);
        for flag in [libc::CLONE_NEWUSER, libc::CLONE_NEWNS, libc::CLONE_NEWNET] {
            assert_eq!(run(&default, arch, clone, thread | flag as u64), EPERM);
        }
        assert_eq!(
            run(&default, arch, libc::SYS_clone3 as u32, 0),
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        );
        for nr in [
            libc::SYS_read,
            libc::SYS_execve,
            libc::SYS_ptrace,
            libc::SYS_chroot,
        ] {
            assert_eq!(run(&default, arch, nr as u32, 0), ALLOW, "nr {nr}");
        }
        for nr in [libc::SYS_mount, libc::SYS_unshare, libc::SYS_clone3] {
            assert_eq!(run(&nesting, arch, nr as u32, u64::MAX), ALLOW, "nr {nr}");
        }
        assert_eq!(run(&nesting, arch, libc::SYS_kexec_load as u32, 0), EPERM);
    }

    #[test]
    fn default_filter_refuses_a_denied_syscall_under_both_numbers() {
        let filter = seccomp(Profile::Default).unwrap();
        // SAFETY: the child makes system calls only (no allocation) and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let errno = |nr: i64, arg: libc::c_long| {
                // SAFETY: unshare(0) and clone3(NULL, 0) change nothing even where allowed;
                // getpid has no arguments.
                let r = unsafe { libc::syscall(nr, arg, 0) };
                if r == -1 {
                    std::io::Error::last_os_error().raw_os_error()
                } else {
                    None
                }
            };
            let refused = |nr| matches!(errno(nr, 0), Some(libc::EPERM) | Some(libc::ENOSYS));
            let ok = set_no_new_privs().is_ok()
                && install_seccomp(&filter).is_ok()
                && refused(libc::SYS_unshare)
                && refused(X32_SYSCALL_BIT | libc::SYS_unshare)
                && errno(libc::SYS_clone3, 0) == Some(libc::ENOSYS)
                && errno(libc::SYS_getpid, 0).is_none();
            // SAFETY: leaving the forked child without running the test harness's code.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    #[test]
    fn default_mask_matches_docker() {
        // CapEff of a root process in a default Docker container.
        assert_eq!(default_caps_mask(), 0x00000000a80425fb);
        assert_eq!(caps_mask(Profile::Default), default_caps_mask());
        assert_ne!(
            caps_mask(Profile::SystemInit) & Capability::CAP_SYS_BOOT.bitmask(),
            0
        );
        let nesting = caps_mask(Profile::Nesting);
        assert_ne!(nesting & Capability::CAP_SYS_ADMIN.bitmask(), 0);
        assert_eq!(nesting & Capability::CAP_SYS_MODULE.bitmask(), 0);
    }

    #[test]
    fn dangerous_syscalls_denied_common_ones_not() {
        let d = denied_syscalls();
        for nr in [
            libc::SYS_kexec_load,
            libc::SYS_bpf,
            libc::SYS_mount,
            libc::SYS_reboot,
        ] {
            assert!(d.contains(&nr));
        }
        for nr in [
            libc::SYS_read,
            libc::SYS_execve,
            libc::SYS_ptrace,
            libc::SYS_chroot,
        ] {
            assert!(!d.contains(&nr));
        }
    }
}
