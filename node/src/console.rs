//! The data steward's page, served by the node itself on a local address
//! (`[console]` in node.toml, loopback by default): pending study approvals
//! with approve and deny, spending per study and per researcher over time
//! against the node's budget, recent tasks (who, what, cost, outcome;
//! never rows), the audit chain's verification, charged failures and
//! blocked researchers with lift. The figures come from the ledger the
//! node writes, through a JSON API (`/api/v1/...`, docs/console.md).
//!
//! The steward signs in with a steward token, which `confer node
//! steward-token` creates on the node's machine; only its SHA-256 is kept
//! (`<state_dir>/steward.token.sha256`), read again on every request, so
//! a new token ends the sessions of the old one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use confer_console::Sessions;
use confer_console::reply::{self, ApiError};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::ledger::AuditFilter;
use crate::state::NodeState;

/// The file holding the SHA-256 of the steward token.
pub const TOKEN_FILE: &str = "steward.token.sha256";

/// Who decides, in the audit log, when the steward acts on this page.
const BY: &str = "steward (console)";

/// Most records a listing returns.
const MAX_RECORDS: usize = 1000;

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// Creates a new steward token for the node whose state is in `state_dir`
/// (replacing any previous one) and returns it; only its hash is stored,
/// readable by the node's user alone.
pub fn new_steward_token(state_dir: &Path) -> std::io::Result<String> {
    std::fs::create_dir_all(state_dir)?;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    let token = format!("cst_{}", hex::encode(bytes));
    let path = state_dir.join(TOKEN_FILE);
    let tmp = state_dir.join(format!("{TOKEN_FILE}.tmp"));
    std::fs::write(&tmp, format!("{}\n", hash(&token)))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(token)
}

/// What the steward's page serves from.
pub(crate) struct StewardConsole {
    state: Arc<NodeState>,
    token_file: PathBuf,
    sessions: Sessions,
    version: &'static str,
}

type Shared = Arc<StewardConsole>;

impl StewardConsole {
    pub(crate) fn new(
        state: Arc<NodeState>,
        state_dir: &Path,
        ttl: std::time::Duration,
        port: u16,
        secure: bool,
    ) -> Self {
        Self {
            state,
            token_file: state_dir.join(TOKEN_FILE),
            sessions: Sessions::new(ttl, port, secure),
            version: env!("CARGO_PKG_VERSION"),
        }
    }

    fn check_token(&self, token: &str) -> Result<(), ApiError> {
        let stored = std::fs::read_to_string(&self.token_file).map_err(|_| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this node has no steward token yet: create one on the node's machine with \
                 `confer node steward-token --config node.toml`",
            )
        })?;
        if stored.trim() == hash(token) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the steward token is unknown or was replaced: `confer node steward-token` prints a new one",
            ))
        }
    }

    /// Checks the request's bearer token or session.
    fn steward(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let token = if let Some(v) = headers.get(header::AUTHORIZATION) {
            v.to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(|t| t.trim().to_string())
        } else {
            headers
                .get(header::COOKIE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| self.sessions.secret_in(v))
        };
        let token = token.ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "not signed in (or the session expired): sign in at /login with the steward token",
            )
        })?;
        self.check_token(&token)
    }
}

/// The steward page's routes.
pub(crate) fn router(console: Shared) -> Router {
    confer_console::guarded(
        Router::new()
            .route("/", get(root))
            .route("/login", get(|| async { reply::asset("login.html") }))
            .route("/assets/{name}", get(reply::public_asset))
            .route("/steward", get(page))
            .route("/api/v1/session", post(sign_in).delete(sign_out))
            .route("/api/v1/whoami", get(whoami))
            .route("/api/v1/node", get(node))
            .route("/api/v1/studies", get(studies))
            .route("/api/v1/studies/{name}/approve", post(approve))
            .route("/api/v1/studies/{name}/deny", post(deny))
            .route("/api/v1/tasks", get(tasks))
            .route("/api/v1/failures", get(failures))
            .route("/api/v1/researchers/{name}/lift", post(lift)),
    )
    .with_state(console)
}

type ApiResult = Result<Response, ApiError>;

async fn root(State(c): State<Shared>, headers: HeaderMap) -> Response {
    match c.steward(&headers) {
        Ok(()) => reply::redirect("/steward"),
        Err(_) => reply::redirect("/login"),
    }
}

async fn page(State(c): State<Shared>, headers: HeaderMap) -> Response {
    match c.steward(&headers) {
        Ok(()) => reply::asset("steward.html"),
        Err(_) => reply::redirect("/login?next=/steward"),
    }
}

