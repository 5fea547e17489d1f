//! Wire types of federated training: between the coordinator and its
//! nodes, and between clients and the coordinator.
//!
//! ```text
//!  coordinator                                   node
//!  confer.train.prepare  Envelope(Train)   ────▶ admit, policy, run the feature query, split, check
//!                        TrainReady        ◀────   (nothing charged, nothing released)
//!  confer.train.commit   Envelope(Train)   ────▶ debit the whole job's cost durably
//!                        TrainCommitted    ◀────
//!  per secure sum (standardisation moments once, then one per round):
//!  confer.train.start    SecaggRound{0, TrainRequest}  ────▶ check, train, encode, record the round
//!                        SecaggRound{0, advertised keys} ◀──
//!  confer.secagg.round   rounds 1 to 4 as for secure queries
//!  per evaluated round:
//!  confer.train.evaluate TrainRequest      ────▶ evaluate the global model on the held-out split
//!                        TrainEvaluation   ◀────   (DP noise added at the node)
//! ```
//!
//! Every request carries the job's signed envelope, so a node that
//! restarted rebuilds the job from it; rounds carry their own signed
//! envelope too. The job spec travels as JSON (`confer_models::job::JobSpec`):
//! this crate does not depend on the models crate.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{ProtocolError, Result};
use crate::task::Envelope;

/// A training job, as prepared and committed at each node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainTask {
    /// The job spec (JSON of `confer_models::job::JobSpec`).
    pub job: serde_json::Value,
    /// The nodes the job trains at.
    pub sites: Vec<String>,
}

/// What a round asks of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainPhase {
    /// The standardisation moments (a secure sum, once per job).
    Moments,
    /// A model update (a secure sum, once per round).
    Update,
    /// Evaluation counts of the global model (a DP release per node).
    Evaluate,
}

impl TrainPhase {
    /// The phase's name.
    pub fn name(self) -> &'static str {
        match self {
            TrainPhase::Moments => "moments",
            TrainPhase::Update => "update",
            TrainPhase::Evaluate => "evaluate",
        }
    }
}

/// One round of a training job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRoundTask {
    /// The job (its task id).
    pub job_id: Uuid,
    /// What to do.
    pub phase: TrainPhase,
    /// Round number, 1-based (0 for the moments).
    pub round: u32,
    /// The global model's flat parameters ([`encode_f32`]), for updates and
    /// evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    /// Feature means and standard deviations, for updates and evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standardisation: Option<StandardisationWire>,
    /// The secure-aggregation session's public parameters
    /// (`confer_privacy::secagg::Config`, JSON), for secure sums.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<serde_json::Value>,
    /// Member node names of the session; a node's index is its id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// The members' secure-aggregation identity keys (hex), by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Each member's proof of its key (its certificate and a signature), by
    /// id: a node accepts a peer's key only if it can check it itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proofs: Vec<Option<crate::task::IdentityProof>>,
}

/// Feature standardisation as it travels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StandardisationWire {
    /// Means, in feature order.
    pub mean: Vec<f64>,
    /// Standard deviations, in feature order.
    pub std: Vec<f64>,
}

/// A request about a job: its signed envelope, and for rounds the round's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRequest {
    /// The signed [`TrainTask`] envelope.
    pub job: Envelope,
    /// The signed [`TrainRoundTask`] envelope, for rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<Envelope>,
}

/// A node's answer to prepare: it can run the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReady {
    /// The node.
    pub node: String,
    /// Its secure-aggregation identity key (hex).
    pub identity: String,
    /// Its proof of that key (none without TLS).
    #[serde(default)]
    pub proof: Option<crate::task::IdentityProof>,
    /// Whether a CUDA device trains there.
    pub cuda: bool,
}

/// A node's answer to commit: the job's cost is on its ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainCommitted {
    /// The node.
    pub node: String,
    /// zCDP rho charged.
    pub rho: f64,
    /// Epsilon charged.
    pub epsilon: f64,
    /// Delta charged.
    pub delta: f64,
    /// Whether this answer repeats an earlier commit (nothing charged again).
    pub repeated: bool,
}

/// A node's evaluation release: noisy counts of the global model on its
/// held-out split (`confer_models::job::eval_vector` plus noise).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainEvaluation {
    /// The node.
    pub node: String,
    /// The noisy vector.
    pub values: Vec<f64>,
    /// Standard deviation of the noise on each element.
    pub noise_stddev: f64,
}

