//! A resource's delivery policy: the fields a Listener or its owner may set, their ISO-8601
//! durations, and how they stack over the operator's defaults. Pure values, no I/O.

use std::{sync::Arc, time::Duration};

use url::Url;

use super::retry::{Backoff, RetryPolicy};

/// What a Listener or WebhookUser sets of its delivery policy; `None` leaves a field to the
/// next layer (Listener, then owner, then the operator's defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryOverrides {
    /// Attempts per delivery, the first one included.
    pub attempts: Option<u32>,
    /// How the wait grows from one attempt to the next.
    pub backoff: Option<Backoff>,
    /// The base of the wait: the ceiling of the wait after the first attempt.
    pub backoff_delay: Option<Duration>,
    /// Time for one attempt.
    pub timeout: Option<Duration>,
    /// The longest wait between two attempts, computed or asked for by `Retry-After`.
    pub retry_after_max: Option<Duration>,
    /// How long a delivery is kept before it fails.
    pub max_age: Option<Duration>,
    /// Where a delivery that ends without success is POSTed once more (a Service reference
    /// already resolved to its url). There is no operator-wide default.
    pub dead_letter_sink: Option<Arc<Url>>,
}

impl DeliveryOverrides {
    /// These overrides, with every field they leave unset taken from `lower`.
    pub fn over(&self, lower: &Self) -> Self {
        Self {
            attempts: self.attempts.or(lower.attempts),
            backoff: self.backoff.or(lower.backoff),
            backoff_delay: self.backoff_delay.or(lower.backoff_delay),
            timeout: self.timeout.or(lower.timeout),
            retry_after_max: self.retry_after_max.or(lower.retry_after_max),
            max_age: self.max_age.or(lower.max_age),
            dead_letter_sink: self
                .dead_letter_sink
                .clone()
                .or_else(|| lower.dead_letter_sink.clone()),
        }
    }

    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl RetryPolicy {
    /// This policy with `overrides` set over it. A timeout longer than the max age is cut to
    /// the max age: the layers may each be sound and still disagree.
    pub fn with_overrides(&self, overrides: &DeliveryOverrides) -> Self {
        let max_age = overrides.max_age.unwrap_or(self.max_age);
        Self {
            max_attempts: overrides.attempts.unwrap_or(self.max_attempts),
            backoff: overrides.backoff.unwrap_or(self.backoff),
            initial_backoff: overrides.backoff_delay.unwrap_or(self.initial_backoff),
            max_backoff: overrides.retry_after_max.unwrap_or(self.max_backoff),
            timeout: overrides.timeout.unwrap_or(self.timeout).min(max_age),
            max_age,
        }
    }
}

/// An ISO-8601 duration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not of the form `PT1H2M3.5S`.
    #[error(
        "{0:?} is not an ISO-8601 duration of hours, minutes and seconds such as PT2S or PT1M30S"
    )]
    Malformed(String),
    /// Years, months, weeks or days: their length is not fixed, or not accepted here.
    #[error(
        "{0:?} uses a calendar unit; give the duration in hours, minutes and seconds, e.g. PT24H"
    )]
    Calendar(String),
    /// Zero, where a wait or a limit must be positive.
    #[error("{0:?} must be longer than zero")]
    Zero(String),
    /// Larger than any duration used here.
    #[error("{0:?} is too long")]
    TooLong(String),
}

/// The regular expression the CRD's CEL rules check a duration with; [`parse_iso_duration`]
/// accepts exactly these (and refuses zero, as the rules do).
pub const ISO_DURATION_PATTERN: &str = r"^PT(?:[0-9]+H)?(?:[0-9]+M)?(?:[0-9]+(?:\.[0-9]+)?S)?$";

