//! A DP query end to end against the same aggregate in plain DataFusion.
//!
//! Writes `--persons` synthetic persons (default 10,000,000) as one Parquet
//! file per site (`--sites`, default 4; person p lives at site p mod sites),
//! starts one node per site and a coordinator in this process on loopback,
//! and times, `--repeats` times each (default 5, median reported):
//!
//! * DP: `SELECT WITH DIFFERENTIAL_PRIVACY ... gender_concept_id, COUNT(*),
//!   AVG(year_of_birth) FROM person GROUP BY gender_concept_id` through the
//!   coordinator's Flight SQL endpoint (plan, signed tasks, node-side
//!   bounding, noise, durable debits, combine);
//! * plain: the same GROUP BY in one DataFusion session over the same four
//!   files.
//!
//! Peak memory (VmHWM) is measured per phase, resetting it in between
//! (`/proc/self/clear_refs`). Prints a markdown table.
//!
//! ```text
//! cargo bench -p confer-cli --bench dp_query [-- --persons N --sites S --repeats R --data DIR]
//! ```
//! `--data DIR` keeps the generated files there and reuses them next time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

mod common;

use arrow::array::{Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};

use confer_cli::client::Client;
use confer_protocol::signing::Identity;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::prelude::{ParquetReadOptions, SessionContext};

const DP_SQL: &str = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, delta = 1e-6) \
                      gender_concept_id, COUNT(*) AS persons, AVG(year_of_birth) AS mean_yob \
                      FROM person GROUP BY gender_concept_id";
