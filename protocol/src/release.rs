//! Metadata attached to released values: which mechanism, how much noise,
//! what it cost. Nodes attach a [`ReleaseInfo`] to their partials; the
//! coordinator attaches a [`ResultInfo`] to the combined answer.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The privacy cost of one release, in zCDP and as (epsilon, delta).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// zCDP rho (composes by addition).
    pub rho: f64,
    /// Epsilon of the (epsilon, delta)-DP guarantee implied by `rho` (or the
    /// pure-DP epsilon under the Laplace mechanism).
    pub epsilon: f64,
    /// Delta of that guarantee.
    pub delta: f64,
}

/// How one partial column was noised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialNoise {
    /// Column name in the partial batch.
    pub column: String,
    /// `gaussian` or `laplace`.
    pub mechanism: String,
    /// Standard deviation of the noise added to each value.
    pub noise_stddev: f64,
    /// Scale parameter passed to the mechanism (sigma, or b for Laplace).
    pub scale: f64,
    /// Sensitivity the scale was calibrated to (L2 for Gaussian, L1 for Laplace).
    pub sensitivity: f64,
}

/// Attached by a node to the batch of noisy partials it releases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseInfo {
    /// The node (site) that released.
    pub node: String,
    /// The task this answers.
    pub task_id: Uuid,
    /// What the release cost this node's ledger.
    pub cost: Cost,
    /// Noise per partial column.
    pub partials: Vec<PartialNoise>,
}

/// Attached by the coordinator to a combined result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultInfo {
    /// The query (and task) id.
    pub query_id: Uuid,
    /// The sites whose partials were combined.
    pub sites: Vec<String>,
    /// Cost charged at each site.
    pub cost_per_site: Cost,
    /// Confidence level of the interval columns.
    pub confidence: f64,
}
