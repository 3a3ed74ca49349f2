//! The microVM config: parsed from JSON and validated once, here, at the edge.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Smallest guest the kernel can boot in.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Upper bound on vCPUs (fits the MP table and the APIC id space we hand out).
pub const MAX_VCPUS: u32 = 32;

/// Which boot protocol to use for an ELF kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    /// PVH if the ELF has the PVH note, else the 64-bit Linux boot protocol.
    #[default]
    Auto,
    /// Require the PVH entry point.
    Pvh,
    /// Always use the 64-bit Linux boot protocol (boot_params).
    Linux,
}

/// The plain config of one microVM, as written in the JSON file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest kernel: an ELF vmlinux (preferred) or a bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs (an uncompressed cpio boots fastest on PVM).
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; the builder appends what the host needs.
    #[serde(default)]
    pub cmdline: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// File that receives the guest's serial console output.
    pub console_log: PathBuf,
    /// Also copy the console to our stdout.
    #[serde(default)]
    pub console_stdout: bool,
    /// Feed our stdin to the guest console (raw mode when it is a terminal).
    #[serde(default)]
    pub console_stdin: bool,
    /// Unix socket for JSON-lines control requests (status/pause/resume/stop).
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Back guest memory with MAP_HUGETLB 2 MiB pages.
    #[serde(default)]
    pub hugepages: bool,
    #[serde(default)]
    pub boot_protocol: BootProtocol,
    /// virtio-blk disks, in order: the first is `/dev/vda`.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// A virtio-net NIC on an existing TAP device.
    #[serde(default)]
    pub net: Option<NetConfig>,
    /// A virtio-vsock device in Firecracker's hybrid (Unix socket) mode.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// A raw image file.
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Serial the guest sees (`/sys/block/vdX/serial`), at most 20 bytes.
    #[serde(default)]
    pub id: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// A TAP device that already exists (the daemon creates it and puts it on its bridge).
    pub tap: String,
    /// `aa:bb:cc:dd:ee:ff`
    pub mac: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id, 3 or more.
    pub guest_cid: u64,
    /// Host side: connect here and send `CONNECT <port>`; guest connections to port P
    /// arrive at `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// At most this many virtio devices (one 4 KiB window and one IRQ each).
