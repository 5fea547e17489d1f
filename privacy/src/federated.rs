//! Calibration of federated training's secure sums: the encodings a node
//! and the coordinator derive, each on its own, from a job's public
//! parameters, so that a node never takes its noise level from the
//! coordinator.
//!
//! Two kinds of vector are summed with secure aggregation:
//!
//! * **Model updates** ([`update_encoding`]): each node's whole update is
//!   clipped to L2 norm `bound`, so one person, who can move their node's
//!   update anywhere inside that ball, changes the sum by at most
//!   `2 × bound` (twice [`EncodingConfig::l2_sensitivity`] after rounding).
//!   The encoding is the distributed discrete Gaussian of KLS21
//!   ([`crate::secagg::encoding`]) with conditional rounding, without the
//!   randomised rotation (which would pad vectors to a power of two); the
//!   scale γ is chosen as large as the exact sampler allows, so rounding
//!   error stays far below the noise.
//! * **Sums of per-person vectors** ([`SumEncoding`]): each person adds a
//!   vector of L2 norm at most `person_l2`: the standardisation moments
//!   (features rescaled to `[-1, 1]` by their declared bounds, their squares,
//!   and 1: `person_l2 = sqrt(dims)`), or a clipped per-example gradient and
//!   a count. Each person's vector is rounded to whole granules of
//!   `g = person_l2 / 2^k` ([`SumEncoding::quantise`]) and the node sums
//!   integers, exactly: one person moves the sum by their rounded vector,
//!   `person_l2 / g + sqrt(dims) / 2` granules at most, whatever the other
//!   rows are (a float sum's rounding error would depend on them).
//!
//! Both are calibrated with [`sigma_for_rho`] for `t = min_survivors`: the
//! cost is the job's whatever the number of survivors (at least `t`).

use rand_core::CryptoRng;

use crate::secagg::encoding::{
    DiscreteGaussian, EncodingConfig, distributed_gaussian_rho, sigma_for_rho,
};
use crate::{PrivacyError, Result};

/// Per-node noise variance aimed for, in integer units: well inside the
/// exact sampler's range ([`crate::secagg::encoding::MAX_VARIANCE`] = 2^32).
const NODE_VARIANCE_LIMIT: f64 = (1u64 << 30) as f64;

/// Largest `clip × γ` used without noise: rounding error 2^-40 of the bound.
const PLAIN_SCALE: f64 = (1u64 << 40) as f64;

/// KLS21's conditional-rounding failure probability β = e^-1/2.
fn rounding_beta() -> f64 {
    (-0.5f64).exp()
}

fn invalid(message: String) -> PrivacyError {
    PrivacyError::InvalidParameter(message)
}

/// Element width of a secure sum: the fewest whole bytes whose signed range
/// holds `required` bits (at least 16).
fn whole_bytes(required: u32) -> u32 {
    (required.max(16).div_ceil(8) * 8).min(64)
}

