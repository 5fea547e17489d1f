//! Federated training at the node.
//!
//! * **Prepare** (`confer.train.prepare`): admit the signed job like any
//!   task (signature, expiry, study approval, researcher), check the
//!   steward's policy (architecture, tables, per-query epsilon cap, budget),
//!   run the feature query, check its rows (one per person, finite values,
//!   binary labels with both classes) and split them. Nothing is charged
//!   and nothing leaves but "ready" or the reason it is not.
//! * **Commit** (`confer.train.commit`): debit the whole job's cost in one
//!   durable ledger transaction under the job's task id. A repeated commit
//!   charges nothing again.
//! * **Secure sums** (`confer.train.start`, then the secure-aggregation
//!   rounds): the standardisation moments once, and one model update per
//!   round. Each is allowed once per job and recorded in the ledger (at no
//!   further cost: the job paid for it) before its masked input can leave.
//!   The node derives every noise level from the job spec itself.
//! * **Evaluation** (`confer.train.evaluate`): counts of the global model
//!   on the held-out split, released with OpenDP's discrete Gaussian at the
//!   job's evaluation budget, recorded (a retry gets the same release).
//!
//! A node that restarts mid-job rebuilds its data from the job envelope
//! that every request carries; its ledger remembers what was committed and
//! released.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, Float64Array, RecordBatch};
use arrow::datatypes::DataType;
use confer_models::job::{
    Clipping, EVAL_L2_SENSITIVITY, JobSpec, Standardisation, Weighting, eval_vector,
    gradient_vector, moment_vector, split_datasets,
};
use confer_models::{Dataset, Device, LocalConfig, Model, Targets};
use confer_privacy::secagg::encoding::Encoder;
use confer_protocol::signing::sha256_hex;
use confer_protocol::task::{Envelope, SecaggRound, Task, TaskKind, unix_now};
use confer_protocol::train::{
    TrainCommitted, TrainEvaluation, TrainPhase, TrainReady, TrainRequest, TrainRoundTask,
    decode_f32,
};
use confer_protocol::{ErrorKind, ProtocolError};
use confer_query::QueryError;
use datafusion::execution::context::SQLOptions;
use tracing::{info, instrument};
use uuid::Uuid;

use crate::error::{NodeError, Result};
use crate::gate::Failure;
use crate::ledger::{AuditEntry, Charge, Cost, TaskState};
use crate::policy::{Policy, StudyRules};
use crate::service::{NodeService, blocking};

/// A job's training and held-out sets, standardised.
type Standardised = Arc<(Dataset, Dataset)>;

/// A prepared job's data, raw (unstandardised) features.
pub(crate) struct JobData {
    spec: JobSpec,
    /// The job's budget split (computed once).
    plan: confer_models::job::PrivacyPlan,
    payload_hash: String,
    bounds: Vec<[f64; 2]>,
    train: Dataset,
    test: Dataset,
    /// The last standardisation applied, with the standardised sets.
    standardised: Mutex<Option<(Vec<f64>, Standardised)>>,
    /// Serialises this job's rounds, so a round is never released twice.
    round_lock: tokio::sync::Mutex<()>,
}

/// Prepared jobs, by job id.
#[derive(Default)]
pub struct TrainJobs {
    jobs: Mutex<HashMap<Uuid, Arc<JobData>>>,
}

impl TrainJobs {
    fn get(&self, id: Uuid, payload_hash: &str) -> Option<Arc<JobData>> {
        let jobs = self.jobs.lock().ok()?;
        jobs.get(&id)
            .filter(|j| j.payload_hash == payload_hash)
            .cloned()
    }

    fn insert(&self, id: Uuid, job: Arc<JobData>) {
        if let Ok(mut jobs) = self.jobs.lock() {
            // Few jobs run at once; forget finished ones beyond a handful.
            if jobs.len() >= 16 {
                jobs.clear();
            }
            jobs.insert(id, job);
        }
    }
}

/// The ledger id of a round's record: derived from the job, phase and round.
fn round_record_id(job: Uuid, phase: TrainPhase, round: u32) -> Uuid {
    let digest = sha256_hex(format!("{job}/{}/{round}", phase.name()).as_bytes());
    let bytes = hex::decode(&digest[..32]).unwrap_or_default();
    let mut raw = [0u8; 16];
    raw.copy_from_slice(&bytes[..16]);
    Uuid::from_bytes(raw)
}

fn invalid(message: String) -> ProtocolError {
    ProtocolError::new(ErrorKind::InvalidArgument, message).with_retryable(false)
}

impl NodeService {
    /// `confer.train.prepare`.
    #[instrument(skip_all, fields(node = %self.state().name))]
    pub(crate) async fn train_prepare(&self, envelope: Envelope) -> Result<TrainReady> {
        let policy = self.state().policy()?;
        let (task, rules) = self.admit(&envelope, &policy)?;
        // Everything that depends on no row: nothing is read or charged
        // here (the rows are read after the job's durable charge, at commit).
        self.checked_job(&envelope, &task, &rules, &policy).await?;
        self.state().ledger.audit(&AuditEntry {
            task_id: Some(task.id),
            study: Some(task.study.clone()),
            actor: Some(task.researcher.clone()),
            kind: task.kind_name().into(),
            decision: "recorded".into(),
            reason: Some("training job checked: no row read, nothing charged".into()),
            ..Default::default()
        })?;
        Ok(TrainReady {
            node: self.state().name.clone(),
            identity: self.state().secure.identity(),
            proof: self.state().identity_proof(),
            cuda: Device::cuda_if_available().is_cuda(),
        })
    }

