//! microVMs (Firecracker-style): one `ltv vmm` child process per instance, booting the
//! project's guest kernel with an initramfs made of the image's rootfs plus `ltv` as `/init`.

use super::{Backend, Started};
use crate::daemon::error::ApiError;
use crate::types::{parse_size, ExecPost, Image, Instance, Kind, Usage};
use async_trait::async_trait;
use ltv_containers::process::Stdio;
use ltv_vmm::{Flavour, VmConfig};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Printed on the guest console by the guest init once it is up.
pub const READY_MARKER: &str = "LTV-READY";
const DEFAULT_MEMORY: u64 = 256 << 20;
// Boots take 150-230 s on kvm-pvm hosts with a debug `ltv` in the initramfs (<1 s on hardware KVM).
const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(300);

pub struct VmBackend {
    /// `<state>/instances`
    instances_dir: PathBuf,
    /// `<state>/images`, the image store root.
    images_dir: PathBuf,
    /// `--kernel` / `LTV_KERNEL`; else the newest cached build.
    kernel: Option<PathBuf>,
    flavour: Flavour,
}

impl VmBackend {
    pub fn new(instances_dir: PathBuf, images_dir: PathBuf, kernel: Option<PathBuf>) -> Self {
        VmBackend {
            instances_dir,
            images_dir,
            kernel,
            flavour: ltv_vmm::kvm_flavour(),
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.instances_dir.join(name)
    }

    /// The guest kernel to boot, if there is one.
    fn kernel(&self) -> Option<PathBuf> {
        match &self.kernel {
            Some(k) => k.is_file().then(|| k.clone()),
            None => newest_cached_kernel(),
        }
    }

    /// (memory MiB, vCPUs), checked against this host.
    fn sizing(&self, instance: &Instance) -> Result<(u64, u32), ApiError> {
        let c = &instance.config;
        let bytes = match &c.memory {
            Some(text) => parse_size(text).map_err(ApiError::bad_request)?,
            None => DEFAULT_MEMORY,
        };
        let mib = bytes >> 20;
        if mib < ltv_vmm::config::MIN_MEMORY_MIB {
            return Err(ApiError::bad_request(format!(
                "memory {} is below the microVM minimum of {} MiB",
                c.memory.as_deref().unwrap_or_default(),
                ltv_vmm::config::MIN_MEMORY_MIB
            )));
        }
        if let Some(avail) = ltv_vmm::config::host_mem_available_mib() {
            if mib > avail {
                return Err(ApiError::bad_request(format!(
                    "memory {mib} MiB is more than the host has available ({avail} MiB)"
                )));
            }
        }
        let vcpus = match c.cpus {
            None => 1,
            Some(n) if n >= 1.0 && n.fract() == 0.0 && n <= u32::MAX as f64 => n as u32,
            Some(n) => {
                return Err(ApiError::bad_request(format!(
                    "cpus {n} is invalid for a microVM: use a whole number of vCPUs, at least 1"
                )))
            }
        };
        let limit = ltv_vmm::max_vcpus_for(self.flavour);
        if vcpus > limit.max {
            return Err(ApiError::bad_request(format!(
                "{vcpus} vCPUs is more than this host allows ({}): {}",
                limit.max,
                limit.reason.unwrap_or("the VMM's limit")
            )));
        }
        Ok((mib, vcpus))
    }

    fn vm_config(&self, instance: &Instance, image: &Image) -> Result<VmConfig, ApiError> {
        let (memory_mib, vcpus) = self.sizing(instance)?;
        let kernel = self.kernel().ok_or_else(no_kernel)?;
        let dir = self.dir(&instance.name);
        let mut cmdline = format!("console=ttyS0 quiet ltv.hostname={}", instance.name);
        let init = instance
            .config
            .env
            .iter()
            .find_map(|e| e.strip_prefix("LTV_INIT="))
            .map(str::to_string)
            .or_else(|| image.init.clone());
        if let Some(init) = init.filter(|i| !i.is_empty() && !i.contains(char::is_whitespace)) {
            cmdline.push_str(&format!(" ltv.init={init}"));
        }
        Ok(VmConfig {
            kernel,
            initrd: Some(dir.join("initramfs.cpio")),
            cmdline,
            memory_mib,
            vcpus,
            console_log: dir.join("console.log"),
            console_stdout: false,
            console_stdin: false,
            control_socket: Some(dir.join("vmm.sock")),
            hugepages: false,
            boot_protocol: Default::default(),
        })
    }
}

fn no_kernel() -> ApiError {
    ApiError::bad_request("no guest kernel: build it with guest-kernel/build.sh (or pass --kernel)")
}

/// The newest `<cache>/kernel/*/vmlinux` that guest-kernel/build.sh left.
fn newest_cached_kernel() -> Option<PathBuf> {
    let cache = std::env::var_os("LTV_CACHE_DIR").unwrap_or_else(|| "/var/cache/ltv".into());
    std::fs::read_dir(Path::new(&cache).join("kernel"))
        .ok()?
        .filter_map(|e| {
            let p = e.ok()?.path().join("vmlinux");
            let mtime = p.metadata().ok()?.modified().ok()?;
            Some((mtime, p))
        })
        .max()
        .map(|(_, p)| p)
}

/// Is `pid` gone or a zombie (exited, not yet reaped)?
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .is_none_or(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn timeout_from_env() -> Duration {
    std::env::var("LTV_VM_BOOT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map_or(DEFAULT_BOOT_TIMEOUT, Duration::from_secs_f64)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("runtime task failed: {e}")))
}

fn kill9(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

#[async_trait]
impl Backend for VmBackend {
    fn available(&self) -> bool {
        self.flavour != Flavour::None
    }

    fn validate(&self, instance: &Instance, image: &Image) -> Result<(), ApiError> {
        debug_assert_eq!(instance.kind, Kind::Vm);
        if !self.available() {
            return Err(ApiError::bad_request("no usable /dev/kvm on this host"));
        }
        if !instance.config.command.is_empty() {
            return Err(ApiError::bad_request(
                "a command for a microVM arrives with the guest agent: launch it without one",
            ));
        }
        if instance.config.pids.is_some() {
            return Err(ApiError::bad_request(
                "a pids limit does not apply to microVMs",
            ));
        }
        self.vm_config(instance, image).map(|_| ())
    }

    async fn create(&self, instance: &Instance, image: &Image) -> Result<(), ApiError> {
        let dir = self.dir(&instance.name);
        let rootfs = self.images_dir.join(&image.fingerprint).join("rootfs");
        let name = instance.name.clone();
        blocking(move || {
            std::fs::create_dir_all(&dir)?;
            initramfs::build(&rootfs, &dir.join("initramfs.cpio"), &name)
        })
        .await?
        .map_err(|e| ApiError::internal(format!("build the initramfs: {e}")))
    }

    async fn start(
        &self,
        instance: &Instance,
        image: &Image,
        _stdio: Stdio,
        _tty: bool,
    ) -> Result<Started, ApiError> {
        let config = self.vm_config(instance, image)?;
        let dir = self.dir(&instance.name);
        let console = config.console_log.clone();
        let vmm_log = dir.join("vmm.log");
        let config_path = dir.join("vmm.json");
        // A marker left by the previous boot must not count.
        let _ = std::fs::remove_file(&console);
        if let Some(sock) = &config.control_socket {
            let _ = std::fs::remove_file(sock);
        }
        let json = serde_json::to_vec_pretty(&config)
            .map_err(|e| ApiError::internal(format!("VMM config: {e}")))?;
        std::fs::write(&config_path, json)
            .map_err(|e| ApiError::internal(format!("write {}: {e}", config_path.display())))?;
        let log = std::fs::File::create(&vmm_log)
            .map_err(|e| ApiError::internal(format!("create {}: {e}", vmm_log.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| ApiError::internal(format!("vmm log: {e}")))?;
        let t = Instant::now();
        // Its own process group: a Ctrl-C on the daemon's terminal must not reach it.
        let mut child = std::process::Command::new("/proc/self/exe")
            .arg("vmm")
            .arg("--config")
            .arg(&config_path)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .map_err(|e| ApiError::internal(format!("spawn the VMM: {e}")))?;
        let pid = child.id() as i32;
        let start_time = ltv_containers::process::proc_start_time(pid).unwrap_or_default();
        let deadline = t + timeout_from_env();
        let failure = loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let text = std::fs::read(&console).unwrap_or_default();
            if text
                .windows(READY_MARKER.len())
                .any(|w| w == READY_MARKER.as_bytes())
            {
                tracing::info!(instance = %instance.name, pid, secs = t.elapsed().as_secs_f64(), "microVM ready");
                // The supervisor waits for it from here on.
                drop(child);
                return Ok(Started { pid, start_time });
            }
            if exited(pid) {
                break "the VMM exited before the guest was ready".to_string();
            }
            if Instant::now() > deadline {
                break format!(
                    "no {READY_MARKER} on the console within {:.0} s",
                    timeout_from_env().as_secs_f64()
                );
            }
        };
        // Not supervised yet, so we reap it ourselves.
        kill9(pid);
        let _ = blocking(move || child.wait()).await;
        Err(ApiError::internal(format!(
            "microVM {:?} did not boot: {failure}\n--- VMM log (tail) ---\n{}\n--- console (last 20 lines) ---\n{}",
            instance.name,
            tail(&vmm_log, 10),
            tail(&console, 20)
        )))
    }

    async fn signal_stop(&self, instance: &Instance, pid: i32, kill: bool) -> Result<(), ApiError> {
        if !kill {
            let sock = self.dir(&instance.name).join("vmm.sock");
            let asked = blocking(move || -> std::io::Result<String> {
                let mut s = std::os::unix::net::UnixStream::connect(sock)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"{\"action\":\"stop\"}\n")?;
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line)?;
                Ok(line)
            })
            .await?;
            match asked {
                Ok(answer) if answer.contains("\"ok\":true") => return Ok(()),
                other => {
                    tracing::warn!(instance = %instance.name, ?other, "VMM stop request failed; killing it")
                }
            }
        }
        kill9(pid);
        Ok(())
    }

    async fn cleanup(&self, instance: &Instance) -> Result<(), ApiError> {
        let _ = std::fs::remove_file(self.dir(&instance.name).join("vmm.sock"));
        Ok(())
    }

    async fn delete(&self, instance: &Instance) -> Result<(), ApiError> {
        let dir = self.dir(&instance.name);
        super::remove_instance_dir(&dir)
    }

    async fn exec(
        &self,
        _instance: &Instance,
        _image: &Image,
        _pid: i32,
        _req: &ExecPost,
        _stdio: Stdio,
    ) -> Result<Started, ApiError> {
        Err(ApiError::not_implemented(
            "exec into microVMs arrives with the guest agent",
        ))
    }

    async fn usage(&self, instance: &Instance) -> Option<Usage> {
        let pid = instance.pid?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name: state is 3rd, utime 14th, stime 15th.
        let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: u64 = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let memory_limit = parse_size(instance.config.memory.as_deref().unwrap_or("256MiB")).ok();
        Some(Usage {
            memory_bytes: rss_kib * 1024,
            memory_limit_bytes: memory_limit,
            pids: 1,
            cpu_time_ns: ticks * (1_000_000_000 / hz),
        })
    }
}

/// The guest's initramfs: an uncompressed newc cpio (the only kind that unpacks in
/// reasonable time on kvm-pvm). Written by hand: it is ~60 lines, needs device nodes and
/// root ownership without touching the host filesystem, and streams files from disk.
pub mod initramfs {
    use super::*;
    use std::io::{self, BufWriter, Read};

    enum Source {
        Dir,
        File(PathBuf),
        Data(Vec<u8>),
        Symlink(String),
        Node(u32, u32),
    }

    struct Entry {
        mode: u32,
        mtime: u64,
        src: Source,
    }

    type Tree = BTreeMap<String, Entry>;

    /// `rootfs` plus `ltv` as `/sbin/ltv` and `/init`, its shared libraries and loader,
    /// and `/etc/hostname` (an image's boot scripts set the hostname from it).
    pub fn build(rootfs: &Path, out: &Path, hostname: &str) -> io::Result<()> {
        let mut tree = Tree::new();
        walk(rootfs, "", &mut tree)?;
        let etc_hostname = resolve(&tree, "etc/hostname");
        ensure_parents(&mut tree, &etc_hostname);
        tree.insert(
            etc_hostname,
            Entry {
                mode: libc::S_IFREG | 0o644,
                mtime: 0,
                src: Source::Data(format!("{hostname}\n").into_bytes()),
            },
        );
        for d in ["proc", "sys", "dev", "sbin"] {
            let p = resolve(&tree, d);
            ensure_parents(&mut tree, &format!("{p}/x"));
        }
        let console = resolve(&tree, "dev/console");
        tree.entry(console).or_insert(Entry {
            mode: libc::S_IFCHR | 0o600,
            mtime: 0,
            src: Source::Node(5, 1),
        });
        // Our own binary, stripped: debug info would make the guest unpack tens of MB.
        let exe = PathBuf::from(format!("/proc/{}/exe", std::process::id()));
        let stripped = out.with_file_name(".ltv.stripped");
        let ok = std::process::Command::new("strip")
            .arg("--strip-all")
            .arg("-o")
            .arg(&stripped)
            .arg(&exe)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            std::fs::copy(&exe, &stripped)?;
        }
        let ltv = resolve(&tree, "sbin/ltv");
        add_file(&mut tree, &ltv, &stripped, 0o755)?;
        tree.insert(
            "init".into(),
            Entry {
                mode: libc::S_IFLNK | 0o777,
                mtime: 0,
                src: Source::Symlink(format!("/{ltv}")),
            },
        );
        for lib in shared_libraries()? {
            let at = resolve(&tree, lib.trim_start_matches('/'));
            let real = std::fs::canonicalize(&lib)?;
            add_file(&mut tree, &at, &real, 0o755)?;
        }
        let tmp = out.with_extension("cpio.tmp");
        let mut w = BufWriter::new(std::fs::File::create(&tmp)?);
        write_all(&mut w, &tree)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        let _ = std::fs::remove_file(&stripped);
        std::fs::rename(&tmp, out)
    }

    fn walk(root: &Path, rel: &str, tree: &mut Tree) -> io::Result<()> {
        for e in std::fs::read_dir(root.join(rel))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let md = std::fs::symlink_metadata(e.path())?;
            let ft = md.file_type();
            let src = if ft.is_dir() {
                Source::Dir
            } else if ft.is_file() {
                Source::File(e.path())
            } else if ft.is_symlink() {
                Source::Symlink(std::fs::read_link(e.path())?.to_string_lossy().into_owned())
            } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
                let rdev = md.rdev();
                Source::Node(libc::major(rdev), libc::minor(rdev))
            } else {
                continue; // sockets
            };
            let is_dir = ft.is_dir();
            tree.insert(
                path.clone(),
                Entry {
                    mode: md.mode(),
                    mtime: md.mtime().max(0) as u64,
                    src,
                },
            );
            if is_dir {
                walk(root, &path, tree)?;
            }
        }
        Ok(())
    }

