//! `ltv image build debian`: debootstrap minbase from the host's apt mirror (a minute or two).

use ltv_e2e::{require_root, stderr, stdout, TestDaemon};

#[test]
fn debian_image_builds_and_runs() {
    require_root!();
    // debootstrap fetches from the host's apt mirror, so this daemon needs the host network.
    let d = TestDaemon::start_with_host_network();
    let out = d.ltv(&[
        "image",
        "build",
        "debian",
        "--suite",
        "bookworm",
        "--include",
        "procps",
    ]);
    assert!(
        out.status.success(),
        "debootstrap build failed: {}",
        stderr(&out)
    );
    let out = d.ltv(&[
        "run",
        "--rm",
        "debian",
        "--",
        "sh",
        "-c",
        "cat /etc/debian_version; ps -o pid= -p 1",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text} {}", stderr(&out));
    let mut lines = text.lines();
    assert!(
        lines.next().unwrap_or("").starts_with("12."),
        "bookworm: {text}"
    );
    assert_eq!(
        lines.next().map(str::trim),
        Some("1"),
        "procps from --include works, in our pid namespace: {text}"
    );
    let list = d.ok(&["image", "list"]);
    assert!(list.contains("debian"), "{list}");
}
