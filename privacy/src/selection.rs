//! DP partition selection: which private group keys may be released.
//!
//! Each group's count of persons gets noise (discrete Gaussian or discrete
//! Laplace, from OpenDP), and only groups whose noisy count reaches a
//! threshold are released. The threshold is the smallest integer for which
//! OpenDP's own privacy map says the probability of releasing a group held
//! by one person's data alone stays below the delta set aside for selection.
//!
//! One person changes at most `max_groups` counts (l0), each by at most 1
//! (l_inf), so the l2 sensitivity is sqrt(max_groups) and l1 is max_groups.

use std::collections::HashMap;

use opendp::domains::{AtomDomain, MapDomain};
use opendp::measurements::{make_gaussian_threshold, make_laplace_threshold};
use opendp::measures::{Approximate, MaxDivergence, ZeroConcentratedDivergence};
use opendp::metrics::{AbsoluteDistance, L0PInfDistance};
use serde::{Deserialize, Serialize};

use crate::mechanisms::Mechanism;
use crate::{PrivacyError, Result};

/// A calibrated partition selection.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    /// Noise distribution.
    pub mechanism: Mechanism,
    /// Noise scale (sigma, or b for Laplace).
    pub scale: f64,
    /// Groups whose noisy person count is at least this are released.
    pub threshold: i64,
    /// Groups one person may appear in.
    pub max_groups: u32,
    /// Delta the selection may spend.
    pub delta: f64,
}

type Counts = MapDomain<AtomDomain<u64>, AtomDomain<i64>>;

fn counts_domain() -> Counts {
    MapDomain::new(AtomDomain::default(), AtomDomain::default())
}

impl Selection {
    /// Gaussian selection spending zCDP `rho` and at most `delta`.
    pub fn gaussian(max_groups: u32, rho: f64, delta: f64) -> Result<Self> {
        check(max_groups, rho, delta)?;
        let scale = (max_groups as f64 / (2.0 * rho)).sqrt() * (1.0 + 1e-9);
        Self::calibrate(Mechanism::Gaussian, scale, max_groups, delta)
    }

    /// Laplace selection spending pure `epsilon` and at most `delta`.
    pub fn laplace(max_groups: u32, epsilon: f64, delta: f64) -> Result<Self> {
        check(max_groups, epsilon, delta)?;
        let scale = max_groups as f64 / epsilon * (1.0 + 1e-9);
        Self::calibrate(Mechanism::Laplace, scale, max_groups, delta)
    }

    fn calibrate(mechanism: Mechanism, scale: f64, max_groups: u32, delta: f64) -> Result<Self> {
        let mut s = Self {
            mechanism,
            scale,
            threshold: 2,
            max_groups,
            delta,
        };
        // Smallest threshold whose delta fits: OpenDP's delta falls as the
        // threshold rises, so search by doubling, then bisection.
        let mut hi: i64 = 2;
        while s.with_threshold(hi).cost()?.1 > delta {
            hi = hi.checked_mul(2).ok_or_else(|| {
                PrivacyError::InvalidParameter(
                    "no threshold keeps partition selection within delta: raise delta or epsilon"
                        .into(),
                )
            })?;
        }
        let mut lo = (hi / 2).max(1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if s.with_threshold(mid).cost()?.1 <= delta {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        s.threshold = hi.max(2);
        Ok(s)
    }

    fn with_threshold(&self, t: i64) -> Self {
        Self {
            threshold: t,
            ..*self
        }
    }

    /// OpenDP's privacy map: (rho or epsilon, delta).
    pub fn cost(&self) -> Result<(f64, f64)> {
        let k = self.max_groups;
        Ok(match self.mechanism {
            Mechanism::Gaussian => {
                let m = make_gaussian_threshold::<_, _, Approximate<ZeroConcentratedDivergence>>(
                    counts_domain(),
                    L0PInfDistance::<2, _>(AbsoluteDistance::<f64>::default()),
                    self.scale,
                    self.threshold,
                    None,
                )?;
                m.map(&(k, (k as f64).sqrt(), 1.0))?
            }
            Mechanism::Laplace => {
                let m = make_laplace_threshold::<_, _, Approximate<MaxDivergence>>(
                    counts_domain(),
                    L0PInfDistance::<1, _>(AbsoluteDistance::<f64>::default()),
                    self.scale,
                    self.threshold,
                    None,
                )?;
                m.map(&(k, k as f64, 1.0))?
            }
        })
    }

    /// Noises the person counts and keeps the groups at or above the
    /// threshold (with their noisy counts).
    pub fn apply(&self, counts: &HashMap<u64, i64>) -> Result<HashMap<u64, i64>> {
        Ok(match self.mechanism {
            Mechanism::Gaussian => {
                make_gaussian_threshold::<_, _, Approximate<ZeroConcentratedDivergence>>(
                    counts_domain(),
                    L0PInfDistance::<2, _>(AbsoluteDistance::<f64>::default()),
                    self.scale,
                    self.threshold,
                    None,
                )?
                .invoke(counts)?
            }
            Mechanism::Laplace => make_laplace_threshold::<_, _, Approximate<MaxDivergence>>(
                counts_domain(),
                L0PInfDistance::<1, _>(AbsoluteDistance::<f64>::default()),
                self.scale,
                self.threshold,
                None,
            )?
            .invoke(counts)?,
        })
    }
}

fn check(max_groups: u32, budget: f64, delta: f64) -> Result<()> {
    if max_groups == 0 {
        return Err(PrivacyError::InvalidParameter(
            "max_groups must be at least 1".into(),
        ));
    }
    if !(budget > 0.0 && budget.is_finite()) {
        return Err(PrivacyError::InvalidParameter(format!(
            "partition selection needs a positive budget, not {budget}"
        )));
    }
    if !(delta > 0.0 && delta < 1.0) {
        return Err(PrivacyError::InvalidParameter(format!(
            "grouping by keys without a public domain needs delta > 0 for partition selection, not {delta}: \
             set delta (for example 1e-6) or declare a public domain for the group column"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_fit_delta_and_rise_with_groups() {
        let one = Selection::gaussian(1, 0.05, 1e-6).expect("calibrate");
        let (rho, delta) = one.cost().expect("cost");
        assert!(rho <= 0.05 * (1.0 + 1e-6) && delta <= 1e-6, "{rho} {delta}");
        assert!(
            one.with_threshold(one.threshold - 1)
                .cost()
                .expect("cost")
                .1
                > 1e-6,
            "smallest threshold"
        );
        let five = Selection::gaussian(5, 0.05, 1e-6).expect("calibrate");
        assert!(five.threshold > one.threshold);
        let lap = Selection::laplace(1, 1.0, 1e-6).expect("calibrate");
        assert!(lap.cost().expect("cost").1 <= 1e-6);
        assert!(
            Selection::gaussian(1, 0.05, 0.0)
                .unwrap_err()
                .to_string()
                .contains("delta > 0")
        );
    }

    #[test]
    fn small_groups_are_dropped_and_large_ones_kept() {
        let s = Selection::gaussian(1, 1e9, 1e-6).expect("calibrate");
        assert_eq!(
            s.threshold, 2,
            "with vanishing noise a single person's group is still refused"
        );
        let counts = HashMap::from([(1u64, 1i64), (2, 2), (3, 500)]);
        let kept = s.apply(&counts).expect("apply");
        assert!(!kept.contains_key(&1));
        assert_eq!(kept.get(&2), Some(&2));
        assert_eq!(kept.get(&3), Some(&500));
    }
}
