//! The query path at a node: checking a query (and holding its budget),
//! releasing a hold, running a DP query under the gate, queries over public
//! tables, and budget reports.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use confer_protocol::signing::sha256_hex;
use confer_protocol::task::{Envelope, QueryCheck, QueryTask, Task};
use confer_protocol::{ErrorKind, ProtocolError, Reason, actions};
use confer_query::release::ReleaseOptions;
use confer_query::{QueryError, Statement};
use tracing::info;

use crate::error::{NodeError, Result};
use crate::gate::{Admitted, Failure};
use crate::ledger::{AuditEntry, Charge, Cost, StudyStatus};
use crate::policy::{Policy, StudyRules};

use crate::handler::{NodeService, blocking};

impl NodeService {
    /// [`actions::QUERY_CHECK`]: every check a query task passes before it
    /// reads data (signature, study, researcher, tables, costs, quota,
    /// budgets), with nothing read, run or charged. Refusals are audited as
    /// when the query itself is refused.
    pub(crate) async fn check_query(&self, envelope: Envelope) -> Result<QueryCheck> {
        let policy = self.state.policy()?;
        let Admitted {
            task,
            rules,
            kind: query,
        } = self.admit_as::<QueryTask>(&envelope, &policy, actions::QUERY_CHECK)?;
        let mut answer = QueryCheck {
            node: self.state.name.clone(),
            rho: 0.0,
            epsilon: 0.0,
            delta: 0.0,
            refused: None,
            audit: Some(self.state.ledger.head(None)?),
        };
        let checked = async {
            let plan = self
                .checked_plan(&task, &rules, &policy, &query.sql)
                .await?;
            answer.rho = plan.cost.rho;
            answer.epsilon = plan.cost.epsilon;
            answer.delta = plan.cost.delta;
            if self.state.ledger.stored(task.id)?.is_none() {
                self.check_quota(&task, &policy)?;
                let payload_hash = sha256_hex(envelope.payload.as_bytes());
                let charge = self.priced_charge(&task, &payload_hash, &plan, &rules, &policy)?;
                // Held until the task runs here, is released, or expires.
                // A secure query is charged in sessions of their own task
                // ids (its selection levels), so it holds nothing here,
                // and its plan is not kept either.
                if plan.options.aggregation != confer_query::options::Aggregation::Secure {
                    let expires_ms = lease_expiry_ms(&task);
                    if let Some(why) = self.state.ledger.reserve(&charge, expires_ms)? {
                        return Err(self.refuse(Some(&task), ErrorKind::ResourceExhausted, why));
                    }
                    // Kept for the run, which then compiles nothing.
                    self.state
                        .plans
                        .put(task.id, &query.sql, plan.clone(), task.expires_at);
                }
            }
            Ok::<(), NodeError>(())
        }
        .await;
        match checked {
            Ok(()) => {}
            // A table this node does not publish: it takes no part, as when
            // the query itself runs (the network catalog is the union).
            Err(NodeError::Protocol(e)) if e.is(Reason::NotInCatalog) => {
                return Err(NodeError::Protocol(e));
            }
            // A refusal of this query (already audited): say why, as an answer.
            Err(NodeError::Protocol(e)) if !e.retryable => answer.refused = Some(e),
            Err(e) => return Err(e),
        }
        Ok(answer)
    }

    /// [`actions::QUERY_RELEASE`]: a checked query will not run (another
    /// node refused it), so the budget it holds here is given back. Only a
    /// task the coordinator signed can be released, and releasing charges
    /// and reads nothing: a task that runs later is checked again in full.
    pub(crate) fn release_query(&self, envelope: Envelope) -> Result<bool> {
        // The signature is all a release needs: it only gives budget back,
        // so an expired task or a study denied since its check may release.
        let task = self
            .state
            .coordinator()
            .verify(&envelope)
            .map_err(|e| self.refuse(None, ErrorKind::PermissionDenied, e.message))?;
        let expires_ms = lease_expiry_ms(&task);
        // The query will not run here: its plan goes too.
        self.state.plans.forget(task.id);
        let released = self.state.ledger.release_lease(task.id, expires_ms)?;
        if released {
            info!(task = %task.id, study = %task.study, "budget held for a checked query released");
        }
        Ok(released)
    }

