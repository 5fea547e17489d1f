//! An exact sampler for the discrete Gaussian N_Z(0, σ²), σ² rational:
//! Canonne, Kamath and Steinke, "The Discrete Gaussian for Differential
//! Privacy" (NeurIPS 2020), Algorithms 1-3, in u64/u128 integer arithmetic.
//! No floating point touches a draw; every Bernoulli is a comparison of a
//! uniform integer (by rejection, so unbiased) with a rational's numerator.

use rand_core::CryptoRng;

use crate::secagg::crypto::uniform_below;
use crate::secagg::{Result, SecAggError};

/// Denominator to which [`DiscreteGaussian::with_variance`] rounds σ² (up).
pub const VARIANCE_DENOMINATOR: u64 = 1 << 20;
/// Largest σ² the sampler takes (its u128 arithmetic stays exact below it).
pub const MAX_VARIANCE: f64 = (1u64 << 32) as f64;
const MAX_DENOMINATOR: u64 = 1 << 24;

/// The discrete Gaussian with P(x) ∝ exp(-x² / 2σ²) on the integers,
/// σ² = `num / den`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscreteGaussian {
    num: u64,
    den: u64,
    /// Scale of the discrete Laplace proposal: floor(σ) + 1.
    t: u64,
    /// t * den.
    t_den: u128,
    /// 2 * num * den * t², the denominator of the acceptance exponent.
    exp_den: u128,
}

impl DiscreteGaussian {
    /// σ² = `num / den` exactly; `den` at most 2^24 and σ² at most 2^32.
    pub fn from_rational(num: u64, den: u64) -> Result<DiscreteGaussian> {
        if den == 0 || den > MAX_DENOMINATOR || num / den >= 1 << 32 {
            return Err(SecAggError::InvalidParameter(format!(
                "the exact discrete Gaussian sampler takes σ² = num/den with 0 < den <= 2^24 and σ² < 2^32, \
                 not {num}/{den}: lower the scale γ or the noise σ"
            )));
        }
        // floor(sqrt(num/den)) = isqrt(floor(num/den)).
        let t = (num / den).isqrt() + 1;
        let t_den = u128::from(t) * u128::from(den);
        let exp_den = 2 * u128::from(num) * u128::from(den) * u128::from(t) * u128::from(t);
        Ok(DiscreteGaussian {
            num,
            den,
            t,
            t_den,
            exp_den,
        })
    }

    /// σ² = `variance`, rounded up to a multiple of 2^-20 (never less noise).
    pub fn with_variance(variance: f64) -> Result<DiscreteGaussian> {
        if !(0.0..MAX_VARIANCE).contains(&variance) {
            return Err(SecAggError::InvalidParameter(format!(
                "discrete Gaussian variance must be in [0, 2^32), not {variance}: lower the scale γ or the noise σ"
            )));
        }
        let num = (variance * VARIANCE_DENOMINATOR as f64).ceil() as u64;
        DiscreteGaussian::from_rational(num, VARIANCE_DENOMINATOR)
    }

    /// The parameter σ² (the variance is slightly below it when σ < ~5;
    /// see [`crate::stats::discrete_gaussian_variance`]).
    pub fn sigma_squared(&self) -> f64 {
        self.num as f64 / self.den as f64
    }

    /// One draw.
    pub fn sample<R: CryptoRng + ?Sized>(&self, rng: &mut R) -> i64 {
        if self.num == 0 {
            return 0;
        }
        loop {
            let y = discrete_laplace(self.t, rng);
            // Accept with probability exp(-(|y| - σ²/t)² / 2σ²)
            //   = exp(-(|y| t den - num)² / (2 num den t²)).
            // |y| < 2^63 and t den < 2^41, so a < 2^104; a² may not fit u128.
            let a = (u128::from(y.unsigned_abs()) * self.t_den).abs_diff(u128::from(self.num));
            let accept = match a.checked_mul(a) {
                Some(a2) => bernoulli_exp(a2, self.exp_den, rng),
                // Far tail (|y| above ~2^23 σ): exact 256-bit division.
                None => bernoulli_exp_wide(a, self.exp_den, rng),
            };
            if accept {
                return y;
            }
        }
    }

    /// Fills `out` with independent draws.
    pub fn fill<R: CryptoRng + ?Sized>(&self, out: &mut [i64], rng: &mut R) {
        for v in out {
            *v = self.sample(rng);
        }
    }
}

/// A uniform integer in `0..n`, `n > 0`, by rejection.
fn uniform_below_u128<R: CryptoRng + ?Sized>(rng: &mut R, n: u128) -> u128 {
    if let Ok(small) = u64::try_from(n) {
        return u128::from(uniform_below(rng, small));
    }
    let shift = (n - 1).leading_zeros();
    loop {
        let r = ((u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64())) >> shift;
        if r < n {
            return r;
        }
    }
}

/// Bernoulli(p / q), `p <= q`, `q > 0`.
fn bernoulli<R: CryptoRng + ?Sized>(p: u128, q: u128, rng: &mut R) -> bool {
    uniform_below_u128(rng, q) < p
}

