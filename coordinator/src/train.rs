//! Federated training at the coordinator: jobs, their rounds and their
//! checkpoints.
//!
//! ```text
//! submit ─▶ check (spec, study, role, feature query against the network catalog)
//!        ─▶ prepare at every site (nothing charged; any refusal stops the job here)
//!        ─▶ commit at every site (each node debits the whole job, durably)
//!        ─▶ moments: one secure sum ─▶ DP standardisation
//!        ─▶ rounds: sample nodes ─▶ secure sum of clipped (noisy) updates
//!                   ─▶ server step ─▶ evaluation (DP counts per site) ─▶ checkpoint
//! ```
//!
//! Jobs run in the background; clients follow them with
//! `confer.train.status`. The job, its signed task and its latest checkpoint
//! (global weights, server optimiser state, standardisation) are in the
//! state store after every round, so a restarted coordinator resumes every
//! unfinished job. A round that was under way when the coordinator stopped
//! is not run again (nodes release each round once; its budget share is
//! spent): the job goes on with the next round and notes the loss.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use confer_models::job::{Clipping, JobSpec, Standardisation, eval_counts, read_gradient_sum};
use confer_models::{Device, Model, ServerOptimizer};
use confer_privacy::secagg::Config;
use confer_privacy::secagg::encoding::Encoder;
use confer_protocol::task::{Envelope, Task, TaskKind};
use confer_protocol::train::{
    JobRef, JobState, JobStatus, ModelExport, RoundRecord, SiteMetrics, StandardisationWire,
    TrainCommitted, TrainEvaluation, TrainPhase, TrainReady, TrainRequest, TrainRoundTask,
    TrainSubmit, TrainTask, decode_f32, encode_f32,
};
use confer_protocol::{ErrorKind, ProtocolError, actions};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use uuid::Uuid;

use crate::fanout::{self, NodeHandle};
use crate::secure::{min_survivors, names, parse_keys, secure_sum, session_id};
use crate::service::CoordinatorState;
use crate::store::{JobRecord, Role, User, now_ms};

/// How long a job's signed task stays valid at the nodes (every round
/// carries it).
const JOB_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Rounds in a row that may fail before the job stops.
const MAX_FAILED_ROUNDS: u32 = 3;

/// Jobs running in this process, with their cancel flags.
#[derive(Default)]
pub struct Training {
    running: Mutex<HashMap<Uuid, Arc<AtomicBool>>>,
}

/// What is checkpointed after every step.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Checkpoint {
    /// Global parameters after `status.round` rounds ([`encode_f32`]).
    weights: String,
    /// The server optimiser, with its moments.
    server: ServerOptimizer,
    /// The standardisation, once known.
    standardisation: Option<Standardisation>,
    /// Sites that committed, with their secure-aggregation identity keys.
    sites: Vec<(String, String)>,
    /// Their proofs of those keys, by site (none for nodes without TLS).
    #[serde(default)]
    proofs: std::collections::BTreeMap<String, confer_protocol::task::IdentityProof>,
    /// A round (or the moments, as 0) under way when this was written.
    started: Option<u32>,
    /// Failed rounds in a row.
    failed_rounds: u32,
    /// A round whose evaluation is still to be run (after its update was
    /// checkpointed).
    #[serde(default)]
    pending_evaluation: Option<u32>,
}

fn denied(message: String) -> ProtocolError {
    ProtocolError::new(ErrorKind::PermissionDenied, message).with_retryable(false)
}

fn failed(message: String) -> ProtocolError {
    ProtocolError::new(ErrorKind::FailedPrecondition, message).with_retryable(false)
}

fn internal(e: impl std::fmt::Display) -> ProtocolError {
    ProtocolError::internal(e.to_string())
}

