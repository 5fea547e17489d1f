//! DP queries end to end against the same aggregates in plain DataFusion.
//!
//! Writes `--persons` synthetic persons (default 1,000,000) as Parquet files
//! per site (`--sites`, default 4; person p lives at site p mod sites):
//! `person`, `condition_occurrence` (about 5 rows per person) and
//! `measurement` (about 10 rows per person). Starts one node per site and
//! a coordinator in this process on loopback and times, `--repeats` times
//! each (default 5, median reported after one warm-up), four shapes:
//!
//! * `count`: COUNT(*) and AVG per public key, one row per person;
//! * `distinct`: COUNT(DISTINCT person_id) per private key, at most 5
//!   groups per person (partition selection);
//! * `sum`: SUM and AVG per public key, at most 10 rows per person and
//!   group and 3 groups per person;
//! * `join`: measurement JOIN person on the unit, at most 10 rows per
//!   person;
//!
//! each through the coordinator's Flight SQL endpoint (plan, signed tasks,
//! node-side bounding, noise, durable debits, combine) and as the same
//! aggregate in one plain DataFusion session over the same files (values
//! clamped, public keys filtered; no per-person bounding).
//!
//! Peak memory (VmHWM) is measured per shape, resetting it in between
//! (`/proc/self/clear_refs`). Prints a markdown table.
//!
//! ```text
//! cargo bench -p confer-cli --bench dp_query [-- --persons N --sites S --repeats R --data DIR --shapes count,distinct --show --profile]
//! ```
//! `--data DIR` keeps the generated files there and reuses them next time;
//! `--show` prints both answers of every shape; `--profile` prints
//! `EXPLAIN ANALYZE` of each shape's local bounded query over site 0.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

mod common;

use arrow::array::{AsArray, Date32Array, Float64Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};

use confer_cli::client::Client;
use confer_protocol::signing::Identity;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::prelude::{ParquetReadOptions, SessionContext};

/// One query shape: the DP query and the same bounded aggregate in plain
/// DataFusion (clamped values, public keys filtered to their domain; no
/// per-person bounding, which plain SQL has no way to say).
struct Query {
    name: &'static str,
    dp: &'static str,
    plain: &'static str,
    /// The same aggregate with one GROUP BY per person (and group) first:
    /// the least that any per-person bound costs in DataFusion (absent where
    /// `plain` already groups by person, or no bound is needed).
    floor: Option<&'static str>,
}

