//! The coordinator's state: users, studies, results, the node registry and
//! the coordinator's audit log.
//!
//! [`Store`] is the interface; [`SqliteStore`] the default implementation
//! (one SQLite file, WAL). A PostgreSQL implementation for replicated
//! coordinators implements the same trait. Only hashes of bearer tokens are
//! stored: a token is shown once, when the user is created.

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
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                CoordinatorError::Config(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let conn = Connection::open(path)
            .map_err(|e| CoordinatorError::State(format!("cannot open {}: {e}", path.display())))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(db)?;
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
             CREATE TABLE IF NOT EXISTS audit (
                 seq INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, user TEXT NOT NULL, study TEXT,
                 action TEXT NOT NULL, outcome TEXT NOT NULL, detail TEXT NOT NULL);",
        )
        .map_err(db)?;
        chain_legacy_audit(&conn)?;
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

fn user_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    let role: String = row.get(1)?;
    Ok(User {
        name: row.get(0)?,
        role: Role::parse(&role).unwrap_or(Role::Researcher),
        created_ms: row.get(2)?,
        revoked_ms: row.get(3)?,
    })
}

/// The coordinator audit record in columns `at..at + 6` of `row`
/// (at_ms, user, study, action, outcome, detail).
fn audit_from_row(row: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<CoordinatorAudit> {
    Ok(CoordinatorAudit {
        at_ms: row.get(at)?,
        user: row.get(at + 1)?,
        study: row.get(at + 2)?,
        action: row.get(at + 3)?,
        outcome: row.get(at + 4)?,
        detail: row.get(at + 5)?,
    })
}

/// The hash a coordinator audit chain starts from.
const AUDIT_GENESIS: &str = "confer coordinator audit genesis";

/// The chain hash of coordinator audit record `seq`.
fn audit_hash(seq: i64, e: &CoordinatorAudit, prev: &str) -> String {
    let canonical = serde_json::json!([
        seq, e.at_ms, e.user, e.study, e.action, e.outcome, e.detail, prev
    ]);
    sha256_hex(canonical.to_string().as_bytes())
}

/// The newest record's sequence number and hash (0 and the genesis hash
/// for an empty log).
fn last_link(conn: &Connection) -> Result<(i64, String)> {
    Ok(conn
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<String>>(1)?)),
        )
        .optional()
        .map_err(db)?
        .map(|(seq, hash)| (seq, hash.unwrap_or_default()))
        .unwrap_or((0, AUDIT_GENESIS.to_string())))
}

/// Adds the chain columns to a log written before the coordinator chained
/// it, and chains the records it holds (renumbered 1, 2, ... in order).
fn chain_legacy_audit(conn: &Connection) -> Result<()> {
    let has_hash = conn.prepare("SELECT hash FROM audit LIMIT 0").is_ok();
    if has_hash {
        return Ok(());
    }
    // One transaction: a crash half way leaves the log as it was.
    let tx = conn.unchecked_transaction().map_err(db)?;
    let conn = &*tx;
    conn.execute_batch(
        "ALTER TABLE audit ADD COLUMN prev_hash TEXT;
         ALTER TABLE audit ADD COLUMN hash TEXT;",
    )
    .map_err(db)?;
    let rows: Vec<(i64, CoordinatorAudit)> = {
        let mut stmt = conn
            .prepare(
                "SELECT seq, at_ms, user, study, action, outcome, detail FROM audit ORDER BY seq",
            )
            .map_err(db)?;
        stmt.query_map([], |r| Ok((r.get(0)?, audit_from_row(r, 1)?)))
            .map_err(db)?
            .collect::<rusqlite::Result<_>>()
            .map_err(db)?
    };
    let mut prev = AUDIT_GENESIS.to_string();
    for (i, (old_seq, entry)) in rows.iter().enumerate() {
        let seq = i as i64 + 1;
        let hash = audit_hash(seq, entry, &prev);
        // Renumbered downwards in order, so no number is taken twice.
        conn.execute(
            "UPDATE audit SET seq = ?1, prev_hash = ?2, hash = ?3 WHERE seq = ?4",
            params![seq, prev, hash, old_seq],
        )
        .map_err(db)?;
        prev = hash;
    }
    tx.commit().map_err(db)?;
    Ok(())
}

