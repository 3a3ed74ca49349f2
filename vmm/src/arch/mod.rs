//! x86-64 specifics: guest memory layout, boot tables, CPU state values.
//! Pure functions over guest memory or plain structs, so they unit-test without KVM.

pub mod cpuid;
pub mod layout;
pub mod memmap;
pub mod mptable;
pub mod msr;
pub mod regs;
