//! Calibrated noise from OpenDP's discrete samplers.
//!
//! A [`Noise`] is a mechanism (discrete Gaussian or discrete Laplace), a
//! scale, and the sensitivity it was calibrated to. It builds the OpenDP
//! measurement each time it is applied (OpenDP measurements are not `Send`,
//! so none is kept), checks that OpenDP's own privacy map agrees with the
//! cost it was calibrated for, and invokes it.

use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::{make_gaussian, make_laplace};
use opendp::metrics::{L1Distance, L2Distance};
use serde::{Deserialize, Serialize};

use crate::accounting::rho_for_pure_epsilon;
use crate::stats;
use crate::{PrivacyError, Result};

/// Which noise distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    /// Discrete Gaussian; cost in zCDP rho = (sensitivity_L2 / scale)^2 / 2.
    Gaussian,
    /// Discrete Laplace; cost in pure epsilon = sensitivity_L1 / scale.
    Laplace,
}

impl Mechanism {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Gaussian => "gaussian",
            Mechanism::Laplace => "laplace",
        }
    }
}

/// A calibrated mechanism for vectors whose sensitivity is known.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Noise {
    /// The distribution.
    pub mechanism: Mechanism,
    /// The scale: sigma for the Gaussian, b for the Laplace.
    pub scale: f64,
    /// The sensitivity the scale was calibrated to (L2 for Gaussian, L1 for Laplace).
    pub sensitivity: f64,
}

/// Relative slack when calibrating, so that OpenDP's outward rounding of the
/// privacy map never puts the cost a hair above the budget.
const CALIBRATION_SLACK: f64 = 1.0 + 1e-9;

impl Noise {
    /// Discrete Gaussian noise for vectors of L2 sensitivity `l2`, costing at most `rho`.
    pub fn gaussian(l2: f64, rho: f64) -> Result<Self> {
        check_sensitivity(l2)?;
        if !(rho > 0.0 && rho.is_finite()) {
            return Err(PrivacyError::InvalidParameter(format!(
                "a Gaussian release needs a positive, finite rho, not {rho}"
            )));
        }
        let scale = l2 / (2.0 * rho).sqrt() * CALIBRATION_SLACK;
        let noise = Self {
            mechanism: Mechanism::Gaussian,
            scale,
            sensitivity: l2,
        };
        noise.ensure_cost_within(rho)?;
        Ok(noise)
    }

    /// Discrete Laplace noise for vectors of L1 sensitivity `l1`, costing at most `epsilon`.
    pub fn laplace(l1: f64, epsilon: f64) -> Result<Self> {
        check_sensitivity(l1)?;
        if !(epsilon > 0.0 && epsilon.is_finite()) {
            return Err(PrivacyError::InvalidParameter(format!(
                "a Laplace release needs a positive, finite epsilon, not {epsilon}"
            )));
        }
        let scale = l1 / epsilon * CALIBRATION_SLACK;
        let noise = Self {
            mechanism: Mechanism::Laplace,
            scale,
            sensitivity: l1,
        };
        noise.ensure_cost_within(epsilon)?;
        Ok(noise)
    }

    fn ensure_cost_within(&self, budget: f64) -> Result<()> {
        let cost = self.opendp_cost()?;
        if cost > budget * (1.0 + 1e-6) {
            return Err(PrivacyError::OpenDp(format!(
                "calibration failed: OpenDP charges {cost} for a budget of {budget}"
            )));
        }
        Ok(())
    }

    /// OpenDP's privacy map at the calibrated sensitivity: rho for the
    /// Gaussian, epsilon for the Laplace.
    fn opendp_cost(&self) -> Result<f64> {
        Ok(match self.mechanism {
            Mechanism::Gaussian => {
                let m = make_gaussian(
                    VectorDomain::new(AtomDomain::<i64>::default()),
                    L2Distance::<f64>::default(),
                    self.scale,
                    None,
                )?;
                m.map(&self.sensitivity)?
            }
            Mechanism::Laplace => {
                let m = make_laplace(
                    VectorDomain::new(AtomDomain::<i64>::default()),
                    L1Distance::<f64>::default(),
                    self.scale,
                    None,
                )?;
                m.map(&self.sensitivity)?
            }
        })
    }

