//! The node's gate: what every task passes before it may read a row, and
//! how whatever happens after that is charged.
//!
//! ```text
//!  signed task ─▶ admit: signature, expiry, study approval, researcher
//!              ─▶ costs: delta ≤ max_query_delta, epsilon ≥ min_query_epsilon,
//!                        rho ≤ the per-task cap (in rho, at max_query_delta)
//!              ─▶ quota: the researcher's charged failures below the policy's limit
//!              ─▶ slot: fewer than max_concurrent_tasks running (else "busy", nothing charged)
//!              ─▶ begin: the ledger charges the cost against every budget (study,
//!                        researcher in study, researcher over all studies, node),
//!                        durably, before any row is read
//!              ─▶ run under the task's memory pool and time limit
//!              ─▶ finish (release stored) or fail (charge raised to the failure floor)
//! ```
//!
//! Everything that fails after `begin` (an expression, the memory pool,
//! the time limit, a caller that went away, a crash of the node) is
//! charged at least the node's floor (`min_charge_epsilon`) and stored, so
//! that a retry gets the same failure and no second run. Whether a task
//! fails can depend on the rows; a failure that costs nothing would be an
//! oracle. Refusals before `begin` depend on nothing but the task and the
//! policy, cost nothing, and are audited with their reason.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use confer_protocol::signing::sha256_hex;
use confer_protocol::task::{Envelope, QueryTask, SecureQueryTask, Task, TaskKind, unix_now};
use confer_protocol::train::TrainTask;
use confer_protocol::{ErrorKind, ProtocolError};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::prelude::SessionContext;
use tracing::{info, warn};

use crate::error::{NodeError, Result};
use crate::handler::NodeService;
use crate::ledger::{AuditEntry, Begun, Charge, Cost, Refusal, Stored, StudyStatus, TaskState};
use crate::policy::{Approval, Limits, Policy, StudyRules};
use crate::state::NodeState;

mod admitted;
mod unverified;

pub(crate) use admitted::{Admitted, AdmittedKind};
pub use unverified::{UNVERIFIED_WINDOW, Unverified};

/// Why a task failed after it was admitted. Every variant is charged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// An expression could not be computed for some row.
    Expression,
    /// The task's memory pool ran out.
    Memory,
    /// The task ran past the node's time limit.
    Timeout(Duration),
    /// Reading the node's files failed.
    Io,
    /// An answer over public tables had more rows than the node returns.
    Rows(usize),
    /// Anything else (a bug in confer, an engine error); the message is
    /// withheld from the researcher since it could quote a value.
    Other,
}

impl Failure {
    /// What the researcher and the audit log are told: never a value.
    pub fn describe(&self) -> String {
        match self {
            Failure::Expression => "an expression could not be computed for some row (the engine's message \
                is withheld, as it can quote a value); casts of columns are made safe (TRY_CAST) and \
                divisions by zero give NULL, so look for what converts or parses values"
                .into(),
            Failure::Memory => "the task ran out of the memory this node gives one task \
                (policy.limits.memory_mb): group by fewer or coarser keys, or read fewer rows"
                .into(),
            Failure::Timeout(limit) => format!(
                "the task ran longer than this node's limit of {} s (policy.limits.time_limit_secs, or \
                 padded_secs for a query one person could slow down): simplify the joins or read fewer rows",
                limit.as_secs()
            ),
            Failure::Io => "reading this node's tables failed".into(),
            Failure::Rows(cap) => format!(
                "the answer has more than {cap} rows, the most this node returns for one query over public \
                 tables (policy.limits.max_public_rows): aggregate, filter or add a LIMIT"
            ),
            Failure::Other => "the task failed while it ran (the engine's message is withheld)".into(),
        }
    }

    /// Classifies an engine error without keeping its text.
    pub fn of(err: &datafusion::error::DataFusionError) -> Self {
        use datafusion::error::DataFusionError as E;
        match err.find_root() {
            E::ResourcesExhausted(_) => Failure::Memory,
            E::IoError(_) | E::ObjectStore(_) => Failure::Io,
            E::ArrowError(..) | E::Execution(_) | E::ExecutionJoin(_) | E::External(_) => {
                Failure::Expression
            }
            _ => Failure::Other,
        }
    }
}

