//! Partition selection under `aggregation = 'secure'`: the keys of a
//! private whole-number group column found from the network's combined,
//! securely summed person counts, so that a group small at every site but
//! large across them is kept, as a single trusted curator would keep it.
//!
//! Per-site selection thresholds each node's own noisy count, so a group of
//! 5 persons at each of 30 village clinics (150 in all) is dropped at every
//! one of them. Here no node ever decides alone. The key values are found
//! level by level, each level one secure-aggregation session over a
//! **public** list of candidates:
//!
//! 1. Level 1 counts persons per key *class* (sign and bit length: 128
//!    candidates, the same for every query).
//! 2. Each later level extends the prefixes kept so far by up to
//!    [`MAX_WIDTH`] bits (fewer when many prefixes are kept, so that a level
//!    never has more than [`LEVEL_CAP`] candidates), until every kept prefix
//!    is a whole key.
//! 3. The aggregates are then released over the keys found: a public
//!    domain by then, so the release is the ordinary secure query.
//!
//! Each node counts each person at most once per candidate and in at most
//! `max_groups` candidates (its bounded rows, one row per person and key,
//! each key matched to one candidate at most), so each level is a Gaussian
//! mechanism of L2 sensitivity √max_groups over a list the coordinator could
//! have written without seeing any data. A coordinator that lies about the
//! list changes which keys are found, never how much is revealed. A
//! candidate is kept when its summed noisy count reaches the threshold a
//! trusted curator's Gaussian partition selection would use at that level's
//! noise and the plan's selection δ; for whole keys that δ is shared out
//! over the level's whole-key candidates, so a key nobody holds is released
//! with probability below δ per level, L·δ over a query's L levels (a false
//! prefix only widens the next level). That δ bounds false keys only; as a privacy cost
//! it is not spent at all (every level's candidates are public).
//!
//! Budget: selection has the same share of the query's rho as it has under
//! per-site selection; level 1 spends [`FIRST_LEVEL_SHARE`] of it (its
//! classes pool many keys, so their counts are large), and each later level
//! the rest divided by the levels still needed. Each level is
//! its own task, charged at each node before the node answers.

use std::collections::{HashMap, HashSet};

use arrow::array::{Array, Int64Array, RecordBatch};
use arrow::row::{RowConverter, SortField};
use confer_privacy::secagg::CryptoRng;
use confer_privacy::secagg::encoding::{DiscreteGaussian, sigma_for_rho};
use confer_privacy::selection::Selection;
use confer_protocol::catalog::{ColumnType, DomainValue};
use confer_protocol::task::{KeyPrefix, SelectStep};

use crate::error::{QueryError, Result};
use crate::plan::{FederatedPlan, GroupSpec, PlanCost};

/// Most candidates one level counts.
pub const LEVEL_CAP: usize = 1 << 18;

/// Most bits one level extends a prefix by.
pub const MAX_WIDTH: u32 = 16;

/// Share of the selection budget the first level (key classes) spends.
pub const FIRST_LEVEL_SHARE: f64 = 0.1;

/// Most keys a release step may name.
pub const MAX_KEYS: usize = LEVEL_CAP;

/// Key classes: -64..=-1 (negative keys of that bit length), 0 (the key 0),
/// 1..=63 (positive keys of that bit length).
const CLASSES: std::ops::RangeInclusive<i8> = -64..=63;

