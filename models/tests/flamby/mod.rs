//! FLamby's Fed-Heart-Disease benchmark (owkin/FLamby,
//! `flamby/datasets/fed_heart_disease`), rebuilt on confer-models.
//!
//! Shared by the integration test `tests/flamby_heart.rs` and the example
//! `examples/flamby_heart.rs`. The four UCI files are read in place from
//! `../shared/data/uci_heart_disease` (never copied into the repository).
//!
//! What FLamby does, and what this module reproduces:
//! * Per centre (cleveland, hungarian, switzerland, va): read the processed
//!   file, drop columns 10-12 (slope, ca, thal), drop every row with a `?`
//!   left (303, 261, 46 and 130 rows remain: 740).
//! * Label: `num > 0`.
//! * Split each centre with scikit-learn's `train_test_split(train_size=0.66,
//!   test_size=0.34, random_state=43, shuffle=True)`, stratified by label
//!   when both classes have more than two rows (all but Switzerland, which
//!   has one negative). Train/test: 199/104, 172/89, 30/16, 85/45. The split
//!   is reproduced exactly by `confer_models::split`: numpy's legacy MT19937
//!   `RandomState` and scikit-learn's `train_test_split`, following scikit-learn's
//!   `StratifiedShuffleSplit` / `ShuffleSplit` draw order.
//! * Features: the ten remaining columns with `cp` (column 2) and `restecg`
//!   (column 6) one-hot encoded dropping the first level (pandas
//!   `get_dummies(drop_first=True)`, dummies after the other columns): 13.
//! * Standardisation: `(x - mean) / (std + 1e-9)` with the unbiased std of
//!   the *training* rows. FLamby uses each centre's own training statistics
//!   for that centre's train and test rows, and the pooled training
//!   statistics for pooled training (whose per-centre test sets keep their
//!   centre's statistics). [`Normalisation::PooledTrain`] instead uses the
//!   pooled training statistics everywhere: in confer these come from a DP
//!   federated estimate of means and variances, which at a large epsilon
//!   equals the pooled value; in this in-process benchmark we use the
//!   pooled value directly.
//! * Model: logistic regression (13 -> 1), BCE loss, batch size 4.
//! * Pooled training: Adam, lr 0.001, 50 epochs.
//! * Federated: 4 clients, `num_updates = 100` local SGD steps per round,
//!   `(486 // 4 // 4) * 50 // 100 = 15` rounds, updates weighted by training
//!   set size; hyperparameters from FLamby's `config_heart_disease.json`
//!   (FedAvg lr 0.001; FedProx lr 0.001, mu 0.01; FedAdam local lr 0.01,
//!   server lr 0.01, betas 0.9/0.999, tau 1e-8; FedYogi local lr 0.003162,
//!   server lr 0.01; FedAdagrad local lr 0.003162, server lr 0.316228).
//! * Metric: accuracy at 0.5 on each centre's test set; the benchmark
//!   reports their unweighted mean.

#![allow(dead_code)] // the test and the example use different parts

use std::path::PathBuf;

use confer_models::split::train_test_split;
use confer_models::{
    Budget, Dataset, Device, LocalConfig, LocalOptimizer, Model, ModelSpec, ServerOptimizer,
    ServerStrategy, Targets, accuracy, evaluate, train_local,
};

/// Centre names in FLamby's numbering.
pub const CENTRES: [&str; 4] = ["cleveland", "hungarian", "switzerland", "va"];
/// Features after encoding.
pub const FEATURES: usize = 13;
const BATCH_SIZE: usize = 4;
const POOLED_EPOCHS: u32 = 50;
const POOLED_LR: f64 = 0.001;
const NUM_UPDATES: u32 = 100;
const TRAIN_FRACTION: f64 = 0.66;
const SPLIT_SEED: u32 = 43;

/// The data directory, relative to this crate.
pub fn data_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/uci_heart_disease"
    ))
}

/// Where standardisation statistics come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalisation {
    /// FLamby: each centre's own training statistics (pooled training:
    /// pooled training statistics for training, the centre's for its test).
    Flamby,
    /// Pooled training statistics for every centre and method (confer's
    /// federated DP estimate at large epsilon).
    PooledTrain,
}

/// One centre's raw (encoded, unstandardised) rows and split.
#[derive(Debug, Clone)]
pub struct Centre {
    pub name: &'static str,
    /// Row-major, `FEATURES` wide.
    pub features: Vec<f32>,
    pub labels: Vec<f32>,
    /// Whether each row is in the test split.
    pub is_test: Vec<bool>,
}

impl Centre {
    fn rows(&self, test: bool) -> (Vec<f32>, Vec<f32>) {
        let mut x = Vec::new();
        let mut y = Vec::new();
        for (i, &t) in self.is_test.iter().enumerate() {
            if t == test {
                x.extend_from_slice(&self.features[i * FEATURES..(i + 1) * FEATURES]);
                y.push(self.labels[i]);
            }
        }
        (x, y)
    }
}

