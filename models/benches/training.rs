//! Training and aggregation throughput: a bench binary (not a test).
//!
//! ```sh
//! cargo bench -p confer-models --bench training
//! ```
//!
//! Prints seconds per local round for an MLP of about a million parameters
//! (256 -> 1024 -> 768 -> 1, 1,051,137 parameters) on synthetic data of a
//! hospital-sized cohort, on CPU (and on CUDA when present), and the time of
//! one server step per strategy on a flat vector of that size.

use std::time::{Duration, Instant};

use confer_models::{
    Budget, Dataset, Device, LocalConfig, LocalOptimizer, Model, ModelSpec, ServerOptimizer,
    ServerStrategy, evaluate, train_local,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const INPUTS: usize = 256;
const HIDDEN: [usize; 2] = [1024, 768];
/// Rows at one node: a mid-sized hospital's cohort for one study.
const ROWS: usize = 5_000;
const BATCH: usize = 64;

fn synthetic(rows: usize, seed: u64) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let direction: Vec<f32> = (0..INPUTS).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut x = Vec::with_capacity(rows * INPUTS);
    let mut y = Vec::with_capacity(rows);
    for _ in 0..rows {
        let row: Vec<f32> = (0..INPUTS).map(|_| rng.random_range(-1.0..1.0)).collect();
        let score: f32 = row.iter().zip(&direction).map(|(a, b)| a * b).sum();
        y.push(if score + rng.random_range(-2.0..2.0) > 0.0 {
            1.0
        } else {
            0.0
        });
        x.extend(row);
    }
    Dataset::binary(x, INPUTS, y).expect("synthetic data")
}

/// Median of `reps` timings of `f`.
fn median(reps: usize, mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort();
    times[reps / 2]
}

fn main() {
    let spec = ModelSpec::mlp(INPUTS, HIDDEN);
    let n_params = spec.num_parameters();
    let data = synthetic(ROWS, 1);
    let steps = ROWS.div_ceil(BATCH);
    println!("confer-models training bench");
    println!(
        "  MLP {INPUTS} -> {HIDDEN:?} -> 1 (ReLU), {n_params} parameters; {ROWS} rows at the node, batch {BATCH}"
    );
    println!("  libtorch threads: {}", tch::get_num_threads());
    println!();
    println!(
        "| device | optimiser           | round          | steps | seconds/round | ms/step | rows/s  |"
    );
    println!(
        "|--------|---------------------|----------------|-------|---------------|---------|---------|"
    );
    let mut devices = vec![Device::Cpu];
    if tch::Cuda::is_available() {
        devices.push(Device::Cuda(0));
    }
    for device in devices {
        for (name, optimizer, mu) in [
            (
                "SGD momentum 0.9",
                LocalOptimizer::Sgd { momentum: 0.9 },
                0.0,
            ),
            ("Adam", LocalOptimizer::adam(), 0.0),
            ("SGD + FedProx 0.01", LocalOptimizer::sgd(), 0.01),
        ] {
            let mut model = Model::with_device(&spec, 0, device).expect("model");
            let global = model.parameters().expect("parameters");
            let cfg = LocalConfig {
                budget: Budget::Epochs(1),
                batch_size: BATCH,
                learning_rate: 0.01,
                optimizer,
                proximal_mu: mu,
                seed: 3,
            };
            // Warm-up (allocator, kernels), then the median of 3 rounds,
            // each from the same global parameters as a real round would.
            model.set_parameters(&global).expect("set");
            train_local(&mut model, &data, &cfg).expect("warm-up");
            let t = median(3, || {
                model.set_parameters(&global).expect("set");
                train_local(&mut model, &data, &cfg).expect("train");
            });
            let s = t.as_secs_f64();
            println!(
                "| {:<6} | {name:<19} | 1 epoch        | {steps:>5} | {s:>13.3} | {:>7.2} | {:>7.0} |",
                format!("{device:?}").to_lowercase().replace("(0)", ""),
                1e3 * s / steps as f64,
                ROWS as f64 / s
            );
        }
    }

    println!();
    let mut model = Model::with_device(&spec, 0, Device::Cpu).expect("model");
    let params = model.parameters().expect("parameters");
    let get = median(11, || {
        model.parameters().expect("parameters");
    });
    let set = median(11, || model.set_parameters(&params).expect("set"));
    let eval = median(3, || {
        evaluate(&model, &data).expect("evaluate");
    });
    println!("| operation (CPU)                    | ms     |");
    println!("|------------------------------------|--------|");
    let rows = [
        ("Model::parameters".to_string(), get),
        ("Model::set_parameters".to_string(), set),
        (format!("evaluate ({ROWS} rows)"), eval),
    ];
    for (name, t) in rows {
        println!("| {name:<34} | {:>6.2} |", ms(t));
    }

    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let sum: Vec<f64> = (0..n_params).map(|_| rng.random_range(-1.0..1.0)).collect();
    println!();
    println!("| server step (CPU)                  | ms     | checkpoint (JSON) MB |");
    println!("|------------------------------------|--------|----------------------|");
    for strategy in [
        ServerStrategy::fed_avg(),
        ServerStrategy::fed_adagrad(0.01),
        ServerStrategy::fed_adam(0.01),
        ServerStrategy::fed_yogi(0.01),
    ] {
        let mut global = params.clone();
        let mut opt = ServerOptimizer::new(strategy, n_params).expect("optimiser");
        let t = median(11, || opt.step(&mut global, &sum, 4.0e4).expect("step"));
        let bytes = serde_json::to_vec(&opt).expect("checkpoint").len();
        println!(
            "| {:<34} | {:>6.2} | {:>20.1} |",
            strategy.name(),
            ms(t),
            bytes as f64 / 1e6
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
