//! A job's driver: prepare and commit at every site, then the moments and
//! the rounds, checkpointing after every step.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use confer_models::ServerOptimizer;
use confer_models::job::{JobSpec, Standardisation};
use confer_protocol::task::Envelope;
use confer_protocol::train::{JobState, TrainCommitted, TrainReady, decode_f32, encode_f32};
use confer_protocol::{ProtocolError, actions};
use tracing::{info, warn};
use uuid::Uuid;

use crate::fanout::{self, NodeHandle};
use crate::state::CoordinatorState;
use crate::store::{JobRecord, now_ms};

use super::rounds::no_update;
use super::*;

/// One job from wherever it stands to its end.
pub(super) async fn drive(
    state: &Arc<CoordinatorState>,
    id: Uuid,
    cancel: &AtomicBool,
) -> Result<(), ProtocolError> {
    let mut record = state
        .store()
        .job(id)
        .map_err(ProtocolError::from)?
        .ok_or_else(|| internal(format!("job {id} vanished from the store")))?;
    let spec = record.spec.clone();
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
pub(super) struct Run<'a> {
    pub(super) state: &'a Arc<CoordinatorState>,
    pub(super) spec: JobSpec,
    pub(super) envelope: Envelope,
    pub(super) study: String,
    pub(super) owner: String,
    pub(super) id: Uuid,
}

impl Run<'_> {
    pub(super) fn bounds(&self) -> Vec<[f64; 2]> {
        self.spec
            .data
            .features
            .iter()
            .map(|f| self.spec.data.bounds[f])
            .collect()
    }

    pub(super) fn save(&self, record: &mut JobRecord) -> Result<(), ProtocolError> {
        record.status.updated_ms = now_ms();
        self.state
            .store()
            .save_job(record)
            .map_err(ProtocolError::from)
    }

    /// Runs the evaluation the checkpoint says is due, and records it with
    /// its round. Nodes answer a repeated evaluation from their ledgers.
    pub(super) async fn pending_evaluation(
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

    pub(super) fn checkpoint(
        &self,
        record: &mut JobRecord,
        checkpoint: &Checkpoint,
    ) -> Result<(), ProtocolError> {
        record.checkpoint = Some(serde_json::to_string(checkpoint).map_err(internal)?);
        self.save(record)
    }

    pub(super) fn handles(&self, names: &[String]) -> Vec<NodeHandle> {
        self.state
            .nodes()
            .iter()
            .filter(|n| names.contains(&n.name))
            .cloned()
            .collect()
    }

    /// Sends `body` with `action` to the nodes among `sites`, concurrently,
    /// each under the training deadline; their answers by name.
    pub(super) async fn ask_all<T: serde::de::DeserializeOwned>(
        &self,
        sites: &[String],
        action: &'static str,
        what: &'static str,
        body: Vec<u8>,
    ) -> fanout::Gathered<T> {
        let timeout = self.round_timeout();
        fanout::gather(&self.handles(sites), what, |n| {
            let body = body.clone();
            async move { n.action_json::<T>(action, body, what, timeout).await }
        })
        .await
    }

    pub(super) fn round_timeout(&self) -> Duration {
        self.state.train_timeout()
    }

    /// Prepares the job at every site: any refusal stops it (and nothing
    /// was charged, unless an earlier run of this coordinator had sent the
    /// commits: `commit_sent`).
    pub(super) async fn prepare(
        &self,
        sites: &[String],
        commit_sent: bool,
    ) -> Result<Vec<TrainReady>, ProtocolError> {
        let body = self.envelope.to_bytes()?;
        let gathered = self
            .ask_all::<TrainReady>(sites, actions::TRAIN_PREPARE, "training readiness", body)
            .await;
        if !gathered.failures.is_empty() {
            let charged = if commit_sent {
                "nodes that committed it before the coordinator restarted keep their charge"
            } else {
                "nothing was charged anywhere"
            };
            return Err(failed(format!(
                "the job was refused, {charged}: {}",
                fanout::joined(gathered.failures).message
            )));
        }
        Ok(gathered.values())
    }

    /// Commits the prepared job at every site: each node debits it.
    pub(super) async fn commit(
        &self,
        sites: &[String],
        ready: Vec<TrainReady>,
    ) -> Result<Checkpoint, ProtocolError> {
        let body = self.envelope.to_bytes()?;
        let gathered = self
            .ask_all::<TrainCommitted>(sites, actions::TRAIN_COMMIT, "training commitment", body)
            .await;
        let failures: Vec<String> = gathered
            .failures
            .iter()
            .map(|e| e.message.clone())
            .collect();
        let committed: Vec<String> = gathered.values().into_iter().map(|c| c.node).collect();
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
        let weights = self
            .spec
            .model
            .initial_parameters(self.spec.seed)
            .map_err(|e| ProtocolError::invalid(e.to_string()))?;
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
}
