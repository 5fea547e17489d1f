//! Statistics for reporting accuracy. Everything here is post-processing of
//! public quantities (scales, levels); nothing here draws randomness.

/// The standard normal quantile function (inverse CDF), by Wichura's
/// algorithm AS 241 (PPND16), accurate to about 1e-16.
pub fn normal_quantile(p: f64) -> f64 {
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    let q = p - 0.5;
    if q.abs() <= 0.425 {
        let r = 0.180625 - q * q;
        return q * horner(&AS241_A, r) / horner(&AS241_B, r);
    }
    let r = (-(if q < 0.0 { p } else { 1.0 - p }).ln()).sqrt();
    let val = if r <= 5.0 {
        horner(&AS241_C, r - 1.6) / horner(&AS241_D, r - 1.6)
    } else {
        horner(&AS241_E, r - 5.0) / horner(&AS241_F, r - 5.0)
    };
    if q < 0.0 { -val } else { val }
}

/// Evaluates a polynomial whose coefficients are given from the highest degree down.
fn horner(coefficients: &[f64], x: f64) -> f64 {
    coefficients.iter().fold(0.0, |acc, c| acc * x + c)
}

// The coefficients of AS 241 as published (Wichura 1988), digits kept as
// printed so they can be checked against the paper.
#[allow(clippy::excessive_precision, clippy::inconsistent_digit_grouping)]
const AS241_A: [f64; 8] = [
    2509.0809287301226727,
    33430.575583588128105,
    67265.770927008700853,
    45921.953931549871457,
    13731.693765509461125,
    1971.5909503065514427,
    133.14166789178437745,
    3.387132872796366608,
];
#[allow(clippy::excessive_precision, clippy::inconsistent_digit_grouping)]
const AS241_B: [f64; 8] = [
    5226.495278852545925,
    28729.085735721942674,
    39307.89580009271061,
    21213.794301586595867,
    5394.1960214247511077,
    687.1870074920579083,
    42.313330701600911252,
    1.0,
];
#[allow(clippy::excessive_precision, clippy::inconsistent_digit_grouping)]
const AS241_C: [f64; 8] = [
    7.7454501427834140764e-4,
    0.0227238449892691845833,
    0.24178072517745061177,
    1.27045825245236838258,
    3.64784832476320460504,
    5.7694972214606914055,
    4.6303378461565452959,
    1.42343711074968357734,
];
#[allow(clippy::excessive_precision, clippy::inconsistent_digit_grouping)]
const AS241_D: [f64; 8] = [
    1.05075007164441684324e-9,
    5.475938084995344946e-4,
    0.0151986665636164571966,
    0.14810397642748007459,
    0.68976733498510000455,
    1.6763848301838038494,
    2.05319162663775882187,
    1.0,
];
#[allow(clippy::excessive_precision, clippy::inconsistent_digit_grouping)]
const AS241_E: [f64; 8] = [
    2.01033439929228813265e-7,
    2.71155556874348757815e-5,
    0.0012426609473880784386,
    0.026532189526576123093,
    0.29656057182850489123,
    1.7848265399172913358,
    5.4637849111641143699,
    6.6579046435011037772,
];
#[allow(clippy::excessive_precision, clippy::inconsistent_digit_grouping)]
const AS241_F: [f64; 8] = [
    2.04426310338993978564e-15,
    1.4215117583164458887e-7,
    1.8463183175100546818e-5,
    7.868691311456132591e-4,
    0.0148753612908506148525,
    0.13692988092273580531,
    0.59983220655588793769,
    1.0,
];

/// The z multiplier of a two-sided interval at `confidence` (1.96 at 0.95).
pub fn z_for_confidence(confidence: f64) -> f64 {
    normal_quantile(0.5 + confidence / 2.0)
}

/// The multiplier of the standard deviation for a two-sided interval at
/// `confidence` around Laplace noise, kept no narrower than the normal one.
///
/// One site's Laplace noise has heavier tails than a normal of the same
/// spread: P(|X| > h) = exp(-h / b) with sd = sqrt(2) b, so the half-width
/// is sd ln(1 / (1 - confidence)) / sqrt(2), which exceeds the normal
/// multiplier above confidence of about 0.9 (2.12 against 1.96 at 0.95,
/// where normal intervals cover only 0.937). Sums over several sites have
/// tails between the two, so the larger multiplier covers them too.
pub fn laplace_multiplier(confidence: f64) -> f64 {
    let laplace = (1.0 / (1.0 - confidence)).ln() / std::f64::consts::SQRT_2;
    laplace.max(z_for_confidence(confidence))
}

/// Variance of the discrete Gaussian with scale `sigma` (P(x) ∝ exp(-x²/2σ²)).
/// It is below sigma² for small sigma and indistinguishable from it above ~5.
pub fn discrete_gaussian_variance(sigma: f64) -> f64 {
    if sigma <= 0.0 {
        return 0.0;
    }
    if sigma > 50.0 {
        return sigma * sigma;
    }
    let limit = (sigma * 40.0).ceil() as i64 + 1;
    let (mut mass, mut second) = (1.0_f64, 0.0_f64);
    for x in 1..=limit {
        let xf = x as f64;
        let w = (-xf * xf / (2.0 * sigma * sigma)).exp();
        mass += 2.0 * w;
        second += 2.0 * xf * xf * w;
    }
    second / mass
}

/// Variance of the discrete Laplace with scale `b` (P(x) ∝ exp(-|x|/b)).
pub fn discrete_laplace_variance(b: f64) -> f64 {
    if b <= 0.0 {
        return 0.0;
    }
    let q = (-1.0 / b).exp();
    2.0 * q / ((1.0 - q) * (1.0 - q))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        assert!((z_for_confidence(0.95) - 1.959_963_984_540_054).abs() < 1e-12);
        assert!((normal_quantile(0.5)).abs() < 1e-15);
        assert!((normal_quantile(1e-10) + 6.361_340_902_404_056).abs() < 1e-9);
        assert!((normal_quantile(0.975) - 1.959_963_984_540_054).abs() < 1e-12);
    }

    #[test]
    fn variances() {
        assert!((discrete_gaussian_variance(10.0) / 100.0 - 1.0).abs() < 1e-12);
        assert!(discrete_gaussian_variance(0.3) < 0.09);
        assert_eq!(discrete_gaussian_variance(0.0), 0.0);
        // For large b the discrete Laplace approaches the continuous 2 b².
        assert!((discrete_laplace_variance(100.0) / 20_000.0 - 1.0).abs() < 1e-3);
    }
}
