//! Encoding real vectors for secure aggregation with distributed
//! differential privacy: the distributed discrete Gaussian of Kairouz, Liu
//! and Steinke, "The Distributed Discrete Gaussian Mechanism for Federated
//! Learning with Secure Aggregation" (ICML 2021, "KLS21").
//!
//! Each node, with the same public [`EncodingConfig`]:
//!
//! 1. clips its vector to L2 norm `clip_l2` (C), and reports it
//!    ([`EncodeReport::clipped_vectors`]; never silent);
//! 2. optionally rotates it, `x -> H D x / sqrt(d)`, with D random signs
//!    from a public seed shared by all nodes and H the Walsh-Hadamard
//!    matrix (the vector is zero-padded to a power of two), which spreads
//!    large coordinates so that fewer bits are needed;
//! 3. scales by γ (`scale`) and rounds each coordinate stochastically to an
//!    integer (unbiased); with conditional rounding (KLS21, `rounding_beta`)
//!    it re-rounds until the rounded norm is within the sensitivity bound;
//! 4. adds its share of discrete Gaussian noise, σ²/t per coordinate with t
//!    = `min_survivors`, from the exact sampler [`DiscreteGaussian`], so that
//!    any t survivors together carry variance σ²;
//! 5. reduces mod 2^bits for [`Client::masked_input`](super::Client::masked_input).
//!
//! [`Encoder::decode`] takes the secure sum, centres it into the signed
//! range, unscales and un-rotates it. [`EncodingConfig::validate`] refuses a
//! configuration whose sums could wrap around 2^bits, naming the knob to
//! turn. [`distributed_gaussian_rho`] is the zCDP cost, assuming only the
//! t-survivor noise.
//!
//! ```
//! use confer_privacy::secagg::encoding::{Encoder, EncodingConfig};
//! use confer_privacy::secagg::{ChaCha20Rng, SeedableRng};
//!
//! let config = EncodingConfig::new(3, 1.0, 1000.0, 0.0, 4, 3, 24)
//!     .unwrap()
//!     .with_rotation([5; 32]);
//! let encoder = Encoder::new(config).unwrap();
//! let mut rng = ChaCha20Rng::from_seed([1; 32]);
//! let a = encoder.encode(&[0.5, -0.25, 0.0], &mut rng).unwrap();
//! let b = encoder.encode(&[3.0, 4.0, 0.0], &mut rng).unwrap(); // norm 5: clipped to 1
//! assert_eq!(b.report.clipped_vectors, 1);
//! let mask = (1u64 << 24) - 1;
//! let sum: Vec<u64> = a.values.iter().zip(&b.values).map(|(x, y)| (x + y) & mask).collect();
//! let decoded = encoder.decode(&sum).unwrap();
//! assert!((decoded[0] - 1.1).abs() < 0.01 && (decoded[1] - 0.55).abs() < 0.01);
//! ```

mod hadamard;
mod sampler;

use rand_core::CryptoRng;
use serde::{Deserialize, Serialize};

use super::crypto::{hkdf32, keystream};
use super::{Config, Result, SecAggError};

pub use sampler::{DiscreteGaussian, MAX_VARIANCE, VARIANCE_DENOMINATOR};

/// Probability, per sum, that the overflow bound of
/// [`EncodingConfig::sum_bound`] is exceeded (each of its probabilistic
/// terms fails with at most this probability).
pub const OVERFLOW_FAILURE: f64 = 1e-9;

const ROTATION_LABEL: &[u8] = b"confer-secagg/v1/rotation";

/// Public parameters of the encoding, identical at every node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncodingConfig {
    /// Length of the real input vectors.
    pub dim: usize,
    /// L2 clipping norm C.
    pub clip_l2: f64,
    /// Scale γ: a real value v becomes about γ v before rounding, so the
    /// rounding error in the decoded sum is about sqrt(n d) / (2γ).
    pub scale: f64,
    /// σ, in integer (scaled) units: the standard deviation that
    /// `min_survivors` nodes together add to each coordinate (the decoded
    /// noise is σ/γ). Zero for no noise.
    pub noise_sigma: f64,
    /// The most nodes whose vectors enter one sum (n).
    pub nodes: usize,
    /// t: the fewest survivors the coordinator may sum; each node adds
    /// variance σ²/t. Use the session's [`Config::min_survivors`].
    pub min_survivors: usize,
    /// Sums are mod 2^bits; must equal the session's [`Config::bits`].
    pub bits: u32,
    /// Public seed of the random signs D; `None` for no rotation.
    pub rotation_seed: Option<[u8; 32]>,
    /// KLS21 conditional rounding: re-round until the norm is within the
    /// bound that holds with probability 1 - β (e.g. `exp(-0.5)`). `None`:
    /// plain stochastic rounding and the deterministic bound C γ + sqrt(d).
    pub rounding_beta: Option<f64>,
}

