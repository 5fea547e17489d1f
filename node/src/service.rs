//! The node's Arrow Flight service.
//!
//! * `DoGet(ticket = signed task envelope)`: verify, apply the steward's
//!   policy, run, record durably, then stream the release.
//! * `DoAction("confer.catalog")`: the public catalog, as JSON.
//! * `DoAction("confer.health")`: liveness and basic facts, as JSON.
//!
//! Every task received is audited, whether it is released, answered from
//! the ledger (a retry), or refused, with the reason.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime};

use arrow::array::RecordBatch;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use confer_protocol::catalog::{CatalogInfo, Health};
use confer_protocol::signing::{PublicKey, sha256_hex};
use confer_protocol::task::{
    Envelope, QueryCheck, SecaggIdentity, SecaggRound, Task, TaskKind, unix_now,
};
use confer_protocol::{ErrorKind, ProtocolError, actions};
use confer_query::release::ReleaseOptions;
use confer_query::{Catalog, QueryError, Statement};
use datafusion::prelude::SessionContext;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, instrument, warn};

use crate::config::NodeConfig;
use crate::error::{NodeError, Result};
use crate::ledger::{AuditEntry, Charge, Cost, Ledger, Refusal, StudyStatus};
use crate::policy::{Approval, Policy, StudyRules};

/// The policy in force and the config file it came from.
struct PolicyState {
    policy: Policy,
    modified: Option<SystemTime>,
}

/// What a ledger stores in place of a release when a DP query failed while
/// running: the failure was charged, and a retry gets the same refusal.
const FAILED_RELEASE: &[u8] = b"confer: failed while running, charged";

/// The compiler's words for a table this node's catalog lacks.
const NOT_IN_CATALOG: &str = "is not in the network catalog";

/// Why a DP query failed while running, without DataFusion's message.
const FAILED_WHILE_RUNNING: &str = "the query failed while running on this node's rows: an \
    expression could not be computed for some row (the message is withheld, as it can quote a \
    value, and the failure is charged like a release, since whether it fails depends on the rows). \
    Casts of columns are made safe (TRY_CAST) and divisions by zero give NULL; look for functions \
    that reject some inputs, such as to_timestamp or make_date, and guard them with CASE";

/// Shared state of a running node.
pub struct NodeState {
    /// Site name.
    pub name: String,
    /// DataFusion session with the node's tables.
    pub ctx: SessionContext,
    /// The published catalog.
    pub catalog: CatalogInfo,
    /// The catalog as the query compiler sees it.
    pub query_catalog: Catalog,
    /// The privacy ledger and audit log.
    pub ledger: Arc<Ledger>,
    /// When the node started.
    pub started: Instant,
    /// Secure-aggregation identity and sessions.
    pub secure: crate::secure::SecureSessions,
    /// Training jobs prepared here.
    pub train: crate::train::TrainJobs,
    coordinator: PublicKey,
    policy: RwLock<PolicyState>,
    config_path: Option<PathBuf>,
}

impl NodeState {
    /// Loads the config's tables (validating them) and opens its ledger.
    pub async fn open(config: &NodeConfig) -> Result<Self> {
        let ctx = SessionContext::new();
        let catalog = crate::catalog::load(config, &ctx).await?;
        let ledger = Arc::new(Ledger::open(&config.node.state_dir)?);
        Self::new(config, ctx, catalog, ledger)
    }

    /// State for a loaded config.
    pub fn new(
        config: &NodeConfig,
        ctx: SessionContext,
        catalog: CatalogInfo,
        ledger: Arc<Ledger>,
    ) -> Result<Self> {
        let coordinator = config.coordinator_key()?;
        let policy = Policy::from_config(&config.policy)?;
        let modified = config
            .source
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .and_then(|m| m.modified().ok());
        Ok(Self {
            name: config.node.name.clone(),
            query_catalog: Catalog::for_node(&catalog),
            catalog,
            ctx,
            ledger,
            started: Instant::now(),
            secure: crate::secure::SecureSessions::open(&config.node.state_dir)?,
            train: crate::train::TrainJobs::default(),
            coordinator,
            policy: RwLock::new(PolicyState { policy, modified }),
            config_path: config.source.clone(),
        })
    }

    /// The coordinator's public key, which signs every task.
    pub fn coordinator(&self) -> &PublicKey {
        &self.coordinator
    }

