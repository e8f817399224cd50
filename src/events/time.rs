//! RFC 3339 timestamps (UTC, milliseconds) without a date library.

use std::time::{SystemTime, UNIX_EPOCH};

/// `2026-11-27T05:53:44.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let millis = since.subsec_millis();
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = (secs % 86_400) as u32;
    let (y, m, d) = civil_from_days(days);
    let (hour, minute, second) = (rem / 3600, (rem / 60) % 60, rem % 60);
    let Ok(year @ 0..=9999) = u32::try_from(y) else {
        return format!("{y:04}-{m:02}-{d:02}T{hour:02}:{minute:02}:{second:02}.{millis:03}Z");
    };
    // Every denial event carries one: digits written in place, no formatter.
    let mut text = *b"0000-00-00T00:00:00.000Z";
    for (range, value) in [
        (0..4, year),
        (5..7, m),
        (8..10, d),
        (11..13, hour),
        (14..16, minute),
        (17..19, second),
        (20..23, millis),
    ] {
        let mut value = value;
        for digit in text[range].iter_mut().rev() {
            *digit = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_758_824_123);
        assert_eq!(rfc3339(t), "2026-11-27T05:53:44.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
        let last = UNIX_EPOCH + Duration::from_millis(253_402_300_799_999); // 9999-12-31
        assert_eq!(rfc3339(last), "9999-12-31T23:59:59.999Z");
        let beyond = UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        assert_eq!(rfc3339(beyond), "10000-01-01T00:00:00.000Z");
    }
}
