//! Train/test splits that scikit-learn reproduces exactly.
//!
//! [`train_test_split`] is scikit-learn's `train_test_split(range(n),
//! train_size=f, test_size=1-f, random_state=seed, shuffle=True,
//! stratify=labels)` when both classes have more than two rows (FLamby's
//! rule), and the unstratified `ShuffleSplit` otherwise. [`NumpyRandomState`]
//! is numpy's legacy MT19937 `RandomState`, as far as those splitters use
//! it. A node splits its own rows with it, so a federated job and a pooled
//! Python baseline see the same test rows.

/// numpy's legacy `RandomState` (MT19937, `init_genrand` seeding), as far
/// as scikit-learn's splitters use it.
pub struct NumpyRandomState {
    mt: [u32; 624],
    index: usize,
}

impl NumpyRandomState {
    pub fn new(seed: u32) -> Self {
        let mut mt = [0u32; 624];
        mt[0] = seed;
        for i in 1..624 {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        NumpyRandomState { mt, index: 624 }
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for i in 0..624 {
                let y = (self.mt[i] & 0x8000_0000) | (self.mt[(i + 1) % 624] & 0x7fff_ffff);
                let mut v = self.mt[(i + 397) % 624] ^ (y >> 1);
                if y & 1 != 0 {
                    v ^= 0x9908_b0df;
                }
                self.mt[i] = v;
            }
            self.index = 0;
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// numpy's legacy `random_interval(max)`: uniform in `0..=max` by
    /// masked rejection.
    fn interval(&mut self, max: u32) -> u32 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        for shift in [1, 2, 4, 8, 16] {
            mask |= mask >> shift;
        }
        loop {
            let v = self.next_u32() & mask;
            if v <= max {
                return v;
            }
        }
    }

    /// `RandomState.permutation(n)`: Fisher-Yates from the end.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut a: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.interval(i as u32) as usize;
            a.swap(i, j);
        }
        a
    }
}

/// scikit-learn's `_approximate_mode(class_counts, n_draws, rng)`.
fn approximate_mode(counts: &[usize], n_draws: usize, rng: &mut NumpyRandomState) -> Vec<usize> {
    let total: usize = counts.iter().sum();
    let continuous: Vec<f64> = counts
        .iter()
        .map(|&c| c as f64 / total as f64 * n_draws as f64)
        .collect();
    let mut floored: Vec<usize> = continuous.iter().map(|c| c.floor() as usize).collect();
    let mut need = n_draws - floored.iter().sum::<usize>();
    if need > 0 {
        let remainder: Vec<f64> = continuous.iter().map(|c| c - c.floor()).collect();
        let mut values = remainder.clone();
        values.sort_by(|a, b| b.total_cmp(a));
        values.dedup();
        for value in values {
            let inds: Vec<usize> = (0..counts.len())
                .filter(|&i| remainder[i] == value)
                .collect();
            let take = inds.len().min(need);
            // rng.choice(inds, take, replace=False) = permutation(len)[:take]
            let perm = rng.permutation(inds.len());
            for &p in &perm[..take] {
                floored[inds[p]] += 1;
            }
            need -= take;
            if need == 0 {
                break;
            }
        }
    }
    floored
}

/// scikit-learn's `train_test_split(range(n), train_size, test_size = 1 -
/// train_size, random_state, shuffle=True, stratify=labels-or-None)` with
/// FLamby's rule for stratifying. Returns (train, test) row indices.
pub fn train_test_split(
    labels: &[f32],
    train_fraction: f64,
    seed: u32,
) -> (Vec<usize>, Vec<usize>) {
    let n = labels.len();
    let n_test = ((1.0 - train_fraction) * n as f64).ceil() as usize;
    let n_train = (train_fraction * n as f64).floor() as usize;
    let mut rng = NumpyRandomState::new(seed);
    let class_rows: Vec<Vec<usize>> = [0.0, 1.0]
        .iter()
        .map(|&c| (0..n).filter(|&i| labels[i] == c).collect())
        .collect();
    let stratify = class_rows.iter().all(|rows| rows.len() > 2);
    if !stratify {
        // ShuffleSplit: test first, then train.
        let perm = rng.permutation(n);
        let test = perm[..n_test].to_vec();
        let train = perm[n_test..n_test + n_train].to_vec();
        return (train, test);
    }
    let counts: Vec<usize> = class_rows.iter().map(Vec::len).collect();
    let n_i = approximate_mode(&counts, n_train, &mut rng);
    let remaining: Vec<usize> = counts.iter().zip(&n_i).map(|(c, t)| c - t).collect();
    let t_i = approximate_mode(&remaining, n_test, &mut rng);
    let mut train = Vec::new();
    let mut test = Vec::new();
    for (k, rows) in class_rows.iter().enumerate() {
        let perm = rng.permutation(rows.len());
        let shuffled: Vec<usize> = perm.iter().map(|&p| rows[p]).collect();
        train.extend_from_slice(&shuffled[..n_i[k]]);
        test.extend_from_slice(&shuffled[n_i[k]..n_i[k] + t_i[k]]);
    }
    // scikit-learn permutes both lists once more; membership is unchanged.
    (train, test)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_random_state_matches_numpy() {
        // python -c "import numpy as np; r = np.random.RandomState(43);
        //            print(r.permutation(10), r.permutation(7))"
        let mut rng = NumpyRandomState::new(43);
        assert_eq!(rng.permutation(10), vec![3, 9, 6, 8, 2, 5, 1, 7, 0, 4]);
        assert_eq!(rng.permutation(7), vec![4, 1, 5, 6, 0, 2, 3]);
    }

    #[test]
    fn splits_partition_the_rows_in_the_requested_sizes() {
        let labels: Vec<f32> = (0..100).map(|i| f32::from(u8::from(i % 3 == 0))).collect();
        let (train, test) = train_test_split(&labels, 0.66, 7);
        assert_eq!((train.len(), test.len()), (66, 34));
        let mut all: Vec<usize> = train.iter().chain(&test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        // One class with two rows: unstratified, still a partition.
        let mut few = vec![0.0f32; 20];
        few[3] = 1.0;
        let (train, test) = train_test_split(&few, 0.5, 1);
        assert_eq!(train.len() + test.len(), 20);
    }
}