impl EncodingConfig {
    /// No rotation and plain stochastic rounding; checked with
    /// [`EncodingConfig::validate`].
    pub fn new(
        dim: usize,
        clip_l2: f64,
        scale: f64,
        noise_sigma: f64,
        nodes: usize,
        min_survivors: usize,
        bits: u32,
    ) -> Result<EncodingConfig> {
        let config = EncodingConfig {
            dim,
            clip_l2,
            scale,
            noise_sigma,
            nodes,
            min_survivors,
            bits,
            rotation_seed: None,
            rounding_beta: None,
        };
        config.validate()?;
        Ok(config)
    }

    /// Turns on the randomised Hadamard rotation with this public seed.
    pub fn with_rotation(mut self, seed: [u8; 32]) -> EncodingConfig {
        self.rotation_seed = Some(seed);
        self
    }

    /// Turns on KLS21 conditional rounding with failure probability β.
    pub fn with_conditional_rounding(mut self, beta: f64) -> EncodingConfig {
        self.rounding_beta = Some(beta);
        self
    }

    /// Length of encoded vectors (the session's `vector_len`): `dim`, padded
    /// to a power of two when rotating.
    pub fn encoded_len(&self) -> usize {
        if self.rotation_seed.is_some() {
            self.dim.next_power_of_two()
        } else {
            self.dim
        }
    }

    /// Each node's noise variance parameter, σ²/t.
    pub fn node_variance(&self) -> f64 {
        self.noise_sigma * self.noise_sigma / self.min_survivors as f64
    }

    /// The L2 sensitivity of one node's rounded vector, in integer units
    /// (neighbouring datasets add or remove one node's vector; double it
    /// for replacement). KLS21 Theorem 1: with conditional rounding,
    /// `Δ² = min((Cγ + √d)², C²γ² + d/4 + sqrt(2 ln(1/β)) (Cγ + √d/2))`;
    /// otherwise `Δ = Cγ + √d`, since rounding moves each of the d
    /// coordinates by less than 1.
    pub fn l2_sensitivity(&self) -> f64 {
        let cg = self.clip_l2 * self.scale;
        let d = self.encoded_len() as f64;
        let plain = (cg + d.sqrt()).powi(2);
        match self.rounding_beta {
            Some(beta) => {
                let conditional =
                    cg * cg + d / 4.0 + (2.0 * (1.0 / beta).ln()).sqrt() * (cg + d.sqrt() / 2.0);
                plain.min(conditional).sqrt()
            }
            None => plain.sqrt(),
        }
    }

    /// The sampler each node uses (σ²/t, rounded up to a multiple of 2^-20).
    pub fn node_noise(&self) -> Result<DiscreteGaussian> {
        DiscreteGaussian::with_variance(self.node_variance())
    }

    /// A bound on |coordinate| of the sum of `nodes` encoded vectors that
    /// holds except with probability [`OVERFLOW_FAILURE`] per term:
    /// clipped data (n C γ, or with rotation the sub-Gaussian bound
    /// n C γ sqrt(2 ln(2d/δ) / d), which assumes inputs chosen independently
    /// of the public rotation seed), rounding (n), and the noise tail
    /// sqrt(n σ²/t) sqrt(2 ln(2d/δ)) (the discrete Gaussian is
    /// sub-Gaussian; CKS20). Returns (total, data, rounding, noise).
    pub fn sum_bound(&self) -> Result<(f64, f64, f64, f64)> {
        let n = self.nodes as f64;
        let d = self.encoded_len() as f64;
        let tail = (2.0 * (2.0 * d / OVERFLOW_FAILURE).ln()).sqrt();
        let deterministic = n * self.clip_l2 * self.scale;
        let data = if self.rotation_seed.is_some() {
            deterministic.min(deterministic * tail / d.sqrt())
        } else {
            deterministic
        };
        let noise = (n * self.node_noise()?.sigma_squared()).sqrt() * tail;
        Ok((data + n + noise, data, n, noise))
    }

