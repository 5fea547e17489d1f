//! Federated training benchmarks, through a real coordinator and four
//! in-process nodes over the UCI heart-disease centres. Prints two
//! markdown tables:
//!
//! 1. **Validation** (FLamby's Fed-Heart-Disease): mean per-centre test
//!    accuracy over `--seeds` seeds of pooled training (in process, the
//!    reference), FedAvg and FedAdam without DP, and with DP training at
//!    epsilon 5 and 1 (delta 1e-5), clipping node updates (DP-FedAvg) or
//!    each person's gradient (DP-SGD across the federation). Accuracy is
//!    computed exactly from the exported model on each centre's held-out rows.
//! 2. **Time per round** of an MLP with about 1M parameters across the four
//!    nodes: local training (until every node has trained and advertised
//!    its keys), secure aggregation (the other rounds) and the coordinator
//!    (decode, server step, checkpoint), without and with DP.
//!
//! cargo bench -p confer-cli --bench training [-- --seeds 5 --only validation|timing]

use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use confer_cli::client::Client;
use confer_coordinator::service::custom;
use confer_models::job::{JobSpec, Standardisation};
use confer_models::{
    Budget, Dataset, Device, LocalConfig, LocalOptimizer, Model, Targets, accuracy, evaluate,
    train_local,
};
use confer_protocol::train::{JobRef, JobState, JobStatus, ModelExport, TrainSubmit, decode_f32};

const POLICY: &str = r#"[policy]
approval = "auto"
default_study_budget = { rho = 1e12, delta = 0.5 }
node_budget = { rho = 1e15 }
default_models = ["logistic_regression", "mlp"]

[policy.studies.bench]
budget = { rho = 1e12, delta = 0.5 }
models = ["logistic_regression", "mlp"]
allow_non_dp_training = true
"#;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

struct Net {
    nodes: Vec<confer_node::RunningNode>,
    coordinator: confer_coordinator::RunningCoordinator,
    client: Client,
}

async fn start(dir: &Path) -> anyhow::Result<Net> {
    let identity = confer_protocol::signing::Identity::generate()?;
    let public = identity.save(&dir.join("coordinator.key"))?;
    let mut nodes = Vec::new();
    for (_, path) in confer_cli::heart::write_node_configs(dir, &public, POLICY)? {
        let config = confer_node::NodeConfig::load(&path)?;
        nodes.push(confer_node::start(config, confer_node::Transport::InsecureLoopback).await?);
    }
    let (coordinator, token) =
        common::coordinator(dir, &nodes, "train_timeout_secs = 600\n").await?;
    let client = Client::connect(&format!("http://{}", coordinator.addr), Some(&token)).await?;
    Ok(Net {
        nodes,
        coordinator,
        client,
    })
}