async fn sign_in(State(c): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let outcome = (|| -> ApiResult {
        let token = Sessions::token_in(&headers, &body)?;
        c.check_token(&token)?;
        let answer =
            reply::json(&json!({"name": "steward", "role": "steward", "home": "/steward"}));
        c.sessions.start(&token, answer)
    })();
    outcome.unwrap_or_else(IntoResponse::into_response)
}

async fn sign_out(State(c): State<Shared>, headers: HeaderMap) -> Response {
    c.sessions.sign_out(&headers)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn whoami(State(c): State<Shared>, headers: HeaderMap) -> ApiResult {
    c.steward(&headers)?;
    Ok(reply::json(&json!({
        "name": "steward",
        "role": "steward",
        "home": "/steward",
        "areas": ["steward"],
        "node": c.state.name,
        "version": c.version,
    })))
}

fn epsilon_of(rho: Option<f64>, delta: f64) -> Value {
    rho.and_then(|r| confer_privacy::accounting::epsilon_for_rho(r.max(0.0), delta).ok())
        .map_or(Value::Null, |e| json!(e))
}

async fn node(State(c): State<Shared>, headers: HeaderMap) -> ApiResult {
    c.steward(&headers)?;
    let policy = c.state.policy().map_err(internal)?;
    let ledger = &c.state.ledger;
    let verification = ledger.verify().map_err(internal)?;
    let spent = ledger.spent_total().map_err(internal)?;
    Ok(reply::json(&json!({
        "name": c.state.name,
        "version": c.version,
        "uptime_secs": c.state.started.elapsed().as_secs(),
        "tables": c.state.catalog.tables.iter().map(|t| t.name.clone()).collect::<Vec<_>>(),
        "approval": format!("{:?}", policy.approval).to_lowercase(),
        "node_budget_rho": policy.node_budget_rho,
        "node_budget_epsilon": epsilon_of(policy.node_budget_rho, policy.max_query_delta),
        "researcher_total_budget_rho": policy.researcher_total_budget_rho,
        "max_failures_per_researcher": policy.max_failures_per_researcher,
        "spent_rho": spent,
        "delta_for_epsilon": policy.max_query_delta,
        "audit": {"records": verification.records, "intact": verification.problem.is_none(), "problem": verification.problem},
    })))
}

async fn studies(State(c): State<Shared>, headers: HeaderMap) -> ApiResult {
    c.steward(&headers)?;
    let policy = c.state.policy().map_err(internal)?;
    let rows: Vec<Value> = c
        .state
        .ledger
        .studies()
        .map_err(internal)?
        .into_iter()
        .map(|r| {
            let rules = policy.study(&r.study).ok();
            let budget = r.budget_rho.or(rules.as_ref().map(|s| s.budget_rho));
            let mut v = serde_json::to_value(&r).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.insert(
                    "policy_budget_rho".into(),
                    rules.map_or(Value::Null, |s| json!(s.budget_rho)),
                );
                m.insert(
                    "effective_budget_rho".into(),
                    budget.map_or(Value::Null, |b| json!(b)),
                );
            }
            v
        })
        .collect();
    Ok(reply::json(&json!({"studies": rows})))
}

