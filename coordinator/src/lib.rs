//! The confer coordinator: takes DP queries from researchers over Arrow
//! Flight SQL, sends them to every node as tasks, and combines the nodes'
//! noisy partials into answers with confidence intervals.
//!
//! ```text
//! client ──Flight SQL──▶ service (Flight adapter) ─▶ query::plan   parse + compile + validate
//!                                   (no node contacted beyond fetching catalogs): schema + ticket
//! client ──DoGet───────▶ service ─▶ query::execute  check at every node (budget held there),
//!                                   run at those that passed (fanout, per-node deadline),
//!                                   combine (sums, SE, CI) ─▶ post-process ─▶ stream
//! ```
//!
//! `state` holds what every request shares (config, key, nodes, catalog
//! cache, planned statements, store); `health` checks nodes and anchors
//! their audit chains ([`anchor`]); `explain` answers EXPLAIN PRIVACY;
//! `studies` creates and edits studies.
//!
//! Training jobs ([`train`]) run in the background over the same nodes.
//!
//! The coordinator holds no records and adds no noise: nodes release, the
//! coordinator only does post-processing.

pub mod anchor;
pub mod auth;
pub mod budget;
pub mod catalog_view;
pub mod config;
mod console;
pub mod error;
mod explain;
pub mod fanout;
pub mod front;
mod health;
mod query;
pub mod secure;
pub mod service;
mod state;
pub mod store;
mod studies;
pub mod supervision;
pub mod train;

use std::net::SocketAddr;
use std::sync::Arc;

use arrow_flight::flight_service_server::FlightServiceServer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::info;

pub use config::CoordinatorConfig;
pub use error::{CoordinatorError, Result};

use crate::service::{CoordinatorService, CoordinatorState};

/// Largest gRPC message the coordinator sends to clients (results).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Largest gRPC message the coordinator accepts from a client. Requests
/// are statements (at most `confer_query::parse::MAX_SQL_BYTES`), job specs
/// and tickets; tonic decodes a message before any handler checks its
/// token, so anything larger is refused at decoding, before
/// authentication, with "decoded message length too large".
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// How the coordinator's connections are secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plaintext, only on loopback addresses (demos and tests), to clients
    /// and to nodes alike.
    InsecureLoopback,
    /// TLS from the config's `[tls]` section: to clients (with optional or
    /// required client certificates) and mutual TLS to the nodes.
    Tls,
}

/// A coordinator that is serving.
pub struct RunningCoordinator {
    /// The address clients connect to.
    pub addr: SocketAddr,
    /// The web console's address, when `[console]` is configured.
    pub console_addr: Option<SocketAddr>,
    /// Whether the console speaks HTTPS.
    pub console_tls: bool,
    shutdown: Option<oneshot::Sender<()>>,
    console_stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<std::result::Result<(), tonic::transport::Error>>,
}