    /// `confer.train.commit`.
    #[instrument(skip_all, fields(node = %self.state().name))]
    pub(crate) async fn train_commit(&self, envelope: Envelope) -> Result<TrainCommitted> {
        let policy = self.state().policy()?;
        let (task, rules) = self.admit(&envelope, &policy)?;
        let payload_hash = sha256_hex(envelope.payload.as_bytes());
        let (spec, plan) = self.checked_job(&envelope, &task, &rules, &policy).await?;
        let repeated = match self.state().ledger.stored(task.id)? {
            Some(s) if s.payload_hash != payload_hash => {
                return Err(self.refuse(
                    Some(&task),
                    ErrorKind::PermissionDenied,
                    format!(
                        "task id {} was already used for a different task: refused as a replay",
                        task.id
                    ),
                ));
            }
            Some(s) if s.state == TaskState::Failed => {
                return Err(self.refuse(
                    Some(&task),
                    ErrorKind::FailedPrecondition,
                    format!(
                        "job {} failed while this node read its rows and was charged then; it is not run again",
                        task.id
                    ),
                ));
            }
            Some(s) if s.state == TaskState::Running => {
                return Err(self.refuse_with(
                    Some(&task),
                    ErrorKind::Unavailable,
                    format!(
                        "job {} is being committed at this node: ask again shortly",
                        task.id
                    ),
                    true,
                ));
            }
            Some(_) => true,
            None => false,
        };
        if repeated {
            // Committed before (its rows may need reading again after a
            // restart: the job paid for that).
            self.job_data(&task, &rules, &policy, &spec, plan, &payload_hash, None)
                .await?;
        } else {
            // Charged durably before a row is read; reading may fail (a
            // charged failure) or take long (padded if one person could
            // slow it down).
            let charge = self.job_charge(&task, &payload_hash, &rules, &policy, &plan)?;
            let slot = self.slot(&task, &policy)?;
            if let Some(stored) = self.begin(&task, &charge)? {
                self.answer_stored(&task, stored, &payload_hash)?;
                return Err(self.refuse(
                    Some(&task),
                    ErrorKind::FailedPrecondition,
                    format!("job {} is already on record here", task.id),
                ));
            }
            self.job_data(
                &task,
                &rules,
                &policy,
                &spec,
                plan,
                &payload_hash,
                Some(&charge),
            )
            .await?;
            drop(slot);
            self.state()
                .ledger
                .finish(&charge, b"training job committed".to_vec())?;
            info!(task = %task.id, study = %task.study, rho = plan.rho, "training job charged");
        }
        Ok(TrainCommitted {
            node: self.state().name.clone(),
            rho: plan.rho,
            epsilon: plan.epsilon,
            delta: plan.delta,
            repeated,
        })
    }

    /// Round 0 of a training secure sum: checks, computes the input, records
    /// the round, and joins the session.
    #[instrument(skip_all, fields(node = %self.state().name))]
    pub(crate) async fn train_start(&self, round: SecaggRound) -> Result<serde_json::Value> {
        let request: TrainRequest = serde_json::from_value(round.payload).map_err(|e| {
            self.refuse(
                None,
                ErrorKind::InvalidArgument,
                format!("round 0 of a training sum needs the job and round envelopes: {e}"),
            )
        })?;
        let (task, job, round_task, round_envelope) = self.train_round(&request).await?;
        if round_task.id != round.task_id {
            return Err(self.refuse(
                Some(&round_task),
                ErrorKind::InvalidArgument,
                "the session names another task than the signed round".into(),
            ));
        }
        let TaskKind::TrainRound(r) = &round_task.kind else {
            return Err(NodeError::Protocol(ProtocolError::internal(
                "checked above",
            )));
        };
        if r.phase == TrainPhase::Evaluate {
            return Err(self.refuse(
                Some(&round_task),
                ErrorKind::InvalidArgument,
                format!(
                    "evaluation runs through {}, not a secure sum",
                    confer_protocol::actions::TRAIN_EVALUATE
                ),
            ));
        }
        let session: confer_privacy::secagg::Config = r
            .session
            .clone()
            .ok_or_else(|| invalid("a training sum needs its session parameters".into()))
            .and_then(|v| {
                serde_json::from_value(v).map_err(|e| invalid(format!("session parameters: {e}")))
            })
            .map_err(|e| self.refuse(Some(&round_task), e.kind, e.message))?;
        session.validate().map_err(|e| {
            self.refuse(
                Some(&round_task),
                ErrorKind::InvalidArgument,
                format!("session parameters: {e}"),
            )
        })?;
        let floor = job.spec.min_survivors(session.n);
        if session.min_survivors < floor {
            return Err(self.refuse(
                Some(&round_task),
                ErrorKind::PermissionDenied,
                format!(
                    "the session lets {} of {} nodes make a sum; this job needs at least {floor}",
                    session.min_survivors, session.n
                ),
            ));
        }
        // The session's members are the job's sites, each once, with keys
        // this node can check itself; its threshold is the policy's floor
        // at least.
        let TaskKind::Train(train) = &task.kind else {
            return Err(NodeError::Protocol(ProtocolError::internal(
                "checked above",
            )));
        };
        let policy = self.state().policy()?;
        if policy.secure.max_corrupt_peers > 0 {
            return Err(self.refuse(
                Some(&round_task),
                ErrorKind::PermissionDenied,
                format!(
                    "this node assumes up to {} peer(s) may collude with the coordinator \
                     (policy.secure.max_corrupt_peers), and training sums size each node's noise for the \
                     session's threshold alone: a job's sums would protect this node less than its policy \
                     asks; train with a network whose stewards set max_corrupt_peers = 0",
                    policy.secure.max_corrupt_peers
                ),
            ));
        }
        self.check_session(
            &round_task,
            &policy,
            &session,
            &r.members,
            &r.identities,
            &r.proofs,
            Some(&train.sites),
        )
        .map_err(|why| self.refuse(Some(&round_task), ErrorKind::PermissionDenied, why))?;
        check_round_inputs(r)
            .map_err(|why| self.refuse(Some(&round_task), ErrorKind::InvalidArgument, why))?;
        let _guard = job.round_lock.lock().await;
        let record_id = round_record_id(task.id, r.phase, r.round);
        if self.state().ledger.stored(record_id)?.is_some() {
            return Err(self.refuse(
                Some(&round_task),
                ErrorKind::PermissionDenied,
                format!(
                    "{} of round {} of job {} was already released here: each is released once",
                    r.phase.name(),
                    r.round,
                    task.id
                ),
            ));
        }
        // The round is on record before anything is computed from the data:
        // whatever happens next, it is spent and never computed again.
        let charge = zero_charge(&round_task, record_id, &round_envelope, &policy);
        if self.begin(&round_task, &charge)?.is_some() {
            return Err(self.refuse(
                Some(&round_task),
                ErrorKind::PermissionDenied,
                format!(
                    "{} of round {} of job {} is already on record here: each is computed once",
                    r.phase.name(),
                    r.round,
                    task.id
                ),
            ));
        }
        let marker = format!("{} of round {}", r.phase.name(), r.round).into_bytes();
        let r = r.clone();
        let input_job = job.clone();
        let me = self.state().name.clone();
        let config = session.clone();
        let (input, note) = match blocking(move || node_input(&input_job, &r, &config, &me)).await {
            Ok(input) => {
                self.state().ledger.finish(&charge, marker)?;
                input
            }
            // Whether it fails may depend on the rows: charged at the node's
            // floor and counted, and the message withheld.
            Err(_) => return Err(self.charge_failure(&round_task, &charge, Failure::Other)),
        };
        let TaskKind::TrainRound(r) = &round_task.kind else {
            return Err(NodeError::Protocol(ProtocolError::internal(
                "checked above",
            )));
        };
        self.state().secure.start(
            round_task.id,
            &self.state().name,
            session,
            &r.members,
            &r.identities,
            input,
        )
        .and_then(|keys| {
            self.state().secure.confirm(round_task.id)?;
            Ok(keys)
        })
        .inspect(|_| {
            if note.contains("clipped") || note.contains("diverged") {
                let _ = self.state().ledger.audit(&AuditEntry {
                    task_id: Some(round_task.id),
                    study: Some(task.study.clone()),
                    actor: Some(task.researcher.clone()),
                    kind: round_task.kind_name().into(),
                    decision: "recorded".into(),
                    reason: Some(note.clone()),
                    ..Default::default()
                });
            }
            info!(job = %task.id, phase = r.phase.name(), round = r.round, "training sum joined after its record");
        })
    }