/// A fresh bearer token: 32 random bytes, hex, with a recognisable prefix.
pub fn new_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| CoordinatorError::Internal(format!("no randomness from the OS: {e}")))?;
    Ok(format!("cft_{}", hex::encode(bytes)))
}

impl Store for SqliteStore {
    fn add_user(&self, name: &str, role: Role) -> Result<String> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        {
            return Err(CoordinatorError::Invalid(format!(
                "user name {name:?}: use letters, digits, '-', '_', '.' or '@'"
            )));
        }
        let token = new_token()?;
        let mut conn = self.conn()?;
        let tx = conn.transaction().map_err(db)?;
        // A revoked name may be given again: a new token, a new role, and
        // none of the old certificates (they stay revoked).
        let revoked: bool = tx
            .query_row(
                "SELECT revoked_ms IS NOT NULL FROM users WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?
            .unwrap_or(false);
        if revoked {
            tx.execute("DELETE FROM certificates WHERE user = ?1", params![name])
                .map_err(db)?;
            tx.execute("DELETE FROM users WHERE name = ?1", params![name])
                .map_err(db)?;
        }
        let inserted = tx
            .execute(
                "INSERT INTO users (name, role, token_hash, created_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO NOTHING",
                params![name, role.name(), sha256_hex(token.as_bytes()), now_ms()],
            )
            .map_err(db)?;
        if inserted == 0 {
            return Err(CoordinatorError::Invalid(format!(
                "user {name} exists: revoke it first, rotate its token (`confer coordinator user \
                 rotate --name {name}`), or choose another name"
            )));
        }
        tx.commit().map_err(db)?;
        Ok(token)
    }

    fn rotate_token(&self, name: &str) -> Result<String> {
        let token = new_token()?;
        let changed = self
            .conn()?
            .execute(
                "UPDATE users SET token_hash = ?2 WHERE name = ?1 AND revoked_ms IS NULL",
                params![name, sha256_hex(token.as_bytes())],
            )
            .map_err(db)?;
        if changed == 0 {
            return Err(CoordinatorError::Invalid(format!(
                "no active user {name}: `confer coordinator user list` shows the users"
            )));
        }
        Ok(token)
    }

    fn user_by_token(&self, token: &str) -> Result<Option<User>> {
        let conn = self.conn()?;
        conn.query_row(
            "SELECT name, role, created_ms, revoked_ms FROM users WHERE token_hash = ?1 AND revoked_ms IS NULL",
            params![sha256_hex(token.as_bytes())],
            user_from_row,
        )
        .optional()
        .map_err(db)
    }

    fn user_by_name(&self, name: &str) -> Result<Option<User>> {
        let conn = self.conn()?;
        conn.query_row(
            "SELECT name, role, created_ms, revoked_ms FROM users WHERE name = ?1 AND revoked_ms IS NULL",
            params![name],
            user_from_row,
        )
        .optional()
        .map_err(db)
    }

