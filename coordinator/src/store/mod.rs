//! The coordinator's state: users, studies, results, the node registry and
//! the coordinator's audit log.
//!
//! [`Store`] is the interface; [`SqliteStore`] the default implementation
//! (one SQLite file, WAL). A PostgreSQL implementation for replicated
//! coordinators implements the same trait. Only hashes of bearer tokens are
//! stored: a token is shown once, when the user is created.
//!
//! `sqlite.rs` holds the SQLite implementation of each operation.

mod sqlite;

use sqlite::chain_legacy_audit;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Mutex;

use confer_models::job::JobSpec;
use confer_protocol::signing::sha256_hex;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{CoordinatorError, Result};

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs DP queries in the studies they belong to.
    Researcher,
    /// Health commission analyst: DP queries and supervision statistics.
    Analyst,
    /// Trains models across centres (and queries).
    DataScientist,
    /// Manages users, studies and nodes; may do everything.
    Admin,
}

impl Role {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Researcher => "researcher",
            Role::Analyst => "analyst",
            Role::DataScientist => "data_scientist",
            Role::Admin => "admin",
        }
    }

    /// Parses a stored name.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "researcher" => Role::Researcher,
            "analyst" => Role::Analyst,
            "data_scientist" => Role::DataScientist,
            "admin" => Role::Admin,
            _ => return None,
        })
    }
}

/// A user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// Login name (also the certificate common name for client certificates).
    pub name: String,
    /// Role.
    pub role: Role,
    /// When created, ms since the epoch.
    pub created_ms: i64,
    /// When revoked, if revoked.
    pub revoked_ms: Option<i64>,
}

/// A study: the unit under which queries and training run and budgets are spent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Study {
    /// Short name (what queries name).
    pub name: String,
    /// Title.
    pub title: String,
    /// Principal investigator (a user name).
    pub principal_investigator: String,
    /// Members (user names) who may run work under the study.
    pub members: Vec<String>,
    /// Tables the study intends to read (empty: any).
    pub tables: Vec<String>,
    /// Requested budget per node: epsilon.
    pub requested_epsilon: f64,
    /// Requested budget per node: delta.
    pub requested_delta: f64,
    /// Ethics approval reference.
    pub ethics_ref: String,
    /// Fewest sites that must answer a query of this study (default: all).
    pub min_sites: Option<usize>,
    /// When created, ms since the epoch.
    pub created_ms: i64,
    /// Who created it.
    pub created_by: String,
}

impl Study {
    /// Whether `user` may run work under the study.
    pub fn admits(&self, user: &User) -> bool {
        user.role == Role::Admin
            || self.principal_investigator == user.name
            || self.members.iter().any(|m| m == &user.name)
    }
}

/// A finished query, kept for the record.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRecord {
    /// Query (and task) id.
    pub query_id: String,
    /// Study.
    pub study: String,
    /// User.
    pub user: String,
    /// SHA-256 of the statement text.
    pub statement_hash: String,
    /// Sites that answered.
    pub sites: Vec<String>,
    /// Arrow IPC bytes of the answer.
    pub result: Vec<u8>,
    /// The statement, shown in its author's query history (absent in
    /// records written before it was kept).
    pub statement: Option<String>,
    /// What it cost at each node: (epsilon, delta, zCDP rho).
    pub cost: Option<(f64, f64, f64)>,
    /// When it was answered, ms since the epoch.
    pub created_ms: i64,
}

/// Last known state of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Site name.
    pub name: String,
    /// URL.
    pub url: String,
    /// Whether the last health check succeeded.
    pub healthy: bool,
    /// When it was last checked, ms since the epoch.
    pub checked_ms: i64,
    /// When it last answered, ms since the epoch.
    pub last_seen_ms: Option<i64>,
    /// Round-trip time of the last successful check, ms.
    pub latency_ms: Option<f64>,
    /// The node's confer version.
    pub version: Option<String>,
    /// Why the last check failed.
    pub error: Option<String>,
}

/// One line of the coordinator's audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoordinatorAudit {
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// Who.
    pub user: String,
    /// Study, if any.
    pub study: Option<String>,
    /// What (query, explain, show_budget, user.add, study.create, ...).
    pub action: String,
    /// ok / refused / failed.
    pub outcome: String,
    /// Details (error messages, ids; never query text).
    pub detail: String,
}

/// Reads a stored job spec back through the same validation as on submit.
fn validated_spec<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<JobSpec, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    JobSpec::from_json_value(value).map_err(serde::de::Error::custom)
}