    /// The policy in force, re-read from node.toml if the file changed. A
    /// file that no longer parses keeps the previous policy (and says so in
    /// the log and the audit log).
    pub fn policy(&self) -> Result<Policy> {
        let modified = self
            .config_path
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .and_then(|m| m.modified().ok());
        {
            let state = self
                .policy
                .read()
                .map_err(|_| NodeError::Ledger("policy lock poisoned".into()))?;
            if modified.is_none() || modified == state.modified {
                return Ok(state.policy.clone());
            }
        }
        let mut state = self
            .policy
            .write()
            .map_err(|_| NodeError::Ledger("policy lock poisoned".into()))?;
        if modified != state.modified {
            state.modified = modified;
            let path = self
                .config_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let reloaded = self
                .config_path
                .as_ref()
                .ok_or_else(|| NodeError::Config("no config file".into()))
                .and_then(|p| NodeConfig::load(p))
                .and_then(|c| Policy::from_config(&c.policy));
            let (decision, reason) = match reloaded {
                Ok(policy) if policy == state.policy => return Ok(state.policy.clone()),
                Ok(policy) => {
                    info!(file = %path, "policy reloaded");
                    state.policy = policy;
                    ("recorded", format!("policy reloaded from {path}"))
                }
                Err(e) => {
                    warn!(file = %path, "policy reload failed, keeping the previous policy: {e}");
                    (
                        "refused",
                        format!("policy reload failed, previous policy kept: {e}"),
                    )
                }
            };
            self.ledger.audit(&AuditEntry {
                actor: Some("steward".into()),
                kind: "policy".into(),
                decision: decision.into(),
                reason: Some(reason),
                ..Default::default()
            })?;
        }
        Ok(state.policy.clone())
    }
}

/// The Flight service of a node.
#[derive(Clone)]
pub struct NodeService {
    state: Arc<NodeState>,
}

impl NodeService {
    /// Wraps the node's state.
    pub fn new(state: Arc<NodeState>) -> Self {
        Self { state }
    }

    /// The node's state.
    pub(crate) fn state(&self) -> &NodeState {
        &self.state
    }

    pub(crate) fn refuse(&self, task: Option<&Task>, kind: ErrorKind, reason: String) -> NodeError {
        let entry = AuditEntry {
            task_id: task.map(|t| t.id),
            study: task.map(|t| t.study.clone()),
            actor: task.map(|t| t.researcher.clone()),
            kind: task.map(|t| t.kind_name()).unwrap_or("unknown").to_string(),
            decision: "refused".into(),
            reason: Some(reason.clone()),
            ..Default::default()
        };
        if let Err(e) = self.state.ledger.audit(&entry) {
            warn!("cannot audit a refusal: {e}");
            return e;
        }
        let message = format!("node {}: {reason}", self.state.name);
        NodeError::Protocol(ProtocolError::new(kind, message).with_retryable(false))
    }

