//! From the nodes' noisy per-unit releases to a consistent tree, and from
//! numerators and denominators to indicator values with intervals. Pure
//! post-processing of released values: nothing here reads a record or
//! draws randomness.
//!
//! For each measure (and disaggregation category):
//!
//! 1. **Bottom up.** A unit's raw total is its own noisy release (the sum
//!    over its care sites, from the one node that holds it) plus its
//!    children's raw totals; its noise variance is the sum of theirs. Raw
//!    totals are unbiased and already add up, but may be negative.
//! 2. **Top down** (the TopDown idea, with weighted least squares): the
//!    root's value is its raw total, rounded to the measure's grain (1 for
//!    counts, 0.01 for sums) and clamped at 0. For each unit, its value is
//!    split over its parts (its own records and each child's subtree) by
//!    the non-negative least-squares projection of their raw totals onto
//!    {x ≥ 0, Σx = the unit's value}, weighted by their noise variances
//!    (`x_i = max(0, r_i + λ·var_i)`, λ found by bisection), then rounded
//!    to the grain by largest remainders. Children therefore add up to
//!    their parent exactly, in integers of the grain, and nothing is
//!    negative. A part with no noise (a unit no node holds) stays 0.
//! 3. **Ratios.** factor × N / D at each unit, with the delta-method
//!    standard error from the raw variances of N and D (the projection is
//!    treated as not changing them), and z × SE either side; proportions
//!    are kept within [0, factor]. A value whose denominator is not
//!    clearly positive (D − z·sd(D) ≤ 0) or whose interval is wider than
//!    the indicator's `max_half_width` (default: half the value; 10 points
//!    for a percentage) is marked "insufficient data" and carries no
//!    value.

use super::region::Region;

/// One unit's own release of one measure: the noisy value (summed over its
/// care sites) and its noise variance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Own {
    /// Noisy value.
    pub value: f64,
    /// Noise variance.
    pub variance: f64,
}

/// A measure made consistent over the tree.
#[derive(Debug, Clone, PartialEq)]
pub struct Consistent {
    /// Each unit's own part, in grains.
    pub own: Vec<i64>,
    /// Each unit's subtree total, in grains (own + children's totals).
    pub total: Vec<i64>,
    /// Noise variance of each unit's own release (value units²).
    pub own_variance: Vec<f64>,
    /// Noise variance of each unit's raw subtree total.
    pub variance: Vec<f64>,
    /// The grain: the value of one unit of `own` and `total`.
    pub grain: f64,
}

impl Consistent {
    /// The subtree total of unit `i`, in value units.
    pub fn value(&self, i: usize) -> f64 {
        self.total[i] as f64 * self.grain
    }

    /// The total over the units of `i`'s subtree for which `keep` holds (of
    /// their own parts), with its variance.
    pub fn filtered(&self, region: &Region, i: usize, keep: &dyn Fn(usize) -> bool) -> (f64, f64) {
        let mut sum = 0i64;
        let mut var = 0.0;
        let mut stack = vec![i];
        while let Some(u) = stack.pop() {
            if keep(u) {
                sum += self.own[u];
                var += self.own_variance[u];
            }
            stack.extend(region.children(u));
        }
        (sum as f64 * self.grain, var)
    }
}

/// Steps 1 and 2 for one measure: `own[i]` is unit `i`'s own release (none
/// when no node holds the unit, or its node did not answer: then 0 with no
/// noise).
pub fn consistent(region: &Region, own: &[Option<Own>], grain: f64) -> Consistent {
    let n = region.units.len();
    let own_raw: Vec<f64> = own
        .iter()
        .map(|o| o.map_or(0.0, |o| o.value / grain))
        .collect();
    let own_var: Vec<f64> = own
        .iter()
        .map(|o| o.map_or(0.0, |o| o.variance / (grain * grain)))
        .collect();
    let mut raw = own_raw.clone();
    let mut var = own_var.clone();
    // Parents come before children: sum in reverse.
    for i in (0..n).rev() {
        for &c in region.children(i) {
            raw[i] += raw[c];
            var[i] += var[c];
        }
    }
    let mut total = vec![0i64; n];
    let mut own_final = vec![0i64; n];
    if n > 0 {
        total[0] = raw[0].round().max(0.0) as i64;
    }
    for i in 0..n {
        let kids = region.children(i);
        // Part 0: the unit's own records; then each child's subtree.
        let mut r = Vec::with_capacity(kids.len() + 1);
        let mut w = Vec::with_capacity(kids.len() + 1);
        r.push(own_raw[i]);
        w.push(own_var[i]);
        for &c in kids {
            r.push(raw[c]);
            w.push(var[c]);
        }
        let parts = split(total[i], &r, &w);
        own_final[i] = parts[0];
        for (k, &c) in kids.iter().enumerate() {
            total[c] = parts[k + 1];
        }
    }
    Consistent {
        own: own_final,
        total,
        own_variance: own_var.iter().map(|v| v * grain * grain).collect(),
        variance: var.iter().map(|v| v * grain * grain).collect(),
        grain,
    }
}

