//! Per-site vs secure partition selection on a synthetic network of many
//! small sites: which private groups are kept, and how far their released
//! counts fall below the truth.
//!
//! Every step is confer's own code, as the nodes and the coordinator run
//! it, minus SQL and the network: per-site selection is each node's
//! `release` (OpenDP's thresholded Gaussian) followed by the coordinator's
//! `combine`; secure selection is each node's `level_input` per level (its
//! share of the distributed discrete Gaussian), the coordinator's
//! `Selector` over the summed vectors (what secure aggregation reveals),
//! then each node's `node_input` over the keys found, `decode` and
//! `combine`. The query is
//! `SELECT condition_concept_id, COUNT(DISTINCT person_id) ... GROUP BY 1`
//! at epsilon 1, delta 1e-6, one group per person.
//!
//! ```text
//! cargo run -p confer-query --example secure_selection_accuracy [-- SITES REPS]
//! ```

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use confer_privacy::secagg::{ChaCha20Rng, SeedableRng};
use confer_protocol::catalog::{CatalogInfo, ColumnInfo, ColumnType, TableInfo};
use confer_query::combine::{SitePartial, combine};
use confer_query::plan::FederatedPlan;
use confer_query::release::{ReleaseOptions, release};
use confer_query::secure_select::{self, Selector};
use confer_query::{Catalog, Statement, compile, parse};

/// Groups of one shape: `per_site[s]` persons at site `s`.
struct Pattern {
    name: String,
    per_site: Vec<i64>,
}

fn patterns(sites: usize) -> Vec<Pattern> {
    let mut out = Vec::new();
    for each in [1, 2, 3, 5, 10, 20, 40] {
        out.push(Pattern {
            name: format!(
                "{each} at each of {sites} sites ({} in all)",
                each * sites as i64
            ),
            per_site: vec![each; sites],
        });
    }
    for total in [30, 90, 300] {
        let mut per_site = vec![0; sites];
        per_site[0] = total;
        out.push(Pattern {
            name: format!("{total} at one site"),
            per_site,
        });
    }
    out
}

async fn plan(aggregation: &str) -> FederatedPlan {
    let catalog = Catalog::for_node(&CatalogInfo {
        node: "network".into(),
        tables: vec![TableInfo {
            name: "condition_occurrence".into(),
            privacy_unit: Some("person_id".into()),
            columns: vec![
                ColumnInfo {
                    name: "person_id".into(),
                    column_type: ColumnType::Int64,
                    bounds: None,
                    domain: None,
                    unique: false,
                },
                ColumnInfo {
                    name: "condition_concept_id".into(),
                    column_type: ColumnType::Int64,
                    bounds: None,
                    domain: None,
                    unique: false,
                },
            ],
            one_row_per_unit: false,
        }],
    });
    let sql = format!(
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6, aggregation = '{aggregation}') \
         condition_concept_id, COUNT(DISTINCT person_id) AS n FROM condition_occurrence GROUP BY condition_concept_id"
    );
    let Ok(Statement::Query(q)) = parse(&sql) else {
        panic!("the query parses")
    };
    compile(&q, &catalog, None)
        .await
        .expect("the query compiles")
}

/// One site's local query output: `__g0`, `__p0` (persons), `__persons`.
fn partial_rows(counts: &[(i64, i64)]) -> RecordBatch {
    let keys: ArrayRef = Arc::new(Int64Array::from_iter_values(counts.iter().map(|c| c.0)));
    let n: ArrayRef = Arc::new(Int64Array::from_iter_values(counts.iter().map(|c| c.1)));
    let schema = Arc::new(Schema::new(vec![
        Field::new("__g0", DataType::Int64, true),
        Field::new("__p0", DataType::Int64, true),
        Field::new("__persons", DataType::Int64, true),
    ]));
    RecordBatch::try_new(schema, vec![keys, n.clone(), n]).expect("batch")
}

/// One site's (unit, key) rows, as the key query gives them.
fn key_rows(counts: &[(i64, i64)], first_person: &mut i64) -> RecordBatch {
    let mut units = Vec::new();
    let mut keys = Vec::new();
    for &(k, n) in counts {
        for _ in 0..n {
            units.push(*first_person);
            keys.push(k);
            *first_person += 1;
        }
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("__unit", DataType::Int64, true),
        Field::new("__key", DataType::Int64, true),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(units)),
            Arc::new(Int64Array::from(keys)),
        ],
    )
    .expect("batch")
}

fn released(batch: &RecordBatch) -> BTreeMap<i64, f64> {
    let keys = batch
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .expect("keys");
    let n = batch
        .column(1)
        .as_any()
        .downcast_ref::<Int64Array>()
        .expect("counts");
    (0..batch.num_rows())
        .filter(|&r| !n.is_null(r))
        .map(|r| (keys.value(r), n.value(r) as f64))
        .collect()
}

