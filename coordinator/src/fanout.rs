//! Talking to nodes: catalogs and tasks, concurrently, each under a deadline.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow_flight::{Action, FlightClient, Ticket};
use confer_protocol::catalog::{CatalogInfo, Health};
use confer_protocol::task::Envelope;
use confer_protocol::{ErrorKind, ProtocolError, Reason, actions};
use confer_query::combine::SitePartial;
use futures::TryStreamExt;
use tonic::transport::{Channel, Endpoint};
use tracing::{instrument, warn};

use crate::config::NodeEntry;
use crate::error::{CoordinatorError, Result};

/// Largest message exchanged with a node.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How long a node that did not answer in time is left out before it is
/// asked again (the health check asks it meanwhile, and clears the mark as
/// soon as it answers).
pub const DOWN_FOR: Duration = Duration::from_secs(30);

/// A node the coordinator knows, with a lazily connected channel.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    /// Site name.
    pub name: String,
    /// Flight URL.
    pub url: String,
    channel: Channel,
    /// Circuit breaker: when the node last missed a deadline, while that
    /// was less than [`DOWN_FOR`] ago (shared by every clone).
    down: Arc<Mutex<Option<(Instant, String)>>>,
    /// Whether a probe of a node marked down is in flight.
    probing: Arc<std::sync::atomic::AtomicBool>,
    /// Why the node is left out of every task until its steward acts (its
    /// audit chain does not extend the record the coordinator anchored).
    held: Arc<Mutex<Option<String>>>,
}