    /// The fewest bits whose signed range holds [`EncodingConfig::sum_bound`].
    pub fn required_bits(&self) -> Result<u32> {
        let (total, ..) = self.sum_bound()?;
        // Need total < 2^(bits-1).
        Ok((total.log2().floor() as u32 + 2).max(2))
    }

    /// Checks every parameter, and that sums cannot wrap around 2^bits
    /// (except with probability [`OVERFLOW_FAILURE`]).
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(SecAggError::InvalidParameter(msg));
        if self.dim == 0 || self.dim > 1 << 34 {
            return bad(format!("dim must be 1 to 2^34, not {}", self.dim));
        }
        if !(self.clip_l2 > 0.0 && self.clip_l2.is_finite()) {
            return bad(format!(
                "clip_l2 must be positive and finite, not {}",
                self.clip_l2
            ));
        }
        if !(self.scale > 0.0 && self.scale.is_finite()) {
            return bad(format!(
                "scale γ must be positive and finite, not {}",
                self.scale
            ));
        }
        if self.clip_l2 * self.scale > (1u64 << 52) as f64 {
            return bad(format!(
                "clip_l2 * scale = {} exceeds 2^52, where rounding stops being exact: lower scale γ",
                self.clip_l2 * self.scale
            ));
        }
        if !(self.noise_sigma >= 0.0 && self.noise_sigma.is_finite()) {
            return bad(format!(
                "noise_sigma must be non-negative and finite, not {}",
                self.noise_sigma
            ));
        }
        if self.min_survivors == 0 || self.min_survivors > self.nodes {
            return bad(format!(
                "min_survivors must be 1 to nodes = {}, not {}",
                self.nodes, self.min_survivors
            ));
        }
        if !(2..=64).contains(&self.bits) {
            return bad(format!("bits must be 2 to 64, not {}", self.bits));
        }
        if let Some(beta) = self.rounding_beta
            && !(beta > 0.0 && beta < 1.0)
        {
            return bad(format!("rounding_beta must be in (0, 1), not {beta}"));
        }
        let (total, data, rounding, noise) = self.sum_bound()?;
        let capacity = 2f64.powi(self.bits as i32 - 1);
        if total >= capacity {
            let need = self.required_bits()?;
            let knob = if noise > data {
                format!(
                    "lower the noise σ (now {}) or scale γ (now {})",
                    self.noise_sigma, self.scale
                )
            } else {
                format!("lower scale γ (now {})", self.scale)
            };
            return bad(format!(
                "sums of {} encoded vectors can reach ±{total:.0} (clipped data {data:.0}, rounding {rounding:.0}, \
                 noise tail {noise:.0}) but {} bits hold only ±2^{}: increase bits to ≥ {need} or {knob}",
                self.nodes,
                self.bits,
                self.bits - 1
            ));
        }
        Ok(())
    }

    /// Checks that a session carries these encodings: same bits, and
    /// `vector_len` equal to [`EncodingConfig::encoded_len`].
    pub fn check_session(&self, session: &Config) -> Result<()> {
        if session.bits != self.bits || session.vector_len != self.encoded_len() {
            return Err(SecAggError::InvalidParameter(format!(
                "the session sums {} elements mod 2^{} but encodings are {} elements mod 2^{}: \
                 set the session's vector_len and bits to match",
                session.vector_len,
                session.bits,
                self.encoded_len(),
                self.bits
            )));
        }
        if session.n > self.nodes || session.min_survivors < self.min_survivors {
            return Err(SecAggError::InvalidParameter(format!(
                "the session has n = {} and min_survivors = {}, but the encoding assumes at most {} nodes \
                 and at least {} survivors",
                session.n, session.min_survivors, self.nodes, self.min_survivors
            )));
        }
        Ok(())
    }

    /// zCDP rho of `rounds` releases (see [`distributed_gaussian_rho`]).
    pub fn rho(&self, rounds: usize) -> Result<f64> {
        distributed_gaussian_rho(
            self.noise_sigma,
            self.l2_sensitivity(),
            self.encoded_len(),
            self.min_survivors,
            rounds,
        )
    }
}

