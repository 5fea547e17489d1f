//! Releases as the researcher reads them: intervals that cover at their
//! nominal level at every noise scale (well below 1 included), for every
//! aggregate and both mechanisms; releases of any size (none, or several
//! Flight batches) from a node.

use arrow::array::{Array, Float64Array, Int64Array, RecordBatch};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::DataType;
use confer_cli::demo::ExtraTable;

use crate::fixture::{federation_with_tables, plain, plain_with_tables};
use crate::slt::{ExtraOwned, POLICY, extra_owned, extra_tables, shared};

fn column_f64(batches: &[RecordBatch], name: &str) -> Vec<Option<f64>> {
    let schema = batches[0].schema();
    let all = concat_batches(&schema, batches).expect("batches");
    let col = cast(all.column_by_name(name).expect(name), &DataType::Float64).expect("f64");
    let col = col.as_any().downcast_ref::<Float64Array>().expect("f64");
    (0..col.len())
        .map(|i| col.is_valid(i).then(|| col.value(i)))
        .collect()
}

/// Runs each query `runs` times and counts how often each aggregate's
/// interval holds the exact bounded value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intervals_cover_at_small_noise_scales_for_every_aggregate() {
    let extras = extra_owned(&extra_tables());
    let tables: Vec<ExtraTable<'_>> = extras.iter().map(ExtraOwned::table).collect();
    let fed = federation_with_tables(3, POLICY, &tables).await;
    let plain_ctx = plain_with_tables(&extras).await;
    let mut client = fed.client().await;
    // A 0 / 0.01 indicator: value partials at scales far below 1 (about
    // 0.1 to 0.4 per site).
    let x = "married * 0.01";
    let values = format!(
        "SUM({x}, contribution_bounds_per_group => (0, 0.01)) AS s, \
         AVG({x}, contribution_bounds_per_group => (0, 0.01)) AS a, \
         VAR_POP({x}, contribution_bounds_per_row => (0, 0.01)) AS v, \
         STDDEV_POP({x}, contribution_bounds_per_row => (0, 0.01)) AS sd FROM pums"
    );
    let truth_values = plain(
        &plain_ctx,
        &format!("SELECT SUM({x}), AVG({x}), VAR_POP({x}), STDDEV_POP({x}) FROM pums"),
    )
    .await;
    let truth_counts = plain(&plain_ctx, "SELECT COUNT(*), COUNT(DISTINCT pid) FROM pums").await;
    let truth = |batches: &[RecordBatch], i: usize| -> f64 {
        let c = cast(batches[0].column(i), &DataType::Float64).expect("f64");
        c.as_any()
            .downcast_ref::<Float64Array>()
            .expect("f64")
            .value(0)
    };
    let runs = 100;
    let mut table = Vec::new();
    for (mechanism, count_epsilon) in [("gaussian", 20), ("laplace", 4)] {
        // Counts at a scale of about 1/2 per site (where integer noise is
        // mostly zeros); values at epsilon 1.
        let queries = [
            (
                format!("epsilon = {count_epsilon}, delta = 1e-6, mechanism = '{mechanism}'"),
                "COUNT(*) AS n, COUNT(DISTINCT pid) AS persons FROM pums".to_string(),
                vec![
                    ("n", truth(&truth_counts, 0)),
                    ("persons", truth(&truth_counts, 1)),
                ],
            ),
            (
                format!("epsilon = 1, delta = 1e-6, mechanism = '{mechanism}'"),
                values.clone(),
                vec![
                    ("s", truth(&truth_values, 0)),
                    ("a", truth(&truth_values, 1)),
                    ("v", truth(&truth_values, 2)),
                    ("sd", truth(&truth_values, 3)),
                ],
            ),
        ];
        for (options, body, truths) in &queries {
            let sql = format!("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS ({options}) {body}");
            let mut covered = vec![0usize; truths.len()];
            let mut widths = vec![0.0f64; truths.len()];
            for _ in 0..runs {
                let answer = client.run(&sql, Some("test")).await.expect(&sql);
                for (k, (name, t)) in truths.iter().enumerate() {
                    let low = column_f64(&answer.batches, &format!("{name}_ci_low"))[0]
                        .expect("interval");
                    let high = column_f64(&answer.batches, &format!("{name}_ci_high"))[0]
                        .expect("interval");
                    assert!(low <= high, "{sql}: {name} interval ({low}, {high})");
                    if low - 1e-9 <= *t && *t <= high + 1e-9 {
                        covered[k] += 1;
                    }
                    widths[k] += (high - low) / runs as f64;
                }
            }
            for (k, (name, _)) in truths.iter().enumerate() {
                table.push(format!(
                    "| {mechanism} | {options} | {name} | 0.95 | {:.2} | {:.3e} |",
                    covered[k] as f64 / runs as f64,
                    widths[k]
                ));
            }
            for (k, (name, _)) in truths.iter().enumerate() {
                // 95% nominal: below 83 of 100 has probability about 1e-6.
                assert!(
                    covered[k] as f64 >= 0.83 * runs as f64,
                    "{sql}: {name} covered {} of {runs}\n{}",
                    covered[k],
                    table.join("\n")
                );
            }
        }
    }
    println!(
        "| mechanism | options | aggregate | nominal | measured | mean width |\n|---|---|---|---|---|---|\n{}",
        table.join("\n")
    );
    fed.federation.stop().await.expect("clean stop");
}

