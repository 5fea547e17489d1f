//! Who is calling, and may they do this?
//!
//! Every request carries a bearer token (`authorization: Bearer cft_...`),
//! or comes over mutual TLS with a client certificate registered to a user.
//! ADBC and JDBC clients that speak username/password get a bearer token
//! from the Flight handshake (Basic auth, password = the user's token).
//! Roles are checked per action.

use std::sync::Arc;

use base64::Engine as _;
use confer_protocol::{ErrorKind, ProtocolError};
use tonic::Request;

use crate::store::{Role, Store, Study, User};

/// What a caller is trying to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run a DP statement (query, EXPLAIN PRIVACY, SHOW PRIVACY BUDGET).
    Query,
    /// Browse the catalog (Flight SQL metadata calls).
    Browse,
    /// See node status.
    NodeStatus,
    /// List or show studies.
    ReadStudies,
    /// Create studies.
    ManageStudies,
    /// List, add or revoke users.
    ManageUsers,
    /// Start or cancel training jobs.
    Train,
    /// Release supervision statistics.
    Supervise,
}

impl Action {
    /// What a custom action's declared access needs here (none for a
    /// node's actions, which the coordinator does not serve).
    pub fn of(access: confer_protocol::Access) -> Option<Self> {
        use confer_protocol::Access;
        Some(match access {
            Access::Coordinator => return None,
            Access::Member => Action::ReadStudies,
            Access::NodeStatus => Action::NodeStatus,
            Access::ManageStudies => Action::ManageStudies,
            Access::ManageUsers => Action::ManageUsers,
            Access::Train => Action::Train,
            Access::Supervise => Action::Supervise,
        })
    }

    /// Roles allowed to perform the action.
    pub fn allowed(self, role: Role) -> bool {
        match self {
            Action::Query | Action::Browse | Action::NodeStatus | Action::ReadStudies => true,
            Action::ManageStudies | Action::ManageUsers => role == Role::Admin,
            Action::Train => role != Role::Analyst,
            Action::Supervise => matches!(role, Role::Analyst | Role::Admin),
        }
    }

    /// The roles allowed, in words.
    fn roles(self) -> String {
        let allowed: Vec<&str> = [
            Role::Researcher,
            Role::Analyst,
            Role::DataScientist,
            Role::Admin,
        ]
        .into_iter()
        .filter(|r| self.allowed(*r))
        .map(Role::name)
        .collect();
        match allowed.as_slice() {
            [one] => format!("the {one} role"),
            many => format!("one of the roles {}", many.join(", ")),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Action::Query => "run queries",
            Action::Browse => "browse the catalog",
            Action::NodeStatus => "see node status",
            Action::ReadStudies => "read studies",
            Action::ManageStudies => "create studies",
            Action::ManageUsers => "manage users",
            Action::Train => "train models",
            Action::Supervise => "release supervision statistics",
        }
    }
}

/// Authenticates requests against the store.
#[derive(Clone)]
pub struct Authenticator {
    store: Arc<dyn Store>,
}

fn unauthenticated(msg: impl Into<String>) -> ProtocolError {
    ProtocolError::new(ErrorKind::Unauthenticated, msg)
}

impl Authenticator {
    /// Over a store.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// The user making `request`.
    pub fn user<T>(&self, request: &Request<T>) -> Result<User, ProtocolError> {
        if let Some(value) = request.metadata().get("authorization") {
            let value = value
                .to_str()
                .map_err(|_| unauthenticated("the authorization header is not text"))?;
            let token = value.strip_prefix("Bearer ").ok_or_else(|| {
                unauthenticated("the authorization header must be `Bearer <token>` (or use the Flight handshake)")
            })?;
            return self
                .store
                .user_by_token(token.trim())
                .map_err(ProtocolError::from)?
                .ok_or_else(|| {
                    unauthenticated(
                        "the bearer token is unknown or revoked: ask an admin for a new one",
                    )
                });
        }
        if let Some(certs) = request.peer_certs()
            && let Some(leaf) = certs.first()
        {
            let fingerprint = confer_protocol::signing::sha256_hex(leaf.as_ref());
            return self
                .store
                .user_by_certificate(&fingerprint)
                .map_err(ProtocolError::from)?
                .ok_or_else(|| {
                    unauthenticated(format!(
                        "the client certificate (SHA-256 {fingerprint}) is not registered to a user"
                    ))
                });
        }
        Err(unauthenticated(
            "no credentials: send `authorization: Bearer <token>` (confer query --token, or CONFER_TOKEN), \
             or log in with username and token through the Flight handshake",
        ))
    }