/// What encoding did to the data. Kept by the node: whether its own vector
/// was clipped depends on its data, so do not send it in the clear (to
/// count clipping across nodes, append a 0/1 coordinate to the vector and
/// let secure aggregation sum it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EncodeReport {
    /// Vectors encoded.
    pub vectors: usize,
    /// Vectors whose norm exceeded `clip_l2` and were scaled down to it.
    pub clipped_vectors: usize,
    /// Largest L2 norm seen before clipping.
    pub max_norm: f64,
    /// Rounding attempts in all (above `vectors` only with conditional rounding).
    pub rounding_attempts: usize,
}

impl std::ops::AddAssign for EncodeReport {
    fn add_assign(&mut self, other: EncodeReport) {
        self.vectors += other.vectors;
        self.clipped_vectors += other.clipped_vectors;
        self.max_norm = self.max_norm.max(other.max_norm);
        self.rounding_attempts += other.rounding_attempts;
    }
}

/// An encoded vector, ready for [`Client::masked_input`](super::Client::masked_input).
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// Elements mod 2^bits.
    pub values: Vec<u64>,
    /// What encoding did.
    pub report: EncodeReport,
}

/// Encodes and decodes under one [`EncodingConfig`].
#[derive(Debug, Clone)]
pub struct Encoder {
    config: EncodingConfig,
    /// Rotation signs D (true = -1), if rotating.
    signs: Option<Vec<bool>>,
    noise: DiscreteGaussian,
    /// Square of the conditional-rounding bound, if any.
    norm_bound_sq: Option<f64>,
}

/// Conditional rounding gives up after this many attempts; each attempt
/// passes with probability at least 1 - β.
const MAX_ROUNDING_ATTEMPTS: usize = 10_000;

