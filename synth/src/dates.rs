//! Calendar arithmetic on day numbers (days since 1970-01-01, Arrow's Date32)
//! and microsecond timestamps, without a date library.

/// Microseconds per day.
pub(crate) const DAY_US: i64 = 86_400_000_000;
/// Microseconds per hour.
pub(crate) const HOUR_US: i64 = 3_600_000_000;
/// Microseconds per minute.
pub(crate) const MINUTE_US: i64 = 60_000_000;

/// Day number of a civil date (proleptic Gregorian; Howard Hinnant's
/// `days_from_civil`).
pub(crate) const fn days_from_civil(y: i32, m: u32, d: u32) -> i32 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = (y - era * 400) as u32;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe as i32 - 719_468
}

/// Civil date `(year, month, day)` of a day number.
pub(crate) const fn civil_from_days(z: i32) -> (i32, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = (z - era * 146_097) as u32;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe as i32 + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Parses `YYYY-MM-DD` (vocabulary validity dates).
pub(crate) fn parse_date(s: &str) -> Option<i32> {
    let mut parts = s.split('-');
    let y = parts.next()?.parse().ok()?;
    let m = parts.next()?.parse().ok()?;
    let d = parts.next()?.parse().ok()?;
    Some(days_from_civil(y, m, d))
}

/// Fraction of the year elapsed at day `z` (0 on 1 January).
pub(crate) fn year_fraction(z: i32) -> f64 {
    let (y, _, _) = civil_from_days(z);
    f64::from(z - days_from_civil(y, 1, 1)) / 365.25
}

/// The day of a timestamp.
pub(crate) fn day_of(ts: i64) -> i32 {
    ts.div_euclid(DAY_US) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_known_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        for z in [-50_000, -1, 0, 59, 60, 11_016, 19_000, 20_088] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(
            parse_date("2024-12-31"),
            Some(days_from_civil(2024, 12, 31))
        );
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
        assert!(year_fraction(days_from_civil(2021, 7, 2)) > 0.49);
        assert_eq!(day_of(-1), -1);
    }
}