    /// `path` with the symlinks among its parents resolved as the guest will see them.
    fn resolve(tree: &Tree, path: &str) -> String {
        let mut todo: std::collections::VecDeque<String> = path
            .split('/')
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect();
        let file = todo.pop_back().unwrap_or_default();
        let mut out: Vec<String> = vec![];
        let mut hops = 0;
        while let Some(p) = todo.pop_front() {
            match p.as_str() {
                "." => continue,
                ".." => {
                    out.pop();
                    continue;
                }
                _ => out.push(p),
            }
            if let Some(Entry {
                src: Source::Symlink(target),
                ..
            }) = tree.get(&out.join("/"))
            {
                hops += 1;
                if hops > 40 {
                    break;
                }
                out.pop();
                if target.starts_with('/') {
                    out.clear();
                }
                for q in target.split('/').filter(|q| !q.is_empty()).rev() {
                    todo.push_front(q.to_string());
                }
            }
        }
        out.push(file);
        out.join("/")
    }

    fn ensure_parents(tree: &mut Tree, path: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for p in &parts[..parts.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(p);
            tree.entry(prefix.clone()).or_insert(Entry {
                mode: libc::S_IFDIR | 0o755,
                mtime: 0,
                src: Source::Dir,
            });
        }
    }

    fn add_file(tree: &mut Tree, at: &str, from: &Path, perm: u32) -> io::Result<()> {
        let md = std::fs::metadata(from)?;
        ensure_parents(tree, at);
        tree.insert(
            at.to_string(),
            Entry {
                mode: libc::S_IFREG | (md.mode() & 0o7777 | perm & 0o111),
                mtime: md.mtime().max(0) as u64,
                src: Source::File(from.to_path_buf()),
            },
        );
        Ok(())
    }

