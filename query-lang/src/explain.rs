//! `EXPLAIN PRIVACY`: what a query will release and what it costs, as
//! (item, value) rows, computed from the plan alone; nothing is spent.
//!
//! The coordinator serves these rows as a batch; the dialect's snapshot
//! tests (`query-lang/tests/slt/`) compare them as text.

use crate::error::Result;
use crate::options::Aggregation;
use crate::plan::FederatedPlan;

/// EXPLAIN PRIVACY for a network of `sites` nodes: the mechanism, the cost
/// per node, the contribution bounds, the groups, partition selection,
/// each aggregate's noise and expected interval, and the local bounded
/// query.
pub fn explain(plan: &FederatedPlan, sites: usize) -> Result<Vec<(String, String)>> {
    let mut rows: Vec<(String, String)> = Vec::new();
    let o = &plan.options;
    rows.push(("mechanism".into(), o.mechanism.name().into()));
    rows.push((
        "cost per node".into(),
        format!(
            "epsilon = {:.6}, delta = {:e}, rho (zCDP) = {:.6}",
            plan.cost.epsilon, plan.cost.delta, plan.cost.rho
        ),
    ));
    rows.push((
        "contribution bounds".into(),
        format!(
            "max_groups_contributed = {} (effective {}), max_rows_contributed = {}",
            o.max_groups_contributed, plan.max_groups, o.max_rows_contributed
        ),
    ));
    let groups: Vec<String> = plan
        .groups
        .iter()
        .map(|g| match &g.domain {
            Some(d) => format!("{} (public domain of {} values)", g.name, d.len()),
            None => format!("{} (private keys: partition selection)", g.name),
        })
        .collect();
    rows.push((
        "groups".into(),
        if groups.is_empty() {
            "none (one global group)".into()
        } else {
            groups.join(", ")
        },
    ));
    if let Some(sel) = &plan.selection
        && o.aggregation == Aggregation::Secure
    {
        rows.push((
            "partition selection".into(),
            format!(
                "secure, over the network's combined counts: the keys are found level by level from \
                 securely summed noisy person counts (rho {:.6} of the cost, level 1 over key classes \
                 spends {:.0}% of it); a candidate is kept when its summed noisy count reaches the \
                 threshold a trusted curator's {} selection would use at that level's noise; no delta \
                 is spent on selection",
                plan.cost.per_partial,
                crate::secure_select::FIRST_LEVEL_SHARE * 100.0,
                sel.mechanism.name(),
            ),
        ));
    } else if let Some(sel) = &plan.selection {
        rows.push((
            "partition selection".into(),
            format!(
                "{} noise, scale {:.4}: a group is released when its noisy person count is at least {} \
                 (delta {:e} set aside)",
                sel.mechanism.name(),
                sel.scale,
                sel.threshold,
                sel.delta
            ),
        ));
    }
    let z = crate::combine::interval_multiplier(o);
    let secure = o.aggregation == Aggregation::Secure;
    let min_survivors = crate::secure::min_survivors(
        sites,
        o.min_sites
            .unwrap_or(crate::secure::default_min_sites(sites))
            .min(sites),
    )
    .min(sites.max(2));
    let secure_sd = if secure {
        // Under secure partition selection the spread is that of the
        // release over the keys found (it hardly depends on how many).
        let released = if plan.public_groups() {
            plan.clone()
        } else {
            crate::secure_select::with_selected_keys(plan, &[0])?
        };
        Some(crate::secure::summed_noise_stddev(
            &released,
            min_survivors,
        )?)
    } else {
        None
    };
    let per_site_groups = plan.groups.iter().any(|g| g.is_site);
    for agg in &plan.aggregates {
        for &p in &agg.partials {
            let spec = &plan.partials[p];
            let part = spec
                .columns
                .first()
                .map(|c| c.rsplit('_').next().unwrap_or(c))
                .unwrap_or("");
            let head = format!(
                "{} [{part}]: per-group bound {}, sensitivity L1 {} / L2 {:.4}",
                agg.expr, spec.per_group_bound, spec.l1, spec.l2
            );
            let text = if let Some(sds) = &secure_sd {
                let sd = sds[p];
                format!(
                    "{head}; distributed discrete Gaussian over a secure sum: standard deviation {sd:.4} with \
                     {min_survivors} contributing node(s), up to {:.4} if all {sites} contribute; {:.0}% interval \
                     +/- {:.4} at {min_survivors}",
                    sd * (sites as f64 / min_survivors as f64).sqrt(),
                    o.confidence * 100.0,
                    z * sd
                )
            } else {
                let noise = plan.noise(p)?;
                let node_sd = if spec.integer {
                    noise.stddev()
                } else {
                    noise.stddev_f64()
                };
                let spread = if per_site_groups {
                    "per group from its one site".to_string()
                } else if !plan.public_groups() {
                    format!(
                        "per group summed over the sites that released it, at most {:.4} over {sites}",
                        node_sd * (sites as f64).sqrt()
                    )
                } else {
                    format!(
                        "{:.4} over {sites} node(s)",
                        node_sd * (sites as f64).sqrt()
                    )
                };
                let network_sd = if per_site_groups {
                    node_sd
                } else {
                    node_sd * (sites as f64).sqrt()
                };
                format!(
                    "{head}, noise scale {:.4} per node (standard deviation {node_sd:.4}); standard deviation \
                     {spread}; {:.0}% interval +/- {:.4}{}",
                    noise.scale,
                    o.confidence * 100.0,
                    z * network_sd,
                    if !per_site_groups && !plan.public_groups() {
                        " at most"
                    } else {
                        ""
                    }
                )
            };
            rows.push((format!("aggregate {}", agg.name), text));
        }
    }
    rows.push(("local bounded query".into(), plan.local_sql.clone()));
    Ok(rows)
}
