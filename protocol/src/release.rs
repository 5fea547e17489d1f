//! Metadata attached to released values: which mechanism, how much noise,
//! what it cost. Nodes attach a [`ReleaseInfo`] to their partials; the
//! coordinator attaches a [`ResultInfo`] to the combined answer.

use std::sync::Arc;

use arrow::array::{Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ProtocolError;

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

/// One node's figures for `SHOW PRIVACY BUDGET`.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetFigures {
    /// The node.
    pub node: String,
    /// The study reported.
    pub study: String,
    /// The study's status at the node.
    pub status: String,
    /// The study's budget (rho).
    pub budget_rho: f64,
    /// Spent by the study (rho).
    pub spent_rho: f64,
    /// The study's releases.
    pub releases: u64,
    /// The node's budget over all studies (rho), if its policy sets one.
    pub node_budget_rho: Option<f64>,
    /// Spent at the node over all studies (rho).
    pub node_spent_rho: f64,
    /// The researcher who asked.
    pub researcher: String,
    /// That researcher's budget over all studies (rho), if any.
    pub researcher_budget_rho: Option<f64>,
    /// Spent by that researcher over all studies (rho).
    pub researcher_spent_rho: f64,
}

/// One node's `SHOW PRIVACY BUDGET` report, as the node sends it and the
/// coordinator reads it: one row of node, study, status, budget_rho,
/// spent_rho and releases, then the node-wide figures (node_budget_rho,
/// node_spent_rho; NULL budget: none set) and the asking researcher's over
/// all studies (researcher, researcher_budget_rho, researcher_spent_rho).
pub fn budget_report(f: &BudgetFigures) -> Result<RecordBatch, ProtocolError> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("node", DataType::Utf8, false),
        Field::new("study", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("budget_rho", DataType::Float64, false),
        Field::new("spent_rho", DataType::Float64, false),
        Field::new("releases", DataType::UInt64, false),
        Field::new("node_budget_rho", DataType::Float64, true),
        Field::new("node_spent_rho", DataType::Float64, false),
        Field::new("researcher", DataType::Utf8, false),
        Field::new("researcher_budget_rho", DataType::Float64, true),
        Field::new("researcher_spent_rho", DataType::Float64, false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(vec![f.node.as_str()])),
            Arc::new(StringArray::from(vec![f.study.as_str()])),
            Arc::new(StringArray::from(vec![f.status.as_str()])),
            Arc::new(Float64Array::from(vec![f.budget_rho])),
            Arc::new(Float64Array::from(vec![f.spent_rho])),
            Arc::new(UInt64Array::from(vec![f.releases])),
            Arc::new(Float64Array::from(vec![f.node_budget_rho])),
            Arc::new(Float64Array::from(vec![f.node_spent_rho])),
            Arc::new(StringArray::from(vec![f.researcher.as_str()])),
            Arc::new(Float64Array::from(vec![f.researcher_budget_rho])),
            Arc::new(Float64Array::from(vec![f.researcher_spent_rho])),
        ],
    )
    .map_err(|e| ProtocolError::internal(e.to_string()))
}