    /// Every shared object mapped into the daemon, and its program interpreter.
    fn shared_libraries() -> io::Result<Vec<String>> {
        let maps = std::fs::read_to_string("/proc/self/maps")?;
        let mut libs: Vec<String> = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .filter(|p| {
                p.starts_with('/')
                    && Path::new(p)
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().contains(".so"))
            })
            .map(String::from)
            .collect();
        if let Some(interp) = interpreter(&std::fs::read("/proc/self/exe")?) {
            libs.push(interp);
        }
        libs.sort();
        libs.dedup();
        Ok(libs)
    }

    /// PT_INTERP of a 64-bit little-endian ELF, e.g. `/lib64/ld-linux-x86-64.so.2`.
    fn interpreter(elf: &[u8]) -> Option<String> {
        let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
        let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
        if elf.get(..5)? != b"\x7fELF\x02" {
            return None;
        }
        let phoff = u64_at(0x20)? as usize;
        let (phentsize, phnum) = (u16_at(0x36)? as usize, u16_at(0x38)? as usize);
        (0..phnum).find_map(|i| {
            let ph = phoff + i * phentsize;
            if u32::from_le_bytes(elf.get(ph..ph + 4)?.try_into().ok()?) != libc::PT_INTERP {
                return None;
            }
            let (off, size) = (u64_at(ph + 8)? as usize, u64_at(ph + 32)? as usize);
            let raw = elf.get(off..off + size)?;
            Some(String::from_utf8_lossy(raw.split(|b| *b == 0).next()?).into_owned())
        })
    }

    fn write_all(w: &mut impl Write, tree: &Tree) -> io::Result<()> {
        let mut ino = 1u32;
        for (name, e) in tree {
            ino += 1;
            match &e.src {
                Source::Dir => header(w, ino, e.mode, 2, e.mtime, 0, (0, 0), name)?,
                Source::Node(maj, min) => {
                    header(w, ino, e.mode, 1, e.mtime, 0, (*maj, *min), name)?
                }
                Source::Symlink(t) => {
                    header(w, ino, e.mode, 1, e.mtime, t.len() as u32, (0, 0), name)?;
                    w.write_all(t.as_bytes())?;
                    pad(w, t.len())?;
                }
                Source::Data(d) => {
                    header(w, ino, e.mode, 1, e.mtime, d.len() as u32, (0, 0), name)?;
                    w.write_all(d)?;
                    pad(w, d.len())?;
                }
                Source::File(p) => {
                    let mut f = std::fs::File::open(p)?;
                    let len = f.metadata()?.len();
                    let size = u32::try_from(len).map_err(|_| {
                        io::Error::other(format!("{} is too big for cpio", p.display()))
                    })?;
                    header(w, ino, e.mode, 1, e.mtime, size, (0, 0), name)?;
                    let copied = io::copy(&mut (&mut f).take(len), w)?;
                    if copied != len {
                        return Err(io::Error::other(format!(
                            "{} changed while read",
                            p.display()
                        )));
                    }
                    pad(w, len as usize)?;
                }
            }
        }
        header(w, 0, 0, 1, 0, 0, (0, 0), "TRAILER!!!")
    }

    #[allow(clippy::too_many_arguments)]
    fn header(
        w: &mut impl Write,
        ino: u32,
        mode: u32,
        nlink: u32,
        mtime: u64,
        size: u32,
        rdev: (u32, u32),
        name: &str,
    ) -> io::Result<()> {
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            mtime as u32,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        let mut h = String::from("070701");
        for f in fields {
            h.push_str(&format!("{f:08x}"));
        }
        w.write_all(h.as_bytes())?;
        w.write_all(name.as_bytes())?;
        w.write_all(&[0])?;
        pad(w, h.len() + name.len() + 1)
    }

    fn pad(w: &mut impl Write, len: usize) -> io::Result<()> {
        w.write_all(&[0u8; 3][..(4 - len % 4) % 4])
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn resolves_symlinked_parents() {
            let mut t = Tree::new();
            let link = |to: &str| Entry {
                mode: libc::S_IFLNK | 0o777,
                mtime: 0,
                src: Source::Symlink(to.into()),
            };
            t.insert("lib64".into(), link("usr/lib64"));
            t.insert("sbin".into(), link("/usr/sbin"));
            assert_eq!(resolve(&t, "lib64/ld.so"), "usr/lib64/ld.so");
            assert_eq!(resolve(&t, "/sbin/ltv"), "usr/sbin/ltv");
            assert_eq!(resolve(&t, "bin/sh"), "bin/sh");
        }

        #[test]
        fn cpio_is_newc_and_padded() {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("etc")).unwrap();
            std::fs::write(dir.path().join("etc/hi"), b"hello").unwrap();
            let mut t = Tree::new();
            walk(dir.path(), "", &mut t).unwrap();
            let mut out = Vec::new();
            write_all(&mut out, &t).unwrap();
            assert!(out.starts_with(b"070701"));
            assert_eq!(out.len() % 4, 0);
            let text = String::from_utf8_lossy(&out);
            assert!(
                text.contains("etc/hi\0")
                    && text.contains("hello")
                    && text.contains("TRAILER!!!\0")
            );
        }

        #[test]
        fn our_interpreter_is_found() {
            let exe = std::fs::read("/proc/self/exe").unwrap();
            let interp = interpreter(&exe);
            // Static builds have none; dynamic ones name the loader.
            assert!(interp.is_none_or(|i| i.starts_with('/') && i.contains("ld")));
        }
    }
}