async fn run_job(client: &mut Client, spec: &JobSpec) -> anyhow::Result<(JobStatus, ModelExport)> {
    let body = serde_json::to_vec(&TrainSubmit {
        study: "bench".into(),
        job: serde_json::to_value(spec)?,
    })?;
    let started: JobStatus =
        serde_json::from_value(client.action(custom::TRAIN_SUBMIT, body).await?)?;
    let job = serde_json::to_vec(&JobRef {
        job_id: started.job_id,
    })?;
    let status = loop {
        let s: JobStatus =
            serde_json::from_value(client.action(custom::TRAIN_STATUS, job.clone()).await?)?;
        if s.state.is_final() {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    anyhow::ensure!(
        status.state == JobState::Finished,
        "job {}: {:?}",
        status.job_id,
        status.error
    );
    let export: ModelExport =
        serde_json::from_value(client.action(custom::MODEL_EXPORT, job).await?)?;
    Ok((status, export))
}

type Centres = Vec<(String, Dataset, Dataset)>;

fn bounds(spec: &JobSpec) -> Vec<[f64; 2]> {
    spec.data
        .features
        .iter()
        .map(|f| spec.data.bounds[f])
        .collect()
}

fn standardised(d: &Dataset, s: &Standardisation, b: &[[f64; 2]]) -> Dataset {
    let Targets::Binary(y) = d.targets().clone() else {
        panic!("binary labels")
    };
    Dataset::binary(s.apply(d.features(), b).expect("standardise"), d.width(), y).expect("dataset")
}

/// Mean per-centre test accuracy of `model` with standardisation `s`.
fn mean_accuracy(
    model: &Model,
    centres: &Centres,
    s: &Standardisation,
    b: &[[f64; 2]],
) -> Vec<f64> {
    centres
        .iter()
        .map(|(_, _, test)| {
            accuracy(&evaluate(model, &standardised(test, s, b)).expect("evaluate"))
                .expect("accuracy")
        })
        .collect()
}

/// Pooled training in process (FLamby's: Adam, lr 0.001, 50 epochs, batch
/// 4) with the pooled training set's exact statistics.
fn pooled(spec: &JobSpec, centres: &Centres, seed: u64) -> Vec<f64> {
    let b = bounds(spec);
    let d = spec.data.features.len();
    let mut x = Vec::new();
    let mut y = Vec::new();
    for (_, train, _) in centres {
        x.extend_from_slice(train.features());
        if let Targets::Binary(l) = train.targets() {
            y.extend_from_slice(l);
        }
    }
    let sums = confer_models::job::moment_sums(&x, &b);
    let s = Standardisation::from_moments(&sums, &b, 0.0).expect("stats");
    let pooled = standardised(&Dataset::binary(x, d, y).expect("pooled"), &s, &b);
    let mut model = Model::with_device(&spec.model, seed, Device::Cpu).expect("model");
    let config = LocalConfig {
        budget: Budget::Epochs(50),
        batch_size: 4,
        learning_rate: 0.001,
        optimizer: LocalOptimizer::adam(),
        proximal_mu: 0.0,
        seed,
    };
    train_local(&mut model, &pooled, &config).expect("train");
    mean_accuracy(&model, centres, &s, &b)
}

fn federated_accuracy(export: &ModelExport, centres: &Centres, spec: &JobSpec) -> Vec<f64> {
    let mut model = Model::with_device(&spec.model, 0, Device::Cpu).expect("model");
    model
        .set_parameters(&decode_f32(&export.weights).expect("weights"))
        .expect("set");
    let wire = export.standardisation.as_ref().expect("standardisation");
    let s = Standardisation {
        mean: wire.mean.clone(),
        std: wire.std.clone(),
        source: String::new(),
    };
    mean_accuracy(&model, centres, &s, &bounds(spec))
}

fn stats(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let sd = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    (m, sd)
}

fn edit(base: &str, seed: u64, changes: &[(&str, &str)]) -> JobSpec {
    let mut text = base.replace("seed = 42", &format!("seed = {seed}"));
    for (from, to) in changes {
        assert!(text.contains(from), "the example job has no {from:?}");
        text = text.replace(from, to);
    }
    JobSpec::from_toml_str(&text).expect("job")
}

async fn validation(net: &mut Net, dir: &Path, seeds: u64) -> anyhow::Result<()> {
    let base = confer_cli::heart::example_job()?;
    let reference = edit(&base, 0, &[]);
    let centres = confer_cli::heart::local_datasets(&dir.join("local"), &reference).await?;
    // Large epsilon for the non-DP runs: standardisation and evaluation exact.
    let exact = ("epsilon = 2.0", "epsilon = 1e4");
    let fedadam = [
        ("learning_rate = 0.001", "learning_rate = 0.01"),
        (
            "strategy = \"fed_avg\"",
            "strategy = \"fed_adam\"\nserver_learning_rate = 0.01\nbeta2 = 0.999\ntau = 1e-8",
        ),
    ];
    let dp = |eps: &'static str| {
        [
            ("\ndp_training = false", "\ndp_training = true"),
            ("epsilon = 2.0", eps),
            ("clip_norm = 10.0", "clip_norm = 0.25"),
            ("every = 5", "every = 0"),
        ]
    };
    // DP-SGD across the federation: per-example clipping, full-batch
    // gradients, 40 rounds, FedAdam on the mean gradient.
    let dp_sgd = |eps: &'static str| {
        [
            (
                "\ndp_training = false",
                "\ndp_training = true\nclipping = \"example\"",
            ),
            ("epsilon = 2.0", eps),
            ("clip_norm = 10.0", "clip_norm = 1.0"),
            ("every = 5", "every = 0"),
            ("rounds = 15", "rounds = 40"),
            ("learning_rate = 0.001", "learning_rate = 1.0"),
            (
                "strategy = \"fed_avg\"",
                "strategy = \"fed_adam\"\nserver_learning_rate = 0.05\nbeta2 = 0.999\ntau = 1e-8",
            ),
        ]
    };
    let methods: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("FedAvg", vec![exact]),
        ("FedAdam", [&[exact][..], &fedadam].concat()),
        ("FedAvg, DP ε=5", dp("epsilon = 5.0").to_vec()),
        (
            "FedAdam, DP ε=5",
            [&dp("epsilon = 5.0")[..], &fedadam].concat(),
        ),
        ("FedAvg, DP ε=1", dp("epsilon = 1.0").to_vec()),
        (
            "FedAdam, DP ε=1",
            [&dp("epsilon = 1.0")[..], &fedadam].concat(),
        ),
        (
            "DP-SGD (per-example clipping), ε=5",
            dp_sgd("epsilon = 5.0").to_vec(),
        ),
        (
            "DP-SGD (per-example clipping), ε=1",
            dp_sgd("epsilon = 1.0").to_vec(),
        ),
    ];
    let only_methods = arg("--methods");
    let methods: Vec<_> = methods
        .into_iter()
        .filter(|(name, _)| only_methods.as_deref().is_none_or(|m| name.contains(m)))
        .collect();
    println!("\n### FLamby Fed-Heart-Disease through the federation ({seeds} seeds)\n");
    println!(
        "| method | mean per-centre accuracy | sd over seeds | cleveland | hungary | switzerland | va | seconds/job |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let row = |name: &str, per_seed: &[Vec<f64>], secs: f64| {
        let means: Vec<f64> = per_seed
            .iter()
            .map(|a| a.iter().sum::<f64>() / 4.0)
            .collect();
        let (m, sd) = stats(&means);
        let centre = |k: usize| stats(&per_seed.iter().map(|a| a[k]).collect::<Vec<_>>()).0;
        println!(
            "| {name} | {m:.3} | {sd:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {secs:.1} |",
            centre(0),
            centre(1),
            centre(2),
            centre(3)
        );
    };
    let started = Instant::now();
    let pooled_runs: Vec<Vec<f64>> = (0..seeds)
        .map(|s| pooled(&reference, &centres, 42 + s))
        .collect();
    row(
        "Pooled (centralised reference)",
        &pooled_runs,
        started.elapsed().as_secs_f64() / seeds as f64,
    );
    for (name, changes) in methods {
        let mut runs = Vec::new();
        let started = Instant::now();
        for s in 0..seeds {
            let spec = edit(&base, 42 + s, &changes);
            let (_, export) = run_job(&mut net.client, &spec).await?;
            runs.push(federated_accuracy(&export, &centres, &spec));
        }
        row(name, &runs, started.elapsed().as_secs_f64() / seeds as f64);
    }
    Ok(())
}

