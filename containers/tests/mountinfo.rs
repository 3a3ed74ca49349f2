//! `mountinfo::read_self` keeps its last table only while it is true. Root only: the test
//! moves this test process (a binary of its own, without the test harness, so the main
//! thread, whose namespace /proc/self shows, is the one that moves) into a private mount
//! namespace, so its mounts never reach the host's.

use ltv_containers::mountinfo;
use nix::mount::{mount, umount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use std::path::Path;

fn mounted(dir: &Path) -> bool {
    mountinfo::read_self()
        .unwrap()
        .iter()
        .any(|m| m.mount_point == dir)
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (a private mount namespace)");
        return;
    }
    unshare(CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .expect("make / private");
    let dir = tempfile::tempdir().unwrap();
    let tmpfs = |target: &Path| {
        mount(
            Some("ltv-test"),
            target,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount tmpfs")
    };

    assert!(!mounted(dir.path()));
    // Twice: the second read may come from the kept table.
    assert!(!mounted(dir.path()));
    tmpfs(dir.path());
    assert!(mounted(dir.path()), "a mount made after the last read");
    assert!(mounted(dir.path()));
    umount(dir.path()).unwrap();
    assert!(!mounted(dir.path()), "an unmount");

    // Another mount namespace: its own table.
    tmpfs(dir.path());
    assert!(mounted(dir.path()));
    unshare(CloneFlags::CLONE_NEWNS).expect("second unshare");
    umount(dir.path()).unwrap();
    assert!(!mounted(dir.path()), "the new namespace's table");
    println!("mountinfo: read_self sees mounts, unmounts and a new namespace: ok");
}