    /// Checks signature, expiry, study approval and researcher; returns the
    /// verified task and the study's rules. Refusals are audited.
    pub(crate) fn admit(&self, envelope: &Envelope, policy: &Policy) -> Result<(Task, StudyRules)> {
        let task = match self.state.coordinator.verify(envelope) {
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
        let rules = match policy.study(&task.study) {
            Ok(r) => r,
            Err(why) => return Err(self.refuse(Some(&task), ErrorKind::PermissionDenied, why)),
        };
        let mut status = self.state.ledger.study_status(&task.study)?;
        if status == StudyStatus::Unknown {
            let approve = policy.approval == Approval::Auto;
            status = self.state.ledger.register_study(
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
        Ok(match self.state.ledger.study_status(study)? {
            StudyStatus::Approved {
                budget_rho: Some(b),
            } => b,
            _ => rules.budget_rho,
        })
    }

    /// Runs a task and returns the batch to release. Rows and SQL text never
    /// reach the logs: only ids, study and cost do.
    #[instrument(skip_all, fields(node = %self.state.name))]
    async fn run(&self, envelope: Envelope) -> Result<RecordBatch> {
        let policy = self.state.policy()?;
        let (task, rules) = self.admit(&envelope, &policy)?;
        match &task.kind {
            TaskKind::Query(query) => {
                self.run_query(&envelope, &task, &rules, &policy, &query.sql)
                    .await
            }
            TaskKind::Budget(b) => self.report_budget(&task, &b.study, &policy),
            TaskKind::PublicQuery(query) => self.run_public(&task, &rules, &query.sql).await,
            TaskKind::SecureQuery(_) => Err(self.refuse(
                Some(&task),
                ErrorKind::InvalidArgument,
                format!(
                    "secure queries run through the {} action, not DoGet",
                    actions::SECAGG_ROUND
                ),
            )),
            TaskKind::Train(_) | TaskKind::TrainRound(_) => Err(self.refuse(
                Some(&task),
                ErrorKind::InvalidArgument,
                format!(
                    "training runs through the {} actions, not DoGet",
                    actions::TRAIN_PREPARE
                ),
            )),
        }
    }

    /// [`actions::QUERY_CHECK`]: every check a query task passes before it
    /// reads data (signature, study, researcher, tables, per-query cap,
    /// budget), with nothing read, run or charged. Refusals are audited as
    /// when the query itself is refused.
    async fn check_query(&self, envelope: Envelope) -> Result<QueryCheck> {
        let policy = self.state.policy()?;
        let (task, rules) = self.admit(&envelope, &policy)?;
        let TaskKind::Query(query) = &task.kind else {
            return Err(self.refuse(
                Some(&task),
                ErrorKind::InvalidArgument,
                format!("{} checks query tasks only", actions::QUERY_CHECK),
            ));
        };
        let mut answer = QueryCheck {
            node: self.state.name.clone(),
            rho: 0.0,
            epsilon: 0.0,
            delta: 0.0,
            refused: None,
        };
        let checked = async {
            let plan = self
                .checked_plan(&task, &rules, &policy, &query.sql)
                .await?;
            answer.rho = plan.cost.rho;
            answer.epsilon = plan.cost.epsilon;
            answer.delta = plan.cost.delta;
            if self.state.ledger.stored(task.id)?.is_none() {
                let payload_hash = sha256_hex(envelope.payload.as_bytes());
                self.priced_charge(&task, &payload_hash, &plan, &rules)?;
            }
            Ok::<(), NodeError>(())
        }
        .await;
        match checked {
            Ok(()) => {}
            // A table this node does not publish: it takes no part, as when
            // the query itself runs (the network catalog is the union).
            Err(NodeError::Protocol(e)) if e.message.contains(NOT_IN_CATALOG) => {
                return Err(NodeError::Protocol(e));
            }
            // A refusal of this query (already audited): say why, as an answer.
            Err(NodeError::Protocol(e)) if !e.retryable => answer.refused = Some(e),
            Err(e) => return Err(e),
        }
        Ok(answer)
    }

    /// Round 0 of a secure query: admit, compute, debit, join the session.
    async fn secure_start(&self, round: SecaggRound) -> Result<serde_json::Value> {
        let envelope: Envelope = serde_json::from_value(round.payload).map_err(|e| {
            self.refuse(
                None,
                ErrorKind::InvalidArgument,
                format!("round 0 needs a signed task: {e}"),
            )
        })?;
        let policy = self.state.policy()?;
        let (task, rules) = self.admit(&envelope, &policy)?;
        let TaskKind::SecureQuery(secure) = &task.kind else {
            return Err(self.refuse(
                Some(&task),
                ErrorKind::InvalidArgument,
                "round 0 carries a secure query task".into(),
            ));
        };
        if task.id != round.task_id {
            return Err(self.refuse(
                Some(&task),
                ErrorKind::InvalidArgument,
                "the round names another task than the signed one".into(),
            ));
        }
        if self.state.ledger.stored(task.id)?.is_some() {
            return Err(self.refuse(
                Some(&task),
                ErrorKind::PermissionDenied,
                format!(
                    "secure task {} already ran here: a session is never replayed or resumed; ask again",
                    task.id
                ),
            ));
        }
        let config: confer_privacy::secagg::Config = serde_json::from_value(secure.session.clone())
            .map_err(|e| {
                self.refuse(
                    Some(&task),
                    ErrorKind::InvalidArgument,
                    format!("session parameters: {e}"),
                )
            })?;
        config.validate().map_err(|e| {
            self.refuse(
                Some(&task),
                ErrorKind::InvalidArgument,
                format!("session parameters: {e}"),
            )
        })?;
        let plan = self
            .checked_plan(&task, &rules, &policy, &secure.sql)
            .await?;
        if plan.options.aggregation != confer_query::options::Aggregation::Secure {
            return Err(self.refuse(
                Some(&task),
                ErrorKind::InvalidArgument,
                "a secure session carries a query with aggregation = 'secure'".into(),
            ));
        }
        let payload_hash = sha256_hex(envelope.payload.as_bytes());
        let charge = self.priced_charge(&task, &payload_hash, &plan, &rules)?;
        let batches = match self.run_private_sql(&task, &plan.local_sql).await {
            Ok(b) => b,
            Err(e) => return Err(self.charge_failure(&task, &charge, e)),
        };
        let min_survivors = config.min_survivors;
        let input = blocking(move || {
            let mut rng = crate::secure::os_rng()?;
            confer_query::secure::node_input(&plan, &batches, min_survivors, &mut rng)
                .map_err(NodeError::from)
        })
        .await?;
        let keys = self.state.secure.start(
            task.id,
            &self.state.name,
            config,
            &secure.members,
            &secure.identities,
            input,
        )?;
        // The debit is durable before any round that reveals data-derived values.
        let marker = format!("secure aggregation session {}", task.id).into_bytes();
        if let Err(e) = self.record(&charge, marker) {
            self.state.secure.forget(task.id)?;
            return Err(e);
        }
        self.state.secure.confirm(task.id)?;
        info!(task = %task.id, study = %task.study, rho = charge.cost.rho, "secure session joined after durable debit");
        Ok(keys)
    }

    /// Parses and compiles a query task's SQL and applies the policy's
    /// table and per-query rules.
    async fn checked_plan(
        &self,
        task: &Task,
        rules: &StudyRules,
        policy: &Policy,
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
        let plan =
            match confer_query::compile(&parsed, &self.state.query_catalog, Some(&self.state.name))
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    return Err(self.refuse(Some(task), ErrorKind::InvalidArgument, e.to_string()));
                }
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
        if let Some(cap) = policy.max_query_epsilon
            && plan.cost.epsilon > cap * (1.0 + 1e-9)
        {
            return Err(self.refuse(
                Some(task),
                ErrorKind::ResourceExhausted,
                format!(
                    "this query costs epsilon {:.4} (delta {:e}), above this node's per-query cap of epsilon {cap}: \
                     lower epsilon to at most {cap}",
                    plan.cost.epsilon, plan.cost.delta
                ),
            ));
        }
        Ok(plan)
    }

    async fn run_query(
        &self,
        envelope: &Envelope,
        task: &Task,
        rules: &StudyRules,
        policy: &Policy,
        sql: &str,
    ) -> Result<RecordBatch> {
        let payload_hash = sha256_hex(envelope.payload.as_bytes());
        // A retried task gets exactly what was released the first time.
        if let Some(stored) = self.state.ledger.stored(task.id)? {
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
            self.state.ledger.audit(&AuditEntry {
                task_id: Some(task.id),
                study: Some(task.study.clone()),
                actor: Some(task.researcher.clone()),
                kind: task.kind_name().into(),
                decision: "retried".into(),
                reason: Some(
                    "task seen before: its stored release was sent again, nothing charged".into(),
                ),
                result_hash: Some(sha256_hex(&stored.result)),
                ..Default::default()
            })?;
            info!(task = %task.id, "retried task answered from the ledger");
            if stored.result == FAILED_RELEASE {
                return Err(self.refuse(
                    Some(task),
                    ErrorKind::InvalidArgument,
                    format!("{FAILED_WHILE_RUNNING} (charged when it first ran)"),
                ));
            }
            return decode_ipc(&stored.result);
        }

        let plan = self.checked_plan(task, rules, policy, sql).await?;
        let charge = self.priced_charge(task, &payload_hash, &plan, rules)?;
        let batches = match self.run_private_sql(task, &plan.local_sql).await {
            Ok(b) => b,
            Err(e) => return Err(self.charge_failure(task, &charge, e)),
        };
        let name = self.state.name.clone();
        let id = task.id;
        let options = ReleaseOptions {
            min_group_size: policy.min_group_size,
        };
        let release_plan = plan.clone();
        let batch = blocking(move || {
            confer_query::release::release(&release_plan, &batches, &name, id, &options)
                .map_err(NodeError::from)
        })
        .await?;
        let bytes = encode_ipc(&batch)?;
        let released = self.record(&charge, bytes)?;
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
    async fn run_public(&self, task: &Task, rules: &StudyRules, sql: &str) -> Result<RecordBatch> {
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
        let batches = self.run_sql(&public.sql).await?;
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

    /// The charge for running `plan` under the study's budgets, refused
    /// (and audited) early if it would not fit now; the binding check is
    /// repeated in the transaction that records the release.
    fn priced_charge(
        &self,
        task: &Task,
        payload_hash: &str,
        plan: &confer_query::plan::FederatedPlan,
        rules: &StudyRules,
    ) -> Result<Charge> {
        let cost = Cost {
            rho: plan.cost.rho,
            epsilon: plan.cost.epsilon,
            delta: plan.cost.delta,
            selection_delta: plan.cost.selection_delta,
        };
        self.checked_charge(task, payload_hash, rules, cost)
    }

    /// The charge of `cost` for `task` under the study's budgets, refused
    /// (and audited) early if it would not fit now; the binding check is
    /// repeated in the transaction that records the release.
    pub(crate) fn checked_charge(
        &self,
        task: &Task,
        payload_hash: &str,
        rules: &StudyRules,
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
            ..Default::default()
        };
        if let Some(why) = self.state.ledger.check_budget(&charge)? {
            return Err(self.refuse(Some(task), ErrorKind::ResourceExhausted, why));
        }
        Ok(charge)
    }

    /// Runs SQL on the node's tables and collects the result.
    async fn run_sql(&self, sql: &str) -> Result<Vec<RecordBatch>> {
        self.state
            .ctx
            .sql(sql)
            .await
            .map_err(NodeError::from)?
            .collect()
            .await
            .map_err(NodeError::from)
    }

    /// Runs a DP query's local bounded SQL over person-level tables.
    ///
    /// Errors raised while running can quote a row's value (a failed
    /// conversion names it), so the reason that leaves the node, and what is
    /// logged or audited, says only what kind of thing failed. Whether an
    /// expression failed at all still depends on the rows, so such a failure
    /// is charged like a release (see [`Self::charge_failure`]).
    async fn run_private_sql(&self, task: &Task, sql: &str) -> Result<Vec<RecordBatch>> {
        use datafusion::error::DataFusionError as E;
        let planned = self.state.ctx.sql(sql).await.map_err(NodeError::from)?;
        let err = match planned.collect().await {
            Ok(batches) => return Ok(batches),
            Err(e) => e,
        };
        let root = E::find_root(&err);
        warn!(task = %task.id, "a DP query failed while running (message withheld)");
        Err(match root {
            E::ResourcesExhausted(_) => NodeError::Protocol(ProtocolError::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "node {}: the query ran out of memory at this node: ask again later, or with \
                     fewer groups",
                    self.state.name
                ),
            )),
            E::IoError(_) | E::ObjectStore(_) => NodeError::Protocol(ProtocolError::new(
                ErrorKind::Unavailable,
                format!(
                    "node {}: the node could not read its tables; ask again later",
                    self.state.name
                ),
            )),
            _ => NodeError::Protocol(
                ProtocolError::new(
                    ErrorKind::InvalidArgument,
                    format!("node {}: {FAILED_WHILE_RUNNING}", self.state.name),
                )
                .with_retryable(false),
            ),
        })
    }

    /// After an expression failed on this node's rows: whether it fails is
    /// a fact about the rows, so the failure is charged and recorded like a
    /// release (a retry of the task gets the same answer, charged once), and
    /// the refusal is audited. Transient failures (memory, reading) are not
    /// charged: they may pass when asked again.
    fn charge_failure(&self, task: &Task, charge: &Charge, err: NodeError) -> NodeError {
        let NodeError::Protocol(e) = &err else {
            return err;
        };
        if e.retryable {
            return err;
        }
        if let Err(e) = self.record(charge, FAILED_RELEASE.to_vec()) {
            return e;
        }
        self.refuse(
            Some(task),
            ErrorKind::InvalidArgument,
            format!("{FAILED_WHILE_RUNNING} (charged)"),
        )
    }

    /// Records the release (debit + audit) durably; refusals become errors.
    pub(crate) fn record(&self, charge: &Charge, bytes: Vec<u8>) -> Result<Vec<u8>> {
        match self.state.ledger.release(charge, bytes)? {
            Ok(bytes) => Ok(bytes),
            Err(Refusal::Budget(why)) => Err(NodeError::Protocol(
                ProtocolError::new(
                    ErrorKind::ResourceExhausted,
                    format!("node {}: {why}", self.state.name),
                )
                .with_retryable(false),
            )),
            Err(Refusal::Replay(why)) => Err(NodeError::Protocol(
                ProtocolError::new(
                    ErrorKind::PermissionDenied,
                    format!("node {}: {why}", self.state.name),
                )
                .with_retryable(false),
            )),
        }
    }

    /// `SHOW PRIVACY BUDGET`: this node's figures for one study.
    fn report_budget(&self, task: &Task, study: &str, policy: &Policy) -> Result<RecordBatch> {
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
            &self.state.name,
            study,
            &status,
            budget,
            spent,
            releases,
        )?)
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

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NodeError::Protocol(ProtocolError::internal(format!("worker failed: {e}"))))?
}

