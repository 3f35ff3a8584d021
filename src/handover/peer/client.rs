//! The standby's side: long-polls the replica that holds the Lease, at the address that replica
//! wrote into the Lease, and hands every record it can verify to the forwarders. Nothing a peer
//! sends can crash it or grow it past a bound: bodies and record counts are capped, and an
//! answer is accepted only with the right MAC, from the Lease's holder, in the Lease's term.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::auth::{self, AuthError, HandoverKey};
use super::{
    FillAnswer, FillRequest, HandoverError, HandoverMetrics, ProgressAnswer, ADDRESS_ANNOTATION,
    GAP_PATH, MAX_FILL_BYTES, MAX_FILL_EVENTS, MAX_RECORDS_PER_ANSWER, PROGRESS_PATH,
};
use crate::conventions::describe_kube_error;
use crate::handover::{GapFill, ProgressSink};

/// The largest answer body read; a larger one is refused unread.
pub const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// The most records accepted in one answer: a leader pages at [`MAX_RECORDS_PER_ANSWER`];
/// room is left for a leader of another version.
const MAX_ACCEPTED_RECORDS: usize = 10 * MAX_RECORDS_PER_ANSWER;

/// First delay after a failed poll; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A poll waits up to a second at the leader; this leaves room for the network.
const POLL_TIMEOUT: Duration = Duration::from_secs(5);

/// Who holds the Lease, as a standby needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub identity: String,
    /// `leaseTransitions`: changes whenever another replica takes the Lease.
    pub term: i32,
    /// Where the holder serves its progress (`host:port`), once it has written it.
    pub address: Option<String>,
}

/// The holder of `lease`, if any.
pub fn read_holder(lease: &Lease) -> Option<Holder> {
    let spec = lease.spec.as_ref()?;
    let identity = spec.holder_identity.clone().filter(|h| !h.is_empty())?;
    let address = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ADDRESS_ANNOTATION))
        .filter(|a| !a.is_empty())
        .cloned();
    Some(Holder {
        identity,
        term: spec.lease_transitions.unwrap_or(0),
        address,
    })
}

/// Reads Lease `name` every `period` until `cancel` and says who holds it. A read that fails
/// keeps the last holder known.
pub fn watch_lease_holder(
    api: Api<Lease>,
    name: String,
    period: Duration,
    cancel: CancellationToken,
) -> watch::Receiver<Option<Holder>> {
    let (sender, receiver) = watch::channel(None);
    tokio::spawn(async move {
        loop {
            match api.get_opt(&name).await {
                Ok(lease) => {
                    let holder = lease.as_ref().and_then(read_holder);
                    sender.send_if_modified(|current| {
                        let changed = *current != holder;
                        *current = holder;
                        changed
                    });
                }
                Err(error) => {
                    tracing::debug!(lease = %name, error = %describe_kube_error(&error), "Could not read the lease for the handover.")
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
        }
    });
    receiver
}

/// Resolves when the holder changes; never once nobody can change it any more, so the last
/// holder known is followed until cancelled.
async fn changed(holder: &mut watch::Receiver<Option<Holder>>) {
    if holder.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Why a poll brought nothing.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("the holder's handover address is not host:port")]
    BadAddress,
    #[error("could not reach the leader: {0}")]
    Unreachable(#[source] reqwest::Error),
    #[error("the leader refused this replica's credentials")]
    Refused,
    #[error("the holder does not lead (any more)")]
    NotLeading,
    #[error("the leader answered {0}")]
    Status(u16),
    #[error(
        "the answer is larger than {MAX_ANSWER_BYTES} bytes or {MAX_ACCEPTED_RECORDS} records"
    )]
    TooLarge,
    #[error("the answer failed authentication: {0}")]
    Auth(#[from] AuthError),
    #[error("the answer is not a progress answer")]
    Malformed,
    #[error("the answer is from another replica or term than the Lease's holder")]
    WrongLeader,
    #[error("the answer's version went back")]
    Backwards,
}

impl PollError {
    /// The metric label.
    pub fn as_label(&self) -> &'static str {
        match self {
            PollError::BadAddress => "bad_address",
            PollError::Unreachable(_) => "unreachable",
            PollError::Refused => "refused",
            PollError::NotLeading => "not_leading",
            PollError::Status(_) => "status",
            PollError::TooLarge => "too_large",
            PollError::Auth(error) => error.as_label(),
            PollError::Malformed => "malformed",
            PollError::WrongLeader => "wrong_leader",
            PollError::Backwards => "backwards",
        }
    }

    /// Whether the answer came but could not be trusted.
    fn is_auth(&self) -> bool {
        matches!(
            self,
            PollError::Auth(_) | PollError::WrongLeader | PollError::Backwards
        )
    }
}