pub const MAX_VIRTIO_DEVICES: usize = 8;

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = text
        .split(':')
        .map(|p| {
            (p.len() == 2)
                .then(|| u8::from_str_radix(p, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()?;
    parts.try_into().ok()
}

/// What kind of kernel file we were given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// A config that passed validation; the builder only accepts this.
#[derive(Clone, Debug)]
pub struct ValidatedConfig {
    pub config: VmConfig,
    pub kernel_format: KernelFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}: {1}")]
    ReadFile(PathBuf, std::io::Error),
    #[error("config is not valid JSON for a microVM: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u32),
    #[error("memory_mib must be at least {MIN_MEMORY_MIB}, got {0}")]
    MemoryTooSmall(u64),
    #[error("memory_mib {0} exceeds the host's available memory ({1} MiB)")]
    MemoryTooLarge(u64, u64),
    #[error("memory_mib must be a multiple of 2 with hugepages, got {0}")]
    HugepageAlign(u64),
    #[error("kernel {0}: {1}")]
    KernelUnreadable(PathBuf, std::io::Error),
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    KernelFormat(PathBuf),
    #[error("boot_protocol {0:?} needs an ELF vmlinux, but {1} is a bzImage")]
    ProtocolNeedsElf(BootProtocol, PathBuf),
    #[error("initrd {0}: {1}")]
    InitrdUnreadable(PathBuf, std::io::Error),
    #[error("console_log {0}: parent directory does not exist")]
    ConsoleDir(PathBuf),
    #[error("control_socket {0}: parent directory does not exist")]
    ControlDir(PathBuf),
    #[error("cmdline contains a NUL or non-ASCII byte")]
    Cmdline,
    #[error("disk {0}: {1}")]
    DiskUnreadable(PathBuf, std::io::Error),
    #[error("disk id {0:?} is longer than 20 bytes")]
    DiskId(String),
    #[error("too many virtio devices: at most {MAX_VIRTIO_DEVICES}")]
    TooManyDevices,
    #[error("net: {0}")]
    Net(String),
    #[error("vsock: {0}")]
    Vsock(String),
}

impl VmConfig {
    /// Reads and parses a JSON config file (no validation).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::ReadFile(path.to_path_buf(), e))?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Validates against this host (MemAvailable from /proc/meminfo).
    pub fn validate(self) -> Result<ValidatedConfig, ConfigError> {
        let avail = host_mem_available_mib();
        self.validate_with(avail)
    }

    /// Validation with an explicit host memory budget, for tests.
    pub fn validate_with(
        self,
        host_avail_mib: Option<u64>,
    ) -> Result<ValidatedConfig, ConfigError> {
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(self.memory_mib));
        }
        if let Some(avail) = host_avail_mib {
            if self.memory_mib > avail {
                return Err(ConfigError::MemoryTooLarge(self.memory_mib, avail));
            }
        }
        if self.hugepages && !self.memory_mib.is_multiple_of(2) {
            return Err(ConfigError::HugepageAlign(self.memory_mib));
        }
        if !self.cmdline.is_ascii() || self.cmdline.contains('\0') {
            return Err(ConfigError::Cmdline);
        }
        let kernel_format = detect_kernel_format(&self.kernel)?;
        if kernel_format == KernelFormat::BzImage && self.boot_protocol != BootProtocol::Auto {
            return Err(ConfigError::ProtocolNeedsElf(
                self.boot_protocol,
                self.kernel.clone(),
            ));
        }
        if let Some(initrd) = &self.initrd {
            File::open(initrd).map_err(|e| ConfigError::InitrdUnreadable(initrd.clone(), e))?;
        }
        if !parent_exists(&self.console_log) {
            return Err(ConfigError::ConsoleDir(self.console_log.clone()));
        }
        if let Some(sock) = &self.control_socket {
            if !parent_exists(sock) {
                return Err(ConfigError::ControlDir(sock.clone()));
            }
        }
        for d in &self.disks {
            File::open(&d.path).map_err(|e| ConfigError::DiskUnreadable(d.path.clone(), e))?;
            if d.id.len() > 20 {
                return Err(ConfigError::DiskId(d.id.clone()));
            }
        }
        let devices =
            self.disks.len() + usize::from(self.net.is_some()) + usize::from(self.vsock.is_some());
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices);
        }
        if let Some(n) = &self.net {
            if n.tap.is_empty() || n.tap.len() > 15 || n.tap.contains(['/', ' ', '\0']) {
                return Err(ConfigError::Net(format!("bad TAP name {:?}", n.tap)));
            }
            if parse_mac(&n.mac).is_none() {
                return Err(ConfigError::Net(format!("bad MAC address {:?}", n.mac)));
            }
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 || v.guest_cid > u64::from(u32::MAX) {
                return Err(ConfigError::Vsock(format!(
                    "guest_cid {} is reserved or too big: use 3 or more",
                    v.guest_cid
                )));
            }
            if !parent_exists(&v.uds_path) {
                return Err(ConfigError::Vsock(format!(
                    "{}: parent directory does not exist",
                    v.uds_path.display()
                )));
            }
        }
        Ok(ValidatedConfig {
            config: self,
            kernel_format,
        })
    }
}

fn parent_exists(p: &Path) -> bool {
    match p.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => dir.is_dir(),
        None => true,
    }
}

/// Sniffs the kernel's magic: ELF64 x86-64, or a bzImage setup header ("HdrS" at 0x202).
pub fn detect_kernel_format(path: &Path) -> Result<KernelFormat, ConfigError> {
    let mut f =
        File::open(path).map_err(|e| ConfigError::KernelUnreadable(path.to_path_buf(), e))?;
    let mut head = vec![0u8; 0x210];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(ConfigError::KernelUnreadable(path.to_path_buf(), e)),
        }
    }
    // ELF64 (class 2), little-endian, machine x86-64 (62).
    if n >= 20 && head[..4] == *b"\x7fELF" && head[4] == 2 && head[5] == 1 && head[18] == 62 {
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" && head[0x1fe..0x200] == [0x55, 0xaa] {
        return Ok(KernelFormat::BzImage);
    }
    Err(ConfigError::KernelFormat(path.to_path_buf()))
}

/// MemAvailable in MiB, or None if /proc/meminfo can't tell.
pub fn host_mem_available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available_mib(&text)
}