    /// The user, if allowed to perform `action`.
    pub fn authorize<T>(
        &self,
        request: &Request<T>,
        action: Action,
    ) -> Result<User, ProtocolError> {
        let user = self.user(request)?;
        if !action.allowed(user.role) {
            return Err(ProtocolError::new(
                ErrorKind::PermissionDenied,
                format!(
                    "user {} ({}) may not {}: that needs {}",
                    user.name,
                    user.role.name(),
                    action.describe(),
                    action.roles()
                ),
            ));
        }
        Ok(user)
    }

    /// The study `name`, if `user` may work under it.
    pub fn study(&self, user: &User, name: &str) -> Result<Study, ProtocolError> {
        let study = self.store.study(name).map_err(ProtocolError::from)?.ok_or_else(|| {
            ProtocolError::new(
                ErrorKind::NotFound,
                format!("study {name} does not exist: an admin creates it with `confer study create`"),
            )
        })?;
        if !study.admits(user) {
            return Err(ProtocolError::new(
                ErrorKind::PermissionDenied,
                format!(
                    "user {} is not a member of study {name}: ask its principal investigator ({}) to add you",
                    user.name, study.principal_investigator
                ),
            ));
        }
        Ok(study)
    }

    /// Checks a Basic `user:token` credential (Flight handshake) and
    /// returns the token to use as a bearer token.
    pub fn basic(&self, header: &str) -> Result<String, ProtocolError> {
        let encoded = header.strip_prefix("Basic ").ok_or_else(|| {
            unauthenticated("the handshake expects `authorization: Basic <base64(user:token)>`")
        })?;
        // Clients differ on padding (Go's Flight client sends none).
        let text = encoded.trim();
        let decoded = [
            &base64::engine::general_purpose::STANDARD,
            &base64::engine::general_purpose::STANDARD_NO_PAD,
            &base64::engine::general_purpose::URL_SAFE,
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| unauthenticated("the Basic credential is not valid base64 text"))?;
        let (name, token) = decoded
            .split_once(':')
            .ok_or_else(|| unauthenticated("the Basic credential must be user:token"))?;
        match self
            .store
            .user_by_token(token)
            .map_err(ProtocolError::from)?
        {
            Some(user) if user.name == name => Ok(token.to_string()),
            _ => Err(unauthenticated("unknown user, or the token is not theirs")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    #[test]
    fn tokens_roles_and_handshakes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("s.sqlite")).expect("open"));
        let token = store.add_user("alice", Role::Researcher).expect("add");
        let analyst = store.add_user("carol", Role::Analyst).expect("add");
        let auth = Authenticator::new(store);

        let mut req = Request::new(());
        assert_eq!(
            auth.user(&req).unwrap_err().kind,
            ErrorKind::Unauthenticated
        );
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        assert_eq!(auth.user(&req).expect("user").name, "alice");
        assert!(auth.authorize(&req, Action::Query).is_ok());
        let err = auth.authorize(&req, Action::ManageUsers).unwrap_err();
        assert_eq!(err.kind, ErrorKind::PermissionDenied);
        assert!(
            err.message.contains("needs the admin role"),
            "{}",
            err.message
        );

        let mut req = Request::new(());
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {analyst}").parse().expect("header"),
        );
        let err = auth.authorize(&req, Action::Train).unwrap_err();
        assert!(
            err.message
                .contains("may not train models: that needs one of the roles researcher, data_scientist, admin"),
            "{}",
            err.message
        );

        let basic = base64::engine::general_purpose::STANDARD.encode(format!("alice:{token}"));
        assert_eq!(
            auth.basic(&format!("Basic {basic}")).expect("handshake"),
            token
        );
        let wrong = base64::engine::general_purpose::STANDARD.encode(format!("bob:{token}"));
        assert!(auth.basic(&format!("Basic {wrong}")).is_err());
    }
}
