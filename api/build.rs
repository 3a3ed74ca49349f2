//! Compiles the microVM guest's /init (guest-kernel/init.c, freestanding C) into OUT_DIR;
//! the root disk builder embeds it (backend/rootdisk.rs).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let source = manifest.join("../guest-kernel/init.c");
    let tunables = manifest.join("src/daemon/pvm-glibc-tunables");
    println!("cargo:rerun-if-changed={}", source.display());
    println!("cargo:rerun-if-changed={}", tunables.display());
    let tunables = std::fs::read_to_string(&tunables).expect("read pvm-glibc-tunables");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("guest-init");
    // The flags guest-kernel/initramfs.sh uses too.
    let status = Command::new("cc")
        .args([
            "-Os",
            "-static",
            "-nostdlib",
            "-ffreestanding",
            "-fno-stack-protector",
            "-fno-pie",
            "-no-pie",
            "-fno-asynchronous-unwind-tables",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-s",
            "-Wl,--build-id=none",
        ])
        .arg(format!("-DPVM_GLIBC_TUNABLES=\"{}\"", tunables.trim()))
        .arg("-o")
        .arg(&out)
        .arg(&source)
        .status()
        .expect("run cc for guest-kernel/init.c (gcc is needed)");
    assert!(status.success(), "cc failed on guest-kernel/init.c");
}