/// Checks and records a new job, and starts it. Nothing is sent to any
/// node before the spec, the study and the feature query are checked here.
pub async fn submit(
    state: &Arc<CoordinatorState>,
    user: &User,
    body: &[u8],
) -> Result<JobStatus, ProtocolError> {
    let request: TrainSubmit = serde_json::from_slice(body).map_err(|e| {
        ProtocolError::invalid(format!("the training request is not valid JSON: {e}"))
    })?;
    let spec = JobSpec::from_json_value(request.job.clone())
        .map_err(|e| ProtocolError::invalid(e.to_string()))?;
    let study = state.auth().study(user, &request.study)?;
    let known: Vec<String> = state.nodes().iter().map(|n| n.name.clone()).collect();
    let sites = if spec.sites.is_empty() {
        known.clone()
    } else {
        spec.sites.clone()
    };
    if let Some(unknown) = sites.iter().find(|s| !known.contains(s)) {
        return Err(ProtocolError::invalid(format!(
            "site {unknown} is not a node of this coordinator (nodes: {})",
            known.join(", ")
        )));
    }
    if sites.len() < 2 {
        return Err(ProtocolError::invalid(
            "training needs at least 2 sites: secure aggregation reveals only sums".to_string(),
        ));
    }
    if let Some(m) = spec.clients_per_round
        && m > sites.len()
    {
        return Err(ProtocolError::invalid(format!(
            "clients_per_round = {m} but the job has {} sites",
            sites.len()
        )));
    }
    let t = spec.min_survivors(spec.clients_per_round.unwrap_or(sites.len()));
    if t > sites.len() {
        return Err(ProtocolError::invalid(format!(
            "min_sites = {t} but the job has {} sites",
            sites.len()
        )));
    }
    let catalog = state.network_catalog().await?;
    let query = confer_query::features::feature_query(&spec.data.query, &spec.columns(), &catalog)
        .await
        .map_err(ProtocolError::from)?;
    if !study.tables.is_empty()
        && let Some(t) = query.tables.iter().find(|t| !study.tables.contains(t))
    {
        return Err(denied(format!(
            "study {} does not list table {t}: the feature query may read only {}",
            study.name,
            study.tables.join(", ")
        )));
    }
    let parameters = spec.model.num_parameters();
    let members = spec.clients_per_round.unwrap_or(sites.len());
    let statement = spec
        .privacy_statement(parameters, members)
        .map_err(|e| ProtocolError::invalid(e.to_string()))?;
    // The encodings must exist, before anyone is charged, for every group
    // a round (or the moments) may have: fewer nodes may commit than asked,
    // and a smaller t asks more noise of each node.
    for m in t.max(2)..=sites.len() {
        let round_t = min_survivors(m.min(members), spec.min_survivors(m.min(members)));
        match spec.privacy.clipping {
            Clipping::Update => spec
                .update_encoding(parameters, m.min(members), round_t)
                .map(|_| ()),
            Clipping::Example => spec.gradient_encoding(parameters, round_t).map(|_| ()),
        }
        .and_then(|_| spec.moments_encoding(min_survivors(m, spec.min_survivors(m))))
        .map_err(|e| ProtocolError::invalid(e.to_string()))?;
    }

    let mut task = Task::new(
        &study.name,
        &user.name,
        TaskKind::Train(TrainTask {
            job: serde_json::to_value(&spec).map_err(internal)?,
            sites: sites.clone(),
        }),
        JOB_TTL,
    )
    .for_nodes(&sites);
    task.study_info = Some(crate::service::study_info(&study));
    let envelope = state.sign(&task)?;
    let now = now_ms();
    let record = JobRecord {
        status: JobStatus {
            job_id: task.id,
            name: spec.name.clone(),
            study: study.name.clone(),
            owner: user.name.clone(),
            state: JobState::Preparing,
            round: 0,
            rounds: spec.rounds,
            sites,
            created_ms: now,
            updated_ms: now,
            error: None,
            notes: Vec::new(),
            history: Vec::new(),
            privacy: Some(serde_json::to_value(&statement).map_err(internal)?),
        },
        spec: serde_json::to_value(&spec).map_err(internal)?,
        envelope: Some(serde_json::to_string(&envelope).map_err(internal)?),
        commit_sent: false,
        checkpoint: None,
    };
    state
        .store()
        .save_job(&record)
        .map_err(ProtocolError::from)?;
    state.audit(
        &user.name,
        Some(&study.name),
        "train.submit",
        "ok",
        format!("job {}", task.id),
    );
    spawn(state.clone(), task.id);
    Ok(record.status)
}

/// Starts (or resumes) a job in the background, unless it runs already.
pub fn spawn(state: Arc<CoordinatorState>, id: Uuid) {
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let Ok(mut running) = state.training().running.lock() else {
            return;
        };
        if running.contains_key(&id) {
            return;
        }
        running.insert(id, cancel.clone());
    }
    tokio::spawn(async move {
        if let Err(e) = drive(&state, id, &cancel).await {
            warn!(job = %id, "training job failed: {}", e.message);
            if let Ok(Some(mut record)) = state.store().job(id) {
                record.status.state = JobState::Failed;
                record.status.error = Some(e.message.clone());
                record.status.updated_ms = now_ms();
                if let Err(e) = state.store().save_job(&record) {
                    warn!(job = %id, "cannot record the failure: {e}");
                }
                state.audit(
                    &record.status.owner,
                    Some(&record.status.study),
                    "train",
                    "failed",
                    format!("job {id}: {}", e.message),
                );
            }
        }
        if let Ok(mut running) = state.training().running.lock() {
            running.remove(&id);
        }
    });
}

