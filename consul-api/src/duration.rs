//! Durations as Go writes and reads them (`5s`, `1m30s`, `250ms`), because Consul parses
//! every duration it is sent with Go's `time.ParseDuration`, which rejects humantime's `1m 30s`.

use std::{fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// A non-negative duration that prints and parses in Go's `time.Duration` syntax.
///
/// ```
/// use consul_api::GoDuration;
/// use std::time::Duration;
/// assert_eq!(GoDuration::from(Duration::from_secs(90)).to_string(), "1m30s");
/// assert_eq!("1m30s".parse::<GoDuration>().unwrap().as_duration(), Duration::from_secs(90));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GoDuration(pub Duration);

/// Why a string is not a Go duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {input:?}: {reason} (write it the way Go does, for example 5s, 250ms or 1m30s)"
)]
pub struct ParseDurationError {
    input: String,
    reason: &'static str,
}

impl GoDuration {
    /// The wrapped [`Duration`].
    pub fn as_duration(self) -> Duration {
        self.0
    }

    /// Seconds, shorthand for building settings.
    pub const fn from_secs(secs: u64) -> Self {
        GoDuration(Duration::from_secs(secs))
    }
}

impl From<Duration> for GoDuration {
    fn from(d: Duration) -> Self {
        GoDuration(d)
    }
}

impl From<GoDuration> for Duration {
    fn from(d: GoDuration) -> Self {
        d.0
    }
}

