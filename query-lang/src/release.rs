//! Node side: turning the exact partials of the local query into a noisy
//! release. Runs inside the node, before the ledger debit is recorded with
//! the result; nothing leaves until that commit.
//!
//! * Public keys: every group of the domains is released, empty ones
//!   included, each with noise.
//! * Private keys: groups are released only when their noisy person count
//!   passes the partition-selection threshold ([`confer_privacy::selection`]).
//! * The small-cell rule of the node's policy suppresses (NULLs) groups whose
//!   noisy count is below the minimum; it is post-processing, free.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::DataType;
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

/// One partial's exact values, group by group (times its width).
pub(crate) enum Exact {
    Int(Vec<i64>),
    Float(Vec<f64>),
}

/// Adds noise to the local query's output and returns the batch to release:
/// group columns first, then the noisy partials, with a [`ReleaseInfo`] in
/// the schema metadata.
pub fn release(
    plan: &FederatedPlan,
    batches: &[RecordBatch],
    site: &str,
    task_id: Uuid,
    options: &ReleaseOptions,
) -> Result<RecordBatch> {
    let rows = read_rows(plan, batches)?;
    let keys: Vec<Vec<ScalarValue>> = if plan.public_groups() {
        plan.group_keys()?
    } else {
        select_private_keys(plan, &rows)?
    };
    let index = FederatedPlan::key_index(&keys);
    let mut exact = exact_partials(plan, &rows, &index, keys.len())?;
    saturate(
        plan,
        &mut exact,
        &persons_by_slot(&rows, &index, keys.len()),
    );

    let mut noise_info = Vec::with_capacity(plan.partials.len());
    let mut noisy: Vec<Exact> = Vec::with_capacity(plan.partials.len());
    for (i, values) in exact.into_iter().enumerate() {
        let noise = plan.noise(i)?;
        let fail = |e: confer_privacy::PrivacyError| QueryError::Internal(format!("noise: {e}"));
        noisy.push(match values {
            Exact::Int(v) => Exact::Int(noise.apply_i64(&v).map_err(fail)?),
            Exact::Float(v) => Exact::Float(noise.apply_f64(&v).map_err(fail)?),
        });
        // Integer partials get the integer sampler's spread; float partials
        // are noised at a granularity far below the scale, with the
        // continuous spread (which the integer one would understate below a
        // scale of about 1/2, down to zero).
        let stddev = if plan.partials[i].integer {
            noise.stddev()
        } else {
            noise.stddev_f64()
        };
        for column in &plan.partials[i].columns {
            noise_info.push(PartialNoise {
                column: column.clone(),
                mechanism: noise.mechanism.name().to_string(),
                noise_stddev: stddev,
                scale: noise.scale,
                sensitivity: noise.sensitivity,
            });
        }
    }

    // Small-cell rule, on the noisy counts.
    let keep = small_cells_kept(plan, &noisy, keys.len(), options.min_group_size);
    assemble(plan, &keys, noisy, &keep, noise_info, site, task_id)
}

/// The small-cell rule: which of `groups` groups keep their values (every
/// noisy count at least `min_group_size`; 0 keeps all).
pub(crate) fn small_cells_kept(
    plan: &FederatedPlan,
    noisy: &[Exact],
    groups: usize,
    min_group_size: u64,
) -> Vec<bool> {
    (0..groups)
        .map(|row| {
            min_group_size == 0
                || plan.partials.iter().zip(noisy).all(|(spec, values)| {
                    let kind = plan.aggregates[spec.aggregate].kind;
                    !kind.is_count()
                        || match values {
                            Exact::Int(v) => v[row] >= min_group_size as i64,
                            Exact::Float(v) => v[row] >= min_group_size as f64,
                        }
                })
        })
        .collect()
}