/// Bernoulli(exp(-p/q)) for p/q in [0, 1] (CKS20 Algorithm 1, first part):
/// the index of the first failure in Bernoulli(γ/k), k = 1, 2, ..., is odd
/// with probability exp(-γ).
fn bernoulli_exp_at_most_one<R: CryptoRng + ?Sized>(p: u128, q: u128, rng: &mut R) -> bool {
    let mut k: u128 = 1;
    loop {
        // Bernoulli(p / (q k)); if q k overflows, split it exactly into
        // Bernoulli(p / q) and Bernoulli(1 / k).
        let success = match q.checked_mul(k) {
            Some(qk) => bernoulli(p, qk, rng),
            None => bernoulli(p, q, rng) && bernoulli(1, k, rng),
        };
        if !success {
            return k % 2 == 1;
        }
        k += 1;
    }
}

/// Bernoulli(exp(-p/q)) for any p/q >= 0 (CKS20 Algorithm 1): floor(p/q)
/// Bernoulli(exp(-1)) draws, then one for the fractional part.
fn bernoulli_exp<R: CryptoRng + ?Sized>(p: u128, q: u128, rng: &mut R) -> bool {
    let mut whole = p / q;
    while whole > 0 {
        if !bernoulli_exp_at_most_one(1, 1, rng) {
            return false;
        }
        whole -= 1;
    }
    bernoulli_exp_at_most_one(p % q, q, rng)
}

/// Bernoulli(exp(-a²/q)) when a² overflows u128: the exponent's whole part
/// and remainder by 256-bit long division (rare, so kept simple).
fn bernoulli_exp_wide<R: CryptoRng + ?Sized>(a: u128, q: u128, rng: &mut R) -> bool {
    // a² as (hi, lo) from 64-bit limbs.
    let (a1, a0) = (a >> 64, a & u128::from(u64::MAX));
    let (low, mid, high) = (a0 * a0, 2 * a1 * a0, a1 * a1); // a < 2^104: no overflow
    let (lo, carry) = low.overflowing_add(mid << 64);
    let hi = high + (mid >> 64) + u128::from(carry);
    // Long division of (hi, lo) by q < 2^117.
    let (mut q_hi, mut q_lo, mut r) = (0u128, 0u128, 0u128);
    for bit in (0..256).rev() {
        let next = if bit >= 128 {
            (hi >> (bit - 128)) & 1
        } else {
            (lo >> bit) & 1
        };
        r = (r << 1) | next;
        if r >= q {
            r -= q;
            if bit >= 128 {
                q_hi |= 1 << (bit - 128);
            } else {
                q_lo |= 1 << bit;
            }
        }
    }
    while q_hi > 0 || q_lo > 0 {
        if !bernoulli_exp_at_most_one(1, 1, rng) {
            return false;
        }
        if q_lo == 0 {
            q_hi -= 1;
            q_lo = u128::MAX;
        } else {
            q_lo -= 1;
        }
    }
    bernoulli_exp_at_most_one(r, q, rng)
}