fn known_study(c: &StewardConsole, name: &str) -> Result<(), ApiError> {
    let known = c
        .state
        .ledger
        .studies()
        .map_err(internal)?
        .iter()
        .any(|s| s.study == name);
    if known {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no study named {name:?} has reached this node: a study appears here with its first task"
            ),
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Approval {
    epsilon: Option<f64>,
    delta: Option<f64>,
    rho: Option<f64>,
}

async fn approve(
    State(c): State<Shared>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    c.steward(&headers)?;
    known_study(&c, &name)?;
    // JSON always (`{}` keeps the policy's budget): a form cannot send it.
    let a: Approval = reply::parse_json(&headers, &body)?;
    let budget = match (a.epsilon, a.delta, a.rho) {
        (None, None, None) => None,
        (Some(epsilon), Some(delta), None) => {
            Some(crate::policy::BudgetConfig::EpsilonDelta { epsilon, delta })
        }
        (None, None, Some(rho)) => Some(crate::policy::BudgetConfig::Rho { rho, delta: None }),
        _ => {
            return Err(ApiError::bad_request(
                "give the budget as {\"epsilon\": e, \"delta\": d} or {\"rho\": r}, or nothing to keep the policy's",
            ));
        }
    };
    let rho = budget
        .map(|b| {
            b.rho()
                .map_err(|e| ApiError::bad_request(format!("budget: {e}")))
        })
        .transpose()?;
    c.state.ledger.approve(&name, rho, BY).map_err(internal)?;
    Ok(reply::json(
        &json!({"study": name, "status": "approved", "budget_rho": rho}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Reason {
    reason: String,
}

async fn deny(
    State(c): State<Shared>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    c.steward(&headers)?;
    known_study(&c, &name)?;
    let Reason { reason } = reply::parse_json(&headers, &body)?;
    if reason.trim().is_empty() {
        return Err(ApiError::bad_request(
            "give a reason: the researcher sees it",
        ));
    }
    c.state
        .ledger
        .deny(&name, reason.trim(), BY)
        .map_err(internal)?;
    Ok(reply::json(
        &json!({"study": name, "status": "denied", "reason": reason.trim()}),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Listing {
    limit: Option<usize>,
    study: Option<String>,
}

async fn tasks(
    State(c): State<Shared>,
    headers: HeaderMap,
    query: Result<Query<Listing>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    c.steward(&headers)?;
    let Query(q) = query?;
    let mut records = c
        .state
        .ledger
        .audit_records(&AuditFilter {
            study: q.study.clone(),
            since_ms: None,
        })
        .map_err(internal)?;
    // Spending over time: every debit of the ledger, oldest first (their
    // sum is what the node has spent).
    let charges: Vec<Value> = c
        .state
        .ledger
        .debits()
        .map_err(internal)?
        .into_iter()
        .filter(|d| q.study.as_ref().is_none_or(|s| s == &d.study))
        .map(|d| serde_json::to_value(d).unwrap_or(Value::Null))
        .collect();
    records.reverse();
    records.truncate(q.limit.unwrap_or(100).clamp(1, MAX_RECORDS));
    let recent: Vec<Value> = records
        .iter()
        .map(|r| {
            json!({
                "seq": r.seq, "at_ms": r.at_ms, "task_id": r.task_id, "study": r.study,
                "researcher": r.actor, "kind": r.kind, "decision": r.decision, "reason": r.reason,
                "rho": r.rho, "epsilon": r.epsilon, "delta": r.delta,
            })
        })
        .collect();
    Ok(reply::json(&json!({"recent": recent, "charges": charges})))
}

async fn failures(State(c): State<Shared>, headers: HeaderMap) -> ApiResult {
    c.steward(&headers)?;
    let policy = c.state.policy().map_err(internal)?;
    let failed: Vec<crate::ledger::AuditRecord> = c
        .state
        .ledger
        .audit_records(&AuditFilter::default())
        .map_err(internal)?
        .into_iter()
        .filter(|r| r.decision == "failed")
        .collect();
    let mut names: Vec<String> = failed.iter().filter_map(|r| r.actor.clone()).collect();
    names.sort();
    names.dedup();
    let mut researchers = Vec::new();
    for name in names {
        let counted = c
            .state
            .ledger
            .failures_since_lift(&name)
            .map_err(internal)?;
        researchers.push(json!({
            "researcher": name,
            "failures": failed.iter().filter(|r| r.actor.as_deref() == Some(name.as_str())).count(),
            "counted": counted,
            "quota": policy.max_failures_per_researcher,
            "blocked": counted >= policy.max_failures_per_researcher,
        }));
    }
    let records: Vec<Value> = failed
        .iter()
        .rev()
        .take(MAX_RECORDS)
        .map(|r| json!({"at_ms": r.at_ms, "researcher": r.actor, "study": r.study, "task_id": r.task_id, "rho": r.rho, "reason": r.reason}))
        .collect();
    Ok(reply::json(
        &json!({"researchers": researchers, "failures": records}),
    ))
}

async fn lift(
    State(c): State<Shared>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    c.steward(&headers)?;
    let Reason { reason } = reply::parse_json(&headers, &body)?;
    if reason.trim().is_empty() {
        return Err(ApiError::bad_request(
            "give a reason: it is recorded in the audit log",
        ));
    }
    let reviewed = c
        .state
        .ledger
        .lift(&name, BY, reason.trim())
        .map_err(internal)?;
    Ok(reply::json(
        &json!({"researcher": name, "reviewed": reviewed}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_replaces_the_old_and_only_its_hash_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = new_steward_token(dir.path()).expect("token");
        let stored = std::fs::read_to_string(dir.path().join(TOKEN_FILE)).expect("read");
        assert!(a.starts_with("cst_") && a.len() == 68);
        assert_eq!(stored.trim(), hash(&a));
        assert!(!stored.contains(&a));
        let b = new_steward_token(dir.path()).expect("token");
        assert_ne!(a, b);
        let stored = std::fs::read_to_string(dir.path().join(TOKEN_FILE)).expect("read");
        assert_eq!(stored.trim(), hash(&b));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(TOKEN_FILE))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
