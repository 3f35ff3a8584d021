//! What an attempt's result means, and when to try again: pure functions, no I/O.

use std::time::Duration;

use chrono::{DateTime, Utc};
use http::StatusCode;
use rand::Rng;

use super::url_policy::DestinationRefused;

/// How one HTTP attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptResult {
    /// The receiver answered with a status (the body is read and discarded).
    Response {
        /// The response status.
        status: StatusCode,
        /// `Retry-After` of a 429 or 503, as a delay from now.
        retry_after: Option<Duration>,
    },
    /// No complete answer within the per-attempt timeout.
    TimedOut(Duration),
    /// The connection could not be made, or broke before an answer came.
    ConnectionFailed(String),
    /// The URL policy forbade the address the destination resolved to.
    Refused(DestinationRefused),
    /// The request could not be built or sent for a reason on our side.
    RequestFailed(String),
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A 2xx: the delivery is done.
    Delivered,
    /// A transient failure: try again, after `retry_after` if the receiver asked for it.
    Retry {
        /// The receiver's `Retry-After`, before clamping.
        retry_after: Option<Duration>,
    },
    /// A failure that another attempt would not fix.
    Fail,
    /// The receiver answered 410 Gone: fail, and suspend the listener.
    Gone,
}

impl AttemptResult {
    /// Decides what the result means for the delivery.
    pub fn verdict(&self) -> Verdict {
        match self {
            Self::Response {
                status,
                retry_after,
            } => classify_status(*status, *retry_after),
            Self::TimedOut(_) | Self::ConnectionFailed(_) => Verdict::Retry { retry_after: None },
            Self::Refused(_) | Self::RequestFailed(_) => Verdict::Fail,
        }
    }

    /// A short reason for a listener's status: no url, no secret.
    pub fn reason(&self) -> String {
        match self {
            Self::Response { status, .. } => status_reason(*status),
            Self::TimedOut(timeout) => {
                format!("timed out after {}", humantime::format_duration(*timeout))
            }
            Self::ConnectionFailed(reason) | Self::RequestFailed(reason) => reason.clone(),
            Self::Refused(refused) => refused.to_string(),
        }
    }

    /// The metric label of the result's kind.
    pub(crate) fn label(&self) -> AttemptLabel {
        match self {
            Self::Response { status, .. } if status.is_success() => AttemptLabel::Success,
            Self::Response { status, .. } if status.is_redirection() => AttemptLabel::Redirect,
            Self::Response { status, .. } if status.is_client_error() => AttemptLabel::ClientError,
            Self::Response { status, .. } if status.is_server_error() => AttemptLabel::ServerError,
            Self::Response { .. } => AttemptLabel::OtherStatus,
            Self::TimedOut(_) => AttemptLabel::Timeout,
            Self::ConnectionFailed(_) => AttemptLabel::ConnectionError,
            Self::Refused(_) => AttemptLabel::Refused,
            Self::RequestFailed(_) => AttemptLabel::RequestError,
        }
    }
}

/// The kinds of attempt results, as metric label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum AttemptLabel {
    /// 2xx.
    Success,
    /// 3xx (redirects are not followed).
    Redirect,
    /// 4xx.
    ClientError,
    /// 5xx.
    ServerError,
    /// 1xx or a status outside 100..=599.
    OtherStatus,
    /// The per-attempt timeout passed.
    Timeout,
    /// The connection failed or broke.
    ConnectionError,
    /// The URL policy refused the address.
    Refused,
    /// The request failed on our side.
    RequestError,
}

impl AttemptLabel {
    /// Every label, for registering metrics up front.
    pub(crate) const ALL: [Self; 9] = [
        Self::Success,
        Self::Redirect,
        Self::ClientError,
        Self::ServerError,
        Self::OtherStatus,
        Self::Timeout,
        Self::ConnectionError,
        Self::Refused,
        Self::RequestError,
    ];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Redirect => "redirect",
            Self::ClientError => "client_error",
            Self::ServerError => "server_error",
            Self::OtherStatus => "other_status",
            Self::Timeout => "timeout",
            Self::ConnectionError => "connection_error",
            Self::Refused => "refused",
            Self::RequestError => "request_error",
        }
    }
}

/// What a status means: 2xx delivered; 408, 429 and 5xx retried; 410 gone; the rest (other 4xx,
/// 3xx since redirects are not followed, 1xx) failed at once.
pub fn classify_status(status: StatusCode, retry_after: Option<Duration>) -> Verdict {
    if status.is_success() {
        Verdict::Delivered
    } else if status == StatusCode::GONE {
        Verdict::Gone
    } else if status == StatusCode::REQUEST_TIMEOUT {
        Verdict::Retry { retry_after: None }
    } else if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        Verdict::Retry { retry_after }
    } else {
        Verdict::Fail
    }
}

/// `HTTP 404 Not Found`; a 3xx says that it was not followed.
pub fn status_reason(status: StatusCode) -> String {
    let code = status.as_u16();
    let text = match status.canonical_reason() {
        Some(reason) => format!("HTTP {code} {reason}"),
        None => format!("HTTP {code}"),
    };
    if status.is_redirection() {
        format!("{text} (redirects are not followed)")
    } else {
        text
    }
}