impl RunningCoordinator {
    /// Stops accepting requests and finishes those in flight.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(tx) = self.console_stop.take() {
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

fn is_loopback_url(url: &str) -> bool {
    confer_transport::url_host(url).is_some_and(|h| confer_transport::is_loopback_host(&h))
}

/// Starts serving.
pub async fn start(config: CoordinatorConfig, transport: Transport) -> Result<RunningCoordinator> {
    let addr = config.listen_addr()?;
    let console_tls = match transport {
        Transport::Tls => config.tls.clone(),
        Transport::InsecureLoopback => None,
    };
    let (server_tls, client_tls) = match transport {
        Transport::InsecureLoopback => {
            if !confer_transport::plaintext_allowed(&addr) {
                return Err(CoordinatorError::Config(format!(
                    "coordinator.listen = {addr}: plaintext is allowed only on a loopback address; \
                     configure [tls] and start without --insecure-loopback"
                )));
            }
            for n in &config.nodes {
                if !n.url.starts_with("http://") || !is_loopback_url(&n.url) {
                    return Err(CoordinatorError::Config(format!(
                        "node {} at {}: plaintext is allowed only to loopback addresses (http://127.0.0.1:PORT)",
                        n.name, n.url
                    )));
                }
            }
            (None, None)
        }
        Transport::Tls => {
            let files = config.tls.as_ref().ok_or_else(|| {
                CoordinatorError::Config(
                    "no [tls] section: give cert, key and ca (see `confer pki`), or pass --insecure-loopback \
                     to use plaintext on loopback addresses"
                        .into(),
                )
            })?;
            for n in &config.nodes {
                if !n.url.starts_with("https://") {
                    return Err(CoordinatorError::Config(format!(
                        "node {} at {}: with TLS, node URLs start with https://",
                        n.name, n.url
                    )));
                }
            }
            // Said at start, where the operator looks; nodes refuse such a
            // coordinator on every connection in any case (and a dishonest
            // one would not run this check), so it does not stop the start:
            // `confer coordinator check` fails on it.
            if let Err(e) = confer_transport::tls::check_own(
                files,
                confer_transport::pki::CertKind::Coordinator,
                None,
            ) {
                tracing::warn!("nodes will refuse this coordinator's certificate: {e}");
            }
            let server = confer_transport::ServerTls::new(files, None, "coordinator")
                .map_err(|e| CoordinatorError::Config(e.to_string()))?;
            let client = confer_transport::ClientTls::from_files(files)
                .map_err(|e| CoordinatorError::Config(e.to_string()))?;
            (Some(server), Some(client))
        }
    };
    let store: Arc<dyn store::Store> =
        Arc::new(store::SqliteStore::open(&config.coordinator.state)?);
    match store.verify_audit()? {
        (records, None) => info!(records, "coordinator audit log chain intact"),
        (records, Some(problem)) => tracing::error!(
            "the coordinator audit log ({}) fails its check after {records} records: {problem}; \
             restore it from a backup (`confer coordinator audit verify` checks it)",
            config.coordinator.state.display()
        ),
    }
    let nodes = config
        .nodes
        .iter()
        .map(|n| fanout::NodeHandle::new(n, client_tls.as_ref()))
        .collect::<Result<Vec<_>>>()?;
    let health_every = std::time::Duration::from_secs(config.coordinator.health_interval_secs);
    let state = Arc::new(CoordinatorState::new(config, store, nodes)?);
    train::resume_all(&state);
    supervision::check_at_start(state.clone());
    let schedule = supervision::spawn_schedule(state.clone());
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        CoordinatorError::Network(format!("cannot listen on {addr} (coordinator.listen): {e}"))
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| CoordinatorError::Network(e.to_string()))?;
    let service = FlightServiceServer::new(front::Front(CoordinatorService::new(state.clone())))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (tx, rx) = oneshot::channel::<()>();
    let checker = state.clone();
    let health = tokio::spawn(async move {
        loop {
            checker.check_health().await;
            tokio::time::sleep(health_every).await;
        }
    });
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = rx.await;
        health.abort();
        if let Some(s) = schedule {
            s.abort();
        }
        let _ = stop_tx.send(());
    });
    let router = tonic::transport::Server::builder().add_service(service);
    let console = match state.config.console.clone() {
        Some(cfg) => {
            let (listener, tls) = cfg
                .bind(console_tls.as_ref(), "coordinator console")
                .await
                .map_err(CoordinatorError::Config)?;
            let console_addr = listener
                .local_addr()
                .map_err(|e| CoordinatorError::Network(e.to_string()))?;
            let secure = tls.is_some();
            let app = console::router(Arc::new(console::Console::new(
                state.clone(),
                cfg.session_ttl(),
                console_addr.port(),
                secure,
            )));
            let (tx, rx) = oneshot::channel::<()>();
            confer_console::spawn(app, listener, tls, rx)
                .map_err(|e| CoordinatorError::Network(e.to_string()))?;
            info!(addr = %console_addr, "coordinator serving its web console");
            Some((console_addr, secure, tx))
        }
        None => None,
    };
    let handle = confer_transport::spawn(router, listener, server_tls, stop_rx);
    info!(%addr, "coordinator serving Flight SQL");
    let (console_addr, console_tls, console_stop) = match console {
        Some((a, s, tx)) => (Some(a), s, Some(tx)),
        None => (None, false, None),
    };
    Ok(RunningCoordinator {
        console_addr,
        console_tls,
        console_stop,
        addr,
        shutdown: Some(tx),
        handle,
    })
}
