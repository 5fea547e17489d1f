//! The commission's monthly supervision release on a synthetic region:
//! wall time, and the accuracy of every indicator at each level.
//!
//! Writes a region (`confer synth --region`, `--sites` institutions,
//! default 12, and `--persons` residents, default 1,000,000, up to last
//! month), starts its nodes and a coordinator with `[supervision]` (yearly
//! budget `--epsilon-per-year`, default 12, at delta 1e-6), releases last
//! month once, and prints:
//!
//! * the wall time of the release (every measure checked and run at every
//!   node, the tree assembled and stored), of a re-run (answered from the
//!   store), and of generating the data;
//! * per indicator and level (county, township, village): the median
//!   relative error |released − exact| / exact over the units whose exact
//!   value is not 0 and whose value was released, and the share of units
//!   marked "insufficient data". The exact value is the indicator's
//!   definition computed by plain DataFusion over the nodes' files, without
//!   DP or contribution bounds (so the error includes the bounds' bias).
//!
//! ```text
//! cargo bench -p confer-cli --bench supervision [-- --persons N --sites S --epsilon-per-year E --data DIR]
//! ```
//! `--data DIR` keeps the region there and reuses it next time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use arrow::array::{Array, Float64Array, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use confer_cli::client::Client;
use confer_coordinator::supervision::indicators::Catalogue;
use confer_coordinator::supervision::period::Period;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn strings(b: &arrow::array::RecordBatch, name: &str) -> Vec<String> {
    let c = cast(b.column_by_name(name).expect(name), &DataType::Utf8).expect("utf8");
    let a = c.as_any().downcast_ref::<StringArray>().expect("utf8");
    (0..a.len()).map(|i| a.value(i).to_string()).collect()
}

fn floats(b: &arrow::array::RecordBatch, name: &str) -> Vec<Option<f64>> {
    let c = cast(b.column_by_name(name).expect(name), &DataType::Float64).expect("f64");
    let a = c.as_any().downcast_ref::<Float64Array>().expect("f64");
    (0..a.len())
        .map(|i| (!a.is_null(i)).then(|| a.value(i)))
        .collect()
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    Some(v[v.len() / 2])
}

fn main() -> anyhow::Result<()> {
    let persons: u64 = arg("--persons")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let sites: usize = arg("--sites").and_then(|v| v.parse().ok()).unwrap_or(12);
    let epsilon: f64 = arg("--epsilon-per-year")
        .and_then(|v| v.parse().ok())
        .unwrap_or(12.0);
    let temp = tempfile::tempdir()?;
    let work: PathBuf = arg("--data")
        .map(PathBuf::from)
        .unwrap_or_else(|| temp.path().to_path_buf());
    // Served afresh: no ledger or coordinator state from an earlier run.
    let _ = std::fs::remove_dir_all(work.join("state"));
    if let Ok(entries) = std::fs::read_dir(work.join("region")) {
        for e in entries.flatten() {
            let _ = std::fs::remove_dir_all(e.path().join("state"));
        }
    }
    let program = Path::new(env!("CARGO_BIN_EXE_confer"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let started = Instant::now();
        let (federation, period) = confer_cli::commission::start_region_with(
            program,
            &work,
            sites,
            persons,
            "warn",
            epsilon,
            0,
        )
        .await?;
        let setup = started.elapsed().as_secs_f64();
        let admin = federation.tokens.get("admin").cloned().unwrap_or_default();
        let mut client = Client::connect(&federation.url(), Some(&admin)).await?;
        let body = serde_json::to_vec(&serde_json::json!({ "period": period }))?;
        let t = Instant::now();
        let report = client
            .action(confer_protocol::coordinator::actions::SUPERVISION_RUN, body.clone())
            .await?;
        let run = t.elapsed().as_secs_f64();
        let t = Instant::now();
        client
            .action(confer_protocol::coordinator::actions::SUPERVISION_RUN, body)
            .await?;
        let rerun = t.elapsed().as_secs_f64();
        let values = client
            .run(
                &format!(
                    "SELECT v.unit, u.level, v.indicator, v.value, v.flags FROM supervision.values v \
                     JOIN supervision.org_units u ON v.unit = u.code WHERE v.period = '{period}' AND v.category = ''"
                ),
                None,
            )
            .await?;
        let p = Period::parse(&period).map_err(anyhow::Error::msg)?;
        let catalogue = Catalogue::standard()?;
        let t = Instant::now();
        let exact = confer_cli::commission::exact(&work.join("region"), &catalogue, &p).await?;
        let exact_secs = t.elapsed().as_secs_f64();
        // (indicator, level) → (relative errors, insufficient, units)
        let mut cells: BTreeMap<(String, String), (Vec<f64>, usize, usize)> = BTreeMap::new();
        for b in &values.batches {
            let (unit, level, ind, flags) = (strings(b, "unit"), strings(b, "level"), strings(b, "indicator"), strings(b, "flags"));
            let value = floats(b, "value");
            for i in 0..b.num_rows() {
                let Some(def) = catalogue.indicators.iter().find(|d| d.id == ind[i]) else { continue };
                if def.numerator.is_none() {
                    continue;
                }
                let cell = cells.entry((ind[i].clone(), level[i].clone())).or_default();
                cell.2 += 1;
                if flags[i].contains("insufficient") {
                    cell.1 += 1;
                }
                if let (Some(v), Some(t)) = (value[i], exact.value(def, &unit[i]))
                    && t != 0.0
                {
                    cell.0.push((v - t).abs() / t.abs());
                }
            }
        }
        println!(
            "\nsupervision release: {persons} residents, {sites} institutions ({} nodes), period {period}, \
             epsilon {epsilon} per year at each node",
            federation.nodes.len()
        );
        println!(
            "{} DP queries per node at epsilon {:.4} each; the month spends rho {:.5} per node\n",
            report["measures"], report["epsilon_per_measure"].as_f64().unwrap_or(0.0), report["rho_per_node"].as_f64().unwrap_or(0.0)
        );
        println!("| step | seconds |\n|---|---|");
        println!("| write the region (or reuse --data) and start nodes and coordinator | {setup:.1} |");
        println!("| monthly release (check and run every measure at every node, assemble, store) | {run:.1} |");
        println!("| re-run (answered from the store) | {rerun:.2} |");
        println!("| exact values in plain DataFusion (the baseline of the error table) | {exact_secs:.1} |");
        println!("| release / exact computation | {:.2}x |\n", run / exact_secs.max(1e-9));
        println!("| indicator | county: median rel. error | insufficient | township | insufficient | village | insufficient |");
        println!("|---|---|---|---|---|---|---|");
        for ind in &catalogue.indicators {
            if ind.numerator.is_none() {
                continue;
            }
            let mut row = format!("| {} |", ind.id);
            for level in ["county", "township", "village"] {
                let (errors, insufficient, units) = cells
                    .get(&(ind.id.clone(), level.to_string()))
                    .cloned()
                    .unwrap_or_default();
                let m = median(errors).map_or("–".to_string(), |m| format!("{:.1}%", 100.0 * m));
                row.push_str(&format!(" {m} | {insufficient}/{units} |"));
            }
            println!("{row}");
        }
        federation.stop().await?;
        anyhow::Ok(())
    })
}
