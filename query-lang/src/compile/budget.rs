//! Phase 4: contribution bounds, the sensitivity of each partial, and the
//! split of the query's budget over the partials and partition selection.
//!
//! A person contributes to at most `max_groups` groups and `max_rows` rows
//! per group; each partial's per-group bound follows from the aggregate
//! and its bounds, and its L1 and L2 sensitivities from `max_groups`.

use confer_privacy::selection::Selection;

use super::MAX_BOUND;
use super::aggregates::Selected;
use super::keys::Keys;
use super::shape::Shape;
use crate::error::{QueryError, Result};
use crate::options::{DpOptions, Mechanism};
use crate::plan::{AggregateKind, AggregateSpec, Bounds, PERCENTILE_BINS, PartialSpec, PlanCost};

/// What each person may contribute, and what that costs.
pub(super) struct Bounded {
    /// Rows per person per group (1 when each person has one row).
    pub(super) max_rows: usize,
    /// Groups per person.
    pub(super) max_groups: usize,
    /// Whether the local query must choose each person's groups.
    pub(super) needs_group_sampling: bool,
    /// Whether the local query must choose each person's rows in a group.
    pub(super) needs_row_sampling: bool,
    /// The aggregates, with their partials and bounds.
    pub(super) aggregates: Vec<AggregateSpec>,
    /// The partials, with their sensitivities.
    pub(super) partials: Vec<PartialSpec>,
    /// What the query costs.
    pub(super) cost: PlanCost,
    /// Partition selection, for private keys.
    pub(super) selection: Option<Selection>,
}

/// Phase 4: contribution bounds, sensitivities and the budget split.
pub(super) fn bound(shape: &Shape, selected: &Selected, keys: &Keys) -> Result<Bounded> {
    let options = &shape.options;
    let aggs = &selected.aggs;
    let single_row = shape.source_prov.one_row_per_unit;
    let no_groups = selected.group_exprs.is_empty();
    let max_rows = if single_row {
        1
    } else {
        options.max_rows_contributed as usize
    };
    let max_groups = if no_groups || single_row {
        1
    } else {
        (options.max_groups_contributed as usize).min(keys.public_groups)
    };
    let needs_group_sampling =
        !single_row && !no_groups && (options.max_groups_contributed as usize) < keys.public_groups;
    let needs_row_sampling = !single_row
        && aggs
            .iter()
            .any(|a| a.kind != AggregateKind::CountDistinctUnit);

    let mut aggregates = Vec::with_capacity(aggs.len());
    let mut partials: Vec<PartialSpec> = Vec::new();
    for (index, agg) in aggs.iter().enumerate() {
        let r = max_rows as f64;
        let bounds = agg
            .bounds
            .map(|(lo, hi, per_row)| Bounds { lo, hi, per_row });
        if let Some(b) = bounds
            && b.lo >= b.hi
        {
            return Err(QueryError::Rejected(format!(
                "{}: the bounds ({}, {}) (from the query, or else the catalog) leave no room for noise \
                 calibration; write lo < hi (if every value is the same, use COUNT and multiply)",
                agg.expr, b.lo, b.hi
            )));
        }
        if let Some(b) = bounds
            && b.lo.abs().max(b.hi.abs()) > MAX_BOUND
        {
            return Err(QueryError::Rejected(format!(
                "{}: the bounds ({}, {}) are beyond ±{MAX_BOUND:e}, where sums over persons lose \
                 precision and can overflow: rescale the values (for example to thousands)",
                agg.expr, b.lo, b.hi
            )));
        }
        let half = bounds.map(|b| (b.hi - b.lo) / 2.0).unwrap_or(0.0);
        let add =
            |suffixes: &[&str], integer: bool, per_group: f64, partials: &mut Vec<PartialSpec>| {
                let n = partials.len();
                let columns: Vec<String> = if suffixes.is_empty() {
                    vec![format!("__p{n}")]
                } else {
                    suffixes.iter().map(|s| format!("__p{n}_{s}")).collect()
                };
                let k = max_groups as f64;
                partials.push(PartialSpec {
                    columns,
                    aggregate: index,
                    integer,
                    per_group_bound: per_group,
                    l1: per_group * k,
                    l2: per_group * k.sqrt(),
                });
                n
            };
        let ids: Vec<usize> = match agg.kind {
            AggregateKind::CountStar | AggregateKind::Count => {
                vec![add(&[], true, r, &mut partials)]
            }
            AggregateKind::CountDistinctUnit => vec![add(&[], true, 1.0, &mut partials)],
            AggregateKind::Sum => {
                let b = bounds.ok_or_else(|| QueryError::Internal("SUM without bounds".into()))?;
                let (lo, hi) = if b.per_row {
                    (b.lo.min(r * b.lo), b.hi.max(r * b.hi))
                } else {
                    (b.lo, b.hi)
                };
                vec![add(&[], false, lo.abs().max(hi.abs()), &mut partials)]
            }
            AggregateKind::Avg => vec![
                add(&["sum"], false, half, &mut partials),
                add(&["n"], true, 1.0, &mut partials),
            ],
            AggregateKind::VarPop | AggregateKind::StddevPop => vec![
                add(&["n"], true, r, &mut partials),
                add(&["s1"], false, r * half, &mut partials),
                add(&["s2"], false, r * half * half, &mut partials),
            ],
            AggregateKind::Percentile => {
                let bins: Vec<String> = (0..PERCENTILE_BINS).map(|k| format!("b{k}")).collect();
                let refs: Vec<&str> = bins.iter().map(String::as_str).collect();
                vec![add(&refs, true, r, &mut partials)]
            }
        };
        aggregates.push(AggregateSpec {
            name: agg.name.clone(),
            kind: agg.kind,
            expr: agg.expr.clone(),
            partials: ids,
            bounds,
            percentile: agg.percentile,
            value: agg.value,
        });
    }
    // Keys only: private keys cost their partition selection alone; the
    // keys of public domains are the domains, released for nothing.
    let (cost, selection) = if partials.is_empty() && !keys.private_keys {
        (
            PlanCost {
                rho: 0.0,
                epsilon: 0.0,
                delta: 0.0,
                selection_delta: 0.0,
                per_partial: 0.0,
            },
            None,
        )
    } else {
        split_budget(
            options,
            partials.len(),
            keys.private_keys.then_some(max_groups),
        )?
    };
    Ok(Bounded {
        max_rows,
        max_groups,
        needs_group_sampling,
        needs_row_sampling,
        aggregates,
        partials,
        cost,
        selection,
    })
}