/// Resumes every job that was preparing or running when the coordinator stopped.
pub fn resume_all(state: &Arc<CoordinatorState>) {
    match state.store().jobs() {
        Ok(jobs) => {
            for job in jobs.iter().filter(|j| !j.status.state.is_final()) {
                info!(job = %job.status.job_id, round = job.status.round, "resuming training job");
                spawn(state.clone(), job.status.job_id);
            }
        }
        Err(e) => warn!("cannot list training jobs to resume: {e}"),
    }
}

/// The job, if `user` may see it (its owner, a member of its study, or an admin).
fn visible(state: &CoordinatorState, user: &User, id: Uuid) -> Result<JobRecord, ProtocolError> {
    let record = state
        .store()
        .job(id)
        .map_err(ProtocolError::from)?
        .ok_or_else(|| ProtocolError::new(ErrorKind::NotFound, format!("no training job {id}")))?;
    if user.role != Role::Admin
        && record.status.owner != user.name
        && state.auth().study(user, &record.status.study).is_err()
    {
        return Err(denied(format!(
            "training job {id} belongs to a study you are not in"
        )));
    }
    Ok(record)
}

fn job_ref(body: &[u8]) -> Result<Uuid, ProtocolError> {
    let r: JobRef = serde_json::from_slice(body)
        .map_err(|e| ProtocolError::invalid(format!("expected {{\"job_id\": ...}}: {e}")))?;
    Ok(r.job_id)
}

/// `confer.train.status`.
pub fn status(
    state: &CoordinatorState,
    user: &User,
    body: &[u8],
) -> Result<JobStatus, ProtocolError> {
    Ok(visible(state, user, job_ref(body)?)?.status)
}

/// `confer.train.list`: the jobs the user may see, oldest first, without history.
pub fn list(state: &CoordinatorState, user: &User) -> Result<Vec<JobStatus>, ProtocolError> {
    Ok(state
        .store()
        .jobs()
        .map_err(ProtocolError::from)?
        .into_iter()
        .filter(|j| {
            user.role == Role::Admin
                || j.status.owner == user.name
                || state.auth().study(user, &j.status.study).is_ok()
        })
        .map(|mut j| {
            j.status.history.clear();
            j.status
        })
        .collect())
}

/// `confer.train.cancel`: stops the job after the step under way.
pub fn cancel(
    state: &CoordinatorState,
    user: &User,
    body: &[u8],
) -> Result<JobStatus, ProtocolError> {
    let id = job_ref(body)?;
    let mut record = visible(state, user, id)?;
    if record.status.state.is_final() {
        return Ok(record.status);
    }
    let flag = state
        .training()
        .running
        .lock()
        .map_err(|_| internal("job table lock poisoned"))?
        .get(&id)
        .cloned();
    match flag {
        Some(flag) => flag.store(true, Ordering::SeqCst),
        None => {
            record.status.state = JobState::Cancelled;
            record.status.updated_ms = now_ms();
            state
                .store()
                .save_job(&record)
                .map_err(ProtocolError::from)?;
        }
    }
    state.audit(
        &user.name,
        Some(&record.status.study),
        "train.cancel",
        "ok",
        format!("job {id}"),
    );
    Ok(record.status)
}

/// `confer.model.export`: the latest global model with what goes with it.
pub fn export(
    state: &CoordinatorState,
    user: &User,
    body: &[u8],
) -> Result<ModelExport, ProtocolError> {
    let id = job_ref(body)?;
    let record = visible(state, user, id)?;
    let checkpoint: Checkpoint = record
        .checkpoint
        .as_deref()
        .ok_or_else(|| {
            failed(format!(
                "job {id} has no model yet: it is {}",
                record.status.state.name()
            ))
        })
        .and_then(|c| serde_json::from_str(c).map_err(internal))?;
    let spec = JobSpec::from_json_value(record.spec.clone()).map_err(internal)?;
    Ok(ModelExport {
        job_id: id,
        round: record.status.round,
        spec: serde_json::to_value(&spec.model).map_err(internal)?,
        weights: checkpoint.weights,
        features: spec.data.features.clone(),
        standardisation: checkpoint.standardisation.map(|s| StandardisationWire {
            mean: s.mean,
            std: s.std,
        }),
        privacy: record.status.privacy.unwrap_or(serde_json::Value::Null),
    })
}

