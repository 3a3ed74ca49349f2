//! Emulated devices and the buses they sit on. Virtio-mmio devices get their own folders later.

pub mod bus;
pub mod legacy;