/// A running task's place among the node's concurrent tasks; freed when
/// dropped.
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl NodeState {
    /// A session over the node's tables whose memory pool is one task's.
    pub fn task_context(&self, limits: &Limits) -> Result<SessionContext> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(limits.memory_bytes, 1.0)
            .build_arc()?;
        let state = SessionStateBuilder::new_from_existing(self.ctx.state())
            .with_runtime_env(runtime)
            .build();
        Ok(SessionContext::new_with_state(state))
    }
}

impl NodeService {
    /// Refuses a task (audited, with the reason) before anything was read.
    pub(crate) fn refuse(&self, task: Option<&Task>, kind: ErrorKind, reason: String) -> NodeError {
        self.refuse_with(task, kind, reason, false)
    }

    /// [`Self::refuse`], saying whether asking again may help.
    pub(crate) fn refuse_with(
        &self,
        task: Option<&Task>,
        kind: ErrorKind,
        reason: String,
        retryable: bool,
    ) -> NodeError {
        self.refuse_error(
            task,
            ProtocolError::new(kind, reason).with_retryable(retryable),
        )
    }

    /// Refuses a task with a typed error (its kind, retry hint and reason
    /// kept): audited like [`Self::refuse`], and named as this node's.
    pub(crate) fn refuse_error(&self, task: Option<&Task>, err: ProtocolError) -> NodeError {
        let state = self.state();
        let reason = &err.message;
        let audited = match task {
            // Without a verified task: audited in summary (see Unverified).
            None => state.audit_unverified(state.unverified.note(reason)),
            Some(task) => state.ledger.audit(&AuditEntry {
                task_id: Some(task.id),
                study: Some(task.study.clone()),
                actor: Some(task.researcher.clone()),
                kind: task.kind_name().to_string(),
                decision: "refused".into(),
                reason: Some(reason.clone()),
                ..Default::default()
            }),
        };
        if let Err(e) = audited {
            warn!("cannot audit a refusal: {e}");
            return e;
        }
        let message = format!("node {}: {reason}", state.name);
        NodeError::Protocol(ProtocolError { message, ..err }.with_site(state.name.clone()))
    }

    /// [`Self::admit`] for a handler that serves one kind of task: a task
    /// of another kind is refused (audited) saying what `what` carries.
    pub(crate) fn admit_as<K: AdmittedKind>(
        &self,
        envelope: &Envelope,
        policy: &Policy,
        what: &str,
    ) -> Result<Admitted<K>> {
        let (task, rules) = self.admit(envelope, policy)?;
        match K::of(&task.kind) {
            Some(kind) => Ok(Admitted { task, rules, kind }),
            None => Err(self.refuse(
                Some(&task),
                ErrorKind::InvalidArgument,
                format!("{what} carries {}", K::NAME),
            )),
        }
    }

    /// Checks signature, expiry, study approval and researcher; returns the
    /// verified task and the study's rules. Refusals are audited.
    pub(crate) fn admit(&self, envelope: &Envelope, policy: &Policy) -> Result<(Task, StudyRules)> {
        let state = self.state();
        let task = match state.coordinator().verify(envelope) {
            Ok(t) => t,
            Err(e) => {
                return Err(self.refuse(None, ErrorKind::PermissionDenied, e.message));
            }
        };
        if task.is_expired_at(unix_now()) {
            return Err(self.refuse(
                Some(&task),
                ErrorKind::FailedPrecondition,
                format!(
                    "task {} has expired (it was valid until {} s after the epoch)",
                    task.id, task.expires_at
                ),
            ));
        }
        if !task.is_for(&state.name) {
            return Err(self.refuse(
                Some(&task),
                ErrorKind::PermissionDenied,
                format!(
                    "task {} is signed for {}, not for this node: a node runs only the tasks the \
                     coordinator addressed to it",
                    task.id,
                    if task.nodes.is_empty() {
                        "no node".to_string()
                    } else {
                        task.nodes.join(", ")
                    }
                ),
            ));
        }
        let rules = match policy.study(&task.study) {
            Ok(r) => r,
            Err(why) => return Err(self.refuse(Some(&task), ErrorKind::PermissionDenied, why)),
        };
        let mut status = state.ledger.study_status(&task.study)?;
        if status == StudyStatus::Unknown {
            let approve = policy.approval == Approval::Auto;
            status = state.ledger.register_study(
                &task.study,
                approve,
                "policy",
                task.study_info.as_ref().map(describe_study).as_deref(),
            )?;
        }
        match status {
            StudyStatus::Pending => {
                return Err(self.refuse(
                    Some(&task),
                    ErrorKind::FailedPrecondition,
                    format!(
                        "study {} awaits approval by this node's data steward (`confer node approve {}`)",
                        task.study, task.study
                    ),
                ));
            }
            StudyStatus::Denied { reason } => {
                return Err(self.refuse(
                    Some(&task),
                    ErrorKind::PermissionDenied,
                    format!(
                        "study {} was denied by this node's data steward: {reason}",
                        task.study
                    ),
                ));
            }
            StudyStatus::Approved { .. } | StudyStatus::Unknown => {}
        }
        if !rules.allows_researcher(&task.researcher) {
            return Err(self.refuse(
                Some(&task),
                ErrorKind::PermissionDenied,
                format!(
                    "researcher {} is not a member of study {} at this node",
                    task.researcher, task.study
                ),
            ));
        }
        Ok((task, rules))
    }