/// A node whose release has no row (no group of a private key survives
/// there) and releases larger than one Flight batch (a public domain of
/// 300,000 keys) are combined like any other; keys-only queries release
/// keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_large_and_keys_only_releases_are_answered() {
    let mut extras = extra_owned(&extra_tables());
    extras.push(ExtraOwned {
        name: "pums_ids".into(),
        source: shared("smartnoise_pums/PUMS_pid.csv"),
        unit: "pid",
        columns: "pid = { type = \"int64\", domain = { from = 1, to = 300000 } }\nage = { type = \"int64\", bounds = [0, 100] }",
    });
    let tables: Vec<ExtraTable<'_>> = extras.iter().map(ExtraOwned::table).collect();
    let fed = federation_with_tables(3, POLICY, &tables).await;
    let mut client = fed.client().await;

    // Only site-a has rows: the others release an empty batch.
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1e9, delta = 1e-6) \
               age, COUNT(*) AS n FROM pums WHERE site = 'site-a' AND age < 30 GROUP BY age";
    let answer = client.run(sql, Some("test")).await.expect(sql);
    let rows: usize = answer.batches.iter().map(RecordBatch::num_rows).sum();
    assert!(rows > 0, "site-a's groups are released");
    let n: f64 = column_f64(&answer.batches, "n")
        .iter()
        .map(|v| v.unwrap())
        .sum();
    assert!(n > 0.0);

    // Nothing anywhere: an empty answer, not an error.
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1e9, delta = 1e-6) \
               age, COUNT(*) AS n FROM pums WHERE age > 1000 GROUP BY age";
    let answer = client.run(sql, Some("test")).await.expect(sql);
    let rows: usize = answer.batches.iter().map(RecordBatch::num_rows).sum();
    assert_eq!(rows, 0);

    // 300,000 public groups: several MiB from each node.
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1e9, delta = 1e-6) \
               pid, COUNT(*) AS n FROM pums_ids GROUP BY pid";
    let answer = client.run(sql, Some("test")).await.expect(sql);
    let all = concat_batches(&answer.schema, &answer.batches).expect("batches");
    assert_eq!(all.num_rows(), 300_000);
    let n = all
        .column_by_name("n")
        .expect("n")
        .as_any()
        .downcast_ref::<Int64Array>()
        .expect("counts");
    assert_eq!(n.iter().map(|v| v.unwrap()).sum::<i64>(), 1000);

    // Keys only. A private key: the keys partition selection keeps, paid
    // for selection alone; each is a real age.
    let plain_ctx = plain_with_tables(&extras).await;
    let truth = plain(
        &plain_ctx,
        "SELECT age, COUNT(*) AS n FROM pums GROUP BY age",
    )
    .await;
    let truth = crate::fixture::keyed(&truth, 1, &["n"]);
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1e9, delta = 1e-6) age FROM pums GROUP BY age";
    let answer = client.run(sql, Some("test")).await.expect(sql);
    assert_eq!(answer.schema.fields().len(), 1, "{:?}", answer.schema);
    let released = crate::fixture::keyed(&answer.batches, 1, &[]);
    assert!(
        released.keys().all(|k| truth.contains_key(k)),
        "{released:?}"
    );
    let common = truth.values().filter(|v| v[0] >= 30.0).count();
    assert!(released.len() >= common, "{} of {common}", released.len());
    assert!(cost_epsilon(&answer.schema) > 0.0);
    // A public key: its domain, from no node, for nothing.
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6) educ FROM pums GROUP BY 1";
    let answer = client.run(sql, Some("test")).await.expect(sql);
    let released = crate::fixture::keyed(&answer.batches, 1, &[]);
    assert_eq!(released.len(), 16);
    assert_eq!(cost_epsilon(&answer.schema), 0.0);
    fed.federation.stop().await.expect("clean stop");
}

fn cost_epsilon(schema: &arrow::datatypes::Schema) -> f64 {
    let info: confer_protocol::release::ResultInfo =
        serde_json::from_str(&schema.metadata()[confer_protocol::metadata::RESULT])
            .expect("result info");
    info.cost_per_site.epsilon
}
