//! Peer runtimes measured in the same run on the same busybox rootfs: crun, runc
//! (OCI bundles), LXC (a busybox system container) and QEMU microvm (our kernel).

use crate::harness::{failure, timed, Harness};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const KNOWN: &[&str] = &["crun", "runc", "lxc", "qemu"];

/// The ltv kind a peer is compared with.
pub fn counterpart(peer: &str) -> &'static str {
    match peer {
        "lxc" => "system",
        "qemu" => "vm",
        _ => "app",
    }
}

fn binary(peer: &str) -> &'static str {
    match peer {
        "crun" => "crun",
        "runc" => "runc",
        "lxc" => "lxc-start",
        _ => "qemu-system-x86_64",
    }
}

fn package(peer: &str) -> &'static str {
    match peer {
        "crun" => "crun",
        "runc" => "runc",
        "lxc" => "lxc",
        _ => "qemu-system-x86",
    }
}

pub fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(prog))
            .find(|f| f.is_file())
    })
}

/// Makes sure the peer's tools are there (installing them if asked); Err = skip reason.
pub fn ensure(peer: &str, install: bool, kernel: Option<&Path>) -> Result<(), String> {
    if !KNOWN.contains(&peer) {
        return Err(format!("unknown peer (known: {})", KNOWN.join(", ")));
    }
    if which(binary(peer)).is_none() {
        if !install {
            return Err(format!(
                "{} is not installed (use --install-peers, or apt-get install {})",
                binary(peer),
                package(peer)
            ));
        }
        eprintln!("installing {} ...", package(peer));
        let ok = apt_install(package(peer), None) || apt_install_from_backports(package(peer));
        if !ok || which(binary(peer)).is_none() {
            return Err(format!("apt-get install {} failed", package(peer)));
        }
    }
    if peer == "qemu" && kernel.is_none() {
        return Err("needs our guest kernel: pass --kernel (and --initrd)".into());
    }
    Ok(())
}

fn apt_install(package: &str, release: Option<&str>) -> bool {
    let release = release.map(|r| format!("-t {r} ")).unwrap_or_default();
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {release}{package} >/dev/null"
        ))
        .status()
        .is_ok_and(|s| s.success())
}

/// Hosts that carry backports' qemu-utils cannot install the stable qemu-system (its
/// qemu-system-common conflicts): retry from `<codename>-backports` of the host's own mirror,
/// adding that suite to apt's sources when it is not there.
fn apt_install_from_backports(package: &str) -> bool {
    let Some(codename) = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("VERSION_CODENAME=")
                    .map(|c| c.trim_matches('"').to_string())
            })
        })
    else {
        return false;
    };
    let suite = format!("{codename}-backports");
    let configured = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "grep -rqsw -- {suite} /etc/apt/sources.list /etc/apt/sources.list.d"
        ))
        .status()
        .is_ok_and(|s| s.success());
    if !configured {
        let Some(mirror) = ltv_containers::image::host_apt_mirror() else {
            return false;
        };
        eprintln!("adding {suite} from the host's mirror to apt's sources ...");
        let source = format!(
            "Types: deb\nURIs: {mirror}\nSuites: {suite}\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        );
        if std::fs::write("/etc/apt/sources.list.d/ltv-backports.sources", source).is_err() {
            return false;
        }
    }
    apt_install(package, Some(&suite))
}

/// First line of `<tool> --version`.
pub fn version(prog: &str) -> Option<String> {
    let out = Command::new(prog).arg("--version").output().ok()?;
    let s = String::from_utf8_lossy(&out.stdout);
    let line = s.lines().find(|l| !l.trim().is_empty())?.trim().to_string();
    Some(line)
}

/// An OCI bundle over the image rootfs (read-only, no terminal) running `args`.
pub fn oci_bundle(
    h: &Harness,
    tool: &str,
    rootfs: &Path,
    tag: &str,
    args: &[&str],
) -> Result<PathBuf, String> {
    let dir = h.dir.join(format!("bundle-{tool}-{tag}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut c = Command::new(tool);
    c.arg("spec").current_dir(&dir);
    let out = c.output().map_err(|e| e.to_string())?;
    if !out.status.success() && !dir.join("config.json").exists() {
        return Err(failure(&c, &out));
    }
    let path = dir.join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    cfg["root"] = json!({"path": rootfs, "readonly": true});
    cfg["process"]["args"] = json!(args);
    cfg["process"]["terminal"] = json!(false);
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).unwrap()).map_err(|e| e.to_string())?;
    Ok(dir)
}