    /// The plan of a query task: the one compiled when the task was
    /// checked here, or else compiled now ([`Self::compiled_plan`]); then
    /// the policy's table and cost rules, applied every time.
    pub(crate) async fn checked_plan(
        &self,
        task: &Task,
        rules: &StudyRules,
        policy: &Policy,
        sql: &str,
    ) -> Result<Arc<confer_query::plan::FederatedPlan>> {
        let plan = match self.state.plans.take(task.id, sql) {
            // Compiled trusting one row per person in files that have
            // changed since: compiled again, enforcing it.
            Some(plan) if !self.state.one_row_still_verified(&plan) => {
                Arc::new(self.compiled_plan(task, sql).await?)
            }
            Some(plan) => plan,
            None => Arc::new(self.compiled_plan(task, sql).await?),
        };
        if let Some(table) = rules.forbidden_table(&plan.tables) {
            return Err(self.refuse(
                Some(task),
                ErrorKind::PermissionDenied,
                format!(
                    "study {} may not read table {table} at this node",
                    task.study
                ),
            ));
        }
        let pure = (plan.options.mechanism == confer_query::Mechanism::Laplace)
            .then_some(plan.cost.epsilon);
        self.check_costs(task, policy, &cost_of(&plan), plan.options.epsilon, pure)?;
        Ok(plan)
    }

    /// Parses and compiles a query task's SQL against this node's own
    /// catalog, and checks that everything it computes cannot fail on this
    /// node's tables (refusals audited).
    async fn compiled_plan(
        &self,
        task: &Task,
        sql: &str,
    ) -> Result<confer_query::plan::FederatedPlan> {
        let parsed = match confer_query::parse(sql) {
            Ok(Statement::Query(q)) => q,
            Ok(_) => {
                return Err(self.refuse(
                    Some(task),
                    ErrorKind::InvalidArgument,
                    "nodes run DP queries only; EXPLAIN and SHOW are answered by the coordinator"
                        .into(),
                ));
            }
            Err(e) => {
                return Err(self.refuse(Some(task), ErrorKind::InvalidArgument, e.to_string()));
            }
        };
        let options = confer_query::CompileOptions {
            verified_one_row: self.state.verified_one_row(),
            ..Default::default()
        };
        let plan = match confer_query::compile_with(
            &parsed,
            &self.state.query_catalog,
            Some(&self.state.name),
            &options,
        )
        .await
        {
            Ok(p) => p,
            Err(e) => return Err(self.refuse_error(Some(task), e.into())),
        };
        // The same check once more, against this node's tables as they are
        // read (a Parquet column may be narrower than the catalog says).
        let here = async {
            let local = confer_query::engine::analyzed(&self.state.ctx, &plan.local_sql).await?;
            confer_query::total::check_plan(&local)
        };
        if let Err(e) = here.await {
            return Err(self.refuse_error(Some(task), e.into()));
        }
        Ok(plan)
    }

    pub(crate) async fn run_query(
        &self,
        envelope: &Envelope,
        task: &Task,
        rules: &StudyRules,
        policy: &Policy,
        sql: &str,
    ) -> Result<RecordBatch> {
        let payload_hash = sha256_hex(envelope.payload.as_bytes());
        // A retried task gets exactly what happened the first time.
        if let Some(stored) = self.state.ledger.stored(task.id)? {
            return decode_ipc(&self.answer_stored(task, stored, &payload_hash)?);
        }
        let plan = self.checked_plan(task, rules, policy, sql).await?;
        self.check_quota(task, policy)?;
        let slot = self.slot(task, policy)?;
        let charge = self.priced_charge(task, &payload_hash, &plan, rules, policy)?;
        if let Some(stored) = self.begin(task, &charge)? {
            return decode_ipc(&self.answer_stored(task, stored, &payload_hash)?);
        }
        // Charged: from here on the task runs to its end (release or
        // charged failure) even if the caller goes away. A query whose work
        // one person could multiply is answered at a fixed time, whatever
        // its real run time, so that its latency tells nothing.
        let padded = plan.amplification.is_some();
        let limits = policy.limits.for_task(padded);
        let started = tokio::time::Instant::now();
        let this = self.clone();
        let (task, policy) = (task.clone(), policy.clone());
        let worker = tokio::spawn(async move {
            // A panic while running is a failure like any other: charged,
            // stored, and told without its message.
            let run = std::panic::AssertUnwindSafe(this.execute_query(
                &task,
                Arc::unwrap_or_clone(plan),
                &charge,
                &limits,
                policy.min_group_size,
            ));
            let result = match futures::FutureExt::catch_unwind(run).await {
                Ok(result) => result,
                Err(_) => Err(this.charge_failure(&task, &charge, Failure::Other)),
            };
            // The slot is held until the answer goes: its release would
            // otherwise show when the work really ended.
            if padded {
                tokio::time::sleep_until(started + limits.padded).await;
            }
            drop(slot);
            result
        });
        worker.await.map_err(|_| worker_stopped())?
    }