/// Parses a positive ISO-8601 duration of hours, minutes and seconds (`PT2S`, `PT1M30S`,
/// `PT0.5S`, `PT24H`). Calendar units (years, months, weeks, days) are refused: days, weeks and
/// months have no fixed length across daylight-saving and calendar changes.
pub fn parse_iso_duration(text: &str) -> Result<Duration, DurationError> {
    let malformed = || DurationError::Malformed(text.to_owned());
    let Some(rest) = text.strip_prefix('P') else {
        return Err(malformed());
    };
    let (date, time) = match rest.split_once('T') {
        Some((date, time)) => (date, Some(time)),
        None => (rest, None),
    };
    if !date.is_empty() {
        let calendar = date
            .trim_start_matches(|c: char| c.is_ascii_digit() || c == '.')
            .starts_with(['Y', 'M', 'W', 'D']);
        return Err(if calendar {
            DurationError::Calendar(text.to_owned())
        } else {
            malformed()
        });
    }
    let time = time.filter(|t| !t.is_empty()).ok_or_else(malformed)?;
    let mut total = Duration::ZERO;
    let mut remaining = time;
    // Units must come in this order, each at most once.
    let mut units = ['H', 'M', 'S'].as_slice();
    while !remaining.is_empty() {
        let end = remaining
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(malformed)?;
        let (number, tail) = remaining.split_at(end);
        let unit = tail.chars().next().ok_or_else(malformed)?;
        let position = units
            .iter()
            .position(|u| *u == unit)
            .ok_or_else(malformed)?;
        units = &units[position + 1..];
        remaining = &tail[1..];
        let valid_number = !number.is_empty()
            && !number.starts_with('.')
            && !number.ends_with('.')
            && number.matches('.').count() <= usize::from(unit == 'S');
        if !valid_number {
            return Err(malformed());
        }
        let unit_seconds: u64 = match unit {
            'H' => 3600,
            'M' => 60,
            _ => 1,
        };
        let part = if unit == 'S' {
            let seconds: f64 = number.parse().map_err(|_| malformed())?;
            Duration::try_from_secs_f64(seconds).map_err(|_| DurationError::TooLong(text.into()))?
        } else {
            let count: u64 = number
                .parse()
                .map_err(|_| DurationError::TooLong(text.into()))?;
            count
                .checked_mul(unit_seconds)
                .map(Duration::from_secs)
                .ok_or_else(|| DurationError::TooLong(text.into()))?
        };
        total = total
            .checked_add(part)
            .ok_or_else(|| DurationError::TooLong(text.into()))?;
    }
    // Nothing longer than a year is a sensible wait; it also keeps `Instant` arithmetic sound.
    if total > Duration::from_secs(366 * 24 * 3600) {
        return Err(DurationError::TooLong(text.to_owned()));
    }
    if total.is_zero() {
        return Err(DurationError::Zero(text.to_owned()));
    }
    Ok(total)
}

