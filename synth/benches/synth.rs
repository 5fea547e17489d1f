//! Generation throughput and what Parquet buys a node over CSV.
//!
//! ```text
//! cargo bench -p confer-synth --bench synth [-- --persons N --sites S --out DIR --keep --parquet-only]
//! ```
//!
//! Generates `--persons` residents (default 1,000,000) over `--sites` sites
//! (default 5) as Parquet, then again as CSV from the same seed, reporting
//! time, rows per second and peak resident memory (VmHWM); then runs
//! `SELECT visit_concept_id, COUNT(*) FROM visit_occurrence GROUP BY
//! visit_concept_id` with DataFusion over every site's visits in each format.
//! `--parquet-only` stops after the Parquet step (for very large runs).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use confer_synth::{Format, SynthOptions, generate};
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};

const QUERY: &str = "SELECT visit_concept_id, COUNT(*) AS visits FROM visit_occurrence \
                     GROUP BY visit_concept_id ORDER BY visit_concept_id";

struct Args {
    persons: u64,
    sites: usize,
    out: Option<PathBuf>,
    keep: bool,
    parquet_only: bool,
}

fn args() -> Args {
    let mut a = Args {
        persons: 1_000_000,
        sites: 5,
        out: None,
        keep: false,
        parquet_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--persons" => a.persons = it.next().and_then(|v| v.parse().ok()).expect("--persons N"),
            "--sites" => a.sites = it.next().and_then(|v| v.parse().ok()).expect("--sites N"),
            "--out" => a.out = it.next().map(PathBuf::from),
            "--keep" => a.keep = true,
            "--parquet-only" => a.parquet_only = true,
            // cargo bench passes --bench; ignore what we do not know.
            _ => {}
        }
    }
    a
}

/// Peak resident set size of this process, in MiB (Linux only).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn dir_size_mib(dir: &Path) -> f64 {
    fn walk(p: &Path) -> u64 {
        std::fs::read_dir(p)
            .map(|it| {
                it.flatten()
                    .map(|e| {
                        let m = e
                            .metadata()
                            .map(|m| (m.is_dir(), m.len()))
                            .unwrap_or((false, 0));
                        if m.0 { walk(&e.path()) } else { m.1 }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(dir) as f64 / (1024.0 * 1024.0)
}

fn gen_step(options: &SynthOptions) -> (Duration, u64) {
    let start = Instant::now();
    let mut last = 0;
    let summary = generate(options, |p| {
        let pct = p.persons_done * 100 / p.persons_total.max(1);
        if pct >= last + 10 {
            last = pct;
            eprint!("\r  {} {pct:>3}%", options.format);
        }
    })
    .expect("generate");
    eprintln!();
    (start.elapsed(), summary.rows_written)
}

async fn query(ctx: &SessionContext) -> (Duration, String) {
    // Best of three.
    let mut best = Duration::MAX;
    let mut text = String::new();
    for _ in 0..3 {
        let start = Instant::now();
        let batches = ctx
            .sql(QUERY)
            .await
            .expect("plan")
            .collect()
            .await
            .expect("run");
        best = best.min(start.elapsed());
        text = pretty_format_batches(&batches).expect("format").to_string();
    }
    (best, text)
}

fn main() {
    let a = args();
    let root = a.out.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("confer-synth-bench-{}", std::process::id()))
    });
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "confer-synth benchmark: {} residents, {} sites, seed 42, {threads} hardware threads",
        a.persons, a.sites
    );

    let mut options = SynthOptions::new(root.join("parquet"));
    options.sites = a.sites;
    options.persons = a.persons;
    options.force = true;
    let (t_parquet, rows) = gen_step(&options);
    let rss_parquet = peak_rss_mib().unwrap_or(f64::NAN);
    let size_parquet = dir_size_mib(&options.out);
    let parquet_dir = options.out.clone();
    if a.parquet_only {
        println!();
        println!("| step | time (s) | rows | rows/s | peak RSS (MiB) | on disk (MiB) |");
        println!("|---|---:|---:|---:|---:|---:|");
        println!(
            "| generate Parquet | {:.2} | {rows} | {:.0} | {rss_parquet:.0} | {size_parquet:.0} |",
            t_parquet.as_secs_f64(),
            rows as f64 / t_parquet.as_secs_f64()
        );
        finish(&a, &root);
        return;
    }

    options.out = root.join("csv");
    options.format = Format::Csv;
    let (t_csv, rows_csv) = gen_step(&options);
    let rss_csv = peak_rss_mib().unwrap_or(f64::NAN);
    let size_csv = dir_size_mib(&options.out);
    let csv_dir = options.out.clone();
    assert_eq!(rows, rows_csv, "same seed, same rows");

    let sites = confer_synth::plan_sites(a.sites);
    let files = |dir: &Path, ext: &str| -> Vec<String> {
        sites
            .iter()
            .map(|s| {
                dir.join(&s.name)
                    .join(format!("visit_occurrence.{ext}"))
                    .display()
                    .to_string()
            })
            .collect()
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (q_parquet, q_csv, visits) = rt.block_on(async {
        let ctx = SessionContext::new();
        let df = ctx
            .read_parquet(
                files(&parquet_dir, "parquet"),
                ParquetReadOptions::default(),
            )
            .await
            .expect("read parquet");
        let schema = df.schema().as_arrow().clone();
        ctx.register_table("visit_occurrence", df.into_view())
            .expect("register");
        let (q_parquet, text_parquet) = query(&ctx).await;

        let ctx = SessionContext::new();
        let df = ctx
            .read_csv(
                files(&csv_dir, "csv"),
                CsvReadOptions::new().schema(&schema),
            )
            .await
            .expect("read csv");
        ctx.register_table("visit_occurrence", df.into_view())
            .expect("register");
        let (q_csv, text_csv) = query(&ctx).await;
        assert_eq!(text_parquet, text_csv, "both formats give the same answer");
        (q_parquet, q_csv, text_parquet)
    });

    let secs = |d: Duration| d.as_secs_f64();
    println!();
    println!("| step | time (s) | rows | rows/s | peak RSS (MiB) | on disk (MiB) |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| generate Parquet | {:.2} | {rows} | {:.0} | {rss_parquet:.0} | {size_parquet:.0} |",
        secs(t_parquet),
        rows as f64 / secs(t_parquet)
    );
    println!(
        "| generate CSV | {:.2} | {rows_csv} | {:.0} | {rss_csv:.0} | {size_csv:.0} |",
        secs(t_csv),
        rows_csv as f64 / secs(t_csv)
    );
    println!(
        "| query Parquet (best of 3) | {:.3} | | | | |",
        secs(q_parquet)
    );
    println!("| query CSV (best of 3) | {:.3} | | | | |", secs(q_csv));
    println!();
    println!(
        "CSV / Parquet query time: {:.1}x",
        secs(q_csv) / secs(q_parquet)
    );
    println!("{QUERY}\n{visits}");

    finish(&a, &root);
}

fn finish(a: &Args, root: &Path) {
    if a.keep {
        println!("kept {}", root.display());
    } else {
        let _ = std::fs::remove_dir_all(root);
    }
}