impl Encoder {
    /// Checks `config` and prepares the rotation signs and noise sampler.
    pub fn new(config: EncodingConfig) -> Result<Encoder> {
        config.validate()?;
        let signs = config.rotation_seed.map(|seed| {
            let d = config.encoded_len();
            let mut bytes = vec![0u8; d.div_ceil(8)];
            keystream(&hkdf32(&seed, &[], &[ROTATION_LABEL]), &mut bytes);
            (0..d).map(|i| bytes[i / 8] >> (i % 8) & 1 == 1).collect()
        });
        let noise = config.node_noise()?;
        let norm_bound_sq = config
            .rounding_beta
            .map(|_| config.l2_sensitivity().powi(2));
        Ok(Encoder {
            config,
            signs,
            noise,
            norm_bound_sq,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EncodingConfig {
        &self.config
    }

    /// Clips, rotates, scales, rounds, adds this node's noise share and
    /// reduces mod 2^bits. Refuses non-finite values.
    pub fn encode<R: CryptoRng + ?Sized>(&self, x: &[f64], rng: &mut R) -> Result<Encoded> {
        let c = &self.config;
        if x.len() != c.dim {
            return Err(SecAggError::InvalidParameter(format!(
                "the vector has {} elements but the encoding expects dim = {}",
                x.len(),
                c.dim
            )));
        }
        if let Some((i, v)) = x.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(SecAggError::InvalidParameter(format!(
                "element {i} is {v}: only finite values can be encoded"
            )));
        }
        let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
        let clipped = norm > c.clip_l2;
        // Scale first, then clip: the factor folds both.
        let factor = if clipped {
            c.scale * c.clip_l2 / norm
        } else {
            c.scale
        };
        let d = c.encoded_len();
        let mut v = vec![0f64; d];
        for (o, xi) in v.iter_mut().zip(x) {
            *o = xi * factor;
        }
        if let Some(signs) = &self.signs {
            for (o, &s) in v.iter_mut().zip(signs) {
                if s {
                    *o = -*o;
                }
            }
            hadamard::fwht(&mut v);
            let norm = 1.0 / (d as f64).sqrt();
            v.iter_mut().for_each(|o| *o *= norm);
        }
        let mut rounded = vec![0i64; d];
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut norm_sq = 0f64;
            for (r, &vi) in rounded.iter_mut().zip(&v) {
                let floor = vi.floor();
                let frac = vi - floor;
                // Up with probability frac (53-bit uniform; exact to 2^-53).
                let up = ((rng.next_u64() >> 11) as f64) * (1.0 / (1u64 << 53) as f64) < frac;
                *r = floor as i64 + i64::from(up);
                norm_sq += (*r as f64) * (*r as f64);
            }
            match self.norm_bound_sq {
                Some(bound) if norm_sq > bound => {
                    if attempts >= MAX_ROUNDING_ATTEMPTS {
                        return Err(SecAggError::Internal(format!(
                            "conditional rounding failed {attempts} times in a row; β = {:?} should make this \
                             impossible",
                            c.rounding_beta
                        )));
                    }
                }
                _ => break,
            }
        }
        let modulus_mask = if c.bits == 64 {
            u64::MAX
        } else {
            (1u64 << c.bits) - 1
        };
        let values = rounded
            .iter()
            .map(|&r| (r.wrapping_add(self.noise.sample(rng)) as u64) & modulus_mask)
            .collect();
        Ok(Encoded {
            values,
            report: EncodeReport {
                vectors: 1,
                clipped_vectors: usize::from(clipped),
                max_norm: norm,
                rounding_attempts: attempts,
            },
        })
    }

    /// Decodes a secure sum of encodings: centres each element into
    /// [-2^(bits-1), 2^(bits-1)), divides by γ and undoes the rotation.
    /// The result estimates the sum of the clipped inputs, plus noise of
    /// standard deviation about sqrt(m/t) σ/γ for m contributors.
    pub fn decode(&self, sum: &[u64]) -> Result<Vec<f64>> {
        let c = &self.config;
        let d = c.encoded_len();
        if sum.len() != d {
            return Err(SecAggError::InvalidParameter(format!(
                "the sum has {} elements but encodings have {d}",
                sum.len()
            )));
        }
        let modulus = 1i128 << c.bits;
        let half = modulus / 2;
        let mut v: Vec<f64> = sum
            .iter()
            .map(|&s| {
                let s = i128::from(s) % modulus;
                let centred = if s >= half { s - modulus } else { s };
                centred as f64 / c.scale
            })
            .collect();
        if let Some(signs) = &self.signs {
            hadamard::fwht(&mut v);
            let norm = 1.0 / (d as f64).sqrt();
            for (o, &s) in v.iter_mut().zip(signs) {
                *o *= if s { -norm } else { norm };
            }
        }
        v.truncate(c.dim);
        Ok(v)
    }
}

/// The zCDP rho of `rounds` releases of the distributed discrete Gaussian,
/// counting only the noise of `min_survivors` (t) nodes, each N_Z(0, σ²/t).
///
/// KLS21 Theorem 1 (with Proposition 14's Rényi bound): for t nodes each
/// adding N_Z(0, s²), s² = σ²/t, and L2 sensitivity Δ, one release is
/// ρ-zCDP with ρ = min(Δ²/(2σ²) + τ d, (Δ/σ + τ √d)² / 2), where
/// τ = 10 Σ_{k=1}^{t-1} exp(-2π² s² k/(k+1)) accounts for the sum of
/// discrete Gaussians not being one; ρ composes additively over rounds.
/// `sensitivity` is in integer units: use [`EncodingConfig::l2_sensitivity`]
/// (it includes clipping, rotation and rounding). The bound is stated for
/// s ≥ 1/2; smaller per-node noise is refused.
pub fn distributed_gaussian_rho(
    sigma: f64,
    sensitivity: f64,
    dim: usize,
    min_survivors: usize,
    rounds: usize,
) -> Result<f64> {
    if !(sensitivity >= 0.0 && sensitivity.is_finite()) || min_survivors == 0 || dim == 0 {
        return Err(SecAggError::InvalidParameter(format!(
            "accounting needs a finite sensitivity >= 0, min_survivors >= 1 and dim >= 1, \
             not {sensitivity}, {min_survivors}, {dim}"
        )));
    }
    let t = min_survivors as f64;
    let s2 = sigma * sigma / t;
    if !(s2 >= 0.25 && s2.is_finite()) {
        return Err(SecAggError::InvalidParameter(format!(
            "each node's noise σ/√t = {} is below 1/2, outside the distributed discrete Gaussian bound: \
             raise σ (now {sigma})",
            s2.sqrt()
        )));
    }
    let pi2 = std::f64::consts::PI * std::f64::consts::PI;
    let tau = 10.0
        * (1..min_survivors)
            .map(|k| (-2.0 * pi2 * s2 * k as f64 / (k as f64 + 1.0)).exp())
            .sum::<f64>();
    let l = sensitivity / sigma;
    let d = dim as f64;
    let rho = (l * l / 2.0 + tau * d).min((l + tau * d.sqrt()).powi(2) / 2.0);
    Ok(rho * rounds as f64)
}

/// The smallest σ (integer units, to 1e-9 relative) whose
/// [`distributed_gaussian_rho`] over `rounds` is at most `rho`.
pub fn sigma_for_rho(
    rho: f64,
    sensitivity: f64,
    dim: usize,
    min_survivors: usize,
    rounds: usize,
) -> Result<f64> {
    if !(rho > 0.0 && rho.is_finite()) || rounds == 0 {
        return Err(SecAggError::InvalidParameter(format!(
            "calibration needs a positive, finite rho and rounds >= 1, not {rho} and {rounds}"
        )));
    }
    let cost =
        |sigma: f64| distributed_gaussian_rho(sigma, sensitivity, dim, min_survivors, rounds);
    // The Gaussian's own answer is a lower end; double until it fits.
    // A hair above the bound so that σ²/t does not round below 1/4.
    let floor = 0.5 * (min_survivors as f64).sqrt() * (1.0 + 1e-12);
    let mut lo = (sensitivity * (rounds as f64 / (2.0 * rho)).sqrt()).max(floor);
    if cost(lo)? <= rho {
        return Ok(lo);
    }
    let mut hi = lo * 2.0;
    while cost(hi)? > rho {
        lo = hi;
        hi *= 2.0;
        if !hi.is_finite() {
            return Err(SecAggError::Internal("sigma calibration diverged".into()));
        }
    }
    while hi - lo > 1e-9 * hi {
        let mid = lo + (hi - lo) / 2.0;
        if cost(mid)? <= rho {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn sum_mod(vectors: &[Vec<u64>], bits: u32) -> Vec<u64> {
        let mask = (1u64 << bits) - 1;
        let mut sum = vec![0u64; vectors[0].len()];
        for v in vectors {
            for (s, x) in sum.iter_mut().zip(v) {
                *s = s.wrapping_add(*x) & mask;
            }
        }
        sum
    }

    #[test]
    fn round_trip_with_and_without_rotation() {
        let dim = 37;
        let n = 10;
        let mut rng = ChaCha20Rng::from_seed([21; 32]);
        let inputs: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                (0..dim)
                    .map(|j| ((i * 7 + j * 3) % 11) as f64 / 40.0 - 0.12)
                    .collect()
            })
            .collect();
        let truth: Vec<f64> = (0..dim)
            .map(|j| inputs.iter().map(|x| x[j]).sum())
            .collect();
        for rotation in [None, Some([9u8; 32])] {
            let mut config = EncodingConfig::new(dim, 10.0, 1e4, 0.0, n, n, 32).expect("config");
            config.rotation_seed = rotation;
            let encoder = Encoder::new(config).expect("encoder");
            let encoded: Vec<Vec<u64>> = inputs
                .iter()
                .map(|x| encoder.encode(x, &mut rng).expect("encode").values)
                .collect();
            let decoded = encoder.decode(&sum_mod(&encoded, 32)).expect("decode");
            // Rounding error: n coordinates each off by < 1/γ; rotated, the
            // errors mix but their L2 norm is at most sqrt(n * d) / γ.
            let err: f64 = decoded
                .iter()
                .zip(&truth)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
                .sqrt();
            let bound = ((n * dim.next_power_of_two()) as f64).sqrt() / 1e4;
            assert!(
                err < bound,
                "rotation {rotation:?}: error {err} over {bound}"
            );
        }
    }

    #[test]
    fn clipping_is_counted() {
        let config = EncodingConfig::new(2, 1.0, 100.0, 0.0, 2, 2, 16).expect("config");
        let encoder = Encoder::new(config).expect("encoder");
        let mut rng = ChaCha20Rng::from_seed([22; 32]);
        let mut report = EncodeReport::default();
        for x in [[0.6, 0.8], [3.0, 4.0], [0.1, 0.0]] {
            report += encoder.encode(&x, &mut rng).expect("encode").report;
        }
        assert_eq!(report.vectors, 3);
        assert_eq!(report.clipped_vectors, 1);
        assert_eq!(report.max_norm, 5.0);
        let big = encoder.encode(&[30.0, 40.0], &mut rng).expect("encode");
        let decoded = encoder.decode(&big.values).expect("decode");
        assert!((decoded[0] - 0.6).abs() <= 0.01 && (decoded[1] - 0.8).abs() <= 0.01);
        assert!(encoder.encode(&[f64::NAN, 0.0], &mut rng).is_err());
    }

    #[test]
    fn overflow_is_refused_with_the_knob_to_turn() {
        // 100 nodes, C γ = 1e5 each: 1e7 needs 25 bits.
        let err = EncodingConfig::new(1000, 1.0, 1e5, 0.0, 100, 51, 20)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("increase bits to ≥ 25") && err.contains("lower scale γ"),
            "{err}"
        );
        assert!(EncodingConfig::new(1000, 1.0, 1e5, 0.0, 100, 51, 25).is_ok());
        // Rotation spreads the mass: far fewer bits for a long vector.
        let rotated = EncodingConfig {
            rotation_seed: Some([1; 32]),
            bits: 32,
            dim: 1 << 16,
            ..EncodingConfig::new(1000, 1.0, 1e5, 0.0, 100, 51, 25).expect("config")
        };
        assert!(rotated.required_bits().expect("bits") <= 21);
        // Noise-dominated: the message names σ.
        let err = EncodingConfig::new(10, 1.0, 1.0, 1e4, 100, 51, 16)
            .unwrap_err()
            .to_string();
        assert!(err.contains("lower the noise σ"), "{err}");
    }

