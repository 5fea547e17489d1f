//! One step of a job: a secure sum over the sampled sites (moments,
//! updates, gradients) and the DP evaluation.

use std::time::Instant;

use confer_models::job::{Clipping, JobSpec, Standardisation, eval_counts, read_gradient_sum};
use confer_privacy::secagg::Config;
use confer_privacy::secagg::encoding::Encoder;
use confer_protocol::task::{Task, TaskKind};
use confer_protocol::train::{
    RoundRecord, SiteMetrics, StandardisationWire, TrainEvaluation, TrainPhase, TrainRequest,
    TrainRoundTask, decode_f32, encode_f32,
};
use confer_protocol::{ProtocolError, actions};
use tracing::{info, warn};
use uuid::Uuid;

use crate::fanout::NodeHandle;
use crate::secure::{min_survivors, names, parse_keys, secure_sum, session_id};

use super::driver::Run;
use super::*;

impl Run<'_> {
    /// A signed round task and the request that carries it.
    pub(super) fn round_request(
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
    pub(super) async fn sum(
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
    pub(super) async fn moments(
        &self,
        checkpoint: &Checkpoint,
    ) -> Result<Standardisation, ProtocolError> {
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
    pub(super) fn sample(&self, round: u32, sites: &[(String, String)]) -> Vec<(String, String)> {
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
    pub(super) async fn update_round(
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
    pub(super) async fn gradient_round(
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
    pub(super) async fn evaluate(
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
        let gathered = self
            .ask_all::<TrainEvaluation>(&names, actions::TRAIN_EVALUATE, "evaluation", body)
            .await;
        for (name, e) in gathered.ok {
            match e {
                e if !e.values.is_empty() => {
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
                _ => metrics.push(SiteMetrics {
                    site: name,
                    examples: 0.0,
                    loss: None,
                    accuracy: None,
                    auc: None,
                    noise_stddev: 0.0,
                }),
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
pub(super) fn session_config(
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
pub(super) fn no_update(round: u32, dropped: Vec<(String, String)>) -> RoundRecord {
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
pub(super) fn site_metrics(
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