/// Parses `Retry-After`: delay-seconds, or an HTTP date (a delay of zero once it has passed).
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

/// How the ceiling of the wait grows from one attempt to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    /// `delay × 2^(attempt−1)`.
    Exponential,
    /// `delay × attempt`.
    Linear,
}

impl Backoff {
    /// The name used in specs and status: `exponential` or `linear`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exponential => "exponential",
            Self::Linear => "linear",
        }
    }
}

/// One delivery's policy: bounded retries with exponential or linear backoff and full jitter,
/// a timeout per attempt and a maximum age. Built from the operator's defaults with a
/// resource's overrides over them ([`with_overrides`](Self::with_overrides)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per delivery, the first one included.
    pub max_attempts: u32,
    /// How the ceiling grows per attempt.
    pub backoff: Backoff,
    /// Ceiling of the delay after the first attempt.
    pub initial_backoff: Duration,
    /// Largest delay between two attempts, computed or asked for by `Retry-After`.
    pub max_backoff: Duration,
    /// Time for one attempt, from connecting to the end of the response.
    pub timeout: Duration,
    /// Longest time a delivery is kept: after it no new attempt starts.
    pub max_age: Duration,
}

impl RetryPolicy {
    /// The ceiling of the delay after attempt `attempt` (1-based): `initial × 2^(attempt−1)`
    /// (exponential) or `initial × attempt` (linear), at most `max_backoff`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = match self.backoff {
            Backoff::Exponential => {
                let doublings = attempt.saturating_sub(1).min(63);
                u32::try_from(1u64 << doublings).unwrap_or(u32::MAX)
            }
            Backoff::Linear => attempt.max(1),
        };
        self.initial_backoff
            .checked_mul(factor)
            .unwrap_or(Duration::MAX)
            .min(self.max_backoff)
    }

    /// The wait before the next attempt, after `attempt` attempts failed; `None` when no attempt
    /// is left. A receiver's `Retry-After` is honoured within `[initial_backoff, max_backoff]`;
    /// otherwise the delay is drawn uniformly from `[0, ceiling]` ("full jitter"), which spreads
    /// the retries of many deliveries that failed together.
    pub fn delay_after(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        Some(match retry_after {
            Some(asked) => self.clamp(asked),
            None => full_jitter(self.ceiling(attempt), rng),
        })
    }

    /// `delay` within `[initial_backoff, max_backoff]`, without panicking on a reversed range.
    pub fn clamp(&self, delay: Duration) -> Duration {
        delay.max(self.initial_backoff).min(self.max_backoff)
    }
}

