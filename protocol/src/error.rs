//! Errors that cross a service boundary.
//!
//! A [`ProtocolError`] carries a [`ErrorKind`] that decides its gRPC code and
//! whether retrying can help. The mapping to [`tonic::Status`] is explicit,
//! in both directions, so a node's refusal reaches the researcher with its
//! message intact and the coordinator can tell a retryable failure (a node
//! restarting) from a final one (a bad query, an exhausted budget).
//!
//! Where a caller decides something on an error, it reads a typed field,
//! never the message: the [`ErrorKind`], the retry hint, a [`Reason`] (a
//! finer cause the kind cannot say) and the `site` that answered. All four
//! travel as the status code and metadata.

use std::fmt;

use serde::{Deserialize, Serialize};
use tonic::{Code, Status};

/// gRPC metadata key that marks a status as worth retrying.
pub const RETRYABLE_KEY: &str = "confer-retryable";
/// gRPC metadata key for an error's [`Reason`].
pub const REASON_KEY: &str = "confer-reason";
/// gRPC metadata key for the site (node) an error comes from.
pub const SITE_KEY: &str = "confer-site";

/// What went wrong, coarsely: decides the gRPC code and the default retry policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed or asks for something unsupported (fix the query).
    InvalidArgument,
    /// The caller is not known (no or bad credentials).
    Unauthenticated,
    /// Policy says no: unapproved study, unknown researcher, forbidden table.
    PermissionDenied,
    /// Not enough privacy budget left, or over a per-query cap.
    ResourceExhausted,
    /// Something named does not exist (table, study, task).
    NotFound,
    /// The request conflicts with state (a task id seen before, a study pending approval).
    FailedPrecondition,
    /// A peer could not be reached or is shutting down.
    Unavailable,
    /// A peer did not answer in time.
    DeadlineExceeded,
    /// The peer does not serve the action asked for (an older or newer
    /// version of confer).
    Unimplemented,
    /// A broken invariant: a bug in confer.
    Internal,
}

/// A finer cause than the [`ErrorKind`], for the callers that act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A table the task names is not in the answering node's catalog: that
    /// node takes no part (the network catalog is the union of the nodes').
    NotInCatalog,
    /// The TLS handshake failed on a certificate: the peer's was refused,
    /// or ours by the peer.
    Certificate,
    /// No connection could be made to the peer.
    Connect,
    /// The service answered that it does not serve the action asked for
    /// (an older or newer confer); set by the service itself, so a proxy's
    /// or a wrong endpoint's "unimplemented" is not taken for it.
    UnknownAction,
}

impl Reason {
    /// The reason's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Reason::NotInCatalog => "not_in_catalog",
            Reason::Certificate => "certificate",
            Reason::Connect => "connect",
            Reason::UnknownAction => "unknown_action",
        }
    }

    /// The reason for a name on the wire (unknown names: none).
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Reason::NotInCatalog,
            Reason::Certificate,
            Reason::Connect,
            Reason::UnknownAction,
        ]
        .into_iter()
        .find(|r| r.name() == name)
    }
}

impl ErrorKind {
    /// The gRPC status code for this kind.
    pub fn code(self) -> Code {
        match self {
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::ResourceExhausted => Code::ResourceExhausted,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
            ErrorKind::Unimplemented => Code::Unimplemented,
            ErrorKind::Internal => Code::Internal,
        }
    }

    /// The kind for a gRPC status code (unknown codes count as internal).
    pub fn from_code(code: Code) -> Self {
        match code {
            Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidArgument,
            Code::Unauthenticated => ErrorKind::Unauthenticated,
            Code::PermissionDenied => ErrorKind::PermissionDenied,
            Code::ResourceExhausted => ErrorKind::ResourceExhausted,
            Code::NotFound => ErrorKind::NotFound,
            Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => {
                ErrorKind::FailedPrecondition
            }
            Code::Unavailable | Code::Cancelled => ErrorKind::Unavailable,
            Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            Code::Unimplemented => ErrorKind::Unimplemented,
            _ => ErrorKind::Internal,
        }
    }

    /// Whether an error of this kind is worth retrying when nothing else is known.
    pub fn retryable_by_default(self) -> bool {
        matches!(self, ErrorKind::Unavailable | ErrorKind::DeadlineExceeded)
    }
}