/// One foreground `crun|runc run` to exit, in ms.
pub fn oci_run(h: &mut Harness, tool: &str, bundle: &Path, name: &str) -> Result<f64, String> {
    let root = h.dir.join(format!("{tool}-root"));
    let root_s = root.to_string_lossy().into_owned();
    let mut c = h.peer_cmd(tool);
    c.args(["--root", &root_s, "run", "--bundle"])
        .arg(bundle)
        .arg(name);
    let r = timed(&mut c).map(|(ms, _)| ms);
    if r.is_err() {
        let _ = h
            .peer_cmd(tool)
            .args(["--root", &root_s, "delete", "-f", name])
            .output();
    }
    r
}

/// `crun|runc run --detach` (an idle container left running); ms.
pub fn oci_detach(h: &mut Harness, tool: &str, bundle: &Path, name: &str) -> Result<f64, String> {
    let root = h.dir.join(format!("{tool}-root"));
    let root_s = root.to_string_lossy().into_owned();
    h.push_undo(&[tool, "--root", &root_s, "delete", "-f", name]);
    let mut c = h.peer_cmd(tool);
    c.args(["--root", &root_s, "run", "--detach", "--bundle"])
        .arg(bundle)
        .arg(name)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let t = std::time::Instant::now();
    let st = c.status().map_err(|e| e.to_string())?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if st.success() {
        Ok(ms)
    } else {
        Err(format!("{tool} run --detach {name}: {st}"))
    }
}

pub fn oci_pid(h: &mut Harness, tool: &str, name: &str) -> Option<i32> {
    let root = h.dir.join(format!("{tool}-root"));
    let out = h
        .peer_cmd(tool)
        .arg("--root")
        .arg(&root)
        .args(["state", name])
        .output()
        .ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["pid"].as_i64().map(|p| p as i32)
}

pub fn oci_delete(h: &mut Harness, tool: &str, name: &str) {
    let root = h.dir.join(format!("{tool}-root"));
    let root_s = root.to_string_lossy().into_owned();
    let _ = h
        .peer_cmd(tool)
        .args(["--root", &root_s, "delete", "-f", name])
        .output();
    h.drop_undo(&[tool, "--root", &root_s, "delete", "-f", name]);
}

/// LXC: a private copy of the busybox rootfs and an lxcpath under our temp dir.
pub struct Lxc {
    pub path: PathBuf,
    pub rootfs: PathBuf,
}

