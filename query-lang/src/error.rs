//! Errors of the dialect: each says what to change.

use confer_protocol::{ProtocolError, Reason};

/// Why a statement cannot be compiled or combined.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum QueryError {
    /// The text is not SQL of the dialect.
    #[error("syntax error: {0}")]
    Syntax(String),
    /// Valid SQL that the DP dialect refuses (with what to change).
    #[error("{0}")]
    Rejected(String),
    /// Names a column that does not exist, or types that do not fit.
    #[error("{0}")]
    Plan(String),
    /// Names a table the catalog lacks (at a node: one it does not publish,
    /// so it takes no part).
    #[error("{0}")]
    NotInCatalog(String),
    /// A broken invariant: a bug in confer.
    #[error("internal error (a bug in confer, please report it): {0}")]
    Internal(String),
}

/// Convenience alias.
pub type Result<T, E = QueryError> = std::result::Result<T, E>;

impl From<QueryError> for ProtocolError {
    fn from(err: QueryError) -> Self {
        match err {
            QueryError::Internal(_) => ProtocolError::internal(err.to_string()),
            QueryError::NotInCatalog(_) => {
                ProtocolError::invalid(err.to_string()).with_reason(Reason::NotInCatalog)
            }
            _ => ProtocolError::invalid(err.to_string()),
        }
    }
}

impl From<datafusion::error::DataFusionError> for QueryError {
    fn from(err: datafusion::error::DataFusionError) -> Self {
        // DataFusion's messages for planning errors are precise ("table
        // 'x' not found", "No field named y. Valid fields are ..."); strip
        // its context prefixes so the researcher sees the point.
        let root = err.find_root();
        QueryError::Plan(root.strip_backtrace())
    }
}

impl From<arrow::error::ArrowError> for QueryError {
    fn from(err: arrow::error::ArrowError) -> Self {
        QueryError::Internal(format!("arrow: {err}"))
    }
}