    fn users(&self) -> Result<Vec<User>> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare("SELECT name, role, created_ms, revoked_ms FROM users ORDER BY name")
            .map_err(db)?;
        let rows = stmt.query_map([], user_from_row).map_err(db)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db)
    }

    fn revoke_user(&self, name: &str) -> Result<()> {
        let conn = self.conn()?;
        let n = conn
            .execute(
                "UPDATE users SET revoked_ms = ?2, token_hash = 'revoked:' || name || ':' || ?2
                 WHERE name = ?1 AND revoked_ms IS NULL",
                params![name, now_ms()],
            )
            .map_err(db)?;
        if n == 0 {
            return Err(CoordinatorError::Invalid(format!(
                "no active user called {name}"
            )));
        }
        Ok(())
    }

    fn add_certificate(&self, user: &str, fingerprint: &str) -> Result<()> {
        if self.user_by_name(user)?.is_none() {
            return Err(CoordinatorError::Invalid(format!(
                "no active user called {user}"
            )));
        }
        let conn = self.conn()?;
        conn.execute(
            "INSERT INTO certificates (fingerprint, user) VALUES (?1, ?2)
             ON CONFLICT(fingerprint) DO UPDATE SET user = ?2",
            params![fingerprint, user],
        )
        .map_err(db)?;
        Ok(())
    }

    fn user_by_certificate(&self, fingerprint: &str) -> Result<Option<User>> {
        let conn = self.conn()?;
        conn.query_row(
            "SELECT u.name, u.role, u.created_ms, u.revoked_ms FROM certificates c JOIN users u ON u.name = c.user
             WHERE c.fingerprint = ?1 AND u.revoked_ms IS NULL",
            params![fingerprint],
            user_from_row,
        )
        .optional()
        .map_err(db)
    }

    fn create_study(&self, study: &Study) -> Result<()> {
        let body =
            serde_json::to_string(study).map_err(|e| CoordinatorError::Internal(e.to_string()))?;
        let conn = self.conn()?;
        let n = conn
            .execute(
                "INSERT INTO studies (name, body) VALUES (?1, ?2) ON CONFLICT(name) DO NOTHING",
                params![study.name, body],
            )
            .map_err(db)?;
        if n == 0 {
            return Err(CoordinatorError::Invalid(format!(
                "study {} exists already",
                study.name
            )));
        }
        Ok(())
    }

    fn update_study(&self, study: &Study) -> Result<()> {
        let body =
            serde_json::to_string(study).map_err(|e| CoordinatorError::Internal(e.to_string()))?;
        let conn = self.conn()?;
        let n = conn
            .execute(
                "UPDATE studies SET body = ?2 WHERE name = ?1",
                params![study.name, body],
            )
            .map_err(db)?;
        if n == 0 {
            return Err(CoordinatorError::Invalid(format!(
                "study {} does not exist",
                study.name
            )));
        }
        Ok(())
    }

    fn study(&self, name: &str) -> Result<Option<Study>> {
        let conn = self.conn()?;
        let body: Option<String> = conn
            .query_row(
                "SELECT body FROM studies WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        body.map(|b| {
            serde_json::from_str(&b).map_err(|e| CoordinatorError::Internal(e.to_string()))
        })
        .transpose()
    }

    fn studies(&self) -> Result<Vec<Study>> {
        self.json_rows("SELECT body FROM studies ORDER BY name")
    }

    fn record_result(&self, r: &ResultRecord) -> Result<()> {
        let conn = self.conn()?;
        conn.execute(
            "INSERT OR REPLACE INTO results (query_id, study, user, statement_hash, sites, created_ms, result)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![r.query_id, r.study, r.user, r.statement_hash, r.sites.join(","), now_ms(), r.result],
        )
        .map_err(db)?;
        Ok(())
    }

    fn set_node_status(&self, status: &NodeStatus) -> Result<()> {
        let body =
            serde_json::to_string(status).map_err(|e| CoordinatorError::Internal(e.to_string()))?;
        let conn = self.conn()?;
        conn.execute(
            "INSERT INTO nodes (name, body) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET body = ?2",
            params![status.name, body],
        )
        .map_err(db)?;
        Ok(())
    }

    fn node_statuses(&self) -> Result<Vec<NodeStatus>> {
        self.json_rows("SELECT body FROM nodes ORDER BY name")
    }

    fn anchor(&self, node: &str) -> Result<Option<(i64, String)>> {
        let conn = self.conn()?;
        conn.query_row(
            "SELECT seq, hash FROM anchors WHERE node = ?1",
            params![node],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(db)
    }

    fn set_anchor(&self, node: &str, seq: i64, hash: &str) -> Result<()> {
        let conn = self.conn()?;
        conn.execute(
            "INSERT INTO anchors (node, seq, hash, at_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(node) DO UPDATE SET seq = ?2, hash = ?3, at_ms = ?4",
            params![node, seq, hash, now_ms()],
        )
        .map_err(db)?;
        Ok(())
    }

    fn set_hold(&self, node: &str, why: Option<&str>) -> Result<()> {
        let conn = self.conn()?;
        conn.execute(
            "UPDATE anchors SET held = ?2 WHERE node = ?1",
            params![node, why],
        )
        .map_err(db)?;
        Ok(())
    }

    fn holds(&self) -> Result<Vec<(String, String)>> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare("SELECT node, held FROM anchors WHERE held IS NOT NULL ORDER BY node")
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(db)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db)?;
        Ok(rows)
    }

    fn forget_anchor(&self, node: &str) -> Result<bool> {
        let conn = self.conn()?;
        let n = conn
            .execute("DELETE FROM anchors WHERE node = ?1", params![node])
            .map_err(db)?;
        Ok(n > 0)
    }

    fn audit(&self, e: &CoordinatorAudit) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db)?;
        let (seq, prev) = last_link(&tx)?;
        let hash = audit_hash(seq + 1, e, &prev);
        tx.execute(
            "INSERT INTO audit (seq, at_ms, user, study, action, outcome, detail, prev_hash, hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                seq + 1,
                e.at_ms,
                e.user,
                e.study,
                e.action,
                e.outcome,
                e.detail,
                prev,
                hash
            ],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(())
    }

    fn verify_audit(&self) -> Result<(usize, Option<String>)> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare(
                "SELECT seq, at_ms, user, study, action, outcome, detail, prev_hash, hash FROM audit ORDER BY seq",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    audit_from_row(r, 1)?,
                    r.get::<_, Option<String>>(7)?,
                    r.get::<_, Option<String>>(8)?,
                ))
            })
            .map_err(db)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db)?;
        let mut prev = AUDIT_GENESIS.to_string();
        for (i, (seq, entry, prev_hash, hash)) in rows.iter().enumerate() {
            let expected = i as i64 + 1;
            if *seq != expected {
                return Ok((
                    i,
                    Some(format!(
                        "record {expected} is missing (the next record present is {seq}): records were deleted"
                    )),
                ));
            }
            if prev_hash.as_deref() != Some(prev.as_str()) {
                return Ok((
                    i,
                    Some(format!(
                        "record {seq} does not follow record {}: records were deleted, inserted or reordered",
                        seq - 1
                    )),
                ));
            }
            if hash.as_deref() != Some(audit_hash(*seq, entry, &prev).as_str()) {
                return Ok((
                    i,
                    Some(format!(
                        "record {seq} was edited: its contents do not match its hash"
                    )),
                ));
            }
            prev = hash.clone().unwrap_or_default();
        }
        Ok((rows.len(), None))
    }

    fn audit_log(&self) -> Result<Vec<CoordinatorAudit>> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare("SELECT at_ms, user, study, action, outcome, detail FROM audit ORDER BY seq")
            .map_err(db)?;
        let rows = stmt.query_map([], |r| audit_from_row(r, 0)).map_err(db)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db)
    }

    fn save_job(&self, job: &JobRecord) -> Result<()> {
        let body =
            serde_json::to_string(job).map_err(|e| CoordinatorError::Internal(e.to_string()))?;
        let conn = self.conn()?;
        conn.execute(
            "INSERT INTO train_jobs (id, created_ms, body, checkpoint) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET body = excluded.body, checkpoint = excluded.checkpoint",
            params![
                job.status.job_id.to_string(),
                job.status.created_ms,
                body,
                job.checkpoint
            ],
        )
        .map_err(db)?;
        Ok(())
    }

    fn job(&self, id: uuid::Uuid) -> Result<Option<JobRecord>> {
        let conn = self.conn()?;
        let row: Option<(String, Option<String>)> = conn
            .query_row(
                "SELECT body, checkpoint FROM train_jobs WHERE id = ?1",
                params![id.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db)?;
        row.map(|(body, checkpoint)| {
            let mut job: JobRecord = serde_json::from_str(&body)
                .map_err(|e| CoordinatorError::Internal(e.to_string()))?;
            job.checkpoint = checkpoint;
            Ok(job)
        })
        .transpose()
    }

    fn jobs(&self) -> Result<Vec<JobRecord>> {
        self.json_rows("SELECT body FROM train_jobs ORDER BY created_ms, id")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SqliteStore::open(&dir.path().join("state.sqlite")).expect("open");
        (dir, s)
    }

    #[test]
    fn tokens_authenticate_until_revoked_and_only_hashes_are_stored() {
        let (dir, s) = store();
        let token = s.add_user("alice", Role::Researcher).expect("add");
        assert!(token.starts_with("cft_"));
        assert_eq!(
            s.user_by_token(&token).expect("lookup").map(|u| u.role),
            Some(Role::Researcher)
        );
        assert!(s.user_by_token("cft_wrong").expect("lookup").is_none());
        assert!(s.add_user("alice", Role::Admin).is_err());
        let raw = std::fs::read(dir.path().join("state.sqlite")).expect("read");
        assert!(
            !raw.windows(token.len()).any(|w| w == token.as_bytes()),
            "token stored in clear"
        );
        s.revoke_user("alice").expect("revoke");
        assert!(s.user_by_token(&token).expect("lookup").is_none());
        assert!(s.revoke_user("alice").is_err());
    }

    #[test]
    fn a_revoked_name_can_be_given_again_and_tokens_rotate() {
        let (_dir, s) = store();
        let first = s.add_user("bob", Role::Researcher).expect("add");
        s.add_certificate("bob", "f1").expect("cert");
        let rotated = s.rotate_token("bob").expect("rotate");
        assert!(
            s.user_by_token(&first).expect("lookup").is_none(),
            "old token stops"
        );
        assert!(s.user_by_token(&rotated).expect("lookup").is_some());
        s.revoke_user("bob").expect("revoke");
        assert!(
            s.rotate_token("bob").is_err(),
            "a revoked user has no token to rotate"
        );
        let again = s
            .add_user("bob", Role::Analyst)
            .expect("a revoked name is free again");
        let user = s.user_by_token(&again).expect("lookup").expect("active");
        assert_eq!(user.role, Role::Analyst);
        assert!(s.user_by_token(&rotated).expect("lookup").is_none());
        assert!(
            s.user_by_certificate("f1").expect("lookup").is_none(),
            "the old certificate stays revoked"
        );
    }

    #[test]
    fn the_audit_log_is_chained_and_edits_or_deletions_are_found() {
        let (dir, s) = store();
        for i in 0..5 {
            s.audit(&CoordinatorAudit {
                at_ms: i,
                user: "alice".into(),
                study: Some("gi".into()),
                action: "query".into(),
                outcome: "ok".into(),
                detail: format!("task {i}"),
            })
            .expect("audit");
        }
        assert_eq!(s.verify_audit().expect("verify"), (5, None));
        let raw = Connection::open(dir.path().join("state.sqlite")).expect("open");
        raw.execute("UPDATE audit SET outcome = 'refused' WHERE seq = 3", [])
            .expect("edit");
        let (good, problem) = s.verify_audit().expect("verify");
        assert_eq!(good, 2);
        assert!(problem.expect("found").contains("record 3 was edited"));
        raw.execute("UPDATE audit SET outcome = 'ok' WHERE seq = 3", [])
            .expect("undo");
        raw.execute("DELETE FROM audit WHERE seq = 2", [])
            .expect("delete");
        let (_, problem) = s.verify_audit().expect("verify");
        assert!(problem.expect("found").contains("record 2 is missing"));
    }

    #[test]
    fn a_log_from_before_the_chain_is_chained_when_opened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("old.sqlite");
        {
            let raw = Connection::open(&path).expect("open");
            raw.execute_batch(
                "CREATE TABLE audit (
                     seq INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, user TEXT NOT NULL, study TEXT,
                     action TEXT NOT NULL, outcome TEXT NOT NULL, detail TEXT NOT NULL);
                 INSERT INTO audit VALUES (4, 1, 'a', NULL, 'query', 'ok', 'x');
                 INSERT INTO audit VALUES (9, 2, 'b', NULL, 'query', 'ok', 'y');",
            )
            .expect("old log");
        }
        let s = SqliteStore::open(&path).expect("open");
        assert_eq!(s.verify_audit().expect("verify"), (2, None));
        s.audit(&CoordinatorAudit {
            at_ms: 3,
            user: "c".into(),
            study: None,
            action: "explain".into(),
            outcome: "ok".into(),
            detail: String::new(),
        })
        .expect("audit");
        assert_eq!(s.verify_audit().expect("verify"), (3, None));
        assert_eq!(s.audit_log().expect("log").len(), 3);
    }

    #[test]
    fn studies_round_trip_and_admit_members() {
        let (_dir, s) = store();
        let study = Study {
            name: "gi".into(),
            title: "GI bleeding".into(),
            principal_investigator: "pi".into(),
            members: vec!["alice".into()],
            tables: vec![],
            requested_epsilon: 5.0,
            requested_delta: 1e-6,
            ethics_ref: "IRB-1".into(),
            min_sites: Some(2),
            created_ms: 1,
            created_by: "admin".into(),
        };
        s.create_study(&study).expect("create");
        assert!(s.create_study(&study).is_err());
        assert_eq!(s.study("gi").expect("get"), Some(study.clone()));
        let user = |name: &str, role| User {
            name: name.into(),
            role,
            created_ms: 0,
            revoked_ms: None,
        };
        assert!(study.admits(&user("alice", Role::Researcher)));
        assert!(study.admits(&user("pi", Role::Researcher)));
        assert!(study.admits(&user("root", Role::Admin)));
        assert!(!study.admits(&user("mallory", Role::Researcher)));
    }
}
