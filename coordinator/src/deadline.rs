//! The client's gRPC deadline (`grpc-timeout`), read from request metadata.
//!
//! tonic enforces `grpc-timeout` only until a handler returns its response; a streamed
//! generation outlives that, so the coordinator carries the deadline to the loop that drives
//! the request (a group's, or a ring's), which frees the sequence on every rank and then ends
//! the stream with `DEADLINE_EXCEEDED`.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;
use tonic::Status;

/// The `grpc-timeout` header as a duration; `None` when absent or malformed (a malformed
/// header is ignored, as tonic's own server does).
pub(crate) fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    parse(metadata.get("grpc-timeout")?.to_str().ok()?)
}

/// Whether `deadline` (none: the client set no `grpc-timeout`) has passed at `now`.
pub(crate) fn passed(deadline: Option<Instant>, now: Instant) -> bool {
    deadline.is_some_and(|d| d <= now)
}

/// The status a request ends with once its deadline passed, after `generated` tokens.
pub(crate) fn exceeded(generated: usize) -> Status {
    Status::deadline_exceeded(format!("the request's deadline passed after {generated} generated tokens"))
}

/// `TimeoutValue TimeoutUnit`: at most 8 ASCII digits, then one of `H M S m u n`.
fn parse(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_refuses_malformed_values() {
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "123456789m", "12x", "-5S", "1.5S", "5 S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reads_the_header_from_metadata() {
        let mut m = MetadataMap::new();
        assert_eq!(grpc_timeout(&m), None);
        m.insert("grpc-timeout", "1500m".parse().expect("ascii"));
        assert_eq!(grpc_timeout(&m), Some(Duration::from_millis(1500)));
    }
}
