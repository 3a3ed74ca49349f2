//! Compiles the microVM guest's /init (guest-kernel/init.c, freestanding C) into OUT_DIR;
//! the root disk builder embeds it (backend/rootdisk.rs).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let source = manifest.join("../guest-kernel/init.c");
    // The flags guest-kernel/initramfs.sh builds it with too.
    let cflags = manifest.join("../guest-kernel/init.cflags");
    let tunables = manifest.join("src/daemon/pvm-glibc-tunables");
    for input in [&source, &cflags, &tunables] {
        println!("cargo:rerun-if-changed={}", input.display());
    }
    let cflags = std::fs::read_to_string(&cflags).expect("read guest-kernel/init.cflags");
    let tunables = std::fs::read_to_string(&tunables).expect("read pvm-glibc-tunables");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("guest-init");
    let status = Command::new("cc")
        .args(cflags.split_whitespace())
        .arg(format!("-DPVM_GLIBC_TUNABLES=\"{}\"", tunables.trim()))
        .arg("-o")
        .arg(&out)
        .arg(&source)
        .status()
        .expect("run cc for guest-kernel/init.c (gcc is needed)");
    assert!(status.success(), "cc failed on guest-kernel/init.c");
}