impl NodeHandle {
    /// Prepares a channel (TLS when `tls` is given); nothing connects until the first call.
    pub fn new(entry: &NodeEntry, tls: Option<&confer_transport::ClientTls>) -> Result<Self> {
        let bad = |e: String| {
            CoordinatorError::Config(format!("node {} url {}: {e}", entry.name, entry.url))
        };
        let mut endpoint = Endpoint::from_shared(entry.url.clone())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            let host = confer_transport::url_host(&entry.url)
                .ok_or_else(|| bad("no host in the URL".into()))?;
            endpoint = endpoint
                .tls_config(tls.for_host(&host))
                .map_err(|e| bad(e.to_string()))?;
        }
        let channel = endpoint.connect_lazy();
        Ok(Self {
            name: entry.name.clone(),
            url: entry.url.clone(),
            channel,
            down: Arc::new(Mutex::new(None)),
            probing: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            held: Arc::new(Mutex::new(None)),
        })
    }

    /// Refuses at once while the node is marked down (see [`DOWN_FOR`]),
    /// and meanwhile probes it in the background (one probe at a time,
    /// under the caller's deadline): an answer clears the mark, another
    /// missed deadline renews it. So a hung node costs one deadline, not
    /// one per call, and a node that is back is used again at once.
    fn check_up(&self, timeout: Duration) -> std::result::Result<(), ProtocolError> {
        use std::sync::atomic::Ordering;
        if let Some(why) = self.held() {
            return Err(
                ProtocolError::new(ErrorKind::FailedPrecondition, why).with_retryable(false)
            );
        }
        let Ok(mut down) = self.down.lock() else {
            return Ok(());
        };
        match &*down {
            Some((at, why)) if at.elapsed() < DOWN_FOR => {
                if !self.probing.swap(true, Ordering::SeqCst) {
                    let node = self.clone();
                    tokio::spawn(async move {
                        let answer = node
                            .call_action::<Health>(
                                actions::HEALTH,
                                b"{}".to_vec(),
                                "health report",
                                timeout,
                            )
                            .await;
                        node.record(answer).ok();
                        node.probing.store(false, Ordering::SeqCst);
                    });
                }
                Err(ProtocolError::new(
                ErrorKind::Unavailable,
                format!(
                    "{why} ({:.0} s ago), so it is left out for up to {} s (until it answers a probe, \
                     or {:.0} s from now)",
                    at.elapsed().as_secs_f64(),
                    DOWN_FOR.as_secs(),
                    (DOWN_FOR - at.elapsed()).as_secs_f64()
                ),
            )
            .with_retryable(false))
            }
            Some(_) => {
                *down = None;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Records the outcome of a call: a missed deadline marks the node
    /// down, an answer clears the mark.
    fn record<T>(
        &self,
        result: std::result::Result<T, ProtocolError>,
    ) -> std::result::Result<T, ProtocolError> {
        if let Ok(mut down) = self.down.lock() {
            match &result {
                Err(e) if e.kind == ErrorKind::DeadlineExceeded => {
                    warn!(node = %self.name, "marked down for {} s: {}", DOWN_FOR.as_secs(), e.message);
                    *down = Some((Instant::now(), e.message.clone()));
                }
                Ok(_) => *down = None,
                Err(_) => {}
            }
        }
        result
    }

    fn client(&self) -> FlightClient {
        FlightClient::new_from_inner(
            arrow_flight::flight_service_client::FlightServiceClient::new(self.channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    /// A failed call as a typed error naming this node: a node's own
    /// answer keeps its kind, hint and reason; a failure of the link gets
    /// [`Reason::Certificate`] or [`Reason::Connect`] where that is the cause.
    fn failure(&self, err: arrow_flight::error::FlightError) -> ProtocolError {
        let e = match err {
            arrow_flight::error::FlightError::Tonic(status) => self.status_failure(&status),
            other => ProtocolError::new(
                ErrorKind::Internal,
                format!("node {} sent an invalid answer: {other}", self.name),
            ),
        };
        e.with_site(self.name.clone())
    }

    fn status_failure(&self, status: &tonic::Status) -> ProtocolError {
        // A node's own answers carry the retry flag; everything else is the
        // link, classified once here (tonic reports transport failures as
        // text only).
        let from_node = status
            .metadata()
            .get(confer_protocol::error::RETRYABLE_KEY)
            .is_some();
        if from_node {
            let e = ProtocolError::from_status(status);
            let prefix = format!("node {}", self.name);
            return if e.message.starts_with(&prefix) {
                e
            } else {
                e.context(prefix)
            };
        }
        let detail = format!("{status:?}");
        let tls = detail.contains("certificate");
        match link_reason(status, &detail) {
            Some(Reason::Certificate) => ProtocolError::new(
                ErrorKind::Unavailable,
                format!(
                    "node {} ({}): TLS refused: {}",
                    self.name,
                    self.url,
                    confer_transport::tls::explain_handshake_error(&std::io::Error::other(detail))
                ),
            )
            .with_retryable(false)
            .with_reason(Reason::Certificate),
            Some(Reason::Connect) => ProtocolError::new(
                ErrorKind::Unavailable,
                format!(
                    "node {} ({}) is unreachable: {}",
                    self.name,
                    self.url,
                    status.message()
                ),
            )
            .with_reason(Reason::Connect),
            // Cut mid-call (a node killed or restarting). Asking again is
            // safe: it is the same task, which a node never charges twice.
            _ if !tls
                && matches!(
                    status.code(),
                    tonic::Code::Unknown
                        | tonic::Code::Internal
                        | tonic::Code::Cancelled
                        | tonic::Code::Aborted
                ) =>
            {
                ProtocolError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "node {} ({}): the connection failed during the call: {}",
                        self.name,
                        self.url,
                        status.message()
                    ),
                )
                .with_retryable(true)
            }
            _ => ProtocolError::from_status(status).context(format!("node {}", self.name)),
        }
    }

    fn timed_out(&self, timeout: Duration) -> ProtocolError {
        ProtocolError::new(
            ErrorKind::DeadlineExceeded,
            format!(
                "node {} did not answer within {} s",
                self.name,
                timeout.as_secs_f64()
            ),
        )
    }

    /// The node's published catalog.
    pub async fn catalog(
        &self,
        timeout: Duration,
    ) -> std::result::Result<CatalogInfo, ProtocolError> {
        let info: CatalogInfo = self
            .action_json(actions::CATALOG, Vec::new(), "catalog", timeout)
            .await?;
        if info.node != self.name {
            return Err(ProtocolError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "the node at {} calls itself {:?}, but coordinator.toml names it {:?}: fix one of them",
                    self.url, info.node, self.name
                ),
            ));
        }
        Ok(info)
    }

    /// Sends a task and returns the node's release.
    #[instrument(skip_all, fields(node = %self.name))]
    pub async fn run(
        &self,
        envelope: &Envelope,
        timeout: Duration,
    ) -> std::result::Result<SitePartial, ProtocolError> {
        self.check_up(timeout)?;
        let ticket = Ticket::new(envelope.to_bytes()?);
        let call = async {
            let mut client = self.client();
            let mut stream = client.do_get(ticket).await.map_err(|e| self.failure(e))?;
            let mut batches: Vec<RecordBatch> = Vec::new();
            while let Some(batch) = stream.try_next().await.map_err(|e| self.failure(e))? {
                batches.push(batch);
            }
            // Flight sends a release as any number of batches: none when it
            // has no row (only its schema, which carries the release's
            // metadata), several when it is large.
            let schema = match (batches.first(), stream.schema()) {
                (Some(first), _) => first.schema(),
                (None, Some(schema)) => schema.clone(),
                (None, None) => {
                    return Err(ProtocolError::internal(format!(
                        "node {} sent neither a schema nor a batch",
                        self.name
                    )));
                }
            };
            let batch = arrow::compute::concat_batches(&schema, &batches).map_err(|e| {
                ProtocolError::internal(format!(
                    "node {} sent batches that do not fit together: {e}",
                    self.name
                ))
            })?;
            Ok(SitePartial {
                site: self.name.clone(),
                batch,
            })
        };
        // Arrow's IPC reader panics on some malformed buffers (an offset past
        // the end) instead of failing: a node's answer must not take the
        // coordinator's request down with it, so such an answer is set
        // aside as that node's failure.
        let call = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(call));
        let result = tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| self.timed_out(timeout))
            .and_then(|r| {
                r.unwrap_or_else(|_| {
                    Err(ProtocolError::new(
                        ErrorKind::Internal,
                        format!(
                            "node {} sent an answer the coordinator cannot decode (malformed Arrow data), \
                             set aside",
                            self.name
                        ),
                    )
                    .with_retryable(false))
                })
            });
        self.record(result)
    }
}