    /// Runs a charged query, releases it and stores the release, or charges
    /// its failure.
    pub(crate) async fn execute_query(
        &self,
        task: &Task,
        plan: confer_query::plan::FederatedPlan,
        charge: &Charge,
        limits: &crate::policy::Limits,
        min_group_size: u64,
    ) -> Result<RecordBatch> {
        let batches = match self.run_limited(&plan.local_sql, limits).await {
            // Files trusted to hold one row per person changed while the
            // query read them: what it read was not checked.
            Ok(_) if !self.state.one_row_still_verified(&plan) => {
                return Err(self.charge_failure(task, charge, Failure::Io));
            }
            Ok(b) => b,
            Err(f) => return Err(self.charge_failure(task, charge, f)),
        };
        let name = self.state.name.clone();
        let id = task.id;
        let options = ReleaseOptions { min_group_size };
        let released = blocking(move || {
            confer_query::release::release(&plan, &batches, &name, id, &options)
                .map_err(NodeError::from)
        })
        .await
        .and_then(|batch| encode_ipc(&batch));
        let bytes = match released {
            Ok(b) => b,
            Err(_) => return Err(self.charge_failure(task, charge, Failure::Other)),
        };
        let released = self.state.ledger.finish(charge, bytes)?;
        info!(
            task = %task.id,
            study = %task.study,
            rho = charge.cost.rho,
            epsilon = charge.cost.epsilon,
            delta = charge.cost.delta,
            "released after durable debit"
        );
        decode_ipc(&released)
    }

    /// Runs a query over public tables only: no DP, nothing charged, the
    /// rows audited by hash. Whether the query is public is decided here,
    /// against this node's own catalog, never taken from the coordinator.
    pub(crate) async fn run_public(
        &self,
        task: &Task,
        rules: &StudyRules,
        policy: &Policy,
        sql: &str,
    ) -> Result<RecordBatch> {
        let refuse_invalid = |why: String| self.refuse(Some(task), ErrorKind::InvalidArgument, why);
        let parsed = match confer_query::parse(sql) {
            Ok(Statement::Query(q)) if q.options.is_none() => q,
            Ok(_) => {
                return Err(refuse_invalid(
                    "a public-table task carries a plain SELECT without the DP clause".into(),
                ));
            }
            Err(e) => return Err(refuse_invalid(e.to_string())),
        };
        let public =
            match confer_query::public::public_query(&parsed, &self.state.query_catalog).await {
                Ok(Some(p)) => p,
                Ok(None) => {
                    return Err(self.refuse(
                        Some(task),
                        ErrorKind::PermissionDenied,
                        "this query reads person-level tables at this node and needs the DP clause"
                            .into(),
                    ));
                }
                Err(e) => return Err(refuse_invalid(e.to_string())),
            };
        if let Some(table) = rules.forbidden_table(&public.tables) {
            return Err(self.refuse(
                Some(task),
                ErrorKind::PermissionDenied,
                format!(
                    "study {} may not read table {table} at this node",
                    task.study
                ),
            ));
        }
        let _slot = self.slot(task, policy)?;
        // Public rows: a failure here reveals nothing about persons, so it
        // is reported as it is and charges nothing, but the task still
        // runs within the node's limits.
        let batches = match self.run_public_limited(&public.sql, &policy.limits).await {
            Ok(b) => b,
            Err(f) => {
                return Err(self.refuse(
                    Some(task),
                    ErrorKind::ResourceExhausted,
                    format!("the query over public tables failed: {}", f.describe()),
                ));
            }
        };
        let schema = batches
            .first()
            .map(RecordBatch::schema)
            .unwrap_or_else(|| public.schema.clone());
        let batch = arrow::compute::concat_batches(&schema, &batches).map_err(|e| {
            NodeError::Query(QueryError::Internal(format!(
                "cannot assemble the public answer: {e}"
            )))
        })?;
        let bytes = encode_ipc(&batch)?;
        self.state.ledger.audit(&AuditEntry {
            task_id: Some(task.id),
            study: Some(task.study.clone()),
            actor: Some(task.researcher.clone()),
            kind: task.kind_name().into(),
            decision: "released".into(),
            reason: Some(format!(
                "{} rows of public tables ({})",
                batch.num_rows(),
                public.tables.join(", ")
            )),
            result_hash: Some(sha256_hex(&bytes)),
            ..Default::default()
        })?;
        info!(task = %task.id, study = %task.study, rows = batch.num_rows(), "public-table answer released");
        Ok(batch)
    }