    /// The cost in zCDP rho (pure epsilon-DP converts to epsilon^2 / 2).
    pub fn cost_rho(&self) -> Result<f64> {
        let cost = self.opendp_cost()?;
        Ok(match self.mechanism {
            Mechanism::Gaussian => cost,
            Mechanism::Laplace => rho_for_pure_epsilon(cost),
        })
    }

    /// The pure-DP epsilon of a Laplace release (`None` for the Gaussian).
    pub fn cost_pure_epsilon(&self) -> Result<Option<f64>> {
        Ok(match self.mechanism {
            Mechanism::Gaussian => None,
            Mechanism::Laplace => Some(self.opendp_cost()?),
        })
    }

    /// Standard deviation of one noise draw (exact for the discrete distributions).
    pub fn stddev(&self) -> f64 {
        match self.mechanism {
            Mechanism::Gaussian => stats::discrete_gaussian_variance(self.scale).sqrt(),
            Mechanism::Laplace => stats::discrete_laplace_variance(self.scale).sqrt(),
        }
    }

    /// Standard deviation of the noise [`Noise::apply_f64`] adds: OpenDP
    /// samples at a granularity far below the scale, so the spread is the
    /// continuous one (σ for the Gaussian, √2·b for the Laplace), also
    /// when the scale is below 1 and the integer distribution would be
    /// almost all zeros.
    pub fn stddev_f64(&self) -> f64 {
        match self.mechanism {
            Mechanism::Gaussian => self.scale,
            Mechanism::Laplace => std::f64::consts::SQRT_2 * self.scale,
        }
    }

    /// Adds noise to each integer (values saturate at the i64 range).
    pub fn apply_i64(&self, values: &[i64]) -> Result<Vec<i64>> {
        let data = values.to_vec();
        Ok(match self.mechanism {
            Mechanism::Gaussian => make_gaussian(
                VectorDomain::new(AtomDomain::<i64>::default()),
                L2Distance::<f64>::default(),
                self.scale,
                None,
            )?
            .invoke(&data)?,
            Mechanism::Laplace => make_laplace(
                VectorDomain::new(AtomDomain::<i64>::default()),
                L1Distance::<f64>::default(),
                self.scale,
                None,
            )?
            .invoke(&data)?,
        })
    }

    /// Adds noise to each float; OpenDP integerises at granularity 2^k
    /// (its default k for the scale) and samples the discrete distribution.
    pub fn apply_f64(&self, values: &[f64]) -> Result<Vec<f64>> {
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            return Err(PrivacyError::InvalidParameter(format!(
                "cannot release the non-finite value {bad}: clamp values into bounds first"
            )));
        }
        let data = values.to_vec();
        Ok(match self.mechanism {
            Mechanism::Gaussian => make_gaussian(
                VectorDomain::new(AtomDomain::<f64>::new_non_nan()),
                L2Distance::<f64>::default(),
                self.scale,
                None,
            )?
            .invoke(&data)?,
            Mechanism::Laplace => make_laplace(
                VectorDomain::new(AtomDomain::<f64>::new_non_nan()),
                L1Distance::<f64>::default(),
                self.scale,
                None,
            )?
            .invoke(&data)?,
        })
    }
}