/// Deadline and retries for one node call.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Deadline of each attempt.
    pub timeout: Duration,
    /// Further attempts after a retryable failure (same task id: nodes never charge twice).
    pub retries: u32,
}

impl NodeHandle {
    /// [`NodeHandle::run`], retried with backoff while the failure is
    /// marked retryable (node unreachable, deadline, restarting).
    pub async fn run_with_retries(
        &self,
        envelope: &Envelope,
        policy: RetryPolicy,
    ) -> std::result::Result<SitePartial, ProtocolError> {
        self.retried("task", policy, || self.run(envelope, policy.timeout))
            .await
    }

    /// Calls `call` again with backoff while it fails with an error marked
    /// retryable, at most `policy.retries` more times; the last error says
    /// how many attempts were made.
    async fn retried<T, F, Fut>(
        &self,
        what: &str,
        policy: RetryPolicy,
        call: F,
    ) -> std::result::Result<T, ProtocolError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = std::result::Result<T, ProtocolError>>,
    {
        let mut attempt = 0;
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) if e.retryable && attempt < policy.retries => {
                    attempt += 1;
                    warn!(node = %self.name, attempt, "retrying {what} after: {}", e.message);
                    tokio::time::sleep(Duration::from_millis(200 << attempt.min(6))).await;
                }
                Err(e) if attempt > 0 => {
                    return Err(ProtocolError {
                        message: format!("{} (after {} attempts)", e.message, attempt + 1),
                        ..e
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Calls action `kind` with `body` and parses the node's JSON answer
    /// (`what` names it in errors).
    pub async fn action_json<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
        body: Vec<u8>,
        what: &str,
        timeout: Duration,
    ) -> std::result::Result<T, ProtocolError> {
        self.check_up(timeout)?;
        self.record(self.call_action(kind, body, what, timeout).await)
    }

    /// One action call, whether or not the node is marked down.
    async fn call_action<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
        body: Vec<u8>,
        what: &str,
        timeout: Duration,
    ) -> std::result::Result<T, ProtocolError> {
        let call = async {
            let mut client = self.client();
            let bodies: Vec<_> = client
                .do_action(Action::new(kind.to_string(), body))
                .await
                .map_err(|e| self.failure(e))?
                .try_collect()
                .await
                .map_err(|e| self.failure(e))?;
            let body = bodies.first().ok_or_else(|| {
                ProtocolError::internal(format!("node {} returned no {what}", self.name))
            })?;
            serde_json::from_slice::<T>(body).map_err(|e| {
                ProtocolError::internal(format!(
                    "node {} returned an unreadable {what}: {e}",
                    self.name
                ))
            })
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| self.timed_out(timeout))?
    }

    /// [`NodeHandle::action_json`], retried with backoff while the failure
    /// is marked retryable, as [`NodeHandle::run_with_retries`] does.
    pub async fn action_json_with_retries<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
        body: Vec<u8>,
        what: &str,
        policy: RetryPolicy,
    ) -> std::result::Result<T, ProtocolError> {
        self.retried(what, policy, || {
            self.action_json(kind, body.clone(), what, policy.timeout)
        })
        .await
    }