fn parse_mem_available_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn elf_file() -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[18] = 62;
        f.write_all(&h).unwrap();
        f
    }

    fn cfg(kernel: &Path) -> VmConfig {
        VmConfig {
            kernel: kernel.to_path_buf(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            memory_mib: 128,
            vcpus: 1,
            console_log: std::env::temp_dir().join("ltv-console.log"),
            console_stdout: false,
            console_stdin: false,
            control_socket: None,
            hugepages: false,
            boot_protocol: BootProtocol::Auto,
            disks: vec![],
            net: None,
            vsock: None,
        }
    }

    #[test]
    fn rejects_bad_devices() {
        let k = elf_file();
        let mut c = cfg(k.path());
        c.disks.push(DiskConfig {
            path: "/nonexistent/disk.img".into(),
            read_only: false,
            id: String::new(),
        });
        assert!(matches!(
            c.validate_with(None),
            Err(ConfigError::DiskUnreadable(..))
        ));
        let mut c = cfg(k.path());
        c.vsock = Some(VsockConfig {
            guest_cid: 2,
            uds_path: "/tmp/v.sock".into(),
        });
        assert!(matches!(c.validate_with(None), Err(ConfigError::Vsock(_))));
        let mut c = cfg(k.path());
        c.net = Some(NetConfig {
            tap: "tap0".into(),
            mac: "02:00:zz:00:00:01".into(),
        });
        assert!(matches!(c.validate_with(None), Err(ConfigError::Net(_))));
        assert_eq!(parse_mac("02:0a:00:00:00:ff"), Some([2, 10, 0, 0, 0, 255]));
        assert_eq!(parse_mac("02:0a:00:00:00"), None);
    }

    #[test]
    fn accepts_good_config() {
        let k = elf_file();
        let v = cfg(k.path()).validate_with(Some(1024)).unwrap();
        assert_eq!(v.kernel_format, KernelFormat::Elf);
    }

    #[test]
    fn rejects_vcpu_counts() {
        let k = elf_file();
        for n in [0, 33] {
            let mut c = cfg(k.path());
            c.vcpus = n;
            let e = c.validate_with(Some(1024)).unwrap_err();
            assert!(matches!(e, ConfigError::Vcpus(x) if x == n));
            assert!(e.to_string().contains("between 1 and 32"));
        }
    }

    #[test]
    fn rejects_memory() {
        let k = elf_file();
        let mut c = cfg(k.path());
        c.memory_mib = 8;
        assert!(matches!(
            c.validate_with(None),
            Err(ConfigError::MemoryTooSmall(8))
        ));
        let mut c = cfg(k.path());
        c.memory_mib = 4096;
        assert!(matches!(
            c.validate_with(Some(2048)),
            Err(ConfigError::MemoryTooLarge(4096, 2048))
        ));
        let mut c = cfg(k.path());
        c.memory_mib = 129;
        c.hugepages = true;
        assert!(matches!(
            c.validate_with(None),
            Err(ConfigError::HugepageAlign(129))
        ));
    }

    #[test]
    fn rejects_bad_kernels() {
        let mut junk = tempfile::NamedTempFile::new().unwrap();
        junk.write_all(&[0xAB; 4096]).unwrap();
        let e = cfg(junk.path()).validate_with(None).unwrap_err();
        assert!(matches!(e, ConfigError::KernelFormat(_)), "{e}");
        let e = cfg(Path::new("/nonexistent/vmlinux"))
            .validate_with(None)
            .unwrap_err();
        assert!(matches!(e, ConfigError::KernelUnreadable(..)), "{e}");
    }

    #[test]
    fn rejects_missing_directories() {
        let k = elf_file();
        let mut c = cfg(k.path());
        c.console_log = "/nonexistent-dir/console.log".into();
        assert!(matches!(
            c.validate_with(None),
            Err(ConfigError::ConsoleDir(_))
        ));
        let mut c = cfg(k.path());
        c.control_socket = Some("/nonexistent-dir/ctl.sock".into());
        assert!(matches!(
            c.validate_with(None),
            Err(ConfigError::ControlDir(_))
        ));
    }

    #[test]
    fn detects_bzimage() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut h = vec![0u8; 0x300];
        h[0x1fe] = 0x55;
        h[0x1ff] = 0xaa;
        h[0x202..0x206].copy_from_slice(b"HdrS");
        f.write_all(&h).unwrap();
        assert_eq!(
            detect_kernel_format(f.path()).unwrap(),
            KernelFormat::BzImage
        );
        let mut c = cfg(f.path());
        c.boot_protocol = BootProtocol::Pvh;
        assert!(matches!(
            c.validate_with(None),
            Err(ConfigError::ProtocolNeedsElf(..))
        ));
    }

    #[test]
    fn rejects_unknown_fields_and_parses_defaults() {
        let e = serde_json::from_str::<VmConfig>(
            r#"{"kernel":"k","memory_mib":1,"vcpus":1,"console_log":"c","bogus":1}"#,
        );
        assert!(e.is_err());
        let c: VmConfig =
            serde_json::from_str(r#"{"kernel":"k","memory_mib":64,"vcpus":2,"console_log":"c"}"#)
                .unwrap();
        assert_eq!(c.boot_protocol, BootProtocol::Auto);
        assert!(c.initrd.is_none() && !c.hugepages);
    }

    #[test]
    fn parses_meminfo() {
        let m = "MemTotal: 100 kB\nMemAvailable:    2097152 kB\n";
        assert_eq!(parse_mem_available_mib(m), Some(2048));
    }
}