/// Formats a duration as ISO-8601 (`PT1M30S`, `PT0.25S`), for status.
pub fn format_iso_duration(duration: Duration) -> String {
    let total = duration.as_secs();
    let (hours, minutes, seconds) = (total / 3600, total / 60 % 60, total % 60);
    let millis = duration.subsec_millis();
    let mut out = String::from("PT");
    if hours > 0 {
        out.push_str(&format!("{hours}H"));
    }
    if minutes > 0 {
        out.push_str(&format!("{minutes}M"));
    }
    if millis > 0 {
        let fraction = format!("{millis:03}");
        out.push_str(&format!("{seconds}.{}S", fraction.trim_end_matches('0')));
    } else if seconds > 0 || out == "PT" {
        out.push_str(&format!("{seconds}S"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(seconds: f64) -> Duration {
        Duration::from_secs_f64(seconds)
    }

    #[test]
    fn iso_durations_parse() {
        let table = [
            ("PT2S", secs(2.0)),
            ("PT0.5S", secs(0.5)),
            ("PT0.25S", secs(0.25)),
            ("PT1M30S", secs(90.0)),
            ("PT1H", secs(3600.0)),
            ("PT24H", secs(86_400.0)),
            ("PT1H2M3S", secs(3723.0)),
            ("PT90S", secs(90.0)),
            ("PT10M", secs(600.0)),
        ];
        for (text, expected) in table {
            assert_eq!(parse_iso_duration(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn bad_iso_durations_are_refused_with_their_reason() {
        let malformed = [
            "", "2s", "PT", "P", "PT2", "PTS", "PT-1S", "PT1.S", "PT.5S", "PT1.5M", "PT2S1M",
            "PT1S1S", "pt2s", "PT2s", "PT1H 2M", "PT1.2.3S", "P1T",
        ];
        for text in malformed {
            assert!(
                matches!(parse_iso_duration(text), Err(DurationError::Malformed(_))),
                "{text:?}: {:?}",
                parse_iso_duration(text)
            );
        }
        for text in ["P1D", "P1Y", "P1M", "P1W", "P1DT2H", "P0.5D"] {
            assert!(
                matches!(parse_iso_duration(text), Err(DurationError::Calendar(_))),
                "{text:?}"
            );
        }
        for text in ["PT0S", "PT0M", "PT0H0M0S", "PT0.0S"] {
            assert_eq!(
                parse_iso_duration(text),
                Err(DurationError::Zero(text.to_owned()))
            );
        }
        for text in ["PT9000H", "PT99999999999999999999H", "PT1e9S"] {
            assert!(parse_iso_duration(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn the_cel_pattern_accepts_what_the_parser_accepts() {
        let pattern = regex::Regex::new(ISO_DURATION_PATTERN).unwrap();
        for text in ["PT2S", "PT0.5S", "PT1H2M3S", "PT24H", "PT1M30S"] {
            assert!(
                pattern.is_match(text) && parse_iso_duration(text).is_ok(),
                "{text}"
            );
        }
        for text in ["P1D", "PT2", "2s", "PT-1S", "PT.5S", "PT2S1M"] {
            assert!(
                !pattern.is_match(text) && parse_iso_duration(text).is_err(),
                "{text}"
            );
        }
    }

    #[test]
    fn durations_format_back_to_what_parses() {
        let table = [
            (secs(2.0), "PT2S"),
            (secs(0.25), "PT0.25S"),
            (secs(90.0), "PT1M30S"),
            (secs(3600.0), "PT1H"),
            (secs(3723.5), "PT1H2M3.5S"),
            (Duration::ZERO, "PT0S"),
        ];
        for (duration, text) in table {
            assert_eq!(format_iso_duration(duration), text);
            if !duration.is_zero() {
                assert_eq!(parse_iso_duration(text), Ok(duration));
            }
        }
    }

    #[test]
    fn each_field_comes_from_the_nearest_layer_that_sets_it() {
        let defaults = RetryPolicy {
            max_attempts: 5,
            backoff: Backoff::Exponential,
            initial_backoff: secs(1.0),
            max_backoff: secs(60.0),
            timeout: secs(10.0),
            max_age: secs(300.0),
        };
        let owner = DeliveryOverrides {
            attempts: Some(3),
            backoff: Some(Backoff::Linear),
            timeout: Some(secs(4.0)),
            max_age: Some(secs(120.0)),
            ..DeliveryOverrides::default()
        };
        let listener = DeliveryOverrides {
            attempts: Some(7),
            backoff_delay: Some(secs(0.5)),
            ..DeliveryOverrides::default()
        };
        let effective = defaults.with_overrides(&listener.over(&owner));
        assert_eq!(
            effective,
            RetryPolicy {
                max_attempts: 7,
                backoff: Backoff::Linear,
                initial_backoff: secs(0.5),
                max_backoff: secs(60.0),
                timeout: secs(4.0),
                max_age: secs(120.0),
            }
        );
        assert_eq!(
            defaults.with_overrides(&DeliveryOverrides::default()),
            defaults
        );
        assert!(DeliveryOverrides::default().is_empty());
        assert!(!owner.is_empty());
        // The owner's own policy, without the Listener's.
        assert_eq!(defaults.with_overrides(&owner).max_attempts, 3);
    }

    #[test]
    fn a_timeout_longer_than_the_max_age_of_another_layer_is_cut_to_it() {
        let defaults = RetryPolicy {
            max_attempts: 5,
            backoff: Backoff::Exponential,
            initial_backoff: secs(1.0),
            max_backoff: secs(60.0),
            timeout: secs(10.0),
            max_age: secs(300.0),
        };
        let owner = DeliveryOverrides {
            max_age: Some(secs(3.0)),
            ..DeliveryOverrides::default()
        };
        let listener = DeliveryOverrides {
            timeout: Some(secs(20.0)),
            ..DeliveryOverrides::default()
        };
        let effective = defaults.with_overrides(&listener.over(&owner));
        assert_eq!(effective.timeout, secs(3.0));
        assert_eq!(effective.max_age, secs(3.0));
    }
}