    /// The charge for running `plan` under every budget, refused (and
    /// audited) early if it would not fit now; the binding check is
    /// repeated in the transaction that records it.
    pub(crate) fn priced_charge(
        &self,
        task: &Task,
        payload_hash: &str,
        plan: &confer_query::plan::FederatedPlan,
        rules: &StudyRules,
        policy: &Policy,
    ) -> Result<Charge> {
        self.checked_charge(task, payload_hash, rules, policy, cost_of(plan))
    }

    /// `SHOW PRIVACY BUDGET`: this node's figures for one study, and its
    /// figures over all studies (the node's and the asking researcher's).
    pub(crate) fn report_budget(
        &self,
        task: &Task,
        study: &str,
        policy: &Policy,
    ) -> Result<RecordBatch> {
        let (status, budget) = match policy.study(study) {
            Ok(rules) => {
                let status = match self.state.ledger.study_status(study)? {
                    StudyStatus::Unknown => "unknown".to_string(),
                    StudyStatus::Pending => "pending".to_string(),
                    StudyStatus::Approved { .. } => "approved".to_string(),
                    StudyStatus::Denied { reason } => format!("denied: {reason}"),
                };
                (status, self.budget_of(study, &rules)?)
            }
            Err(why) => (format!("not admitted: {why}"), 0.0),
        };
        let spent = self.state.ledger.spent(study, None)?;
        let releases = self
            .state
            .ledger
            .studies()?
            .into_iter()
            .find(|s| s.study == study)
            .map(|s| s.releases)
            .unwrap_or(0);
        self.state.ledger.audit(&AuditEntry {
            task_id: Some(task.id),
            study: Some(study.to_string()),
            actor: Some(task.researcher.clone()),
            kind: task.kind_name().into(),
            decision: "released".into(),
            reason: Some("budget figures reported".into()),
            ..Default::default()
        })?;
        Ok(confer_protocol::release::budget_report(
            &confer_protocol::release::BudgetFigures {
                node: self.state.name.clone(),
                study: study.to_string(),
                status,
                budget_rho: budget,
                spent_rho: spent,
                releases,
                node_budget_rho: policy.node_budget_rho,
                node_spent_rho: self.state.ledger.spent_total()?,
                researcher: task.researcher.clone(),
                researcher_budget_rho: policy.researcher_total_budget_rho,
                researcher_spent_rho: self.state.ledger.spent_by_researcher(&task.researcher)?,
            },
        )?)
    }
}

/// A task's worker that stopped without an answer (the runtime shutting
/// down): the task stays charged, and the node's restart records it as
/// failed. No engine message is passed on.
pub(crate) fn worker_stopped() -> NodeError {
    NodeError::Protocol(ProtocolError::internal(
        "the task's worker stopped before it answered (the task stays charged)",
    ))
}

/// A plan's cost as the ledger records it.
pub(crate) fn cost_of(plan: &confer_query::plan::FederatedPlan) -> Cost {
    plan_cost(&plan.cost)
}

pub(crate) fn plan_cost(cost: &confer_query::plan::PlanCost) -> Cost {
    Cost {
        rho: cost.rho,
        epsilon: cost.epsilon,
        delta: cost.delta,
        selection_delta: cost.selection_delta,
    }
}

/// When a lease of `task` ends (ms since the epoch): when the task itself
/// is no longer accepted (its `expires_at` second has passed).
pub(crate) fn lease_expiry_ms(task: &Task) -> i64 {
    i64::try_from(task.expires_at.saturating_add(1).saturating_mul(1000)).unwrap_or(i64::MAX)
}

pub(crate) fn encode_ipc(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let encode = |buf: &mut Vec<u8>| -> std::result::Result<(), arrow::error::ArrowError> {
        let mut w = StreamWriter::try_new(buf, &batch.schema())?;
        w.write(batch)?;
        w.finish()
    };
    encode(&mut buf)
        .map_err(|e| NodeError::Protocol(ProtocolError::internal(format!("encode: {e}"))))?;
    Ok(buf)
}

pub(crate) fn decode_ipc(bytes: &[u8]) -> Result<RecordBatch> {
    let err = |e: String| {
        NodeError::Protocol(ProtocolError::internal(format!(
            "stored release unreadable: {e}"
        )))
    };
    let reader =
        StreamReader::try_new(std::io::Cursor::new(bytes), None).map_err(|e| err(e.to_string()))?;
    let schema = reader.schema();
    let batches: Vec<RecordBatch> = reader
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    arrow::compute::concat_batches(&schema, &batches).map_err(|e| err(e.to_string()))
}
