//! Dead letters: a delivery that ends without success is POSTed once more, to its Listener's
//! `deadLetterSink`, with the original body and `webhook-id` and headers saying where it was
//! going and why it ended, modelled on Knative's `knativeerrordest`, `knativeerrorcode` and
//! `knativeerrordata`. Pure values here; the engine queues dead letters like any delivery.

use http::{HeaderValue, StatusCode};
use url::Url;

use super::DropReason;

/// The original url, without user information, query or fragment.
pub const ERROR_DEST: &str = "crownstone-error-dest";
/// The last HTTP status a receiver answered with, empty if none answered.
pub const ERROR_CODE: &str = "crownstone-error-code";
/// Up to [`MAX_ERROR_DATA`] bytes of the last response body, base64 (standard alphabet).
pub const ERROR_DATA: &str = "crownstone-error-data";
/// Why the delivery ended: one of [`DeadLetterReason::as_str`].
pub const ERROR_REASON: &str = "crownstone-error-reason";

/// The most of a response body `crownstone-error-data` carries: the first bytes as received,
/// cut at this count whatever they encode (base64 makes any bytes a valid header value).
pub const MAX_ERROR_DATA: usize = 1024;

/// Why a delivery ended without success, as `crownstone-error-reason` says it. Drops keep the
/// words of their `reason` metric label, with hyphens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    /// Every attempt the policy allows failed with a status or error worth retrying.
    AttemptsExhausted,
    /// The receiver answered a status that is not retried (a 4xx other than 408 and 429), or
    /// the url's address is refused.
    NotRetryable,
    /// The receiver answered 410 Gone (and the Listener is suspended).
    Gone,
    /// The delivery reached its max age after at least one attempt.
    MaxAge,
    /// Dropped unsent: the owner's queue for the receiver was full.
    QueueFull,
    /// Dropped unsent: the operator's memory budget was spent.
    Budget,
    /// Dropped unsent: not sent within its max age.
    Expired,
    /// Dropped unsent: the Listener is suspended (410 Gone, or failing for too long).
    Suspended,
    /// Not sent: the owner's daily allowance was used up.
    AllowanceExhausted,
}

impl DeadLetterReason {
    /// Every reason, for documentation and tests.
    pub const ALL: [Self; 9] = [
        Self::AttemptsExhausted,
        Self::NotRetryable,
        Self::Gone,
        Self::MaxAge,
        Self::QueueFull,
        Self::Budget,
        Self::Expired,
        Self::Suspended,
        Self::AllowanceExhausted,
    ];

    /// The header value: `attempts-exhausted`, `not-retryable`, `gone`, `max-age`,
    /// `queue-full`, `budget`, `expired`, `suspended`, `allowance-exhausted`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AttemptsExhausted => "attempts-exhausted",
            Self::NotRetryable => "not-retryable",
            Self::Gone => "gone",
            Self::MaxAge => "max-age",
            Self::QueueFull => "queue-full",
            Self::Budget => "budget",
            Self::Expired => "expired",
            Self::Suspended => "suspended",
            Self::AllowanceExhausted => "allowance-exhausted",
        }
    }

    /// The dead letter a drop gets, if any. A drop because this replica stops (shutting down,
    /// leadership lost) leaves the event to whoever leads next, so it is no failure; a drop
    /// because the Listener or its owner is gone or paused has no one left to tell (and a
    /// paused owner asked for nothing to be sent).
    pub fn for_drop(reason: DropReason) -> Option<Self> {
        match reason {
            DropReason::QueueFull => Some(Self::QueueFull),
            DropReason::Budget => Some(Self::Budget),
            DropReason::Expired => Some(Self::Expired),
            DropReason::Suspended => Some(Self::Suspended),
            DropReason::ShuttingDown
            | DropReason::LeadershipLost
            | DropReason::ListenerRemoved
            | DropReason::Paused => None,
        }
    }
}

/// How a dead letter ended, as the `outcome` label of `dead_letters_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum DeadLetterOutcome {
    /// The sink answered 2xx.
    Delivered,
    /// The sink failed it for good; it is not dead-lettered again.
    Failed,
    /// Never sent to the sink: its queue refused it, or it could not be sent (no usable sink,
    /// the Listener gone, shutdown).
    Dropped,
}

impl DeadLetterOutcome {
    /// Every outcome, for registering the metric at zero.
    pub(crate) const ALL: [Self; 3] = [Self::Delivered, Self::Failed, Self::Dropped];

    pub(crate) fn as_label(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Failed => "failed",
            Self::Dropped => "dropped",
        }
    }
}

/// A url as it may be shown to someone else: scheme, host, port and path. User information and
/// query often carry credentials, so they are left out.
pub fn display_url(url: &Url) -> String {
    let mut shown = url.clone();
    // Only fails for urls that cannot have credentials, which then have none to remove.
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string()
}

/// The headers a dead letter carries besides those of any delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ErrorHeaders {
    pub(crate) dest: HeaderValue,
    pub(crate) code: HeaderValue,
    pub(crate) data: HeaderValue,
    pub(crate) reason: HeaderValue,
}