    /// `confer.train.evaluate`.
    #[instrument(skip_all, fields(node = %self.state().name))]
    pub(crate) async fn train_evaluate(&self, request: TrainRequest) -> Result<TrainEvaluation> {
        let (task, job, round_task, round_envelope) = self.train_round(&request).await?;
        let TaskKind::TrainRound(r) = &round_task.kind else {
            return Err(NodeError::Protocol(ProtocolError::internal(
                "checked above",
            )));
        };
        if r.phase != TrainPhase::Evaluate || !job.spec.evaluation_rounds().contains(&r.round) {
            return Err(self.refuse(
                Some(&round_task),
                ErrorKind::InvalidArgument,
                format!(
                    "job {} evaluates after rounds {:?}, not {} {}",
                    task.id,
                    job.spec.evaluation_rounds(),
                    r.phase.name(),
                    r.round
                ),
            ));
        }
        check_round_inputs(r)
            .map_err(|why| self.refuse(Some(&round_task), ErrorKind::InvalidArgument, why))?;
        let _guard = job.round_lock.lock().await;
        let record_id = round_record_id(task.id, r.phase, r.round);
        let policy = self.state().policy()?;
        let charge = zero_charge(&round_task, record_id, &round_envelope, &policy);
        // On record before anything is computed: an evaluation is computed
        // once, whatever happens (a coordinator cannot ask again with other
        // inputs after a failure).
        if let Some(stored) = self.begin(&round_task, &charge)? {
            if stored.payload_hash != charge.payload_hash {
                return Err(self.refuse(
                    Some(&round_task),
                    ErrorKind::PermissionDenied,
                    format!(
                        "evaluation of round {} of job {} was released here for another request",
                        r.round, task.id
                    ),
                ));
            }
            return match stored.state {
                TaskState::Released => serde_json::from_slice(&stored.result)
                    .map_err(|e| NodeError::Ledger(format!("stored evaluation unreadable: {e}"))),
                TaskState::Running => Err(self.refuse_with(
                    Some(&round_task),
                    ErrorKind::Unavailable,
                    format!("the evaluation of round {} is still running here", r.round),
                    true,
                )),
                TaskState::Failed => Err(self.refuse(
                    Some(&round_task),
                    ErrorKind::FailedPrecondition,
                    format!(
                        "the evaluation of round {} failed here and is not computed again",
                        r.round
                    ),
                )),
            };
        }
        let min_group_size = policy.min_group_size;
        let r = r.clone();
        let eval_job = job.clone();
        let me = self.state().name.clone();
        let release = blocking(move || evaluation(&eval_job, &r, &me, min_group_size))
            .await
            .and_then(|release| {
                serde_json::to_vec(&release)
                    .map_err(|e| NodeError::Protocol(ProtocolError::internal(e.to_string())))
            });
        let bytes = match release {
            Ok(b) => b,
            Err(_) => return Err(self.charge_failure(&round_task, &charge, Failure::Other)),
        };
        let sent = self.state().ledger.finish(&charge, bytes)?;
        serde_json::from_slice(&sent)
            .map_err(|e| NodeError::Ledger(format!("stored evaluation unreadable: {e}")))
    }

