//! envd's log events as JSON objects, the shape the host's log pipeline
//! reads from the reference (zerolog): `timestamp` (RFC 3339, UTC, with
//! nanoseconds), `level` in lower case, `message`, `logger` (the module),
//! and the event's own fields. The sandbox ids are added when shipped.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};

/// The JSON object of one event, serialised, without a trailing newline.
pub fn event_line(event: &tracing::Event<'_>, now: SystemTime) -> Vec<u8> {
    let mut fields = Map::new();
    fields.insert("timestamp".into(), Value::String(rfc3339_nanos(now)));
    let metadata = event.metadata();
    fields.insert("level".into(), Value::String(metadata.level().as_str().to_ascii_lowercase()));
    fields.insert("logger".into(), Value::String(metadata.target().to_owned()));
    event.record(&mut FieldVisitor(&mut fields));
    serde_json::to_vec(&Value::Object(fields)).unwrap_or_default()
}

struct FieldVisitor<'a>(&'a mut Map<String, Value>);

impl FieldVisitor<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        // The reserved keys stay as set above.
        if !matches!(field.name(), "timestamp" | "level" | "logger") {
            self.0.insert(field.name().to_owned(), value);
        }
    }
}

impl Visit for FieldVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
}

/// `2024-05-01T12:34:56.123456789Z`.
pub fn rfc3339_nanos(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since.as_secs();
    let (year, month, day) = civil_from_days((seconds / 86_400) as i64);
    let of_day = seconds % 86_400;
    let mut text = String::with_capacity(30);
    let _ = write!(
        text,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60,
        since.subsec_nanos()
    );
    text
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc_with_nanoseconds() {
        let at = |secs: u64, nanos: u32| rfc3339_nanos(UNIX_EPOCH + Duration::new(secs, nanos));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(at(1_714_566_896, 123_456_789), "2024-05-01T12:34:56.123456789Z");
        assert_eq!(at(4_102_444_799, 0), "2099-12-31T23:59:59.000000000Z");
    }
}
