//! The privacy ledger: every release, its cost, and the released bytes,
//! durably on disk before anything leaves the node.
//!
//! SQLite in WAL mode with `synchronous = FULL`: a committed transaction
//! survives a crash or power loss. A release is recorded in one transaction
//! (debit and result together), and only after the commit returns does the
//! node send the result. A task id is the primary key, so a retried task is
//! answered with the stored result and is never charged twice.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::{NodeError, Result};

/// One debit.
#[derive(Debug, Clone, PartialEq)]
pub struct Debit {
    /// The task that spent.
    pub task_id: Uuid,
    /// The study charged.
    pub study: String,
    /// The researcher who asked.
    pub researcher: String,
    /// zCDP rho charged.
    pub rho: f64,
    /// Epsilon reported for the release.
    pub epsilon: f64,
    /// Delta reported for the release.
    pub delta: f64,
}

/// What a study has spent at this node.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Spent {
    /// Total zCDP rho.
    pub rho: f64,
    /// Number of releases.
    pub releases: u64,
}

/// The ledger database.
pub struct Ledger {
    conn: Mutex<Connection>,
    path: PathBuf,
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
                 task_id     TEXT PRIMARY KEY,
                 study       TEXT NOT NULL,
                 researcher  TEXT NOT NULL,
                 rho         REAL NOT NULL,
                 epsilon     REAL NOT NULL,
                 delta       REAL NOT NULL,
                 created_at  INTEGER NOT NULL,
                 result_hash TEXT NOT NULL,
                 result      BLOB NOT NULL
             );
             CREATE INDEX IF NOT EXISTS releases_study ON releases(study);",
        )?;
        Ok(Self {
            conn: Mutex::new(conn),
            path,
        })
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.conn
            .lock()
            .map_err(|_| NodeError::Ledger("ledger lock poisoned by an earlier panic".into()))
    }

    /// The stored result of a task already released, if any.
    pub fn stored_result(&self, task_id: Uuid) -> Result<Option<Vec<u8>>> {
        let conn = self.conn()?;
        Ok(conn
            .query_row(
                "SELECT result FROM releases WHERE task_id = ?1",
                params![task_id.to_string()],
                |row| row.get(0),
            )
            .optional()?)
    }

    /// Records a debit with the bytes about to be released, durably. Returns
    /// the bytes to send: `result`, or the stored result if the same task
    /// was recorded first by a concurrent retry.
    pub fn record(&self, debit: &Debit, result: Vec<u8>) -> Result<Vec<u8>> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let existing: Option<Vec<u8>> = tx
            .query_row(
                "SELECT result FROM releases WHERE task_id = ?1",
                params![debit.task_id.to_string()],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(stored) = existing {
            return Ok(stored);
        }
        let hash = hex::encode(Sha256::digest(&result));
        tx.execute(
            "INSERT INTO releases (task_id, study, researcher, rho, epsilon, delta, created_at, result_hash, result)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                debit.task_id.to_string(),
                debit.study,
                debit.researcher,
                debit.rho,
                debit.epsilon,
                debit.delta,
                confer_protocol::task::unix_now() as i64,
                hash,
                result,
            ],
        )?;
        tx.commit()?;
        Ok(result)
    }

    /// What `study` has spent here.
    pub fn spent(&self, study: &str) -> Result<Spent> {
        let conn = self.conn()?;
        let (rho, releases): (Option<f64>, i64) = conn.query_row(
            "SELECT SUM(rho), COUNT(*) FROM releases WHERE study = ?1",
            params![study],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        Ok(Spent {
            rho: rho.unwrap_or(0.0),
            releases: releases as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debit(id: Uuid, rho: f64) -> Debit {
        Debit {
            task_id: id,
            study: "s".into(),
            researcher: "r".into(),
            rho,
            epsilon: 1.0,
            delta: 1e-6,
        }
    }

    #[test]
    fn a_task_is_charged_once_and_answered_with_its_stored_result() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path()).expect("open");
        let id = Uuid::new_v4();
        assert_eq!(
            ledger
                .record(&debit(id, 0.5), b"first".to_vec())
                .expect("record"),
            b"first"
        );
        assert_eq!(
            ledger
                .record(&debit(id, 0.5), b"second".to_vec())
                .expect("retry"),
            b"first"
        );
        assert_eq!(
            ledger.spent("s").expect("spent"),
            Spent {
                rho: 0.5,
                releases: 1
            }
        );
        assert_eq!(
            ledger.stored_result(id).expect("stored"),
            Some(b"first".to_vec())
        );
    }

    #[test]
    fn debits_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let ledger = Ledger::open(dir.path()).expect("open");
            ledger
                .record(&debit(Uuid::new_v4(), 0.25), vec![1])
                .expect("record");
            ledger
                .record(&debit(Uuid::new_v4(), 0.25), vec![2])
                .expect("record");
        }
        let ledger = Ledger::open(dir.path()).expect("reopen");
        assert_eq!(ledger.spent("s").expect("spent").rho, 0.5);
    }
}
