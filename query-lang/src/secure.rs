//! `aggregation = 'secure'`: each node turns its exact partials into one
//! integer vector carrying its share of discrete Gaussian noise; secure
//! aggregation (`confer_privacy::secagg`) reveals only the sum to the
//! coordinator, which decodes it into one release for the combine step.
//!
//! Layout: partial by partial (SELECT order), each as `groups × width`
//! values, groups in public-domain order. Counts are integers already; float
//! partials (sums, moments) are rounded to a granularity `g = 2^k` chosen
//! from their sensitivity, so rounding moves each value by at most `g / 2`,
//! which the integer sensitivity accounts for.
//!
//! Noise: for partial i with budget `rho_i`, integer sensitivity `Δ` and
//! `t = min_survivors`, `σ` is the smallest value whose distributed discrete
//! Gaussian cost ([`distributed_gaussian_rho`]) is at most `rho_i` counting
//! only `t` nodes' noise; each node adds `N_Z(0, σ²/t)`. The cost of the
//! query is therefore the plan's, whatever the number of survivors (at least
//! `t`), and the sum carries the noise of one trusted curator.

use arrow::array::RecordBatch;
use confer_privacy::secagg::CryptoRng;
use confer_privacy::secagg::encoding::{DiscreteGaussian, distributed_gaussian_rho, sigma_for_rho};
use confer_protocol::release::PartialNoise;
use uuid::Uuid;

use crate::error::{QueryError, Result};
use crate::plan::FederatedPlan;
use crate::release::{
    Exact, assemble, exact_partials, persons_by_slot, read_rows, saturate, small_cells_kept,
};

/// Values are summed modulo 2^64 and read back as two's-complement `i64`.
pub const BITS: u32 = 64;

/// Largest magnitude a node may contribute per element, so that the sum of
/// up to `MAX_NODES` nodes (with noise) cannot wrap around.
const MAX_ELEMENT: i64 = 1 << 52;

/// How one partial is encoded.
#[derive(Debug, Clone, Copy)]
struct PartialCode {
    /// Values per partial: groups × width.
    len: usize,
    /// Granularity (1 for counts).
    granularity: f64,
    /// σ of the summed noise, in integer units.
    sigma: f64,
}

/// Most elements one node's secure-aggregation vector may have (about
/// 48 MiB as the JSON of a masked input, within a node's message limit).
pub const MAX_VECTOR_LEN: usize = 4 << 20;

/// `min_sites` when neither the query nor the study sets it: a majority of
/// the `nodes`, the protocol's default threshold, so a minority may drop out.
pub fn default_min_sites(nodes: usize) -> usize {
    nodes / 2 + 1
}

/// The session's threshold for `members` nodes: a majority, at least
/// `min_sites`, and at least 2.
pub fn min_survivors(members: usize, min_sites: usize) -> usize {
    (members / 2 + 1).max(min_sites).max(2)
}

/// Elements per group: the partials' widths summed.
pub fn width(plan: &FederatedPlan) -> usize {
    plan.partials.iter().map(|p| p.columns.len()).sum()
}

/// The length of the vector every node sends for `plan`, refused past
/// [`MAX_VECTOR_LEN`].
pub fn vector_len(plan: &FederatedPlan) -> Result<usize> {
    let groups = plan
        .groups
        .iter()
        .try_fold(1usize, |n, g| {
            n.checked_mul(g.domain.as_ref().map_or(1, Vec::len))
        })
        .and_then(|n| n.checked_mul(width(plan)))
        .filter(|n| *n <= MAX_VECTOR_LEN);
    groups.ok_or_else(|| {
        QueryError::Rejected(format!(
            "aggregation = 'secure': the groups times the values per group exceed {MAX_VECTOR_LEN} \
             elements per node: group by fewer or coarser columns, or use aggregation = 'per_site'"
        ))
    })
}

/// What a node checks before it charges a secure release: the vector's
/// length (returned), and that its noise share can be calibrated and
/// sampled for `honest` survivors. Nothing here depends on the rows.
pub fn check_input(plan: &FederatedPlan, honest: usize) -> Result<usize> {
    let len = vector_len(plan)?;
    let h = honest.max(1);
    for code in codes(plan, h)? {
        DiscreteGaussian::with_variance(code.sigma * code.sigma / h as f64)
            .map_err(|e| QueryError::Rejected(format!("secure-aggregation noise: {e}")))?;
    }
    Ok(len)
}

fn codes(plan: &FederatedPlan, min_survivors: usize) -> Result<Vec<PartialCode>> {
    if !plan.public_groups() {
        return Err(QueryError::Rejected(
            "aggregation = 'secure' needs every group key to have a public domain".into(),
        ));
    }
    let groups = plan.group_keys()?.len();
    let fail = |e: confer_privacy::secagg::SecAggError| {
        QueryError::Rejected(format!("cannot calibrate secure-aggregation noise: {e}"))
    };
    plan.partials
        .iter()
        .map(|p| {
            let width = p.columns.len();
            let len = groups * width;
            let (granularity, sensitivity) = if p.integer {
                (1.0, p.l2)
            } else {
                // About 2^-20 of the sensitivity: rounding error far below the noise.
                let k = (p.l2.max(f64::MIN_POSITIVE)).log2().floor() - 20.0;
                let g = 2f64.powi(k as i32);
                // Rounding the node's sums moves each of the (at most)
                // max_groups × width values one person touches by < g.
                let moved = ((plan.max_groups * width) as f64).sqrt();
                (g, p.l2 / g + moved)
            };
            let sigma = sigma_for_rho(plan.cost.per_partial, sensitivity, len, min_survivors, 1)
                .map_err(fail)?;
            distributed_gaussian_rho(sigma, sensitivity, len, min_survivors, 1).map_err(fail)?;
            Ok(PartialCode {
                len,
                granularity,
                sigma,
            })
        })
        .collect()
}

