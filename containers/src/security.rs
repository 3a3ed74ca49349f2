//! Privilege reduction for container processes: capabilities, no_new_privs, seccomp.

use caps::{CapSet, Capability, CapsHashSet};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
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
const CLONE_NS_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];

fn arch() -> Result<TargetArch, Error> {
    if cfg!(target_arch = "x86_64") {
        Ok(TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Ok(TargetArch::aarch64)
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

/// The profile's filters, compiled; all must be installed and the kernel applies the
/// strictest result. Built early so a failure shows up before the container is set up.
/// Compiled once per process: the fork server compiles them before it clones any
/// helper (see [`precompile`]), so the helpers find them made.
pub fn seccomp(profile: Profile) -> Result<Vec<BpfProgram>, Error> {
    static COMPILED: [std::sync::OnceLock<Result<Vec<BpfProgram>, String>>; 3] =
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

/// Compiles every profile's filters ahead of the first container.
pub fn precompile() {
    for p in [Profile::Default, Profile::SystemInit, Profile::Nesting] {
        let _ = seccomp(p);
    }
}

fn compile(profile: Profile) -> Result<Vec<BpfProgram>, Error> {
    match profile {
        Profile::Default => default_seccomp(&[]),
        Profile::SystemInit => default_seccomp(&[libc::SYS_reboot]),
        Profile::Nesting => {
            let arch = arch()?;
            let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
            deny_all(&mut rules, nesting_denied_syscalls());
            let deny = SeccompFilter::new(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(libc::EPERM as u32),
                arch,
            )
            .map_err(|e| Error::SeccompBuild(e.to_string()))?;
            Ok(vec![deny.try_into().map_err(
                |e: seccompiler::BackendError| Error::SeccompBuild(e.to_string()),
            )?])
        }
    }
}

/// One unconditional rule per syscall, under its x86_64 number and, where the kernel runs
/// x32 programs, its x32 one.
fn deny_all(rules: &mut BTreeMap<i64, Vec<SeccompRule>>, syscalls: Vec<i64>) {
    let x32 = x32_abi_enabled();
    for nr in syscalls {
        rules.insert(nr, vec![]);
        // The x32 ABI reaches the same syscalls with bit 30 set, under the x86_64 audit arch.
        if x32 {
            rules.insert(nr | X32_SYSCALL_BIT, vec![]);
        }
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

/// Docker's filter, but for the syscalls in `allow`.
fn default_seccomp(allow: &[i64]) -> Result<Vec<BpfProgram>, Error> {
    let b = |e: seccompiler::BackendError| Error::SeccompBuild(e.to_string());
    let arch = arch()?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let denied = denied_syscalls()
        .into_iter()
        .filter(|nr| !allow.contains(nr))
        .collect();
    deny_all(&mut rules, denied);
    // clone() that creates namespaces: one rule per flag, ORed.
    let mut clone_rules = Vec::new();
    for f in CLONE_NS_FLAGS {
        let cond = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(f), f)
            .map_err(b)?;
        clone_rules.push(SeccompRule::new(vec![cond]).map_err(b)?);
    }
    rules.insert(libc::SYS_clone, clone_rules);
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(b)?;
    // clone3 hides its flags in memory; ENOSYS makes libc fall back to clone().
    let mut rules3 = BTreeMap::new();
    rules3.insert(libc::SYS_clone3, vec![]);
    let nosys = SeccompFilter::new(
        rules3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(b)?;
    let c = |e: seccompiler::BackendError| Error::SeccompBuild(e.to_string());
    Ok(vec![
        deny.try_into().map_err(c)?,
        nosys.try_into().map_err(c)?,
    ])
}

/// Installs compiled filters on the calling thread (needs no_new_privs or CAP_SYS_ADMIN).
pub fn install_seccomp(progs: &[BpfProgram]) -> Result<(), Error> {
    for p in progs {
        seccompiler::apply_filter(p).map_err(|e| Error::SeccompInstall(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_builds() {
        let f = seccomp(Profile::Default).unwrap();
        assert_eq!(f.len(), 2);
        assert!(f[0].len() > 50);
        let n = seccomp(Profile::Nesting).unwrap();
        assert_eq!(n.len(), 1);
        assert!(n[0].len() < f[0].len());
    }

    #[test]
    fn default_filter_refuses_a_denied_syscall_under_both_numbers() {
        let filters = seccomp(Profile::Default).unwrap();
        // SAFETY: the child makes system calls only (no allocation) and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let refused = |nr: i64| {
                // SAFETY: unshare(0) changes nothing even where it is allowed.
                let r = unsafe { libc::syscall(nr, 0) };
                let errno = std::io::Error::last_os_error().raw_os_error();
                r == -1 && matches!(errno, Some(libc::EPERM) | Some(libc::ENOSYS))
            };
            let ok = set_no_new_privs().is_ok()
                && install_seccomp(&filters).is_ok()
                && refused(libc::SYS_unshare)
                && refused(X32_SYSCALL_BIT | libc::SYS_unshare);
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
        assert!(
            seccomp(Profile::SystemInit).unwrap()[0].len()
                < seccomp(Profile::Default).unwrap()[0].len()
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