impl ErrorHeaders {
    /// The headers for a delivery to `original` that ended for `reason`, the last answer having
    /// been `status` with `body` (only its first [`MAX_ERROR_DATA`] bytes are kept).
    pub(crate) fn new(
        original: &Url,
        status: Option<StatusCode>,
        body: &[u8],
        reason: DeadLetterReason,
    ) -> Self {
        let cut = &body[..body.len().min(MAX_ERROR_DATA)];
        let data = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, cut);
        let code = status.map(|s| s.as_u16().to_string()).unwrap_or_default();
        Self {
            // A serialised url is ASCII without control characters: always a valid value.
            dest: HeaderValue::try_from(display_url(original))
                .unwrap_or_else(|_| HeaderValue::from_static("")),
            code: HeaderValue::try_from(code).unwrap_or_else(|_| HeaderValue::from_static("")),
            data: HeaderValue::try_from(data).unwrap_or_else(|_| HeaderValue::from_static("")),
            reason: HeaderValue::from_static(reason.as_str()),
        }
    }

    /// The bytes the headers hold, for the memory budget.
    pub(crate) fn footprint(&self) -> usize {
        std::mem::size_of::<Self>()
            + self
                .pairs()
                .iter()
                .map(|(_, value)| value.len())
                .sum::<usize>()
    }

    /// The headers as name and value, in the order they are written.
    pub(crate) fn pairs(&self) -> [(&'static str, &HeaderValue); 4] {
        [
            (ERROR_DEST, &self.dest),
            (ERROR_CODE, &self.code),
            (ERROR_DATA, &self.data),
            (ERROR_REASON, &self.reason),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn decode(value: &HeaderValue) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(value.as_bytes())
            .unwrap()
    }

    #[test]
    fn the_headers_say_where_it_went_and_how_it_ended() {
        let url = Url::parse("https://user:pass@hooks.example.com:8443/in?token=secret#x").unwrap();
        let headers = ErrorHeaders::new(
            &url,
            Some(StatusCode::INTERNAL_SERVER_ERROR),
            b"{\"error\":\"down\"}",
            DeadLetterReason::AttemptsExhausted,
        );
        assert_eq!(headers.dest, "https://hooks.example.com:8443/in");
        assert_eq!(headers.code, "500");
        assert_eq!(decode(&headers.data), b"{\"error\":\"down\"}");
        assert_eq!(headers.reason, "attempts-exhausted");
        let names: Vec<_> = headers.pairs().iter().map(|(name, _)| *name).collect();
        assert_eq!(
            names,
            [
                "crownstone-error-dest",
                "crownstone-error-code",
                "crownstone-error-data",
                "crownstone-error-reason"
            ]
        );
    }

    #[test]
    fn without_an_answer_code_and_data_are_empty() {
        let url = Url::parse("http://hooks.example.com/").unwrap();
        let headers = ErrorHeaders::new(&url, None, b"", DeadLetterReason::QueueFull);
        assert_eq!(headers.code, "");
        assert_eq!(headers.data, "");
        assert_eq!(headers.dest, "http://hooks.example.com/");
        assert_eq!(headers.reason, "queue-full");
    }

    #[test]
    fn the_data_is_the_first_kibibyte_as_raw_bytes() {
        let url = Url::parse("http://hooks.example.com/").unwrap();
        // 'é' is two bytes: byte 1024 falls inside one, and the cut does not move for it.
        let mut body = vec![b'a'; MAX_ERROR_DATA - 1];
        body.extend_from_slice("é and more".as_bytes());
        let headers = ErrorHeaders::new(
            &url,
            Some(StatusCode::BAD_REQUEST),
            &body,
            DeadLetterReason::NotRetryable,
        );
        let data = decode(&headers.data);
        assert_eq!(data.len(), MAX_ERROR_DATA);
        assert_eq!(data[..], body[..MAX_ERROR_DATA]);
        // Not text, still a valid header value.
        let binary = [0u8, 0xff, b'\r', b'\n'];
        let headers = ErrorHeaders::new(&url, None, &binary, DeadLetterReason::Gone);
        assert_eq!(decode(&headers.data), binary);
    }

    #[test]
    fn drops_map_to_reasons_only_when_the_event_ends_here() {
        let table = [
            (DropReason::QueueFull, Some("queue-full")),
            (DropReason::Budget, Some("budget")),
            (DropReason::Expired, Some("expired")),
            (DropReason::Suspended, Some("suspended")),
            (DropReason::ShuttingDown, None),
            (DropReason::LeadershipLost, None),
            (DropReason::ListenerRemoved, None),
            (DropReason::Paused, None),
        ];
        assert_eq!(table.len(), DropReason::ALL.len());
        for (drop, expected) in table {
            assert_eq!(
                DeadLetterReason::for_drop(drop).map(DeadLetterReason::as_str),
                expected,
                "{drop:?}"
            );
            // The header says the metric label's words.
            if let Some(reason) = expected {
                assert_eq!(reason.replace('-', "_"), drop.as_label());
            }
        }
        let mut names: Vec<_> = DeadLetterReason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DeadLetterReason::ALL.len());
    }

    #[test]
    fn a_displayed_url_keeps_no_credentials() {
        let table = [
            ("https://u:p@example.com/a?token=t", "https://example.com/a"),
            ("http://example.com:8080/", "http://example.com:8080/"),
            (
                "http://sink.tenant.svc:80/dead",
                "http://sink.tenant.svc/dead",
            ),
        ];
        for (text, expected) in table {
            assert_eq!(display_url(&Url::parse(text).unwrap()), expected);
        }
    }
}
