//! A task's life in the ledger: charged durably before it runs, its
//! result stored before it is sent, a failure charged at least the node's
//! floor, and a researcher's charged failures counted until the steward
//! lifts them.

use super::*;

impl Ledger {
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
                result_hash: Some(result_hash),
                ..charge.audit_entry("released")
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
                reason: Some(format!(
                    "charged before running: rho {:.6} (at least {:.6} if it fails)",
                    charge.cost.rho,
                    charge.failure_charge()
                )),
                result_hash: Some(marker_hash),
                ..charge.audit_entry("charged")
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
                result_hash: Some(result_hash),
                ..charge.audit_entry("released")
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
                reason: Some(reason.to_string()),
                cost: Some(cost),
                result_hash: Some(failed_hash),
                ..charge.audit_entry("failed")
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
}