    /// The node's health report, with the hash of its audit record
    /// `anchor_seq`; asked also while the node is marked down (an answer
    /// clears the mark) or held.
    pub async fn health(
        &self,
        timeout: Duration,
        anchor_seq: Option<i64>,
    ) -> std::result::Result<Health, ProtocolError> {
        let body = serde_json::to_vec(&confer_protocol::catalog::HealthRequest { anchor_seq })
            .map_err(|e| ProtocolError::internal(e.to_string()))?;
        self.record(
            self.call_action(actions::HEALTH, body, "health report", timeout)
                .await,
        )
    }

    /// Why the node is held out of every task, if it is.
    pub fn held(&self) -> Option<String> {
        self.held.lock().ok().and_then(|h| h.clone())
    }

    /// Holds the node out of every task (`Some(why)`) or lets it back (`None`).
    pub fn hold(&self, why: Option<String>) {
        if let Ok(mut h) = self.held.lock() {
            *h = why;
        }
    }
}

/// Calls every node concurrently and returns each node's outcome, by name.
pub async fn each<T, F, Fut>(
    nodes: &[NodeHandle],
    f: F,
) -> Vec<(String, std::result::Result<T, ProtocolError>)>
where
    F: Fn(NodeHandle) -> Fut,
    Fut: Future<Output = std::result::Result<T, ProtocolError>>,
{
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let results = futures::future::join_all(nodes.iter().cloned().map(f)).await;
    names.into_iter().zip(results).collect()
}

/// Calls every node concurrently and sorts the outcomes ([`Gathered`]).
pub async fn gather<T, F, Fut>(nodes: &[NodeHandle], what: &str, f: F) -> Gathered<T>
where
    F: Fn(NodeHandle) -> Fut,
    Fut: Future<Output = std::result::Result<T, ProtocolError>>,
{
    Gathered::of(each(nodes, f).await, what)
}

/// The answers of a fan-out: what came back, by node, and who is missing
/// and why. Every caller that asks many nodes decides from this one type
/// whether it has enough ([`Gathered::require`], [`Gathered::all`]).
#[derive(Debug)]
pub struct Gathered<T> {
    /// The nodes that answered, with their answers, in the order asked.
    pub ok: Vec<(String, T)>,
    /// The nodes that did not, in the order asked.
    pub missing: Vec<String>,
    /// Why each of [`Gathered::missing`] did not (same order).
    pub failures: Vec<ProtocolError>,
}