/// A training job as stored: its status, its signed task, and the latest
/// checkpoint (JSON written by [`crate::train`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// What clients see.
    pub status: confer_protocol::train::JobStatus,
    /// The job spec: parsed and validated once, when the job is submitted
    /// or read back from the store.
    #[serde(deserialize_with = "validated_spec")]
    pub spec: JobSpec,
    /// The signed job task (JSON of an `Envelope`), once signed.
    pub envelope: Option<String>,
    /// Whether commits were sent to the nodes (some may have charged it).
    #[serde(default)]
    pub commit_sent: bool,
    /// The latest checkpoint.
    #[serde(skip)]
    pub checkpoint: Option<String>,
}

/// Adds the columns a table gained since a store was written (older
/// rows read them as NULL).
fn add_missing_columns(
    conn: &Connection,
    table: &str,
    columns: &[(&str, &str)],
) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?;
    let have: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for (name, kind) in columns {
        if !have.iter().any(|h| h == name) {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {name} {kind}"))?;
        }
    }
    Ok(())
}

/// The coordinator store's schema: migration *n* takes a store from
/// version *n - 1* to *n* (`confer_store`). Never edit a released step;
/// add one.
pub const SCHEMA: confer_store::Schema = confer_store::Schema {
    kind: "coordinator store",
    application_id: confer_store::COORDINATOR_STORE_ID,
    legacy_tables: &[
        "users",
        "certificates",
        "studies",
        "results",
        "nodes",
        "anchors",
        "train_jobs",
        "supervision_partials",
        "supervision_releases",
        "audit",
    ],
    migrations: &[confer_store::Migration {
        what: "users, studies, results, nodes, anchors, training jobs, supervision and the audit chain",
        apply: baseline,
    }],
};