/// The encoding of one round's model updates.
///
/// * `dim`: elements per update vector;
/// * `bound`: the L2 norm every node's vector is clipped to;
/// * `rho`: the zCDP budget of this one round (add/remove one person), or
///   `None` for secure aggregation without noise;
/// * `nodes`, `min_survivors`: the session's n and t.
///
/// Errors name the knob to turn when no encoding fits.
pub fn update_encoding(
    dim: usize,
    bound: f64,
    rho: Option<f64>,
    nodes: usize,
    min_survivors: usize,
) -> Result<EncodingConfig> {
    if !(bound > 0.0 && bound.is_finite()) {
        return Err(invalid(format!(
            "the clipping norm must be positive and finite, not {bound}"
        )));
    }
    if min_survivors == 0 || min_survivors > nodes {
        return Err(invalid(format!(
            "min_survivors must be 1 to the {nodes} nodes of the session, not {min_survivors}"
        )));
    }
    let config = |scale: f64, sigma: f64| EncodingConfig {
        dim,
        clip_l2: bound,
        scale,
        noise_sigma: sigma,
        nodes,
        min_survivors,
        bits: 64,
        // No rotation: the element width is chosen to hold the unrotated
        // sums, and rotating would pad the vector to a power of two (up to
        // twice the bytes on the wire).
        rotation_seed: None,
        rounding_beta: Some(rounding_beta()),
    };
    let Some(rho) = rho else {
        let mut c = config(PLAIN_SCALE / bound, 0.0);
        c.bits = whole_bytes(c.required_bits()?);
        c.validate()?;
        return Ok(c);
    };
    if !(rho > 0.0 && rho.is_finite()) {
        return Err(invalid(format!(
            "the per-round budget rho must be positive and finite, not {rho}"
        )));
    }
    let t = min_survivors as f64;
    // σ for a scale γ: one person moves one node's rounded vector by at
    // most twice its norm bound (KLS21's sensitivity).
    let sigma_at = |scale: f64| -> Result<f64> {
        let c = config(scale, 0.0);
        Ok(sigma_for_rho(
            rho,
            2.0 * c.l2_sensitivity(),
            c.encoded_len(),
            min_survivors,
            1,
        )?)
    };
    let fits = |sigma: f64| sigma * sigma / t <= NODE_VARIANCE_LIMIT;
    // The largest γ (a power of two times 1/bound) whose noise the exact
    // sampler takes: σ grows about linearly with γ.
    let mut scale = 1.0 / bound;
    if !fits(sigma_at(scale)?) {
        let c = config(scale, 0.0);
        return Err(invalid(format!(
            "a {}-element update at rho {rho:e} per round needs more noise than secure aggregation \
             can add ({} nodes at least): raise epsilon, lower the rounds, or train a smaller model",
            c.encoded_len(),
            min_survivors
        )));
    }
    while scale * bound < (1u64 << 40) as f64 && fits(sigma_at(scale * 2.0)?) {
        scale *= 2.0;
    }
    let sigma = sigma_at(scale)?;
    let mut c = config(scale, sigma);
    c.bits = whole_bytes(c.required_bits()?);
    c.validate()?;
    Ok(c)
}

/// zCDP cost of one round of [`update_encoding`] (add/remove one person).
pub fn update_rho(config: &EncodingConfig) -> Result<f64> {
    Ok(distributed_gaussian_rho(
        config.noise_sigma,
        2.0 * config.l2_sensitivity(),
        config.encoded_len(),
        config.min_survivors,
        1,
    )?)
}

/// Standard deviation, per element in real units, of the noise in a decoded
/// update sum of `survivors` nodes.
pub fn update_noise_stddev(config: &EncodingConfig, survivors: usize) -> f64 {
    (config.node_variance() * survivors as f64).sqrt() / config.scale
}

/// The encoding of sums of per-person vectors (standardisation moments,
/// clipped per-example gradients).
#[derive(Debug, Clone, PartialEq)]
pub struct SumEncoding {
    /// Elements of the vector.
    pub dims: usize,
    /// L2 norm bound of one person's vector, in real units.
    pub person_l2: f64,
    /// Granularity g: real value v is sent as round(v / g).
    pub granularity: f64,
    /// σ of the summed noise over `min_survivors` nodes, in granules.
    pub sigma: f64,
    /// t.
    pub min_survivors: usize,
}

/// Integer L2 sensitivity of a node's sum of rounded per-person vectors:
/// one person's vector in granules, rounded to nearest (at most half a
/// granule per element).
fn sum_sensitivity(person_l2: f64, granularity: f64, dims: usize) -> f64 {
    person_l2 / granularity + (dims as f64).sqrt() / 2.0
}

/// Largest magnitude of one node's element, so that sums of up to 2^10
/// nodes with noise cannot wrap around 2^64.
const MAX_ELEMENT: f64 = (1u64 << 52) as f64;

impl SumEncoding {
    /// Calibrates for vectors of `dims` elements to which each person adds
    /// at most 1 in absolute value per element (L2 `sqrt(dims)`), at zCDP
    /// `rho`, with `t` survivors at least.
    pub fn new(dims: usize, rho: f64, min_survivors: usize) -> Result<Self> {
        SumEncoding::with_person_l2(dims, (dims as f64).sqrt(), rho, min_survivors)
    }