const UNITS: &[(&str, u128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// Go's limit (`time.ParseDuration`): the largest `int64` number of nanoseconds.
const MAX_NANOS: u128 = i64::MAX as u128;

/// Fraction digits read: `10^24 * 3.6e12` (the hour's nanoseconds) still fits a `u128`.
const FRACTION_DIGITS: usize = 24;

const TOO_LARGE: &str = "out of range: Go's limit is 2562047h47m16.854775807s (about 292 years)";

impl FromStr for GoDuration {
    type Err = ParseDurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseDurationError {
            input: input.to_owned(),
            reason,
        };
        let mut s = input.trim();
        if let Some(rest) = s.strip_prefix('+') {
            s = rest;
        } else if s.starts_with('-') {
            return Err(err("negative durations are not allowed here"));
        }
        if s == "0" {
            return Ok(GoDuration(Duration::ZERO));
        }
        if s.is_empty() {
            return Err(err("empty"));
        }
        let mut total_ns: u128 = 0;
        while !s.is_empty() {
            // The number: digits, optionally a fraction.
            let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
            let (int_part, rest) = s.split_at(int_len);
            let (frac_part, rest) = match rest.strip_prefix('.') {
                Some(after) => {
                    let n = after.bytes().take_while(u8::is_ascii_digit).count();
                    after.split_at(n)
                }
                None => ("", rest),
            };
            if int_part.is_empty() && frac_part.is_empty() {
                return Err(err("expected a number"));
            }
            // The unit: the longest known unit at this position.
            let unit_len = rest
                .char_indices()
                .find(|(_, c)| c.is_ascii_digit() || *c == '.')
                .map_or(rest.len(), |(i, _)| i);
            let (unit, rest) = rest.split_at(unit_len);
            if unit.is_empty() {
                return Err(err("missing unit (ns, us, ms, s, m or h)"));
            }
            let scale = UNITS
                .iter()
                .find(|(name, _)| *name == unit)
                .map(|(_, scale)| *scale)
                .ok_or_else(|| err("unknown unit (use ns, us, ms, s, m or h)"))?;
            let whole: u128 = if int_part.is_empty() {
                0
            } else {
                int_part.parse().map_err(|_| err(TOO_LARGE))?
            };
            // Every step checked against Go's limit, the largest int64 nanoseconds (about
            // 292 years): no arithmetic here can overflow, whatever the input.
            let mut part = whole
                .checked_mul(scale)
                .filter(|&ns| ns <= MAX_NANOS)
                .ok_or_else(|| err(TOO_LARGE))?;
            // The fraction, truncated to whole nanoseconds like Go (which computes it in
            // floating point: `0.1m` is 6 s either way). Digits past the 24th are ignored,
            // as Go ignores those past the 18th: they are far below a nanosecond.
            let (mut fraction, mut denominator) = (0u128, 1u128);
            for digit in frac_part.bytes().take(FRACTION_DIGITS) {
                fraction = fraction * 10 + u128::from(digit - b'0');
                denominator *= 10;
            }
            part += fraction * scale / denominator;
            total_ns = total_ns
                .checked_add(part)
                .filter(|&ns| ns <= MAX_NANOS)
                .ok_or_else(|| err(TOO_LARGE))?;
            s = rest;
        }
        let secs = (total_ns / 1_000_000_000) as u64;
        let nanos = (total_ns % 1_000_000_000) as u32;
        Ok(GoDuration(Duration::new(secs, nanos)))
    }
}

impl fmt::Display for GoDuration {
    /// Writes the shortest form Go parses back to the same value: `0s`, `250ms`, `5s`,
    /// `1m30s`, `1h`, `1.5s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.is_zero() {
            return f.write_str("0s");
        }
        let secs = d.as_secs();
        let nanos = d.subsec_nanos();
        if secs == 0 {
            return if nanos.is_multiple_of(1_000_000) {
                write!(f, "{}ms", nanos / 1_000_000)
            } else if nanos.is_multiple_of(1_000) {
                write!(f, "{}us", nanos / 1_000)
            } else {
                write!(f, "{nanos}ns")
            };
        }
        let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        if s > 0 || nanos > 0 {
            write!(f, "{s}")?;
            if nanos > 0 {
                let frac = format!("{nanos:09}");
                write!(f, ".{}", frac.trim_end_matches('0'))?;
            }
            f.write_str("s")?;
        }
        Ok(())
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    /// Accepts Go's string form, or a number of nanoseconds (some Consul endpoints send that).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = GoDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a Go duration string or a number of nanoseconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<GoDuration, E> {
                if v.is_empty() {
                    return Ok(GoDuration::default());
                }
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<GoDuration, E> {
                Ok(GoDuration(Duration::from_nanos(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<GoDuration, E> {
                u64::try_from(v)
                    .map(|v| GoDuration(Duration::from_nanos(v)))
                    .map_err(|_| E::custom("negative duration"))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    fn parse(s: &str) -> Duration {
        s.parse::<GoDuration>().unwrap().0
    }

    #[test]
    fn parses_go_forms() {
        assert_eq!(parse("5s"), Duration::from_secs(5));
        assert_eq!(parse("1m30s"), Duration::from_secs(90));
        assert_eq!(parse("1h"), Duration::from_secs(3600));
        assert_eq!(parse("1h0m0s"), Duration::from_secs(3600));
        assert_eq!(parse("250ms"), Duration::from_millis(250));
        assert_eq!(parse("1.5s"), Duration::from_millis(1500));
        assert_eq!(parse(".5s"), Duration::from_millis(500));
        assert_eq!(parse("3us"), Duration::from_micros(3));
        assert_eq!(parse("3µs"), Duration::from_micros(3));
        assert_eq!(parse("7ns"), Duration::from_nanos(7));
        assert_eq!(parse("0"), Duration::ZERO);
        assert_eq!(parse("+2m"), Duration::from_secs(120));
        assert_eq!(parse("1m0.25s"), Duration::from_millis(60_250));
    }

    #[test]
    fn rejects_what_go_rejects() {
        for bad in ["", "5", "1m 30s", "s", "1x", "-5s", "1.2.3s", "5 s", "1e3s"] {
            assert!(
                bad.parse::<GoDuration>().is_err(),
                "{bad:?} should be rejected"
            );
        }
        let msg = "1m 30s".parse::<GoDuration>().unwrap_err().to_string();
        assert!(
            msg.contains("1m30s"),
            "error should show the right form: {msg}"
        );
    }

    #[test]
    fn prints_what_go_parses() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(5), "5s"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(60), "1m"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(3600), "1h"),
            (Duration::from_secs(3630), "1h30s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_micros(7), "7us"),
            (Duration::from_nanos(1_000_000_007), "1.000000007s"),
        ];
        for (d, s) in cases {
            assert_eq!(GoDuration(d).to_string(), s);
            assert_eq!(parse(s), d, "round trip of {s}");
            assert!(!s.contains(' '));
        }
    }

    #[test]
    fn out_of_range_is_an_error_at_gos_limit() {
        // Go's `time.ParseDuration` limit: int64 nanoseconds.
        let max = Duration::new(9_223_372_036, 854_775_807);
        assert_eq!(parse("9223372036854775807ns"), max);
        assert_eq!(parse("2562047h47m16.854775807s"), max);
        for bad in [
            // Once a panic in a debug build and 543 ns in a release build.
            "340282366920938463463374607431768211.999us",
            "9223372036854775808ns",
            "2562047h47m16.854775808s",
            "2562048h",
            "9223372036.854775808s",
            "5124095576030431h5124095576030431h",
            "340282366920938463463374607431768211455ns",
            "99999999999999999999999999999999999999999999h",
        ] {
            let err = bad.parse::<GoDuration>().expect_err(bad).to_string();
            assert!(err.contains("out of range"), "{bad}: {err}");
        }
    }

    #[test]
    fn fractions_are_truncated_like_gos() {
        assert_eq!(parse("0.1m"), Duration::from_secs(6));
        assert_eq!(parse("0.00000000009m"), Duration::from_nanos(5));
        assert_eq!(parse("1.9999999999ns"), Duration::from_nanos(1));
        assert_eq!(parse("0.5h"), Duration::from_secs(1800));
        assert_eq!(
            parse("1.0000000000000000000000000000009s"),
            Duration::from_secs(1)
        );
    }

    /// A value, written in Go's syntax, with its exact nanoseconds computed independently of
    /// the parser (`None`: beyond any range).
    fn random_duration(rng: &mut StdRng) -> (String, Option<u128>) {
        const SCALES: [(&str, u128); 8] = [
            ("ns", 1),
            ("us", 1_000),
            ("µs", 1_000),
            ("μs", 1_000),
            ("ms", 1_000_000),
            ("s", 1_000_000_000),
            ("m", 60_000_000_000),
            ("h", 3_600_000_000_000),
        ];
        let digits = |rng: &mut StdRng, most: usize| -> String {
            let n = rng.random_range(0..=most);
            (0..n)
                .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
                .collect()
        };
        let mut text = String::new();
        let mut total = Some(0u128);
        for _ in 0..rng.random_range(1..=4) {
            // Mostly short numbers, sometimes up to 40 digits (beyond a u128).
            let most = if rng.random_bool(0.8) { 6 } else { 40 };
            let whole = digits(rng, most);
            let fraction = if rng.random_bool(0.4) {
                digits(rng, 12)
            } else {
                String::new()
            };
            let whole = if whole.is_empty() && fraction.is_empty() {
                "1".to_owned()
            } else {
                whole
            };
            let (unit, scale) = SCALES[rng.random_range(0..SCALES.len())];
            text.push_str(&whole);
            if !fraction.is_empty() || rng.random_bool(0.1) {
                text.push('.');
                text.push_str(&fraction);
            }
            text.push_str(unit);
            let whole_ns = if whole.is_empty() {
                Some(0)
            } else {
                whole
                    .parse::<u128>()
                    .ok()
                    .and_then(|w| w.checked_mul(scale))
            };
            // floor(0.fraction * scale), one digit at a time in exact arithmetic.
            let fraction_ns = fraction.bytes().fold((0u128, 1u128), |(num, den), d| {
                (num * 10 + u128::from(d - b'0'), den * 10)
            });
            let fraction_ns = fraction_ns.0 * scale / fraction_ns.1;
            total = total
                .zip(whole_ns)
                .and_then(|(t, w)| t.checked_add(w)?.checked_add(fraction_ns));
        }
        (text, total)
    }

    #[test]
    fn random_durations_parse_exactly_or_fail_cleanly() {
        let mut rng = StdRng::seed_from_u64(31);
        let max = u128::try_from(i64::MAX).expect("fits");
        let (mut in_range, mut out_of_range) = (0, 0);
        for _ in 0..20_000 {
            let (text, exact) = random_duration(&mut rng);
            match (text.parse::<GoDuration>(), exact.filter(|&ns| ns <= max)) {
                (Ok(d), Some(ns)) => {
                    assert_eq!(d.0.as_nanos(), ns, "{text}");
                    // What it prints parses back to itself.
                    assert_eq!(parse(&d.to_string()), d.0, "{text} printed as {d}");
                    in_range += 1;
                }
                (Err(e), None) => {
                    assert!(e.to_string().contains("out of range"), "{text}: {e}");
                    out_of_range += 1;
                }
                (got, _) => panic!("{text}: exact {exact:?}, parsed {got:?}"),
            }
        }
        // Both sides of the limit were tried, many times.
        assert!(
            in_range > 5_000 && out_of_range > 500,
            "{in_range} / {out_of_range}"
        );
    }

    #[test]
    fn random_text_never_panics() {
        // Bytes from the duration alphabet and a few others, in any order.
        let alphabet: Vec<char> = "0123456789.9999+-nsuµμmhx ".chars().collect();
        let mut rng = StdRng::seed_from_u64(5);
        let mut accepted = 0;
        for _ in 0..50_000 {
            let n = rng.random_range(0..48);
            let text: String = (0..n)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            if let Ok(d) = text.parse::<GoDuration>() {
                assert!(
                    d.0.as_nanos() <= u128::try_from(i64::MAX).expect("fits"),
                    "{text}"
                );
                assert_eq!(parse(&d.to_string()), d.0, "{text}");
                accepted += 1;
            }
        }
        assert!(accepted > 0, "some random text is a duration");
    }

    #[test]
    fn serde_as_string_and_from_nanos() {
        let json = serde_json::to_string(&GoDuration::from_secs(90)).unwrap();
        assert_eq!(json, "\"1m30s\"");
        let d: GoDuration = serde_json::from_str("\"1m0s\"").unwrap();
        assert_eq!(d.0, Duration::from_secs(60));
        let d: GoDuration = serde_json::from_str("30000000000").unwrap();
        assert_eq!(d.0, Duration::from_secs(30));
        assert!(serde_json::from_str::<GoDuration>("-1").is_err());
    }
}
