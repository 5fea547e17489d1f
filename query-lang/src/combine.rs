//! Coordinator side: combining the nodes' noisy partials into answers with
//! standard errors and confidence intervals. Pure post-processing: nothing
//! here touches a record or draws randomness.
//!
//! | aggregate | answer | standard error |
//! |---|---|---|
//! | counts, SUM | sum of the sites' noisy partials | sqrt of the summed noise variances |
//! | AVG | mid + S / N (S: noisy sum of centred person means, N: noisy persons) | delta method |
//! | VAR_POP, STDDEV_POP | from noisy moments n, s1, s2 of centred, clamped values | delta method |
//! | PERCENTILE_CONT | interpolated in the noisy cumulative histogram | interval from the CDF's error |
//!
//! A group no site released (the `site` group of a site that did not
//! answer) and a group any site suppressed (small-cell rule) are NULL.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use confer_privacy::stats::{laplace_multiplier, z_for_confidence};
use confer_protocol::metadata;
use confer_protocol::release::{ReleaseInfo, ResultInfo};
use datafusion::scalar::ScalarValue;
use uuid::Uuid;

use crate::error::{QueryError, Result};
use crate::plan::{AggregateKind, AggregateSpec, FederatedPlan, OutputItem, PERCENTILE_BINS};

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
    /// `[partial][key * width + column]`
    values: Vec<Vec<f64>>,
    /// `[partial][key]`: noise variance of each column of that group.
    variances: Vec<Vec<f64>>,
    /// `[partial][key]`: some site released the group.
    released: Vec<Vec<bool>>,
    /// `[partial][key]`: some site suppressed it (small-cell rule).
    suppressed: Vec<Vec<bool>>,
}

/// Checks that one node's release fits the plan (metadata, columns, types,
/// groups within the public domains), so that a malformed or malicious
/// answer can be set aside as that node's failure.
pub fn check(plan: &FederatedPlan, partial: &SitePartial) -> Result<()> {
    let keys = result_keys(plan, std::slice::from_ref(partial))?;
    let index = FederatedPlan::key_index(&keys);
    totals(plan, std::slice::from_ref(partial), &index, keys.len()).map(|_| ())
}

/// The groups of the answer: the public domains' product, or the union of
/// the private keys the sites released.
fn result_keys(plan: &FederatedPlan, partials: &[SitePartial]) -> Result<Vec<Vec<ScalarValue>>> {
    if plan.public_groups() {
        return plan.group_keys();
    }
    let mut keys: BTreeSet<Vec<OrdScalar>> = BTreeSet::new();
    for part in partials {
        let arrays = group_arrays(plan, part)?;
        for row in 0..part.batch.num_rows() {
            let key = arrays
                .iter()
                .map(|a| ScalarValue::try_from_array(a, row).map(OrdScalar))
                .collect::<datafusion::error::Result<Vec<_>>>()?;
            keys.insert(key);
        }
    }
    Ok(keys
        .into_iter()
        .map(|k| k.into_iter().map(|s| s.0).collect())
        .collect())
}

/// A scalar with a total order (for sorting keys).
#[derive(Clone, PartialEq, Eq)]
struct OrdScalar(ScalarValue);

impl PartialOrd for OrdScalar {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrdScalar {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (self.0.is_null(), other.0.is_null()) {
            (true, true) => std::cmp::Ordering::Equal,
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            _ => self
                .0
                .partial_cmp(&other.0)
                .unwrap_or(std::cmp::Ordering::Equal),
        }
    }
}

fn malformed(site: &str, what: impl std::fmt::Display) -> QueryError {
    QueryError::Internal(format!("node {site} released a malformed batch: {what}"))
}

fn group_arrays(plan: &FederatedPlan, part: &SitePartial) -> Result<Vec<ArrayRef>> {
    plan.groups
        .iter()
        .map(|g| {
            let col = part
                .batch
                .column_by_name(&g.name)
                .ok_or_else(|| malformed(&part.site, format!("missing group column {}", g.name)))?;
            Ok(cast(col, &g.column_type.arrow_type())?)
        })
        .collect()
}