    /// Calibrates for vectors of `dims` elements to which each person adds
    /// a vector of L2 norm at most `person_l2`, at zCDP `rho`, with `t`
    /// survivors at least.
    pub fn with_person_l2(
        dims: usize,
        person_l2: f64,
        rho: f64,
        min_survivors: usize,
    ) -> Result<Self> {
        if dims == 0 || min_survivors == 0 {
            return Err(invalid(format!(
                "a secure sum needs at least one element and one survivor, not {dims} and {min_survivors}"
            )));
        }
        if !(person_l2 > 0.0 && person_l2.is_finite()) {
            return Err(invalid(format!(
                "one person's contribution must have a positive, finite bound, not {person_l2}"
            )));
        }
        if !(rho > 0.0 && rho.is_finite()) {
            return Err(invalid(format!(
                "the budget rho of a secure sum must be positive and finite, not {rho}"
            )));
        }
        let t = min_survivors as f64;
        // The finest granularity (person_l2 / 2^k, k <= 24) whose noise the
        // sampler takes.
        for k in (-8..=24).rev() {
            let granularity = person_l2 / 2f64.powi(k);
            let sensitivity = sum_sensitivity(person_l2, granularity, dims);
            let sigma = sigma_for_rho(rho, sensitivity, dims, min_survivors, 1)?;
            if sigma * sigma / t <= NODE_VARIANCE_LIMIT {
                return Ok(SumEncoding {
                    dims,
                    person_l2,
                    granularity,
                    sigma,
                    min_survivors,
                });
            }
        }
        Err(invalid(format!(
            "no granularity gives noise the sampler can draw for {dims} elements at rho {rho:e}: \
             raise epsilon (or its share), or lower the rounds"
        )))
    }

    /// The zCDP cost of one release.
    pub fn rho(&self) -> Result<f64> {
        Ok(distributed_gaussian_rho(
            self.sigma,
            sum_sensitivity(self.person_l2, self.granularity, self.dims),
            self.dims,
            self.min_survivors,
            1,
        )?)
    }

    /// One person's vector in whole granules (rounded to nearest). Values
    /// beyond the person's bound are the caller's bug; non-finite values
    /// count as 0.
    pub fn quantise(&self, person: &[f64]) -> Vec<i64> {
        person
            .iter()
            .map(|&v| {
                let q = (v / self.granularity).round();
                if q.is_finite() { q as i64 } else { 0 }
            })
            .collect()
    }

    /// Adds a person's quantised vector to a node's running sum.
    pub fn accumulate(&self, sum: &mut [i64], person: &[f64]) -> Result<()> {
        if sum.len() != self.dims || person.len() != self.dims {
            return Err(invalid(format!(
                "vectors of {} and {} elements for an encoding of {}",
                sum.len(),
                person.len(),
                self.dims
            )));
        }
        for (s, q) in sum.iter_mut().zip(self.quantise(person)) {
            *s = s
                .checked_add(q)
                .ok_or_else(|| invalid("a node's sum overflows 64 bits".into()))?;
        }
        Ok(())
    }

    /// A node's input: its integer sum (of [`SumEncoding::quantise`]d
    /// person vectors) plus its noise share, as two's-complement elements
    /// mod 2^64.
    pub fn encode<R: CryptoRng + ?Sized>(&self, sums: &[i64], rng: &mut R) -> Result<Vec<u64>> {
        if sums.len() != self.dims {
            return Err(invalid(format!(
                "the sums have {} elements, the encoding {}",
                sums.len(),
                self.dims
            )));
        }
        let noise =
            DiscreteGaussian::with_variance(self.sigma * self.sigma / self.min_survivors as f64)?;
        sums.iter()
            .map(|&s| {
                if s.unsigned_abs() > MAX_ELEMENT as u64 {
                    return Err(invalid(
                        "a node's sum is too large for a 64-bit secure sum".into(),
                    ));
                }
                Ok(s.wrapping_add(noise.sample(rng)) as u64)
            })
            .collect()
    }

    /// The decoded sum, in real units.
    pub fn decode(&self, sum: &[u64]) -> Vec<f64> {
        sum.iter()
            .map(|&v| v as i64 as f64 * self.granularity)
            .collect()
    }