/// The discrete Laplace with P(x) ∝ exp(-|x| / t), t a positive integer
/// (CKS20 Algorithm 2 with s = 1).
fn discrete_laplace<R: CryptoRng + ?Sized>(t: u64, rng: &mut R) -> i64 {
    loop {
        let u = uniform_below(rng, t);
        if !bernoulli_exp_at_most_one(u128::from(u), u128::from(t), rng) {
            continue;
        }
        let mut v: u64 = 0;
        while bernoulli_exp_at_most_one(1, 1, rng) {
            v += 1;
        }
        let x = u + t * v;
        let negative = rng.next_u32() & 1 == 1;
        if negative && x == 0 {
            continue;
        }
        let x = x as i64;
        return if negative { -x } else { x };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{discrete_gaussian_variance, normal_quantile};
    use chacha20::ChaCha20Rng;
    use rand_core::SeedableRng;

    /// The chi-square quantile by Wilson-Hilferty, good to a few percent at
    /// the far tail for df >= 10, which the margin below covers.
    fn chi_square_quantile(df: f64, p: f64) -> f64 {
        let z = normal_quantile(p);
        let a = 2.0 / (9.0 * df);
        df * (1.0 - a + z * a.sqrt()).powi(3)
    }

    #[test]
    fn pmf_matches_exactly_by_chi_square() {
        // σ² = 9/4: small enough that the discrete and continuous shapes differ.
        let dg = DiscreteGaussian::from_rational(9, 4).expect("sampler");
        let mut rng = ChaCha20Rng::from_seed([11; 32]);
        let draws = 200_000;
        let range = 7i64; // bins -7..=7, plus the two tails pooled
        let mut counts = vec![0f64; (2 * range + 3) as usize];
        for _ in 0..draws {
            let y = dg.sample(&mut rng);
            let bin = if y < -range {
                0
            } else if y > range {
                (2 * range + 2) as usize
            } else {
                (y + range + 1) as usize
            };
            counts[bin] += 1.0;
        }
        let weight = |x: i64| (-(x * x) as f64 / (2.0 * 2.25)).exp();
        let total: f64 = (-200..=200).map(weight).sum();
        let tail: f64 = (range + 1..=200).map(weight).sum::<f64>() / total;
        let mut expected = vec![tail];
        expected.extend((-range..=range).map(|x| weight(x) / total));
        expected.push(tail);
        let chi2: f64 = counts
            .iter()
            .zip(&expected)
            .map(|(c, p)| {
                let e = p * draws as f64;
                (c - e) * (c - e) / e
            })
            .sum();
        let df = (counts.len() - 1) as f64;
        // Fails with probability about 1e-9 (1.2 covers the approximation).
        let limit = 1.2 * chi_square_quantile(df, 1.0 - 1e-9);
        assert!(chi2 < limit, "chi2 {chi2} over {limit}");
    }

    #[test]
    fn variance_matches_theory() {
        let mut rng = ChaCha20Rng::from_seed([12; 32]);
        for (variance, draws) in [(0.3, 100_000), (1000.0 / 7.0, 100_000), (2.5e5, 50_000)] {
            let dg = DiscreteGaussian::with_variance(variance).expect("sampler");
            let mut out = vec![0i64; draws];
            dg.fill(&mut out, &mut rng);
            let n = draws as f64;
            let mean = out.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = out.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
            let theory = discrete_gaussian_variance(dg.sigma_squared().sqrt());
            // Relative SE of a sample variance: sqrt((kurtosis - 1) / n),
            // with the exact kurtosis (above 3 for small σ); 6.5 SE fails
            // with probability about 1e-10.
            let s2 = dg.sigma_squared();
            let limit = (40.0 * s2.sqrt()).ceil() as i64 + 2;
            let (mut mass, mut m4) = (0f64, 0f64);
            for x in -limit..=limit {
                let w = (-((x * x) as f64) / (2.0 * s2)).exp();
                mass += w;
                m4 += w * (x as f64).powi(4);
            }
            let kurtosis = m4 / mass / (theory * theory);
            let tol = 6.5 * ((kurtosis - 1.0) / n).sqrt();
            assert!(
                (var / theory - 1.0).abs() < tol,
                "σ² {variance}: sample variance {var} vs {theory}"
            );
            let mean_tol = 6.5 * (theory / n).sqrt();
            assert!(mean.abs() < mean_tol, "σ² {variance}: mean {mean}");
        }
    }

    #[test]
    fn zero_and_bad_variances() {
        let mut rng = ChaCha20Rng::from_seed([13; 32]);
        assert_eq!(
            DiscreteGaussian::with_variance(0.0)
                .expect("zero")
                .sample(&mut rng),
            0
        );
        assert!(DiscreteGaussian::with_variance(-1.0).is_err());
        assert!(DiscreteGaussian::with_variance(f64::NAN).is_err());
        assert!(DiscreteGaussian::with_variance(MAX_VARIANCE).is_err());
        assert!(DiscreteGaussian::from_rational(1, 0).is_err());
        // Rounded up, never down.
        let dg = DiscreteGaussian::with_variance(0.1).expect("sampler");
        assert!(dg.sigma_squared() >= 0.1);
    }

    #[test]
    fn wide_exponent_matches_narrow() {
        // Same exponent through both paths: a = 2^40, q = 2^81 + 1 gives
        // a²/q just under 2^-1; a = 2^70 forces the wide path (x ~ 2^23).
        let mut r1 = ChaCha20Rng::from_seed([15; 32]);
        let mut r2 = ChaCha20Rng::from_seed([15; 32]);
        let (a, q) = (1u128 << 40, (1u128 << 81) + 1);
        for _ in 0..1000 {
            assert_eq!(
                bernoulli_exp(a * a, q, &mut r1),
                bernoulli_exp_wide(a, q, &mut r2)
            );
        }
        let mut rng = ChaCha20Rng::from_seed([16; 32]);
        assert!(!(0..100).any(|_| bernoulli_exp_wide(1 << 70, 1 << 117, &mut rng)));
    }

    #[test]
    fn exponential_bernoulli_is_exact_in_mean() {
        let mut rng = ChaCha20Rng::from_seed([14; 32]);
        for (p, q) in [(0u128, 1u128), (1, 3), (1, 1), (5, 2), (7, 1 << 100)] {
            let draws = 100_000;
            let hits = (0..draws).filter(|_| bernoulli_exp(p, q, &mut rng)).count() as f64;
            let prob = (-(p as f64) / q as f64).exp();
            let sd = (prob * (1.0 - prob) / draws as f64).sqrt();
            assert!(
                (hits / draws as f64 - prob).abs() <= 6.5 * sd + 1e-12,
                "exp(-{p}/{q}): {} vs {prob}",
                hits / draws as f64
            );
        }
    }
}
