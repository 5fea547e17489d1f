//! Coordinator overhead: a trivial DP count through the coordinator to 50
//! in-process nodes on loopback, against the same count asked of one node
//! directly. Prints a markdown table.
//!
//! cargo bench -p confer-cli --bench coordinator [-- --nodes 50 --queries 200 --clients 8 --seconds 10]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod common;

use confer_cli::client::Client;
use confer_coordinator::config::NodeEntry;
use confer_coordinator::fanout::NodeHandle;
use confer_protocol::signing::Identity;
use confer_protocol::task::Task;

const SQL: &str = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, delta = 1e-6) COUNT(*) AS n FROM person";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn write_node(dir: &Path, name: &str, key: &str) -> std::path::PathBuf {
    let node_dir = dir.join(name);
    std::fs::create_dir_all(&node_dir).expect("dir");
    let mut csv = String::from(
        "person_id,gender_concept_id,year_of_birth,race_concept_id,ethnicity_concept_id\n",
    );
    for p in 0..20 {
        csv.push_str(&format!("{p},8507,1970,0,0\n"));
    }
    std::fs::write(node_dir.join("person.csv"), csv).expect("csv");
    let config = node_dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"\ncoordinator_key = \"{key}\"\n\
             [policy]\napproval = \"auto\"\ndefault_study_budget = {{ rho = 1e12, delta = 0.5 }}\nnode_budget = {{ rho = 1e15 }}\n\
             [tables.person]\npath = \"person.csv\"\nprivacy_unit = \"person_id\"\n"
        ),
    )
    .expect("config");
    config
}

fn median(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[(v.len() * 95 / 100).min(v.len() - 1)])
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let n_nodes = arg("--nodes", 50);
    let queries = arg("--queries", 200);
    let clients = arg("--clients", 8);
    let seconds = arg("--seconds", 10);
    let dir = tempfile::tempdir()?;
    let identity = Identity::generate()?;
    let public = identity.save(&dir.path().join("coordinator.key"))?;

    let mut nodes = Vec::new();
    for i in 0..n_nodes {
        let name = format!("n{i:03}");
        let config = confer_node::NodeConfig::load(&write_node(dir.path(), &name, &public))?;
        nodes.push(confer_node::start(config, confer_node::Transport::InsecureLoopback).await?);
    }

    // Baseline: one node answering a signed task directly.
    let direct = NodeHandle::new(
        &NodeEntry {
            name: nodes[0].name.clone(),
            url: format!("http://{}", nodes[0].addr),
        },
        None,
    )?;
    let mut direct_ms = Vec::new();
    for i in 0..queries + 10 {
        let envelope = identity.sign(
            &Task::query("bench", "bench", SQL, Duration::from_secs(600))
                .for_nodes([nodes[0].name.as_str()]),
        )?;
        let t = Instant::now();
        direct
            .run(&envelope, Duration::from_secs(30))
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        if i >= 10 {
            direct_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }

    // The coordinator in front of all nodes.
    let (coordinator, token) = common::coordinator(dir.path(), &nodes, "").await?;
    let url = format!("http://{}", coordinator.addr);

    let mut client = Client::connect(&url, Some(&token)).await?;
    let mut via_ms = Vec::new();
    for i in 0..queries + 10 {
        let t = Instant::now();
        client.run(SQL, Some("bench")).await?;
        if i >= 10 {
            via_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }

    // Throughput: concurrent clients for a fixed time.
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Instant::now() + Duration::from_secs(seconds as u64);
    let mut handles = Vec::new();
    for _ in 0..clients {
        let (url, token, done) = (url.clone(), token.clone(), done.clone());
        handles.push(tokio::spawn(async move {
            let mut c = Client::connect(&url, Some(&token)).await?;
            while Instant::now() < stop {
                c.run(SQL, Some("bench")).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let started = Instant::now();
    for h in handles {
        h.await??;
    }
    let qps = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();

    let (d50, d95) = median(direct_ms);
    let (v50, v95) = median(via_ms);
    println!("| path | nodes | median ms | p95 ms | ratio to one node |");
    println!("|---|---|---|---|---|");
    println!("| one node, direct (signed task over Flight) | 1 | {d50:.2} | {d95:.2} | 1.00 |");
    println!(
        "| coordinator (Flight SQL, plan + fan-out + combine) | {n_nodes} | {v50:.2} | {v95:.2} | {:.2} |",
        v50 / d50
    );
    println!();
    println!(
        "throughput through the coordinator: {qps:.1} queries/s with {clients} concurrent clients over {seconds} s ({n_nodes} nodes; each query is {n_nodes} node tasks)"
    );
    println!(
        "machine: {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    coordinator.shutdown().await?;
    for n in nodes {
        n.shutdown().await?;
    }
    Ok(())
}
