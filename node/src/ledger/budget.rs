//! Budgets: what is spent and held, leases taken at a query's check, and
//! refusals that say, with figures, which budget a charge would exceed.

use super::*;

/// One debit of the ledger (a task's charge).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Debit {
    /// When it was charged, ms since the epoch.
    pub at_ms: i64,
    /// The study that paid.
    pub study: String,
    /// The researcher who asked.
    pub researcher: String,
    /// The task's kind (query, train, ...).
    pub kind: String,
    /// zCDP rho charged.
    pub rho: f64,
    /// charged, released or failed.
    pub state: String,
}

impl Ledger {
    /// Spent at this node over all studies, in rho.
    pub fn spent_total(&self) -> Result<f64> {
        let conn = self.conn()?;
        spent_total_in(&conn, None)
    }

    /// Every debit, oldest first. Their sum is [`Ledger::spent_total`].
    pub fn debits(&self) -> Result<Vec<Debit>> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT created_ms, study, researcher, kind, rho, state FROM releases ORDER BY created_ms, task_id",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Debit {
                    at_ms: r.get(0)?,
                    study: r.get(1)?,
                    researcher: r.get(2)?,
                    kind: r.get(3)?,
                    rho: r.get(4)?,
                    state: r.get(5)?,
                })
            })?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(rows)
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

    pub(super) fn leases(&self) -> Result<std::sync::MutexGuard<'_, HashMap<Uuid, Lease>>> {
        self.leases
            .lock()
            .map_err(|_| NodeError::Internal("lease table lock poisoned".into()))
    }

    pub(super) fn released(&self) -> Result<std::sync::MutexGuard<'_, HashMap<Uuid, i64>>> {
        self.released
            .lock()
            .map_err(|_| NodeError::Internal("lease table lock poisoned".into()))
    }

    /// What tasks other than `charge`'s hold on lease, in the shapes the
    /// budgets of `charge` read; expired leases are dropped on the way.
    /// Call with `conn` locked.
    pub(super) fn reserved_for(&self, charge: &Charge) -> Result<Reserved> {
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
}

pub(super) fn refusal_entry(charge: &Charge, why: &str) -> AuditEntry {
    AuditEntry {
        reason: Some(why.to_string()),
        cost: None,
        ..charge.audit_entry("refused")
    }
}

pub(super) fn spent_in(conn: &Connection, study: &str, researcher: Option<&str>) -> Result<f64> {
    let spent: Option<f64> = conn.query_row(
        "SELECT SUM(rho) FROM releases WHERE study = ?1 AND (?2 IS NULL OR researcher = ?2)",
        params![study, researcher],
        |row| row.get(0),
    )?;
    Ok(spent.unwrap_or(0.0))
}

pub(super) fn spent_total_in(conn: &Connection, researcher: Option<&str>) -> Result<f64> {
    let spent: Option<f64> = conn.query_row(
        "SELECT SUM(rho) FROM releases WHERE ?1 IS NULL OR researcher = ?1",
        params![researcher],
        |row| row.get(0),
    )?;
    Ok(spent.unwrap_or(0.0))
}

/// Why `charge` would exceed a budget, beside what is spent and what
/// other tasks hold on lease (`reserved`), if it would.
pub(super) fn budget_refusal(
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

pub(super) fn exceeds(spent: f64, cost: f64, budget: f64) -> bool {
    spent + cost > budget * (1.0 + BUDGET_TOLERANCE)
}

pub(super) fn budget_message(
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