/// One job from wherever it stands to its end.
async fn drive(
    state: &Arc<CoordinatorState>,
    id: Uuid,
    cancel: &AtomicBool,
) -> Result<(), ProtocolError> {
    let mut record = state
        .store()
        .job(id)
        .map_err(ProtocolError::from)?
        .ok_or_else(|| internal(format!("job {id} vanished from the store")))?;
    let spec = JobSpec::from_json_value(record.spec.clone()).map_err(internal)?;
    let envelope: Envelope = record
        .envelope
        .as_deref()
        .ok_or_else(|| internal("the job was never signed"))
        .and_then(|e| serde_json::from_str(e).map_err(internal))?;
    let run = Run {
        state,
        spec,
        envelope,
        study: record.status.study.clone(),
        owner: record.status.owner.clone(),
        id,
    };
    if record.status.state == JobState::Preparing {
        let ready = run
            .prepare(&record.status.sites, record.commit_sent)
            .await?;
        record.commit_sent = true;
        run.save(&mut record)?;
        let checkpoint = run.commit(&record.status.sites, ready).await?;
        record.status.state = JobState::Running;
        record.checkpoint = Some(serde_json::to_string(&checkpoint).map_err(internal)?);
        run.save(&mut record)?;
    }
    let mut checkpoint: Checkpoint = record
        .checkpoint
        .as_deref()
        .ok_or_else(|| internal("a running job without a checkpoint"))
        .and_then(|c| serde_json::from_str(c).map_err(internal))?;

    if checkpoint.standardisation.is_none() {
        let s = if checkpoint.started == Some(0) {
            let s = Standardisation::from_bounds(&run.bounds());
            record.status.notes.push(format!(
                "the standardisation moments were under way when the coordinator stopped; features are \
                 standardised with {} instead",
                s.source
            ));
            s
        } else {
            checkpoint.started = Some(0);
            run.checkpoint(&mut record, &checkpoint)?;
            run.moments(&checkpoint).await?
        };
        record
            .status
            .notes
            .push(format!("standardisation: {}", s.source));
        checkpoint.standardisation = Some(s);
        checkpoint.started = None;
        run.checkpoint(&mut record, &checkpoint)?;
    }

    let mut global = decode_f32(&checkpoint.weights)?;
    run.pending_evaluation(&mut record, &mut checkpoint).await?;
    for round in record.status.round + 1..=run.spec.rounds {
        if cancel.load(Ordering::SeqCst) {
            record.status.state = JobState::Cancelled;
            record
                .status
                .notes
                .push(format!("cancelled before round {round}"));
            run.save(&mut record)?;
            return Ok(());
        }
        if checkpoint.started == Some(round) {
            record.status.notes.push(format!(
                "round {round} was under way when the coordinator stopped: skipped (nodes release a round once)"
            ));
            record.status.history.push(no_update(round, Vec::new()));
            record.status.round = round;
            checkpoint.started = None;
            if run.spec.evaluation_rounds().contains(&round) {
                checkpoint.pending_evaluation = Some(round);
            }
            run.checkpoint(&mut record, &checkpoint)?;
            run.pending_evaluation(&mut record, &mut checkpoint).await?;
            continue;
        }
        checkpoint.started = Some(round);
        run.checkpoint(&mut record, &checkpoint)?;
        let outcome = run.update_round(round, &mut global, &mut checkpoint).await;
        let entry = match outcome {
            Ok(entry) => {
                checkpoint.failed_rounds = 0;
                entry
            }
            Err((e, dropped)) => {
                checkpoint.failed_rounds += 1;
                warn!(job = %id, round, "round failed: {}", e.message);
                record
                    .status
                    .notes
                    .push(format!("round {round} failed: {}", e.message));
                if checkpoint.failed_rounds >= MAX_FAILED_ROUNDS {
                    return Err(failed(format!(
                        "{MAX_FAILED_ROUNDS} rounds in a row failed; the last: {}",
                        e.message
                    )));
                }
                no_update(round, dropped)
            }
        };
        // The update is checkpointed before the evaluation runs, so a
        // restart during the evaluation keeps it (and evaluates then).
        checkpoint.weights = encode_f32(&global);
        record.status.history.push(entry);
        record.status.round = round;
        checkpoint.started = None;
        if run.spec.evaluation_rounds().contains(&round) {
            checkpoint.pending_evaluation = Some(round);
        }
        run.checkpoint(&mut record, &checkpoint)?;
        run.pending_evaluation(&mut record, &mut checkpoint).await?;
    }
    record.status.state = JobState::Finished;
    run.save(&mut record)?;
    state.audit(
        &run.owner,
        Some(&run.study),
        "train",
        "ok",
        format!("job {id} finished"),
    );
    info!(job = %id, "training job finished");
    Ok(())
}

/// A job while it runs.
struct Run<'a> {
    state: &'a Arc<CoordinatorState>,
    spec: JobSpec,
    envelope: Envelope,
    study: String,
    owner: String,
    id: Uuid,
}

