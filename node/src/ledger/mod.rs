//! The node's durable state: the privacy ledger, study approvals, and the
//! hash-chained audit log, in one SQLite database (`state_dir/ledger.sqlite`,
//! WAL, `synchronous = FULL`).
//!
//! * **Releases.** A release is recorded in one transaction that checks the
//!   remaining budget, inserts the debit with the exact bytes to be sent,
//!   and appends the audit record. Only after the commit returns does the
//!   node send anything. A task id is the primary key: a retried task is
//!   answered with the stored bytes and never charged twice; a different
//!   task under a used id is refused as a replay.
//! * **Studies.** Approval state per study (pending, approved, denied with a
//!   reason), with an optional budget set by the steward.
//! * **Audit.** Append-only records of every task received (released,
//!   retried or refused, and why), every steward decision and every policy
//!   reload, each holding the SHA-256 of the previous record. The newest
//!   record's sequence number and hash are also written to `audit.head`
//!   beside the database, so deleting records at the end is detected too.
//!
//! The ledger's parts: `tasks` (a task's charge, run, result and failure),
//! `budget` (totals, leases and refusals with figures), `studies`
//! (approvals) and `audit` (the chain, its head and its verification).

mod audit;
mod budget;
mod studies;
mod tasks;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use confer_protocol::signing::sha256_hex;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{NodeError, Result};
use audit::append;
use budget::{budget_refusal, refusal_entry, spent_in};

pub use audit::{AuditEntry, AuditFilter, AuditRecord, Verification};
pub use budget::Debit;
pub use studies::{StudyRow, StudyStatus};

/// Relative tolerance when comparing spending with a budget, so that
/// floating-point sums of many small debits do not refuse the last one
/// that exactly fits.
const BUDGET_TOLERANCE: f64 = 1e-9;

/// What one release costs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// zCDP rho charged.
    pub rho: f64,
    /// Epsilon reported.
    pub epsilon: f64,
    /// Delta reported.
    pub delta: f64,
    /// The part of `delta` that adds up across releases (partition
    /// selection), capped by the study's delta budget.
    #[serde(default)]
    pub selection_delta: f64,
}

/// A release about to be recorded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Charge {
    /// The task.
    pub task_id: Uuid,
    /// SHA-256 of the signed payload (to tell a retry from a replay).
    pub payload_hash: String,
    /// Study charged.
    pub study: String,
    /// Researcher who asked.
    pub researcher: String,
    /// What kind of task (`query`, `train`, ...).
    pub kind: String,
    /// Its cost.
    pub cost: Cost,
    /// The study's total budget at this node (rho).
    pub study_budget: f64,
    /// The researcher's budget within the study (rho), if any.
    pub researcher_budget: Option<f64>,
    /// The study's cap on summed selection delta at this node.
    pub study_delta_budget: f64,
    /// The node's budget over all studies (rho), if the policy sets one.
    pub node_budget: Option<f64>,
    /// The researcher's budget over all studies (rho), if any.
    pub researcher_total_budget: Option<f64>,
    /// Charged failures the researcher may have (failed since the steward's
    /// last lift; once there is one, tasks still running count too),
    /// checked in the transaction that charges the task; `None`: no quota.
    pub failure_quota: Option<u64>,
    /// The node's floor for a task that fails after it was admitted (rho):
    /// a failure is charged the larger of the task's cost and this, even
    /// beyond the budgets (a failure is a penalty, not a purchase).
    pub failure_rho: f64,
}

impl Charge {
    /// The audit record of this charge with `decision`: the task, study,
    /// researcher, kind and cost; the caller adds the rest.
    pub(crate) fn audit_entry(&self, decision: &str) -> AuditEntry {
        AuditEntry {
            task_id: Some(self.task_id),
            study: Some(self.study.clone()),
            actor: Some(self.researcher.clone()),
            kind: self.kind.clone(),
            decision: decision.into(),
            reason: None,
            cost: Some(self.cost),
            result_hash: None,
        }
    }

    /// What a failure of this task costs: the larger of its cost and the
    /// node's floor.
    pub fn failure_charge(&self) -> f64 {
        self.cost.rho.max(self.failure_rho)
    }
}

/// The state of a task in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Charged its cost, and running.
    Running,
    /// Released: its bytes are stored.
    Released,
    /// Failed after it was admitted: charged at least the node's floor.
    Failed,
}

impl TaskState {
    fn parse(s: &str) -> Self {
        match s {
            "running" => TaskState::Running,
            "failed" => TaskState::Failed,
            _ => TaskState::Released,
        }
    }
}

/// What the ledger stores in place of a result while a task runs.
pub const RUNNING_MARKER: &[u8] = b"confer: running, charged";

/// What the ledger stores in place of a result when a task failed after it
/// was admitted: the failure was charged, and a retry gets the same refusal.
pub const FAILED_MARKER: &[u8] = b"confer: failed while running, charged";