/// The standard deviation of the noise in the decoded sum, per partial, in
/// the partial's units, when `min_survivors` nodes contribute (each further
/// survivor multiplies it by √(survivors / min_survivors)).
pub fn summed_noise_stddev(plan: &FederatedPlan, min_survivors: usize) -> Result<Vec<f64>> {
    Ok(codes(plan, min_survivors)?
        .iter()
        .map(|c| c.sigma * c.granularity)
        .collect())
}

/// A node's input: its exact partials, encoded, plus its share of the noise,
/// as elements modulo 2^64. `honest` is the number of survivors whose noise
/// the node counts on (the session's `min_survivors` less the peers its
/// policy assumes may collude with the coordinator): its share is sized so
/// that `honest` such shares alone give the query's guarantee.
pub fn node_input<R: CryptoRng + ?Sized>(
    plan: &FederatedPlan,
    batches: &[RecordBatch],
    honest: usize,
    rng: &mut R,
) -> Result<Vec<u64>> {
    let min_survivors = honest.max(1);
    let codes = codes(plan, min_survivors)?;
    let rows = read_rows(plan, batches)?;
    let keys = plan.group_keys()?;
    let index = FederatedPlan::key_index(&keys);
    let mut exact = exact_partials(plan, &rows, &index, keys.len())?;
    saturate(
        plan,
        &mut exact,
        &persons_by_slot(&rows, &index, keys.len()),
    );
    let mut out = Vec::with_capacity(codes.iter().map(|c| c.len).sum());
    for (code, values) in codes.iter().zip(exact) {
        let ints: Vec<i64> = match values {
            Exact::Int(v) => v,
            Exact::Float(v) => v
                .iter()
                .map(|x| (x / code.granularity).round() as i64)
                .collect(),
        };
        let noise = DiscreteGaussian::with_variance(code.sigma * code.sigma / min_survivors as f64)
            .map_err(|e| QueryError::Internal(format!("noise share: {e}")))?;
        for x in ints {
            // Saturated rather than refused: a refusal here would depend
            // on the rows (the debit is already recorded). Only absurd
            // networks (billions of persons at the largest bounds) reach it.
            let x = x.clamp(-MAX_ELEMENT, MAX_ELEMENT);
            let noisy = x.wrapping_add(noise.sample(rng));
            out.push(noisy as u64);
        }
    }
    Ok(out)
}

/// Decodes the sum of the contributors' inputs into one release batch, as
/// if a single site had released it (`site` names the contributors).
/// `honest` holds, for each contributor, the number of honest survivors it
/// sized its noise share for (see [`node_input`]); the declared spread is
/// the sum of their shares. Groups whose noisy counts fall below
/// `min_group_size` are suppressed (NULL), as a node does with its own
/// release.
pub fn decode(
    plan: &FederatedPlan,
    sum: &[u64],
    honest: &[usize],
    min_group_size: u64,
    site: &str,
    task_id: Uuid,
) -> Result<RecordBatch> {
    if honest.is_empty() {
        return Err(QueryError::Internal(
            "a secure sum without contributors".into(),
        ));
    }
    // The layout and granularity do not depend on the shares; the noise does.
    let codes = codes(plan, honest[0].max(1))?;
    let mut variance = vec![0.0f64; codes.len()];
    let mut cache: std::collections::HashMap<usize, Vec<PartialCode>> =
        std::collections::HashMap::new();
    for &h in honest {
        let h = h.max(1);
        let shares = match cache.entry(h) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self::codes(plan, h)?),
        };
        for (v, c) in variance.iter_mut().zip(shares.iter()) {
            *v += c.sigma * c.sigma / h as f64;
        }
    }
    let want: usize = codes.iter().map(|c| c.len).sum();
    if sum.len() != want {
        return Err(QueryError::Internal(format!(
            "the secure sum has {} elements where the plan needs {want}",
            sum.len()
        )));
    }
    let keys = plan.group_keys()?;
    let mut at = 0;
    let mut noisy = Vec::with_capacity(codes.len());
    let mut info = Vec::new();
    for ((code, spec), var) in codes.iter().zip(&plan.partials).zip(&variance) {
        let values = &sum[at..at + code.len];
        at += code.len;
        let ints = values.iter().map(|&v| v as i64);
        noisy.push(if spec.integer {
            Exact::Int(ints.collect())
        } else {
            Exact::Float(ints.map(|v| v as f64 * code.granularity).collect())
        });
        for column in &spec.columns {
            info.push(PartialNoise {
                column: column.clone(),
                mechanism: "gaussian".into(),
                noise_stddev: var.sqrt() * code.granularity,
                scale: var.sqrt() * code.granularity,
                sensitivity: spec.l2,
            });
        }
    }
    let keep = small_cells_kept(plan, &noisy, keys.len(), min_group_size);
    assemble(plan, &keys, noisy, &keep, info, site, task_id)
}