const PLAIN_SQL: &str = "SELECT gender_concept_id, COUNT(*) AS persons, \
                         AVG(LEAST(GREATEST(year_of_birth, 1900), 2030)) AS mean_yob \
                         FROM person WHERE gender_concept_id IN (8507, 8532) GROUP BY gender_concept_id";

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn num(name: &str, default: u64) -> u64 {
    arg(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Peak resident memory of this process since the last reset, in MiB.
fn peak_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn reset_peak() {
    // Linux: writing 5 resets VmHWM to the current RSS.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// SplitMix64: a fast deterministic generator for synthetic test data.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Writes `site`'s persons to `dir/person.parquet` (skipped if present).
fn write_site(dir: &Path, site: u64, sites: u64, persons: u64) -> anyhow::Result<()> {
    let file = dir.join("person.parquet");
    if file.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let schema = Arc::new(Schema::new(vec![
        Field::new("person_id", DataType::Int64, false),
        Field::new("gender_concept_id", DataType::Int64, false),
        Field::new("year_of_birth", DataType::Int64, false),
        Field::new("race_concept_id", DataType::Int64, false),
        Field::new("ethnicity_concept_id", DataType::Int64, false),
        Field::new("location_id", DataType::Int64, false),
    ]));
    let tmp = dir.join("person.parquet.partial");
    let mut writer = ArrowWriter::try_new(std::fs::File::create(&tmp)?, schema.clone(), None)?;
    let mut rng = Mix(site);
    let ids: Vec<i64> = (site..persons)
        .step_by(sites as usize)
        .map(|p| p as i64)
        .collect();
    for chunk in ids.chunks(1 << 20) {
        let n = chunk.len();
        let mut gender = Vec::with_capacity(n);
        let mut yob = Vec::with_capacity(n);
        let mut race = Vec::with_capacity(n);
        let mut ethnicity = Vec::with_capacity(n);
        let mut location = Vec::with_capacity(n);
        for _ in 0..n {
            let r = rng.next();
            gender.push(if r & 1 == 0 { 8507 } else { 8532 });
            // Ages skewed by site: a triangular spread over 1930..2020.
            let a = ((r >> 8) % 46) as i64 + ((r >> 24) % 46) as i64;
            yob.push(1930 + a - site as i64);
            race.push([8527, 8516, 8515, 0][((r >> 40) % 4) as usize]);
            ethnicity.push([38003563, 38003564][((r >> 44) % 2) as usize]);
            location.push(((r >> 48) % 500) as i64 + 1000 * site as i64);
        }
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(chunk.to_vec())),
                Arc::new(Int64Array::from(gender)),
                Arc::new(Int64Array::from(yob)),
                Arc::new(Int64Array::from(race)),
                Arc::new(Int64Array::from(ethnicity)),
                Arc::new(Int64Array::from(location)),
            ],
        )?;
        writer.write(&batch)?;
    }
    writer.close()?;
    std::fs::rename(tmp, file)?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let persons = num("--persons", 10_000_000);
    let sites = num("--sites", 4).max(1);
    let repeats = num("--repeats", 5).max(1) as usize;
    let scratch = tempfile::tempdir()?;
    let data: PathBuf = arg("--data")
        .map(PathBuf::from)
        .unwrap_or_else(|| scratch.path().join("data"));

    let started = Instant::now();
    for s in 0..sites {
        write_site(&data.join(format!("site{s}")), s, sites, persons)?;
    }
    eprintln!(
        "data: {persons} persons over {sites} sites in {:.1} s ({})",
        started.elapsed().as_secs_f64(),
        data.display()
    );

    // Plain DataFusion over the same files.
    reset_peak();
    let base = peak_mib();
    let ctx = SessionContext::new();
    let files: Vec<String> = (0..sites)
        .map(|s| {
            data.join(format!("site{s}/person.parquet"))
                .display()
                .to_string()
        })
        .collect();
    let df = ctx
        .read_parquet(files, ParquetReadOptions::default())
        .await?;
    ctx.register_table("person", df.into_view())?;
    let mut plain_ms = Vec::new();
    let mut plain_rows = Vec::new();
    for _ in 0..repeats + 1 {
        let t = Instant::now();
        plain_rows = ctx.sql(PLAIN_SQL).await?.collect().await?;
        plain_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    plain_ms.remove(0);
    let plain_peak = peak_mib() - base;
    drop(ctx);

    // The federation, in process.
    reset_peak();
    let base = peak_mib();
    let identity = Identity::generate()?;
    let public = identity.save(&scratch.path().join("coordinator.key"))?;
    let mut nodes = Vec::new();
    for s in 0..sites {
        let name = format!("site{s}");
        let dir = scratch.path().join(&name);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("node.toml");
        std::fs::write(
            &config,
            format!(
                "[node]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"\ncoordinator_key = \"{public}\"\n\
                 [policy]\napproval = \"auto\"\ndefault_study_budget = {{ rho = 1e12, delta = 0.5 }}\nnode_budget = {{ rho = 1e15 }}\n\
                 [tables.person]\npath = {:?}\nformat = \"parquet\"\nprivacy_unit = \"person_id\"\n\
                 [tables.person.columns]\ngender_concept_id = {{ type = \"int64\", domain = [8507, 8532] }}\n\
                 year_of_birth = {{ type = \"int64\", bounds = [1900, 2030] }}\n",
                data.join(&name)
                    .join("person.parquet")
                    .display()
                    .to_string()
            ),
        )?;
        let config = confer_node::NodeConfig::load(&config)?;
        nodes.push(confer_node::start(config, confer_node::Transport::InsecureLoopback).await?);
    }
    let (coordinator, token) =
        common::coordinator(scratch.path(), &nodes, "node_timeout_secs = 600\n").await?;
    let mut client = Client::connect(&format!("http://{}", coordinator.addr), Some(&token)).await?;
    let mut dp_ms = Vec::new();
    let mut dp_rows = Vec::new();
    for _ in 0..repeats + 1 {
        let t = Instant::now();
        dp_rows = client.run(DP_SQL, Some("bench")).await?.batches;
        dp_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    dp_ms.remove(0);
    let dp_peak = peak_mib() - base;

    let (p, d) = (median(plain_ms), median(dp_ms));
    println!(
        "{persons} persons over {sites} sites (Parquet), median of {repeats} runs after one warm-up, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!();
    println!("| path | median ms | peak memory above start (MiB) | ratio to plain |");
    println!("|---|---|---|---|");
    println!(
        "| plain DataFusion, one session over the 4 files | {p:.1} | {plain_peak:.0} | 1.00 |"
    );
    println!(
        "| DP through the coordinator ({sites} in-process nodes, Flight, noise, durable debits) | {d:.1} | {dp_peak:.0} | {:.2} |",
        d / p
    );
    println!();
    println!(
        "plain:\n{}",
        arrow::util::pretty::pretty_format_batches(&plain_rows)?
    );
    println!(
        "DP:\n{}",
        arrow::util::pretty::pretty_format_batches(&dp_rows)?
    );

    coordinator.shutdown().await?;
    for n in nodes {
        n.shutdown().await?;
    }
    Ok(())
}
