//! [`SqliteStore`]: the [`Store`] in one SQLite file (WAL).

use super::*;

pub(super) fn user_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
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
pub(super) fn audit_from_row(
    row: &rusqlite::Row<'_>,
    at: usize,
) -> rusqlite::Result<CoordinatorAudit> {
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
pub(super) fn audit_hash(seq: i64, e: &CoordinatorAudit, prev: &str) -> String {
    let canonical = serde_json::json!([
        seq, e.at_ms, e.user, e.study, e.action, e.outcome, e.detail, prev
    ]);
    sha256_hex(canonical.to_string().as_bytes())
}

/// The newest record's sequence number and hash (0 and the genesis hash
/// for an empty log).
pub(super) fn last_link(conn: &Connection) -> Result<(i64, String)> {
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
/// Runs inside the upgrade's transaction (`confer_store`).
pub(super) fn chain_legacy_audit(conn: &Connection) -> rusqlite::Result<()> {
    let has_hash = conn.prepare("SELECT hash FROM audit LIMIT 0").is_ok();
    if has_hash {
        return Ok(());
    }
    conn.execute_batch(
        "ALTER TABLE audit ADD COLUMN prev_hash TEXT;
         ALTER TABLE audit ADD COLUMN hash TEXT;",
    )?;
    let rows: Vec<(i64, CoordinatorAudit)> = {
        let mut stmt = conn.prepare(
            "SELECT seq, at_ms, user, study, action, outcome, detail FROM audit ORDER BY seq",
        )?;
        stmt.query_map([], |r| Ok((r.get(0)?, audit_from_row(r, 1)?)))?
            .collect::<rusqlite::Result<_>>()?
    };
    let mut prev = AUDIT_GENESIS.to_string();
    for (i, (old_seq, entry)) in rows.iter().enumerate() {
        let seq = i as i64 + 1;
        let hash = audit_hash(seq, entry, &prev);
        // Renumbered downwards in order, so no number is taken twice.
        conn.execute(
            "UPDATE audit SET seq = ?1, prev_hash = ?2, hash = ?3 WHERE seq = ?4",
            params![seq, prev, hash, old_seq],
        )?;
        prev = hash;
    }
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
            "INSERT OR REPLACE INTO results (query_id, study, user, statement_hash, sites, created_ms, result,
                                             statement, epsilon, delta, rho)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                r.query_id,
                r.study,
                r.user,
                r.statement_hash,
                r.sites.join(","),
                r.created_ms,
                r.result,
                r.statement,
                r.cost.map(|c| c.0),
                r.cost.map(|c| c.1),
                r.cost.map(|c| c.2)
            ],
        )
        .map_err(db)?;
        Ok(())
    }

    fn results(
        &self,
        user: Option<&str>,
        study: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ResultRecord>> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare(
                "SELECT query_id, study, user, statement_hash, sites, created_ms, result,
                        statement, epsilon, delta, rho
                 FROM results WHERE (?1 IS NULL OR user = ?1) AND (?2 IS NULL OR study = ?2)
                 ORDER BY created_ms DESC, query_id LIMIT ?3",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(params![user, study, limit as i64], |r| {
                let sites: String = r.get(4)?;
                let cost = match (
                    r.get::<_, Option<f64>>(8)?,
                    r.get::<_, Option<f64>>(9)?,
                    r.get::<_, Option<f64>>(10)?,
                ) {
                    (Some(e), Some(d), Some(rho)) => Some((e, d, rho)),
                    _ => None,
                };
                Ok(ResultRecord {
                    query_id: r.get(0)?,
                    study: r.get(1)?,
                    user: r.get(2)?,
                    statement_hash: r.get(3)?,
                    sites: sites
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect(),
                    created_ms: r.get(5)?,
                    result: r.get(6)?,
                    statement: r.get(7)?,
                    cost,
                })
            })
            .map_err(db)?;
        rows.collect::<std::result::Result<Vec<_>, _>>().map_err(db)
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

    fn save_supervision_partial(
        &self,
        period: &str,
        measure: &str,
        node: &str,
        body: &str,
    ) -> Result<()> {
        let conn = self.conn()?;
        conn.execute(
            "INSERT INTO supervision_partials (period, measure, node, at_ms, body) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(period, measure, node) DO NOTHING",
            params![period, measure, node, now_ms(), body],
        )
        .map_err(db)?;
        Ok(())
    }

    fn supervision_partials(&self, period: &str) -> Result<Vec<(String, String, String)>> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare("SELECT measure, node, body FROM supervision_partials WHERE period = ?1 ORDER BY measure, node")
            .map_err(db)?;
        let rows = stmt
            .query_map(params![period], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(db)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db)?;
        Ok(rows)
    }

    fn save_supervision_release(&self, period: &str, body: &str) -> Result<()> {
        let conn = self.conn()?;
        conn.execute(
            "INSERT INTO supervision_releases (period, at_ms, body) VALUES (?1, ?2, ?3)
             ON CONFLICT(period) DO UPDATE SET at_ms = excluded.at_ms, body = excluded.body",
            params![period, now_ms(), body],
        )
        .map_err(db)?;
        Ok(())
    }

    fn supervision_release(&self, period: &str) -> Result<Option<String>> {
        let conn = self.conn()?;
        conn.query_row(
            "SELECT body FROM supervision_releases WHERE period = ?1",
            params![period],
            |r| r.get(0),
        )
        .optional()
        .map_err(db)
    }

    fn supervision_releases(&self) -> Result<Vec<(String, String)>> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare("SELECT period, body FROM supervision_releases ORDER BY period")
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(db)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db)?;
        Ok(rows)
    }
}