/// A delay drawn uniformly from `[0, ceiling]`.
pub fn full_jitter(ceiling: Duration, rng: &mut impl Rng) -> Duration {
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::url_policy::AddressClass;
    use rand::{rngs::StdRng, SeedableRng};

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 5,
        backoff: Backoff::Exponential,
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(60),
        timeout: Duration::from_secs(10),
        max_age: Duration::from_secs(300),
    };

    #[test]
    fn status_classification() {
        let asked = Some(Duration::from_secs(7));
        let retry = |retry_after| Verdict::Retry { retry_after };
        let table: &[(u16, Option<Duration>, Verdict)] = &[
            (200, None, Verdict::Delivered),
            (201, None, Verdict::Delivered),
            (204, None, Verdict::Delivered),
            (299, None, Verdict::Delivered),
            (100, None, Verdict::Fail),
            (301, None, Verdict::Fail),
            (302, None, Verdict::Fail),
            (307, None, Verdict::Fail),
            (308, None, Verdict::Fail),
            (400, None, Verdict::Fail),
            (401, None, Verdict::Fail),
            (403, None, Verdict::Fail),
            (404, None, Verdict::Fail),
            (405, None, Verdict::Fail),
            (408, None, retry(None)),
            (408, asked, retry(None)),
            (409, None, Verdict::Fail),
            (410, None, Verdict::Gone),
            (413, None, Verdict::Fail),
            (422, None, Verdict::Fail),
            (429, None, retry(None)),
            (429, asked, retry(asked)),
            (500, None, retry(None)),
            (501, None, retry(None)),
            (502, None, retry(None)),
            (503, asked, retry(asked)),
            (504, None, retry(None)),
            (599, None, retry(None)),
        ];
        for (code, retry_after, expected) in table {
            let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::IM_A_TEAPOT);
            assert_eq!(status.as_u16(), *code);
            assert_eq!(
                classify_status(status, *retry_after),
                *expected,
                "HTTP {code}"
            );
        }
    }

    #[test]
    fn error_classification() {
        let refused = DestinationRefused {
            address: [127, 0, 0, 1].into(),
            class: AddressClass::Loopback,
        };
        let table = [
            (
                AttemptResult::TimedOut(Duration::from_secs(10)),
                Verdict::Retry { retry_after: None },
                "timed out after 10s",
            ),
            (
                AttemptResult::ConnectionFailed("connection refused".into()),
                Verdict::Retry { retry_after: None },
                "connection refused",
            ),
            (
                AttemptResult::Refused(refused),
                Verdict::Fail,
                "destination 127.0.0.1 is not allowed (loopback)",
            ),
            (
                AttemptResult::RequestFailed("invalid header".into()),
                Verdict::Fail,
                "invalid header",
            ),
            (
                AttemptResult::Response {
                    status: StatusCode::BAD_REQUEST,
                    retry_after: None,
                },
                Verdict::Fail,
                "HTTP 400 Bad Request",
            ),
            (
                AttemptResult::Response {
                    status: StatusCode::FOUND,
                    retry_after: None,
                },
                Verdict::Fail,
                "HTTP 302 Found (redirects are not followed)",
            ),
        ];
        for (result, verdict, reason) in table {
            assert_eq!(result.verdict(), verdict, "{result:?}");
            assert_eq!(result.reason(), reason);
        }
    }

    #[test]
    fn unknown_status_has_a_reason() {
        let status = StatusCode::from_u16(599).unwrap_or(StatusCode::IM_A_TEAPOT);
        assert_eq!(status_reason(status), "HTTP 599");
    }

    #[test]
    fn backoff_ceiling_doubles_up_to_the_cap() {
        let table = [
            (0, 1),
            (1, 1),
            (2, 2),
            (3, 4),
            (4, 8),
            (5, 16),
            (6, 32),
            (7, 60),
            (8, 60),
            (40, 60),
            (u32::MAX, 60),
        ];
        for (attempt, seconds) in table {
            assert_eq!(
                POLICY.ceiling(attempt),
                Duration::from_secs(seconds),
                "attempt {attempt}"
            );
        }
    }

    #[test]
    fn linear_backoff_ceiling_grows_by_the_delay_up_to_the_cap() {
        let linear = RetryPolicy {
            backoff: Backoff::Linear,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(3),
            ..POLICY
        };
        let table = [
            (0, 500),
            (1, 500),
            (2, 1000),
            (3, 1500),
            (4, 2000),
            (6, 3000),
            (7, 3000),
            (u32::MAX, 3000),
        ];
        for (attempt, millis) in table {
            assert_eq!(
                linear.ceiling(attempt),
                Duration::from_millis(millis),
                "attempt {attempt}"
            );
        }
        // Full jitter under the linear ceiling too.
        let mut rng = StdRng::seed_from_u64(11);
        let delays: Vec<Duration> = (0..200)
            .filter_map(|_| linear.delay_after(4, None, &mut rng))
            .collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(1500)));
    }

    #[test]
    fn no_delay_once_attempts_are_used_up() {
        let mut rng = StdRng::seed_from_u64(1);
        let table = [(1, true), (4, true), (5, false), (6, false)];
        for (attempt, retries) in table {
            assert_eq!(
                POLICY.delay_after(attempt, None, &mut rng).is_some(),
                retries,
                "after attempt {attempt}"
            );
        }
        let single = RetryPolicy {
            max_attempts: 1,
            ..POLICY
        };
        assert_eq!(single.delay_after(1, None, &mut rng), None);
    }

    #[test]
    fn jitter_stays_within_the_ceiling_and_spreads() {
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 1..=4 {
            let ceiling = POLICY.ceiling(attempt);
            let delays: Vec<Duration> = (0..200)
                .filter_map(|_| POLICY.delay_after(attempt, None, &mut rng))
                .collect();
            assert_eq!(delays.len(), 200);
            assert!(delays.iter().all(|delay| *delay <= ceiling));
            // Full jitter: some delays land in the lower half, some in the upper half.
            assert!(delays.iter().any(|delay| *delay < ceiling / 2));
            assert!(delays.iter().any(|delay| *delay > ceiling / 2));
        }
    }

    #[test]
    fn retry_after_is_clamped_to_the_schedule() {
        let mut rng = StdRng::seed_from_u64(3);
        let table = [(0, 1), (1, 1), (30, 30), (60, 60), (61, 60), (86_400, 60)];
        for (asked, expected) in table {
            assert_eq!(
                POLICY.delay_after(1, Some(Duration::from_secs(asked)), &mut rng),
                Some(Duration::from_secs(expected)),
                "Retry-After {asked}"
            );
        }
        let reversed = RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(1),
            ..POLICY
        };
        assert_eq!(
            reversed.clamp(Duration::from_secs(5)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn retry_after_parsing() {
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .map(|at| at.with_timezone(&Utc))
            .unwrap_or_default();
        let table = [
            ("120", Some(120)),
            (" 5 ", Some(5)),
            ("0", Some(0)),
            ("Wed, 21 Oct 2015 07:28:30 GMT", Some(30)),
            ("Wed, 21 Oct 2015 07:27:00 GMT", Some(0)),
            ("-1", None),
            ("1.5", None),
            ("soon", None),
            ("", None),
        ];
        for (value, expected) in table {
            assert_eq!(
                parse_retry_after(value, now),
                expected.map(Duration::from_secs),
                "{value:?}"
            );
        }
    }
}
