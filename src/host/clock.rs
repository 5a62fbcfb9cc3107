//! Guest time: parsing the host's RFC 3339 timestamps and the rule for
//! stepping the clock on `/init`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Step when the guest is this far behind the host...
const MAX_BEHIND: Duration = Duration::from_millis(50);
/// ...or this far ahead of it.
const MAX_AHEAD: Duration = Duration::from_secs(5);

/// A timestamp that is not RFC 3339.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid RFC 3339 timestamp '{0}'")]
pub struct BadTimestamp(pub String);

/// Whether a guest clock reading `guest` must be set to `host`.
pub fn needs_step(guest: SystemTime, host: SystemTime) -> bool {
    match guest.duration_since(host) {
        Ok(ahead) => ahead > MAX_AHEAD,
        Err(behind) => behind.duration() > MAX_BEHIND,
    }
}

/// Sets `CLOCK_REALTIME`. Only ever called inside a VM, never in `--dev`.
pub fn set_realtime(to: SystemTime) -> std::io::Result<()> {
    let since_epoch = to.duration_since(UNIX_EPOCH).map_err(std::io::Error::other)?;
    let spec = nix::sys::time::TimeSpec::from_duration(since_epoch);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, spec).map_err(std::io::Error::from)
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`.
pub fn parse_rfc3339(text: &str) -> Result<SystemTime, BadTimestamp> {
    parse(text.as_bytes()).ok_or_else(|| BadTimestamp(text.to_owned()))
}

fn digits(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    bytes.iter().try_fold(0i64, |acc, d| acc.checked_mul(10)?.checked_add(i64::from(d - b'0')))
}

fn parse(b: &[u8]) -> Option<SystemTime> {
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (digits(&b[0..4])?, digits(&b[5..7])?, digits(&b[8..10])?);
    let (hour, minute, second) = (digits(&b[11..13])?, digits(&b[14..16])?, digits(&b[17..19])?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &b[19..];
    let mut nanos = 0i64;
    if let Some(fraction) = rest.strip_prefix(b".") {
        let len = fraction.iter().take_while(|c| c.is_ascii_digit()).count();
        if len == 0 {
            return None;
        }
        let kept = &fraction[..len.min(9)];
        nanos = digits(kept)? * 10i64.pow(9 - kept.len() as u32);
        rest = &fraction[len..];
    }
    let offset_seconds = match rest {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let value = digits(&[*h1, *h2])? * 3600 + digits(&[*m1, *m2])? * 60;
            if *sign == b'+' { value } else { -value }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    let seconds = u64::try_from(seconds).ok()?;
    Some(UNIX_EPOCH + Duration::new(seconds, u32::try_from(nanos).ok()?))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(seconds, nanos)
    }

    #[test]
    fn parses_orchestrator_timestamps() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(at(0, 0)));
        assert_eq!(parse_rfc3339("2026-01-02T03:04:05.123456789Z"), Ok(at(1_767_323_045, 123_456_789)));
        assert_eq!(parse_rfc3339("2026-01-02T05:04:05.5+02:00"), Ok(at(1_767_323_045, 500_000_000)));
        assert_eq!(parse_rfc3339("2024-02-29T00:00:00Z"), Ok(at(1_709_164_800, 0)));
        for bad in [
            "",
            "2026-01-02",
            "2026-13-02T00:00:00Z",
            "2026-01-02T00:00:00",
            "2026-01-02T00:00:00.Z",
            "x026-01-02T00:00:00Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn step_rule() {
        let host = at(1_000_000, 0);
        assert!(!needs_step(host, host));
        assert!(!needs_step(host - Duration::from_millis(50), host));
        assert!(needs_step(host - Duration::from_millis(51), host));
        assert!(!needs_step(host + Duration::from_secs(5), host));
        assert!(needs_step(host + Duration::from_millis(5001), host));
    }
}