/// Reads and encodes the four centres, with FLamby's split.
pub fn load_centres() -> Vec<Centre> {
    CENTRES
        .iter()
        .map(|&name| {
            let path = data_dir().join(format!("processed.{name}.data"));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let mut features = Vec::new();
            let mut labels = Vec::new();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let fields: Vec<&str> = line.trim().split(',').collect();
                assert_eq!(fields.len(), 14, "{}: {line}", path.display());
                let kept: Vec<usize> = (0..10).chain([13]).collect();
                if kept.iter().any(|&i| fields[i].trim() == "?") {
                    continue;
                }
                let v = |i: usize| -> f32 {
                    fields[i]
                        .trim()
                        .parse()
                        .unwrap_or_else(|e| panic!("{}: {line}: {e}", path.display()))
                };
                // Numeric columns in order, then cp dummies (2, 3, 4), then
                // restecg dummies (1, 2): pandas get_dummies, drop_first.
                for i in [0, 1, 3, 4, 5, 7, 8, 9] {
                    features.push(v(i));
                }
                let cp = v(2);
                for level in [2.0, 3.0, 4.0] {
                    features.push(f32::from(u8::from(cp == level)));
                }
                let restecg = v(6);
                for level in [1.0, 2.0] {
                    features.push(f32::from(u8::from(restecg == level)));
                }
                labels.push(if v(13) > 0.0 { 1.0 } else { 0.0 });
            }
            let n = labels.len();
            let (_, test) = train_test_split(&labels, TRAIN_FRACTION, SPLIT_SEED);
            let mut is_test = vec![false; n];
            for i in test {
                is_test[i] = true;
            }
            Centre {
                name,
                features,
                labels,
                is_test,
            }
        })
        .collect()
}

/// Mean and unbiased standard deviation per feature over `x` (row-major).
fn stats(x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let n = x.len() / FEATURES;
    let mut mean = vec![0.0; FEATURES];
    for row in x.chunks(FEATURES) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += f64::from(v) / n as f64;
        }
    }
    let mut var = vec![0.0; FEATURES];
    for row in x.chunks(FEATURES) {
        for ((s, &v), m) in var.iter_mut().zip(row).zip(&mean) {
            *s += (f64::from(v) - m).powi(2) / (n as f64 - 1.0);
        }
    }
    (mean, var.into_iter().map(f64::sqrt).collect())
}

fn standardise(x: &[f32], (mean, std): &(Vec<f64>, Vec<f64>)) -> Vec<f32> {
    x.chunks(FEATURES)
        .flat_map(|row| {
            row.iter()
                .zip(mean)
                .zip(std)
                .map(|((&v, m), s)| ((f64::from(v) - m) / (s + 1e-9)) as f32)
        })
        .collect()
}

/// Standardised datasets for one normalisation mode.
pub struct Benchmark {
    /// Per-centre training sets (federated clients).
    pub train: Vec<Dataset>,
    /// Per-centre test sets.
    pub test: Vec<Dataset>,
    /// Pooled training set for pooled training.
    pub pooled_train: Dataset,
    /// Per-centre test sets as pooled training sees them.
    pub pooled_test: Vec<Dataset>,
}

impl Benchmark {
    pub fn new(centres: &[Centre], normalisation: Normalisation) -> Self {
        let all_train: Vec<f32> = centres.iter().flat_map(|c| c.rows(false).0).collect();
        let pooled_stats = stats(&all_train);
        let mut train = Vec::new();
        let mut test = Vec::new();
        let mut pooled_x = Vec::new();
        let mut pooled_y = Vec::new();
        for c in centres {
            let (xtr, ytr) = c.rows(false);
            let (xte, yte) = c.rows(true);
            let centre_stats = match normalisation {
                Normalisation::Flamby => stats(&xtr),
                Normalisation::PooledTrain => pooled_stats.clone(),
            };
            pooled_x.extend(standardise(&xtr, &pooled_stats));
            pooled_y.extend(&ytr);
            train.push(Dataset::binary(standardise(&xtr, &centre_stats), FEATURES, ytr).unwrap());
            test.push(Dataset::binary(standardise(&xte, &centre_stats), FEATURES, yte).unwrap());
        }
        Benchmark {
            // FLamby evaluates pooled training on the per-centre test sets.
            pooled_test: test.clone(),
            train,
            test,
            pooled_train: Dataset::binary(pooled_x, FEATURES, pooled_y).unwrap(),
        }
    }
}

/// The training methods compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Pooled,
    FedAvg,
    FedProx,
    FedAdam,
    FedYogi,
    FedAdagrad,
}