/// Splits the query's budget over its partials and partition selection.
pub(super) fn split_budget(
    options: &DpOptions,
    partials: usize,
    selection_groups: Option<usize>,
) -> Result<(PlanCost, Option<Selection>)> {
    let shares = (partials + usize::from(selection_groups.is_some())).max(1) as f64;
    let privacy_err = |e: confer_privacy::PrivacyError| QueryError::Rejected(e.to_string());
    match options.mechanism {
        Mechanism::Gaussian => {
            let delta_selection = if selection_groups.is_some() {
                options.delta / 2.0
            } else {
                0.0
            };
            let delta_noise = options.delta - delta_selection;
            let rho =
                confer_privacy::accounting::rho_for_epsilon_delta(options.epsilon, delta_noise)
                    .map_err(privacy_err)?;
            let per_partial = rho / shares;
            let selection = selection_groups
                .map(|k| {
                    Selection::gaussian(k as u32, per_partial, delta_selection).map_err(privacy_err)
                })
                .transpose()?;
            let epsilon = confer_privacy::accounting::epsilon_for_rho(rho, delta_noise)
                .map_err(privacy_err)?;
            Ok((
                PlanCost {
                    rho,
                    epsilon,
                    delta: options.delta,
                    selection_delta: delta_selection,
                    per_partial,
                },
                selection,
            ))
        }
        Mechanism::Laplace => {
            let per_partial = options.epsilon / shares;
            let selection = selection_groups
                .map(|k| {
                    Selection::laplace(k as u32, per_partial, options.delta).map_err(privacy_err)
                })
                .transpose()?;
            Ok((
                PlanCost {
                    rho: confer_privacy::accounting::rho_for_pure_epsilon(options.epsilon),
                    epsilon: options.epsilon,
                    delta: if selection.is_some() {
                        options.delta
                    } else {
                        0.0
                    },
                    selection_delta: if selection.is_some() {
                        options.delta
                    } else {
                        0.0
                    },
                    per_partial,
                },
                selection,
            ))
        }
    }
}
