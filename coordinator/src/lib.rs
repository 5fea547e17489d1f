//! The confer coordinator: takes DP queries from researchers over Arrow
//! Flight SQL, sends them to every node as tasks, and combines the nodes'
//! noisy partials into answers with confidence intervals.
//!
//! ```text
//! client ──Flight SQL──▶ service::plan     parse + compile + validate (no node contacted
//!                                          beyond fetching catalogs), returns schema + ticket
//! client ──DoGet───────▶ service::execute  fanout::all(nodes, run task, per-node deadline)
//!                                          combine (sums, SE, CI) ─▶ post-process ─▶ stream
//! ```
//!
//! The coordinator holds no records and adds no noise: nodes release, the
//! coordinator only does post-processing.

pub mod config;
pub mod error;
pub mod fanout;
pub mod service;

use std::net::SocketAddr;
use std::sync::Arc;

use arrow_flight::flight_service_server::FlightServiceServer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::info;

pub use config::CoordinatorConfig;
pub use error::{CoordinatorError, Result};

use crate::service::{CoordinatorService, CoordinatorState};

/// Largest gRPC message the coordinator accepts or sends to clients.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How the client-facing transport is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plaintext, only on loopback addresses (demos and tests), to clients
    /// and to nodes alike.
    InsecureLoopback,
}

/// A coordinator that is serving.
pub struct RunningCoordinator {
    /// The address clients connect to.
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    handle: JoinHandle<std::result::Result<(), tonic::transport::Error>>,
}

impl RunningCoordinator {
    /// Stops accepting requests and finishes those in flight.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.wait().await
    }

    /// Waits until the server stops.
    pub async fn wait(self) -> Result<()> {
        match self.handle.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CoordinatorError::Network(e.to_string())),
            Err(e) => Err(CoordinatorError::Network(format!(
                "server task failed: {e}"
            ))),
        }
    }
}

/// Starts serving.
pub async fn start(config: CoordinatorConfig, transport: Transport) -> Result<RunningCoordinator> {
    let addr = config.listen_addr()?;
    match transport {
        Transport::InsecureLoopback => {
            if !addr.ip().is_loopback() {
                return Err(CoordinatorError::Config(format!(
                    "coordinator.listen = {addr}: plaintext is allowed only on a loopback address"
                )));
            }
            for n in &config.nodes {
                let host = n
                    .url
                    .parse::<tonic::codegen::http::Uri>()
                    .ok()
                    .and_then(|u| u.host().map(str::to_string))
                    .unwrap_or_default();
                let loopback = host == "localhost"
                    || host
                        .trim_matches(|c| c == '[' || c == ']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                if !loopback || n.url.starts_with("https") {
                    return Err(CoordinatorError::Config(format!(
                        "node {} at {}: plaintext is allowed only to loopback addresses (http://127.0.0.1:PORT)",
                        n.name, n.url
                    )));
                }
            }
        }
    }
    let state = Arc::new(CoordinatorState::new(config)?);
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        CoordinatorError::Network(format!("cannot listen on {addr} (coordinator.listen): {e}"))
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| CoordinatorError::Network(e.to_string()))?;
    let service = FlightServiceServer::new(CoordinatorService::new(state))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (tx, rx) = oneshot::channel::<()>();
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let handle = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            }),
    );
    info!(%addr, "coordinator serving Flight SQL");
    Ok(RunningCoordinator {
        addr,
        shutdown: Some(tx),
        handle,
    })
}
