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
use confer_protocol::task::{Envelope, QueryCheck, SecaggIdentity, SecaggRound, Task, TaskKind};
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
use crate::gate::Failure;
use crate::ledger::{AuditEntry, Charge, Cost, Ledger, StudyStatus};
use crate::policy::{Policy, StudyRules};

/// The policy in force and the config file it came from.
struct PolicyState {
    policy: Policy,
    modified: Option<SystemTime>,
}

/// The compiler's words for a table this node's catalog lacks.
const NOT_IN_CATALOG: &str = "is not in the network catalog";

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
    /// Tasks running now (see [`crate::gate::Slot`]).
    pub(crate) running: Arc<std::sync::atomic::AtomicUsize>,
    /// Refusals of requests without a verified task, audited in summary.
    pub unverified: crate::gate::Unverified,
    /// This node's TLS files: its certificate and key prove its
    /// secure-aggregation identity to peers, and the CA checks theirs.
    pub(crate) tls: Option<confer_transport::TlsFiles>,
    coordinator: PublicKey,
    policy: RwLock<PolicyState>,
    config_path: Option<PathBuf>,
}

impl NodeState {
    /// Loads the config's tables (validating them) and opens its ledger.
    pub async fn open(config: &NodeConfig) -> Result<Self> {
        let ctx = SessionContext::new();
        let catalog = crate::catalog::load(config, &ctx).await?;
        let unique = crate::catalog::unique_public_columns(&ctx, &catalog).await?;
        let ledger = Arc::new(Ledger::open(&config.node.state_dir)?);
        // A node never serves on a ledger that fails its own check: an
        // edited, truncated or replaced ledger could refund budget.
        let check = ledger.verify()?;
        if let Some(problem) = check.problem {
            return Err(NodeError::Config(format!(
                "the ledger in {} fails its check after {} good audit records: {problem}. The node \
                 does not start on a ledger that may have been reset or edited: restore node.state_dir \
                 from a backup (`confer audit verify --config ...` checks it)",
                config.node.state_dir.display(),
                check.records
            )));
        }
        let mut state = Self::new(config, ctx, catalog, ledger)?;
        for (table, column) in unique {
            state.query_catalog.set_unique(&table, &column);
        }
        Ok(state)
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
            running: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            unverified: crate::gate::Unverified::default(),
            tls: config.tls.clone(),
            coordinator,
            policy: RwLock::new(PolicyState { policy, modified }),
            config_path: config.source.clone(),
        })
    }

    /// This node's proof of its secure-aggregation identity key: its
    /// certificate and a signature by its TLS key (none without TLS).
    pub fn identity_proof(&self) -> Option<confer_protocol::task::IdentityProof> {
        let files = self.tls.as_ref()?;
        match confer_transport::identity::bind(files, &self.name, &self.secure.identity()) {
            Ok(p) => Some(p),
            Err(e) => {
                warn!("cannot prove this node's secure-aggregation identity: {e}");
                None
            }
        }
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
            TaskKind::PublicQuery(query) => {
                self.run_public(&task, &rules, &policy, &query.sql).await
            }
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
    /// reads data (signature, study, researcher, tables, costs, quota,
    /// budgets), with nothing read, run or charged. Refusals are audited as
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
                // ids (its selection levels), so it holds nothing here.
                if plan.options.aggregation != confer_query::options::Aggregation::Secure {
                    let expires_ms = lease_expiry_ms(&task);
                    if let Some(why) = self.state.ledger.reserve(&charge, expires_ms)? {
                        return Err(self.refuse(Some(&task), ErrorKind::ResourceExhausted, why));
                    }
                }
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

    /// [`actions::QUERY_RELEASE`]: a checked query will not run (another
    /// node refused it), so the budget it holds here is given back. Only a
    /// task the coordinator signed can be released, and releasing charges
    /// and reads nothing: a task that runs later is checked again in full.
    fn release_query(&self, envelope: Envelope) -> Result<bool> {
        // The signature is all a release needs: it only gives budget back,
        // so an expired task or a study denied since its check may release.
        let task = self
            .state
            .coordinator()
            .verify(&envelope)
            .map_err(|e| self.refuse(None, ErrorKind::PermissionDenied, e.message))?;
        let expires_ms = lease_expiry_ms(&task);
        let released = self.state.ledger.release_lease(task.id, expires_ms)?;
        if released {
            info!(task = %task.id, study = %task.study, "budget held for a checked query released");
        }
        Ok(released)
    }

    /// Round 0 of a secure query: admit, check the session (members bound
    /// to the network, threshold at the policy's floor), charge durably,
    /// compute, join the session.
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
        let payload_hash = sha256_hex(envelope.payload.as_bytes());
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
        let honest = self
            .check_session(
                &task,
                &policy,
                &config,
                &secure.members,
                &secure.identities,
                &secure.proofs,
                None,
            )
            .map_err(|why| self.refuse(Some(&task), ErrorKind::PermissionDenied, why))?;
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
        let work = SecureWork::new(plan, secure.step.as_ref())
            .and_then(|w| w.check(honest, config.vector_len).map(|()| w))
            .map_err(|why| self.refuse(Some(&task), ErrorKind::InvalidArgument, why))?;
        self.check_quota(&task, &policy)?;
        let slot = self.slot(&task, &policy)?;
        let charge = self.checked_charge(&task, &payload_hash, &rules, &policy, work.cost())?;
        // Checked, charged and claimed in one ledger transaction: a second
        // round 0 for this task, even a concurrent one, finds it on record.
        if self.begin(&task, &charge)?.is_some() {
            return Err(self.refuse(
                Some(&task),
                ErrorKind::PermissionDenied,
                format!(
                    "secure task {} already ran here: a session is never replayed or resumed; ask again",
                    task.id
                ),
            ));
        }
        let this = self.clone();
        let secure = secure.clone();
        let padded = work.plan().amplification.is_some();
        let limits = policy.limits.for_task(padded);
        let started = tokio::time::Instant::now();
        let worker = tokio::spawn(async move {
            let _slot = slot;
            let task = task;
            let run = std::panic::AssertUnwindSafe(this.run_limited(work.sql(), &limits));
            let batches = futures::FutureExt::catch_unwind(run)
                .await
                .unwrap_or(Err(Failure::Other));
            // Round 0 of a query one person could slow down is answered at
            // a fixed time (see run_query).
            if padded {
                tokio::time::sleep_until(started + limits.padded).await;
            }
            let batches = match batches {
                Ok(b) => b,
                Err(f) => return Err(this.charge_failure(&task, &charge, f)),
            };
            let input = blocking(move || {
                let mut rng = crate::secure::os_rng()?;
                work.input(&batches, honest, &mut rng)
            })
            .await;
            let input = match input {
                Ok(i) => i,
                Err(_) => return Err(this.charge_failure(&task, &charge, Failure::Other)),
            };
            let keys = match this.state.secure.start(
                task.id,
                &this.state.name,
                config,
                &secure.members,
                &secure.identities,
                input,
            ) {
                Ok(k) => k,
                Err(_) => return Err(this.charge_failure(&task, &charge, Failure::Other)),
            };
            // The debit is durable before any round that reveals data-derived values.
            let marker = format!("secure aggregation session {}", task.id).into_bytes();
            if let Err(e) = this.state.ledger.finish(&charge, marker) {
                this.state.secure.forget(task.id)?;
                return Err(e);
            }
            this.state.secure.confirm(task.id)?;
            info!(task = %task.id, study = %task.study, rho = charge.cost.rho, "secure session joined after durable debit");
            Ok(keys)
        });
        worker.await.map_err(|_| worker_stopped())?
    }

    /// Checks a secure-aggregation session a coordinator proposes: this node
    /// is a member once, every member is a distinct site whose identity key
    /// the node can check itself (pinned in its policy, or proven by a
    /// certificate of the network CA), the threshold is at least the
    /// policy's floor and above the number of peers assumed corrupt, and,
    /// when `allowed` is given, every member is one of those sites. Returns
    /// how many honest survivors this node sizes its noise share for.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn check_session(
        &self,
        task: &Task,
        policy: &Policy,
        config: &confer_privacy::secagg::Config,
        members: &[String],
        identities: &[String],
        proofs: &[Option<confer_protocol::task::IdentityProof>],
        allowed: Option<&[String]>,
    ) -> std::result::Result<usize, String> {
        let _ = task;
        let rules = &policy.secure;
        if members.len() != config.n || identities.len() != config.n {
            return Err(format!(
                "the session has {} members, {} identities and n = {}",
                members.len(),
                identities.len(),
                config.n
            ));
        }
        if config.min_survivors < rules.min_survivors {
            return Err(format!(
                "the session lets {} node(s) make a sum; this node's policy needs at least {} \
                 (policy.secure.min_survivors)",
                config.min_survivors, rules.min_survivors
            ));
        }
        if config.min_survivors <= rules.max_corrupt_peers {
            return Err(format!(
                "the session's threshold of {} is not above the {} peer(s) this node assumes may collude \
                 with the coordinator (policy.secure.max_corrupt_peers)",
                config.min_survivors, rules.max_corrupt_peers
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut keys = std::collections::BTreeSet::new();
        for (i, member) in members.iter().enumerate() {
            if !seen.insert(member.as_str()) {
                return Err(format!("the session lists {member} twice"));
            }
            if !keys.insert(identities[i].as_str()) {
                return Err(format!(
                    "the session gives {member} the identity key of another member"
                ));
            }
            if let Some(allowed) = allowed
                && !allowed.contains(member)
            {
                return Err(format!(
                    "the session lists {member}, which is not a site of this task"
                ));
            }
            if *member == self.state.name {
                if identities[i] != self.state.secure.identity() {
                    return Err(
                        "the session lists another identity key for this node: refused".into(),
                    );
                }
                continue;
            }
            self.verify_peer(
                member,
                &identities[i],
                proofs.get(i).and_then(Option::as_ref),
                policy,
            )?;
        }
        if !seen.contains(self.state.name.as_str()) {
            return Err(format!(
                "this node ({}) is not among the session's members",
                self.state.name
            ));
        }
        Ok(config.min_survivors - rules.max_corrupt_peers)
    }

    /// Whether `key` is `site`'s identity key, by this node's own means.
    fn verify_peer(
        &self,
        site: &str,
        key: &str,
        proof: Option<&confer_protocol::task::IdentityProof>,
        policy: &Policy,
    ) -> std::result::Result<(), String> {
        if let Some(pinned) = policy.secure.peers.get(site) {
            return if pinned.eq_ignore_ascii_case(key) {
                Ok(())
            } else {
                Err(format!(
                    "the session gives {site} a key other than the one pinned in policy.secure.peers: refused"
                ))
            };
        }
        match (&self.state.tls, proof) {
            (Some(files), Some(proof)) => {
                confer_transport::identity::verify(&files.ca, site, key, proof)
                    .map_err(|e| format!("the identity key of {site} cannot be trusted: {e}"))
            }
            (Some(_), None) => Err(format!(
                "{site} offered no certificate for its identity key, and it is not pinned in \
                 policy.secure.peers: refused"
            )),
            (None, _) => Err(format!(
                "this node cannot check the identity key of {site}: without mutual TLS, pin each peer's key \
                 in policy.secure.peers (the peer's `confer node identity` prints it)"
            )),
        }
    }

    /// Parses and compiles a query task's SQL against this node's own
    /// catalog, checks that everything it computes cannot fail on this
    /// node's tables, and applies the policy's table and cost rules.
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
        // The same check once more, against this node's tables as they are
        // read (a Parquet column may be narrower than the catalog says).
        let here = async {
            let local = confer_query::engine::analyzed(&self.state.ctx, &plan.local_sql).await?;
            confer_query::total::check_plan(&local)
        };
        if let Err(e) = here.await {
            return Err(self.refuse(Some(task), ErrorKind::InvalidArgument, e.to_string()));
        }
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

    async fn run_query(
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
                plan,
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
    async fn execute_query(
        &self,
        task: &Task,
        plan: confer_query::plan::FederatedPlan,
        charge: &Charge,
        limits: &crate::policy::Limits,
        min_group_size: u64,
    ) -> Result<RecordBatch> {
        let batches = match self.run_limited(&plan.local_sql, limits).await {
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
    async fn run_public(
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
    fn priced_charge(
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
fn worker_stopped() -> NodeError {
    NodeError::Protocol(ProtocolError::internal(
        "the task's worker stopped before it answered (the task stays charged)",
    ))
}

/// A plan's cost as the ledger records it.
fn cost_of(plan: &confer_query::plan::FederatedPlan) -> Cost {
    plan_cost(&plan.cost)
}

fn plan_cost(cost: &confer_query::plan::PlanCost) -> Cost {
    Cost {
        rho: cost.rho,
        epsilon: cost.epsilon,
        delta: cost.delta,
        selection_delta: cost.selection_delta,
    }
}

/// What one secure session of a query computes at this node: the release
/// When a lease of `task` ends (ms since the epoch): when the task itself
/// is no longer accepted (its `expires_at` second has passed).
fn lease_expiry_ms(task: &Task) -> i64 {
    i64::try_from(task.expires_at.saturating_add(1).saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// of its aggregates (over public domains, or over the keys secure
/// partition selection found), or one level of that selection.
enum SecureWork {
    Release(confer_query::plan::FederatedPlan),
    Select(
        confer_query::plan::FederatedPlan,
        confer_protocol::task::SelectStep,
        confer_query::plan::PlanCost,
    ),
}

impl SecureWork {
    /// The work of `step` for the query `plan` this node compiled itself;
    /// refuses a step the query does not have, or a level that would spend
    /// more than the query's whole share for partition selection.
    fn new(
        plan: confer_query::plan::FederatedPlan,
        step: Option<&confer_protocol::task::SecureStep>,
    ) -> std::result::Result<Self, String> {
        use confer_protocol::task::SecureStep;
        use confer_query::secure_select;
        match (step, plan.public_groups()) {
            (None, true) => Ok(Self::Release(plan)),
            (None, false) => Err(
                "this query groups by a private key: under aggregation = 'secure' it runs as \
                 secure partition selection steps, and this session names none"
                    .into(),
            ),
            (Some(_), true) => Err(
                "this query's keys all have public domains: its secure session has no selection step"
                    .into(),
            ),
            (Some(SecureStep::Release { keys }), false) => {
                secure_select::with_selected_keys(&plan, keys)
                    .map(Self::Release)
                    .map_err(|e| e.to_string())
            }
            (Some(SecureStep::Select(level)), false) => {
                if plan.key_sql.is_none() {
                    return Err("this query has no private key to select".into());
                }
                // Never more than the query's whole selection share in one level.
                if level.rho > plan.cost.per_partial * (1.0 + 1e-9) {
                    return Err(format!(
                        "selection level {} asks for rho {} and the query's share for partition \
                         selection is {}: refused",
                        level.level, level.rho, plan.cost.per_partial
                    ));
                }
                let cost = secure_select::level_cost(&plan, level).map_err(|e| e.to_string())?;
                Ok(Self::Select(plan, level.clone(), cost))
            }
        }
    }

    /// Everything that can fail without reading a row, before the charge:
    /// the vector's length against the session's, the noise calibration.
    fn check(&self, honest: usize, session_len: usize) -> std::result::Result<(), String> {
        let len = match self {
            Self::Release(p) => confer_query::secure::check_input(p, honest),
            Self::Select(p, level, _) => confer_query::secure_select::check_level(p, level, honest),
        }
        .map_err(|e| e.to_string())?;
        if len != session_len {
            return Err(format!(
                "the session expects vectors of {session_len} elements; this step gives {len}"
            ));
        }
        Ok(())
    }

    fn plan(&self) -> &confer_query::plan::FederatedPlan {
        match self {
            Self::Release(p) | Self::Select(p, _, _) => p,
        }
    }

    fn cost(&self) -> Cost {
        match self {
            Self::Release(p) => cost_of(p),
            Self::Select(_, _, c) => plan_cost(c),
        }
    }

    fn sql(&self) -> &str {
        match self {
            Self::Release(p) => &p.local_sql,
            Self::Select(p, _, _) => p.key_sql.as_deref().unwrap_or_default(),
        }
    }

    fn input(
        &self,
        batches: &[RecordBatch],
        honest: usize,
        rng: &mut confer_privacy::secagg::ChaCha20Rng,
    ) -> Result<Vec<u64>> {
        match self {
            Self::Release(p) => confer_query::secure::node_input(p, batches, honest, rng),
            Self::Select(p, level, _) => {
                confer_query::secure_select::level_input(p, level, batches, honest, rng)
            }
        }
        .map_err(NodeError::from)
    }
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
            actions::SECAGG_IDENTITY => {
                let policy = self
                    .state
                    .policy()
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                json_result(&SecaggIdentity {
                    key: self.state.secure.identity(),
                    min_group_size: policy.min_group_size,
                    proof: self.state.identity_proof(),
                    max_corrupt_peers: policy.secure.max_corrupt_peers,
                })?
            }
            actions::QUERY_CHECK => {
                let envelope = Envelope::from_bytes(&action.body).map_err(|e| {
                    Status::from(self.refuse(None, ErrorKind::InvalidArgument, e.message))
                })?;
                json_result(&self.check_query(envelope).await?)?
            }
            actions::QUERY_RELEASE => {
                let envelope = Envelope::from_bytes(&action.body).map_err(|e| {
                    Status::from(self.refuse(None, ErrorKind::InvalidArgument, e.message))
                })?;
                json_result(&serde_json::json!({ "released": self.release_query(envelope)? }))?
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
            actions::HEALTH => {
                let request: confer_protocol::catalog::HealthRequest = if action.body.is_empty() {
                    Default::default()
                } else {
                    serde_json::from_slice(&action.body).map_err(|e| {
                        Status::invalid_argument(format!("unreadable health request: {e}"))
                    })?
                };
                json_result(&Health {
                    node: self.state.name.clone(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    uptime_secs: self.state.started.elapsed().as_secs(),
                    tables: self.state.catalog.tables.len(),
                    audit: Some(self.state.ledger.head(request.anchor_seq)?),
                })?
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown action {other}: this node serves {} (list_actions describes each)",
                    [
                        actions::CATALOG,
                        actions::HEALTH,
                        actions::QUERY_CHECK,
                        actions::QUERY_RELEASE,
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
                "checks a signed DP query task without running or charging it, and holds its budget",
            ),
            (
                actions::QUERY_RELEASE,
                "gives up the budget a checked query task holds",
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