    /// Checks a round request: the job admitted and committed here, the
    /// round signed, of this job and within it. Returns the job task, its
    /// data, the round task and the round's envelope.
    async fn train_round(
        &self,
        request: &TrainRequest,
    ) -> Result<(Task, Arc<JobData>, Task, Envelope)> {
        let policy = self.state().policy()?;
        let (task, rules) = self.admit(&request.job, &policy)?;
        let payload_hash = sha256_hex(request.job.payload.as_bytes());
        match self.state().ledger.stored(task.id)? {
            Some(s) if s.payload_hash == payload_hash => {}
            _ => {
                return Err(self.refuse(
                    Some(&task),
                    ErrorKind::FailedPrecondition,
                    format!("training job {} is not committed at this node", task.id),
                ));
            }
        }
        let (spec, plan) = self
            .checked_job(&request.job, &task, &rules, &policy)
            .await?;
        let job = self
            .job_data(&task, &rules, &policy, &spec, plan, &payload_hash, None)
            .await?;
        let envelope = request.round.clone().ok_or_else(|| {
            self.refuse(
                Some(&task),
                ErrorKind::InvalidArgument,
                "a round request carries the round's signed envelope".into(),
            )
        })?;
        let round = match self.state().coordinator().verify(&envelope) {
            Ok(t) => t,
            Err(e) => return Err(self.refuse(Some(&task), ErrorKind::PermissionDenied, e.message)),
        };
        if round.is_expired_at(unix_now()) {
            return Err(self.refuse(
                Some(&round),
                ErrorKind::FailedPrecondition,
                format!("round task {} has expired", round.id),
            ));
        }
        let fits = match &round.kind {
            TaskKind::TrainRound(r) => {
                r.job_id == task.id
                    && round.study == task.study
                    && round.researcher == task.researcher
                    && (r.phase == TrainPhase::Moments && r.round == 0
                        || r.phase != TrainPhase::Moments
                            && (1..=job.spec.rounds).contains(&r.round))
            }
            _ => false,
        };
        if !fits {
            return Err(self.refuse(
                Some(&round),
                ErrorKind::InvalidArgument,
                format!(
                    "the round does not belong to job {} (study {}, {} rounds)",
                    task.id, task.study, job.spec.rounds
                ),
            ));
        }
        Ok((task, job, round, envelope))
    }

    /// Every check of a training job that depends on no row: its sites,
    /// spec, architecture, DP, costs, feature query (compiled against this
    /// node's catalog, tables allowed) and, before it is charged, quota and
    /// budgets. Returns the spec and its privacy plan.
    async fn checked_job(
        &self,
        envelope: &Envelope,
        task: &Task,
        rules: &StudyRules,
        policy: &Policy,
    ) -> Result<(JobSpec, confer_models::job::PrivacyPlan)> {
        let payload_hash = sha256_hex(envelope.payload.as_bytes());
        let refuse = |kind, why: String| self.refuse(Some(task), kind, why);
        let TaskKind::Train(train) = &task.kind else {
            return Err(refuse(
                ErrorKind::InvalidArgument,
                "a training request carries a training job task".into(),
            ));
        };
        if !train.sites.contains(&self.state().name) {
            return Err(refuse(
                ErrorKind::InvalidArgument,
                format!(
                    "this node ({}) is not among the job's sites",
                    self.state().name
                ),
            ));
        }
        // The job is parsed once; the policy is checked on every request (it
        // may have been reloaded since).
        let cached = self.state().train.get(task.id, &payload_hash);
        let (spec, plan) = match &cached {
            Some(job) => (job.spec.clone(), job.plan),
            None => {
                let spec = JobSpec::from_json_value(train.job.clone())
                    .map_err(|e| refuse(ErrorKind::InvalidArgument, e.to_string()))?;
                let plan = spec
                    .privacy_plan()
                    .map_err(|e| refuse(ErrorKind::InvalidArgument, e.to_string()))?;
                (spec, plan)
            }
        };
        let architecture = spec.model.architecture.as_str();
        if !rules.allows_model(architecture) {
            return Err(refuse(
                ErrorKind::PermissionDenied,
                format!(
                    "study {} may not train {architecture} models at this node (allowed: {})",
                    task.study,
                    if rules.models.is_empty() {
                        "none".to_string()
                    } else {
                        rules.models.join(", ")
                    }
                ),
            ));
        }
        if !spec.privacy.dp_training && !rules.allow_non_dp_training {
            return Err(refuse(
                ErrorKind::PermissionDenied,
                format!(
                    "this job trains without DP noise (privacy.dp_training = false), so its model updates \
                     are protected by secure aggregation alone; study {} may do that at this node only if \
                     the data steward allows it (allow_non_dp_training = true under \
                     [policy.studies.{}]): set dp_training = true",
                    task.study, task.study
                ),
            ));
        }
        self.check_costs(task, policy, &job_cost(&plan), spec.privacy.epsilon, None)?;
        let query = confer_query::features::feature_query(
            &spec.data.query,
            &spec.columns(),
            &self.state().query_catalog,
        )
        .await
        .map_err(|e| refuse(ErrorKind::InvalidArgument, e.to_string()))?;
        if let Some(table) = rules.forbidden_table(&query.tables) {
            return Err(refuse(
                ErrorKind::PermissionDenied,
                format!(
                    "study {} may not read table {table} at this node",
                    task.study
                ),
            ));
        }
        match self.state().ledger.stored(task.id)? {
            None => {
                self.check_quota(task, policy)?;
                self.job_charge(task, &payload_hash, rules, policy, &plan)?;
            }
            Some(s) if s.payload_hash == payload_hash && s.state == TaskState::Failed => {
                return Err(refuse(
                    ErrorKind::FailedPrecondition,
                    format!(
                        "job {} failed while this node read its rows and was charged then; it is not run again",
                        task.id
                    ),
                ));
            }
            Some(_) => {}
        }
        Ok((spec, plan))
    }