/// Splits the integer `total` (≥ 0) into non-negative integers near `r`
/// (weighted least squares with weights `w`, then largest remainders),
/// summing exactly to `total`.
pub fn split(total: i64, r: &[f64], w: &[f64]) -> Vec<i64> {
    // Parts without noise keep their value; the noisy ones absorb the rest.
    let mut x: Vec<f64> = (0..r.len())
        .map(|i| if w[i] > 0.0 { 0.0 } else { r[i].max(0.0) })
        .collect();
    let noisy: Vec<usize> = (0..r.len()).filter(|&i| w[i] > 0.0).collect();
    let target = total as f64 - x.iter().sum::<f64>();
    if noisy.is_empty() || target <= 0.0 {
        return round_to_total(&x, total);
    }
    let g = |lambda: f64| -> f64 {
        noisy
            .iter()
            .map(|&i| (r[i] + lambda * w[i]).max(0.0))
            .sum::<f64>()
    };
    let mut lo = noisy
        .iter()
        .map(|&i| -r[i] / w[i])
        .fold(f64::INFINITY, f64::min)
        - 1.0;
    let mut hi = noisy
        .iter()
        .map(|&i| (target - r[i]) / w[i])
        .fold(f64::NEG_INFINITY, f64::max)
        + 1.0;
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if g(mid) < target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    for &i in &noisy {
        x[i] = (r[i] + hi * w[i]).max(0.0);
    }
    round_to_total(&x, total)
}

/// Non-negative reals → non-negative integers summing to `total`, each the
/// floor or the ceiling of its real after scaling to the total (largest
/// remainders).
fn round_to_total(x: &[f64], total: i64) -> Vec<i64> {
    let sum: f64 = x.iter().sum();
    let scaled: Vec<f64> = if sum > 0.0 {
        x.iter().map(|v| v * total as f64 / sum).collect()
    } else {
        let mut v = vec![0.0; x.len()];
        if let Some(first) = v.first_mut() {
            *first = total as f64;
        }
        v
    };
    let mut out: Vec<i64> = scaled.iter().map(|v| v.floor() as i64).collect();
    let mut left = total - out.iter().sum::<i64>();
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| {
        let fa = scaled[a] - scaled[a].floor();
        let fb = scaled[b] - scaled[b].floor();
        fb.partial_cmp(&fa)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    let mut k = 0;
    while left > 0 && !order.is_empty() {
        out[order[k % order.len()]] += 1;
        left -= 1;
        k += 1;
    }
    out
}

/// An indicator value at one unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    /// The value, or none (insufficient data).
    pub value: Option<f64>,
    /// Interval, when there is a value with noise.
    pub ci: Option<(f64, f64)>,
    /// The interval was too wide, or the denominator not clearly positive.
    pub insufficient: bool,
}

/// A count (or sum): `factor × n` with its interval.
pub fn count(n: f64, var: f64, factor: f64, z: f64, max_half_width: Option<f64>) -> Estimate {
    let value = factor * n;
    if var <= 0.0 {
        return Estimate {
            value: Some(value),
            ci: None,
            insufficient: false,
        };
    }
    let half = factor * z * var.sqrt();
    let limit = max_half_width.unwrap_or(0.5 * value.abs());
    Estimate::judged(value, ((value - half).max(0.0), value + half), half > limit)
}

impl Estimate {
    /// A value with its interval, or, when the interval is too wide,
    /// only the interval and the "insufficient data" mark.
    fn judged(value: f64, ci: (f64, f64), too_wide: bool) -> Self {
        Estimate {
            value: (!too_wide).then_some(value),
            ci: Some(ci),
            insufficient: too_wide,
        }
    }
}

