//! The KVM VM: memory slots, in-kernel irqchip + PIT, TSS/identity map, interrupt lines.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not 12")]
    ApiVersion(i32),
    #[error("KVM_CREATE_VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION slot {0}: {1}")]
    MemoryRegion(u32, kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR: {0}")]
    Tss(kvm_ioctls::Error),
    #[error("KVM_SET_IDENTITY_MAP_ADDR: {0}")]
    IdentityMap(kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP: {0}")]
    IrqChip(kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2: {0}")]
    Pit(kvm_ioctls::Error),
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("KVM_IRQFD for GSI {0}: {1}")]
    Irqfd(u32, kvm_ioctls::Error),
}

/// Owns the KVM system fd and the VM fd.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    supported_cpuid: CpuId,
}

impl Vm {
    /// Opens /dev/kvm and creates a VM with the x86 platform pieces a Linux guest expects.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let v = kvm.get_api_version();
        if v != 12 {
            return Err(VmError::ApiVersion(v));
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(VmError::Tss)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(VmError::IdentityMap)?;
        fd.create_irq_chip().map_err(VmError::IrqChip)?;
        let pit = kvm_pit_config {
            // Port 0x61 speaker stays a dummy: no PC speaker emulation needed.
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::Pit)?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::SupportedCpuid)?;
        Ok(Vm {
            kvm,
            fd,
            supported_cpuid,
        })
    }

    /// Registers every guest memory region as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the mapping stays alive as long as `mem`, which the Vmm keeps until exit.
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(|e| VmError::MemoryRegion(slot as u32, e))?;
        }
        Ok(())
    }

    /// Wires an eventfd to a GSI so a device can raise its IRQ without a vCPU exit.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| VmError::Irqfd(gsi, e))
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }
}