impl Method {
    pub const ALL: [Method; 6] = [
        Method::Pooled,
        Method::FedAvg,
        Method::FedProx,
        Method::FedAdam,
        Method::FedYogi,
        Method::FedAdagrad,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Pooled => "Pooled",
            Method::FedAvg => "FedAvg",
            Method::FedProx => "FedProx",
            Method::FedAdam => "FedAdam",
            Method::FedYogi => "FedYogi",
            Method::FedAdagrad => "FedAdagrad",
        }
    }

    /// Local learning rate, FedProx mu and server strategy (FLamby's config).
    fn federated(self) -> (f64, f64, ServerStrategy) {
        let adaptive =
            |lr: f64, eta: f64, s: fn(f64, f64) -> ServerStrategy| (lr, 0.0, s(eta, 1e-8));
        match self {
            Method::Pooled => unreachable!("pooled training is not federated"),
            Method::FedAvg => (0.001, 0.0, ServerStrategy::fed_avg()),
            Method::FedProx => (0.001, 0.01, ServerStrategy::fed_avg()),
            Method::FedAdam => adaptive(0.01, 0.01, |eta, tau| ServerStrategy::FedAdam {
                server_learning_rate: eta,
                beta1: 0.9,
                beta2: 0.999,
                tau,
            }),
            Method::FedYogi => adaptive(0.003162, 0.01, |eta, tau| ServerStrategy::FedYogi {
                server_learning_rate: eta,
                beta1: 0.9,
                beta2: 0.999,
                tau,
            }),
            Method::FedAdagrad => {
                adaptive(0.003162, 0.316228, |eta, tau| ServerStrategy::FedAdagrad {
                    server_learning_rate: eta,
                    beta1: 0.9,
                    tau,
                })
            }
        }
    }
}

/// Rounds of federated training: FLamby's `get_nb_max_rounds(100)`.
pub fn federated_rounds() -> u32 {
    (486 / 4 / BATCH_SIZE as u32) * POOLED_EPOCHS / NUM_UPDATES
}

/// Trains with `method` from the initial model of `seed`; returns the
/// accuracy on each centre's test set.
pub fn run(bench: &Benchmark, method: Method, seed: u64) -> Vec<f64> {
    let spec = ModelSpec::logistic_regression(FEATURES);
    let mut model = Model::with_device(&spec, seed, Device::Cpu).unwrap();
    let tests = if method == Method::Pooled {
        let cfg = LocalConfig {
            budget: Budget::Epochs(POOLED_EPOCHS),
            batch_size: BATCH_SIZE,
            learning_rate: POOLED_LR,
            optimizer: LocalOptimizer::adam(),
            proximal_mu: 0.0,
            seed,
        };
        train_local(&mut model, &bench.pooled_train, &cfg).unwrap();
        &bench.pooled_test
    } else {
        let (lr, mu, strategy) = method.federated();
        let mut global = model.parameters().unwrap();
        let mut server = ServerOptimizer::new(strategy, global.len()).unwrap();
        for round in 0..federated_rounds() {
            let mut sum = vec![0.0f64; global.len()];
            let mut weight = 0.0;
            for (k, data) in bench.train.iter().enumerate() {
                model.set_parameters(&global).unwrap();
                let cfg = LocalConfig {
                    budget: Budget::Steps(NUM_UPDATES),
                    batch_size: BATCH_SIZE,
                    learning_rate: lr,
                    optimizer: LocalOptimizer::sgd(),
                    proximal_mu: mu,
                    seed: seed * 1_000_003 + u64::from(round) * 17 + k as u64,
                };
                let result = train_local(&mut model, data, &cfg).unwrap();
                let w = result.num_examples as f64;
                for (s, u) in sum.iter_mut().zip(result.weighted_update(w)) {
                    *s += u;
                }
                weight += w;
            }
            server.step(&mut global, &sum, weight).unwrap();
        }
        model.set_parameters(&global).unwrap();
        &bench.test
    };
    tests
        .iter()
        .map(|d| accuracy(&evaluate(&model, d).unwrap()).unwrap())
        .collect()
}

/// Row counts (train, test) per centre.
pub fn split_sizes(centres: &[Centre]) -> Vec<(usize, usize)> {
    centres
        .iter()
        .map(|c| {
            let test = c.is_test.iter().filter(|&&t| t).count();
            (c.is_test.len() - test, test)
        })
        .collect()
}

/// Labels of a dataset (for checks).
pub fn labels(d: &Dataset) -> &[f32] {
    match d.targets() {
        Targets::Binary(y) => y,
        Targets::Survival { .. } => unreachable!("binary benchmark"),
    }
}

/// Mean and (population) standard deviation, as numpy's defaults.
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64;
    (m, var.sqrt())
}