/// The group key secure selection finds: the one group key without a
/// public domain, which must hold whole numbers.
pub fn secure_private_key(groups: &[GroupSpec]) -> Result<usize> {
    let private: Vec<usize> = (0..groups.len())
        .filter(|&i| groups[i].domain.is_none())
        .collect();
    let advice =
        "declare a public domain in node.toml for the others or use aggregation = 'per_site'";
    match private.as_slice() {
        [i] if groups[*i].column_type == ColumnType::Int64 => Ok(*i),
        [i] => Err(QueryError::Rejected(format!(
            "GROUP BY {} with aggregation = 'secure': secure partition selection finds whole-number keys \
             (for example a concept id) and {} holds {} values; declare a public domain for it in \
             node.toml, group by a whole-number column, or use aggregation = 'per_site'",
            groups[*i].name, groups[*i].name, groups[*i].column_type
        ))),
        _ => Err(QueryError::Rejected(format!(
            "GROUP BY {} with aggregation = 'secure': secure partition selection finds the keys of one \
             private column at a time; {advice}",
            private
                .iter()
                .map(|&i| groups[i].name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// A key's class, the bits after its leading one, and how many there are.
pub fn split(key: i64) -> (i8, u64, u32) {
    let magnitude = key.unsigned_abs();
    let bits = 64 - magnitude.leading_zeros();
    if bits == 0 {
        return (0, 0, 0);
    }
    let rest = bits - 1;
    let offset = magnitude - (1u64 << rest);
    let class = if key < 0 { -(bits as i8) } else { bits as i8 };
    (class, offset, rest)
}

/// Bits after the leading one in keys of `class`.
pub fn class_bits(class: i8) -> u32 {
    (class.unsigned_abs() as u32).saturating_sub(1)
}

/// The key a whole prefix stands for.
pub fn join(prefix: KeyPrefix) -> Result<i64> {
    let rest = class_bits(prefix.class);
    if !CLASSES.contains(&prefix.class) || prefix.depth as u32 != rest {
        return Err(QueryError::Internal(format!(
            "prefix {prefix:?} is not a whole key"
        )));
    }
    if prefix.class == 0 {
        return Ok(0);
    }
    let magnitude = (1i128 << rest) + prefix.value as i128;
    let key = if prefix.class < 0 {
        -magnitude
    } else {
        magnitude
    };
    i64::try_from(key).map_err(|_| QueryError::Internal(format!("prefix {prefix:?} overflows")))
}

/// Whether `prefix` names a whole key.
pub fn is_whole(prefix: &KeyPrefix) -> bool {
    prefix.depth as u32 == class_bits(prefix.class)
}

/// A level's candidates, in vector order.
pub struct Level {
    candidates: Vec<KeyPrefix>,
    /// (class, depth) -> parent value -> (index of its first child, child depth).
    parents: HashMap<(i8, u8), HashMap<u64, (usize, u8)>>,
    /// Depths parents have, per class, shallowest first.
    depths: HashMap<i8, Vec<u8>>,
}

impl Level {
    /// The candidates of `step`, checked: prefixes that exist, no parent
    /// twice, at most [`LEVEL_CAP`] candidates.
    pub fn new(step: &SelectStep) -> Result<Self> {
        let bad = |why: String| {
            QueryError::Rejected(format!("secure selection level {}: {why}", step.level))
        };
        if !(step.rho > 0.0 && step.rho.is_finite()) {
            return Err(bad(format!("rho must be positive, not {}", step.rho)));
        }
        let mut candidates = Vec::new();
        let mut parents: HashMap<(i8, u8), HashMap<u64, (usize, u8)>> = HashMap::new();
        let mut depths: HashMap<i8, Vec<u8>> = HashMap::new();
        if step.parents.is_empty() {
            candidates.extend(CLASSES.map(|class| KeyPrefix {
                class,
                depth: 0,
                value: 0,
            }));
            return Ok(Self {
                candidates,
                parents,
                depths,
            });
        }
        if !(1..=24).contains(&step.width) {
            return Err(bad(format!("width {} is outside 1 to 24", step.width)));
        }
        for p in &step.parents {
            let rest = class_bits(p.class);
            if !CLASSES.contains(&p.class)
                || p.depth as u32 >= rest
                || (p.depth < 64 && p.value >> p.depth != 0)
            {
                return Err(bad(format!("{p:?} is not a prefix that can be extended")));
            }
            let child_depth = (p.depth as u32 + step.width).min(rest);
            let children = 1usize << (child_depth - p.depth as u32);
            if candidates.len() + children > LEVEL_CAP {
                return Err(bad(format!("more than {LEVEL_CAP} candidates")));
            }
            let first = candidates.len();
            let base = p.value << (child_depth - p.depth as u32);
            candidates.extend((0..children as u64).map(|i| KeyPrefix {
                class: p.class,
                depth: child_depth as u8,
                value: base | i,
            }));
            if parents
                .entry((p.class, p.depth))
                .or_default()
                .insert(p.value, (first, child_depth as u8))
                .is_some()
            {
                return Err(bad(format!("{p:?} is named twice")));
            }
            let d = depths.entry(p.class).or_default();
            if !d.contains(&p.depth) {
                d.push(p.depth);
                d.sort_unstable();
            }
        }
        Ok(Self {
            candidates,
            parents,
            depths,
        })
    }

    /// The candidates.
    pub fn candidates(&self) -> &[KeyPrefix] {
        &self.candidates
    }

    /// The candidate `key` counts for, if any (at most one).
    pub fn slot(&self, key: i64) -> Option<usize> {
        let (class, offset, rest) = split(key);
        if self.parents.is_empty() {
            return Some((class as i16 - *CLASSES.start() as i16) as usize);
        }
        for &depth in self.depths.get(&class)? {
            let value = offset >> (rest - depth as u32);
            if let Some(&(first, child_depth)) = self
                .parents
                .get(&(class, depth))
                .and_then(|m| m.get(&value))
            {
                let child = offset >> (rest - child_depth as u32);
                let base = value << (child_depth - depth);
                return Some(first + (child - base) as usize);
            }
        }
        None
    }
}

/// The σ of one level's summed noise (integer units) when `honest`
/// survivors' shares count.
fn level_sigma(plan: &FederatedPlan, step: &SelectStep, len: usize, honest: usize) -> Result<f64> {
    sigma_for_rho(
        step.rho,
        (plan.max_groups.max(1) as f64).sqrt(),
        len.max(1),
        honest.max(1),
        1,
    )
    .map_err(|e| QueryError::Rejected(format!("cannot calibrate secure selection noise: {e}")))
}

/// What a node checks before it charges a level: its candidates (their
/// number is returned), and that its noise share can be calibrated and
/// sampled for `honest` survivors. Nothing here depends on the rows.
pub fn check_level(plan: &FederatedPlan, step: &SelectStep, honest: usize) -> Result<usize> {
    let len = Level::new(step)?.candidates.len();
    let sigma = level_sigma(plan, step, len, honest)?;
    DiscreteGaussian::with_variance(sigma * sigma / honest.max(1) as f64).map_err(|e| {
        QueryError::Rejected(format!(
            "secure selection level {}: noise share: {e}",
            step.level
        ))
    })?;
    Ok(len)
}

/// A node's input to one level: per candidate, the number of persons whose
/// bounded rows hold a key under it, plus the node's share of the noise.
/// `batches` are the rows of [`FederatedPlan::key_sql`].
pub fn level_input<R: CryptoRng + ?Sized>(
    plan: &FederatedPlan,
    step: &SelectStep,
    batches: &[RecordBatch],
    honest: usize,
    rng: &mut R,
) -> Result<Vec<u64>> {
    let level = Level::new(step)?;
    let len = level.candidates.len();
    let sigma = level_sigma(plan, step, len, honest)?;
    let mut seen: HashSet<(Vec<u8>, usize)> = HashSet::new();
    let mut counts = vec![0i64; len];
    for batch in batches {
        if batch.num_columns() != 2 {
            return Err(QueryError::Internal(
                "the key query gives (unit, key) rows".into(),
            ));
        }
        let converter =
            RowConverter::new(vec![SortField::new(batch.column(0).data_type().clone())])
                .map_err(|e| QueryError::Internal(e.to_string()))?;
        let units = converter
            .convert_columns(&[batch.column(0).clone()])
            .map_err(|e| QueryError::Internal(e.to_string()))?;
        let keys = batch
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| QueryError::Internal("the private key is not Int64".into()))?;
        for row in 0..batch.num_rows() {
            if !keys.is_valid(row) {
                continue;
            }
            if let Some(slot) = level.slot(keys.value(row))
                && seen.insert((units.row(row).as_ref().to_vec(), slot))
            {
                counts[slot] += 1;
            }
        }
    }
    let noise = DiscreteGaussian::with_variance(sigma * sigma / honest.max(1) as f64)
        .map_err(|e| QueryError::Internal(format!("noise share: {e}")))?;
    Ok(counts
        .into_iter()
        .map(|c| c.wrapping_add(noise.sample(rng)) as u64)
        .collect())
}

/// What a node charges for one level: its rho, no δ (the candidates are
/// public), and the ε that rho gives at the plan's δ for noise.
pub fn level_cost(plan: &FederatedPlan, step: &SelectStep) -> Result<PlanCost> {
    let delta = (plan.cost.delta - plan.cost.selection_delta).max(f64::MIN_POSITIVE);
    let epsilon = confer_privacy::accounting::epsilon_for_rho(step.rho, delta)
        .map_err(|e| QueryError::Rejected(e.to_string()))?;
    Ok(PlanCost {
        rho: step.rho,
        epsilon,
        delta,
        selection_delta: 0.0,
        per_partial: step.rho,
    })
}

/// The plan of the release step: the private key's domain is the selected
/// `keys`, no partition selection, and the cost is the partials' share
/// alone. The local query is unchanged (rows of other keys are ignored).
pub fn with_selected_keys(plan: &FederatedPlan, keys: &[i64]) -> Result<FederatedPlan> {
    let i = secure_private_key(&plan.groups)?;
    if keys.len() > MAX_KEYS {
        return Err(QueryError::Rejected(format!(
            "secure selection: more than {MAX_KEYS} keys in one release"
        )));
    }
    if keys.windows(2).any(|w| w[0] >= w[1]) {
        return Err(QueryError::Rejected(
            "secure selection: the keys of a release must be distinct and ascending".into(),
        ));
    }
    let mut out = plan.clone();
    out.groups[i].domain = Some(keys.iter().map(|&k| DomainValue::Int(k)).collect());
    crate::secure::vector_len(&out)?;
    out.selection = None;
    let shares = plan.partials.len() as f64;
    let rho = plan.cost.per_partial * shares;
    let delta = (plan.cost.delta - plan.cost.selection_delta).max(f64::MIN_POSITIVE);
    out.cost = PlanCost {
        rho,
        epsilon: if rho > 0.0 {
            confer_privacy::accounting::epsilon_for_rho(rho, delta)
                .map_err(|e| QueryError::Rejected(e.to_string()))?
        } else {
            0.0
        },
        delta: if rho > 0.0 { delta } else { 0.0 },
        selection_delta: 0.0,
        per_partial: plan.cost.per_partial,
    };
    Ok(out)
}

/// The coordinator's side: plans each level from the last one's sum and
/// collects the keys found.
#[derive(Debug, Clone)]
pub struct Selector {
    max_groups: u32,
    budget: f64,
    spent: f64,
    delta: f64,
    level: u32,
    pending: Vec<(KeyPrefix, i64)>,
    keys: Vec<(i64, i64)>,
    /// Most keys the release can carry.
    max_keys: usize,
    /// Prefixes left out because a level would have exceeded [`LEVEL_CAP`].
    pub truncated: usize,
}

impl Selector {
    /// Selection for `plan` (which has a private key under secure aggregation).
    pub fn new(plan: &FederatedPlan) -> Result<Self> {
        secure_private_key(&plan.groups)?;
        let selection = plan.selection.as_ref().ok_or_else(|| {
            QueryError::Internal("a private key without partition selection".into())
        })?;
        // Elements each key adds to the release: the other keys' domains
        // times the values per group.
        let mut one = plan.clone();
        let i = secure_private_key(&plan.groups)?;
        one.groups[i].domain = Some(vec![DomainValue::Int(0)]);
        let per_key = if plan.partials.is_empty() {
            1
        } else {
            crate::secure::vector_len(&one)?.max(1)
        };
        Ok(Self {
            max_keys: MAX_KEYS.min(crate::secure::MAX_VECTOR_LEN / per_key),
            max_groups: plan.max_groups.max(1) as u32,
            budget: plan.cost.per_partial,
            spent: 0.0,
            delta: selection.delta,
            level: 0,
            pending: Vec::new(),
            keys: Vec::new(),
            truncated: 0,
        })
    }

    /// The next level to run, or `None` when every key is found.
    pub fn next_step(&mut self) -> Option<SelectStep> {
        if self.level == 0 {
            return Some(SelectStep {
                level: 1,
                rho: self.budget * FIRST_LEVEL_SHARE,
                parents: Vec::new(),
                width: 0,
            });
        }
        if self.pending.is_empty() {
            return None;
        }
        let left = self.budget - self.spent;
        // The widest extension that keeps the level within the cap;
        // beyond the cap, the prefixes with the largest counts.
        let mut width = MAX_WIDTH;
        while width > 1 && (self.pending.len() << width) > LEVEL_CAP {
            width -= 1;
        }
        if (self.pending.len() << width) > LEVEL_CAP {
            self.pending.sort_by_key(|b| std::cmp::Reverse(b.1));
            let keep = LEVEL_CAP >> width;
            self.truncated += self.pending.len() - keep;
            self.pending.truncate(keep);
        }
        let needed = self
            .pending
            .iter()
            .map(|(p, _)| (class_bits(p.class) - p.depth as u32).div_ceil(width))
            .max()
            .unwrap_or(1)
            .max(1);
        let mut parents: Vec<KeyPrefix> = self.pending.iter().map(|(p, _)| *p).collect();
        parents.sort();
        Some(SelectStep {
            level: self.level + 1,
            rho: left / needed as f64,
            parents,
            width,
        })
    }

    /// Takes the secure sum of `step` (as signed integers), whose noise has
    /// standard deviation `sigma`: candidates at or above the threshold
    /// are kept, whole keys among them are found.
    pub fn absorb(&mut self, step: &SelectStep, sum: &[i64], sigma: f64) -> Result<()> {
        let level = Level::new(step)?;
        if sum.len() != level.candidates.len() {
            return Err(QueryError::Internal(format!(
                "level {} sum has {} values for {} candidates",
                step.level,
                sum.len(),
                level.candidates.len()
            )));
        }
        // A false prefix only widens the next level; a false whole key
        // would be released: whole keys face the stricter threshold.
        let whole = level.candidates.iter().filter(|p| is_whole(p)).count();
        let for_prefix = self.threshold(sigma, 1)?;
        let for_key = self.threshold(sigma, whole)?;
        self.level = step.level;
        self.spent += step.rho;
        self.pending.clear();
        for (prefix, &count) in level.candidates.iter().zip(sum) {
            let threshold = if is_whole(prefix) {
                for_key
            } else {
                for_prefix
            };
            if count < threshold {
                continue;
            }
            if is_whole(prefix) {
                // Under class -64 only i64::MIN is a key: a noisy candidate
                // beyond it names no key and is passed over.
                let Ok(key) = join(*prefix) else { continue };
                self.keys.push((key, count));
            } else {
                self.pending.push((*prefix, count));
            }
        }
        Ok(())
    }

    /// The threshold a trusted curator's Gaussian partition selection
    /// would use at noise `sigma` and the plan's selection δ shared out
    /// over the level's `candidates`: a key nobody holds is then kept with
    /// probability below δ per level.
    pub fn threshold(&self, sigma: f64, candidates: usize) -> Result<i64> {
        let k = self.max_groups as f64;
        let rho = k / (2.0 * sigma * sigma);
        let delta = self.delta / candidates.max(1) as f64;
        Ok(Selection::gaussian(self.max_groups, rho, delta)
            .map_err(|e| QueryError::Rejected(e.to_string()))?
            .threshold)
    }

    /// The keys found, ascending; past what one release can carry, those
    /// with the largest noisy counts (the others are counted in
    /// [`Selector::dropped_keys`]).
    pub fn keys(&self) -> Vec<i64> {
        let mut k = self.keys.clone();
        k.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
        k.truncate(self.max_keys);
        let mut keys: Vec<i64> = k.into_iter().map(|(key, _)| key).collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Keys found but left out of the release because it would exceed
    /// [`crate::secure::MAX_VECTOR_LEN`] elements.
    pub fn dropped_keys(&self) -> usize {
        self.keys.len().saturating_sub(self.max_keys)
    }

    /// Rho spent so far.
    pub fn spent(&self) -> f64 {
        self.spent
    }
}

/// The σ of a level's decoded sum, given each contributor's honest count
/// (as in [`crate::secure::decode`]).
pub fn level_sum_sigma(plan: &FederatedPlan, step: &SelectStep, honest: &[usize]) -> Result<f64> {
    let len = Level::new(step)?.candidates.len();
    let mut variance = 0.0;
    for &h in honest {
        let s = level_sigma(plan, step, len, h)?;
        variance += s * s / h.max(1) as f64;
    }
    Ok(variance.sqrt())
}

/// The length of a level's vector.
pub fn level_len(step: &SelectStep) -> Result<usize> {
    Ok(Level::new(step)?.candidates.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_splits_and_joins_back() {
        for key in [
            0,
            1,
            -1,
            2,
            3,
            -3,
            192671,
            4_112_343,
            -77,
            i64::MAX,
            i64::MIN,
            i64::MIN + 1,
            1 << 40,
        ] {
            let (class, value, rest) = split(key);
            assert_eq!(class_bits(class), rest, "{key}");
            let back = join(KeyPrefix {
                class,
                depth: rest as u8,
                value,
            })
            .expect("join");
            assert_eq!(back, key);
        }
    }

    fn descend(keys: &[i64]) -> Vec<i64> {
        // Exact counts, no noise: walk the levels with threshold 1.
        let mut pending: Vec<KeyPrefix> = Vec::new();
        let mut found = Vec::new();
        let mut step = SelectStep {
            level: 1,
            rho: 1.0,
            parents: Vec::new(),
            width: 0,
        };
        for _ in 0..64 {
            let level = Level::new(&step).expect("level");
            let mut counts = vec![0; level.candidates().len()];
            for &k in keys {
                if let Some(s) = level.slot(k) {
                    counts[s] += 1;
                }
            }
            pending.clear();
            for (p, &c) in level.candidates().iter().zip(&counts) {
                if c > 0 {
                    if is_whole(p) {
                        found.push(join(*p).expect("join"));
                    } else {
                        pending.push(*p);
                    }
                }
            }
            if pending.is_empty() {
                break;
            }
            step = SelectStep {
                level: step.level + 1,
                rho: 1.0,
                parents: pending.clone(),
                width: 7,
            };
        }
        found.sort_unstable();
        found
    }

    #[test]
    fn levels_find_exactly_the_keys_present() {
        let keys = vec![
            0,
            1,
            -1,
            5,
            6,
            192671,
            4_112_343,
            4_112_344,
            -9000,
            i64::MAX,
            i64::MIN,
        ];
        let mut want = keys.clone();
        want.sort_unstable();
        assert_eq!(descend(&keys), want);
    }

    #[test]
    fn a_key_counts_for_one_candidate_at_most_even_with_nested_parents() {
        let (class, value, rest) = split(192671);
        let shallow = KeyPrefix {
            class,
            depth: 2,
            value: value >> (rest - 2),
        };
        let deep = KeyPrefix {
            class,
            depth: 5,
            value: value >> (rest - 5),
        };
        let step = SelectStep {
            level: 2,
            rho: 1.0,
            parents: vec![shallow, deep],
            width: 3,
        };
        let level = Level::new(&step).expect("level");
        let slot = level.slot(192671).expect("counted");
        assert_eq!(
            level
                .candidates()
                .iter()
                .filter(|c| c.class == class)
                .count(),
            16
        );
        assert!(slot < 8, "counted under the shallow parent only");
        // A parent named twice, or a bad prefix, is refused.
        let twice = SelectStep {
            parents: vec![shallow, shallow],
            ..step.clone()
        };
        assert!(Level::new(&twice).is_err());
        let bad = SelectStep {
            parents: vec![KeyPrefix {
                class,
                depth: 2,
                value: 9,
            }],
            ..step
        };
        assert!(Level::new(&bad).is_err());
    }

    async fn secure_plan() -> FederatedPlan {
        use confer_protocol::catalog::{CatalogInfo, ColumnInfo, TableInfo};
        let catalog = crate::Catalog::for_node(&CatalogInfo {
            node: "n".into(),
            tables: vec![TableInfo {
                name: "t".into(),
                privacy_unit: Some("pid".into()),
                columns: ["pid", "code"]
                    .iter()
                    .map(|c| ColumnInfo {
                        name: (*c).into(),
                        column_type: ColumnType::Int64,
                        bounds: None,
                        domain: None,
                        unique: false,
                    })
                    .collect(),
                one_row_per_unit: false,
            }],
        });
        let crate::Statement::Query(q) = crate::parse(
            "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1e9, delta = 1e-6, aggregation = 'secure') \
             code, COUNT(*) AS n FROM t GROUP BY code",
        )
        .expect("parse") else {
            panic!("a query")
        };
        crate::compile(&q, &catalog, None).await.expect("compile")
    }

    #[tokio::test]
    async fn the_selector_finds_large_keys_within_the_selection_share() {
        let plan = secure_plan().await;
        assert!(plan.key_sql.as_deref().unwrap_or("").contains("__key"));
        // Keys of every sign and size; counts far above the threshold, one
        // key held by a single person.
        let held: Vec<(i64, i64)> = vec![
            (0, 50),
            (-1, 50),
            (7, 50),
            (192_671, 50),
            (4_112_343, 50),
            (-9_000_000_000, 50),
            (i64::MAX, 50),
            (44_782_520, 1),
        ];
        let mut selector = Selector::new(&plan).expect("selector");
        let mut levels = 0;
        while let Some(step) = selector.next_step() {
            levels += 1;
            let level = Level::new(&step).expect("level");
            let mut sum = vec![0i64; level.candidates().len()];
            for &(k, n) in &held {
                if let Some(s) = level.slot(k) {
                    sum[s] += n;
                }
            }
            // The noise here is the node floor: sd below 1 for the test's
            // epsilon; the sum is taken as exact.
            selector.absorb(&step, &sum, 0.9).expect("absorb");
            assert!(levels < 20, "selection ends");
        }
        let mut want: Vec<i64> = held.iter().filter(|h| h.1 > 1).map(|h| h.0).collect();
        want.sort_unstable();
        assert_eq!(selector.keys(), want);
        assert!(selector.spent() <= plan.cost.per_partial * (1.0 + 1e-9));
        assert!(
            selector.spent() >= plan.cost.per_partial * 0.999,
            "the share is used"
        );
        // The release over the keys found costs the partials' share: the
        // levels and the release together cost the plan.
        let release = with_selected_keys(&plan, &selector.keys()).expect("release plan");
        assert!(release.public_groups());
        assert!(
            (release.cost.rho + selector.spent() - plan.cost.rho).abs() <= plan.cost.rho * 1e-9
        );
        assert!(
            with_selected_keys(&plan, &[3, 2]).is_err(),
            "keys ascending"
        );
    }

    #[test]
    fn a_level_never_exceeds_the_cap() {
        let parents: Vec<KeyPrefix> = (0..(LEVEL_CAP as u64 / 4 + 1))
            .map(|v| KeyPrefix {
                class: 40,
                depth: 20,
                value: v,
            })
            .collect();
        let step = SelectStep {
            level: 3,
            rho: 1.0,
            parents,
            width: 2,
        };
        assert!(Level::new(&step).is_err());
    }
}