/// The url of a poll at `address`; refused unless `address` is a bare `host:port`.
fn progress_url(address: &str, after: u64) -> Result<Url, PollError> {
    let url = Url::parse(&format!("http://{address}{PROGRESS_PATH}?after={after}"))
        .map_err(|_| PollError::BadAddress)?;
    let bare = url.host_str().is_some()
        && url.port().is_some()
        && url.username().is_empty()
        && url.password().is_none()
        && url.path() == PROGRESS_PATH
        && url.query() == Some(&format!("after={after}"))
        && url.fragment().is_none();
    bare.then_some(url).ok_or(PollError::BadAddress)
}

/// The url of a fill at `address`; refused unless `address` is a bare `host:port`.
fn fill_url(address: &str) -> Result<Url, PollError> {
    let url =
        Url::parse(&format!("http://{address}{GAP_PATH}")).map_err(|_| PollError::BadAddress)?;
    let bare = url.host_str().is_some()
        && url.port().is_some()
        && url.username().is_empty()
        && url.password().is_none()
        && url.path() == GAP_PATH
        && url.query().is_none()
        && url.fragment().is_none();
    bare.then_some(url).ok_or(PollError::BadAddress)
}

/// The body of a fill for `holder`; `None` past the bounds (the events then stay in the
/// standby's buffer for a takeover) or for an event that is not text.
pub fn fill_body(holder: &Holder, fill: &GapFill) -> Option<Vec<u8>> {
    if fill.events.len() > MAX_FILL_EVENTS {
        return None;
    }
    let events = fill
        .events
        .iter()
        .map(|json| String::from_utf8(json.to_vec()).ok())
        .collect::<Option<Vec<String>>>()?;
    let body = serde_json::to_vec(&FillRequest {
        leader: holder.identity.clone(),
        term: holder.term,
        token: fill.token,
        gap: fill.at,
        events,
    })
    .ok()?;
    (body.len() <= MAX_FILL_BYTES).then_some(body)
}

/// Checks a fill's answer: the MAC under `key`, from `holder` in its term; whether the leader
/// took the fill.
pub fn accept_fill_answer(
    key: &HandoverKey,
    holder: &Holder,
    body: &[u8],
    mac: Option<&str>,
) -> Result<bool, PollError> {
    auth::verify_answer(key, body, mac.ok_or(AuthError::MissingHeader)?)?;
    let answer: FillAnswer = serde_json::from_slice(body).map_err(|_| PollError::Malformed)?;
    if answer.leader != holder.identity || answer.term != holder.term {
        return Err(PollError::WrongLeader);
    }
    Ok(answer.accepted)
}