    #[test]
    fn accounting() {
        // Large per-node noise: τ vanishes and rho = Δ²/2σ².
        let rho = distributed_gaussian_rho(100.0, 10.0, 1000, 10, 1).expect("rho");
        assert!((rho - 0.005).abs() < 1e-12, "{rho}");
        assert!(
            (distributed_gaussian_rho(100.0, 10.0, 1000, 10, 3).expect("rho") - 0.015).abs()
                < 1e-12
        );
        // Small per-node noise: τ makes it cost more.
        let small = distributed_gaussian_rho(2.0, 1.0, 1000, 10, 1).expect("rho");
        assert!(small > 1.0 / 8.0, "{small}");
        assert!(distributed_gaussian_rho(1.0, 1.0, 10, 10, 1).is_err());
        let sigma = sigma_for_rho(0.005, 10.0, 1000, 10, 1).expect("sigma");
        assert!((sigma - 100.0).abs() < 1e-5, "{sigma}");
        let sigma = sigma_for_rho(0.1, 1.0, 1 << 16, 20, 4).expect("sigma");
        let back = distributed_gaussian_rho(sigma, 1.0, 1 << 16, 20, 4).expect("rho");
        assert!(back <= 0.1 && back > 0.1 * (1.0 - 1e-6), "{back}");
    }