fn encode_ipc(batch: &RecordBatch) -> Result<Vec<u8>> {
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

fn decode_ipc(bytes: &[u8]) -> Result<RecordBatch> {
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

fn json_result<T: serde::Serialize>(
    value: &T,
) -> std::result::Result<arrow_flight::Result, Status> {
    let body = serde_json::to_vec(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(arrow_flight::Result::new(body))
}

#[tonic::async_trait]
impl FlightService for NodeService {
    type HandshakeStream = BoxStream<'static, std::result::Result<HandshakeResponse, Status>>;
    type ListFlightsStream = BoxStream<'static, std::result::Result<FlightInfo, Status>>;
    type DoGetStream = BoxStream<'static, std::result::Result<FlightData, Status>>;
    type DoPutStream = BoxStream<'static, std::result::Result<PutResult, Status>>;
    type DoActionStream = BoxStream<'static, std::result::Result<arrow_flight::Result, Status>>;
    type ListActionsStream = BoxStream<'static, std::result::Result<ActionType, Status>>;
    type DoExchangeStream = BoxStream<'static, std::result::Result<FlightData, Status>>;

    async fn handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> std::result::Result<Response<Self::HandshakeStream>, Status> {
        Err(Status::unimplemented("nodes need no handshake"))
    }

    async fn list_flights(
        &self,
        _request: Request<Criteria>,
    ) -> std::result::Result<Response<Self::ListFlightsStream>, Status> {
        Err(Status::unimplemented(
            "nodes list no flights: send a task with DoGet",
        ))
    }

    async fn get_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        Err(Status::unimplemented("send a task with DoGet"))
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented("send a task with DoGet"))
    }

    async fn get_schema(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<SchemaResult>, Status> {
        Err(Status::unimplemented("send a task with DoGet"))
    }

    #[instrument(skip_all)]
    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<Self::DoGetStream>, Status> {
        let envelope = match Envelope::from_bytes(&request.into_inner().ticket) {
            Ok(e) => e,
            Err(e) => {
                let err = self.refuse(None, ErrorKind::InvalidArgument, e.message);
                return Err(err.into());
            }
        };
        let batch = match self.run(envelope).await {
            Ok(b) => b,
            Err(e) => {
                let err = ProtocolError::from(e);
                warn!(kind = ?err.kind, "task refused or failed: {}", err.message);
                return Err(err.into());
            }
        };
        let schema = batch.schema();
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(futures::stream::iter([Ok(batch)]))
            .map_err(Status::from);
        Ok(Response::new(stream.boxed()))
    }

    async fn do_put(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> std::result::Result<Response<Self::DoPutStream>, Status> {
        Err(Status::permission_denied("nodes accept no data"))
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> std::result::Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("no exchange is served here"))
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> std::result::Result<Response<Self::DoActionStream>, Status> {
        let action = request.into_inner();
        let result = match action.r#type.as_str() {
            actions::CATALOG => json_result(&self.state.catalog)?,
            actions::SECAGG_IDENTITY => json_result(&SecaggIdentity {
                key: self.state.secure.identity(),
                min_group_size: self
                    .state
                    .policy()
                    .map_err(|e| Status::unavailable(e.to_string()))?
                    .min_group_size,
            })?,
            actions::QUERY_CHECK => {
                let envelope = Envelope::from_bytes(&action.body).map_err(|e| {
                    Status::from(self.refuse(None, ErrorKind::InvalidArgument, e.message))
                })?;
                json_result(&self.check_query(envelope).await?)?
            }
            actions::SECAGG_ROUND => {
                let round: SecaggRound = serde_json::from_slice(&action.body).map_err(|e| {
                    Status::invalid_argument(format!("unreadable secure-aggregation round: {e}"))
                })?;
                let (task_id, number) = (round.task_id, round.round);
                let answer = if number == 0 {
                    self.secure_start(round).await?
                } else {
                    self.state
                        .secure
                        .step(round.task_id, round.round, round.payload)?
                };
                json_result(&SecaggRound {
                    task_id,
                    round: number,
                    payload: answer,
                })?
            }
            actions::TRAIN_PREPARE | actions::TRAIN_COMMIT => {
                let envelope = Envelope::from_bytes(&action.body).map_err(|e| {
                    Status::from(self.refuse(None, ErrorKind::InvalidArgument, e.message))
                })?;
                if action.r#type == actions::TRAIN_PREPARE {
                    json_result(&self.train_prepare(envelope).await?)?
                } else {
                    json_result(&self.train_commit(envelope).await?)?
                }
            }
            actions::TRAIN_START => {
                let round: SecaggRound = serde_json::from_slice(&action.body).map_err(|e| {
                    Status::invalid_argument(format!("unreadable training round: {e}"))
                })?;
                let (task_id, number) = (round.task_id, round.round);
                if number != 0 {
                    return Err(Status::invalid_argument(format!(
                        "{} carries round 0; rounds 1 to 4 go through {}",
                        actions::TRAIN_START,
                        actions::SECAGG_ROUND
                    )));
                }
                let answer = self.train_start(round).await?;
                json_result(&SecaggRound {
                    task_id,
                    round: number,
                    payload: answer,
                })?
            }
            actions::TRAIN_EVALUATE => {
                let request: confer_protocol::train::TrainRequest =
                    serde_json::from_slice(&action.body).map_err(|e| {
                        Status::invalid_argument(format!("unreadable evaluation request: {e}"))
                    })?;
                json_result(&self.train_evaluate(request).await?)?
            }
            actions::HEALTH => json_result(&Health {
                node: self.state.name.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                uptime_secs: self.state.started.elapsed().as_secs(),
                tables: self.state.catalog.tables.len(),
            })?,
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown action {other}: this node serves {} (list_actions describes each)",
                    [
                        actions::CATALOG,
                        actions::HEALTH,
                        actions::QUERY_CHECK,
                        actions::SECAGG_IDENTITY,
                        actions::SECAGG_ROUND,
                        actions::TRAIN_PREPARE,
                        actions::TRAIN_COMMIT,
                        actions::TRAIN_START,
                        actions::TRAIN_EVALUATE,
                    ]
                    .join(", ")
                )));
            }
        };
        Ok(Response::new(futures::stream::iter([Ok(result)]).boxed()))
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> std::result::Result<Response<Self::ListActionsStream>, Status> {
        let list = [
            (actions::CATALOG, "the node's public catalog (JSON)"),
            (actions::HEALTH, "liveness and basic facts (JSON)"),
            (
                actions::QUERY_CHECK,
                "checks a signed DP query task without running or charging it",
            ),
            (
                actions::SECAGG_IDENTITY,
                "this node's secure-aggregation identity key",
            ),
            (
                actions::SECAGG_ROUND,
                "one round of a secure-aggregation session",
            ),
            (
                actions::TRAIN_PREPARE,
                "checks a signed training job, nothing charged",
            ),
            (
                actions::TRAIN_COMMIT,
                "charges a prepared training job once",
            ),
            (actions::TRAIN_START, "round 0 of a training secure sum"),
            (
                actions::TRAIN_EVALUATE,
                "a DP evaluation of a training job's model",
            ),
        ]
        .map(|(t, d)| {
            Ok(ActionType {
                r#type: t.to_string(),
                description: d.to_string(),
            })
        });
        Ok(Response::new(futures::stream::iter(list).boxed()))
    }
}