/// The release batch: group columns, then the partials (NULL where `keep`
/// is false), with a [`ReleaseInfo`] in the schema metadata.
pub(crate) fn assemble(
    plan: &FederatedPlan,
    keys: &[Vec<ScalarValue>],
    noisy: Vec<Exact>,
    keep: &[bool],
    noise_info: Vec<PartialNoise>,
    site: &str,
    task_id: Uuid,
) -> Result<RecordBatch> {
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (g, spec) in plan.groups.iter().enumerate() {
        let array = if keys.is_empty() {
            arrow::array::new_empty_array(&spec.column_type.arrow_type())
        } else {
            let values = ScalarValue::iter_to_array(keys.iter().map(|k| k[g].clone()))?;
            cast(&values, &spec.column_type.arrow_type())?
        };
        columns.push(array);
    }
    for (spec, values) in plan.partials.iter().zip(noisy) {
        let width = spec.columns.len();
        for c in 0..width {
            let at = |row: usize| row * width + c;
            let array: ArrayRef = match &values {
                Exact::Int(v) => Arc::new(Int64Array::from_iter(
                    (0..keys.len()).map(|row| keep[row].then(|| v[at(row)])),
                )),
                Exact::Float(v) => Arc::new(Float64Array::from_iter(
                    (0..keys.len()).map(|row| keep[row].then(|| v[at(row)])),
                )),
            };
            columns.push(array);
        }
    }
    let info = ReleaseInfo {
        node: site.to_string(),
        task_id,
        cost: plan.cost.to_cost(),
        partials: noise_info,
    };
    let json = serde_json::to_string(&info).map_err(|e| QueryError::Internal(e.to_string()))?;
    let schema = Arc::new(
        plan.partial_schema()
            .as_ref()
            .clone()
            .with_metadata(HashMap::from([(metadata::RELEASE.to_string(), json)])),
    );
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// The local query's output, row by row: key, person count, and each
/// partial column's value (NULL where no person contributed).
pub(crate) struct Rows {
    keys: Vec<Vec<ScalarValue>>,
    persons: Vec<i64>,
    /// By partial, then by its columns: one array per column.
    partials: Vec<Vec<ArrayRef>>,
}

pub(crate) fn read_rows(plan: &FederatedPlan, batches: &[RecordBatch]) -> Result<Rows> {
    let mut rows = Rows {
        keys: Vec::new(),
        persons: Vec::new(),
        partials: vec![Vec::new(); plan.partials.len()],
    };
    let mut per_batch: Vec<Vec<Vec<ArrayRef>>> = Vec::new();
    for batch in batches {
        let lost = |c: &str| QueryError::Internal(format!("the local query lost column {c}"));
        let mut key_arrays = Vec::with_capacity(plan.groups.len());
        for (g, spec) in plan.groups.iter().enumerate() {
            let col = batch
                .column_by_name(&format!("__g{g}"))
                .ok_or_else(|| lost(&format!("__g{g}")))?;
            key_arrays.push(cast(col, &spec.column_type.arrow_type())?);
        }
        let persons = cast(
            batch
                .column_by_name("__persons")
                .ok_or_else(|| lost("__persons"))?,
            &DataType::Int64,
        )?;
        let persons = persons
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| QueryError::Internal("__persons is not Int64".into()))?
            .clone();
        let mut partial_arrays = Vec::with_capacity(plan.partials.len());
        for p in &plan.partials {
            let ty = if p.integer {
                DataType::Int64
            } else {
                DataType::Float64
            };
            let mut cols = Vec::with_capacity(p.columns.len());
            for c in &p.columns {
                cols.push(cast(batch.column_by_name(c).ok_or_else(|| lost(c))?, &ty)?);
            }
            partial_arrays.push(cols);
        }
        for row in 0..batch.num_rows() {
            let key: Vec<ScalarValue> = key_arrays
                .iter()
                .map(|a| ScalarValue::try_from_array(a, row))
                .collect::<datafusion::error::Result<_>>()?;
            rows.keys.push(key);
            rows.persons.push(if persons.is_valid(row) {
                persons.value(row)
            } else {
                0
            });
        }
        per_batch.push(partial_arrays);
    }
    // Concatenate each partial column across batches.
    for (p, spec) in plan.partials.iter().enumerate() {
        for c in 0..spec.columns.len() {
            let parts: Vec<&dyn Array> = per_batch.iter().map(|b| b[p][c].as_ref()).collect();
            let array = if parts.is_empty() {
                arrow::array::new_empty_array(if spec.integer {
                    &DataType::Int64
                } else {
                    &DataType::Float64
                })
            } else {
                arrow::compute::concat(&parts)?
            };
            rows.partials[p].push(array);
        }
    }
    Ok(rows)
}