    #[test]
    fn sensitivity_bounds() {
        let c = EncodingConfig::new(100, 1.0, 100.0, 0.0, 10, 6, 32).expect("config");
        assert!((c.l2_sensitivity() - 110.0).abs() < 1e-9);
        let conditional = c.clone().with_conditional_rounding((-0.5f64).exp());
        let s = conditional.l2_sensitivity();
        // sqrt(100² + 25 + 1 * (100 + 5)) = sqrt(10130).
        assert!((s - 10130f64.sqrt()).abs() < 1e-9, "{s}");
        // Conditional rounding enforces it.
        let encoder = Encoder::new(conditional).expect("encoder");
        let mut rng = ChaCha20Rng::from_seed([23; 32]);
        let x: Vec<f64> = (0..100)
            .map(|i| if i % 2 == 0 { 0.1 } else { -0.1 })
            .collect();
        let out = encoder.encode(&x, &mut rng).expect("encode");
        let norm: f64 = out
            .values
            .iter()
            .map(|&v| {
                let v = if v >= 1 << 31 {
                    v as f64 - (1u64 << 32) as f64
                } else {
                    v as f64
                };
                v * v
            })
            .sum::<f64>()
            .sqrt();
        assert!(norm <= s + 1e-9, "{norm} > {s}");
    }
}
