//! Shamir secret sharing over the prime field of curve25519's scalars
//! (order 2^252 + 27742317777372353535851937790883648493). The share of the
//! holder with id `h` is the polynomial's value at `x = h + 1`.

use curve25519_dalek::Scalar;
use rand_core::CryptoRng;

fn x_of(holder: u32) -> Scalar {
    Scalar::from(u64::from(holder) + 1)
}

/// Splits `secret` into one share per holder (same order as `holders`); any
/// `threshold` of them rebuild it, fewer reveal nothing about it.
pub(crate) fn split<R: CryptoRng + ?Sized>(
    secret: &Scalar,
    threshold: usize,
    holders: &[u32],
    rng: &mut R,
) -> Vec<Scalar> {
    debug_assert!(threshold >= 1 && threshold <= holders.len());
    let mut coefficients = Vec::with_capacity(threshold);
    coefficients.push(*secret);
    coefficients.extend((1..threshold).map(|_| Scalar::random(rng)));
    let shares = holders
        .iter()
        .map(|&h| {
            let x = x_of(h);
            coefficients
                .iter()
                .rev()
                .fold(Scalar::ZERO, |acc, c| acc * x + c)
        })
        .collect();
    zeroize::Zeroize::zeroize(&mut coefficients);
    shares
}

/// The Lagrange coefficients at zero for the holders `xs` (distinct ids).
pub(crate) fn lagrange_at_zero(holders: &[u32]) -> Vec<Scalar> {
    let xs: Vec<Scalar> = holders.iter().map(|&h| x_of(h)).collect();
    // lambda_i = prod_j x_j / (x_i * prod_{j != i} (x_j - x_i)): one batch inversion.
    let mut denominators: Vec<Scalar> = xs
        .iter()
        .enumerate()
        .map(|(i, xi)| {
            xs.iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .fold(*xi, |acc, (_, xj)| acc * (xj - xi))
        })
        .collect();
    Scalar::invert_batch_alloc(&mut denominators);
    let product: Scalar = xs.iter().product();
    denominators.iter().map(|inv| product * inv).collect()
}

/// Rebuilds a secret from shares `(holder, value)` with distinct holders,
/// using the given Lagrange coefficients for exactly those holders.
pub(crate) fn combine(shares: &[(u32, Scalar)], coefficients: &[Scalar]) -> Scalar {
    shares
        .iter()
        .zip(coefficients)
        .map(|((_, v), l)| v * l)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn any_threshold_subset_rebuilds() {
        let mut rng = ChaCha20Rng::from_seed([5; 32]);
        let secret = Scalar::random(&mut rng);
        let holders = [0u32, 3, 4, 9, 17];
        let shares = split(&secret, 3, &holders, &mut rng);
        let pairs: Vec<(u32, Scalar)> = holders.iter().copied().zip(shares).collect();
        for subset in [[0, 1, 2], [1, 3, 4], [4, 2, 0]] {
            let picked: Vec<(u32, Scalar)> = subset.iter().map(|&i| pairs[i]).collect();
            let ids: Vec<u32> = picked.iter().map(|p| p.0).collect();
            assert_eq!(combine(&picked, &lagrange_at_zero(&ids)), secret);
        }
        // Two shares are not enough.
        let ids = [pairs[0].0, pairs[1].0];
        assert_ne!(combine(&pairs[..2], &lagrange_at_zero(&ids)), secret);
    }
}