impl Run<'_> {
    fn bounds(&self) -> Vec<[f64; 2]> {
        self.spec
            .data
            .features
            .iter()
            .map(|f| self.spec.data.bounds[f])
            .collect()
    }

    fn save(&self, record: &mut JobRecord) -> Result<(), ProtocolError> {
        record.status.updated_ms = now_ms();
        self.state
            .store()
            .save_job(record)
            .map_err(ProtocolError::from)
    }

    /// Runs the evaluation the checkpoint says is due, and records it with
    /// its round. Nodes answer a repeated evaluation from their ledgers.
    async fn pending_evaluation(
        &self,
        record: &mut JobRecord,
        checkpoint: &mut Checkpoint,
    ) -> Result<(), ProtocolError> {
        let Some(round) = checkpoint.pending_evaluation else {
            return Ok(());
        };
        match self.evaluate(round, checkpoint).await {
            Ok(metrics) => {
                if let Some(entry) = record.status.history.iter_mut().find(|r| r.round == round) {
                    entry.evaluation = metrics;
                }
            }
            Err(e) => record.status.notes.push(format!(
                "evaluation after round {round} failed: {}",
                e.message
            )),
        }
        checkpoint.pending_evaluation = None;
        self.checkpoint(record, checkpoint)
    }

    fn checkpoint(
        &self,
        record: &mut JobRecord,
        checkpoint: &Checkpoint,
    ) -> Result<(), ProtocolError> {
        record.checkpoint = Some(serde_json::to_string(checkpoint).map_err(internal)?);
        self.save(record)
    }

    fn handles(&self, names: &[String]) -> Vec<NodeHandle> {
        self.state
            .nodes()
            .iter()
            .filter(|n| names.contains(&n.name))
            .cloned()
            .collect()
    }

    /// Sends `body` with `action` to the nodes among `sites`, concurrently,
    /// each under the training deadline; their answers by name.
    async fn ask_all<T: serde::de::DeserializeOwned>(
        &self,
        sites: &[String],
        action: &'static str,
        what: &'static str,
        body: Vec<u8>,
    ) -> Vec<(String, Result<T, ProtocolError>)> {
        let timeout = self.round_timeout();
        fanout::each(&self.handles(sites), |n| {
            let body = body.clone();
            async move { n.action_json::<T>(action, body, what, timeout).await }
        })
        .await
    }

    fn round_timeout(&self) -> Duration {
        self.state.train_timeout()
    }

    /// Prepares the job at every site: any refusal stops it (and nothing
    /// was charged, unless an earlier run of this coordinator had sent the
    /// commits: `commit_sent`).
    async fn prepare(
        &self,
        sites: &[String],
        commit_sent: bool,
    ) -> Result<Vec<TrainReady>, ProtocolError> {
        let body = self.envelope.to_bytes()?;
        let mut ready = Vec::new();
        let mut refusals = Vec::new();
        for (_, r) in self
            .ask_all::<TrainReady>(sites, actions::TRAIN_PREPARE, "training readiness", body)
            .await
        {
            match r {
                Ok(r) => ready.push(r),
                Err(e) => refusals.push(e.message),
            }
        }
        if !refusals.is_empty() {
            let charged = if commit_sent {
                "nodes that committed it before the coordinator restarted keep their charge"
            } else {
                "nothing was charged anywhere"
            };
            return Err(failed(format!(
                "the job was refused, {charged}: {}",
                refusals.join("; ")
            )));
        }
        Ok(ready)
    }

    /// Commits the prepared job at every site: each node debits it.
    async fn commit(
        &self,
        sites: &[String],
        ready: Vec<TrainReady>,
    ) -> Result<Checkpoint, ProtocolError> {
        let body = self.envelope.to_bytes()?;
        let mut committed = Vec::new();
        let mut failures = Vec::new();
        for (_, r) in self
            .ask_all::<TrainCommitted>(sites, actions::TRAIN_COMMIT, "training commitment", body)
            .await
        {
            match r {
                Ok(c) => committed.push(c.node),
                Err(e) => failures.push(e.message),
            }
        }
        let need = self
            .spec
            .min_survivors(self.spec.clients_per_round.unwrap_or(sites.len()));
        if committed.len() < need {
            return Err(failed(format!(
                "only {} sites committed the job and it needs {need}; charged at: {}; not committed: {}",
                committed.len(),
                if committed.is_empty() {
                    "none".into()
                } else {
                    committed.join(", ")
                },
                failures.join("; ")
            )));
        }
        let ready: Vec<_> = ready
            .into_iter()
            .filter(|r| committed.contains(&r.node))
            .collect();
        let proofs = ready
            .iter()
            .filter_map(|r| r.proof.clone().map(|p| (r.node.clone(), p)))
            .collect();
        let sites: Vec<(String, String)> =
            ready.into_iter().map(|r| (r.node, r.identity)).collect();
        let model = Model::with_device(&self.spec.model, self.spec.seed, Device::Cpu)
            .map_err(|e| ProtocolError::invalid(e.to_string()))?;
        let weights = model.parameters().map_err(internal)?;
        let server = ServerOptimizer::new(self.spec.server, weights.len())
            .map_err(|e| ProtocolError::invalid(e.to_string()))?;
        info!(job = %self.id, sites = sites.len(), "training job committed");
        Ok(Checkpoint {
            weights: encode_f32(&weights),
            server,
            standardisation: None,
            sites,
            proofs,
            started: None,
            failed_rounds: 0,
            pending_evaluation: None,
        })
    }

    /// A signed round task and the request that carries it.
    fn round_request(
        &self,
        phase: TrainPhase,
        round: u32,
        checkpoint: &Checkpoint,
        weights: Option<&[f32]>,
        session: Option<(&Config, &[(String, String)])>,
    ) -> Result<(Uuid, TrainRequest), ProtocolError> {
        let task = Task::new(
            &self.study,
            &self.owner,
            TaskKind::TrainRound(TrainRoundTask {
                job_id: self.id,
                phase,
                round,
                weights: weights.map(encode_f32),
                standardisation: checkpoint
                    .standardisation
                    .as_ref()
                    .map(|s| StandardisationWire {
                        mean: s.mean.clone(),
                        std: s.std.clone(),
                    }),
                session: session
                    .map(|(c, _)| serde_json::to_value(c))
                    .transpose()
                    .map_err(internal)?,
                members: session
                    .map(|(_, m)| m.iter().map(|(n, _)| n.clone()).collect())
                    .unwrap_or_default(),
                identities: session
                    .map(|(_, m)| m.iter().map(|(_, k)| k.clone()).collect())
                    .unwrap_or_default(),
                proofs: session
                    .map(|(_, m)| {
                        m.iter()
                            .map(|(n, _)| checkpoint.proofs.get(n).cloned())
                            .collect()
                    })
                    .unwrap_or_default(),
            }),
            self.state.round_ttl(),
        )
        .for_nodes(checkpoint.sites.iter().map(|(n, _)| n));
        let signed = self.state.sign(&task)?;
        Ok((
            task.id,
            TrainRequest {
                job: self.envelope.clone(),
                round: Some(signed),
            },
        ))
    }

    /// One secure sum of `phase` over `members`; returns the sum, the
    /// contributors' names, the dropouts and the two timings.
    async fn sum(
        &self,
        phase: TrainPhase,
        round: u32,
        checkpoint: &Checkpoint,
        members: &[(String, String)],
        weights: Option<&[f32]>,
        config: &Config,
    ) -> Result<
        (Vec<u64>, Vec<String>, Vec<(String, String)>, f64, f64),
        (ProtocolError, Vec<(String, String)>),
    > {
        let names: Vec<String> = members.iter().map(|(n, _)| n.clone()).collect();
        let handles = self.handles(&names);
        // Session ids follow `members` order.
        let ordered: Vec<&NodeHandle> = names
            .iter()
            .filter_map(|n| handles.iter().find(|h| &h.name == n))
            .collect();
        if ordered.len() != members.len() {
            return Err((internal("a job site is no longer configured"), Vec::new()));
        }
        let keys = parse_keys(&members.iter().map(|(_, k)| k.clone()).collect::<Vec<_>>())
            .map_err(|e| (e, Vec::new()))?;
        let (task_id, request) = self
            .round_request(phase, round, checkpoint, weights, Some((config, members)))
            .map_err(|e| (e, Vec::new()))?;
        let payload = serde_json::to_value(&request).map_err(|e| (internal(e), Vec::new()))?;
        let outcome = secure_sum(
            &ordered,
            keys,
            config,
            task_id,
            actions::TRAIN_START,
            &payload,
            self.round_timeout(),
        )
        .await?;
        let contributors = outcome
            .aggregate
            .contributors
            .iter()
            .map(|&i| names[i as usize].clone())
            .collect();
        Ok((
            outcome.aggregate.sum,
            contributors,
            outcome.dropped,
            outcome.round0_secs,
            outcome.rest_secs,
        ))
    }

    /// The standardisation from one secure sum of moments.
    async fn moments(&self, checkpoint: &Checkpoint) -> Result<Standardisation, ProtocolError> {
        let members = &checkpoint.sites;
        let t = min_survivors(members.len(), self.spec.min_survivors(members.len()));
        let encoding = self
            .spec
            .moments_encoding(t)
            .map_err(|e| ProtocolError::invalid(e.to_string()))?;
        let config = session_config(members.len(), 64, encoding.dims, session_id()?, t)?;
        let (sum, contributors, dropped, ..) = self
            .sum(TrainPhase::Moments, 0, checkpoint, members, None, &config)
            .await
            .map_err(|(e, dropped)| {
                failed(format!(
                    "the standardisation moments failed: {}; dropped: {}",
                    e.message,
                    names(&dropped)
                ))
            })?;
        if !dropped.is_empty() {
            warn!(job = %self.id, "moments: dropped {}", names(&dropped));
        }
        let decoded = encoding.decode(&sum);
        Standardisation::from_moments(
            &decoded,
            &self.bounds(),
            encoding.noise_stddev(contributors.len()),
        )
        .map_err(internal)
    }

    /// The nodes of round `round`: all sites, or a sample of
    /// `clients_per_round` drawn from the job's seed (public randomness).
    fn sample(&self, round: u32, sites: &[(String, String)]) -> Vec<(String, String)> {
        use rand::SeedableRng;
        use rand::seq::IndexedRandom;
        match self.spec.clients_per_round {
            Some(m) if m < sites.len() => {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                    self.spec.seed ^ u64::from(round).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                );
                let mut chosen: Vec<(String, String)> =
                    sites.choose_multiple(&mut rng, m).cloned().collect();
                chosen.sort();
                chosen
            }
            _ => sites.to_vec(),
        }
    }

    /// One round of training: a secure sum of updates and the server step.
    async fn update_round(
        &self,
        round: u32,
        global: &mut [f32],
        checkpoint: &mut Checkpoint,
    ) -> Result<RoundRecord, (ProtocolError, Vec<(String, String)>)> {
        let members = self.sample(round, &checkpoint.sites);
        let t = min_survivors(members.len(), self.spec.min_survivors(members.len()));
        let session = session_id().map_err(|e| (e, Vec::new()))?;
        let invalid = |e: confer_models::Error| (ProtocolError::invalid(e.to_string()), Vec::new());
        if self.spec.privacy.clipping == Clipping::Example {
            return self
                .gradient_round(round, global, checkpoint, &members, t, session)
                .await;
        }
        let encoding = self
            .spec
            .update_encoding(global.len(), members.len(), t)
            .map_err(invalid)?;
        let config = session_config(
            members.len(),
            encoding.bits,
            encoding.encoded_len(),
            session,
            t,
        )
        .map_err(|e| (e, Vec::new()))?;
        let (sum, contributors, dropped, local_secs, secagg_secs) = self
            .sum(
                TrainPhase::Update,
                round,
                checkpoint,
                &members,
                Some(global),
                &config,
            )
            .await?;
        let started = Instant::now();
        let decoded = Encoder::new(encoding)
            .and_then(|e| e.decode(&sum))
            .map_err(|e| (internal(e), dropped.clone()))?;
        let layout = self.spec.update_layout(global.len());
        let (update, weight, clipped) = layout
            .read_sum(
                &decoded,
                contributors.len(),
                1.0 / self.spec.privacy.weight_cap,
            )
            .map_err(|e| (internal(e), dropped.clone()))?;
        let mean: Vec<f32> = update.iter().map(|&u| (u / weight) as f32).collect();
        checkpoint
            .server
            .step(global, &update, weight)
            .map_err(|e| (internal(e), dropped.clone()))?;
        info!(job = %self.id, round, contributors = contributors.len(), "round applied");
        Ok(RoundRecord {
            round,
            contributors,
            dropped,
            clipped,
            update_norm: confer_models::l2_norm(&mean),
            local_secs,
            secagg_secs,
            server_secs: started.elapsed().as_secs_f64(),
            evaluation: Vec::new(),
        })
    }

    /// One round of DP-SGD across the federation (`clipping = "example"`):
    /// a secure sum of clipped per-example gradients, then a server step
    /// with `-learning_rate × mean gradient` as the update.
    async fn gradient_round(
        &self,
        round: u32,
        global: &mut [f32],
        checkpoint: &mut Checkpoint,
        members: &[(String, String)],
        t: usize,
        session: [u8; 32],
    ) -> Result<RoundRecord, (ProtocolError, Vec<(String, String)>)> {
        let encoding = self
            .spec
            .gradient_encoding(global.len(), t)
            .map_err(|e| (ProtocolError::invalid(e.to_string()), Vec::new()))?;
        let config = session_config(members.len(), 64, encoding.dims, session, t)
            .map_err(|e| (e, Vec::new()))?;
        let (sum, contributors, dropped, local_secs, secagg_secs) = self
            .sum(
                TrainPhase::Update,
                round,
                checkpoint,
                members,
                Some(global),
                &config,
            )
            .await?;
        let started = Instant::now();
        let (gradient, examples) =
            read_gradient_sum(&encoding.decode(&sum), self.spec.privacy.clip_norm)
                .map_err(|e| (internal(e), dropped.clone()))?;
        let rate = self.spec.local.learning_rate;
        let update: Vec<f64> = gradient.iter().map(|g| -rate * g / examples).collect();
        checkpoint
            .server
            .step(global, &update, 1.0)
            .map_err(|e| (internal(e), dropped.clone()))?;
        let mean: Vec<f32> = update.iter().map(|&u| u as f32).collect();
        Ok(RoundRecord {
            round,
            contributors,
            dropped,
            clipped: None,
            update_norm: confer_models::l2_norm(&mean),
            local_secs,
            secagg_secs,
            server_secs: started.elapsed().as_secs_f64(),
            evaluation: Vec::new(),
        })
    }

    /// Evaluation of the global model at every site: DP counts, per site
    /// and summed.
    async fn evaluate(
        &self,
        round: u32,
        checkpoint: &Checkpoint,
    ) -> Result<Vec<SiteMetrics>, ProtocolError> {
        let weights = decode_f32(&checkpoint.weights)?;
        let (_, request) = self.round_request(
            TrainPhase::Evaluate,
            round,
            checkpoint,
            Some(&weights),
            None,
        )?;
        let body = serde_json::to_vec(&request).map_err(internal)?;
        let names: Vec<String> = checkpoint.sites.iter().map(|(n, _)| n.clone()).collect();
        let config = self.spec.eval_config();
        let mut metrics = Vec::new();
        let mut total: Option<Vec<f64>> = None;
        let mut variance = 0.0;
        for (name, r) in self
            .ask_all::<TrainEvaluation>(&names, actions::TRAIN_EVALUATE, "evaluation", body)
            .await
        {
            match r {
                Ok(e) if !e.values.is_empty() => {
                    metrics.push(site_metrics(
                        &name,
                        &e.values,
                        e.noise_stddev,
                        &self.spec,
                        &config,
                    ));
                    variance += e.noise_stddev * e.noise_stddev;
                    match total.as_mut() {
                        Some(t) if t.len() == e.values.len() => {
                            for (a, b) in t.iter_mut().zip(&e.values) {
                                *a += b;
                            }
                        }
                        Some(_) => warn!(node = %name, "evaluation of another length: left out"),
                        None => total = Some(e.values.clone()),
                    }
                }
                Ok(_) => metrics.push(SiteMetrics {
                    site: name,
                    examples: 0.0,
                    loss: None,
                    accuracy: None,
                    auc: None,
                    noise_stddev: 0.0,
                }),
                Err(e) => warn!(node = %name, "no evaluation: {}", e.message),
            }
        }
        if let Some(t) = total {
            metrics.push(site_metrics(
                "overall",
                &t,
                variance.sqrt(),
                &self.spec,
                &config,
            ));
        }
        Ok(metrics)
    }
}