fn totals(
    plan: &FederatedPlan,
    partials: &[SitePartial],
    index: &HashMap<Vec<ScalarValue>, usize>,
    n: usize,
) -> Result<Totals> {
    let mut t = Totals {
        values: plan
            .partials
            .iter()
            .map(|p| vec![0.0; n * p.columns.len()])
            .collect(),
        variances: vec![vec![0.0; n]; plan.partials.len()],
        released: vec![vec![false; n]; plan.partials.len()],
        suppressed: vec![vec![false; n]; plan.partials.len()],
    };
    for part in partials {
        let info: ReleaseInfo = part
            .batch
            .schema()
            .metadata()
            .get(metadata::RELEASE)
            .ok_or_else(|| malformed(&part.site, "no release metadata"))
            .and_then(|json| serde_json::from_str(json).map_err(|e| malformed(&part.site, e)))?;
        let keys = group_arrays(plan, part)?;
        let mut slots = Vec::with_capacity(part.batch.num_rows());
        for row in 0..part.batch.num_rows() {
            let key: Vec<ScalarValue> = keys
                .iter()
                .map(|a| ScalarValue::try_from_array(a, row))
                .collect::<datafusion::error::Result<_>>()?;
            let slot = *index.get(&key).ok_or_else(|| {
                malformed(
                    &part.site,
                    format!("group {key:?} is outside the network's public domains"),
                )
            })?;
            slots.push(slot);
        }
        for (p, spec) in plan.partials.iter().enumerate() {
            let width = spec.columns.len();
            for (c, column) in spec.columns.iter().enumerate() {
                let noise = info
                    .partials
                    .iter()
                    .find(|n| &n.column == column)
                    .ok_or_else(|| {
                        malformed(&part.site, format!("no noise description for {column}"))
                    })?;
                if !(noise.noise_stddev.is_finite() && noise.noise_stddev >= 0.0) {
                    return Err(malformed(
                        &part.site,
                        format!("noise of {column} is {}", noise.noise_stddev),
                    ));
                }
                let col = part
                    .batch
                    .column_by_name(column)
                    .ok_or_else(|| malformed(&part.site, format!("missing partial {column}")))?;
                let col = cast(col, &DataType::Float64)?;
                let col = col
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .ok_or_else(|| malformed(&part.site, format!("{column} is not numeric")))?;
                for (row, &slot) in slots.iter().enumerate() {
                    if c == 0 {
                        t.released[p][slot] = true;
                        t.variances[p][slot] += noise.noise_stddev * noise.noise_stddev;
                    }
                    if !col.is_valid(row) {
                        t.suppressed[p][slot] = true;
                        continue;
                    }
                    let v = col.value(row);
                    if !v.is_finite() {
                        return Err(malformed(&part.site, format!("{column} holds {v}")));
                    }
                    t.values[p][slot * width + c] += v;
                }
            }
        }
    }
    Ok(t)
}

/// One aggregate's answer for one group.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Estimate {
    value: f64,
    low: f64,
    high: f64,
}

/// Counts, and sums whose bounds are not negative, cannot be below 0:
/// shown clamped there (value and interval), unless the query asks for
/// raw values (`nonnegative = 'false'`).
fn clamped_at_zero(agg: &AggregateSpec, nonnegative: bool, e: Estimate) -> Estimate {
    let clamp = nonnegative
        && (agg.kind.is_count()
            || agg.kind == AggregateKind::Sum && agg.bounds.is_some_and(|b| b.lo >= 0.0));
    if !clamp {
        return e;
    }
    Estimate {
        value: e.value.max(0.0),
        low: e.low.max(0.0),
        high: e.high.max(0.0),
    }
}