/// Why a charge was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Not enough budget; the message has the figures.
    Budget(String),
    /// The task id was used for a different task.
    Replay(String),
    /// The researcher's charged failures reached the node's quota.
    Quota(String),
}

/// What [`Ledger::begin`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Begun {
    /// Charged now; the task may run.
    Charged,
    /// The task is already on record (a retry): as it is.
    Existing(Stored),
}

/// A release that is already on record.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// SHA-256 of the payload that was released.
    pub payload_hash: String,
    /// The released bytes.
    pub result: Vec<u8>,
    /// Whether it is still running, released or failed.
    pub state: TaskState,
}

/// The ledger database.
pub struct Ledger {
    conn: Mutex<Connection>,
    path: PathBuf,
    head_path: PathBuf,
    /// Budget reserved by tasks that passed their check and have not run
    /// yet, by task id. Read and written only while `conn` is locked, so a
    /// lease and the charges it competes with are decided in one order. In
    /// memory: a restart drops them, and `begin` checks every budget again.
    leases: Mutex<HashMap<Uuid, Lease>>,
    /// Tasks whose leases were released, until they expire (ms): a check
    /// that arrives after its release (a slow node) reserves nothing.
    released: Mutex<HashMap<Uuid, i64>>,
}

/// Budget a checked task holds until it runs, is released, or expires.
#[derive(Debug, Clone)]
struct Lease {
    study: String,
    researcher: String,
    rho: f64,
    selection_delta: f64,
    expires_ms: i64,
}

/// Budget reserved by other tasks' leases, in the shapes budgets read.
#[derive(Debug, Default)]
struct Reserved {
    study_rho: f64,
    study_delta: f64,
    researcher_in_study: f64,
    researcher_total: f64,
    node_total: f64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The ledger's schema: migration *n* takes a ledger from version *n - 1*
/// to *n* (`confer_store`). Never edit a released step; add one.
pub const SCHEMA: confer_store::Schema = confer_store::Schema {
    kind: "node ledger",
    application_id: confer_store::NODE_LEDGER_ID,
    legacy_tables: &["releases", "studies", "lifts", "audit"],
    migrations: &[
        confer_store::Migration {
            what: "releases, studies, lifts and the audit chain",
            apply: baseline,
        },
        confer_store::Migration {
            what: "the node's name (a state directory belongs to one node)",
            apply: |conn| {
                conn.execute_batch("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            },
        },
    ],
};

/// Version 1: the tables as they were when versions began to be kept, and
/// the columns ledgers written before then may lack.
fn baseline(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS releases (
             task_id      TEXT PRIMARY KEY,
             payload_hash TEXT NOT NULL,
             study        TEXT NOT NULL,
             researcher   TEXT NOT NULL,
             kind         TEXT NOT NULL,
             rho          REAL NOT NULL,
             epsilon      REAL NOT NULL,
             delta        REAL NOT NULL,
             selection_delta REAL NOT NULL DEFAULT 0,
             state        TEXT NOT NULL DEFAULT 'released',
             failure_rho  REAL NOT NULL DEFAULT 0,
             created_ms   INTEGER NOT NULL,
             result_hash  TEXT NOT NULL,
             result       BLOB NOT NULL
         );
         CREATE INDEX IF NOT EXISTS releases_study ON releases(study, researcher);
         CREATE TABLE IF NOT EXISTS studies (
             study       TEXT PRIMARY KEY,
             status      TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied')),
             reason      TEXT,
             budget_rho  REAL,
             first_seen_ms INTEGER NOT NULL,
             decided_ms  INTEGER,
             decided_by  TEXT,
             description TEXT
         );
         CREATE TABLE IF NOT EXISTS lifts (
             researcher  TEXT NOT NULL,
             at_ms       INTEGER NOT NULL,
             by          TEXT NOT NULL
         );
         CREATE TABLE IF NOT EXISTS audit (
             seq         INTEGER PRIMARY KEY,
             at_ms       INTEGER NOT NULL,
             task_id     TEXT,
             study       TEXT,
             actor       TEXT,
             kind        TEXT NOT NULL,
             decision    TEXT NOT NULL,
             reason      TEXT,
             rho         REAL NOT NULL,
             epsilon     REAL NOT NULL,
             delta       REAL NOT NULL,
             result_hash TEXT,
             prev_hash   TEXT NOT NULL,
             hash        TEXT NOT NULL
         );",
    )?;
    // Ledgers written before selection_delta was recorded.
    let has_selection_delta: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('releases') WHERE name = 'selection_delta'",
        [],
        |row| row.get(0),
    )?;
    if !has_selection_delta {
        conn.execute_batch(
            "ALTER TABLE releases ADD COLUMN selection_delta REAL NOT NULL DEFAULT 0",
        )?;
    }
    // Ledgers written before study descriptions were kept.
    let has_description: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('studies') WHERE name = 'description'",
        [],
        |row| row.get(0),
    )?;
    if !has_description {
        conn.execute_batch("ALTER TABLE studies ADD COLUMN description TEXT")?;
    }
    // Ledgers written before tasks were charged before they ran.
    let has_state: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('releases') WHERE name = 'state'",
        [],
        |row| row.get(0),
    )?;
    if !has_state {
        conn.execute_batch(
            "ALTER TABLE releases ADD COLUMN state TEXT NOT NULL DEFAULT 'released';
             ALTER TABLE releases ADD COLUMN failure_rho REAL NOT NULL DEFAULT 0;",
        )?;
    }
    Ok(())
}

