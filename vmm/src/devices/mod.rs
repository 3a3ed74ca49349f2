//! Emulated devices and the buses they sit on.

pub mod bus;
pub mod legacy;
pub mod virtio;