fn estimate(agg: &AggregateSpec, t: &Totals, key: usize, z: f64) -> Option<Estimate> {
    let parts = &agg.partials;
    if parts
        .iter()
        .any(|&p| t.suppressed[p][key] || !t.released[p][key])
    {
        return None;
    }
    let single = |p: usize| t.values[p][key];
    let var = |p: usize| t.variances[p][key];
    let bounds = agg.bounds;
    let around = |v: f64, se: f64| Estimate {
        value: v,
        low: v - z * se,
        high: v + z * se,
    };
    match agg.kind {
        AggregateKind::CountStar | AggregateKind::Count | AggregateKind::CountDistinctUnit => {
            // Counts carry integer noise: a half-width below 1 would
            // cover only a zero draw (which, near a scale of 1/2, is far
            // rarer than the confidence), so it is rounded up to a whole
            // number (see `integer_intervals_cover_at_every_scale`).
            let v = single(parts[0]);
            let half = integer_half_width(z * var(parts[0]).sqrt());
            Some(Estimate {
                value: v,
                low: v - half,
                high: v + half,
            })
        }
        AggregateKind::Sum => Some(around(single(parts[0]), var(parts[0]).sqrt())),
        AggregateKind::Avg => {
            let b = bounds?;
            let (s, n) = (single(parts[0]), single(parts[1]));
            if n <= 0.0 {
                return None;
            }
            let mid = (b.lo + b.hi) / 2.0;
            let ratio = s / n;
            let se = (var(parts[0]) + ratio * ratio * var(parts[1])).sqrt() / n;
            let value = (mid + ratio).clamp(b.lo, b.hi);
            Some(Estimate {
                value,
                low: (value - z * se).max(b.lo),
                high: (value + z * se).min(b.hi),
            })
        }
        AggregateKind::VarPop | AggregateKind::StddevPop => {
            let b = bounds?;
            let (n, s1, s2) = (single(parts[0]), single(parts[1]), single(parts[2]));
            if n <= 0.0 {
                return None;
            }
            let h = (b.hi - b.lo) / 2.0;
            let mean = s1 / n;
            let variance = (s2 / n - mean * mean).clamp(0.0, h * h);
            let d_s2 = 1.0 / n;
            let d_s1 = -2.0 * s1 / (n * n);
            let d_n = -s2 / (n * n) + 2.0 * s1 * s1 / (n * n * n);
            let se_var = (d_s2 * d_s2 * var(parts[2])
                + d_s1 * d_s1 * var(parts[1])
                + d_n * d_n * var(parts[0]))
            .sqrt();
            if agg.kind == AggregateKind::VarPop {
                Some(Estimate {
                    value: variance,
                    low: (variance - z * se_var).max(0.0),
                    high: (variance + z * se_var).min(h * h),
                })
            } else {
                let sd = variance.sqrt();
                Some(Estimate {
                    value: sd,
                    low: (variance - z * se_var).max(0.0).sqrt(),
                    high: (variance + z * se_var).min(h * h).sqrt(),
                })
            }
        }
        AggregateKind::Percentile => {
            let b = bounds?;
            let p = agg.percentile?;
            let bins = PERCENTILE_BINS;
            let counts: Vec<f64> = (0..bins)
                .map(|k| t.values[parts[0]][key * bins + k].max(0.0))
                .collect();
            let total: f64 = counts.iter().sum();
            if total <= 0.0 {
                return None;
            }
            let width = (b.hi - b.lo) / bins as f64;
            let quantile = |q: f64| {
                let target = q.clamp(0.0, 1.0) * total;
                let mut cum = 0.0;
                for (k, c) in counts.iter().enumerate() {
                    if cum + c >= target && *c > 0.0 {
                        return b.lo + (k as f64 + (target - cum) / c) * width;
                    }
                    cum += c;
                }
                b.hi
            };
            let value = quantile(p);
            // Error of the noisy CDF at the estimate: the sum of k+1 bins' noise.
            let bin = (((value - b.lo) / width).floor() as usize).min(bins - 1);
            let se_f = ((bin + 1) as f64 * var(parts[0])).sqrt() / total;
            Some(Estimate {
                value,
                low: quantile(p - z * se_f),
                high: quantile(p + z * se_f),
            })
        }
    }
}

/// The half-width of an interval around a sum of integer noise draws:
/// `z·sd` rounded up to a whole number.
fn integer_half_width(half: f64) -> f64 {
    (half - 1e-9).ceil().max(0.0)
}

/// The multiple of a released value's noise sd that its interval spans on
/// each side, for the query's confidence and mechanism.
pub fn interval_multiplier(options: &crate::options::DpOptions) -> f64 {
    match options.mechanism {
        crate::options::Mechanism::Gaussian => z_for_confidence(options.confidence),
        crate::options::Mechanism::Laplace => laplace_multiplier(options.confidence),
    }
}

