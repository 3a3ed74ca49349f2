//! Legacy PC devices: the COM1 UART, the i8042 reset line and the CMOS clock.

pub mod cmos;
pub mod i8042;
pub mod serial;