    /// The job's data: cached, else its rows read now. Call only once the
    /// job's charge is on record: at commit, with `charging` the charge just
    /// begun (a failure is then charged and stored); afterwards (a node
    /// that restarted mid-job) with `None`, and the job must be committed.
    #[allow(clippy::too_many_arguments)]
    async fn job_data(
        &self,
        task: &Task,
        rules: &StudyRules,
        policy: &Policy,
        spec: &JobSpec,
        plan: confer_models::job::PrivacyPlan,
        payload_hash: &str,
        charging: Option<&Charge>,
    ) -> Result<Arc<JobData>> {
        let refuse = |kind, why: String| self.refuse(Some(task), kind, why);
        if let Some(job) = self.state().train.get(task.id, payload_hash) {
            return Ok(job);
        }
        if charging.is_none() {
            let committed =
                self.state().ledger.stored(task.id)?.is_some_and(|s| {
                    s.payload_hash == payload_hash && s.state == TaskState::Released
                });
            if !committed {
                return Err(refuse(
                    ErrorKind::FailedPrecondition,
                    format!(
                        "job {} is not committed at this node: its rows are read only after its charge",
                        task.id
                    ),
                ));
            }
        }
        // A feature query whose work one person could multiply is read
        // within, and answered at, the padded time: its latency tells nothing.
        let padded = confer_query::features::feature_query(
            &spec.data.query,
            &spec.columns(),
            &self.state().query_catalog,
        )
        .await
        .map(|q| q.amplification.is_some())
        .unwrap_or(true);
        let limits = policy.limits.for_task(padded);
        let started = tokio::time::Instant::now();
        let ctx = self.state().task_context(&limits)?;
        let reading = std::panic::AssertUnwindSafe(job_datasets(
            &ctx,
            &self.state().query_catalog,
            spec,
            |tables| rules.forbidden_table(tables).map(str::to_string),
        ));
        let read =
            tokio::time::timeout(limits.time_limit, futures::FutureExt::catch_unwind(reading))
                .await
                .unwrap_or(Ok(Err(JobDataError::Failed(Failure::Timeout(
                    limits.time_limit,
                )))))
                .unwrap_or(Err(JobDataError::Failed(Failure::Other)));
        if padded {
            tokio::time::sleep_until(started + limits.padded).await;
        }
        let (train_set, test_set, _tables) = match read {
            Ok(sets) => sets,
            Err(e) => {
                // The rows were being read (or were about to be): charged.
                let failure = match e {
                    JobDataError::Failed(f) => f,
                    _ => Failure::Other,
                };
                return Err(match charging {
                    Some(charge) => self.charge_failure(task, charge, failure),
                    None => refuse(
                        ErrorKind::FailedPrecondition,
                        format!(
                            "this node could not read the job's rows again: {}",
                            failure.describe()
                        ),
                    ),
                });
            }
        };
        let bounds = spec
            .data
            .features
            .iter()
            .map(|f| spec.data.bounds[f])
            .collect();
        let job = Arc::new(JobData {
            spec: spec.clone(),
            plan,
            payload_hash: payload_hash.to_string(),
            bounds,
            train: train_set,
            test: test_set,
            standardised: Mutex::new(None),
            round_lock: tokio::sync::Mutex::new(()),
        });
        self.state().train.insert(task.id, job.clone());
        Ok(job)
    }

    /// The job's charge, refused early (and audited) if it would not fit.
    fn job_charge(
        &self,
        task: &Task,
        payload_hash: &str,
        rules: &StudyRules,
        policy: &Policy,
        plan: &confer_models::job::PrivacyPlan,
    ) -> Result<Charge> {
        self.checked_charge(task, payload_hash, rules, policy, job_cost(plan))
    }
}

/// A training job's cost as the ledger records it.
fn job_cost(plan: &confer_models::job::PrivacyPlan) -> Cost {
    Cost {
        rho: plan.rho,
        epsilon: plan.epsilon,
        delta: plan.delta,
        selection_delta: 0.0,
    }
}

/// Why a job's data could not be prepared.
#[derive(Debug)]
pub enum JobDataError {
    /// The feature query reads a table the study may not read.
    Forbidden(String),
    /// The query or the rows are not fit for the job (the message says why).
    Invalid(String),
    /// The node failed.
    Node(NodeError),
    /// Reading the rows failed (charged by the node).
    Failed(Failure),
}

impl std::fmt::Display for JobDataError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobDataError::Forbidden(t) => {
                write!(f, "the feature query reads table {t}, which is not allowed")
            }
            JobDataError::Invalid(why) => f.write_str(why),
            JobDataError::Node(e) => write!(f, "{e}"),
            JobDataError::Failed(failure) => f.write_str(&failure.describe()),
        }
    }
}

/// Runs a job's feature query over `ctx` (checked against `catalog`, with
/// no DDL or DML allowed), checks its rows and splits them: the training
/// and held-out sets, raw. `forbidden` names a table the query may not read.
pub async fn job_datasets(
    ctx: &datafusion::prelude::SessionContext,
    catalog: &confer_query::Catalog,
    spec: &JobSpec,
    forbidden: impl Fn(&[String]) -> Option<String>,
) -> std::result::Result<(Dataset, Dataset, Vec<String>), JobDataError> {
    let query = confer_query::features::feature_query(&spec.data.query, &spec.columns(), catalog)
        .await
        .map_err(|e| JobDataError::Invalid(e.to_string()))?;
    if let Some(table) = forbidden(&query.tables) {
        return Err(JobDataError::Forbidden(table));
    }
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    // Runtime errors can quote values (a failed cast names it): the reason
    // that leaves the node says only what failed, and the value is not logged.
    // Planning reads no row: its errors are the query's, free of charge.
    let failed = |e: datafusion::error::DataFusionError| {
        JobDataError::Invalid(format!(
            "the feature query does not plan at this node: {}",
            QueryError::from(e)
        ))
    };
    let frame = ctx
        .sql_with_options(&query.sql, options)
        .await
        .map_err(failed)?;
    let batches = frame.collect().await.map_err(|e| {
        tracing::warn!("a training job's feature query failed while reading rows");
        JobDataError::Failed(Failure::of(&e))
    })?;
    let tables = query.tables.clone();
    let spec = spec.clone();
    // The rows are read: whatever fails from here on may depend on them, so
    // it is a charged failure whose message quotes neither a value nor a
    // row number (unusable rows are dropped by read_rows, so nothing should).
    blocking(move || {
        let (features, targets) = read_rows(&spec, &batches)?;
        let (train, test) = split_datasets(&spec, features, targets)
            .map_err(|e| NodeError::Protocol(invalid(e.to_string())))?;
        Ok((train, test, tables))
    })
    .await
    .map_err(|_| {
        tracing::warn!("a training job's rows could not be prepared (message withheld)");
        JobDataError::Failed(Failure::Other)
    })
}

/// Checks what the coordinator sends with a round, before any data is
/// touched: finite weights, finite means and positive finite standard
/// deviations. (A model that overflows on some rows could otherwise make a
/// node's answer depend on them.)
fn check_round_inputs(round: &TrainRoundTask) -> std::result::Result<(), String> {
    if let Some(w) = &round.weights {
        let weights = decode_f32(w).map_err(|e| e.message)?;
        if weights.iter().any(|v| !v.is_finite()) {
            return Err("the round's weights are not all finite".into());
        }
    }
    if let Some(s) = &round.standardisation
        && (s.mean.iter().any(|m| !m.is_finite())
            || s.std.iter().any(|v| !(v.is_finite() && *v > 0.0)))
    {
        return Err(
            "the round's standardisation needs finite means and positive, finite standard deviations"
                .into(),
        );
    }
    Ok(())
}