const QUERIES: &[Query] = &[
    Query {
        name: "count",
        dp: "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, delta = 1e-6) \
             gender_concept_id, COUNT(*) AS persons, AVG(year_of_birth) AS mean_yob \
             FROM person GROUP BY gender_concept_id",
        plain: "SELECT gender_concept_id, COUNT(*) AS persons, \
                AVG(LEAST(GREATEST(year_of_birth, 1900), 2030)) AS mean_yob \
                FROM person WHERE gender_concept_id IN (8507, 8532) GROUP BY gender_concept_id",
        floor: None,
    },
    Query {
        name: "distinct",
        dp: "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, delta = 1e-6, max_groups_contributed = 5) \
             condition_concept_id, COUNT(DISTINCT person_id) AS persons \
             FROM condition_occurrence GROUP BY condition_concept_id",
        plain: "SELECT condition_concept_id, COUNT(DISTINCT person_id) AS persons \
                FROM condition_occurrence GROUP BY condition_concept_id",
        floor: None,
    },
    Query {
        name: "sum",
        dp: "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, delta = 1e-6, max_groups_contributed = 3, \
             max_rows_contributed = 10) measurement_concept_id, SUM(value_as_number) AS total, \
             AVG(value_as_number) AS mean FROM measurement GROUP BY measurement_concept_id",
        plain: "SELECT measurement_concept_id, SUM(LEAST(GREATEST(value_as_number, 0.0), 200.0)) AS total, \
                AVG(LEAST(GREATEST(value_as_number, 0.0), 200.0)) AS mean FROM measurement \
                WHERE measurement_concept_id BETWEEN 3000000 AND 3000019 GROUP BY measurement_concept_id",
        floor: Some(
            "SELECT g, SUM(s) AS total, SUM(a) / COUNT(a) AS mean FROM (SELECT person_id, measurement_concept_id AS g, \
             SUM(LEAST(GREATEST(value_as_number, 0.0), 200.0)) AS s, AVG(LEAST(GREATEST(value_as_number, 0.0), 200.0)) AS a \
             FROM measurement WHERE measurement_concept_id BETWEEN 3000000 AND 3000019 \
             GROUP BY person_id, measurement_concept_id) GROUP BY g",
        ),
    },
    Query {
        name: "join",
        dp: "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, delta = 1e-6, max_rows_contributed = 10) \
             p.gender_concept_id, COUNT(*) AS n, AVG(m.value_as_number) AS mean \
             FROM measurement m JOIN person p ON m.person_id = p.person_id GROUP BY p.gender_concept_id",
        plain: "SELECT p.gender_concept_id, COUNT(*) AS n, AVG(LEAST(GREATEST(m.value_as_number, 0.0), 200.0)) AS mean \
                FROM measurement m JOIN person p ON m.person_id = p.person_id \
                WHERE p.gender_concept_id IN (8507, 8532) GROUP BY p.gender_concept_id",
        floor: Some(
            "SELECT g, SUM(n) AS n, SUM(a) / COUNT(a) AS mean FROM (SELECT p.person_id, p.gender_concept_id AS g, \
             COUNT(*) AS n, AVG(LEAST(GREATEST(m.value_as_number, 0.0), 200.0)) AS a \
             FROM measurement m JOIN person p ON m.person_id = p.person_id \
             WHERE p.gender_concept_id IN (8507, 8532) GROUP BY p.person_id, p.gender_concept_id) GROUP BY g",
        ),
    },
];

const SHAPE_NAMES: &str = "count: COUNT(*) and AVG per public key (one row per person); \
    distinct: COUNT(DISTINCT person_id) per private key, at most 5 groups per person; \
    sum: SUM and AVG per public key, at most 10 rows per person and group, 3 groups; \
    join: COUNT(*) and AVG over measurement JOIN person on the unit, at most 10 rows per person";

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

/// Writes `site`'s tables to `dir` (each skipped if present): `person`
/// (one row per person), `condition_occurrence` (0 to 10 rows per person
/// over 2,000 condition concepts, skewed towards the common ones) and
/// `measurement` (0 to 20 rows per person over 20 measurement concepts,
/// values around 80).
fn write_site(dir: &Path, site: u64, sites: u64, persons: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let ids: Vec<i64> = (site..persons)
        .step_by(sites as usize)
        .map(|p| p as i64)
        .collect();
    let int = |name: &str| Field::new(name, DataType::Int64, false);
    write_table(
        dir,
        "person",
        vec![
            int("person_id"),
            int("gender_concept_id"),
            int("year_of_birth"),
            int("race_concept_id"),
            int("ethnicity_concept_id"),
            int("location_id"),
        ],
        &ids,
        Mix(site),
        |rng, p, cols| {
            let r = rng.next();
            cols.int(0, p);
            cols.int(1, if r & 1 == 0 { 8507 } else { 8532 });
            // Ages skewed by site: a triangular spread over 1930..2020.
            let a = ((r >> 8) % 46) as i64 + ((r >> 24) % 46) as i64;
            cols.int(2, 1930 + a - site as i64);
            cols.int(3, [8527, 8516, 8515, 0][((r >> 40) % 4) as usize]);
            cols.int(4, [38003563, 38003564][((r >> 44) % 2) as usize]);
            cols.int(5, ((r >> 48) % 500) as i64 + 1000 * site as i64);
        },
    )?;
    write_table(
        dir,
        "condition_occurrence",
        vec![
            int("condition_occurrence_id"),
            int("person_id"),
            int("condition_concept_id"),
            Field::new("condition_start_date", DataType::Date32, false),
            int("condition_type_concept_id"),
        ],
        &ids,
        Mix(site + 1_000),
        |rng, p, cols| {
            for i in 0..rng.next() % 11 {
                // Skewed: u² over 2,000 concepts.
                let r = rng.next();
                let u = (r >> 11) as f64 / (1u64 << 53) as f64;
                cols.int(0, p * 16 + i as i64);
                cols.int(1, p);
                cols.int(2, 100_000 + (u * u * 2000.0) as i64);
                cols.date(3, 18_000 + (r % 3000) as i32);
                cols.int(4, 32020);
            }
        },
    )?;
    write_table(
        dir,
        "measurement",
        vec![
            int("measurement_id"),
            int("person_id"),
            int("measurement_concept_id"),
            Field::new("measurement_date", DataType::Date32, false),
            int("measurement_type_concept_id"),
            Field::new("value_as_number", DataType::Float64, true),
        ],
        &ids,
        Mix(site + 2_000),
        |rng, p, cols| {
            for i in 0..rng.next() % 21 {
                let r = rng.next();
                let u = (r >> 11) as f64 / (1u64 << 53) as f64;
                cols.int(0, p * 32 + i as i64);
                cols.int(1, p);
                cols.int(2, MEASUREMENT_BASE + (u * u * 20.0) as i64);
                cols.date(3, 18_000 + (r % 3000) as i32);
                cols.int(4, 32856);
                let spread = ((r & 0xff) + ((r >> 8) & 0xff) + ((r >> 16) & 0xff)) as f64 / 765.0;
                cols.float(5, 20.0 + 120.0 * spread);
            }
        },
    )?;
    Ok(())
}

