//! Study approvals: registered when a study's first task arrives, then
//! approved (with an optional budget) or denied by the steward.

use super::*;

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

impl Ledger {
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
}

pub(super) fn status_in(conn: &Connection, study: &str) -> Result<StudyStatus> {
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
