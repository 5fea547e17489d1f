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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use confer_protocol::signing::sha256_hex;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{NodeError, Result};

/// Hash that precedes the first audit record.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

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

/// Approval state of a study at this node.
#[derive(Debug, Clone, PartialEq)]
pub enum StudyStatus {
    /// Never seen.
    Unknown,
    /// Waiting for the steward.
    Pending,
    /// Approved; the steward may have set the budget (rho).
    Approved {
        /// Budget set by the steward, overriding the policy's.
        budget_rho: Option<f64>,
    },
    /// Denied, with the reason the researcher sees.
    Denied {
        /// The steward's reason.
        reason: String,
    },
}

/// A study as listed by `confer node studies`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StudyRow {
    /// Name.
    pub study: String,
    /// pending / approved / denied.
    pub status: String,
    /// Denial reason.
    pub reason: Option<String>,
    /// Budget set by the steward (rho), if any.
    pub budget_rho: Option<f64>,
    /// Spent so far (rho).
    pub spent_rho: f64,
    /// Releases so far.
    pub releases: u64,
    /// What the coordinator said of the study when it was first seen
    /// (title, principal investigator, ethics reference, requested budget).
    pub description: Option<String>,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain, from 1.
    pub seq: i64,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The task, if the record is about one.
    pub task_id: Option<String>,
    /// The study concerned.
    pub study: Option<String>,
    /// The researcher (or steward) concerned.
    pub actor: Option<String>,
    /// What happened: query, budget, approve, deny, policy, ...
    pub kind: String,
    /// released, retried, refused, recorded.
    pub decision: String,
    /// Why (refusal reasons, steward reasons), or a note.
    pub reason: Option<String>,
    /// zCDP rho charged (0 when nothing was released).
    pub rho: f64,
    /// Epsilon reported.
    pub epsilon: f64,
    /// Delta reported.
    pub delta: f64,
    /// SHA-256 of the released bytes.
    pub result_hash: Option<String>,
    /// Hash of the previous record.
    pub prev_hash: String,
    /// Hash of this record.
    pub hash: String,
}

/// A new audit record, before it is chained.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditEntry {
    /// The task.
    pub task_id: Option<Uuid>,
    /// The study.
    pub study: Option<String>,
    /// The researcher or steward.
    pub actor: Option<String>,
    /// What happened.
    pub kind: String,
    /// released, retried, refused, recorded.
    pub decision: String,
    /// Why.
    pub reason: Option<String>,
    /// Cost charged.
    pub cost: Option<Cost>,
    /// SHA-256 of released bytes.
    pub result_hash: Option<String>,
}

/// The outcome of `confer audit verify`.
#[derive(Debug, Clone, PartialEq)]
pub struct Verification {
    /// Records checked.
    pub records: usize,
    /// The first problem found, naming the record.
    pub problem: Option<String>,
}