    /// Standard deviation of the decoded noise with `survivors` nodes.
    pub fn noise_stddev(&self, survivors: usize) -> f64 {
        self.sigma * self.granularity * (survivors as f64 / self.min_survivors as f64).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secagg::encoding::Encoder;
    use chacha20::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn update_encodings_spend_at_most_their_budget_and_fit_the_sampler() {
        for (dim, rho) in [(14, 1e-3), (1_000, 0.05), (100_000, 0.5)] {
            let c = update_encoding(dim, 1.0, Some(rho), 4, 3).expect("encoding");
            let spent = update_rho(&c).expect("rho");
            assert!(spent <= rho * (1.0 + 1e-9), "{spent} > {rho}");
            assert!(spent >= rho * 0.9, "{spent} wastes most of {rho}");
            assert!(c.node_variance() <= NODE_VARIANCE_LIMIT);
            c.validate().expect("no overflow");
            assert_eq!(c.bits % 8, 0);
        }
    }

    #[test]
    fn update_encodings_without_noise_are_exact_to_rounding() {
        let c = update_encoding(5, 2.0, None, 3, 2).expect("encoding");
        assert_eq!(c.noise_sigma, 0.0);
        let encoder = Encoder::new(c.clone()).expect("encoder");
        let mut rng = ChaCha20Rng::from_seed([3; 32]);
        let x = [0.5, -0.25, 1.0, 0.0, -1.0];
        let mask = if c.bits == 64 {
            u64::MAX
        } else {
            (1u64 << c.bits) - 1
        };
        let mut sum = vec![0u64; c.encoded_len()];
        for _ in 0..3 {
            let e = encoder.encode(&x, &mut rng).expect("encode");
            for (s, v) in sum.iter_mut().zip(e.values) {
                *s = s.wrapping_add(v) & mask;
            }
        }
        let decoded = encoder.decode(&sum).expect("decode");
        for (d, v) in decoded.iter().zip(x) {
            assert!((d - 3.0 * v).abs() < 1e-9, "{d} vs {}", 3.0 * v);
        }
    }

    #[test]
    fn impossible_budgets_name_the_knob() {
        let err = update_encoding(1 << 24, 1.0, Some(1e-9), 4, 3)
            .expect_err("too little budget")
            .to_string();
        assert!(err.contains("raise epsilon"), "{err}");
    }

    #[test]
    fn moments_round_trip_and_spend_their_budget() {
        let m = SumEncoding::new(27, 0.002, 3).expect("moments");
        assert!(m.rho().expect("rho") <= 0.002 * (1.0 + 1e-9));
        let mut rng = ChaCha20Rng::from_seed([7; 32]);
        // Each node: 25 persons adding 0.5 per element, summed in granules.
        let mut sums = vec![0i64; 27];
        for _ in 0..25 {
            m.accumulate(&mut sums, &[0.5; 27]).expect("accumulate");
        }
        let mut total = vec![0u64; 27];
        for _ in 0..3 {
            for (t, v) in total
                .iter_mut()
                .zip(m.encode(&sums, &mut rng).expect("encode"))
            {
                *t = t.wrapping_add(v);
            }
        }
        let decoded = m.decode(&total);
        let sd = m.noise_stddev(3);
        for d in decoded {
            assert!((d - 37.5).abs() < 8.0 * sd + m.granularity * 75.0, "{d}");
        }
    }

    #[test]
    fn moment_noise_has_the_declared_spread() {
        let m = SumEncoding::new(1, 0.5, 2).expect("moments");
        let mut rng = ChaCha20Rng::from_seed([11; 32]);
        let draws = 20_000;
        let mut sq = 0.0;
        for _ in 0..draws {
            let a = m.encode(&[0], &mut rng).expect("a")[0];
            let b = m.encode(&[0], &mut rng).expect("b")[0];
            let v = m.decode(&[a.wrapping_add(b)])[0];
            sq += v * v;
        }
        let sd = (sq / draws as f64).sqrt();
        let want = m.noise_stddev(2);
        // 20,000 draws: the sample sd is within 5% except with probability < 1e-12.
        assert!((sd / want - 1.0).abs() < 0.05, "{sd} vs {want}");
    }
}
