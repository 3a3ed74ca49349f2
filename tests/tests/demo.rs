//! `ltv demo`, the README's main job: it runs to completion, shows every level it can run
//! here, and leaves nothing behind.

use ltv_e2e::{cgroup_mounts, ltv_bin, require_root};
use std::process::{Command, Stdio};

fn demo_dirs() -> Vec<String> {
    let mut dirs: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ltv-demo-"))
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn demo_runs_to_completion_and_leaves_nothing() {
    require_root!();
    let before = demo_dirs();
    let child = Command::new(ltv_bin())
        .arg("demo")
        // kvm-pvm hosts take over a minute per boot.
        .env("LTV_VM_BOOT_TIMEOUT", "400")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the demo failed");
    // The level table: the container levels always run, and run here.
    // The table starts at its header; launch lines above also begin with the names.
    let table: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("LEVEL"))
        .collect();
    let row = |level: &str| {
        table
            .iter()
            .find(|l| l.split_whitespace().next() == Some(level))
            .unwrap_or_else(|| panic!("no table row for {level}"))
            .to_string()
    };
    for level in ["app1", "sys1", "sys1/app1"] {
        let r = row(level);
        assert!(!r.contains("failed") && r.contains("shared"), "{r}");
    }
    assert!(
        row("sys1/app1").split_whitespace().any(|c| c == "2"),
        "pid ns depth 2"
    );
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if kvm {
        assert!(row("vm1").contains("own"), "{}", row("vm1"));
    }
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/new-file: Read-only file system"),
        "the read-only step's write is refused"
    );
    assert!(text.contains("Demo finished"));
    assert_eq!(demo_dirs(), before, "its state directory is gone");
    for m in cgroup_mounts() {
        let cg = m.join(format!("ltv-demo-{pid}"));
        assert!(!cg.exists(), "{} left", cg.display());
    }
}
