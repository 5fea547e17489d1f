//! Coordinator errors and their gRPC statuses.

use confer_protocol::{ErrorKind, ProtocolError};
use confer_query::QueryError;

/// What can go wrong at the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The config file is unreadable or invalid; the message names the field.
    #[error("config: {0}")]
    Config(String),
    /// Listening or serving failed.
    #[error("network: {0}")]
    Network(String),
    /// The coordinator's state store (SQLite) failed: it may pass (disk
    /// full, locked), so the client may retry, as with a node's ledger.
    #[error("coordinator state: {0}")]
    State(String),
    /// A broken invariant (a lock poisoned by an earlier panic, a stored
    /// record that does not read back): a bug in confer, not retryable.
    #[error("internal error (a bug in confer, please report it): {0}")]
    Internal(String),
    /// A request or command is invalid; the message says what to change.
    #[error("{0}")]
    Invalid(String),
    /// A query cannot be compiled or combined.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// A request failed, here or at a node, for a reason the client must see.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// Convenience alias.
pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

impl From<confer_store::StoreError> for CoordinatorError {
    fn from(err: confer_store::StoreError) -> Self {
        CoordinatorError::State(err.to_string())
    }
}

impl From<CoordinatorError> for ProtocolError {
    fn from(err: CoordinatorError) -> Self {
        match err {
            CoordinatorError::Protocol(p) => p,
            CoordinatorError::Query(q) => q.into(),
            CoordinatorError::Invalid(m) => ProtocolError::invalid(m),
            CoordinatorError::State(_) => {
                ProtocolError::new(ErrorKind::Unavailable, err.to_string()).with_retryable(true)
            }
            other => ProtocolError::internal(other.to_string()),
        }
    }
}

impl From<CoordinatorError> for tonic::Status {
    fn from(err: CoordinatorError) -> Self {
        ProtocolError::from(err).into()
    }
}
