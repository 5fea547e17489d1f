//! The training actions a node serves: prepare, commit, the secure sums'
//! round 0 and the evaluation.

use std::sync::{Arc, Mutex};

use confer_models::Device;
use confer_models::job::JobSpec;
use confer_protocol::signing::sha256_hex;
use confer_protocol::task::{Envelope, SecaggRound, Task, TaskKind, unix_now};
use confer_protocol::train::{
    TrainCommitted, TrainEvaluation, TrainPhase, TrainReady, TrainRequest, TrainRoundTask,
    TrainTask,
};
use confer_protocol::{ErrorKind, ProtocolError, actions};
use tracing::{info, instrument};

use crate::error::{NodeError, Result};
use crate::gate::{Admitted, Failure};
use crate::handler::{NodeService, blocking};
use crate::ledger::{AuditEntry, Charge, TaskState};
use crate::policy::{Policy, StudyRules};

use super::*;

/// A round request that passed every check ([`NodeService::train_round`]):
/// the job, admitted and committed here, and one signed round of it.
pub(super) struct AdmittedRound {
    /// The job's task.
    pub(super) task: Task,
    /// The job, as signed.
    pub(super) train: TrainTask,
    /// The job's data at this node.
    pub(super) job: Arc<JobData>,
    /// The round's task.
    pub(super) round_task: Task,
    /// The round, as signed.
    pub(super) round: TrainRoundTask,
    /// The round's envelope.
    pub(super) envelope: Envelope,
}

impl NodeService {
    /// `confer.train.prepare`.
    #[instrument(skip_all, fields(node = %self.state().name))]
    pub(crate) async fn train_prepare(&self, envelope: Envelope) -> Result<TrainReady> {
        let policy = self.state().policy()?;
        let Admitted {
            task,
            rules,
            kind: train,
        } = self.admit_as::<TrainTask>(&envelope, &policy, actions::TRAIN_PREPARE)?;
        // Everything that depends on no row: nothing is read or charged
        // here (the rows are read after the job's durable charge, at commit).
        self.checked_job(&envelope, &task, &train, &rules, &policy)
            .await?;
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
        let Admitted {
            task,
            rules,
            kind: train,
        } = self.admit_as::<TrainTask>(&envelope, &policy, actions::TRAIN_COMMIT)?;
        let payload_hash = sha256_hex(envelope.payload.as_bytes());
        let (spec, plan) = self
            .checked_job(&envelope, &task, &train, &rules, &policy)
            .await?;
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
        let AdmittedRound {
            task,
            train,
            job,
            round_task,
            round: r,
            envelope: round_envelope,
        } = self.train_round(&request).await?;
        if round_task.id != round.task_id {
            return Err(self.refuse(
                Some(&round_task),
                ErrorKind::InvalidArgument,
                "the session names another task than the signed round".into(),
            ));
        }
        if r.phase == TrainPhase::Evaluate {
            return Err(self.refuse(
                Some(&round_task),
                ErrorKind::InvalidArgument,
                format!(
                    "evaluation runs through {}, not a secure sum",
                    actions::TRAIN_EVALUATE
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
        check_round_inputs(&r)
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
        let input_round = r.clone();
        let input_job = job.clone();
        let me = self.state().name.clone();
        let config = session.clone();
        let (input, note) =
            match blocking(move || node_input(&input_job, &input_round, &config, &me)).await {
                Ok(input) => {
                    self.state().ledger.finish(&charge, marker)?;
                    input
                }
                // Whether it fails may depend on the rows: charged at the node's
                // floor and counted, and the message withheld.
                Err(_) => return Err(self.charge_failure(&round_task, &charge, Failure::Other)),
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
            if note.notable {
                let _ = self.state().ledger.audit(&AuditEntry {
                    task_id: Some(round_task.id),
                    study: Some(task.study.clone()),
                    actor: Some(task.researcher.clone()),
                    kind: round_task.kind_name().into(),
                    decision: "recorded".into(),
                    reason: Some(note.text.clone()),
                    ..Default::default()
                });
            }
            info!(job = %task.id, phase = r.phase.name(), round = r.round, "training sum joined after its record");
        })
    }

    /// `confer.train.evaluate`.
    #[instrument(skip_all, fields(node = %self.state().name))]
    pub(crate) async fn train_evaluate(&self, request: TrainRequest) -> Result<TrainEvaluation> {
        let AdmittedRound {
            task,
            job,
            round_task,
            round: r,
            envelope: round_envelope,
            ..
        } = self.train_round(&request).await?;
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
        check_round_inputs(&r)
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
    /// round signed, of this job and within it.
    pub(super) async fn train_round(&self, request: &TrainRequest) -> Result<AdmittedRound> {
        let policy = self.state().policy()?;
        let Admitted {
            task,
            rules,
            kind: train,
        } = self.admit_as::<TrainTask>(&request.job, &policy, "a training round request")?;
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
            .checked_job(&request.job, &task, &train, &rules, &policy)
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
            TaskKind::TrainRound(r)
                if r.job_id == task.id
                    && round.study == task.study
                    && round.researcher == task.researcher
                    && (r.phase == TrainPhase::Moments && r.round == 0
                        || r.phase != TrainPhase::Moments
                            && (1..=job.spec.rounds).contains(&r.round)) =>
            {
                Some(r.clone())
            }
            _ => None,
        };
        let Some(phase) = fits else {
            return Err(self.refuse(
                Some(&round),
                ErrorKind::InvalidArgument,
                format!(
                    "the round does not belong to job {} (study {}, {} rounds)",
                    task.id, task.study, job.spec.rounds
                ),
            ));
        };
        Ok(AdmittedRound {
            task,
            train,
            job,
            round_task: round,
            round: phase,
            envelope,
        })
    }

    /// Every check of a training job that depends on no row: its sites,
    /// spec, architecture, DP, costs, feature query (compiled against this
    /// node's catalog, tables allowed) and, before it is charged, quota and
    /// budgets. Returns the spec and its privacy plan.
    pub(super) async fn checked_job(
        &self,
        envelope: &Envelope,
        task: &Task,
        train: &TrainTask,
        rules: &StudyRules,
        policy: &Policy,
    ) -> Result<(JobSpec, confer_models::job::PrivacyPlan)> {
        let payload_hash = sha256_hex(envelope.payload.as_bytes());
        let refuse = |kind, why: String| self.refuse(Some(task), kind, why);
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
    pub(super) async fn job_data(
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
    pub(super) fn job_charge(
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
