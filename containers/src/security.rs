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

/// The bit mask of [`DEFAULT_CAPS`], as shown in `CapEff` of /proc/PID/status.
pub fn default_caps_mask() -> u64 {
    DEFAULT_CAPS.iter().fold(0, |m, c| m | c.bitmask())
}

/// Drops every capability outside the default set from the bounding set.
/// Needs CAP_SETPCAP, so it runs before the ids change.
pub fn drop_bounding() -> Result<(), Error> {
    let keep = default_caps_mask();
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

/// Sets effective, permitted and inheritable to the default set and clears ambient.
pub fn set_caps() -> Result<(), Error> {
    let set: CapsHashSet = DEFAULT_CAPS.iter().copied().collect();
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

/// The default filters, compiled. Both must be installed; the kernel applies the
/// strictest result. Built early so a failure shows up before the container is set up.
pub fn default_seccomp() -> Result<Vec<BpfProgram>, Error> {
    let b = |e: seccompiler::BackendError| Error::SeccompBuild(e.to_string());
    let arch = arch()?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in denied_syscalls() {
        rules.insert(nr, vec![]);
        // The x32 ABI reaches the same syscalls with bit 30 set, under the x86_64 audit arch.
        #[cfg(target_arch = "x86_64")]
        rules.insert(nr | 0x4000_0000, vec![]);
    }
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
        let f = default_seccomp().unwrap();
        assert_eq!(f.len(), 2);
        assert!(f[0].len() > 50);
    }

    #[test]
    fn default_mask_matches_docker() {
        // CapEff of a root process in a default Docker container.
        assert_eq!(default_caps_mask(), 0x00000000a80425fb);
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
