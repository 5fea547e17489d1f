//! A confer node: serves one institution's records to the network, releasing
//! only differentially private aggregates.
//!
//! ```text
//! node.toml ──▶ catalog::load ──▶ DataFusion SessionContext (CSV / Parquet)
//!                                         │
//!   coordinator ──DoGet(task)──▶ service ─┤ compile (own catalog) ─▶ local bounded SQL
//!                                         │ release (OpenDP noise)
//!                                         │ ledger: debit + result, fsync'd
//!   coordinator ◀── noisy partials ───────┘
//! ```
//!
//! Training jobs (`train`) run the job's feature query locally, train with
//! tch, and send only secure-aggregation inputs and DP evaluation counts.
//!
//! The node compiles every query itself with its own catalog, so sensitivity,
//! noise and cost never depend on what the coordinator claims. Nothing is
//! sent before its debit is committed to the ledger.

pub mod catalog;
pub mod config;
pub mod console;
pub mod error;
pub mod gate;
mod handler;
pub mod ledger;
pub mod omop;
pub mod onboard;
pub mod policy;
mod query;
pub mod secure;
mod secure_query;
pub mod service;
mod state;
pub mod train;

use std::net::SocketAddr;
use std::sync::Arc;

use arrow_flight::flight_service_server::FlightServiceServer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::info;

pub use config::NodeConfig;
pub use error::{NodeError, Result};

use crate::handler::NodeService;
use crate::state::NodeState;

/// Largest gRPC message a node accepts or sends.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How the node's transport is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plaintext, allowed only on a loopback address (demos and tests).
    InsecureLoopback,
    /// Mutual TLS from the config's `[tls]` section.
    Tls,
}

/// A node that is serving.
pub struct RunningNode {
    /// The address it listens on (with the real port when 0 was asked).
    pub addr: SocketAddr,
    /// The site name.
    pub name: String,
    /// The steward page's address, when `[console]` is configured.
    pub console_addr: Option<SocketAddr>,
    /// Whether the steward page speaks HTTPS.
    pub console_tls: bool,
    console_stop: Option<oneshot::Sender<()>>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: JoinHandle<std::result::Result<(), tonic::transport::Error>>,
}

impl RunningNode {
    /// Stops accepting requests, finishes the ones in flight, and returns.
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
            Ok(Err(e)) => Err(NodeError::Network(e.to_string())),
            Err(e) => Err(NodeError::Network(format!("server task failed: {e}"))),
        }
    }
}

/// Loads the tables, opens the ledger and starts serving.
pub async fn start(config: NodeConfig, transport: Transport) -> Result<RunningNode> {
    let addr = config.listen_addr()?;
    let tls = match transport {
        Transport::InsecureLoopback if !confer_transport::plaintext_allowed(&addr) => {
            return Err(NodeError::Config(format!(
                "node.listen = {addr}: plaintext is allowed only on a loopback address \
                 (127.0.0.1 or ::1); configure [tls] and start without --insecure-loopback"
            )));
        }
        Transport::InsecureLoopback => None,
        Transport::Tls => {
            let files = config.tls.as_ref().ok_or_else(|| {
                NodeError::Config(
                    "no [tls] section: give cert, key and ca (see `confer pki`), or pass --insecure-loopback \
                     to serve plaintext on a loopback address"
                        .into(),
                )
            })?;
            // A bundle for another site, an expired or foreign certificate:
            // refused before anything is opened or written.
            confer_transport::tls::check_own(
                files,
                confer_transport::pki::CertKind::Node,
                Some(&config.node.name),
            )
            .map_err(|e| NodeError::Config(e.to_string()))?;
            Some(
                confer_transport::ServerTls::new(
                    files,
                    Some(confer_transport::pki::CertKind::Coordinator),
                    "node",
                )
                .map_err(|e| NodeError::Config(e.to_string()))?,
            )
        }
    };
    let state = Arc::new(NodeState::open(&config).await?);
    // Summaries of refused unverified requests, once a window ends; stops
    // with the service.
    let weak = Arc::downgrade(&state);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(gate::UNVERIFIED_WINDOW).await;
            let Some(state) = weak.upgrade() else { break };
            if let Some(summary) = state.unverified.flush()
                && let Err(e) = state.audit_unverified(vec![summary])
            {
                tracing::warn!("cannot audit refused unverified requests: {e}");
            }
        }
    });

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| NodeError::Network(format!("cannot listen on {addr} (node.listen): {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| NodeError::Network(e.to_string()))?;
    let mut console = None;
    if let Some(cfg) = &config.console {
        let files = match transport {
            Transport::Tls => config.tls.as_ref(),
            Transport::InsecureLoopback => None,
        };
        let (listener, tls) = cfg
            .bind(files, "steward page")
            .await
            .map_err(NodeError::Config)?;
        let console_addr = listener
            .local_addr()
            .map_err(|e| NodeError::Network(e.to_string()))?;
        let secure = tls.is_some();
        let app = console::router(Arc::new(console::StewardConsole::new(
            state.clone(),
            &config.node.state_dir,
            cfg.session_ttl(),
            console_addr.port(),
            secure,
        )));
        let (tx, rx) = oneshot::channel::<()>();
        confer_console::spawn(app, listener, tls, rx)
            .map_err(|e| NodeError::Network(e.to_string()))?;
        info!(addr = %console_addr, "node serving the steward page");
        console = Some((console_addr, secure, tx));
    }
    let (console_addr, console_tls, console_stop) = match console {
        Some((a, s, tx)) => (Some(a), s, Some(tx)),
        None => (None, false, None),
    };
    let service = FlightServiceServer::new(NodeService::new(state))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (tx, rx) = oneshot::channel::<()>();
    let router = tonic::transport::Server::builder().add_service(service);
    let handle = confer_transport::spawn(router, listener, tls, rx);
    info!(node = %config.node.name, %addr, tables = config.tables.len(), "node serving");
    Ok(RunningNode {
        addr,
        console_addr,
        console_tls,
        console_stop,
        name: config.node.name,
        shutdown: Some(tx),
        handle,
    })
}