impl Lxc {
    pub fn new(h: &mut Harness, image_rootfs: &Path) -> Result<Lxc, String> {
        // LXC leaves an `lxc.pivot` cgroup behind; remove it if it is ours.
        for m in crate::harness::cgroup_mounts() {
            let p = m.join("lxc.pivot");
            if !p.exists() {
                h.push_undo(&["rmdir", &p.to_string_lossy()]);
            }
        }
        // A system container like ltv's: the image's own init runs its boot script.
        if std::fs::symlink_metadata(image_rootfs.join("sbin/init")).is_err() {
            return Err(format!("{} has no /sbin/init", image_rootfs.display()));
        }
        let path = h.dir.join("lxc");
        let rootfs = h.dir.join("lxc-rootfs");
        std::fs::create_dir_all(&path).map_err(|e| e.to_string())?;
        let st = Command::new("cp")
            .arg("-a")
            .arg(image_rootfs)
            .arg(&rootfs)
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err("cp -a of the rootfs failed".into());
        }
        Ok(Lxc { path, rootfs })
    }

    fn config(&self, name: &str) -> Result<(), String> {
        let d = self.path.join(name);
        std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
        // LXC's own busybox template (lxc-busybox) less its ttys and console pty, which
        // ltv's containers do not have either, plus the two lines this host needs.
        let cfg = format!(
            "lxc.uts.name = {name}
lxc.rootfs.path = dir:{}
lxc.init.cmd = /sbin/init
lxc.signal.halt = SIGUSR1
lxc.autodev = 1
lxc.tty.max = 0
lxc.pty.max = 1
lxc.console.path = none
lxc.mount.auto = cgroup:mixed proc:mixed sys:ro
lxc.mount.entry = shm dev/shm tmpfs defaults,create=dir 0 0
lxc.mount.entry = mqueue dev/mqueue mqueue defaults,optional,create=dir 0 0
lxc.net.0.type = empty
lxc.apparmor.profile = unconfined
",
            self.rootfs.display()
        );
        std::fs::write(d.join("config"), cfg).map_err(|e| e.to_string())
    }

    /// Start, then `lxc-attach -- /bin/true` returns: ms.
    pub fn start_exec(&self, h: &mut Harness, name: &str) -> Result<f64, String> {
        self.config(name)?;
        let p = self.path.to_string_lossy().into_owned();
        h.push_undo(&["lxc-stop", "-k", "-P", &p, "-n", name]);
        let t = std::time::Instant::now();
        let mut c = h.peer_cmd("lxc-start");
        c.args(["-P", &p, "-n", name, "-d"]);
        timed(&mut c)?;
        let mut c = h.peer_cmd("lxc-attach");
        c.args(["-P", &p, "-n", name, "--", "/bin/true"]);
        timed(&mut c)?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }

    /// `lxc-start -d` of an idle container, left running (density); ms.
    pub fn start(&self, h: &mut Harness, name: &str) -> Result<f64, String> {
        self.config(name)?;
        let p = self.path.to_string_lossy().into_owned();
        h.push_undo(&["lxc-stop", "-k", "-P", &p, "-n", name]);
        let mut c = h.peer_cmd("lxc-start");
        c.args(["-P", &p, "-n", name, "-d"]);
        timed(&mut c).map(|(ms, _)| ms)
    }

    /// The container's init as the host sees it.
    pub fn pid(&self, h: &mut Harness, name: &str) -> Option<i32> {
        let p = self.path.to_string_lossy().into_owned();
        let out = h
            .peer_cmd("lxc-info")
            .args(["-P", &p, "-n", name, "-p", "-H"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    pub fn stop(&self, h: &mut Harness, name: &str) -> Result<f64, String> {
        let p = self.path.to_string_lossy().into_owned();
        let mut c = h.peer_cmd("lxc-stop");
        c.args(["-k", "-P", &p, "-n", name]);
        let r = timed(&mut c).map(|(ms, _)| ms);
        h.drop_undo(&["lxc-stop", "-k", "-P", &p, "-n", name]);
        let _ = std::fs::remove_dir_all(self.path.join(name));
        r
    }
}

/// QEMU microvm with our kernel and initramfs (as guest-kernel/boot-qemu.py boots it) and the
/// kernel command line ltv-vmm would give the same guest on this host: start until the
/// guest's /init prints `LTV-READY` on the console; ms. QEMU is then killed (a guest reboot
/// does not reliably end QEMU on kvm-pvm hosts).
pub fn qemu_boot(h: &mut Harness, kernel: &Path, initrd: Option<&Path>) -> Result<f64, String> {
    use std::io::Read;
    let mut c = h.peer_cmd("qemu-system-x86_64");
    c.args(["-M", "microvm,acpi=off,x-option-roms=off", "-enable-kvm"])
        .args(["-cpu", "host,-arch-capabilities", "-m", "128", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio", "-kernel"])
        .arg(kernel)
        .arg("-append")
        .arg(ltv_vmm::builder::assemble_cmdline(
            "console=ttyS0 quiet",
            &[],
            ltv_vmm::kvm_flavour(),
        ))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    if let Some(i) = initrd {
        c.arg("-initrd").arg(i);
    }
    let t = std::time::Instant::now();
    let mut child = c.spawn().map_err(|e| format!("qemu: {e}"))?;
    let mut out = child.stdout.take().ok_or("qemu stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(9).any(|w| w == b"LTV-READY") {
                let _ = tx.send(());
                break;
            }
            if seen.len() > 1 << 20 {
                seen.drain(..seen.len() - 16);
            }
        }
    });
    // PVM hosts emulate the guest kernel: boots take tens of seconds; give up at 180 s.
    let r = loop {
        if rx.try_recv().is_ok() {
            break Ok(t.elapsed().as_secs_f64() * 1e3);
        }
        if let Ok(Some(st)) = child.try_wait() {
            break Err(format!("qemu exited with {st} before LTV-READY"));
        }
        if t.elapsed().as_secs() > 180 || crate::harness::interrupted() {
            break Err("qemu: no LTV-READY within 180 s (or interrupted)".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    let _ = child.kill();
    let _ = child.wait();
    r
}