const MEASUREMENT_BASE: i64 = 3_000_000;

/// Columns being filled, one vector per field.
struct Cols {
    ints: Vec<Vec<i64>>,
    floats: Vec<Vec<f64>>,
    dates: Vec<Vec<i32>>,
    /// Rows so far (the first column's length).
    rows: usize,
}

impl Cols {
    fn int(&mut self, i: usize, v: i64) {
        if i == 0 {
            self.rows += 1;
        }
        self.ints[i].push(v);
    }
    fn date(&mut self, i: usize, v: i32) {
        self.dates[i].push(v);
    }
    fn float(&mut self, i: usize, v: f64) {
        self.floats[i].push(v);
    }
    fn len(&self) -> usize {
        self.rows
    }
}

/// Writes `dir/{name}.parquet` from `fill`, called once per person, in
/// batches of about a million rows (skipped if the file is there).
fn write_table(
    dir: &Path,
    name: &str,
    fields: Vec<Field>,
    ids: &[i64],
    mut rng: Mix,
    mut fill: impl FnMut(&mut Mix, i64, &mut Cols),
) -> anyhow::Result<()> {
    let file = dir.join(format!("{name}.parquet"));
    if file.exists() {
        return Ok(());
    }
    let schema = Arc::new(Schema::new(fields));
    let tmp = dir.join(format!("{name}.parquet.partial"));
    let mut writer = ArrowWriter::try_new(std::fs::File::create(&tmp)?, schema.clone(), None)?;
    let n = schema.fields().len();
    let fresh = || Cols {
        ints: vec![Vec::new(); n],
        floats: vec![Vec::new(); n],
        dates: vec![Vec::new(); n],
        rows: 0,
    };
    let mut cols = fresh();
    let flush = |cols: Cols, writer: &mut ArrowWriter<std::fs::File>| -> anyhow::Result<()> {
        let arrays: Vec<arrow::array::ArrayRef> = schema
            .fields()
            .iter()
            .zip(cols.ints.into_iter().zip(cols.floats).zip(cols.dates))
            .map(|(f, ((i, x), d))| -> arrow::array::ArrayRef {
                match f.data_type() {
                    DataType::Float64 => Arc::new(Float64Array::from(x)),
                    DataType::Date32 => Arc::new(Date32Array::from(d)),
                    _ => Arc::new(Int64Array::from(i)),
                }
            })
            .collect();
        writer.write(&RecordBatch::try_new(schema.clone(), arrays)?)?;
        Ok(())
    };
    for &p in ids {
        fill(&mut rng, p, &mut cols);
        if cols.len() >= 1 << 20 {
            flush(std::mem::replace(&mut cols, fresh()), &mut writer)?;
        }
    }
    if cols.len() > 0 {
        flush(cols, &mut writer)?;
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
    let persons = num("--persons", 1_000_000);
    let sites = num("--sites", 4).max(1);
    let repeats = num("--repeats", 5).max(1) as usize;
    let only: Option<Vec<String>> =
        arg("--shapes").map(|s| s.split(',').map(str::to_string).collect());
    let queries: Vec<&Query> = QUERIES
        .iter()
        .filter(|q| only.as_ref().is_none_or(|o| o.iter().any(|n| n == q.name)))
        .collect();
    anyhow::ensure!(
        !queries.is_empty(),
        "--shapes names none of count, distinct, sum, join"
    );
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
    const TABLES: [&str; 3] = ["person", "condition_occurrence", "measurement"];

    // Plain DataFusion over the same files.
    let ctx = SessionContext::new();
    for table in TABLES {
        let files: Vec<String> = (0..sites)
            .map(|s| {
                data.join(format!("site{s}/{table}.parquet"))
                    .display()
                    .to_string()
            })
            .collect();
        let df = ctx
            .read_parquet(files, ParquetReadOptions::default())
            .await?;
        ctx.register_table(table, df.into_view())?;
    }
    let mut plain = Vec::new();
    let mut floor = Vec::new();
    for q in &queries {
        eprintln!("plain {}", q.name);
        reset_peak();
        let base = peak_mib();
        let mut ms = Vec::new();
        let mut rows = Vec::new();
        for _ in 0..repeats + 1 {
            let t = Instant::now();
            rows = ctx.sql(q.plain).await?.collect().await?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        ms.remove(0);
        plain.push((median(ms), peak_mib() - base, rows));
        let mut ms = Vec::new();
        if let Some(sql) = q.floor {
            for _ in 0..repeats + 1 {
                let t = Instant::now();
                ctx.sql(sql).await?.collect().await?;
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            ms.remove(0);
        }
        floor.push((!ms.is_empty()).then(|| median(ms)));
    }
    drop(ctx);

    // The federation, in process.
    let identity = Identity::generate()?;
    let public = identity.save(&scratch.path().join("coordinator.key"))?;
    let mut nodes = Vec::new();
    for s in 0..sites {
        let name = format!("site{s}");
        let dir = scratch.path().join(&name);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("node.toml");
        let file = |table: &str| {
            data.join(&name)
                .join(format!("{table}.parquet"))
                .display()
                .to_string()
        };
        std::fs::write(
            &config,
            format!(
                "[node]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"\ncoordinator_key = \"{public}\"\n\
                 [policy]\napproval = \"auto\"\ndefault_study_budget = {{ rho = 1e12, delta = 0.5 }}\nnode_budget = {{ rho = 1e15 }}\n\
                 [tables.person]\npath = {:?}\nformat = \"parquet\"\nprivacy_unit = \"person_id\"\n\
                 [tables.person.columns]\ngender_concept_id = {{ type = \"int64\", domain = [8507, 8532] }}\n\
                 year_of_birth = {{ type = \"int64\", bounds = [1900, 2030] }}\n\
                 [tables.condition_occurrence]\npath = {:?}\nformat = \"parquet\"\nprivacy_unit = \"person_id\"\n\
                 [tables.condition_occurrence.columns]\ncondition_concept_id = {{ type = \"int64\" }}\n\
                 [tables.measurement]\npath = {:?}\nformat = \"parquet\"\nprivacy_unit = \"person_id\"\n\
                 [tables.measurement.columns]\nmeasurement_concept_id = {{ type = \"int64\", domain = {{ from = {MEASUREMENT_BASE}, to = {} }} }}\n\
                 value_as_number = {{ type = \"float64\", bounds = [0.0, 200.0] }}\n",
                file("person"),
                file("condition_occurrence"),
                file("measurement"),
                MEASUREMENT_BASE + 19,
            ),
        )?;
        let config = confer_node::NodeConfig::load(&config)?;
        nodes.push(confer_node::start(config, confer_node::Transport::InsecureLoopback).await?);
    }
    let (coordinator, token) =
        common::coordinator(scratch.path(), &nodes, "node_timeout_secs = 3600\n").await?;
    let mut client = Client::connect(&format!("http://{}", coordinator.addr), Some(&token)).await?;
    let mut dp = Vec::new();
    for q in &queries {
        eprintln!("DP {}", q.name);
        reset_peak();
        let base = peak_mib();
        let mut ms = Vec::new();
        let mut rows = Vec::new();
        for _ in 0..repeats + 1 {
            let t = Instant::now();
            rows = client.run(q.dp, Some("bench")).await?.batches;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        ms.remove(0);
        dp.push((median(ms), peak_mib() - base, rows));
    }

    println!(
        "{persons} persons over {sites} sites (Parquet), median of {repeats} runs after one warm-up, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!("shapes: {SHAPE_NAMES}");
    println!();
    println!(
        "| shape | DP through the coordinator (ms) | plain DataFusion (ms) | ratio | plain, grouped by person first (ms) | ratio to it | DP peak memory above start (MiB) | plain peak (MiB) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (((q, p), d), f) in queries.iter().zip(&plain).zip(&dp).zip(&floor) {
        let (f_ms, f_ratio) = match f {
            Some(f) => (format!("{f:.1}"), format!("{:.2}", d.0 / f)),
            None => ("(plain)".to_string(), format!("{:.2}", d.0 / p.0)),
        };
        println!(
            "| {} | {:.1} | {:.1} | {:.2} | {f_ms} | {f_ratio} | {:.0} | {:.0} |",
            q.name,
            d.0,
            p.0,
            d.0 / p.0,
            d.1,
            p.1
        );
    }
    if std::env::args().any(|a| a == "--show") {
        for ((q, p), d) in queries.iter().zip(&plain).zip(&dp) {
            println!(
                "\n{} plain:\n{}\n{} DP:\n{}",
                q.name,
                arrow::util::pretty::pretty_format_batches(&p.2)?,
                q.name,
                arrow::util::pretty::pretty_format_batches(&d.2)?
            );
        }
    }

    if std::env::args().any(|a| a == "--profile") {
        profile(&mut client, &queries, &data).await?;
    }

    coordinator.shutdown().await?;
    for n in nodes {
        n.shutdown().await?;
    }
    Ok(())
}

/// Prints, for each shape, `EXPLAIN ANALYZE` of the local bounded query (as
/// EXPLAIN PRIVACY shows it) over site 0's files, in a session such as a
/// node's: where the time goes, operator by operator.
async fn profile(client: &mut Client, queries: &[&Query], data: &Path) -> anyhow::Result<()> {
    let ctx = confer_query::bounding::context();
    for table in ["person", "condition_occurrence", "measurement"] {
        let file = data.join(format!("site0/{table}.parquet"));
        let df = ctx
            .read_parquet(file.display().to_string(), ParquetReadOptions::default())
            .await?;
        ctx.register_table(table, df.into_view())?;
    }
    for q in queries {
        let explained = client
            .run(&format!("EXPLAIN PRIVACY {}", q.dp), Some("bench"))
            .await?
            .batches;
        let mut local = Vec::new();
        for b in &explained {
            let (Some(k), Some(v)) = (
                b.column(0).as_string_opt::<i32>(),
                b.column(1).as_string_opt::<i32>(),
            ) else {
                continue;
            };
            for i in 0..b.num_rows() {
                if k.value(i) == "local bounded query" {
                    local.push(v.value(i).to_string());
                }
            }
        }
        let sql = local.join("\n");
        let t = Instant::now();
        let analyzed = ctx
            .sql(&format!("EXPLAIN ANALYZE {sql}"))
            .await?
            .collect()
            .await?;
        println!(
            "\n{} at site 0 ({:.1} ms with EXPLAIN ANALYZE):\n{sql}\n{}",
            q.name,
            t.elapsed().as_secs_f64() * 1000.0,
            arrow::util::pretty::pretty_format_batches(&analyzed)?
        );
    }
    Ok(())
}
