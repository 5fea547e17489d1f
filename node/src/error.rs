//! Node errors, and how they reach a client as gRPC statuses.

use confer_protocol::{ErrorKind, ProtocolError};
use confer_query::QueryError;

/// What can go wrong at a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The config file is unreadable or invalid; the message names the field.
    #[error("config: {0}")]
    Config(String),
    /// A table source is missing, unreadable or does not match its declaration.
    #[error("table {table} ({path}): {message}")]
    Source {
        /// Table name.
        table: String,
        /// The file or directory.
        path: String,
        /// What is wrong and what to change.
        message: String,
    },
    /// The ledger could not be read or written.
    #[error("privacy ledger: {0}")]
    Ledger(String),
    /// The query cannot be compiled or run.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// A request was refused for a reason that the client must see.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// Listening or serving failed.
    #[error("network: {0}")]
    Network(String),
    /// A broken invariant (a lock poisoned by an earlier panic): a bug in
    /// confer, not retryable.
    #[error("internal error (a bug in confer, please report it): {0}")]
    Internal(String),
}

/// Convenience alias.
pub type Result<T, E = NodeError> = std::result::Result<T, E>;

impl From<datafusion::error::DataFusionError> for NodeError {
    fn from(err: datafusion::error::DataFusionError) -> Self {
        NodeError::Query(QueryError::from(err))
    }
}

impl From<rusqlite::Error> for NodeError {
    fn from(err: rusqlite::Error) -> Self {
        NodeError::Ledger(err.to_string())
    }
}

impl From<confer_store::StoreError> for NodeError {
    fn from(err: confer_store::StoreError) -> Self {
        NodeError::Ledger(err.to_string())
    }
}

impl From<NodeError> for ProtocolError {
    fn from(err: NodeError) -> Self {
        match err {
            NodeError::Protocol(p) => p,
            NodeError::Query(q) => q.into(),
            // Ledger trouble (disk full, locked) may pass: worth a retry.
            NodeError::Ledger(m) => {
                ProtocolError::new(ErrorKind::Unavailable, format!("privacy ledger: {m}"))
            }
            other => ProtocolError::internal(other.to_string()),
        }
    }
}

impl From<NodeError> for tonic::Status {
    fn from(err: NodeError) -> Self {
        ProtocolError::from(err).into()
    }
}
