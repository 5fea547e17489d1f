//! What a node computes for a round (its clipped, noised update or
//! gradient sum, encoded for the secure sum) and for an evaluation.

use confer_models::job::{
    Clipping, EVAL_L2_SENSITIVITY, Weighting, eval_vector, gradient_vector, moment_vector,
};
use confer_models::{Dataset, Device, LocalConfig, Model, Targets};
use confer_privacy::secagg::encoding::Encoder;
use confer_protocol::ProtocolError;
use confer_protocol::signing::sha256_hex;
use confer_protocol::train::{TrainEvaluation, TrainPhase, TrainRoundTask, decode_f32};

use crate::error::{NodeError, Result};

use super::*;

/// What a node notes about its input to one training round.
pub(super) struct RoundNote {
    /// For the ledger record.
    pub(super) text: String,
    /// Whether something happened worth its own audit entry (clipping,
    /// divergence).
    pub(super) notable: bool,
}

impl RoundNote {
    fn new(text: String, notable: bool) -> Self {
        Self { text, notable }
    }
}

/// The node's input to a training sum, and a note for its ledger record.
pub(super) fn node_input(
    job: &JobData,
    round: &TrainRoundTask,
    session: &confer_privacy::secagg::Config,
    me: &str,
) -> Result<(Vec<u64>, RoundNote)> {
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
            Ok((
                input,
                RoundNote::new("standardisation moments".into(), false),
            ))
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
                    RoundNote::new(
                        format!(
                            "round {} gradients: some were clipped to clip_norm {clip}",
                            round.round
                        ),
                        true,
                    )
                } else {
                    RoundNote::new(format!("round {} gradients", round.round), false)
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
                (true, _) => RoundNote::new(
                    format!(
                        "round {} training diverged: a zero update was sent",
                        round.round
                    ),
                    true,
                ),
                (false, true) => RoundNote::new(
                    format!(
                        "round {} update clipped to clip_norm {}",
                        round.round, job.spec.privacy.clip_norm
                    ),
                    true,
                ),
                (false, false) => RoundNote::new(format!("round {} update", round.round), false),
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
pub(super) fn evaluation(
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