fn sum_into(total: &mut Vec<u64>, v: &[u64]) {
    if total.is_empty() {
        total.resize(v.len(), 0);
    }
    for (t, x) in total.iter_mut().zip(v) {
        *t = t.wrapping_add(*x);
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sites = args.first().copied().unwrap_or(30);
    let reps = args.get(1).copied().unwrap_or(2);
    let groups_per_pattern = 100;
    let per_site_plan = plan("per_site").await;
    let secure_plan = plan("secure").await;
    let honest = sites / 2 + 1; // the default threshold: a majority
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).expect("OS random source");
    let mut rng = ChaCha20Rng::from_seed(seed);

    let patterns = patterns(sites);
    // kept[pattern], ratio sums, per method.
    let mut stats = vec![[(0usize, 0.0f64), (0usize, 0.0f64)]; patterns.len()];
    let mut false_keys = [0usize; 2];
    let mut levels_run = 0usize;
    let mut spent = 0.0f64;
    for _ in 0..reps {
        // Distinct concept-like keys for every group.
        let mut keys: Vec<i64> = Vec::new();
        let mut used = HashSet::new();
        let mut next = 4_000_000i64;
        while keys.len() < patterns.len() * groups_per_pattern {
            next += 1 + (rng_u64(&mut rng) % 97) as i64;
            if used.insert(next) {
                keys.push(next);
            }
        }
        let truth: BTreeMap<i64, (usize, i64)> = keys
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                let p = i / groups_per_pattern;
                (k, (p, patterns[p].per_site.iter().sum()))
            })
            .collect();
        let site_counts: Vec<Vec<(i64, i64)>> = (0..sites)
            .map(|s| {
                keys.iter()
                    .enumerate()
                    .map(|(i, &k)| (k, patterns[i / groups_per_pattern].per_site[s]))
                    .filter(|c| c.1 > 0)
                    .collect()
            })
            .collect();

        // Per-site selection: each node releases on its own.
        let task = uuid::Uuid::new_v4();
        let partials: Vec<SitePartial> = site_counts
            .iter()
            .enumerate()
            .map(|(s, c)| SitePartial {
                site: format!("site-{s}"),
                batch: release(
                    &per_site_plan,
                    &[partial_rows(c)],
                    &format!("site-{s}"),
                    task,
                    &ReleaseOptions::default(),
                )
                .expect("release"),
            })
            .collect();
        let per_site = released(&combine(&per_site_plan, &partials, task).expect("combine"));

        // Secure selection: levels, then the release over the keys found.
        let mut person = 0;
        let key_batches: Vec<RecordBatch> = site_counts
            .iter()
            .map(|c| key_rows(c, &mut person))
            .collect();
        let mut selector = Selector::new(&secure_plan).expect("selector");
        while let Some(step) = selector.next_step() {
            levels_run += 1;
            let mut sum = Vec::new();
            for b in &key_batches {
                let v = secure_select::level_input(
                    &secure_plan,
                    &step,
                    std::slice::from_ref(b),
                    honest,
                    &mut rng,
                )
                .expect("level input");
                sum_into(&mut sum, &v);
            }
            let sigma = secure_select::level_sum_sigma(&secure_plan, &step, &vec![honest; sites])
                .expect("sigma");
            let sum: Vec<i64> = sum.iter().map(|&v| v as i64).collect();
            selector.absorb(&step, &sum, sigma).expect("absorb");
        }
        spent += selector.spent();
        let found = selector.keys();
        let selected = secure_select::with_selected_keys(&secure_plan, &found).expect("plan");
        let mut sum = Vec::new();
        for c in &site_counts {
            let v =
                confer_query::secure::node_input(&selected, &[partial_rows(c)], honest, &mut rng)
                    .expect("node input");
            sum_into(&mut sum, &v);
        }
        let secure = if found.is_empty() {
            BTreeMap::new()
        } else {
            let batch = confer_query::secure::decode(
                &selected,
                &sum,
                &vec![honest; sites],
                0,
                "secure sum",
                task,
            )
            .expect("decode");
            let partial = SitePartial {
                site: "secure sum".into(),
                batch,
            };
            released(&combine(&selected, &[partial], task).expect("combine"))
        };

        for (m, result) in [per_site, secure].iter().enumerate() {
            for (k, n) in result {
                match truth.get(k) {
                    Some(&(p, total)) => {
                        stats[p][m].0 += 1;
                        stats[p][m].1 += n / total as f64;
                    }
                    None => false_keys[m] += 1,
                }
            }
        }
    }

    println!(
        "{sites} sites, {groups_per_pattern} groups per shape, {reps} runs; epsilon 1, delta 1e-6, \
         COUNT(DISTINCT person_id) per private key, one group per person; secure: {honest} of {sites} \
         nodes' noise counted; {:.1} selection levels per run, spending rho {:.6} of the share {:.6}\n",
        levels_run as f64 / reps as f64,
        spent / reps as f64,
        secure_plan.cost.per_partial
    );
    println!(
        "| group shape | per-site: groups kept | per-site: released / true count | secure: groups kept | secure: released / true count |"
    );
    println!("|---|---|---|---|---|");
    let total = (groups_per_pattern * reps) as f64;
    for (p, pattern) in patterns.iter().enumerate() {
        let cell = |(kept, ratio): (usize, f64)| {
            let share = format!("{:.0}%", 100.0 * kept as f64 / total);
            let bias = if kept == 0 {
                "-".to_string()
            } else {
                format!("{:.3}", ratio / kept as f64)
            };
            (share, bias)
        };
        let (a, b) = cell(stats[p][0]);
        let (c, d) = cell(stats[p][1]);
        println!("| {} | {a} | {b} | {c} | {d} |", pattern.name);
    }
    println!(
        "\nkeys released that nobody holds: per-site {}, secure {}",
        false_keys[0], false_keys[1]
    );
}

fn rng_u64(_: &mut ChaCha20Rng) -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("OS random source");
    u64::from_le_bytes(b)
}