/// A round's ledger record: no cost (the job paid), keyed by the round; a
/// round that fails is charged the node's floor.
fn zero_charge(round: &Task, record_id: Uuid, envelope: &Envelope, policy: &Policy) -> Charge {
    Charge {
        task_id: record_id,
        payload_hash: sha256_hex(envelope.payload.as_bytes()),
        study: round.study.clone(),
        researcher: round.researcher.clone(),
        kind: round.kind_name().into(),
        cost: Cost {
            rho: 0.0,
            epsilon: 0.0,
            delta: 0.0,
            selection_delta: 0.0,
        },
        study_budget: f64::INFINITY,
        researcher_budget: None,
        study_delta_budget: f64::INFINITY,
        failure_rho: policy.min_charge_rho,
        ..Default::default()
    }
}

/// Reads the feature query's rows: features (row-major, f32) and targets.
///
/// Rows that cannot be used are dropped, not refused: a row without a unit,
/// with a missing or non-finite value, or with a label (or event) other
/// than 0 and 1, and every row after the first of a unit. A refusal would
/// tell the researcher, outside any DP mechanism and without charge, that
/// such a row exists, and a feature query can make that depend on one
/// person. Only the shape of the result (columns that are not numbers) is
/// refused, which no row decides.
fn read_rows(spec: &JobSpec, batches: &[RecordBatch]) -> Result<(Vec<f32>, Targets)> {
    let bad = |m: String| NodeError::Protocol(invalid(m));
    let columns = spec.columns();
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    // Each column as numbers, None where missing or not finite.
    let column = |index: usize| -> Result<Vec<Option<f64>>> {
        let name = columns[index];
        let mut out = Vec::with_capacity(rows);
        for batch in batches {
            let array = arrow::compute::cast(batch.column(index), &DataType::Float64)
                .map_err(|e| bad(format!("column {name} cannot be read as numbers: {e}")))?;
            let values = array
                .as_any()
                .downcast_ref::<Float64Array>()
                .ok_or_else(|| bad(format!("column {name} cannot be read as numbers")))?;
            // Missing where not finite, also as the f32 the model trains on
            // (1e39 is a finite double but an infinite float).
            out.extend(
                values
                    .iter()
                    .map(|v| v.filter(|x| x.is_finite() && (*x as f32).is_finite())),
            );
        }
        Ok(out)
    };
    // Rows are ordered by the unit: a unit's rows are adjacent, and only the
    // first is kept.
    let mut keep = Vec::with_capacity(rows);
    let mut previous: Option<String> = None;
    for batch in batches {
        let units = arrow::compute::cast(batch.column(0), &DataType::Utf8)
            .map_err(|e| bad(format!("unit column {}: {e}", columns[0])))?;
        let units = units
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .ok_or_else(|| bad(format!("unit column {} unreadable", columns[0])))?;
        for unit in units.iter() {
            let first = unit.is_some_and(|u| previous.as_deref() != Some(u));
            keep.push(first);
            if let Some(u) = unit {
                previous = Some(u.to_string());
            }
        }
    }
    let width = spec.data.features.len();
    let mut feature_columns = Vec::with_capacity(width);
    for j in 0..width {
        let values = column(1 + j)?;
        for (k, v) in keep.iter_mut().zip(&values) {
            *k &= v.is_some();
        }
        feature_columns.push(values);
    }
    let binary = |v: &Option<f64>| matches!(v, Some(x) if *x == 0.0 || *x == 1.0);
    let target_at = 1 + width;
    let (labels, time, event) = if spec.data.label.is_some() {
        let labels = column(target_at)?;
        for (k, v) in keep.iter_mut().zip(&labels) {
            *k &= binary(v);
        }
        (labels, Vec::new(), Vec::new())
    } else {
        let time = column(target_at)?;
        let event = column(target_at + 1)?;
        for ((k, t), e) in keep.iter_mut().zip(&time).zip(&event) {
            *k &= t.is_some_and(|t| t >= 0.0) && binary(e);
        }
        (Vec::new(), time, event)
    };
    let kept: Vec<usize> = (0..rows).filter(|&i| keep[i]).collect();
    let mut features = vec![0f32; kept.len() * width];
    for (j, values) in feature_columns.iter().enumerate() {
        for (r, &i) in kept.iter().enumerate() {
            features[r * width + j] = values[i].unwrap_or(0.0) as f32;
        }
    }
    let value = |values: &[Option<f64>], i: usize| values[i].unwrap_or(0.0) as f32;
    let targets = if spec.data.label.is_some() {
        Targets::Binary(kept.iter().map(|&i| value(&labels, i)).collect())
    } else {
        Targets::Survival {
            time: kept.iter().map(|&i| value(&time, i)).collect(),
            event: kept.iter().map(|&i| value(&event, i) == 1.0).collect(),
        }
    };
    Ok((features, targets))
}