impl<T> Gathered<T> {
    /// Sorts outcomes by name; each failure is logged, saying what was asked.
    pub fn of(results: Vec<(String, std::result::Result<T, ProtocolError>)>, what: &str) -> Self {
        let mut gathered = Gathered {
            ok: Vec::with_capacity(results.len()),
            missing: Vec::new(),
            failures: Vec::new(),
        };
        for (name, r) in results {
            match r {
                Ok(v) => gathered.ok.push((name, v)),
                Err(e) => {
                    warn!(node = %name, kind = ?e.kind, "node left out of {what}: {}", e.message);
                    gathered.missing.push(name);
                    gathered.failures.push(e);
                }
            }
        }
        gathered
    }

    /// The answers alone.
    pub fn values(self) -> Vec<T> {
        self.ok.into_iter().map(|(_, v)| v).collect()
    }

    /// The answers if every node answered; else one error naming every
    /// failure.
    pub fn all(self) -> std::result::Result<Vec<T>, ProtocolError> {
        if self.failures.is_empty() {
            Ok(self.values())
        } else {
            Err(joined(self.failures))
        }
    }

    /// Itself if at least `min_sites` nodes answered; else an error saying
    /// how many `did` (for example "answered") out of how many asked, who
    /// is missing and why, with the failures' kind and retry hint.
    pub fn require(self, min_sites: usize, did: &str) -> std::result::Result<Self, ProtocolError> {
        if self.ok.len() >= min_sites {
            return Ok(self);
        }
        let asked = self.ok.len() + self.missing.len();
        let answered = self.ok.len();
        let missing = self.missing.join(", ");
        let err = joined(self.failures);
        Err(ProtocolError::new(
            err.kind,
            format!(
                "only {answered} of {asked} sites {did} and this needs {min_sites} (min_sites); missing {missing}: {}",
                err.message
            ),
        )
        .with_retryable(err.retryable))
    }
}

/// One error naming every failure (kind of the first; retryable if all are).
pub fn joined(mut failures: Vec<ProtocolError>) -> ProtocolError {
    match failures.len() {
        0 => ProtocolError::internal("no node answered and none failed"),
        1 => failures.remove(0),
        _ => {
            let kind = failures[0].kind;
            let retryable = failures.iter().all(|f| f.retryable);
            let message = failures
                .iter()
                .map(|f| f.message.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            ProtocolError::new(kind, message).with_retryable(retryable)
        }
    }
}

/// Calls every node concurrently; fails naming every node that failed.
pub async fn all<T, F, Fut>(
    nodes: &[NodeHandle],
    f: F,
) -> std::result::Result<Vec<T>, ProtocolError>
where
    F: Fn(NodeHandle) -> Fut,
    Fut: Future<Output = std::result::Result<T, ProtocolError>>,
{
    gather(nodes, "the call", f).await.all()
}

/// Why a call failed on the link, from tonic's status for a transport
/// failure: a certificate refused in the TLS handshake, or no connection.
fn link_reason(status: &tonic::Status, detail: &str) -> Option<Reason> {
    let unavailable = status.code() == tonic::Code::Unavailable;
    if detail.contains("invalid peer certificate") || unavailable && detail.contains("certificate")
    {
        Some(Reason::Certificate)
    } else if unavailable && status.message().contains("connect") {
        Some(Reason::Connect)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_link_that_fails_mid_call_is_retried_and_a_nodes_refusal_is_not() {
        let node = NodeHandle::new(
            &NodeEntry {
                name: "site-a".into(),
                url: "http://127.0.0.1:9".into(),
            },
            None,
        )
        .expect("handle");
        let broken = node.failure(arrow_flight::error::FlightError::Tonic(Box::new(
            tonic::Status::internal("h2 protocol error: stream closed because of a broken pipe"),
        )));
        assert!(broken.retryable, "{broken:?}");
        assert_eq!(broken.kind, ErrorKind::Unavailable);
        assert!(broken.message.contains("node site-a"), "{}", broken.message);
        let refused: tonic::Status = ProtocolError::internal("the task failed while it ran").into();
        let refused = node.failure(arrow_flight::error::FlightError::Tonic(Box::new(refused)));
        assert!(!refused.retryable, "{refused:?}");
        assert_eq!(refused.kind, ErrorKind::Internal);
    }
}
