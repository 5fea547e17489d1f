//! Coordinator side: combining the nodes' noisy partials into answers with
//! standard errors and confidence intervals. Pure post-processing: nothing
//! here touches a record or draws randomness.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use confer_privacy::stats::z_for_confidence;
use confer_protocol::metadata;
use confer_protocol::release::{ReleaseInfo, ResultInfo};
use datafusion::scalar::ScalarValue;
use uuid::Uuid;

use crate::error::{QueryError, Result};
use crate::plan::{AggregateKind, FederatedPlan, OutputItem};

/// One node's released partials.
#[derive(Debug, Clone)]
pub struct SitePartial {
    /// The node that released them.
    pub site: String,
    /// The batch, with its [`ReleaseInfo`] metadata.
    pub batch: RecordBatch,
}

/// Sums of noisy partials per group, with the variance of their noise.
struct Totals {
    /// `None` where a site suppressed the group (small-cell rule).
    int_values: Vec<Vec<Option<i64>>>,
    /// Whether any site released the group.
    released: Vec<Vec<bool>>,
    variances: Vec<Vec<f64>>,
}

/// Checks that one node's release fits the plan (metadata, columns, types,
/// groups within the public domains), so that a malformed or malicious
/// answer can be set aside as that node's failure.
pub fn check(plan: &FederatedPlan, partial: &SitePartial) -> Result<()> {
    let keys = plan.group_keys()?;
    let index = FederatedPlan::key_index(&keys);
    totals(plan, std::slice::from_ref(partial), &index, keys.len()).map(|_| ())
}

/// Combines partials into the result table (before HAVING / ORDER BY / LIMIT).
pub fn combine(
    plan: &FederatedPlan,
    partials: &[SitePartial],
    query_id: Uuid,
) -> Result<RecordBatch> {
    let keys = plan.group_keys()?;
    let index = FederatedPlan::key_index(&keys);
    let totals = totals(plan, partials, &index, keys.len())?;
    let z = z_for_confidence(plan.options.confidence);

    let mut columns: Vec<ArrayRef> = Vec::new();
    for item in &plan.select {
        match item {
            OutputItem::Group(g) => {
                let array = if keys.is_empty() {
                    arrow::array::new_empty_array(&plan.groups[*g].column_type.arrow_type())
                } else {
                    ScalarValue::iter_to_array(keys.iter().map(|k| k[*g].clone()))?
                };
                columns.push(array);
            }
            OutputItem::Aggregate(a) => {
                let agg = &plan.aggregates[*a];
                match agg.kind {
                    AggregateKind::CountStar | AggregateKind::CountDistinctUnit => {
                        let p = agg.partials[0];
                        let values = &totals.int_values[p];
                        let se: Vec<f64> = totals.variances[p].iter().map(|v| v.sqrt()).collect();
                        columns.push(Arc::new(Int64Array::from(values.clone())));
                        columns.push(Arc::new(Float64Array::from_iter(
                            values
                                .iter()
                                .zip(&se)
                                .map(|(v, s)| v.map(|v| v as f64 - z * s)),
                        )));
                        columns.push(Arc::new(Float64Array::from_iter(
                            values
                                .iter()
                                .zip(&se)
                                .map(|(v, s)| v.map(|v| v as f64 + z * s)),
                        )));
                    }
                }
            }
        }
    }
    let mut sites: Vec<String> = partials.iter().map(|p| p.site.clone()).collect();
    sites.sort();
    let info = ResultInfo {
        query_id,
        sites,
        cost_per_site: plan.cost.to_cost(),
        confidence: plan.options.confidence,
    };
    let schema = plan.output_schema();
    let mut schema_meta = schema.metadata().clone();
    schema_meta.insert(
        metadata::RESULT.to_string(),
        serde_json::to_string(&info).map_err(|e| QueryError::Internal(e.to_string()))?,
    );
    // Per-column noise: the standard error where it is the same for every group.
    let fields: Vec<_> = schema
        .fields()
        .iter()
        .map(|f| {
            let mut field = f.as_ref().clone();
            if let Some(agg) = plan.aggregates.iter().find(|a| &a.name == f.name()) {
                let p = agg.partials[0];
                let var = &totals.variances[p];
                if let Some(first) = var.first()
                    && var.iter().all(|v| v == first)
                {
                    let mut meta = field.metadata().clone();
                    meta.insert(metadata::NOISE_STDDEV.to_string(), first.sqrt().to_string());
                    field = field.with_metadata(meta);
                }
            }
            field
        })
        .collect();
    let schema = Arc::new(arrow::datatypes::Schema::new_with_metadata(
        fields,
        schema_meta,
    ));
    Ok(RecordBatch::try_new(schema, columns)?)
}

