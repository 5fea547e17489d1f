//! The fast Walsh-Hadamard transform.

/// In place, unnormalised: `x -> H x` with H the Sylvester-Hadamard matrix
/// of order `x.len()` (a power of two). H is symmetric and `H H = d I`, so
/// `H / sqrt(d)` is its own inverse.
pub(crate) fn fwht(x: &mut [f64]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for block in x.chunks_exact_mut(2 * h) {
            let (a, b) = block.split_at_mut(h);
            for (u, v) in a.iter_mut().zip(b.iter_mut()) {
                let (s, d) = (*u + *v, *u - *v);
                *u = s;
                *v = d;
            }
        }
        h *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_matrix_and_inverts() {
        let x = [1.0, -2.0, 0.5, 3.0, 0.0, 1.0, 4.0, -1.0];
        let mut y = x;
        fwht(&mut y);
        // H[i][j] = (-1)^popcount(i & j).
        for (i, yi) in y.iter().enumerate() {
            let direct: f64 = x
                .iter()
                .enumerate()
                .map(|(j, xj)| {
                    if (i & j).count_ones() % 2 == 0 {
                        *xj
                    } else {
                        -xj
                    }
                })
                .sum();
            assert!((yi - direct).abs() < 1e-12);
        }
        fwht(&mut y);
        for (a, b) in y.iter().zip(&x) {
            assert!((a / 8.0 - b).abs() < 1e-12);
        }
    }
}