/// Partition selection: the private keys whose noisy person count passes
/// the threshold, in a stable order.
fn select_private_keys(plan: &FederatedPlan, rows: &Rows) -> Result<Vec<Vec<ScalarValue>>> {
    let selection = plan.selection.as_ref().ok_or_else(|| {
        QueryError::Internal("private group keys without partition selection".into())
    })?;
    let counts: HashMap<u64, i64> = rows
        .persons
        .iter()
        .enumerate()
        .map(|(i, n)| (i as u64, *n))
        .collect();
    let kept = selection
        .apply(&counts)
        .map_err(|e| QueryError::Internal(format!("partition selection: {e}")))?;
    let mut keys: Vec<Vec<ScalarValue>> = kept
        .keys()
        .map(|i| rows.keys[*i as usize].clone())
        .collect();
    keys.sort_by(|a, b| {
        a.iter()
            .zip(b)
            .map(|(x, y)| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    Ok(keys)
}

/// Lays the rows out over the released keys (zeros where a group had no
/// rows), ignoring keys that are not released.
pub(crate) fn exact_partials(
    plan: &FederatedPlan,
    rows: &Rows,
    index: &HashMap<Vec<ScalarValue>, usize>,
    n: usize,
) -> Result<Vec<Exact>> {
    let mut out: Vec<Exact> = plan
        .partials
        .iter()
        .map(|p| {
            let len = n * p.columns.len();
            if p.integer {
                Exact::Int(vec![0; len])
            } else {
                Exact::Float(vec![0.0; len])
            }
        })
        .collect();
    for (row, key) in rows.keys.iter().enumerate() {
        let Some(&slot) = index.get(key) else {
            continue;
        };
        for (p, values) in out.iter_mut().enumerate() {
            let width = plan.partials[p].columns.len();
            for (c, array) in rows.partials[p].iter().enumerate() {
                if !array.is_valid(row) {
                    continue;
                }
                let at = slot * width + c;
                match values {
                    Exact::Int(v) => {
                        let a = array
                            .as_any()
                            .downcast_ref::<Int64Array>()
                            .ok_or_else(|| QueryError::Internal("partial is not Int64".into()))?;
                        v[at] = v[at].saturating_add(a.value(row));
                    }
                    Exact::Float(v) => {
                        let a = array
                            .as_any()
                            .downcast_ref::<Float64Array>()
                            .ok_or_else(|| QueryError::Internal("partial is not Float64".into()))?;
                        v[at] += a.value(row);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The number of persons behind each released group (0 where none).
pub(crate) fn persons_by_slot(
    rows: &Rows,
    index: &HashMap<Vec<ScalarValue>, usize>,
    n: usize,
) -> Vec<i64> {
    let mut persons = vec![0i64; n];
    for (row, key) in rows.keys.iter().enumerate() {
        if let Some(&slot) = index.get(key) {
            persons[slot] = persons[slot].saturating_add(rows.persons[row].max(0));
        }
    }
    persons
}

/// Keeps every float partial within what its persons can contribute: each
/// person adds at most the partial's per-group bound to a group, so a
/// group's exact value lies within ± bound × its persons. Float arithmetic
/// on extreme values (an infinity or NaN that a clamp let through, an
/// overflow) could leave it outside, or not finite, and then the release
/// would fail after the rows were read, a failure that depends on the
/// rows. Saturating here makes the release step total: NaN becomes 0 and
/// anything else is clamped into the range.
pub(crate) fn saturate(plan: &FederatedPlan, exact: &mut [Exact], persons: &[i64]) {
    for (spec, values) in plan.partials.iter().zip(exact.iter_mut()) {
        let Exact::Float(v) = values else { continue };
        let width = spec.columns.len().max(1);
        for (i, x) in v.iter_mut().enumerate() {
            let n = persons.get(i / width).copied().unwrap_or(0).max(0) as f64;
            let limit = spec.per_group_bound * n;
            *x = if x.is_nan() {
                0.0
            } else {
                x.clamp(-limit, limit)
            };
        }
    }
}
