//! Talking to nodes: catalogs and tasks, concurrently, each under a deadline.

use std::time::Duration;

use arrow::array::RecordBatch;
use arrow_flight::{Action, FlightClient, Ticket};
use confer_protocol::catalog::CatalogInfo;
use confer_protocol::task::Envelope;
use confer_protocol::{ErrorKind, ProtocolError, actions};
use confer_query::combine::SitePartial;
use futures::TryStreamExt;
use tonic::transport::{Channel, Endpoint};
use tracing::{instrument, warn};

use crate::config::NodeEntry;
use crate::error::{CoordinatorError, Result};

/// Largest message exchanged with a node.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// A node the coordinator knows, with a lazily connected channel.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    /// Site name.
    pub name: String,
    /// Flight URL.
    pub url: String,
    channel: Channel,
}

impl NodeHandle {
    /// Prepares a channel; nothing connects until the first call.
    pub fn new(entry: &NodeEntry) -> Result<Self> {
        let channel = Endpoint::from_shared(entry.url.clone())
            .map_err(|e| {
                CoordinatorError::Config(format!("node {} url {}: {e}", entry.name, entry.url))
            })?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            name: entry.name.clone(),
            url: entry.url.clone(),
            channel,
        })
    }

    fn client(&self) -> FlightClient {
        FlightClient::new_from_inner(
            arrow_flight::flight_service_client::FlightServiceClient::new(self.channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    fn failure(&self, err: arrow_flight::error::FlightError) -> ProtocolError {
        match err {
            arrow_flight::error::FlightError::Tonic(status) => {
                let e = ProtocolError::from_status(&status);
                if e.kind == ErrorKind::Unavailable && e.message.contains("connect") {
                    ProtocolError::new(
                        ErrorKind::Unavailable,
                        format!(
                            "node {} ({}) is unreachable: {}",
                            self.name, self.url, e.message
                        ),
                    )
                } else {
                    e.context(format!("node {}", self.name))
                }
            }
            other => ProtocolError::new(
                ErrorKind::Internal,
                format!("node {} sent an invalid answer: {other}", self.name),
            ),
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
        let call = async {
            let mut client = self.client();
            let bodies: Vec<_> = client
                .do_action(Action::new(actions::CATALOG, ""))
                .await
                .map_err(|e| self.failure(e))?
                .try_collect()
                .await
                .map_err(|e| self.failure(e))?;
            let body = bodies.first().ok_or_else(|| {
                ProtocolError::internal(format!("node {} returned no catalog", self.name))
            })?;
            let info: CatalogInfo = serde_json::from_slice(body).map_err(|e| {
                ProtocolError::internal(format!(
                    "node {} returned an unreadable catalog: {e}",
                    self.name
                ))
            })?;
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
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| self.timed_out(timeout))?
    }

    /// Sends a task and returns the node's release.
    #[instrument(skip_all, fields(node = %self.name))]
    pub async fn run(
        &self,
        envelope: &Envelope,
        timeout: Duration,
    ) -> std::result::Result<SitePartial, ProtocolError> {
        let ticket = Ticket::new(envelope.to_bytes()?);
        let call = async {
            let mut client = self.client();
            let batches: Vec<RecordBatch> = client
                .do_get(ticket)
                .await
                .map_err(|e| self.failure(e))?
                .try_collect()
                .await
                .map_err(|e| self.failure(e))?;
            let batch = match batches.as_slice() {
                [one] => one.clone(),
                _ => {
                    return Err(ProtocolError::internal(format!(
                        "node {} sent {} batches where one was expected",
                        self.name,
                        batches.len()
                    )));
                }
            };
            Ok(SitePartial {
                site: self.name.clone(),
                batch,
            })
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| self.timed_out(timeout))?
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
    let results = futures::future::join_all(nodes.iter().cloned().map(f)).await;
    let mut ok = Vec::with_capacity(results.len());
    let mut failures: Vec<ProtocolError> = Vec::new();
    for r in results {
        match r {
            Ok(v) => ok.push(v),
            Err(e) => {
                warn!(kind = ?e.kind, "node call failed: {}", e.message);
                failures.push(e);
            }
        }
    }
    match failures.len() {
        0 => Ok(ok),
        1 => Err(failures.remove(0)),
        _ => {
            let kind = failures[0].kind;
            let retryable = failures.iter().all(|f| f.retryable);
            let message = failures
                .iter()
                .map(|f| f.message.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            Err(ProtocolError::new(kind, message).with_retryable(retryable))
        }
    }
}