/// Checks an answer's bytes: the MAC under `key`, from `holder` in its term, not behind
/// `after`, within the bounds.
pub fn accept_answer(
    key: &HandoverKey,
    holder: &Holder,
    after: u64,
    body: &[u8],
    mac: Option<&str>,
) -> Result<ProgressAnswer, PollError> {
    auth::verify_answer(key, body, mac.ok_or(AuthError::MissingHeader)?)?;
    let answer: ProgressAnswer = serde_json::from_slice(body).map_err(|_| PollError::Malformed)?;
    if answer.leader != holder.identity || answer.term != holder.term {
        return Err(PollError::WrongLeader);
    }
    if answer.version < after {
        return Err(PollError::Backwards);
    }
    if answer.records.len() > MAX_ACCEPTED_RECORDS {
        return Err(PollError::TooLarge);
    }
    Ok(answer)
}

/// Whether a standby has every record the leader it follows has published: once it does, a
/// takeover starts right after the leader's progress on every token, so a warm standby says
/// it is ready only then (a rollout then stops the old leader only once its successor has
/// caught up). True while there is nobody to follow, and where no poller runs at all.
#[derive(Clone, Debug)]
pub struct CatchUp(Arc<AtomicBool>);

impl Default for CatchUp {
    fn default() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }
}

impl CatchUp {
    pub fn is_caught_up(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, caught_up: bool) {
        self.0.store(caught_up, Ordering::Relaxed);
    }
}

/// A standby's poller of the leader's progress.
pub struct ProgressClient {
    key: HandoverKey,
    identity: String,
    http: reqwest::Client,
    sink: Arc<dyn ProgressSink>,
    metrics: HandoverMetrics,
    catch_up: CatchUp,
}

