//! Converting between zCDP (rho) and approximate DP (epsilon, delta).
//!
//! Budgets are kept as zCDP rho because it composes by addition. Users speak
//! (epsilon, delta): a query's (epsilon, delta) is turned into the largest
//! rho whose OpenDP conversion (Canonne-Kamath-Steinke) stays within it.

use opendp::combinators::ConcentratedMeasure;
use opendp::measures::ZeroConcentratedDivergence;

use crate::{PrivacyError, Result};

/// The epsilon that rho-zCDP implies at `delta` (OpenDP's conversion).
pub fn epsilon_for_rho(rho: f64, delta: f64) -> Result<f64> {
    if rho.is_nan() || rho < 0.0 {
        return Err(PrivacyError::InvalidParameter(format!(
            "rho must be non-negative, not {rho}"
        )));
    }
    if rho == 0.0 {
        return Ok(0.0);
    }
    if !(delta > 0.0 && delta < 1.0) {
        return Err(PrivacyError::InvalidParameter(format!(
            "converting zCDP to (epsilon, delta) needs 0 < delta < 1, not {delta}"
        )));
    }
    let classic = classic_epsilon(rho, delta);
    let profile = <ZeroConcentratedDivergence as ConcentratedMeasure>::convert(rho)?;
    // OpenDP's conversion is tighter but overflows for very large rho (the
    // test-only budgets such as epsilon = 1e9); the classic bound is valid
    // everywhere, so use it where OpenDP cannot compute.
    Ok(match profile.epsilon(delta) {
        Ok(eps) => eps.min(classic),
        Err(_) => classic,
    })
}

/// The classic conversion of Bun and Steinke (2016): rho-zCDP implies
/// (rho + 2 sqrt(rho ln(1/delta)), delta)-DP.
fn classic_epsilon(rho: f64, delta: f64) -> f64 {
    rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt()
}

/// The largest rho whose (epsilon, delta) conversion does not exceed `epsilon` at `delta`.
pub fn rho_for_epsilon_delta(epsilon: f64, delta: f64) -> Result<f64> {
    if !(epsilon.is_finite() && epsilon > 0.0) {
        return Err(PrivacyError::InvalidParameter(format!(
            "epsilon must be a positive number, not {epsilon}"
        )));
    }
    if !(delta > 0.0 && delta < 1.0) {
        return Err(PrivacyError::InvalidParameter(format!(
            "zCDP mechanisms need 0 < delta < 1, not {delta}: set delta (e.g. 1e-6) or use the Laplace mechanism"
        )));
    }
    // epsilon(rho) >= rho, so rho lies below epsilon; the classic bound's
    // exact inverse is a lower end that already satisfies the request.
    let l = (1.0 / delta).ln();
    let classic_rho = ((l + epsilon).sqrt() - l.sqrt()).powi(2);
    let (mut lo, mut hi) = (classic_rho * (1.0 - 1e-12), epsilon);
    for _ in 0..200 {
        let mid = lo + (hi - lo) / 2.0;
        if mid <= lo || mid >= hi {
            break;
        }
        if epsilon_for_rho(mid, delta)? <= epsilon {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    if lo <= 0.0 {
        return Err(PrivacyError::InvalidParameter(format!(
            "(epsilon = {epsilon}, delta = {delta}) leaves no zCDP budget: raise epsilon or delta"
        )));
    }
    Ok(lo)
}

/// The zCDP rho implied by pure epsilon-DP (epsilon^2 / 2), used to charge
/// Laplace releases to a ledger kept in rho.
pub fn rho_for_pure_epsilon(epsilon: f64) -> f64 {
    epsilon * epsilon / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_stays_within_the_request() {
        for &(eps, delta) in &[(0.1, 1e-6), (1.0, 1e-6), (5.0, 1e-5), (1e9, 1e-6)] {
            let rho = rho_for_epsilon_delta(eps, delta).expect("rho");
            let back = epsilon_for_rho(rho, delta).expect("epsilon");
            assert!(back <= eps, "eps {eps} -> rho {rho} -> {back}");
            assert!(
                back >= eps * (1.0 - 1e-6),
                "eps {eps} -> rho {rho} -> {back}: too loose"
            );
        }
    }

    #[test]
    fn known_value() {
        // The classic bound eps = rho + 2 sqrt(rho ln(1/delta)) is looser than
        // OpenDP's, so OpenDP's rho for eps = 1, delta = 1e-6 exceeds it.
        let classic = {
            let l = (1e6_f64).ln();
            let s = (l + 1.0).sqrt() - l.sqrt();
            s * s
        };
        let rho = rho_for_epsilon_delta(1.0, 1e-6).expect("rho");
        assert!(
            rho > classic && rho < 2.0 * classic,
            "rho {rho} vs classic {classic}"
        );
    }

    #[test]
    fn bad_parameters_are_explained() {
        assert!(
            rho_for_epsilon_delta(1.0, 0.0)
                .unwrap_err()
                .to_string()
                .contains("delta")
        );
        assert!(
            rho_for_epsilon_delta(-1.0, 1e-6)
                .unwrap_err()
                .to_string()
                .contains("epsilon")
        );
    }
}
