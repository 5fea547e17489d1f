//! Node side: turning the exact partials of the local query into a noisy
//! release. Runs inside the node, after the ledger debit is on disk.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch};
use arrow::compute::cast;
use confer_protocol::metadata;
use confer_protocol::release::{PartialNoise, ReleaseInfo};
use datafusion::scalar::ScalarValue;
use uuid::Uuid;

use crate::error::{QueryError, Result};
use crate::plan::FederatedPlan;

/// How a node releases, beyond the plan: its data steward's rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReleaseOptions {
    /// Small-cell rule: a group whose released count (after noise) is below
    /// this is suppressed, all its values NULL. 0 turns the rule off.
    pub min_group_size: u64,
}

/// Adds noise to the local query's output and returns the batch to release:
/// one row for every group of the public domains (empty groups included,
/// with noise), group columns first, then the noisy partials, with a
/// [`ReleaseInfo`] in the schema metadata. Groups failing the small-cell
/// rule have NULL partials.
pub fn release(
    plan: &FederatedPlan,
    batches: &[RecordBatch],
    site: &str,
    task_id: Uuid,
    options: &ReleaseOptions,
) -> Result<RecordBatch> {
    let keys = plan.group_keys()?;
    let index = FederatedPlan::key_index(&keys);
    let exact = exact_partials(plan, batches, &index, keys.len())?;

    let mut columns: Vec<ArrayRef> = Vec::new();
    for (g, spec) in plan.groups.iter().enumerate() {
        let values = keys.iter().map(|k| k[g].clone());
        let array = if keys.is_empty() {
            arrow::array::new_empty_array(&spec.column_type.arrow_type())
        } else {
            ScalarValue::iter_to_array(values)?
        };
        columns.push(array);
    }
    let mut noise_info = Vec::with_capacity(plan.partials.len());
    let mut noisy: Vec<Exact> = Vec::with_capacity(plan.partials.len());
    for (i, values) in exact.into_iter().enumerate() {
        let noise = plan.noise(i)?;
        noisy.push(match values {
            Exact::Int(v) => Exact::Int(
                noise
                    .apply_i64(&v)
                    .map_err(|e| QueryError::Internal(format!("noise: {e}")))?,
            ),
            Exact::Float(v) => Exact::Float(
                noise
                    .apply_f64(&v)
                    .map_err(|e| QueryError::Internal(format!("noise: {e}")))?,
            ),
        });
        let spec = &plan.partials[i];
        noise_info.push(PartialNoise {
            column: spec.column.clone(),
            mechanism: noise.mechanism.name().to_string(),
            noise_stddev: noise.stddev(),
            scale: noise.scale,
            sensitivity: noise.sensitivity,
        });
    }
    // Small-cell rule, on the noisy counts (post-processing: free).
    let keep: Vec<bool> = (0..keys.len())
        .map(|row| {
            options.min_group_size == 0
                || plan.partials.iter().zip(&noisy).all(|(spec, values)| {
                    !plan.aggregates[spec.aggregate].kind.is_count()
                        || match values {
                            Exact::Int(v) => v[row] >= options.min_group_size as i64,
                            Exact::Float(v) => v[row] >= options.min_group_size as f64,
                        }
                })
        })
        .collect();
    for values in noisy {
        let array: ArrayRef = match values {
            Exact::Int(v) => Arc::new(Int64Array::from_iter(
                v.into_iter().zip(&keep).map(|(x, k)| k.then_some(x)),
            )),
            Exact::Float(v) => Arc::new(Float64Array::from_iter(
                v.into_iter().zip(&keep).map(|(x, k)| k.then_some(x)),
            )),
        };
        columns.push(array);
    }
    let info = ReleaseInfo {
        node: site.to_string(),
        task_id,
        cost: plan.cost.to_cost(),
        partials: noise_info,
    };
    let schema = plan.partial_schema();
    let json = serde_json::to_string(&info).map_err(|e| QueryError::Internal(e.to_string()))?;
    let schema = Arc::new(
        schema
            .as_ref()
            .clone()
            .with_metadata(HashMap::from([(metadata::RELEASE.to_string(), json)])),
    );
    Ok(RecordBatch::try_new(schema, columns)?)
}

enum Exact {
    Int(Vec<i64>),
    Float(Vec<f64>),
}

/// Lays the local query's rows out over the full key list (zeros where a
/// group had no rows), ignoring keys outside the public domains.
fn exact_partials(
    plan: &FederatedPlan,
    batches: &[RecordBatch],
    index: &HashMap<Vec<ScalarValue>, usize>,
    n: usize,
) -> Result<Vec<Exact>> {
    let mut out: Vec<Exact> = plan
        .partials
        .iter()
        .map(|p| {
            if p.integer {
                Exact::Int(vec![0; n])
            } else {
                Exact::Float(vec![0.0; n])
            }
        })
        .collect();
    for batch in batches {
        let mut key_arrays = Vec::with_capacity(plan.groups.len());
        for (g, spec) in plan.groups.iter().enumerate() {
            let col = batch.column_by_name(&format!("__g{g}")).ok_or_else(|| {
                QueryError::Internal(format!("local query lost group column __g{g}"))
            })?;
            key_arrays.push(cast(col, &spec.column_type.arrow_type())?);
        }
        let mut value_arrays = Vec::with_capacity(plan.partials.len());
        for p in &plan.partials {
            let col = batch.column_by_name(&p.column).ok_or_else(|| {
                QueryError::Internal(format!("local query lost partial column {}", p.column))
            })?;
            let ty = if p.integer {
                arrow::datatypes::DataType::Int64
            } else {
                arrow::datatypes::DataType::Float64
            };
            value_arrays.push(cast(col, &ty)?);
        }
        for row in 0..batch.num_rows() {
            let key: Vec<ScalarValue> = key_arrays
                .iter()
                .map(|a| ScalarValue::try_from_array(a, row))
                .collect::<datafusion::error::Result<_>>()?;
            let Some(&slot) = index.get(&key) else {
                continue;
            };
            for (values, array) in out.iter_mut().zip(&value_arrays) {
                match values {
                    Exact::Int(v) => {
                        let a = array
                            .as_any()
                            .downcast_ref::<Int64Array>()
                            .ok_or_else(|| QueryError::Internal("partial is not Int64".into()))?;
                        if a.is_valid(row) {
                            v[slot] = v[slot].checked_add(a.value(row)).ok_or_else(|| {
                                QueryError::Internal("partial count overflows i64".into())
                            })?;
                        }
                    }
                    Exact::Float(v) => {
                        let a = array
                            .as_any()
                            .downcast_ref::<Float64Array>()
                            .ok_or_else(|| QueryError::Internal("partial is not Float64".into()))?;
                        if a.is_valid(row) {
                            v[slot] += a.value(row);
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}