fn check_sensitivity(s: f64) -> Result<()> {
    if !(s > 0.0 && s.is_finite()) {
        return Err(PrivacyError::InvalidParameter(format!(
            "sensitivity must be positive and finite, not {s}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Empirical standard deviation of `n` draws of noise added to zeros.
    fn empirical_sd(noise: &Noise, n: usize, float: bool) -> f64 {
        let draws: Vec<f64> = if float {
            noise.apply_f64(&vec![0.0; n]).expect("noise")
        } else {
            noise
                .apply_i64(&vec![0; n])
                .expect("noise")
                .into_iter()
                .map(|v| v as f64)
                .collect()
        };
        let mean = draws.iter().sum::<f64>() / n as f64;
        (draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    }

    /// The sample variance of n draws has relative standard error about
    /// sqrt((kurtosis - 1) / n); 7 standard errors fail with probability
    /// below 1e-11 for the Gaussian. The sample SD's relative error is half.
    fn tolerance(n: usize, kurtosis: f64) -> f64 {
        7.0 * ((kurtosis - 1.0) / n as f64).sqrt() / 2.0
    }

    #[test]
    fn gaussian_spread_matches_declared_scale() {
        let rho = 0.005;
        let noise = Noise::gaussian(2.0, rho).expect("calibrate");
        assert!((noise.scale - 2.0 / (2.0 * rho).sqrt()).abs() < 1e-6 * noise.scale);
        let n = 40_000;
        let sd = empirical_sd(&noise, n, false);
        let rel = (sd / noise.stddev() - 1.0).abs();
        assert!(
            rel < tolerance(n, 3.0),
            "sd {sd} vs declared {}",
            noise.stddev()
        );
        assert!(noise.cost_rho().expect("cost") <= rho * (1.0 + 1e-6));
    }

    /// Floats are noised far below the scale: their spread is the
    /// continuous one at every scale, also well below 1 where the integer
    /// distribution is almost all zeros (and its SD almost 0).
    #[test]
    fn float_spread_matches_declared_spread_at_every_scale() {
        let n = 10_000;
        for scale in [0.05, 0.3, 40.0] {
            for (noise, kurtosis) in [
                (
                    Noise::gaussian(1.0, 0.5 / (scale * scale)).expect("calibrate"),
                    3.0,
                ),
                (Noise::laplace(1.0, 1.0 / scale).expect("calibrate"), 6.0),
            ] {
                assert!((noise.scale / scale - 1.0).abs() < 1e-6, "{noise:?}");
                let sd = empirical_sd(&noise, n, true);
                let rel = (sd / noise.stddev_f64() - 1.0).abs();
                assert!(
                    rel < tolerance(n, kurtosis),
                    "{:?} at scale {scale}: sd {sd} vs declared {}",
                    noise.mechanism,
                    noise.stddev_f64()
                );
            }
        }
        // The integer spread is far below it at small scales.
        let small = Noise::gaussian(1.0, 0.5 / (0.1 * 0.1)).expect("calibrate");
        assert!(small.stddev() < 1e-6 && small.stddev_f64() > 0.09);
    }

    #[test]
    fn laplace_spread_matches_declared_scale() {
        let noise = Noise::laplace(1.0, 0.1).expect("calibrate");
        assert_eq!(
            noise
                .cost_pure_epsilon()
                .expect("cost")
                .map(|e| e <= 0.1 * (1.0 + 1e-6)),
            Some(true)
        );
        let n = 40_000;
        let sd = empirical_sd(&noise, n, false);
        let rel = (sd / noise.stddev() - 1.0).abs();
        // Laplace kurtosis is 6.
        assert!(
            rel < tolerance(n, 6.0),
            "sd {sd} vs declared {}",
            noise.stddev()
        );
    }

    #[test]
    fn vanishing_noise_at_huge_budgets() {
        let noise = Noise::gaussian(1.0, 1e9).expect("calibrate");
        assert_eq!(noise.apply_i64(&[5, 0, -3]).expect("noise"), vec![5, 0, -3]);
        let out = noise.apply_f64(&[1.25, -2.5]).expect("noise");
        assert!(
            (out[0] - 1.25).abs() < 1e-3 && (out[1] + 2.5).abs() < 1e-3,
            "{out:?}"
        );
    }

    #[test]
    fn bad_calibrations_are_refused() {
        assert!(Noise::gaussian(0.0, 1.0).is_err());
        assert!(Noise::gaussian(1.0, 0.0).is_err());
        assert!(Noise::laplace(1.0, f64::INFINITY).is_err());
        let noise = Noise::gaussian(1.0, 1.0).expect("calibrate");
        assert!(noise.apply_f64(&[f64::NAN]).is_err());
    }
}