/// Filter for listing audit records.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this study.
    pub study: Option<String>,
    /// Only records at or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
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
        let conn = Connection::open(&path)
            .map_err(|e| NodeError::Ledger(format!("cannot open {}: {e}", path.display())))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
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

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.conn
            .lock()
            .map_err(|_| NodeError::Internal("ledger lock poisoned by an earlier panic".into()))
    }

    /// A release already on record for `task_id`.
    pub fn stored(&self, task_id: Uuid) -> Result<Option<Stored>> {
        let conn = self.conn()?;
        Ok(conn
            .query_row(
                "SELECT payload_hash, result, state FROM releases WHERE task_id = ?1",
                params![task_id.to_string()],
                |row| {
                    Ok(Stored {
                        payload_hash: row.get(0)?,
                        result: row.get(1)?,
                        state: TaskState::parse(&row.get::<_, String>(2)?),
                    })
                },
            )
            .optional()?)
    }

    /// Checks the budget and records the release with its audit record, in
    /// one durable transaction. Returns the bytes to send (the stored ones if
    /// a retry of the same task committed first), or why it was refused (the
    /// refusal is audited).
    pub fn release(
        &self,
        charge: &Charge,
        result: Vec<u8>,
    ) -> Result<std::result::Result<Vec<u8>, Refusal>> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing: Option<(String, Vec<u8>)> = tx
            .query_row(
                "SELECT payload_hash, result FROM releases WHERE task_id = ?1",
                params![charge.task_id.to_string()],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        if let Some((payload_hash, stored)) = existing {
            if payload_hash == charge.payload_hash {
                return Ok(Ok(stored));
            }
            let why = format!(
                "task id {} was already used for a different task: refused as a replay",
                charge.task_id
            );
            let head = append(&tx, &refusal_entry(charge, &why))?;
            tx.commit()?;
            self.write_head(head);
            return Ok(Err(Refusal::Replay(why)));
        }
        let reserved = self.reserved_for(charge)?;
        if let Some(why) = budget_refusal(&tx, charge, &reserved)? {
            let head = append(&tx, &refusal_entry(charge, &why))?;
            tx.commit()?;
            self.write_head(head);
            return Ok(Err(Refusal::Budget(why)));
        }
        let result_hash = sha256_hex(&result);
        tx.execute(
            "INSERT INTO releases (task_id, payload_hash, study, researcher, kind, rho, epsilon, delta,
                                   created_ms, result_hash, result, selection_delta)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                charge.task_id.to_string(),
                charge.payload_hash,
                charge.study,
                charge.researcher,
                charge.kind,
                charge.cost.rho,
                charge.cost.epsilon,
                charge.cost.delta,
                now_ms(),
                result_hash,
                result,
                charge.cost.selection_delta,
            ],
        )?;
        let head = append(
            &tx,
            &AuditEntry {
                task_id: Some(charge.task_id),
                study: Some(charge.study.clone()),
                actor: Some(charge.researcher.clone()),
                kind: charge.kind.clone(),
                decision: "released".into(),
                reason: None,
                cost: Some(charge.cost),
                result_hash: Some(result_hash),
            },
        )?;
        tx.commit()?;
        self.leases()?.remove(&charge.task_id);
        self.write_head(head);
        Ok(Ok(result))
    }

    /// Charges a task before it runs: checks every budget against its cost
    /// and records it as running, with its audit record, in one durable
    /// transaction. Nothing derived from the rows exists yet. A task
    /// already on record is returned as it is (a retry); a different task
    /// under its id is refused as a replay.
    pub fn begin(&self, charge: &Charge) -> Result<std::result::Result<Begun, Refusal>> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing: Option<(String, Vec<u8>, String)> = tx
            .query_row(
                "SELECT payload_hash, result, state FROM releases WHERE task_id = ?1",
                params![charge.task_id.to_string()],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .optional()?;
        if let Some((payload_hash, result, state)) = existing {
            if payload_hash == charge.payload_hash {
                return Ok(Ok(Begun::Existing(Stored {
                    payload_hash,
                    result,
                    state: TaskState::parse(&state),
                })));
            }
            let why = format!(
                "task id {} was already used for a different task: refused as a replay",
                charge.task_id
            );
            let head = append(&tx, &refusal_entry(charge, &why))?;
            tx.commit()?;
            self.write_head(head);
            return Ok(Err(Refusal::Replay(why)));
        }
        if let Some(quota) = charge.failure_quota {
            let (failed, running): (i64, i64) = tx.query_row(
                "SELECT
                   COUNT(*) FILTER (WHERE state = 'failed' AND created_ms >=
                     COALESCE((SELECT MAX(at_ms) FROM lifts WHERE researcher = ?1), 0)),
                   COUNT(*) FILTER (WHERE state = 'running')
                 FROM releases WHERE researcher = ?1",
                params![charge.researcher],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?;
            // Tasks still running count once a researcher has failed:
            // concurrent tasks cannot then slip past the quota together.
            let failed = failed.max(0) as u64;
            let running = running.max(0) as u64;
            if failed >= quota || (failed > 0 && failed + running >= quota) {
                let why = format!(
                    "researcher {} has {failed} charged failure(s) and {running} task(s) running at this \
                     node, which reach its quota of {quota}: the node takes no more of their tasks until \
                     these finish, or its data steward has reviewed the failures \
                     (`confer node lift --researcher {}`)",
                    charge.researcher, charge.researcher
                );
                let head = append(&tx, &refusal_entry(charge, &why))?;
                tx.commit()?;
                self.write_head(head);
                return Ok(Err(Refusal::Quota(why)));
            }
        }
        let reserved = self.reserved_for(charge)?;
        if let Some(why) = budget_refusal(&tx, charge, &reserved)? {
            let head = append(&tx, &refusal_entry(charge, &why))?;
            tx.commit()?;
            self.write_head(head);
            return Ok(Err(Refusal::Budget(why)));
        }
        let marker_hash = sha256_hex(RUNNING_MARKER);
        tx.execute(
            "INSERT INTO releases (task_id, payload_hash, study, researcher, kind, rho, epsilon, delta,
                                   created_ms, result_hash, result, selection_delta, state, failure_rho)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, 'running', ?13)",
            params![
                charge.task_id.to_string(),
                charge.payload_hash,
                charge.study,
                charge.researcher,
                charge.kind,
                charge.cost.rho,
                charge.cost.epsilon,
                charge.cost.delta,
                now_ms(),
                marker_hash,
                RUNNING_MARKER,
                charge.cost.selection_delta,
                charge.failure_rho,
            ],
        )?;
        let head = append(
            &tx,
            &AuditEntry {
                task_id: Some(charge.task_id),
                study: Some(charge.study.clone()),
                actor: Some(charge.researcher.clone()),
                kind: charge.kind.clone(),
                decision: "charged".into(),
                reason: Some(format!(
                    "charged before running: rho {:.6} (at least {:.6} if it fails)",
                    charge.cost.rho,
                    charge.failure_charge()
                )),
                cost: Some(charge.cost),
                result_hash: Some(marker_hash),
            },
        )?;
        tx.commit()?;
        // The lease became a charge.
        self.leases()?.remove(&charge.task_id);
        self.write_head(head);
        Ok(Ok(Begun::Charged))
    }

    /// Stores the result of a running task and settles its charge at its
    /// cost, durably, before anything is sent. Returns the bytes to send.
    pub fn finish(&self, charge: &Charge, result: Vec<u8>) -> Result<Vec<u8>> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let state: Option<(String, Vec<u8>)> = tx
            .query_row(
                "SELECT state, result FROM releases WHERE task_id = ?1",
                params![charge.task_id.to_string()],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        match state {
            Some((s, _)) if s == "running" => {}
            Some((s, stored)) if s == "released" => return Ok(stored),
            _ => {
                return Err(NodeError::Ledger(format!(
                    "task {} is not running here: its result cannot be stored",
                    charge.task_id
                )));
            }
        }
        let result_hash = sha256_hex(&result);
        tx.execute(
            "UPDATE releases SET state = 'released', rho = ?2, result = ?3, result_hash = ?4
             WHERE task_id = ?1",
            params![
                charge.task_id.to_string(),
                charge.cost.rho,
                result,
                result_hash
            ],
        )?;
        let head = append(
            &tx,
            &AuditEntry {
                task_id: Some(charge.task_id),
                study: Some(charge.study.clone()),
                actor: Some(charge.researcher.clone()),
                kind: charge.kind.clone(),
                decision: "released".into(),
                reason: None,
                cost: Some(charge.cost),
                result_hash: Some(result_hash),
            },
        )?;
        tx.commit()?;
        self.write_head(head);
        Ok(result)
    }

    /// Records that a running task failed after it was admitted: its charge
    /// rises to [`Charge::failure_charge`] (at least the node's floor, even
    /// beyond the budgets), and a retry gets the same failure. `reason`
    /// must not quote any value.
    pub fn fail(&self, charge: &Charge, reason: &str) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let failed_hash = sha256_hex(FAILED_MARKER);
        let changed = tx.execute(
            "UPDATE releases SET state = 'failed', result = ?2, result_hash = ?3, rho = MAX(rho, ?4)
             WHERE task_id = ?1 AND state = 'running'",
            params![
                charge.task_id.to_string(),
                FAILED_MARKER,
                failed_hash,
                charge.failure_charge()
            ],
        )?;
        if changed == 0 {
            return Ok(());
        }
        let mut cost = charge.cost;
        cost.rho = charge.failure_charge();
        let head = append(
            &tx,
            &AuditEntry {
                task_id: Some(charge.task_id),
                study: Some(charge.study.clone()),
                actor: Some(charge.researcher.clone()),
                kind: charge.kind.clone(),
                decision: "failed".into(),
                reason: Some(reason.to_string()),
                cost: Some(cost),
                result_hash: Some(failed_hash),
            },
        )?;
        tx.commit()?;
        self.write_head(head);
        Ok(())
    }

    /// Failures charged to `researcher` since the steward last lifted
    /// their quota.
    pub fn failures_since_lift(&self, researcher: &str) -> Result<u64> {
        let conn = self.conn()?;
        let n: i64 = conn.query_row(
            "SELECT COUNT(*) FROM releases WHERE researcher = ?1 AND state = 'failed'
               AND created_ms >= COALESCE((SELECT MAX(at_ms) FROM lifts WHERE researcher = ?1), 0)",
            params![researcher],
            |row| row.get(0),
        )?;
        Ok(n.max(0) as u64)
    }

    /// The steward lifts `researcher`'s block after reviewing their
    /// failures: the count starts again from zero. Audited.
    pub fn lift(&self, researcher: &str, by: &str, reason: &str) -> Result<u64> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n: i64 = tx.query_row(
            "SELECT COUNT(*) FROM releases WHERE researcher = ?1 AND state = 'failed'
               AND created_ms >= COALESCE((SELECT MAX(at_ms) FROM lifts WHERE researcher = ?1), 0)",
            params![researcher],
            |row| row.get(0),
        )?;
        // Strictly after every failure recorded so far.
        let at = now_ms().max(tx.query_row(
            "SELECT COALESCE(MAX(created_ms), 0) + 1 FROM releases WHERE researcher = ?1",
            params![researcher],
            |row| row.get::<_, i64>(0),
        )?);
        tx.execute(
            "INSERT INTO lifts (researcher, at_ms, by) VALUES (?1, ?2, ?3)",
            params![researcher, at, by],
        )?;
        let head = append(
            &tx,
            &AuditEntry {
                actor: Some(by.to_string()),
                kind: "lift".into(),
                decision: "recorded".into(),
                reason: Some(format!(
                    "failure quota of researcher {researcher} lifted after {n} charged failure(s): {reason}"
                )),
                ..Default::default()
            },
        )?;
        tx.commit()?;
        self.write_head(head);
        Ok(n.max(0) as u64)
    }

    /// Spent at this node over all studies, in rho.
    pub fn spent_total(&self) -> Result<f64> {
        let conn = self.conn()?;
        spent_total_in(&conn, None)
    }

    /// Spent by one researcher over all studies, in rho.
    pub fn spent_by_researcher(&self, researcher: &str) -> Result<f64> {
        let conn = self.conn()?;
        spent_total_in(&conn, Some(researcher))
    }

    /// Why `charge` would exceed a budget now, counting what other tasks
    /// hold on lease, if it would (read only).
    pub fn check_budget(&self, charge: &Charge) -> Result<Option<String>> {
        let conn = self.conn()?;
        let reserved = self.reserved_for(charge)?;
        budget_refusal(&conn, charge, &reserved)
    }

    /// Reserves `charge`'s cost until `expires_ms` (ms since the epoch), if
    /// every budget still has room for it beside what is spent and what
    /// other tasks hold; else says why not, and reserves nothing. A task
    /// that passes its check at every node so holds its budget there until
    /// it runs: a query refused at one node is released at the others
    /// ([`Ledger::release_lease`]) and spends nothing anywhere, instead of
    /// being charged where it happened to run first. A second lease for
    /// the same task replaces the first.
    pub fn reserve(&self, charge: &Charge, expires_ms: i64) -> Result<Option<String>> {
        let conn = self.conn()?;
        // Charged already (a retry's check raced its run), or released (the
        // query will not run): nothing to hold.
        let on_record = conn
            .query_row(
                "SELECT 1 FROM releases WHERE task_id = ?1",
                params![charge.task_id.to_string()],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        let released = {
            let mut released = self.released()?;
            let now = now_ms();
            released.retain(|_, until| *until > now);
            released.contains_key(&charge.task_id)
        };
        if on_record || released {
            return Ok(None);
        }
        let reserved = self.reserved_for(charge)?;
        if let Some(why) = budget_refusal(&conn, charge, &reserved)? {
            return Ok(Some(why));
        }
        self.leases()?.insert(
            charge.task_id,
            Lease {
                study: charge.study.clone(),
                researcher: charge.researcher.clone(),
                rho: charge.cost.rho,
                selection_delta: charge.cost.selection_delta,
                expires_ms,
            },
        );
        drop(conn);
        Ok(None)
    }

    /// Gives up a task's lease (the query will not run), and holds none
    /// for it until `expires_ms`; `true` if it held one.
    pub fn release_lease(&self, task_id: Uuid, expires_ms: i64) -> Result<bool> {
        let _conn = self.conn()?;
        self.released()?.insert(task_id, expires_ms);
        Ok(self.leases()?.remove(&task_id).is_some())
    }

    /// Budget held on lease now, in rho (all studies).
    pub fn leased_total(&self) -> Result<f64> {
        let _conn = self.conn()?;
        let mut leases = self.leases()?;
        let now = now_ms();
        leases.retain(|_, l| l.expires_ms > now);
        Ok(leases.values().map(|l| l.rho).sum())
    }

    fn leases(&self) -> Result<std::sync::MutexGuard<'_, HashMap<Uuid, Lease>>> {
        self.leases
            .lock()
            .map_err(|_| NodeError::Internal("lease table lock poisoned".into()))
    }

    fn released(&self) -> Result<std::sync::MutexGuard<'_, HashMap<Uuid, i64>>> {
        self.released
            .lock()
            .map_err(|_| NodeError::Internal("lease table lock poisoned".into()))
    }

    /// What tasks other than `charge`'s hold on lease, in the shapes the
    /// budgets of `charge` read; expired leases are dropped on the way.
    /// Call with `conn` locked.
    fn reserved_for(&self, charge: &Charge) -> Result<Reserved> {
        let mut leases = self.leases()?;
        let now = now_ms();
        leases.retain(|_, l| l.expires_ms > now);
        let mut r = Reserved::default();
        for (id, l) in leases.iter() {
            if *id == charge.task_id {
                continue;
            }
            r.node_total += l.rho;
            if l.researcher == charge.researcher {
                r.researcher_total += l.rho;
            }
            if l.study == charge.study {
                r.study_rho += l.rho;
                r.study_delta += l.selection_delta;
                if l.researcher == charge.researcher {
                    r.researcher_in_study += l.rho;
                }
            }
        }
        Ok(r)
    }

    /// Appends an audit record in its own transaction.
    pub fn audit(&self, entry: &AuditEntry) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let head = append(&tx, entry)?;
        tx.commit()?;
        self.write_head(head);
        Ok(())
    }

    /// The head of the audit chain (`seq` 0 and the genesis hash when it
    /// is empty), with the hash of record `anchor` if asked and present.
    pub fn head(&self, anchor: Option<i64>) -> Result<confer_protocol::catalog::AuditHead> {
        let conn = self.conn()?;
        let (seq, hash) = conn
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
            )
            .optional()?
            .unwrap_or((0, GENESIS.to_string()));
        let at_anchor = match anchor {
            Some(0) => Some(GENESIS.to_string()),
            Some(a) => conn
                .query_row("SELECT hash FROM audit WHERE seq = ?1", params![a], |r| {
                    r.get(0)
                })
                .optional()?,
            None => None,
        };
        Ok(confer_protocol::catalog::AuditHead {
            seq,
            hash,
            at_anchor,
        })
    }

    fn write_head(&self, (seq, hash): (i64, String)) {
        // Best effort after the commit: a head that lags behind the database
        // is harmless (verification only fails when records are missing).
        let current = std::fs::read_to_string(&self.head_path)
            .ok()
            .and_then(|t| {
                t.split_whitespace()
                    .next()
                    .and_then(|s| s.parse::<i64>().ok())
            })
            .unwrap_or(0);
        if seq > current {
            let tmp = self.head_path.with_extension("head.tmp");
            if std::fs::write(&tmp, format!("{seq} {hash}\n")).is_ok() {
                let _ = std::fs::rename(&tmp, &self.head_path);
            }
        }
    }

    /// The approval state of `study`.
    pub fn study_status(&self, study: &str) -> Result<StudyStatus> {
        let conn = self.conn()?;
        status_in(&conn, study)
    }

    /// Records a study seen for the first time: approved (auto) or pending
    /// (manual), with what the coordinator said of it, for the steward.
    pub fn register_study(
        &self,
        study: &str,
        approve: bool,
        by: &str,
        description: Option<&str>,
    ) -> Result<StudyStatus> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let status = status_in(&tx, study)?;
        if status != StudyStatus::Unknown {
            return Ok(status);
        }
        let now = now_ms();
        if approve {
            tx.execute(
                "INSERT INTO studies (study, status, first_seen_ms, decided_ms, decided_by, description)
                 VALUES (?1, 'approved', ?2, ?2, ?3, ?4)",
                params![study, now, by, description],
            )?;
        } else {
            tx.execute(
                "INSERT INTO studies (study, status, first_seen_ms, description) VALUES (?1, 'pending', ?2, ?3)",
                params![study, now, description],
            )?;
        }
        let head = append(
            &tx,
            &AuditEntry {
                study: Some(study.to_string()),
                actor: Some(by.to_string()),
                kind: "study".into(),
                decision: if approve { "approved" } else { "pending" }.into(),
                reason: Some(format!(
                    "{}{}",
                    if approve {
                        "approved automatically by policy"
                    } else {
                        "first seen; waits for the data steward"
                    },
                    description.map(|d| format!(": {d}")).unwrap_or_default()
                )),
                ..Default::default()
            },
        )?;
        tx.commit()?;
        self.write_head(head);
        Ok(if approve {
            StudyStatus::Approved { budget_rho: None }
        } else {
            StudyStatus::Pending
        })
    }

    /// The steward approves a study, optionally setting its budget here.
    pub fn approve(&self, study: &str, budget_rho: Option<f64>, by: &str) -> Result<()> {
        self.decide(study, "approved", None, budget_rho, by)
    }

    /// The steward denies a study, with a reason the researcher sees.
    pub fn deny(&self, study: &str, reason: &str, by: &str) -> Result<()> {
        self.decide(study, "denied", Some(reason), None, by)
    }

    fn decide(
        &self,
        study: &str,
        status: &str,
        reason: Option<&str>,
        budget_rho: Option<f64>,
        by: &str,
    ) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_ms();
        tx.execute(
            "INSERT INTO studies (study, status, reason, budget_rho, first_seen_ms, decided_ms, decided_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)
             ON CONFLICT(study) DO UPDATE SET status = ?2, reason = ?3, budget_rho = ?4, decided_ms = ?5, decided_by = ?6",
            params![study, status, reason, budget_rho, now, by],
        )?;
        let note = match (reason, budget_rho) {
            (Some(r), _) => Some(r.to_string()),
            (None, Some(rho)) => Some(format!("budget set to rho = {rho}")),
            (None, None) => None,
        };
        let head = append(
            &tx,
            &AuditEntry {
                study: Some(study.to_string()),
                actor: Some(by.to_string()),
                kind: "study".into(),
                decision: status.into(),
                reason: note,
                ..Default::default()
            },
        )?;
        tx.commit()?;
        self.write_head(head);
        Ok(())
    }

    /// Spent by a study (and optionally one researcher), in rho.
    pub fn spent(&self, study: &str, researcher: Option<&str>) -> Result<f64> {
        let conn = self.conn()?;
        spent_in(&conn, study, researcher)
    }

    /// Every study known here, with its spending.
    pub fn studies(&self) -> Result<Vec<StudyRow>> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT s.study, s.status, s.reason, s.budget_rho,
                    COALESCE((SELECT SUM(rho) FROM releases r WHERE r.study = s.study), 0),
                    (SELECT COUNT(*) FROM releases r WHERE r.study = s.study), s.description
             FROM studies s
             UNION ALL
             SELECT r.study, 'approved', NULL, NULL, SUM(r.rho), COUNT(*), NULL FROM releases r
             WHERE r.study NOT IN (SELECT study FROM studies) GROUP BY r.study
             ORDER BY 1",
        )?;
        let rows = stmt.query_map([], |row| {
            Ok(StudyRow {
                study: row.get(0)?,
                status: row.get(1)?,
                reason: row.get(2)?,
                budget_rho: row.get(3)?,
                spent_rho: row.get(4)?,
                releases: row.get::<_, i64>(5)? as u64,
                description: row.get(6)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Audit records, oldest first.
    pub fn audit_records(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT seq, at_ms, task_id, study, actor, kind, decision, reason, rho, epsilon, delta,
                    result_hash, prev_hash, hash
             FROM audit
             WHERE (?1 IS NULL OR study = ?1) AND (?2 IS NULL OR at_ms >= ?2)
             ORDER BY seq",
        )?;
        let rows = stmt.query_map(params![filter.study, filter.since_ms], record_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Recomputes the chain and names the first record that was edited,
    /// deleted or moved; checks that every release has its audit record.
    pub fn verify(&self) -> Result<Verification> {
        let records = self.audit_records(&AuditFilter::default())?;
        let mut prev = GENESIS.to_string();
        for (i, r) in records.iter().enumerate() {
            let expected_seq = i as i64 + 1;
            if r.seq != expected_seq {
                return Ok(Verification {
                    records: i,
                    problem: Some(format!(
                        "record {expected_seq} is missing (the next record present is {}): records were deleted",
                        r.seq
                    )),
                });
            }
            if r.prev_hash != prev {
                return Ok(Verification {
                    records: i,
                    problem: Some(format!(
                        "record {} does not follow record {}: records were deleted, inserted or reordered",
                        r.seq,
                        r.seq - 1
                    )),
                });
            }
            if chain_hash(r) != r.hash {
                return Ok(Verification {
                    records: i,
                    problem: Some(format!(
                        "record {} was edited: its contents do not match its hash",
                        r.seq
                    )),
                });
            }
            prev = r.hash.clone();
        }
        if let Some((seq, hash)) = std::fs::read_to_string(&self.head_path).ok().and_then(|t| {
            let mut it = t.split_whitespace();
            Some((it.next()?.parse::<i64>().ok()?, it.next()?.to_string()))
        }) {
            match records.get((seq - 1).max(0) as usize) {
                None => {
                    return Ok(Verification {
                        records: records.len(),
                        problem: Some(format!(
                            "the log ends at record {} but audit.head records {seq}: records at the end were deleted",
                            records.len()
                        )),
                    });
                }
                Some(r) if r.hash != hash => {
                    return Ok(Verification {
                        records: records.len(),
                        problem: Some(format!(
                            "record {seq} differs from the hash kept in audit.head"
                        )),
                    });
                }
                Some(_) => {}
            }
        }
        let conn = self.conn()?;
        let missing: Option<String> = conn
            .query_row(
                "SELECT r.task_id FROM releases r WHERE NOT EXISTS
                   (SELECT 1 FROM audit a WHERE a.task_id = r.task_id
                    AND a.decision IN ('released', 'charged', 'failed')
                    AND a.result_hash = r.result_hash)
                 LIMIT 1",
                [],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(task) = missing {
            return Ok(Verification {
                records: records.len(),
                problem: Some(format!(
                    "the release of task {task} has no matching audit record"
                )),
            });
        }
        // And the reverse: every charge the audit log records is in the
        // releases, for the same study and researcher, at no less than the
        // log says (budgets read the releases: a deleted or cheapened debit
        // would refund budget).
        let refunded: Option<(String, f64)> = conn
            .query_row(
                "SELECT a.task_id, a.rho FROM audit a
                 WHERE a.task_id IS NOT NULL AND a.decision IN ('charged', 'released', 'failed')
                   AND (a.rho > 0 OR a.delta > 0)
                   AND NOT EXISTS (SELECT 1 FROM releases r WHERE r.task_id = a.task_id
                       AND r.study = a.study AND r.researcher = a.actor
                       AND r.rho >= a.rho * (1.0 - 1e-12) AND r.delta >= a.delta * (1.0 - 1e-12))
                 ORDER BY a.seq LIMIT 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        if let Some((task, rho)) = refunded {
            return Ok(Verification {
                records: records.len(),
                problem: Some(format!(
                    "the audit log charges task {task} rho {rho} but the releases do not hold that \
                     debit (deleted, moved to another study or researcher, or made cheaper): budget \
                     would be refunded"
                )),
            });
        }
        Ok(Verification {
            records: records.len(),
            problem: None,
        })
    }
}

fn record_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRecord> {
    Ok(AuditRecord {
        seq: row.get(0)?,
        at_ms: row.get(1)?,
        task_id: row.get(2)?,
        study: row.get(3)?,
        actor: row.get(4)?,
        kind: row.get(5)?,
        decision: row.get(6)?,
        reason: row.get(7)?,
        rho: row.get(8)?,
        epsilon: row.get(9)?,
        delta: row.get(10)?,
        result_hash: row.get(11)?,
        prev_hash: row.get(12)?,
        hash: row.get(13)?,
    })
}

/// The hash of a record: SHA-256 over its fields (all but `hash`) in a fixed order.
fn chain_hash(r: &AuditRecord) -> String {
    let canonical = serde_json::json!([
        r.seq,
        r.at_ms,
        r.task_id,
        r.study,
        r.actor,
        r.kind,
        r.decision,
        r.reason,
        r.rho.to_bits(),
        r.epsilon.to_bits(),
        r.delta.to_bits(),
        r.result_hash,
        r.prev_hash,
    ]);
    sha256_hex(canonical.to_string().as_bytes())
}

fn append(tx: &Transaction<'_>, entry: &AuditEntry) -> Result<(i64, String)> {
    let last: Option<(i64, String)> = tx
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
    let (seq, prev_hash) = match last {
        Some((seq, hash)) => (seq + 1, hash),
        None => (1, GENESIS.to_string()),
    };
    let cost = entry.cost.unwrap_or(Cost {
        rho: 0.0,
        epsilon: 0.0,
        delta: 0.0,
        selection_delta: 0.0,
    });
    let mut record = AuditRecord {
        seq,
        at_ms: now_ms(),
        task_id: entry.task_id.map(|t| t.to_string()),
        study: entry.study.clone(),
        actor: entry.actor.clone(),
        kind: entry.kind.clone(),
        decision: entry.decision.clone(),
        reason: entry.reason.clone(),
        rho: cost.rho,
        epsilon: cost.epsilon,
        delta: cost.delta,
        result_hash: entry.result_hash.clone(),
        prev_hash,
        hash: String::new(),
    };
    record.hash = chain_hash(&record);
    tx.execute(
        "INSERT INTO audit (seq, at_ms, task_id, study, actor, kind, decision, reason, rho, epsilon, delta,
                            result_hash, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        params![
            record.seq,
            record.at_ms,
            record.task_id,
            record.study,
            record.actor,
            record.kind,
            record.decision,
            record.reason,
            record.rho,
            record.epsilon,
            record.delta,
            record.result_hash,
            record.prev_hash,
            record.hash,
        ],
    )?;
    Ok((record.seq, record.hash))
}

fn refusal_entry(charge: &Charge, why: &str) -> AuditEntry {
    AuditEntry {
        task_id: Some(charge.task_id),
        study: Some(charge.study.clone()),
        actor: Some(charge.researcher.clone()),
        kind: charge.kind.clone(),
        decision: "refused".into(),
        reason: Some(why.to_string()),
        cost: None,
        result_hash: None,
    }
}

fn status_in(conn: &Connection, study: &str) -> Result<StudyStatus> {
    let row: Option<(String, Option<String>, Option<f64>)> = conn
        .query_row(
            "SELECT status, reason, budget_rho FROM studies WHERE study = ?1",
            params![study],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .optional()?;
    Ok(match row {
        None => StudyStatus::Unknown,
        Some((s, _, _)) if s == "pending" => StudyStatus::Pending,
        Some((s, _, budget_rho)) if s == "approved" => StudyStatus::Approved { budget_rho },
        Some((_, reason, _)) => StudyStatus::Denied {
            reason: reason.unwrap_or_else(|| "no reason given".into()),
        },
    })
}

fn spent_in(conn: &Connection, study: &str, researcher: Option<&str>) -> Result<f64> {
    let spent: Option<f64> = conn.query_row(
        "SELECT SUM(rho) FROM releases WHERE study = ?1 AND (?2 IS NULL OR researcher = ?2)",
        params![study, researcher],
        |row| row.get(0),
    )?;
    Ok(spent.unwrap_or(0.0))
}

fn spent_total_in(conn: &Connection, researcher: Option<&str>) -> Result<f64> {
    let spent: Option<f64> = conn.query_row(
        "SELECT SUM(rho) FROM releases WHERE ?1 IS NULL OR researcher = ?1",
        params![researcher],
        |row| row.get(0),
    )?;
    Ok(spent.unwrap_or(0.0))
}

/// Why `charge` would exceed a budget, beside what is spent and what
/// other tasks hold on lease (`reserved`), if it would.
fn budget_refusal(
    conn: &Connection,
    charge: &Charge,
    reserved: &Reserved,
) -> Result<Option<String>> {
    if charge.cost.selection_delta > 0.0 {
        let spent: f64 = conn.query_row(
            "SELECT COALESCE(SUM(selection_delta), 0) FROM releases WHERE study = ?1",
            params![charge.study],
            |row| row.get(0),
        )?;
        let spent = spent + reserved.study_delta;
        if exceeds(
            spent,
            charge.cost.selection_delta,
            charge.study_delta_budget,
        ) {
            return Ok(Some(format!(
                "delta budget exhausted for study {}: this query's partition selection needs delta {:e} but only \
                 {:e} of the study's delta {:e} remains; {spent:e} is spent or held by queries about to run. Group by columns with a public \
                 domain (they need no delta), lower delta, or ask the data steward to raise the study's delta budget",
                charge.study,
                charge.cost.selection_delta,
                (charge.study_delta_budget - spent).max(0.0),
                charge.study_delta_budget,
            )));
        }
    }
    let spent = spent_in(conn, &charge.study, None)? + reserved.study_rho;
    if exceeds(spent, charge.cost.rho, charge.study_budget) {
        return Ok(Some(budget_message(
            "study",
            &charge.study,
            (spent, reserved.study_rho),
            charge,
            charge.study_budget,
        )));
    }
    if let Some(limit) = charge.node_budget {
        let all = spent_total_in(conn, None)? + reserved.node_total;
        if exceeds(all, charge.cost.rho, limit) {
            return Ok(Some(budget_message(
                "node",
                "(all studies at this node together)",
                (all, reserved.node_total),
                charge,
                limit,
            )));
        }
    }
    if let Some(limit) = charge.researcher_total_budget {
        let by = spent_total_in(conn, Some(&charge.researcher))? + reserved.researcher_total;
        if exceeds(by, charge.cost.rho, limit) {
            return Ok(Some(budget_message(
                "researcher",
                &format!("{} (all studies at this node together)", charge.researcher),
                (by, reserved.researcher_total),
                charge,
                limit,
            )));
        }
    }
    if let Some(limit) = charge.researcher_budget {
        let by =
            spent_in(conn, &charge.study, Some(&charge.researcher))? + reserved.researcher_in_study;
        if exceeds(by, charge.cost.rho, limit) {
            return Ok(Some(budget_message(
                "researcher",
                &format!("{} in study {}", charge.researcher, charge.study),
                (by, reserved.researcher_in_study),
                charge,
                limit,
            )));
        }
    }
    Ok(None)
}

fn exceeds(spent: f64, cost: f64, budget: f64) -> bool {
    spent + cost > budget * (1.0 + BUDGET_TOLERANCE)
}

fn budget_message(
    what: &str,
    name: &str,
    (spent, held): (f64, f64),
    charge: &Charge,
    budget: f64,
) -> String {
    let remaining = (budget - spent).max(0.0);
    let task = if charge.kind.starts_with("train") {
        "training job"
    } else {
        "query"
    };
    let eps = |rho: f64| {
        if charge.cost.delta > 0.0 {
            confer_privacy::accounting::epsilon_for_rho(rho, charge.cost.delta)
                .map(|e| format!("{e:.4}"))
                .unwrap_or_else(|_| "?".into())
        } else {
            format!("{:.4}", (2.0 * rho).sqrt())
        }
    };
    format!(
        "budget exhausted for {what} {name}: this {task} needs rho {:.6} (epsilon {:.4}, delta {:e}) but only \
         rho {remaining:.6} (epsilon {} at that delta) of rho {budget:.6} (epsilon {}) remains; {spent:.6} is spent{}. \
         Ask for less (lower epsilon) or for a larger budget",
        charge.cost.rho,
        charge.cost.epsilon,
        charge.cost.delta,
        eps(remaining),
        eps(budget),
        if held > 0.0 {
            format!(" or held by queries that passed their check and are about to run ({held:.6})")
        } else {
            String::new()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(id: Uuid, rho: f64, budget: f64) -> Charge {
        Charge {
            task_id: id,
            payload_hash: "p".into(),
            study: "s".into(),
            researcher: "r".into(),
            kind: "query".into(),
            cost: Cost {
                rho,
                epsilon: 1.0,
                delta: 1e-6,
                selection_delta: 0.0,
            },
            study_budget: budget,
            researcher_budget: None,
            study_delta_budget: 0.0,
            ..Default::default()
        }
    }

    #[test]
    fn a_task_is_charged_once_and_retries_get_the_stored_result() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path()).expect("open");
        let id = Uuid::new_v4();
        assert_eq!(
            ledger
                .release(&charge(id, 0.5, 1.0), b"first".to_vec())
                .expect("db"),
            Ok(b"first".to_vec())
        );
        assert_eq!(
            ledger
                .release(&charge(id, 0.5, 1.0), b"second".to_vec())
                .expect("db"),
            Ok(b"first".to_vec())
        );
        assert_eq!(ledger.spent("s", None).expect("spent"), 0.5);
        let mut replay = charge(id, 0.5, 1.0);
        replay.payload_hash = "other".into();
        assert!(matches!(
            ledger.release(&replay, vec![]).expect("db"),
            Err(Refusal::Replay(_))
        ));
    }

    #[test]
    fn tasks_are_charged_before_they_run_and_failures_raise_the_charge() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path()).expect("open");
        let mut c = charge(Uuid::new_v4(), 0.1, 10.0);
        c.failure_rho = 0.5;
        assert_eq!(ledger.begin(&c).expect("db"), Ok(Begun::Charged));
        assert_eq!(ledger.spent("s", None).expect("spent"), 0.1);
        let stored = ledger.stored(c.task_id).expect("db").expect("on record");
        assert_eq!(stored.state, TaskState::Running);
        // A second begin is the same task: it finds it running.
        assert!(matches!(
            ledger.begin(&c).expect("db"),
            Ok(Begun::Existing(Stored {
                state: TaskState::Running,
                ..
            }))
        ));
        ledger.fail(&c, "time limit").expect("fail");
        assert_eq!(
            ledger.spent("s", None).expect("spent"),
            0.5,
            "raised to the floor"
        );
        let stored = ledger.stored(c.task_id).expect("db").expect("on record");
        assert_eq!(stored.state, TaskState::Failed);
        assert_eq!(ledger.failures_since_lift("r").expect("count"), 1);

        // A released task keeps its cost.
        let ok = charge(Uuid::new_v4(), 0.2, 10.0);
        ledger.begin(&ok).expect("db").expect("charged");
        assert_eq!(
            ledger.finish(&ok, b"bytes".to_vec()).expect("finish"),
            b"bytes"
        );
        let stored = ledger.stored(ok.task_id).expect("db").expect("on record");
        assert_eq!(
            (stored.state, stored.result),
            (TaskState::Released, b"bytes".to_vec())
        );
        assert!((ledger.spent("s", None).expect("spent") - 0.7).abs() < 1e-12);
        assert!(ledger.verify().expect("verify").problem.is_none());
    }

    #[test]
    fn a_restart_turns_running_tasks_into_charged_failures() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = Uuid::new_v4();
        {
            let ledger = Ledger::open(dir.path()).expect("open");
            let mut c = charge(id, 0.1, 10.0);
            c.failure_rho = 0.3;
            ledger.begin(&c).expect("db").expect("charged");
        }
        let ledger = Ledger::open(dir.path()).expect("reopen");
        let stored = ledger.stored(id).expect("db").expect("on record");
        assert_eq!(stored.state, TaskState::Failed);
        assert_eq!(ledger.spent("s", None).expect("spent"), 0.3);
        assert!(ledger.verify().expect("verify").problem.is_none());
    }

    #[test]
    fn the_failure_quota_holds_until_the_steward_lifts_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path()).expect("open");
        let quota = |id| {
            let mut c = charge(id, 0.01, 10.0);
            c.failure_quota = Some(2);
            c
        };
        // No failures: concurrent tasks are not limited by the quota.
        for _ in 0..3 {
            ledger
                .begin(&quota(Uuid::new_v4()))
                .expect("db")
                .expect("charged");
        }
        let failing = quota(Uuid::new_v4());
        ledger.begin(&failing).expect("db").expect("charged");
        ledger.fail(&failing, "x").expect("fail");
        // One failure and three running reach the quota of 2.
        assert!(matches!(
            ledger.begin(&quota(Uuid::new_v4())).expect("db"),
            Err(Refusal::Quota(_))
        ));
        assert_eq!(ledger.lift("r", "steward", "reviewed").expect("lift"), 1);
        assert_eq!(ledger.failures_since_lift("r").expect("count"), 0);
        ledger
            .begin(&quota(Uuid::new_v4()))
            .expect("db")
            .expect("lifted");
    }

    #[test]
    fn node_and_researcher_totals_cap_every_study() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path()).expect("open");
        let in_study = |study: &str, researcher: &str| {
            let mut c = charge(Uuid::new_v4(), 0.4, 1.0);
            c.study = study.into();
            c.researcher = researcher.into();
            c.node_budget = Some(1.0);
            c.researcher_total_budget = Some(0.5);
            c
        };
        ledger
            .begin(&in_study("a", "r"))
            .expect("db")
            .expect("fits");
        let err = ledger
            .begin(&in_study("b", "r"))
            .expect("db")
            .expect_err("researcher total");
        assert!(
            matches!(&err, Refusal::Budget(m) if m.contains("all studies")),
            "{err:?}"
        );
        ledger
            .begin(&in_study("b", "q"))
            .expect("db")
            .expect("another researcher");
        let err = ledger
            .begin(&in_study("c", "z"))
            .expect("db")
            .expect_err("node total");
        assert!(
            matches!(&err, Refusal::Budget(m) if m.contains("budget exhausted for node")),
            "{err:?}"
        );
        assert!((ledger.spent_total().expect("total") - 0.8).abs() < 1e-12);
        assert!((ledger.spent_by_researcher("r").expect("r") - 0.4).abs() < 1e-12);
    }

    #[test]
    fn selection_delta_is_summed_and_capped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path()).expect("open");
        let with_delta = |delta: f64| {
            let mut c = charge(Uuid::new_v4(), 0.01, 1.0);
            c.cost.selection_delta = delta;
            c.study_delta_budget = 1e-6;
            c
        };
        // Queries without partition selection do not touch the delta cap.
        for _ in 0..5 {
            assert!(
                ledger
                    .release(&with_delta(0.0), vec![1])
                    .expect("db")
                    .is_ok()
            );
        }
        for _ in 0..2 {
            assert!(
                ledger
                    .release(&with_delta(5e-7), vec![1])
                    .expect("db")
                    .is_ok()
            );
        }
        match ledger.release(&with_delta(5e-7), vec![1]).expect("db") {
            Err(Refusal::Budget(msg)) => {
                assert!(msg.contains("delta budget exhausted for study s"), "{msg}");
                assert!(msg.contains("public"), "{msg}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // Reopening keeps the column (and old ledgers gain it).
        drop(ledger);
        let ledger = Ledger::open(dir.path()).expect("reopen");
        assert!(matches!(
            ledger.release(&with_delta(1e-9), vec![1]).expect("db"),
            Err(Refusal::Budget(_))
        ));
    }

    #[test]
    fn leases_hold_budget_until_run_released_or_expired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path()).expect("open");
        let later = now_ms() + 60_000;
        let reserve =
            |id: Uuid, until: i64| ledger.reserve(&charge(id, 0.4, 1.0), until).expect("db");
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        // Two of three queries of 0.4 fit a budget of 1.0.
        assert_eq!(reserve(a, later), None);
        assert_eq!(reserve(b, later), None);
        let why = reserve(c, later).expect("the third does not fit beside two leases");
        assert!(why.contains("held by queries"), "{why}");
        // A lease renewed for the same task does not count twice.
        assert_eq!(reserve(a, later), None);
        // The holders run; an unchecked charge cannot take their room.
        assert!(matches!(
            ledger.begin(&charge(c, 0.4, 1.0)).expect("db"),
            Err(Refusal::Budget(_))
        ));
        assert!(matches!(
            ledger.begin(&charge(a, 0.4, 1.0)).expect("db"),
            Ok(Begun::Charged)
        ));
        assert!(
            !ledger.release_lease(a, later).expect("db"),
            "the lease became a charge"
        );
        // A check of a task already charged (a retry) holds nothing more.
        assert_eq!(reserve(a, later), None);
        assert_eq!(ledger.leased_total().expect("db"), 0.4, "b only");
        // b is released (refused elsewhere): its room is free again, and a
        // check of b that arrives late holds nothing.
        assert!(ledger.release_lease(b, later).expect("db"));
        assert_eq!(reserve(b, later), None);
        assert_eq!(ledger.leased_total().expect("db"), 0.0);
        assert_eq!(reserve(c, later), None);
        // An expired lease holds nothing.
        let d = Uuid::new_v4();
        assert!(reserve(d, later).is_some(), "a charged and c held: no room");
        ledger.release_lease(c, later).expect("db");
        assert_eq!(reserve(d, now_ms() - 1), None);
        assert_eq!(ledger.leased_total().expect("db"), 0.0);
        let e = Uuid::new_v4();
        assert_eq!(reserve(e, later), None);
        assert!((ledger.leased_total().expect("db") - 0.4).abs() < 1e-12);
        assert_eq!(ledger.spent("s", None).expect("spent"), 0.4);
    }

    #[test]
    fn budgets_are_enforced_with_figures() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path()).expect("open");
        for _ in 0..4 {
            assert!(
                ledger
                    .release(&charge(Uuid::new_v4(), 0.25, 1.0), vec![1])
                    .expect("db")
                    .is_ok()
            );
        }
        match ledger
            .release(&charge(Uuid::new_v4(), 0.25, 1.0), vec![1])
            .expect("db")
        {
            Err(Refusal::Budget(msg)) => {
                assert!(msg.contains("budget exhausted for study s"), "{msg}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(ledger.spent("s", None).expect("spent"), 1.0);
    }

    #[test]
    fn the_audit_chain_detects_edits_deletions_and_truncation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path()).expect("open");
        for _ in 0..5 {
            ledger
                .release(&charge(Uuid::new_v4(), 0.1, 10.0), vec![7])
                .expect("db")
                .expect("released");
        }
        ledger
            .deny("other", "no ethics approval", "steward")
            .expect("deny");
        assert_eq!(ledger.verify().expect("verify").problem, None);
        let conn = Connection::open(ledger.path()).expect("open raw");

        conn.execute("UPDATE audit SET rho = 0.0 WHERE seq = 3", [])
            .expect("edit");
        let problem = ledger.verify().expect("verify").problem.expect("detected");
        assert!(problem.contains("record 3 was edited"), "{problem}");
        conn.execute("UPDATE audit SET rho = 0.1 WHERE seq = 3", [])
            .expect("restore");
        assert_eq!(ledger.verify().expect("verify").problem, None);

        conn.execute("DELETE FROM audit WHERE seq = 2", [])
            .expect("delete");
        let problem = ledger.verify().expect("verify").problem.expect("detected");
        assert!(problem.contains("record 2 is missing"), "{problem}");
    }

    #[test]
    fn debits_deleted_or_cheapened_are_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path()).expect("open");
        let tasks: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        for t in &tasks {
            ledger
                .release(&charge(*t, 0.1, 10.0), vec![7])
                .expect("db")
                .expect("released");
        }
        assert_eq!(ledger.verify().expect("verify").problem, None);
        let conn = Connection::open(ledger.path()).expect("open raw");
        let id = tasks[1].to_string();
        for (tamper, undo) in [
            (
                "UPDATE releases SET rho = 0 WHERE task_id = ?1",
                "UPDATE releases SET rho = 0.1 WHERE task_id = ?1",
            ),
            (
                "UPDATE releases SET study = 'other' WHERE task_id = ?1",
                "UPDATE releases SET study = 's' WHERE task_id = ?1",
            ),
        ] {
            conn.execute(tamper, [&id]).expect("tamper");
            let problem = ledger.verify().expect("verify").problem.expect("detected");
            assert!(
                problem.contains(&id) && problem.contains("refunded"),
                "{problem}"
            );
            conn.execute(undo, [&id]).expect("undo");
            assert_eq!(ledger.verify().expect("verify").problem, None);
        }
        conn.execute("DELETE FROM releases WHERE task_id = ?1", [&id])
            .expect("delete");
        let problem = ledger.verify().expect("verify").problem.expect("detected");
        assert!(problem.contains(&id), "{problem}");
    }

    #[test]
    fn swapping_audit_records_is_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path()).expect("open");
        for _ in 0..4 {
            ledger
                .release(&charge(Uuid::new_v4(), 0.1, 10.0), vec![7])
                .expect("db")
                .expect("released");
        }
        assert_eq!(ledger.verify().expect("verify").problem, None);
        let conn = Connection::open(ledger.path()).expect("open raw");
        // Swap records 2 and 3 whole (each keeps its own valid hash).
        conn.execute_batch(
            "UPDATE audit SET seq = -2 WHERE seq = 2;
             UPDATE audit SET seq = 2 WHERE seq = 3;
             UPDATE audit SET seq = 3 WHERE seq = -2;",
        )
        .expect("swap");
        let problem = ledger.verify().expect("verify").problem.expect("detected");
        assert!(
            problem.contains("record 2 does not follow record 1"),
            "{problem}"
        );
    }

    #[test]
    fn researcher_budgets_cap_each_researcher_within_the_study() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path()).expect("open");
        let by = |researcher: &str| {
            let mut c = charge(Uuid::new_v4(), 0.3, 10.0);
            c.researcher = researcher.into();
            c.researcher_budget = Some(0.5);
            c
        };
        assert!(ledger.release(&by("ann"), vec![1]).expect("db").is_ok());
        match ledger.release(&by("ann"), vec![1]).expect("db") {
            Err(Refusal::Budget(msg)) => {
                assert!(msg.contains("researcher ann in study s"), "{msg}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // Another researcher of the same study still has their own budget.
        assert!(ledger.release(&by("ben"), vec![1]).expect("db").is_ok());
        assert!((ledger.spent("s", Some("ann")).expect("spent") - 0.3).abs() < 1e-12);
        assert!((ledger.spent("s", None).expect("spent") - 0.6).abs() < 1e-12);
    }

    #[test]
    fn deleting_the_newest_records_is_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path()).expect("open");
        for _ in 0..3 {
            ledger
                .release(&charge(Uuid::new_v4(), 0.1, 10.0), vec![7])
                .expect("db")
                .expect("released");
        }
        let conn = Connection::open(ledger.path()).expect("open raw");
        conn.execute(
            "DELETE FROM releases WHERE task_id IN (SELECT task_id FROM audit WHERE seq = 3)",
            [],
        )
        .expect("delete release");
        conn.execute("DELETE FROM audit WHERE seq = 3", [])
            .expect("delete");
        let problem = ledger.verify().expect("verify").problem.expect("detected");
        assert!(
            problem.contains("records at the end were deleted"),
            "{problem}"
        );
    }

    #[test]
    fn studies_move_through_approval() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path()).expect("open");
        assert_eq!(
            ledger.study_status("s").expect("status"),
            StudyStatus::Unknown
        );
        assert_eq!(
            ledger
                .register_study("s", false, "policy", Some("\"S\" (PI p)"))
                .expect("register"),
            StudyStatus::Pending
        );
        let listed = ledger.studies().expect("studies");
        assert_eq!(listed[0].description.as_deref(), Some("\"S\" (PI p)"));
        ledger.approve("s", Some(0.5), "steward").expect("approve");
        assert_eq!(
            ledger.study_status("s").expect("status"),
            StudyStatus::Approved {
                budget_rho: Some(0.5)
            }
        );
        ledger.deny("s", "withdrawn", "steward").expect("deny");
        assert_eq!(
            ledger.study_status("s").expect("status"),
            StudyStatus::Denied {
                reason: "withdrawn".into()
            }
        );
        assert_eq!(ledger.verify().expect("verify").problem, None);
    }
}