async fn timing(net: &mut Net) -> anyhow::Result<()> {
    let base = confer_cli::heart::example_job()?;
    println!("\n### Seconds per round, MLP 13-1024-1024-1 (1,064,961 parameters), 4 nodes, CPU\n");
    println!("| mode | local training | secure aggregation | coordinator | round total | rounds |");
    println!("|---|---|---|---|---|---|");
    for (mode, dp) in [
        ("secure aggregation, no noise", false),
        ("DP ε=5 (distributed noise)", true),
    ] {
        let mut changes = vec![
            ("rounds = 15", "rounds = 3"),
            (
                "architecture = \"logistic_regression\"",
                "architecture = \"mlp\"\nhidden = [1024, 1024]",
            ),
            ("budget = { steps = 100 }", "budget = { steps = 20 }"),
            ("batch_size = 4", "batch_size = 32"),
            ("every = 5", "every = 0"),
            ("epsilon = 2.0", "epsilon = 5.0"),
        ];
        if dp {
            changes.push(("\ndp_training = false", "\ndp_training = true"));
        }
        let spec = edit(&base, 1, &changes);
        assert!(spec.model.num_parameters() > 1_000_000);
        let (status, _) = run_job(&mut net.client, &spec).await?;
        let n = status.history.len() as f64;
        let mean = |f: fn(&confer_protocol::train::RoundRecord) -> f64| {
            status.history.iter().map(f).sum::<f64>() / n
        };
        let (l, s, c) = (
            mean(|r| r.local_secs),
            mean(|r| r.secagg_secs),
            mean(|r| r.server_secs),
        );
        println!(
            "| {mode} | {l:.3} | {s:.3} | {c:.3} | {:.3} | {} |",
            l + s + c,
            status.history.len()
        );
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let seeds: u64 = arg("--seeds").and_then(|s| s.parse().ok()).unwrap_or(5);
    let only = arg("--only");
    let dir = tempfile::tempdir()?;
    let mut net = start(dir.path()).await?;
    if only.as_deref() != Some("timing") {
        validation(&mut net, dir.path(), seeds).await?;
    }
    if only.as_deref() != Some("validation") {
        timing(&mut net).await?;
    }
    net.coordinator.shutdown().await?;
    for n in net.nodes {
        n.shutdown().await?;
    }
    Ok(())
}