/// A secure-aggregation session of `nodes` summing `len` elements mod
/// 2^`bits`, with threshold `t`.
fn session_config(
    nodes: usize,
    bits: u32,
    len: usize,
    session: [u8; 32],
    t: usize,
) -> Result<Config, ProtocolError> {
    Config::new(nodes, bits, len, session)
        .and_then(|c| c.min_survivors(t))
        .map_err(|e| failed(format!("secure aggregation: {e}")))
}

/// The record of a round that applied no update (it failed, or was under
/// way when the coordinator stopped).
fn no_update(round: u32, dropped: Vec<(String, String)>) -> RoundRecord {
    RoundRecord {
        round,
        contributors: Vec::new(),
        dropped,
        clipped: None,
        update_norm: 0.0,
        local_secs: 0.0,
        secagg_secs: 0.0,
        server_secs: 0.0,
        evaluation: Vec::new(),
    }
}

/// Metrics from a (noisy) evaluation vector.
fn site_metrics(
    site: &str,
    values: &[f64],
    noise_stddev: f64,
    spec: &JobSpec,
    config: &confer_models::EvalConfig,
) -> SiteMetrics {
    let examples = values.first().copied().unwrap_or(0.0);
    let counts = spec
        .model
        .is_classifier()
        .then(|| eval_counts(values, config).ok())
        .flatten();
    SiteMetrics {
        site: site.to_string(),
        examples,
        loss: counts
            .as_ref()
            .and_then(|c| confer_models::mean_loss(c, config.loss_clamp)),
        accuracy: counts.as_ref().and_then(confer_models::accuracy),
        auc: counts.as_ref().and_then(|c| {
            confer_models::auc_from_histograms(&c.positive_histogram, &c.negative_histogram)
        }),
        noise_stddev,
    }
}
