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
use std::time::Duration;

use confer_models::ServerOptimizer;
use confer_models::job::{Clipping, JobSpec, Standardisation};
use confer_protocol::task::{Task, TaskKind};
use confer_protocol::train::{
    JobRef, JobState, JobStatus, ModelExport, StandardisationWire, TrainSubmit, TrainTask,
};
use confer_protocol::{ErrorKind, ProtocolError};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use uuid::Uuid;

use crate::secure::min_survivors;
use crate::state::CoordinatorState;
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
    task.study_info = Some(crate::state::study_info(&study));
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
        spec: spec.clone(),
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
    visible_jobs(state, user, false)
}

/// The jobs the user may see, oldest first, with their rounds if `history`.
pub fn visible_jobs(
    state: &CoordinatorState,
    user: &User,
    history: bool,
) -> Result<Vec<JobStatus>, ProtocolError> {
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
            if !history {
                j.status.history.clear();
            }
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
    let spec = &record.spec;
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

mod driver;
mod rounds;

use driver::drive;