/// An error with a user-facing message, a kind and a retry hint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolError {
    /// What went wrong, coarsely.
    pub kind: ErrorKind,
    /// What went wrong and what to change, for the person who sent the request.
    pub message: String,
    /// Whether the same request may succeed if sent again unchanged.
    pub retryable: bool,
    /// A finer cause, where a caller acts on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// The site (node) the error comes from, where it comes from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

impl ProtocolError {
    /// An error of `kind` with the kind's default retry policy.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retryable: kind.retryable_by_default(),
            reason: None,
            site: None,
        }
    }

    /// A malformed or unsupported request.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// A broken invariant.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// An action this service does not serve ([`Reason::UnknownAction`]).
    pub fn unimplemented(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unimplemented, message).with_reason(Reason::UnknownAction)
    }

    /// Sets the finer cause.
    pub fn with_reason(mut self, reason: Reason) -> Self {
        self.reason = Some(reason);
        self
    }

    /// Names the site the error comes from.
    pub fn with_site(mut self, site: impl Into<String>) -> Self {
        self.site = Some(site.into());
        self
    }

    /// Whether the error has this finer cause.
    pub fn is(&self, reason: Reason) -> bool {
        self.reason == Some(reason)
    }

    /// Overrides the retry hint.
    pub fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Prefixes the message with context (for example the node that failed).
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// Reads an error back from a status received over gRPC.
    pub fn from_status(status: &Status) -> Self {
        let kind = ErrorKind::from_code(status.code());
        let retryable = match status.metadata().get(RETRYABLE_KEY) {
            Some(value) => value.as_bytes() == b"true",
            None => kind.retryable_by_default(),
        };
        let message = if status.message().is_empty() {
            format!("{:?}", status.code())
        } else {
            status.message().to_string()
        };
        let text = |key: &str| {
            status
                .metadata()
                .get(key)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Self {
            kind,
            message,
            retryable,
            reason: text(REASON_KEY).and_then(|r| Reason::from_name(&r)),
            site: text(SITE_KEY),
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ProtocolError {}

impl From<ProtocolError> for Status {
    fn from(err: ProtocolError) -> Self {
        let mut status = Status::new(err.kind.code(), err.message);
        let flag = if err.retryable { "true" } else { "false" };
        status.metadata_mut().insert(
            RETRYABLE_KEY,
            tonic::metadata::MetadataValue::from_static(flag),
        );
        if let Some(reason) = err.reason {
            status.metadata_mut().insert(
                REASON_KEY,
                tonic::metadata::MetadataValue::from_static(reason.name()),
            );
        }
        // A site name that is no valid header value stays out of the metadata.
        if let Some(value) = err
            .site
            .as_deref()
            .and_then(|s| tonic::metadata::MetadataValue::try_from(s).ok())
        {
            status.metadata_mut().insert(SITE_KEY, value);
        }
        status
    }
}

/// Convenience alias.
pub type Result<T, E = ProtocolError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trip_keeps_kind_message_and_retry_hint() {
        let err =
            ProtocolError::new(ErrorKind::ResourceExhausted, "budget spent").with_retryable(false);
        let status: Status = err.clone().into();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(ProtocolError::from_status(&status), err);

        let err = ProtocolError::new(ErrorKind::Internal, "restarting").with_retryable(true);
        let back = ProtocolError::from_status(&Status::from(err));
        assert!(back.retryable);
    }

    #[test]
    fn reason_and_site_survive_the_status() {
        let err = ProtocolError::invalid("table x is not in the network catalog")
            .with_reason(Reason::NotInCatalog)
            .with_site("site-a");
        let back = ProtocolError::from_status(&Status::from(err.clone()));
        assert_eq!(back, err);
        assert!(back.is(Reason::NotInCatalog));

        let back = ProtocolError::from_status(&Status::from(ProtocolError::unimplemented(
            "unknown action x",
        )));
        assert_eq!(back.kind, ErrorKind::Unimplemented);
        assert!(!back.retryable && back.is(Reason::UnknownAction));
        // Another service's "unimplemented" (a proxy, a wrong endpoint)
        // carries no reason: it is not taken for an older confer.
        let other = ProtocolError::from_status(&Status::unimplemented("404"));
        assert_eq!(other.kind, ErrorKind::Unimplemented);
        assert!(other.reason.is_none());
    }

    #[test]
    fn plain_statuses_use_default_retry_policy() {
        assert!(ProtocolError::from_status(&Status::unavailable("down")).retryable);
        assert!(!ProtocolError::from_status(&Status::invalid_argument("bad")).retryable);
    }
}