/// The standardised training and test sets for `wire`, cached per job.
fn standardised(job: &JobData, round: &TrainRoundTask) -> Result<Standardised> {
    let wire = round.standardisation.as_ref().ok_or_else(|| {
        NodeError::Protocol(invalid(
            "updates and evaluation need the standardisation".into(),
        ))
    })?;
    let key: Vec<f64> = wire.mean.iter().chain(&wire.std).copied().collect();
    let mut cache = job.standardised.lock().map_err(|_| {
        NodeError::Protocol(ProtocolError::internal("standardisation cache poisoned"))
    })?;
    if let Some((k, sets)) = cache.as_ref()
        && *k == key
    {
        return Ok(sets.clone());
    }
    // The coordinator's standardisation must be one its own rule can give
    // (means within the bounds, deviations at least 1% of the half-range):
    // a tiny deviation would turn values into infinities, and the node's
    // answers into a comparison of one row with a value of the coordinator's
    // choice.
    if wire.mean.len() != job.bounds.len() || wire.std.len() != job.bounds.len() {
        return Err(NodeError::Protocol(invalid(format!(
            "the standardisation has {} means and {} deviations for {} features",
            wire.mean.len(),
            wire.std.len(),
            job.bounds.len()
        ))));
    }
    for (j, &[lo, hi]) in job.bounds.iter().enumerate() {
        let half = (hi - lo) / 2.0;
        if !(wire.mean[j] >= lo && wire.mean[j] <= hi)
            || wire.std[j] < 0.01 * half * (1.0 - 1e-9)
            || wire.std[j] > 2.0 * (hi - lo).max(f64::MIN_POSITIVE)
        {
            return Err(NodeError::Protocol(invalid(format!(
                "the standardisation of feature {j} (mean {}, sd {}) is outside what the job's bounds \
                 [{lo}, {hi}] allow: refused",
                wire.mean[j], wire.std[j]
            ))));
        }
    }
    let s = Standardisation {
        mean: wire.mean.clone(),
        std: wire.std.clone(),
        source: String::new(),
    };
    let model_error = |e: confer_models::Error| NodeError::Protocol(invalid(e.to_string()));
    let rebuild = |d: &Dataset| -> Result<Dataset> {
        let x = s.apply(d.features(), &job.bounds).map_err(model_error)?;
        match d.targets().clone() {
            Targets::Binary(y) => Dataset::binary(x, d.width(), y),
            Targets::Survival { time, event } => Dataset::survival(x, d.width(), time, event),
        }
        .map_err(model_error)
    };
    let sets = Arc::new((rebuild(&job.train)?, rebuild(&job.test)?));
    *cache = Some((key, sets.clone()));
    Ok(sets)
}

/// The node's input to a training sum, and a note for its ledger record.
fn node_input(
    job: &JobData,
    round: &TrainRoundTask,
    session: &confer_privacy::secagg::Config,
    me: &str,
) -> Result<(Vec<u64>, String)> {
    let model_error = |e: confer_models::Error| NodeError::Protocol(invalid(e.to_string()));
    let mut rng = crate::secure::os_rng()?;
    let t = session.min_survivors;
    match round.phase {
        TrainPhase::Moments => {
            let encoding = job.spec.moments_encoding(t).map_err(model_error)?;
            if session.vector_len != encoding.dims || session.bits != 64 {
                return Err(NodeError::Protocol(invalid(format!(
                    "the session sums {} elements mod 2^{}; the moments need {} mod 2^64",
                    session.vector_len, session.bits, encoding.dims
                ))));
            }
            let privacy_error =
                |e: confer_privacy::PrivacyError| NodeError::Protocol(invalid(e.to_string()));
            let mut sums = vec![0i64; encoding.dims];
            for row in job.train.features().chunks(job.bounds.len()) {
                encoding
                    .accumulate(&mut sums, &moment_vector(row, &job.bounds))
                    .map_err(privacy_error)?;
            }
            let input = encoding.encode(&sums, &mut rng).map_err(privacy_error)?;
            Ok((input, "standardisation moments".into()))
        }
        TrainPhase::Update => {
            let weights = round
                .weights
                .as_deref()
                .ok_or_else(|| {
                    NodeError::Protocol(invalid("an update round needs the global weights".into()))
                })
                .and_then(|w| decode_f32(w).map_err(NodeError::Protocol))?;
            let sets = standardised(job, round)?;
            let device = Device::cuda_if_available();
            let mut model =
                Model::with_device(&job.spec.model, job.spec.seed, device).map_err(model_error)?;
            model.set_parameters(&weights).map_err(model_error)?;
            if job.spec.privacy.clipping == Clipping::Example {
                let clip = job.spec.privacy.clip_norm;
                let encoding = job
                    .spec
                    .gradient_encoding(weights.len(), t)
                    .map_err(model_error)?;
                let mut sums = vec![0i64; encoding.dims];
                let grads = confer_models::clipped_gradients(&model, &sets.0, clip, |g| {
                    encoding
                        .accumulate(&mut sums, &gradient_vector(g, clip))
                        .map_err(|e| confer_models::Error::Privacy(e.to_string()))
                })
                .map_err(model_error)?;
                if session.vector_len != encoding.dims || session.bits != 64 {
                    return Err(NodeError::Protocol(invalid(format!(
                        "the session sums {} elements mod 2^{}; the gradients need {} mod 2^64",
                        session.vector_len, session.bits, encoding.dims
                    ))));
                }
                let input = encoding
                    .encode(&sums, &mut rng)
                    .map_err(|e| NodeError::Protocol(invalid(e.to_string())))?;
                let note = if grads.clipped > 0 {
                    format!(
                        "round {} gradients: some were clipped to clip_norm {clip}",
                        round.round
                    )
                } else {
                    format!("round {} gradients", round.round)
                };
                return Ok((input, note));
            }
            let config = LocalConfig {
                seed: local_seed(job.spec.seed, round.round, me),
                ..job.spec.local.clone()
            };
            // Training that diverges (on weights from elsewhere) sends a zero
            // update rather than an error that would depend on the data.
            // So does a node without training rows (no error says so).
            let (update, examples, diverged) = if sets.0.is_empty() {
                // Train on one neutral row and discard the result, so that
                // having no row takes about as long as having one: the
                // round's latency does not tell whether a feature query
                // selected someone.
                let width = sets.0.width();
                let dummy = match sets.0.targets() {
                    Targets::Survival { .. } => {
                        Dataset::survival(vec![0.0; width], width, vec![1.0], vec![false])
                    }
                    Targets::Binary(_) => Dataset::binary(vec![0.0; width], width, vec![0.0]),
                }
                .map_err(model_error)?;
                let _ = confer_models::train_local(&mut model, &dummy, &config);
                (vec![0.0; weights.len()], 0, false)
            } else {
                match confer_models::train_local(&mut model, &sets.0, &config) {
                    Ok(r) => (r.update, r.num_examples, false),
                    Err(confer_models::Error::Diverged(_)) => {
                        (vec![0.0; weights.len()], sets.0.len(), true)
                    }
                    Err(e) => return Err(model_error(e)),
                }
            };
            let layout = job.spec.update_layout(weights.len());
            let weight = match job.spec.privacy.weighting() {
                Weighting::Uniform => 1.0,
                Weighting::Examples => {
                    (examples as f64).min(job.spec.privacy.weight_cap) / job.spec.privacy.weight_cap
                }
            };
            let (vector, clipped) = layout.node_vector(&update, weight).map_err(model_error)?;
            let encoding = job
                .spec
                .update_encoding(weights.len(), session.n, t)
                .map_err(model_error)?;
            encoding
                .check_session(session)
                .map_err(|e| NodeError::Protocol(invalid(e.to_string())))?;
            let encoder =
                Encoder::new(encoding).map_err(|e| NodeError::Protocol(invalid(e.to_string())))?;
            let encoded = encoder
                .encode(&vector, &mut rng)
                .map_err(|e| NodeError::Protocol(invalid(e.to_string())))?;
            let note = match (diverged, clipped) {
                (true, _) => format!(
                    "round {} training diverged: a zero update was sent",
                    round.round
                ),
                (false, true) => format!(
                    "round {} update clipped to clip_norm {}",
                    round.round, job.spec.privacy.clip_norm
                ),
                (false, false) => format!("round {} update", round.round),
            };
            Ok((encoded.values, note))
        }
        TrainPhase::Evaluate => Err(NodeError::Protocol(ProtocolError::internal(
            "evaluation is not a secure sum",
        ))),
    }
}