fn totals(
    plan: &FederatedPlan,
    partials: &[SitePartial],
    index: &HashMap<Vec<ScalarValue>, usize>,
    n: usize,
) -> Result<Totals> {
    let mut t = Totals {
        int_values: vec![vec![Some(0); n]; plan.partials.len()],
        variances: vec![vec![0.0; n]; plan.partials.len()],
        released: vec![vec![false; n]; plan.partials.len()],
    };
    for part in partials {
        let bad = |what: String| {
            QueryError::Internal(format!(
                "node {} released a malformed batch: {what}",
                part.site
            ))
        };
        let info: ReleaseInfo = part
            .batch
            .schema()
            .metadata()
            .get(metadata::RELEASE)
            .ok_or_else(|| bad("no release metadata".into()))
            .and_then(|json| serde_json::from_str(json).map_err(|e| bad(e.to_string())))?;
        let mut keys = Vec::with_capacity(plan.groups.len());
        for g in &plan.groups {
            let col = part
                .batch
                .column_by_name(&g.name)
                .ok_or_else(|| bad(format!("missing group column {}", g.name)))?;
            keys.push(cast(col, &g.column_type.arrow_type())?);
        }
        for (p, spec) in plan.partials.iter().enumerate() {
            let noise = info
                .partials
                .iter()
                .find(|n| n.column == spec.column)
                .ok_or_else(|| bad(format!("no noise description for {}", spec.column)))?;
            let variance = noise.noise_stddev * noise.noise_stddev;
            let col = part
                .batch
                .column_by_name(&spec.column)
                .ok_or_else(|| bad(format!("missing partial {}", spec.column)))?;
            let col = cast(
                col,
                if spec.integer {
                    &DataType::Int64
                } else {
                    &DataType::Float64
                },
            )?;
            for row in 0..part.batch.num_rows() {
                let key: Vec<ScalarValue> = keys
                    .iter()
                    .map(|a| ScalarValue::try_from_array(a, row))
                    .collect::<datafusion::error::Result<_>>()?;
                let slot = *index.get(&key).ok_or_else(|| {
                    bad(format!(
                        "group {key:?} is outside the network's public domains"
                    ))
                })?;
                if !col.is_valid(row) {
                    // Suppressed at that site: the combined value is suppressed too.
                    t.int_values[p][slot] = None;
                    t.variances[p][slot] += variance;
                    continue;
                }
                if spec.integer {
                    let v = col
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .ok_or_else(|| bad("partial is not Int64".into()))?
                        .value(row);
                    t.int_values[p][slot] = t.int_values[p][slot].map(|s| s.saturating_add(v));
                } else {
                    return Err(QueryError::Internal(
                        "float partials are not combined yet".into(),
                    ));
                }
                t.variances[p][slot] += variance;
                t.released[p][slot] = true;
            }
        }
    }
    // A group no site released (the `site` group of a site that did not
    // answer) is unknown, not zero.
    for (values, released) in t.int_values.iter_mut().zip(&t.released) {
        for (v, r) in values.iter_mut().zip(released) {
            if !r {
                *v = None;
            }
        }
    }
    Ok(t)
}