impl Ledger {
    /// Opens (creating if needed) the ledger in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(state_dir).map_err(|e| {
            NodeError::Config(format!(
                "node.state_dir = {}: cannot create it: {e}",
                state_dir.display()
            ))
        })?;
        let path = state_dir.join("ledger.sqlite");
        let opened = confer_store::open(&path, &SCHEMA)?;
        if let Some(backup) = &opened.backup {
            tracing::info!(
                "upgraded the ledger {} from schema version {} to {}; the previous file is kept at {}",
                path.display(),
                opened.from,
                opened.version,
                backup.display()
            );
        }
        let conn = opened.conn;
        let ledger = Self {
            conn: Mutex::new(conn),
            head_path: state_dir.join("audit.head"),
            path,
            leases: Mutex::new(HashMap::new()),
            released: Mutex::new(HashMap::new()),
        };
        ledger.recover()?;
        Ok(ledger)
    }

    /// Tasks that were running when the node stopped (a crash, a kill by
    /// the system for memory) failed: their charge rises to the failure
    /// floor recorded with them, and a retry gets the failure. Whether a task kills the node can depend
    /// on the rows, so such a stop is never free.
    fn recover(&self) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let running: Vec<(String, String, String, String, f64, f64, f64)> = {
            let mut stmt = tx.prepare(
                "SELECT task_id, study, researcher, kind, MAX(rho, failure_rho), epsilon, delta
                 FROM releases WHERE state = 'running' ORDER BY created_ms",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                    row.get(5)?,
                    row.get(6)?,
                ))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        if running.is_empty() {
            return Ok(());
        }
        let mut head = None;
        let failed_hash = sha256_hex(FAILED_MARKER);
        for (task, study, researcher, kind, rho, epsilon, delta) in running {
            tx.execute(
                "UPDATE releases SET state = 'failed', result = ?2, result_hash = ?3,
                        rho = MAX(rho, failure_rho) WHERE task_id = ?1",
                params![task, FAILED_MARKER, failed_hash],
            )?;
            head = Some(append(
                &tx,
                &AuditEntry {
                    task_id: Uuid::parse_str(&task).ok(),
                    study: Some(study),
                    actor: Some(researcher),
                    kind,
                    decision: "failed".into(),
                    reason: Some(
                        "the node stopped while the task ran: charged as a failure (it may have \
                         been killed for its memory)"
                            .into(),
                    ),
                    cost: Some(Cost {
                        rho,
                        epsilon,
                        delta,
                        selection_delta: 0.0,
                    }),
                    result_hash: Some(failed_hash.clone()),
                },
            )?);
        }
        tx.commit()?;
        if let Some(h) = head {
            self.write_head(h);
        }
        Ok(())
    }

    /// Binds this ledger to the node named `name` the first time, and
    /// refuses it afterwards under any other name: a state directory (its
    /// budget, approvals and audit chain) belongs to one node and is never
    /// shared, copied to or swapped with another.
    pub fn bind_node(&self, name: &str) -> Result<()> {
        if self.belongs_to(name)? {
            return Ok(());
        }
        self.conn()?.execute(
            "INSERT INTO meta (key, value) VALUES ('node', ?1)",
            params![name],
        )?;
        Ok(())
    }

    /// Whether this ledger is bound to `name` (false: to no node yet); an
    /// error naming both if it belongs to another node. Writes nothing.
    pub fn belongs_to(&self, name: &str) -> Result<bool> {
        match self.node_name()? {
            None => Ok(false),
            Some(bound) if bound == name => Ok(true),
            Some(bound) => Err(NodeError::Config(format!(
                "{} is the ledger of node \"{bound}\", but this node is \"{name}\": point \
                 node.state_dir at this node's own state directory (a ledger holds one node's \
                 budget and audit chain and is never shared or moved between nodes); nothing \
                 was changed",
                self.path.display()
            ))),
        }
    }

    /// The node this ledger belongs to, once it has started under a name.
    pub fn node_name(&self) -> Result<Option<String>> {
        let conn = self.conn()?;
        Ok(conn
            .query_row("SELECT value FROM meta WHERE key = 'node'", [], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.conn
            .lock()
            .map_err(|_| NodeError::Internal("ledger lock poisoned by an earlier panic".into()))
    }
}