impl ProgressClient {
    /// Polls whoever `holder` names (unless it is `identity`, this replica) until `cancel`,
    /// hands the records to `sink`, and keeps `catch_up` saying whether it has them all.
    pub fn spawn(
        key: HandoverKey,
        identity: String,
        holder: watch::Receiver<Option<Holder>>,
        sink: Arc<dyn ProgressSink>,
        metrics: HandoverMetrics,
        catch_up: CatchUp,
        cancel: CancellationToken,
    ) -> Result<JoinHandle<()>, HandoverError> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(1))
            .timeout(POLL_TIMEOUT)
            .build()
            .map_err(HandoverError::Client)?;
        let client = ProgressClient {
            key,
            identity,
            http,
            sink,
            metrics,
            catch_up,
        };
        // Not caught up until the first answer, or until it is clear nobody is to be followed.
        client.catch_up.set(false);
        Ok(tokio::spawn(client.run(holder, cancel)))
    }

    async fn run(self, mut holder: watch::Receiver<Option<Holder>>, cancel: CancellationToken) {
        let mut after = 0;
        let mut following: Option<(String, i32)> = None;
        let mut backoff = MIN_BACKOFF;
        loop {
            let current = holder.borrow_and_update().clone();
            let target = current.filter(|h| h.identity != self.identity);
            let Some((leader, address)) = target.and_then(|h| h.address.clone().map(|a| (h, a)))
            else {
                // Nobody to follow: no holder, this replica leads, or no address yet.
                self.catch_up.set(true);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = changed(&mut holder) => {}
                }
                continue;
            };
            let term = (leader.identity.clone(), leader.term);
            if following.as_ref() != Some(&term) {
                // Another leader numbers its versions afresh.
                after = 0;
                following = Some(term);
                self.catch_up.set(false);
            }
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = changed(&mut holder) => continue,
                outcome = self.poll(&leader, &address, after) => outcome,
            };
            match outcome {
                Ok(answer) => {
                    backoff = MIN_BACKOFF;
                    self.metrics.progress_age.touch();
                    if !answer.records.is_empty() {
                        self.metrics
                            .records_received
                            .inc_by(answer.records.len() as u64);
                        self.sink.apply_progress(&answer.records);
                    }
                    after = answer.version;
                    // A page cut short of the leader's newest has more behind it.
                    if answer.records.len() < MAX_RECORDS_PER_ANSWER {
                        self.catch_up.set(true);
                    }
                    for fill in self.sink.take_fills() {
                        let accepted = tokio::select! {
                            _ = cancel.cancelled() => return,
                            accepted = self.send_fill(&leader, &address, &fill) => accepted,
                        };
                        match accepted {
                            Ok(accepted) => {
                                self.sink.fill_answered(&fill.token, fill.at, accepted);
                            }
                            Err(error) => {
                                // The events stay in the buffer: a takeover delivers them.
                                self.metrics.poll_error(error.as_label());
                                tracing::debug!(leader = %leader.identity, %error, "Could not send a gap's events to the leader.");
                            }
                        }
                    }
                }
                Err(error) => {
                    if error.is_auth() {
                        self.metrics.auth_failure("standby", error.as_label());
                        tracing::warn!(leader = %leader.identity, %error, "Refused the leader's progress.");
                    } else {
                        self.metrics.poll_error(error.as_label());
                        tracing::debug!(leader = %leader.identity, %error, "Could not poll the leader's progress.");
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = changed(&mut holder) => {}
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Sends the leader the events of a gap in its stream; whether it took them.
    async fn send_fill(
        &self,
        leader: &Holder,
        address: &str,
        fill: &GapFill,
    ) -> Result<bool, PollError> {
        let url = fill_url(address)?;
        let body = fill_body(leader, fill).ok_or(PollError::TooLarge)?;
        let now = auth::unix_now();
        let signature =
            auth::sign_request_with_body(&self.key, "POST", GAP_PATH, &self.identity, now, &body);
        let response = self
            .http
            .post(url)
            .header(auth::PEER_HEADER, &self.identity)
            .header(auth::TIME_HEADER, now.to_string())
            .header(auth::AUTH_HEADER, signature)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(PollError::Unreachable)?;
        match response.status().as_u16() {
            200 => {}
            401 => return Err(PollError::Refused),
            503 => return Err(PollError::NotLeading),
            other => return Err(PollError::Status(other)),
        }
        let mac = response
            .headers()
            .get(auth::MAC_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut response = response;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(PollError::Unreachable)? {
            // An answer to a fill is a few dozen bytes.
            if body.len() + chunk.len() > 64 * 1024 {
                return Err(PollError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        accept_fill_answer(&self.key, leader, &body, mac.as_deref())
    }

    async fn poll(
        &self,
        leader: &Holder,
        address: &str,
        after: u64,
    ) -> Result<ProgressAnswer, PollError> {
        let url = progress_url(address, after)?;
        let path = format!("{PROGRESS_PATH}?after={after}");
        let now = auth::unix_now();
        let signature = auth::sign_request(&self.key, "GET", &path, &self.identity, now);
        self.metrics.polls.inc();
        let mut response = self
            .http
            .get(url)
            .header(auth::PEER_HEADER, &self.identity)
            .header(auth::TIME_HEADER, now.to_string())
            .header(auth::AUTH_HEADER, signature)
            .send()
            .await
            .map_err(PollError::Unreachable)?;
        match response.status().as_u16() {
            200 => {}
            401 => return Err(PollError::Refused),
            503 => return Err(PollError::NotLeading),
            other => return Err(PollError::Status(other)),
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
        {
            return Err(PollError::TooLarge);
        }
        let mac = response
            .headers()
            .get(auth::MAC_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(PollError::Unreachable)? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(PollError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        accept_answer(&self.key, leader, after, &body, mac.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::TokenHash;
    use crate::handover::{EventDigest, TokenProgress};
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use kube::api::ObjectMeta;

    fn key(fill: u8) -> HandoverKey {
        HandoverKey::new(vec![fill; 32]).unwrap()
    }

    fn holder() -> Holder {
        Holder {
            identity: "replica-a".into(),
            term: 3,
            address: Some("127.0.0.1:8084".into()),
        }
    }

    fn answer(leader: &str, term: i32, version: u64) -> Vec<u8> {
        serde_json::to_vec(&ProgressAnswer {
            leader: leader.into(),
            term,
            version,
            is_final: false,
            records: vec![TokenProgress {
                token: TokenHash::of("t"),
                seq: 9,
                tail: vec![EventDigest(1)],
                delivered_through: 9,
                chain: None,
                gaps: Vec::new(),
            }],
        })
        .unwrap()
    }

    #[test]
    fn only_a_signed_answer_of_the_holder_in_its_term_is_accepted() {
        let good = answer("replica-a", 3, 5);
        let mac = auth::sign_answer(&key(1), &good);
        let accepted = accept_answer(&key(1), &holder(), 2, &good, Some(&mac)).unwrap();
        assert_eq!(accepted.version, 5);
        assert_eq!(accepted.records[0].delivered_through, 9);

        // Signed under another key.
        let other_key = auth::sign_answer(&key(2), &good);
        // The body changed after signing: a forged record.
        let forged = String::from_utf8(good.clone())
            .unwrap()
            .replace("\"deliveredThrough\":9", "\"deliveredThrough\":99")
            .into_bytes();
        assert_ne!(forged, good);
        for (body, mac) in [
            (&good, Some(other_key.as_str())),
            (&forged, Some(mac.as_str())),
            (&good, None),
        ] {
            assert!(
                matches!(
                    accept_answer(&key(1), &holder(), 2, body, mac),
                    Err(PollError::Auth(_))
                ),
                "{mac:?}"
            );
        }
        // Rightly signed, but by a replica that does not hold the Lease, or in another term
        // (the same replica's answer from before it lost and took the Lease again).
        for body in [answer("replica-b", 3, 5), answer("replica-a", 2, 5)] {
            let mac = auth::sign_answer(&key(1), &body);
            assert!(matches!(
                accept_answer(&key(1), &holder(), 2, &body, Some(&mac)),
                Err(PollError::WrongLeader)
            ));
        }
        // An older answer replayed.
        assert!(matches!(
            accept_answer(&key(1), &holder(), 6, &good, Some(&mac)),
            Err(PollError::Backwards)
        ));
        let junk = b"{\"leader\":";
        let mac = auth::sign_answer(&key(1), junk);
        assert!(matches!(
            accept_answer(&key(1), &holder(), 0, junk, Some(&mac)),
            Err(PollError::Malformed)
        ));
    }

    #[test]
    fn the_holder_and_its_address_come_from_the_lease() {
        let mut lease = Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some("replica-a".into()),
                lease_transitions: Some(4),
                ..LeaseSpec::default()
            }),
        };
        assert_eq!(
            read_holder(&lease),
            Some(Holder {
                identity: "replica-a".into(),
                term: 4,
                address: None
            })
        );
        lease.metadata.annotations = Some(
            [(ADDRESS_ANNOTATION.to_owned(), "10.0.0.7:8084".to_owned())]
                .into_iter()
                .collect(),
        );
        assert_eq!(
            read_holder(&lease).unwrap().address.as_deref(),
            Some("10.0.0.7:8084")
        );
        lease.spec.as_mut().unwrap().holder_identity = Some(String::new());
        assert_eq!(read_holder(&lease), None);
    }

    #[test]
    fn only_a_bare_host_and_port_is_polled() {
        assert_eq!(
            progress_url("10.0.0.7:8084", 3).unwrap().as_str(),
            "http://10.0.0.7:8084/handover/progress?after=3"
        );
        assert!(progress_url("[fd00::7]:8084", 0).is_ok());
        assert!(progress_url("op-0.example:9000", 0).is_ok());
        for bad in [
            "10.0.0.7",
            "user@10.0.0.7:80",
            "10.0.0.7:80/elsewhere",
            "10.0.0.7:80?after=9&",
            "10.0.0.7:80#x",
            "",
            "a b:80",
        ] {
            assert!(progress_url(bad, 0).is_err(), "{bad}");
        }
    }
}
