//! The audit log: append-only records, each holding the SHA-256 of the one
//! before, the head written beside the database, and the verification
//! that finds edits, deletions, swaps and cut-back ends.

use super::*;

/// Hash that precedes the first audit record.
pub(super) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

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

impl Ledger {
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

    pub(super) fn write_head(&self, (seq, hash): (i64, String)) {
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

pub(super) fn record_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRecord> {
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
pub(super) fn chain_hash(r: &AuditRecord) -> String {
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

pub(super) fn append(tx: &Transaction<'_>, entry: &AuditEntry) -> Result<(i64, String)> {
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