/// Version 1: the tables as they were when versions began to be kept, and
/// what stores written before then may lack (result columns, the audit
/// chain).
fn baseline(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS users (
             name TEXT PRIMARY KEY, role TEXT NOT NULL, token_hash TEXT NOT NULL UNIQUE,
             created_ms INTEGER NOT NULL, revoked_ms INTEGER);
         CREATE TABLE IF NOT EXISTS certificates (
             fingerprint TEXT PRIMARY KEY, user TEXT NOT NULL REFERENCES users(name));
         CREATE TABLE IF NOT EXISTS studies (
             name TEXT PRIMARY KEY, body TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS results (
             query_id TEXT PRIMARY KEY, study TEXT NOT NULL, user TEXT NOT NULL,
             statement_hash TEXT NOT NULL, sites TEXT NOT NULL, created_ms INTEGER NOT NULL,
             result BLOB NOT NULL);
         CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, body TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS anchors (
             node TEXT PRIMARY KEY, seq INTEGER NOT NULL, hash TEXT NOT NULL, at_ms INTEGER NOT NULL,
             held TEXT);
         CREATE TABLE IF NOT EXISTS train_jobs (
             id TEXT PRIMARY KEY, created_ms INTEGER NOT NULL, body TEXT NOT NULL,
             checkpoint TEXT);
         CREATE TABLE IF NOT EXISTS supervision_partials (
             period TEXT NOT NULL, measure TEXT NOT NULL, node TEXT NOT NULL,
             at_ms INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (period, measure, node));
         CREATE TABLE IF NOT EXISTS supervision_releases (
             period TEXT PRIMARY KEY, at_ms INTEGER NOT NULL, body TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS audit (
             seq INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, user TEXT NOT NULL, study TEXT,
             action TEXT NOT NULL, outcome TEXT NOT NULL, detail TEXT NOT NULL);",
    )?;
    add_missing_columns(
        conn,
        "results",
        &[
            ("statement", "TEXT"),
            ("epsilon", "REAL"),
            ("delta", "REAL"),
            ("rho", "REAL"),
        ],
    )?;
    conn.execute_batch("CREATE INDEX IF NOT EXISTS results_by_user ON results(user, created_ms);")?;
    chain_legacy_audit(conn)
}

/// The coordinator's state store.
pub trait Store: Send + Sync {
    /// Creates a user and returns its bearer token (shown only now).
    fn add_user(&self, name: &str, role: Role) -> Result<String>;
    /// The user holding `token`, unless revoked.
    fn user_by_token(&self, token: &str) -> Result<Option<User>>;
    /// The user called `name`, unless revoked.
    fn user_by_name(&self, name: &str) -> Result<Option<User>>;
    /// Every user, revoked ones included.
    fn users(&self) -> Result<Vec<User>>;
    /// Revokes a user (its token and certificates stop working).
    fn revoke_user(&self, name: &str) -> Result<()>;
    /// Gives an active user a new token (the old one stops working) and
    /// returns it (shown only now).
    fn rotate_token(&self, name: &str) -> Result<String>;
    /// Registers a client certificate (by SHA-256 of its DER) to a user.
    fn add_certificate(&self, user: &str, fingerprint: &str) -> Result<()>;
    /// The user a client certificate is registered to, unless revoked.
    fn user_by_certificate(&self, fingerprint: &str) -> Result<Option<User>>;
    /// Creates a study.
    fn create_study(&self, study: &Study) -> Result<()>;
    /// Replaces an existing study's record (the caller checked the change).
    fn update_study(&self, study: &Study) -> Result<()>;
    /// A study by name.
    fn study(&self, name: &str) -> Result<Option<Study>>;
    /// Every study.
    fn studies(&self) -> Result<Vec<Study>>;
    /// Keeps a finished query's answer.
    fn record_result(&self, result: &ResultRecord) -> Result<()>;
    /// The newest `limit` results, of `user` and of `study` only if
    /// given, newest first.
    fn results(
        &self,
        user: Option<&str>,
        study: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ResultRecord>>;
    /// Updates the node registry.
    fn set_node_status(&self, status: &NodeStatus) -> Result<()>;
    /// The node registry.
    fn node_statuses(&self) -> Result<Vec<NodeStatus>>;
    /// The audit record a node's chain is anchored at (`seq`, hash), if any.
    fn anchor(&self, node: &str) -> Result<Option<(i64, String)>>;
    /// Moves a node's anchor to its chain's newest record.
    fn set_anchor(&self, node: &str, seq: i64, hash: &str) -> Result<()>;
    /// Forgets a node's anchor (its steward could not restore the ledger
    /// and the network accepts the loss); `true` if there was one.
    fn forget_anchor(&self, node: &str) -> Result<bool>;
    /// Records why a node is held out of every task (`None`: it is not),
    /// so that a restarted coordinator holds it too.
    fn set_hold(&self, node: &str, why: Option<&str>) -> Result<()>;
    /// The nodes held, with why.
    fn holds(&self) -> Result<Vec<(String, String)>>;
    /// Appends to the coordinator's audit log.
    fn audit(&self, entry: &CoordinatorAudit) -> Result<()>;
    /// The audit log, oldest first.
    fn audit_log(&self) -> Result<Vec<CoordinatorAudit>>;
    /// Checks the audit log's hash chain: how many records hold, and the
    /// first problem found (a record edited, deleted, inserted or moved).
    fn verify_audit(&self) -> Result<(usize, Option<String>)>;
    /// Creates or replaces a training job (durably: a checkpoint survives a crash).
    fn save_job(&self, job: &JobRecord) -> Result<()>;
    /// A training job with its checkpoint.
    fn job(&self, id: uuid::Uuid) -> Result<Option<JobRecord>>;
    /// Every training job, without checkpoints, oldest first.
    fn jobs(&self) -> Result<Vec<JobRecord>>;
    /// Stores one node's release of one supervision measure for a period
    /// (JSON), as soon as it arrives: a later run does not ask again.
    fn save_supervision_partial(
        &self,
        period: &str,
        measure: &str,
        node: &str,
        body: &str,
    ) -> Result<()>;
    /// A period's stored node releases: (measure, node, body).
    fn supervision_partials(&self, period: &str) -> Result<Vec<(String, String, String)>>;
    /// Stores (replaces) a period's release (JSON).
    fn save_supervision_release(&self, period: &str, body: &str) -> Result<()>;
    /// A period's release.
    fn supervision_release(&self, period: &str) -> Result<Option<String>>;
    /// Every period's release: (period, body), by period.
    fn supervision_releases(&self) -> Result<Vec<(String, String)>>;
}

/// [`Store`] on SQLite.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn db(e: rusqlite::Error) -> CoordinatorError {
    CoordinatorError::State(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let opened = confer_store::open(path, &SCHEMA)?;
        if let Some(backup) = &opened.backup {
            tracing::info!(
                "upgraded the coordinator store {} from schema version {} to {}; the previous file is kept at {}",
                path.display(),
                opened.from,
                opened.version,
                backup.display()
            );
        }
        let conn = opened.conn;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    /// The JSON bodies `sql` selects (one column), parsed.
    fn json_rows<T: serde::de::DeserializeOwned>(&self, sql: &str) -> Result<Vec<T>> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(sql).map_err(db)?;
        let bodies: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .map_err(db)?
            .collect::<rusqlite::Result<_>>()
            .map_err(db)?;
        bodies
            .iter()
            .map(|b| serde_json::from_str(b).map_err(|e| CoordinatorError::Internal(e.to_string())))
            .collect()
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.conn.lock().map_err(|_| {
            CoordinatorError::Internal("state lock poisoned by an earlier panic".into())
        })
    }
}