/// The local shuffling seed of a node in a round: the job's seed, the
/// round and the node's name, so nodes and rounds differ.
pub fn local_seed(job_seed: u64, round: u32, node: &str) -> u64 {
    let digest = sha256_hex(format!("{job_seed}/{round}/{node}").as_bytes());
    u64::from_str_radix(&digest[..16], 16).unwrap_or(job_seed)
}

/// The node's evaluation release: noisy counts on its held-out split.
fn evaluation(
    job: &JobData,
    round: &TrainRoundTask,
    me: &str,
    min_group_size: u64,
) -> Result<TrainEvaluation> {
    let model_error = |e: confer_models::Error| NodeError::Protocol(invalid(e.to_string()));
    let weights = round
        .weights
        .as_deref()
        .ok_or_else(|| NodeError::Protocol(invalid("evaluation needs the global weights".into())))
        .and_then(|w| decode_f32(w).map_err(NodeError::Protocol))?;
    let sets = standardised(job, round)?;
    let mut model = Model::with_device(&job.spec.model, job.spec.seed, Device::cuda_if_available())
        .map_err(model_error)?;
    model.set_parameters(&weights).map_err(model_error)?;
    let plan = job.plan;
    let config = job.spec.eval_config();
    let (exact, sensitivity) = if job.spec.model.is_classifier() {
        let counts = confer_models::evaluate_with(&model, &sets.1, &config).map_err(model_error)?;
        (eval_vector(&counts, &config), EVAL_L2_SENSITIVITY)
    } else {
        let counts =
            confer_models::evaluate_survival(&model, &sets.1, &config).map_err(model_error)?;
        // Only the counts have bounded sensitivity; the partial likelihood
        // and concordance do not (see SurvivalCounts).
        (vec![counts.examples, counts.events], 2f64.sqrt())
    };
    let noise = confer_privacy::Noise::gaussian(sensitivity, plan.evaluation_rho)
        .map_err(|e| NodeError::Protocol(invalid(format!("evaluation noise: {e}"))))?;
    let values = noise
        .apply_f64(&exact)
        .map_err(|e| NodeError::Protocol(invalid(format!("evaluation noise: {e}"))))?;
    // The small-cell rule on top of DP: a site whose noisy count of
    // held-out examples is below the threshold releases nothing.
    let values = if values.first().is_some_and(|&n| n < min_group_size as f64) {
        Vec::new()
    } else {
        values
    };
    Ok(TrainEvaluation {
        node: me.to_string(),
        values,
        noise_stddev: noise.stddev_f64(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, Int64Array, RecordBatch};

    use super::*;

    const JOB: &str = r#"
rounds = 1
seed = 1
[model]
architecture = "logistic_regression"
[data]
query = "SELECT patient, age, label FROM heart"
features = ["age"]
label = "label"
unit = "patient"
bounds = { age = [20, 90] }
[local]
budget = { steps = 1 }
batch_size = 4
learning_rate = 0.01
optimizer = { kind = "sgd" }
[server]
strategy = "fed_avg"
[privacy]
epsilon = 1.0
delta = 1e-5
"#;

    /// Unusable rows are dropped, never refused: whether one exists is a
    /// fact about single persons.
    #[test]
    fn unusable_rows_are_dropped_not_refused() {
        let spec = JobSpec::from_toml_str(JOB).expect("job");
        let batch = RecordBatch::try_from_iter([
            (
                "patient",
                Arc::new(Int64Array::from(vec![
                    Some(1),
                    Some(2),
                    Some(2),
                    Some(3),
                    Some(4),
                    Some(5),
                    None,
                    Some(6),
                ])) as _,
            ),
            (
                "age",
                Arc::new(Float64Array::from(vec![
                    Some(50.0),
                    Some(60.0),
                    Some(61.0),
                    None,
                    Some(f64::NAN),
                    Some(70.0),
                    Some(80.0),
                    Some(40.0),
                ])) as _,
            ),
            (
                "label",
                Arc::new(Float64Array::from(vec![
                    Some(1.0),
                    Some(0.0),
                    Some(1.0),
                    Some(1.0),
                    Some(0.0),
                    Some(2.0),
                    Some(1.0),
                    Some(0.0),
                ])) as _,
            ),
        ])
        .expect("batch");
        let (features, targets) = read_rows(&spec, &[batch]).expect("rows");
        // Kept: patient 1, the first row of patient 2, and patient 6.
        assert_eq!(features, vec![50.0, 60.0, 40.0]);
        let Targets::Binary(labels) = targets else {
            panic!("binary labels")
        };
        assert_eq!(labels, vec![1.0, 0.0, 0.0]);
    }
}
