//! Secure-aggregation benchmark: simulates whole federations in process and
//! prints markdown tables (node and coordinator time, bytes sent,
//! communication expansion), then PRG and discrete Gaussian throughput.
//!
//! ```text
//! cargo bench -p confer-privacy --bench secagg                 # everything
//! cargo bench -p confer-privacy --bench secagg -- 100x100k prg # a subset
//! SECAGG_BENCH="10x1M 500x100k-10" cargo bench -p confer-privacy --bench secagg
//! ```
//! Case names: `10x1M`, `100x100k`, `100x100k-10`, `500x100k`, `500x100k-10`
//! (`-10`: 10% of nodes drop after sharing keys, before sending their masked
//! input, the costliest point for the coordinator), `prg`, `dgauss`, `encode`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use confer_privacy::Noise;
use confer_privacy::secagg::encoding::{DiscreteGaussian, Encoder, EncodingConfig};
use confer_privacy::secagg::simulation::{self, Dropouts, Threads};
use confer_privacy::secagg::{ChaCha20Rng, Config, Graph, SeedableRng};

const THREADS: usize = 2;
const BITS: u32 = 32;

struct Case {
    name: &'static str,
    n: usize,
    len: usize,
    dropout: f64,
}

const CASES: [Case; 5] = [
    Case {
        name: "10x1M",
        n: 10,
        len: 1 << 20,
        dropout: 0.0,
    },
    Case {
        name: "100x100k",
        n: 100,
        len: 100_000,
        dropout: 0.0,
    },
    Case {
        name: "100x100k-10",
        n: 100,
        len: 100_000,
        dropout: 0.1,
    },
    Case {
        name: "500x100k",
        n: 500,
        len: 100_000,
        dropout: 0.0,
    },
    Case {
        name: "500x100k-10",
        n: 500,
        len: 100_000,
        dropout: 0.1,
    },
];

