//! Integration tests of confer-models.
//!
//! mod list:
//! * `flamby` — FLamby's Fed-Heart-Disease benchmark (data loading, the
//!   exact scikit-learn split, the training loops), shared with
//!   `examples/flamby_heart.rs`.
//!
//! The tests here check the split against FLamby's published sizes and
//! numpy's generator, and that federated training reaches FLamby's
//! reported accuracy on two seeds (the example prints the five-seed table).

mod flamby;

use flamby::{Benchmark, Method, Normalisation, labels, load_centres, mean_sd, run, split_sizes};

#[test]
fn split_matches_flamby() {
    let centres = load_centres();
    // FLamby's README: train/test 199/104, 172/89, 30/16, 85/45.
    assert_eq!(
        split_sizes(&centres),
        vec![(199, 104), (172, 89), (30, 16), (85, 45)]
    );
    let bench = Benchmark::new(&centres, Normalisation::Flamby);
    assert_eq!(bench.pooled_train.len(), 486);
    // Stratified centres keep their label balance in both halves.
    for (k, c) in centres.iter().enumerate().filter(|&(k, _)| k != 2) {
        let rate = |y: &[f32]| y.iter().sum::<f32>() / y.len() as f32;
        let all = rate(&c.labels);
        assert!(
            (rate(labels(&bench.train[k])) - all).abs() < 0.01,
            "{}",
            c.name
        );
        assert!(
            (rate(labels(&bench.test[k])) - all).abs() < 0.01,
            "{}",
            c.name
        );
    }
}

#[test]
fn federated_training_reaches_flamby_accuracy() {
    let centres = load_centres();
    let bench = Benchmark::new(&centres, Normalisation::PooledTrain);
    let mean_over = |method: Method| {
        let per_seed: Vec<f64> = [42u64, 43]
            .iter()
            .map(|&seed| {
                let acc = run(&bench, method, seed);
                acc.iter().sum::<f64>() / acc.len() as f64
            })
            .collect();
        mean_sd(&per_seed).0
    };
    let fed_adam = mean_over(Method::FedAdam);
    let fed_avg = mean_over(Method::FedAvg);
    eprintln!("FedAdam {fed_adam:.3}, FedAvg {fed_avg:.3}");
    assert!(
        fed_adam >= 0.70,
        "FedAdam mean per-centre accuracy {fed_adam:.3}"
    );
    assert!(
        fed_avg >= 0.68,
        "FedAvg mean per-centre accuracy {fed_avg:.3}"
    );
}
