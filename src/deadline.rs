//! The call's deadline as gRPC sends it: the `grpc-timeout` request header.
//!
//! The wire form is `TimeoutValue TimeoutUnit`: at most 8 ASCII digits and one of `H` (hours),
//! `M` (minutes), `S`, `m`, `u`, `n` (PROTOCOL-HTTP2.md). Layers that spend part of a call's time
//! (a retry's backoff, a queue) read it with [`from_headers`] and pass the rest on with
//! [`to_header_value`].
//!
//! ```
//! use std::time::Duration;
//! use towline::deadline;
//!
//! let value = deadline::to_header_value(Duration::from_millis(1500));
//! assert_eq!(value, "1500000u");
//! assert_eq!(deadline::parse(value.as_bytes()), Some(Duration::from_millis(1500)));
//! assert_eq!(deadline::parse(b"123456789S"), None); // nine digits
//! ```

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

/// The `grpc-timeout` request header.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

const MAX_DIGITS: usize = 8;
const MAX_VALUE: u64 = 99_999_999;

/// The timeout in a request's headers; `None` when absent or malformed (a malformed value is not
/// a deadline the sender could have meant, so it is not guessed at).
pub fn from_headers(headers: &HeaderMap) -> Option<Duration> {
    crate::header::first(headers, &GRPC_TIMEOUT).and_then(|v| parse(v.as_bytes()))
}

/// Parses a `grpc-timeout` value.
pub fn parse(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > MAX_DIGITS || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encodes a timeout in the finest unit that fits in 8 digits, rounding up so that a short
/// remaining budget never becomes `0` by truncation. Timeouts beyond 99,999,999 hours saturate.
pub fn to_header_value(timeout: Duration) -> HeaderValue {
    const UNITS: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    let nanos = timeout.as_nanos();
    let (value, unit) = UNITS
        .iter()
        .map(|&(per, unit)| (nanos.div_ceil(per), unit))
        .find(|&(value, _)| value <= u128::from(MAX_VALUE))
        .unwrap_or((u128::from(MAX_VALUE), 'H'));
    HeaderValue::try_from(format!("{value}{unit}"))
        .expect("digits and a unit are a valid header value")
}

/// `now + timeout`, saturating at about thirty years from now: a duration such as
/// `Duration::MAX` in a configuration means "never", not an overflow panic.
pub(crate) fn instant_after(now: tokio::time::Instant, timeout: Duration) -> tokio::time::Instant {
    const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);
    now.checked_add(timeout).unwrap_or_else(|| now + FAR_FUTURE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse(b"3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse(b"4S"), Some(Duration::from_secs(4)));
        assert_eq!(parse(b"5m"), Some(Duration::from_millis(5)));
        assert_eq!(parse(b"6u"), Some(Duration::from_micros(6)));
        assert_eq!(parse(b"7n"), Some(Duration::from_nanos(7)));
        assert_eq!(
            parse(b"99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            &b""[..],
            b"S",
            b"10",
            b"10x",
            b"-1S",
            b"1.5S",
            b"123456789m",
            b" 1S",
        ] {
            assert_eq!(parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn instants_saturate_instead_of_overflowing() {
        let now = tokio::time::Instant::now();
        assert_eq!(
            instant_after(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
        assert!(instant_after(now, Duration::MAX) > now + Duration::from_secs(86_400 * 365));
    }

    #[test]
    fn encodes_in_the_finest_unit_that_fits() {
        assert_eq!(to_header_value(Duration::from_millis(25)), "25000000n");
        assert_eq!(to_header_value(Duration::from_millis(250)), "250000u");
        assert_eq!(to_header_value(Duration::from_secs(2)), "2000000u");
        assert_eq!(to_header_value(Duration::from_secs(3600)), "3600000m");
        assert_eq!(to_header_value(Duration::ZERO), "0n");
        assert_eq!(to_header_value(Duration::MAX), "99999999H");
    }

    proptest! {
        #[test]
        fn round_trip_never_shortens_and_never_panics(nanos in any::<u64>(), secs in any::<u64>()) {
            for timeout in [Duration::from_nanos(nanos), Duration::new(secs, 0)] {
                let value = to_header_value(timeout);
                prop_assert!(value.len() <= MAX_DIGITS + 1);
                let back = parse(value.as_bytes()).unwrap();
                let saturated = Duration::from_secs(MAX_VALUE * 3600);
                prop_assert!(back >= timeout.min(saturated), "{timeout:?} -> {value:?} -> {back:?}");
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            let _ = parse(&bytes);
        }
    }
}