/// Combines partials into the result table (before HAVING / ORDER BY / LIMIT).
pub fn combine(
    plan: &FederatedPlan,
    partials: &[SitePartial],
    query_id: Uuid,
) -> Result<RecordBatch> {
    let keys = result_keys(plan, partials)?;
    let index = FederatedPlan::key_index(&keys);
    let totals = totals(plan, partials, &index, keys.len())?;
    let z = interval_multiplier(&plan.options);

    let mut columns: Vec<ArrayRef> = Vec::new();
    for item in &plan.select {
        match item {
            OutputItem::Group(g) => {
                let ty = plan.groups[*g].column_type.arrow_type();
                let array = if keys.is_empty() {
                    arrow::array::new_empty_array(&ty)
                } else {
                    cast(
                        &ScalarValue::iter_to_array(keys.iter().map(|k| k[*g].clone()))?,
                        &ty,
                    )?
                };
                columns.push(array);
            }
            OutputItem::Aggregate(a) => {
                let agg = &plan.aggregates[*a];
                let est: Vec<Option<Estimate>> = (0..keys.len())
                    .map(|k| {
                        estimate(agg, &totals, k, z)
                            .map(|e| clamped_at_zero(agg, plan.options.nonnegative, e))
                    })
                    .collect();
                if agg.kind.is_count() {
                    columns.push(Arc::new(Int64Array::from_iter(
                        est.iter().map(|e| e.map(|e| e.value.round() as i64)),
                    )));
                } else {
                    columns.push(Arc::new(Float64Array::from_iter(
                        est.iter().map(|e| e.map(|e| e.value)),
                    )));
                }
                columns.push(Arc::new(Float64Array::from_iter(
                    est.iter().map(|e| e.map(|e| e.low)),
                )));
                columns.push(Arc::new(Float64Array::from_iter(
                    est.iter().map(|e| e.map(|e| e.high)),
                )));
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
    let schema = plan.release_schema();
    let mut schema_meta = schema.metadata().clone();
    schema_meta.insert(
        metadata::RESULT.to_string(),
        serde_json::to_string(&info).map_err(|e| QueryError::Internal(e.to_string()))?,
    );
    // Counts and sums: the noise's standard deviation, where it is the same for every group.
    let fields: Vec<_> = schema
        .fields()
        .iter()
        .map(|f| {
            let mut field = f.as_ref().clone();
            if let Some(agg) = plan.aggregates.iter().find(|a| &a.name == f.name())
                && (agg.kind.is_count() || agg.kind == AggregateKind::Sum)
            {
                let var = &totals.variances[agg.partials[0]];
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Bounds;

    fn totals(values: Vec<f64>, variance: f64) -> Totals {
        Totals {
            variances: vec![vec![variance]; values.len()],
            released: vec![vec![true]; values.len()],
            suppressed: vec![vec![false]; values.len()],
            values: values.into_iter().map(|v| vec![v]).collect(),
        }
    }

    fn agg(kind: AggregateKind, partials: Vec<usize>, lo: f64, hi: f64) -> AggregateSpec {
        AggregateSpec {
            name: "x".into(),
            kind,
            expr: "x".into(),
            partials,
            bounds: Some(Bounds {
                lo,
                hi,
                per_row: true,
            }),
            percentile: None,
            value: Some(0),
        }
    }

    #[test]
    fn averages_are_ratios_of_centred_sums() {
        let t = totals(vec![-60.0, 3.0], 0.0);
        let e = estimate(
            &agg(AggregateKind::Avg, vec![0, 1], 0.0, 100.0),
            &t,
            0,
            1.96,
        )
        .expect("estimate");
        assert!((e.value - 30.0).abs() < 1e-12);
        assert_eq!((e.low, e.high), (e.value, e.value));
    }

    #[test]
    fn variances_come_from_centred_moments() {
        // Values 1, 2, 3 in bounds (0, 4): centred -1, 0, 1.
        let t = totals(vec![3.0, 0.0, 2.0], 0.0);
        let v = estimate(
            &agg(AggregateKind::VarPop, vec![0, 1, 2], 0.0, 4.0),
            &t,
            0,
            1.96,
        )
        .expect("estimate");
        assert!((v.value - 2.0 / 3.0).abs() < 1e-12);
        let s = estimate(
            &agg(AggregateKind::StddevPop, vec![0, 1, 2], 0.0, 4.0),
            &t,
            0,
            1.96,
        )
        .expect("estimate");
        assert!((s.value - (2.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }

    /// The exact distribution of a sum of `sites` discrete Gaussian or
    /// Laplace draws, on -limit..=limit.
    fn sum_pmf(laplace: bool, scale: f64, sites: usize, limit: i64) -> Vec<f64> {
        let one: Vec<f64> = (-limit..=limit)
            .map(|x| {
                let x = x as f64;
                if laplace {
                    (-x.abs() / scale).exp()
                } else {
                    (-x * x / (2.0 * scale * scale)).exp()
                }
            })
            .collect();
        let total: f64 = one.iter().sum();
        let one: Vec<f64> = one.iter().map(|p| p / total).collect();
        let mut pmf = one.clone();
        for _ in 1..sites {
            let mut next = vec![0.0; pmf.len()];
            let mid = limit as usize;
            for (i, &a) in pmf.iter().enumerate() {
                for (j, &b) in one.iter().enumerate() {
                    let k = i as i64 + j as i64 - mid as i64;
                    if (0..next.len() as i64).contains(&k) {
                        next[k as usize] += a * b;
                    }
                }
            }
            pmf = next;
        }
        pmf
    }

    /// Intervals of counts cover at least their confidence for every
    /// scale, small ones included, summed over one to four sites: computed
    /// exactly from the noise distributions, not sampled.
    #[test]
    fn integer_intervals_cover_at_every_scale() {
        use confer_privacy::stats::{discrete_gaussian_variance, discrete_laplace_variance};
        for laplace in [false, true] {
            for step in 1..=60 {
                let scale = 0.05 * step as f64;
                for sites in 1..=4 {
                    let var = sites as f64
                        * if laplace {
                            discrete_laplace_variance(scale)
                        } else {
                            discrete_gaussian_variance(scale)
                        };
                    let limit = 100;
                    let pmf = sum_pmf(laplace, scale, sites, limit);
                    for confidence in [0.8, 0.9, 0.95, 0.99] {
                        let z = if laplace {
                            laplace_multiplier(confidence)
                        } else {
                            z_for_confidence(confidence)
                        };
                        let half = integer_half_width(z * var.sqrt());
                        let covered: f64 = pmf
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| (*i as i64 - limit).abs() as f64 <= half)
                            .map(|(_, p)| p)
                            .sum();
                        assert!(
                            covered >= confidence - 1e-9,
                            "laplace {laplace}, scale {scale}, {sites} site(s), confidence {confidence}: covered {covered} with half-width {half}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn counts_and_nonnegative_sums_are_shown_at_zero_or_above() {
        let e = Estimate {
            value: -3.0,
            low: -7.0,
            high: 1.0,
        };
        let count = agg(AggregateKind::CountStar, vec![0], 0.0, 0.0);
        let shown = clamped_at_zero(&count, true, e);
        assert_eq!((shown.value, shown.low, shown.high), (0.0, 0.0, 1.0));
        assert_eq!(clamped_at_zero(&count, false, e), e, "raw on request");
        let sum = agg(AggregateKind::Sum, vec![0], 0.0, 5.0);
        assert_eq!(clamped_at_zero(&sum, true, e).value, 0.0);
        let signed = agg(AggregateKind::Sum, vec![0], -1.0, 5.0);
        assert_eq!(
            clamped_at_zero(&signed, true, e),
            e,
            "a sum that can be negative"
        );
    }

    #[test]
    fn noisy_counts_get_symmetric_intervals() {
        let t = totals(vec![100.0], 4.0);
        let e = estimate(
            &agg(AggregateKind::CountStar, vec![0], 0.0, 0.0),
            &t,
            0,
            2.0,
        )
        .expect("estimate");
        assert_eq!((e.low, e.value, e.high), (96.0, 100.0, 104.0));
    }
}
