//! A job's data at the node: the feature query's rows, checked and split,
//! the standardisation, and a job's cost and zero-cost round records.

use std::sync::Arc;

use arrow::array::{Array, Float64Array, RecordBatch};
use arrow::datatypes::DataType;
use confer_models::job::{JobSpec, Standardisation, split_datasets};
use confer_models::{Dataset, Targets};
use confer_protocol::ProtocolError;
use confer_protocol::signing::sha256_hex;
use confer_protocol::task::{Envelope, Task};
use confer_protocol::train::{TrainRoundTask, decode_f32};
use confer_query::QueryError;
use datafusion::execution::context::SQLOptions;
use uuid::Uuid;

use crate::error::{NodeError, Result};
use crate::gate::Failure;
use crate::handler::blocking;
use crate::ledger::{Charge, Cost};
use crate::policy::Policy;

use super::*;

/// A training job's cost as the ledger records it.
pub(super) fn job_cost(plan: &confer_models::job::PrivacyPlan) -> Cost {
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
pub(super) fn check_round_inputs(round: &TrainRoundTask) -> std::result::Result<(), String> {
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
pub(super) fn zero_charge(
    round: &Task,
    record_id: Uuid,
    envelope: &Envelope,
    policy: &Policy,
) -> Charge {
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
pub(super) fn read_rows(spec: &JobSpec, batches: &[RecordBatch]) -> Result<(Vec<f32>, Targets)> {
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
pub(super) fn standardised(job: &JobData, round: &TrainRoundTask) -> Result<Standardised> {
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
    pub(super) fn unusable_rows_are_dropped_not_refused() {
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
