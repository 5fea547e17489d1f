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
        return q
            * (((((((2509.080_928_730_122_7 * r + 33430.575_583_588_128) * r
                + 67265.770_927_008_7)
                * r
                + 45921.953_931_549_87)
                * r
                + 13731.693_765_509_461)
                * r
                + 1971.590_950_306_551_3)
                * r
                + 133.141_667_891_784_38)
                * r
                + 3.387_132_872_796_366_5)
            / (((((((5226.495_278_852_545 * r + 28729.085_735_721_943) * r
                + 39307.895_800_092_71)
                * r
                + 21213.794_301_586_597)
                * r
                + 5394.196_021_424_751)
                * r
                + 687.187_007_492_057_9)
                * r
                + 42.313_330_701_600_91)
                * r
                + 1.0);
    }
    let mut r = if q < 0.0 { p } else { 1.0 - p };
    r = (-r.ln()).sqrt();
    let val = if r <= 5.0 {
        r -= 1.6;
        (((((((7.745_450_142_783_414e-4 * r + 0.022_723_844_989_269_184) * r
            + 0.241_780_725_177_450_6)
            * r
            + 1.270_458_252_452_368_4)
            * r
            + 3.647_848_324_763_204_5)
            * r
            + 5.769_497_221_460_691)
            * r
            + 4.630_337_846_156_546)
            * r
            + 1.423_437_110_749_683_5)
            / (((((((1.050_750_071_644_416_9e-9 * r + 5.475_938_084_995_345e-4) * r
                + 0.015_198_666_563_616_457)
                * r
                + 0.148_103_976_427_480_07)
                * r
                + 0.689_767_334_985_1)
                * r
                + 1.676_384_830_183_803_8)
                * r
                + 2.053_191_626_637_759)
                * r
                + 1.0)
    } else {
        r -= 5.0;
        (((((((2.010_334_399_292_288_1e-7 * r + 2.711_555_568_743_487_6e-5) * r
            + 0.001_242_660_947_388_078_4)
            * r
            + 0.026_532_189_526_576_124)
            * r
            + 0.296_560_571_828_504_9)
            * r
            + 1.784_826_539_917_291_3)
            * r
            + 5.463_784_911_164_114)
            * r
            + 6.657_904_643_501_103)
            / (((((((2.044_263_103_389_939_7e-15 * r + 1.421_511_758_316_446e-7) * r
                + 1.846_318_317_510_054_8e-5)
                * r
                + 7.868_691_311_456_133e-4)
                * r
                + 0.014_875_361_290_850_615)
                * r
                + 0.136_929_880_922_735_8)
                * r
                + 0.599_832_206_555_888)
                * r
                + 1.0)
    };
    if q < 0.0 { -val } else { val }
}

/// The z multiplier of a two-sided interval at `confidence` (1.96 at 0.95).
pub fn z_for_confidence(confidence: f64) -> f64 {
    normal_quantile(0.5 + confidence / 2.0)
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