/// A client's request to start a job at the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSubmit {
    /// The study the job runs under (its budget pays at every node).
    pub study: String,
    /// The job spec (JSON of `confer_models::job::JobSpec`).
    pub job: serde_json::Value,
}

/// A job's id, in client requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRef {
    /// The job.
    pub job_id: Uuid,
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Nodes are checking the job; nothing is charged yet.
    Preparing,
    /// Charged and training.
    Running,
    /// All rounds done.
    Finished,
    /// Stopped by an error (see the job's `error`).
    Failed,
    /// Stopped by a user.
    Cancelled,
}

impl JobState {
    /// Whether the job will not change any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Finished | JobState::Failed | JobState::Cancelled
        )
    }

    /// The state's name.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Preparing => "preparing",
            JobState::Running => "running",
            JobState::Finished => "finished",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// Metrics of one site (or the whole network) from noisy evaluation counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteMetrics {
    /// The site, or `"overall"`.
    pub site: String,
    /// Noisy number of held-out examples.
    pub examples: f64,
    /// Mean (clamped) loss.
    pub loss: Option<f64>,
    /// Accuracy at 0.5.
    pub accuracy: Option<f64>,
    /// Area under the ROC curve from score histograms.
    pub auc: Option<f64>,
    /// Standard deviation of the noise on each count.
    pub noise_stddev: f64,
}

/// What happened in one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// 1-based.
    pub round: u32,
    /// Nodes whose updates entered the sum.
    pub contributors: Vec<String>,
    /// Nodes that dropped out, with the reason.
    pub dropped: Vec<(String, String)>,
    /// Updates clipped (exact without DP training; not released with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clipped: Option<f64>,
    /// L2 norm of the mean update applied.
    pub update_norm: f64,
    /// Seconds until every node had trained and advertised its keys.
    pub local_secs: f64,
    /// Seconds of the remaining secure-aggregation rounds.
    pub secagg_secs: f64,
    /// Seconds of decoding, the server step and the checkpoint.
    pub server_secs: f64,
    /// Evaluation after this round, per site and overall.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evaluation: Vec<SiteMetrics>,
}

/// A job as the coordinator reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    /// The job.
    pub job_id: Uuid,
    /// Its name.
    pub name: String,
    /// Its study.
    pub study: String,
    /// Who submitted it.
    pub owner: String,
    /// Where it stands.
    pub state: JobState,
    /// Rounds completed.
    pub round: u32,
    /// Rounds asked for.
    pub rounds: u32,
    /// The nodes it trains at.
    pub sites: Vec<String>,
    /// Milliseconds since the epoch.
    pub created_ms: i64,
    /// Milliseconds since the epoch.
    pub updated_ms: i64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Notes along the way (standardisation source, lost rounds, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// The rounds so far.
    pub history: Vec<RoundRecord>,
    /// The privacy statement (`confer_models::job::PrivacyStatement`, JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<serde_json::Value>,
}

/// A trained model as exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelExport {
    /// The job.
    pub job_id: Uuid,
    /// Rounds the weights have been through.
    pub round: u32,
    /// The model spec (`confer_models::ModelSpec`, JSON).
    pub spec: serde_json::Value,
    /// Flat parameters ([`encode_f32`]).
    pub weights: String,
    /// Feature names, in input order.
    pub features: Vec<String>,
    /// The standardisation the model expects on its inputs.
    pub standardisation: Option<StandardisationWire>,
    /// The privacy statement.
    pub privacy: serde_json::Value,
}

/// Flat `f32` values as base64 of their little-endian bytes.
pub fn encode_f32(values: &[f32]) -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Inverse of [`encode_f32`].
pub fn decode_f32(text: &str) -> Result<Vec<f32>> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| ProtocolError::invalid(format!("weights are not base64: {e}")))?;
    if bytes.len() % 4 != 0 {
        return Err(ProtocolError::invalid(format!(
            "weights hold {} bytes, not a whole number of f32 values",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_round_trip_exactly() {
        let w = vec![0.0, -1.5, f32::MIN_POSITIVE, 3.25e7];
        assert_eq!(decode_f32(&encode_f32(&w)).expect("decode"), w);
        assert!(decode_f32("AAA=").is_err());
        assert!(decode_f32("not base64!").is_err());
    }
}