    /// The study's budget at this node (rho): the steward's, else the policy's.
    pub(crate) fn budget_of(&self, study: &str, rules: &StudyRules) -> Result<f64> {
        Ok(match self.state().ledger.study_status(study)? {
            StudyStatus::Approved {
                budget_rho: Some(b),
            } => b,
            _ => rules.budget_rho,
        })
    }

    /// The policy's limits on what one task may cost: its delta, its
    /// epsilon (a floor) and its rho (the per-task cap, in rho, so that a
    /// large delta cannot make a costly task look cheap). `pure_epsilon`
    /// is the epsilon of a pure-DP (Laplace) task, which also passes the
    /// cap with that epsilon at or below it.
    pub(crate) fn check_costs(
        &self,
        task: &Task,
        policy: &Policy,
        cost: &Cost,
        requested_epsilon: f64,
        pure_epsilon: Option<f64>,
    ) -> Result<()> {
        let what = if task.kind_name().starts_with("train") {
            "job"
        } else {
            "query"
        };
        if cost.delta > policy.max_query_delta * (1.0 + 1e-12) {
            return Err(self.refuse(
                Some(task),
                ErrorKind::PermissionDenied,
                format!(
                    "this {what} uses delta {:e}, above this node's max_query_delta of {:e}: lower delta \
                     to at most {:e}",
                    cost.delta, policy.max_query_delta, policy.max_query_delta
                ),
            ));
        }
        if requested_epsilon < policy.min_query_epsilon * (1.0 - 1e-12) {
            return Err(self.refuse(
                Some(task),
                ErrorKind::PermissionDenied,
                format!(
                    "this {what} asks for epsilon {requested_epsilon}, below this node's min_query_epsilon of \
                     {}: a task's cost must be worth charging; raise epsilon to at least {}",
                    policy.min_query_epsilon, policy.min_query_epsilon
                ),
            ));
        }
        if let (Some(cap), Some(cap_rho)) = (policy.max_query_epsilon, policy.max_query_rho) {
            let within_pure = pure_epsilon.is_some_and(|e| e <= cap * (1.0 + 1e-9));
            if cost.rho > cap_rho * (1.0 + 1e-9) && !within_pure {
                return Err(self.refuse(
                    Some(task),
                    ErrorKind::ResourceExhausted,
                    format!(
                        "this {what} costs rho {:.6} (epsilon {:.4} at its delta {:e}), above this node's \
                         per-task cap of epsilon {cap} at delta {:e} (rho {cap_rho:.6}): lower epsilon",
                        cost.rho, cost.epsilon, cost.delta, policy.max_query_delta
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Refuses a researcher whose charged failures reached the policy's
    /// limit, until the steward lifts it (`confer node lift`).
    pub(crate) fn check_quota(&self, task: &Task, policy: &Policy) -> Result<()> {
        let failures = self.state().ledger.failures_since_lift(&task.researcher)?;
        if failures >= policy.max_failures_per_researcher {
            return Err(self.refuse(
                Some(task),
                ErrorKind::PermissionDenied,
                format!(
                    "researcher {} has had {failures} task(s) fail after admission at this node (each \
                     charged); the node takes no more of their tasks until its data steward has reviewed \
                     them (`confer node lift --researcher {}`)",
                    task.researcher, task.researcher
                ),
            ));
        }
        Ok(())
    }

    /// Takes a place among the tasks running now, or refuses as busy
    /// (nothing charged; asking again later may pass).
    pub(crate) fn slot(&self, task: &Task, policy: &Policy) -> Result<Slot> {
        let running = self.state().running.clone();
        let limit = policy.limits.max_concurrent_tasks;
        let taken = running.fetch_add(1, Ordering::SeqCst);
        let slot = Slot(running);
        if taken >= limit {
            drop(slot);
            return Err(self.refuse_with(
                Some(task),
                ErrorKind::Unavailable,
                format!(
                    "this node is busy: {limit} task(s) are running (policy.limits.max_concurrent_tasks); \
                     ask again shortly, nothing was charged"
                ),
                true,
            ));
        }
        Ok(slot)
    }

    /// The charge of `cost` for `task` under every budget, refused (and
    /// audited) early if it would not fit now; the binding check is
    /// repeated in the transaction that records it.
    pub(crate) fn checked_charge(
        &self,
        task: &Task,
        payload_hash: &str,
        rules: &StudyRules,
        policy: &Policy,
        cost: Cost,
    ) -> Result<Charge> {
        let charge = Charge {
            task_id: task.id,
            payload_hash: payload_hash.to_string(),
            study: task.study.clone(),
            researcher: task.researcher.clone(),
            kind: task.kind_name().into(),
            cost,
            study_budget: self.budget_of(&task.study, rules)?,
            researcher_budget: rules.researcher_budget_rho,
            study_delta_budget: rules.budget_delta,
            node_budget: policy.node_budget_rho,
            researcher_total_budget: policy.researcher_total_budget_rho,
            failure_quota: Some(policy.max_failures_per_researcher),
            failure_rho: policy.min_charge_rho,
        };
        if let Some(why) = self.state().ledger.check_budget(&charge)? {
            return Err(self.refuse(Some(task), ErrorKind::ResourceExhausted, why));
        }
        Ok(charge)
    }

    /// Charges a task durably before it runs. `Ok(None)`: charged now, run
    /// it. `Ok(Some(stored))`: the task is already on record (a retry).
    pub(crate) fn begin(&self, task: &Task, charge: &Charge) -> Result<Option<Stored>> {
        match self.state().ledger.begin(charge)? {
            Ok(Begun::Charged) => Ok(None),
            Ok(Begun::Existing(stored)) => Ok(Some(stored)),
            Err(Refusal::Budget(why)) => Err(NodeError::Protocol(
                ProtocolError::new(
                    ErrorKind::ResourceExhausted,
                    format!("node {}: {why}", self.state().name),
                )
                .with_retryable(false),
            )),
            Err(Refusal::Replay(why) | Refusal::Quota(why)) => {
                let _ = task;
                Err(NodeError::Protocol(
                    ProtocolError::new(
                        ErrorKind::PermissionDenied,
                        format!("node {}: {why}", self.state().name),
                    )
                    .with_retryable(false),
                ))
            }
        }
    }

    /// What a task already on record answers: its stored release, its
    /// stored failure, or "still running".
    pub(crate) fn answer_stored(
        &self,
        task: &Task,
        stored: Stored,
        payload_hash: &str,
    ) -> Result<Vec<u8>> {
        if stored.payload_hash != payload_hash {
            return Err(self.refuse(
                Some(task),
                ErrorKind::PermissionDenied,
                format!(
                    "task id {} was already used for a different task: refused as a replay",
                    task.id
                ),
            ));
        }
        match stored.state {
            TaskState::Running => Err(self.refuse_with(
                Some(task),
                ErrorKind::Unavailable,
                format!(
                    "task {} is still running at this node: ask again shortly (it is charged once)",
                    task.id
                ),
                true,
            )),
            TaskState::Failed => Err(self.refuse(
                Some(task),
                ErrorKind::FailedPrecondition,
                format!(
                    "task {} failed while it ran at this node and was charged then; it is not run again",
                    task.id
                ),
            )),
            TaskState::Released => {
                self.state().ledger.audit(&AuditEntry {
                    task_id: Some(task.id),
                    study: Some(task.study.clone()),
                    actor: Some(task.researcher.clone()),
                    kind: task.kind_name().into(),
                    decision: "retried".into(),
                    reason: Some(
                        "task seen before: its stored release was sent again, nothing charged"
                            .into(),
                    ),
                    result_hash: Some(sha256_hex(&stored.result)),
                    ..Default::default()
                })?;
                info!(task = %task.id, "retried task answered from the ledger");
                Ok(stored.result)
            }
        }
    }

    /// After a task failed past admission: its charge rises to at least the
    /// node's floor, the failure is stored so a retry gets it again, and the
    /// refusal names only what kind of thing failed.
    pub(crate) fn charge_failure(
        &self,
        task: &Task,
        charge: &Charge,
        failure: Failure,
    ) -> NodeError {
        let reason = failure.describe();
        warn!(task = %task.id, "a task failed after admission and was charged (message withheld)");
        if let Err(e) = self.state().ledger.fail(charge, &reason) {
            return e;
        }
        let message = format!(
            "node {}: {reason}. The task was charged (rho {:.6}, this node's floor for a failure) and \
             is not run again",
            self.state().name,
            charge.failure_charge()
        );
        NodeError::Protocol(
            ProtocolError::new(ErrorKind::FailedPrecondition, message).with_retryable(false),
        )
    }

    /// Runs SQL over the node's tables within one task's memory pool and
    /// time limit.
    pub(crate) async fn run_limited(
        &self,
        sql: &str,
        limits: &Limits,
    ) -> std::result::Result<Vec<RecordBatch>, Failure> {
        self.run_within(sql, limits, None).await
    }

    /// Runs a query over public tables only within `limits`: at most
    /// `limits.max_public_rows` rows come back.
    pub(crate) async fn run_public_limited(
        &self,
        sql: &str,
        limits: &Limits,
    ) -> std::result::Result<Vec<RecordBatch>, Failure> {
        self.run_within(sql, limits, Some(limits.max_public_rows))
            .await
    }

    /// Streams `sql`'s answer in a session with the task's memory pool,
    /// under its time limit; with `max_rows` (a query over public tables),
    /// the batches it holds count against the task's memory too (the
    /// engine's pool covers only its operators), and past `max_rows` it stops.
    async fn run_within(
        &self,
        sql: &str,
        limits: &Limits,
        max_rows: Option<usize>,
    ) -> std::result::Result<Vec<RecordBatch>, Failure> {
        use futures::StreamExt;
        let ctx = self
            .state()
            .task_context(limits)
            .map_err(|_| Failure::Other)?;
        let memory = limits.memory_bytes;
        let work = async move {
            let frame = ctx.sql(sql).await.map_err(|e| Failure::of(&e))?;
            let mut stream = frame.execute_stream().await.map_err(|e| Failure::of(&e))?;
            let mut batches = Vec::new();
            let (mut rows, mut bytes) = (0usize, 0usize);
            while let Some(batch) = stream.next().await {
                let batch = batch.map_err(|e| Failure::of(&e))?;
                // Answers over public tables can be as long as a cross
                // join: capped in rows, and what is held counts against the
                // task's memory. A DP task's answer is its groups, which
                // its plan bounds; it is not failed (and charged) here.
                if let Some(cap) = max_rows {
                    rows += batch.num_rows();
                    bytes += batch.get_array_memory_size();
                    if rows > cap {
                        return Err(Failure::Rows(cap));
                    }
                    if bytes > memory {
                        return Err(Failure::Memory);
                    }
                }
                batches.push(batch);
            }
            Ok(batches)
        };
        match tokio::time::timeout(limits.time_limit, work).await {
            Err(_) => Err(Failure::Timeout(limits.time_limit)),
            Ok(result) => result,
        }
    }
}

/// A study as the coordinator describes it, in one line for the steward.
fn describe_study(info: &confer_protocol::task::StudyInfo) -> String {
    format!(
        "\"{}\" (principal investigator {}, ethics approval {}, requests epsilon {} and delta {:e} per node)",
        info.title,
        info.principal_investigator,
        info.ethics_ref,
        info.requested_epsilon,
        info.requested_delta
    )
}