fn selected() -> Vec<String> {
    let mut names: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if let Ok(env) = std::env::var("SECAGG_BENCH") {
        names.extend(
            env.split([' ', ','])
                .filter(|s| !s.is_empty())
                .map(String::from),
        );
    }
    names
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn bytes(b: f64) -> String {
    if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}

fn run_case(case: &Case) {
    let graph = if case.n >= 100 {
        Graph::default_for(case.n)
    } else {
        Graph::Complete
    };
    let config =
        Config::with_graph(case.n, graph, BITS, case.len, [case.n as u8; 32]).expect("config");
    let len = case.len;
    let input = move |id: u32| -> Vec<u64> {
        (0..len as u64)
            .map(|j| (j.wrapping_mul(2_654_435_761) ^ u64::from(id)) & 0xFFFF_FFFF)
            .collect()
    };
    let dropouts = Dropouts::random(case.n, [0.0, 0.0, case.dropout, 0.0, 0.0], [7; 32]);
    // Nodes one at a time (a node runs alone on its machine); the
    // coordinator on all threads.
    let threads = Threads {
        nodes: 1,
        server: THREADS,
    };
    let report = simulation::run(&config, &input, &dropouts, [9; 32], threads).expect("session");
    // Participants that went through every round.
    let full: Vec<usize> = (0..case.n)
        .filter(|&i| !dropouts.masked_input.contains(&(i as u32)))
        .collect();
    let mean_time = full.iter().map(|&i| report.node_time[i]).sum::<Duration>() / full.len() as u32;
    let max_time = full
        .iter()
        .map(|&i| report.node_time[i])
        .max()
        .unwrap_or_default();
    let mean_bytes =
        full.iter().map(|&i| report.node_bytes[i]).sum::<usize>() as f64 / full.len() as f64;
    let raw = (case.len * 4) as f64;
    let expected = simulation::expected_sum(&config, &input, &report.aggregate.contributors);
    assert_eq!(report.aggregate.sum, expected, "{}: wrong sum", case.name);
    let rounds: Vec<String> = report
        .node_time_per_round
        .iter()
        .zip(&report.node_count_per_round)
        .map(|(t, &c)| format!("{:.1}", t.as_secs_f64() * 1e3 / c.max(1) as f64))
        .collect();
    let graph = match config.graph {
        Graph::Complete => "complete".to_string(),
        Graph::Sparse { degree } => format!("sparse k={degree}"),
    };
    println!(
        "| {} | {} | {:.0}% | {} (t={}) | {} | {} | {} | {} | {} | {} | {:.3}x |",
        case.n,
        case.len,
        case.dropout * 100.0,
        graph,
        config.threshold,
        ms(mean_time),
        ms(max_time),
        rounds.join(" / "),
        ms(report.server_time),
        bytes(mean_bytes),
        bytes(report.server_bytes as f64 / case.n as f64),
        mean_bytes / raw,
    );
}

fn prg() {
    let len = 1 << 24; // 64 MiB of u32
    let mut acc = vec![1u32; len];
    let src = vec![3u32; len];
    let mut dst = vec![0u32; len];
    let key = [5u8; 32];
    simulation::add_mask_stream(&key, &mut acc); // warm up
    let reps = 5;
    let start = Instant::now();
    for _ in 0..reps {
        simulation::add_mask_stream(&key, black_box(&mut acc));
    }
    let prg = start.elapsed().as_secs_f64() / reps as f64;
    let start = Instant::now();
    for _ in 0..reps {
        black_box(&mut dst).copy_from_slice(black_box(&src));
    }
    let copy = start.elapsed().as_secs_f64() / reps as f64;
    let gb = (len * 4) as f64 / 1e9;
    println!("\n| one core, 64 MiB | GB/s |\n|---|---|");
    println!(
        "| ChaCha20 mask stream added to u32 vector | {:.2} |",
        gb / prg
    );
    println!("| plain memory copy (copy_from_slice) | {:.2} |", gb / copy);
}

fn dgauss() {
    println!("\n| discrete Gaussian, 100k samples | σ | time |\n|---|---|---|");
    let mut rng = ChaCha20Rng::from_seed([3; 32]);
    let mut out = vec![0i64; 100_000];
    for sigma in [1.0f64, 30.0, 1000.0] {
        let dg = DiscreteGaussian::with_variance(sigma * sigma).expect("sampler");
        let start = Instant::now();
        dg.fill(black_box(&mut out), &mut rng);
        println!(
            "| confer exact CKS20 (u128) | {sigma} | {} |",
            ms(start.elapsed())
        );
    }
    for sigma in [1.0f64, 30.0, 1000.0] {
        // OpenDP's exact sampler with big rationals, through Noise.
        let noise = Noise {
            mechanism: confer_privacy::Mechanism::Gaussian,
            scale: sigma,
            sensitivity: 1.0,
        };
        let zeros = vec![0i64; 100_000];
        let start = Instant::now();
        black_box(noise.apply_i64(&zeros).expect("opendp"));
        println!(
            "| OpenDP make_gaussian (dashu RBig) | {sigma} | {} |",
            ms(start.elapsed())
        );
    }
}

fn encode() {
    println!(
        "\n| encode 100k-dim vector (clip, rotate to 2^17, round, noise σ/√t) | time |\n|---|---|"
    );
    let dim = 100_000;
    let config = EncodingConfig::new(dim, 1.0, 2000.0, 300.0, 500, 251, 32)
        .expect("encoding")
        .with_rotation([1; 32])
        .with_conditional_rounding((-0.5f64).exp());
    let encoder = Encoder::new(config).expect("encoder");
    let x: Vec<f64> = (0..dim).map(|i| ((i % 7) as f64 - 3.0) * 1e-3).collect();
    let mut rng = ChaCha20Rng::from_seed([4; 32]);
    let start = Instant::now();
    let out = encoder.encode(&x, &mut rng).expect("encode");
    println!("| encode | {} |", ms(start.elapsed()));
    let start = Instant::now();
    black_box(encoder.decode(&out.values).expect("decode"));
    println!("| decode | {} |", ms(start.elapsed()));
}

fn main() {
    let names = selected();
    let want = |name: &str| names.is_empty() || names.iter().any(|n| n == name);
    let cases: Vec<&Case> = CASES.iter().filter(|c| want(c.name)).collect();
    if !cases.is_empty() {
        println!(
            "Secure aggregation, in-process simulation, {BITS}-bit elements: nodes simulated one \
             at a time on one thread, the coordinator unmasking on {THREADS} threads.\n\
             Node time: all five rounds of one node. Bytes: compact binary sizes (`WireSize`).\n\
             Expansion: bytes a node sends / raw input bytes (4 per element).\n"
        );
        println!(
            "| nodes | elements | dropout | graph | node time (mean) | node time (max) | node ms per round 0/1/2/3/4 | server time | node sent | server sent per node | expansion |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        for case in cases {
            run_case(case);
        }
        println!(
            "| Bonawitz et al. 2017 (500 users, 100k, Java, 0% / 10%) | | | complete | ~850 ms | | | ~2 s / ~62 s | | | 1.73x (16-bit inputs) |"
        );
    }
    if want("prg") {
        prg();
    }
    if want("dgauss") {
        dgauss();
    }
    if want("encode") {
        encode();
    }
}
