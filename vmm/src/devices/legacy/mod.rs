//! Legacy PC devices: the COM1 UART and the i8042 reset line.

pub mod i8042;
pub mod serial;