/// A ratio `factor × n / d` by the delta method; `proportion` keeps it
/// (and its interval) within [0, factor].
#[allow(clippy::too_many_arguments)]
pub fn ratio(
    n: f64,
    var_n: f64,
    d: f64,
    var_d: f64,
    factor: f64,
    proportion: bool,
    z: f64,
    max_half_width: Option<f64>,
) -> Estimate {
    if d <= 0.0 || d - z * var_d.sqrt() <= 0.0 {
        return Estimate {
            value: None,
            ci: None,
            insufficient: true,
        };
    }
    let mut value = factor * n / d;
    let se = factor * (var_n / (d * d) + n * n * var_d / (d * d * d * d)).sqrt();
    let half = z * se;
    let mut ci = (value - half, value + half);
    if proportion {
        value = value.clamp(0.0, factor);
        ci = (ci.0.clamp(0.0, factor), ci.1.clamp(0.0, factor));
    } else if n >= 0.0 {
        ci.0 = ci.0.max(0.0);
    }
    let limit = max_half_width.unwrap_or(if proportion && factor == 100.0 {
        10.0
    } else {
        0.5 * value.abs()
    });
    Estimate::judged(value, ci, half > limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TREE: &str = r#"
[[level]]
id = "a"
name_zh = "a"
name_en = "a"
[[level]]
id = "b"
name_zh = "b"
name_en = "b"
[[level]]
id = "c"
name_zh = "c"
name_en = "c"
[[unit]]
code = "r"
name_zh = "r"
name_en = "r"
level = "a"
[[unit]]
code = "x"
name_zh = "x"
name_en = "x"
level = "b"
parent = "r"
[[unit]]
code = "y"
name_zh = "y"
name_en = "y"
level = "b"
parent = "r"
[[unit]]
code = "x1"
name_zh = "x1"
name_en = "x1"
level = "c"
parent = "x"
[[unit]]
code = "x2"
name_zh = "x2"
name_en = "x2"
level = "c"
parent = "x"
"#;

    fn own(v: f64, var: f64) -> Option<Own> {
        Some(Own {
            value: v,
            variance: var,
        })
    }

    #[test]
    fn the_tree_adds_up_exactly_and_stays_non_negative() {
        let region = Region::parse(TREE).expect("tree");
        let order: Vec<&str> = region.units.iter().map(|u| u.code.as_str()).collect();
        let mut releases = vec![None; 5];
        let at = |c: &str| order.iter().position(|o| *o == c).expect("unit");
        releases[at("r")] = own(100.4, 4.0);
        releases[at("x1")] = own(-3.2, 4.0);
        releases[at("x2")] = own(12.6, 4.0);
        releases[at("y")] = own(40.1, 4.0);
        let c = consistent(&region, &releases, 1.0);
        for (i, code) in order.iter().enumerate() {
            let kids: i64 = region.children(i).iter().map(|&k| c.total[k]).sum();
            assert_eq!(c.total[i], c.own[i] + kids, "unit {code}");
            assert!(c.total[i] >= 0 && c.own[i] >= 0);
        }
        // Raw root 149.9 → 150.
        assert_eq!(c.total[0], 150);
        assert_eq!(c.total[at("x1")], 0);
        assert!((c.variance[0] - 16.0).abs() < 1e-9);
        // Without noise problems the projection keeps the raw values.
        let mut exact = vec![None; 5];
        exact[at("r")] = own(10.0, 1e-9);
        exact[at("x1")] = own(3.0, 1e-9);
        exact[at("x2")] = own(4.0, 1e-9);
        exact[at("y")] = own(5.0, 1e-9);
        let c = consistent(&region, &exact, 1.0);
        assert_eq!(c.total[at("x1")], 3);
        assert_eq!(c.total[at("x2")], 4);
        assert_eq!(c.total[at("y")], 5);
        assert_eq!(c.total[at("x")], 7);
        assert_eq!(c.total[0], 22);
        assert_eq!(c.own[0], 10);
        // Sums keep cents.
        let mut sums = vec![None; 5];
        sums[at("x1")] = own(10.255, 1e-9);
        let c = consistent(&region, &sums, 0.01);
        assert!(
            (c.value(at("x1")) - 10.26).abs() < 1e-9 || (c.value(at("x1")) - 10.25).abs() < 1e-9
        );
    }

    #[test]
    fn splits_are_exact_and_weighted() {
        let parts = split(10, &[8.0, 8.0], &[1.0, 3.0]);
        assert_eq!(parts.iter().sum::<i64>(), 10);
        assert!(
            parts[0] > parts[1],
            "the noisier part gives more: {parts:?}"
        );
        assert_eq!(split(0, &[-4.0, 2.0], &[1.0, 1.0]), vec![0, 0]);
        assert_eq!(split(5, &[0.0, 5.0], &[0.0, 1.0]), vec![0, 5]);
        // Without noise (an epsilon so large its variance is 0) the parts
        // are kept as they are.
        assert_eq!(split(10, &[3.0, 7.0], &[0.0, 0.0]), vec![3, 7]);
        assert_eq!(split(10, &[3.0, 6.6], &[0.0, 1.0]), vec![3, 7]);
    }

    #[test]
    fn ratios_say_when_data_is_insufficient() {
        let e = ratio(30.0, 1.0, 100.0, 1.0, 100.0, true, 1.96, None);
        assert!((e.value.expect("value") - 30.0).abs() < 1e-9);
        let (lo, hi) = e.ci.expect("ci");
        assert!(lo < 30.0 && hi > 30.0);
        assert!(ratio(3.0, 4.0, 5.0, 4.0, 100.0, true, 1.96, None).insufficient);
        assert!(
            ratio(3.0, 4.0, -1.0, 4.0, 100.0, true, 1.96, None)
                .value
                .is_none()
        );
        assert!(count(4.0, 9.0, 1.0, 1.96, None).insufficient);
        assert!(!count(400.0, 9.0, 1.0, 1.96, None).insufficient);
    }
}
