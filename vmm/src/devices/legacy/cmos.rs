//! A read-only MC146818 CMOS clock on ports 0x70/0x71: the guest's wall-clock time at boot.
//!
//! A guest with kvmclock gets the time from KVM; on kvm-pvm the guest runs with `nopv` (no
//! kvmclock), and without a CMOS clock its clock started at 1999-11-30. Our own: the
//! rust-vmm crates have only ARM's PL031 clock. Writes (the guest setting the clock, the
//! NMI mask) are accepted and dropped; the time always follows the host's.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::devices::bus::BusDevice;

pub const CMOS_BASE: u64 = 0x70;
pub const CMOS_LEN: u64 = 2;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
/// Status A: no update in progress (UIP clear), the standard 32.768 kHz divider.
const REG_A: u8 = 0x0a;
const STATUS_A: u8 = 0x26;
/// Status B: 24-hour mode, BCD values.
const REG_B: u8 = 0x0b;
const STATUS_B: u8 = 0x02;
/// Status D: the battery is good, so the time is valid.
const REG_D: u8 = 0x0d;
const STATUS_D: u8 = 0x80;
const REG_CENTURY: u8 = 0x32;

pub struct Cmos {
    index: u8,
    now: fn() -> SystemTime,
}

impl Default for Cmos {
    fn default() -> Self {
        Cmos {
            index: 0,
            now: SystemTime::now,
        }
    }
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn bcd(v: u8) -> u8 {
    (v / 10) << 4 | (v % 10)
}

impl Cmos {
    /// The register `index` at time `now` (UTC, as Linux expects of a guest's clock).
    fn register(index: u8, now: SystemTime) -> u8 {
        let secs = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let (days, in_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (year, month, day) = civil_from_days(days);
        match index {
            REG_SECONDS => bcd((in_day % 60) as u8),
            REG_MINUTES => bcd((in_day / 60 % 60) as u8),
            REG_HOURS => bcd((in_day / 3600) as u8),
            // 1 = Sunday; 1970-01-01 was a Thursday.
            REG_WEEKDAY => bcd(((days + 4).rem_euclid(7) + 1) as u8),
            REG_DAY => bcd(day),
            REG_MONTH => bcd(month),
            REG_YEAR => bcd(year.rem_euclid(100) as u8),
            REG_CENTURY => bcd(year.div_euclid(100).clamp(0, 99) as u8),
            REG_A => STATUS_A,
            REG_B => STATUS_B,
            REG_D => STATUS_D,
            // Alarms, status C and the CMOS RAM: nothing set.
            _ => 0,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            1 => Self::register(self.index, (self.now)()),
            _ => self.index,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, Some(&b)) = (offset, data.first()) {
            // Bit 7 masks NMIs; the rest selects the register.
            self.index = b & 0x7f;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// (century, year, month, day, weekday, hours, minutes, seconds) as the guest reads them.
    fn clock(secs: u64) -> [u8; 8] {
        let r = |i| Cmos::register(i, at(secs));
        [
            r(REG_CENTURY),
            r(REG_YEAR),
            r(REG_MONTH),
            r(REG_DAY),
            r(REG_WEEKDAY),
            r(REG_HOURS),
            r(REG_MINUTES),
            r(REG_SECONDS),
        ]
    }

    #[test]
    fn dates_in_bcd() {
        // Checked with Python's calendar.timegm and isoweekday.
        assert_eq!(
            clock(1_795_939_262),
            [0x20, 0x26, 0x11, 0x29, 1, 0x08, 0x01, 0x02]
        );
        assert_eq!(
            clock(951_868_799),
            [0x20, 0x00, 0x02, 0x29, 3, 0x23, 0x59, 0x59]
        );
        assert_eq!(clock(0), [0x19, 0x70, 0x01, 0x01, 5, 0, 0, 0]);
        assert_eq!(
            clock(4_107_585_600),
            [0x21, 0x00, 0x03, 0x01, 2, 0x12, 0, 0]
        );
    }

    #[test]
    fn port_protocol() {
        let mut c = Cmos {
            index: 0,
            now: || UNIX_EPOCH + Duration::from_secs(1_795_939_262),
        };
        let mut b = [0u8];
        // The NMI-mask bit does not change the register.
        c.write(0, &[0x80 | REG_MONTH]);
        c.read(1, &mut b);
        assert_eq!(b[0], 0x11);
        c.write(0, &[REG_A]);
        c.read(1, &mut b);
        assert_eq!(b[0] & 0x80, 0, "no update in progress");
        c.write(0, &[REG_B]);
        c.read(1, &mut b);
        assert_eq!(b[0], 0x02, "24-hour BCD");
        // Setting the clock is ignored.
        c.write(0, &[REG_MONTH]);
        c.write(1, &[0x05]);
        c.read(1, &mut b);
        assert_eq!(b[0], 0x11);
    }
}
