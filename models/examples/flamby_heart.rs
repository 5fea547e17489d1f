//! FLamby Fed-Heart-Disease on confer-models: pooled training and five
//! federated strategies, mean per-centre test accuracy over five seeds,
//! for FLamby's per-centre standardisation and for pooled standardisation.
//!
//! ```sh
//! cargo run -p confer-models --release --example flamby_heart
//! ```
//!
//! The setup (data, split, features, hyperparameters) is documented in
//! `tests/flamby/mod.rs`. FLamby's paper reports about 0.735 pooled, 0.685
//! FedAvg and 0.726 FedAdam.

#[path = "../tests/flamby/mod.rs"]
mod flamby;

use flamby::{Benchmark, CENTRES, Method, Normalisation, load_centres, mean_sd, run, split_sizes};

const SEEDS: [u64; 5] = [42, 43, 44, 45, 46];

fn main() {
    let centres = load_centres();
    let sizes = split_sizes(&centres);
    println!(
        "Fed-Heart-Disease (FLamby setup), data from {}",
        flamby::data_dir().display()
    );
    for (name, (train, test)) in CENTRES.iter().zip(&sizes) {
        println!("  {name:<12} train {train:>3}  test {test:>3}");
    }
    println!(
        "  logistic regression, batch 4; pooled: Adam lr 1e-3, 50 epochs; federated: {} rounds x 100 local SGD steps",
        flamby::federated_rounds()
    );
    for normalisation in [Normalisation::Flamby, Normalisation::PooledTrain] {
        let bench = Benchmark::new(&centres, normalisation);
        println!();
        println!(
            "Standardisation: {}",
            match normalisation {
                Normalisation::Flamby => "per-centre training statistics (FLamby)",
                Normalisation::PooledTrain =>
                    "pooled training statistics (confer: federated DP estimate, here exact)",
            }
        );
        println!(
            "| method     | mean acc | sd     | {} | seconds/seed |",
            CENTRES.map(|c| format!("{c:>11}")).join(" | ")
        );
        println!(
            "|------------|----------|--------|{}--------------|",
            "-------------|".repeat(4)
        );
        for method in Method::ALL {
            let start = std::time::Instant::now();
            let per_seed: Vec<Vec<f64>> = SEEDS.iter().map(|&s| run(&bench, method, s)).collect();
            let secs = start.elapsed().as_secs_f64() / SEEDS.len() as f64;
            let means: Vec<f64> = per_seed
                .iter()
                .map(|a| a.iter().sum::<f64>() / a.len() as f64)
                .collect();
            let (m, sd) = mean_sd(&means);
            let per_centre: Vec<String> = (0..CENTRES.len())
                .map(|k| {
                    let (cm, _) = mean_sd(&per_seed.iter().map(|a| a[k]).collect::<Vec<_>>());
                    format!("{cm:>11.3}")
                })
                .collect();
            println!(
                "| {:<10} | {m:>8.3} | {sd:>6.3} | {} | {secs:>12.2} |",
                method.name(),
                per_centre.join(" | ")
            );
        }
    }
}
