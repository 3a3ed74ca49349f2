//! Assembles a ready-to-run microVM from a validated config: memory, VM, kernel, boot tables,
//! devices, vCPUs. Nothing here runs the guest.

use std::fs::OpenOptions;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{cpuid, layout, mptable};
use crate::boot::{self, BootError};
use crate::config::ValidatedConfig;
use crate::config::VmConfig;
use crate::control::ControlSocket;
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::cmos::{Cmos, CMOS_BASE, CMOS_LEN};
use crate::devices::legacy::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::legacy::serial::{spawn_stdin_reader, Console, SerialDevice};
use crate::devices::virtio::blk::Block;
use crate::devices::virtio::mmio::{MmioTransport, MMIO_LEN, QUEUE_NOTIFY};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;
use crate::flavour::{
    max_vcpus_for, pvm_compat_cmdline, Flavour, PVM_DEFAULT_ARGS, PVM_GUEST_PATCH_SWITCH,
};
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};
use crate::VmmEvent;
use kvm_ioctls::IoEventAddress;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("virtio device {0}: {1}")]
    Device(String, std::io::Error),
    #[error("no usable KVM: /dev/kvm is missing or cannot be opened")]
    NoKvm,
    #[error("{vcpus} vCPUs requested but this host allows {max}: {reason}")]
    TooManyVcpus {
        vcpus: u32,
        max: u32,
        reason: &'static str,
    },
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("{0}")]
    Vm(#[from] VmError),
    #[error("{0}")]
    Boot(#[from] BootError),
    #[error("MP table: {0}")]
    Mptable(#[from] mptable::MptableError),
    #[error("{0}")]
    Vcpu(#[from] VcpuError),
    #[error("device bus: {0}")]
    Bus(#[from] BusError),
    #[error("console log {0}: {1}")]
    Console(String, std::io::Error),
    #[error("control socket {0}: {1}")]
    Control(String, std::io::Error),
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("console stdin reader: {0}")]
    Stdin(std::io::Error),
}

impl BuildError {
    /// Errors the caller could fix in the config (exit code 2) versus host/internal ones.
    pub fn is_config_error(&self) -> bool {
        matches!(
            self,
            BuildError::TooManyVcpus { .. }
                | BuildError::Boot(BootError::NoPvhNote)
                | BuildError::Boot(BootError::Kernel(_))
                | BuildError::Boot(BootError::InitrdTooBig(_))
                | BuildError::Boot(BootError::Cmdline(_))
        )
    }
}

/// The config's virtio devices, named, in slot order: disks first, so the root disk is vda.
type NamedDevice = (String, Box<dyn VirtioDevice>);

fn virtio_devices(c: &VmConfig) -> Result<Vec<NamedDevice>, BuildError> {
    let mut out: Vec<NamedDevice> = Vec::new();
    for (i, d) in c.disks.iter().enumerate() {
        let name = format!("virtio-blk{i}");
        let dev = Block::new(&d.path, d.read_only, &d.id)
            .map_err(|e| BuildError::Device(name.clone(), e))?;
        out.push((name, Box::new(dev)));
    }
    if let Some(n) = &c.net {
        let mac = crate::config::parse_mac(&n.mac).ok_or_else(|| {
            BuildError::Device(
                "virtio-net".into(),
                std::io::Error::other("bad MAC address"),
            )
        })?;
        let dev = Net::new(&n.tap, mac).map_err(|e| BuildError::Device(n.tap.clone(), e))?;
        out.push(("virtio-net".into(), Box::new(dev)));
    }
    if let Some(v) = &c.vsock {
        let dev = Vsock::new(v.guest_cid, &v.uds_path)
            .map_err(|e| BuildError::Device("virtio-vsock".into(), e))?;
        out.push(("virtio-vsock".into(), Box::new(dev)));
    }
    Ok(out)
}

/// Puts a device on the MMIO bus at its slot: irqfd on its GSI, ioeventfds on QueueNotify.
/// Returns the `virtio_mmio.device=` argument that tells the guest where it is.
fn attach_virtio(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    index: usize,
    name: &str,
    device: Box<dyn VirtioDevice>,
) -> Result<String, BuildError> {
    let base = layout::VIRTIO_MMIO_BASE + index as u64 * MMIO_LEN;
    let gsi = layout::VIRTIO_IRQ_BASE + index as u32;
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&irqfd, gsi)?;
    let transport = MmioTransport::new(name, device, mem.clone(), irqfd)
        .map_err(|e| BuildError::Device(name.to_string(), e))?;
    for (queue, kick) in transport.kick_fds().iter().enumerate() {
        vm.fd()
            .register_ioevent(
                kick,
                &IoEventAddress::Mmio(base + QUEUE_NOTIFY),
                queue as u32,
            )
            .map_err(|e| BuildError::Device(name.to_string(), std::io::Error::from(e)))?;
    }
    mmio.insert(Arc::new(Mutex::new(transport)), base, MMIO_LEN)?;
    Ok(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"))
}

/// Command-line keys we add when the user did not set them: serial console, reboot through
/// the i8042 (our clean stop path), reboot on panic, no PCI probing.
const DEFAULT_ARGS: &[&str] = &["console=ttyS0", "reboot=k", "panic=1", "pci=off"];

/// The final command line: the user's, the devices', defaults for missing keys (on PVM its own
/// too), and the PVM compat switches. On PVM the guest-patch switch comes first: it is an early
/// parameter, and from there on the guest parses the rest of the line faster (patch 0007).
/// Arguments after `--` stay last: the kernel passes them to init.
pub fn assemble_cmdline(user: &str, devices: &[String], flavour: Flavour) -> String {
    let mut out: Vec<String> = user.split_whitespace().map(str::to_string).collect();
    let for_init = match out.iter().position(|a| a == "--") {
        Some(i) => out.split_off(i),
        None => Vec::new(),
    };
    out.extend_from_slice(devices);
    if flavour == Flavour::Pvm {
        out.insert(0, PVM_GUEST_PATCH_SWITCH.to_string());
    }
    let pvm_defaults = if flavour == Flavour::Pvm {
        PVM_DEFAULT_ARGS
    } else {
        &[]
    };
    for arg in DEFAULT_ARGS.iter().chain(pvm_defaults) {
        let key = arg.split('=').next().unwrap_or(arg);
        let present = out.iter().any(|a| a.split('=').next() == Some(key));
        if !present {
            out.push((*arg).to_string());
        }
    }
    if flavour == Flavour::Pvm {
        out.push(pvm_compat_cmdline());
    }
    out.extend(for_init);
    out.join(" ")
}

/// Everything the runtime loop needs; vCPUs are configured but not started.
pub struct MicroVm {
    pub vm: Vm,
    pub mem: GuestMemoryMmap,
    pub vcpus: Vec<Vcpu>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub events_tx: Sender<VmmEvent>,
    pub events_rx: Receiver<VmmEvent>,
    pub control: Option<ControlSocket>,
    pub flavour: Flavour,
    pub cmdline: String,
    pub pvh: bool,
    pub memory_mib: u64,
}

/// Allows more vCPUs than `max_vcpus_for` on PVM (oversubscribing host CPUs), for experiments.
pub const ALLOW_PVM_SMP_ENV: &str = "LTV_PVM_ALLOW_SMP";

pub fn build_microvm(cfg: &ValidatedConfig, flavour: Flavour) -> Result<MicroVm, BuildError> {
    let c = &cfg.config;
    if flavour == Flavour::None {
        return Err(BuildError::NoKvm);
    }
    let limit = max_vcpus_for(flavour);
    let override_smp = flavour == Flavour::Pvm && std::env::var_os(ALLOW_PVM_SMP_ENV).is_some();
    if c.vcpus > limit.max && !override_smp {
        return Err(BuildError::TooManyVcpus {
            vcpus: c.vcpus,
            max: limit.max,
            reason: limit.reason.unwrap_or("host limit"),
        });
    }

    let mem_size = c.memory_mib << 20;
    let mem = create_guest_memory(mem_size, c.hugepages)?;
    let vm = Vm::new()?;
    vm.register_memory(&mem)?;

    let kernel = boot::load_kernel(&mem, &c.kernel, cfg.kernel_format, c.boot_protocol)?;
    let initrd = match &c.initrd {
        Some(p) => Some(boot::load_initrd(&mem, mem_size, kernel.kernel_end, p)?),
        None => None,
    };
    let mut mmio = Bus::new();
    let mut device_args = Vec::new();
    for (index, (name, device)) in virtio_devices(c)?.into_iter().enumerate() {
        device_args.push(attach_virtio(&vm, &mem, &mut mmio, index, &name, device)?);
    }
    let cmdline = assemble_cmdline(&c.cmdline, &device_args, flavour);
    let cmdline_len = boot::write_cmdline(&mem, &cmdline)?;
    mptable::setup_mptable(&mem, c.vcpus)?;
    boot::write_boot_params(&mem, mem_size, &kernel, cmdline_len, initrd)?;

    let (events_tx, events_rx) = mpsc::channel();
    let log = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&c.console_log)
        .map_err(|e| BuildError::Console(c.console_log.display().to_string(), e))?;
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&irq, layout::COM1_IRQ)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        irq,
        Console::new(log, c.console_stdout, events_tx.clone()),
    )));
    if c.console_stdin {
        spawn_stdin_reader(serial.clone()).map_err(BuildError::Stdin)?;
    }
    let mut pio = Bus::new();
    pio.insert(serial, u64::from(layout::COM1_PORT), 8)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(events_tx.clone()))),
        I8042_BASE,
        I8042_LEN,
    )?;
    pio.insert(Arc::new(Mutex::new(Cmos::default())), CMOS_BASE, CMOS_LEN)?;

    let pvm = flavour == Flavour::Pvm;
    let mut vcpus = Vec::with_capacity(c.vcpus as usize);
    for id in 0..c.vcpus {
        let vcpu = Vcpu::new(&vm, id)?;
        let cpuid = cpuid::vcpu_cpuid(vm.supported_cpuid(), id, c.vcpus, pvm, vcpu.tsc_khz());
        vcpu.configure(&mem, &cpuid, kernel.entry, kernel.pvh)?;
        vcpus.push(vcpu);
    }

    let control = match &c.control_socket {
        Some(p) => Some(
            ControlSocket::start(p, events_tx.clone())
                .map_err(|e| BuildError::Control(p.display().to_string(), e))?,
        ),
        None => None,
    };

    Ok(MicroVm {
        vm,
        mem,
        vcpus,
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        events_tx,
        events_rx,
        control,
        flavour,
        cmdline,
        pvh: kernel.pvh,
        memory_mib: c.memory_mib,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_defaults_and_pvm() {
        let c = assemble_cmdline("console=hvc0 quiet", &[], Flavour::Hardware);
        assert_eq!(c, "console=hvc0 quiet reboot=k panic=1 pci=off");
        let c = assemble_cmdline("reboot=t", &[], Flavour::Pvm);
        assert!(c.starts_with(
            "ltv_pvm_compat reboot=t console=ttyS0 panic=1 pci=off clocksource=refined-jiffies noxsave"
        ));
        assert!(c.ends_with(&pvm_compat_cmdline()));
        // A clocksource of the user's own stays the only one.
        let own = assemble_cmdline("clocksource=tsc", &[], Flavour::Pvm);
        assert_eq!(own.matches("clocksource=").count(), 1, "{own}");
        assert!(!assemble_cmdline("", &[], Flavour::Hardware).contains("clocksource"));
        assert!(!assemble_cmdline("", &[], Flavour::Hardware).contains("noxsave"));
        assert!(!assemble_cmdline("", &[], Flavour::Hardware).contains("ltv_pvm_compat"));
        // Arguments for init stay behind `--`, after everything the kernel must see.
        let dev = ["virtio_mmio.device=4K@0xd0000000:5".to_string()];
        let c = assemble_cmdline("quiet -- single x=1", &dev, Flavour::Pvm);
        assert!(
            c.starts_with("ltv_pvm_compat quiet virtio_mmio.device=4K@0xd0000000:5 console=ttyS0"),
            "{c}"
        );
        assert!(
            c.ends_with(
                " nopv noreplace-smp rodata=off percpu_alloc=page no_timer_check -- single x=1"
            ),
            "{c}"
        );
    }
}
