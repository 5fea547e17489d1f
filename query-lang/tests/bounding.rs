//! The bounding operator computes what DataFusion's window functions
//! compute: `row_number`, `rank` and `dense_rank` over partitions, with
//! ties, NULLs, several columns of keys, text keys, descending orders and
//! several ranking columns in one query, on one partition and on several.
//! And the keyed hash keeps each person's choice independent of others.

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The test table's columns, filled row by row.
type Columns = (
    Vec<i64>,
    Vec<Option<i64>>,
    Vec<Option<i64>>,
    Vec<Option<String>>,
    Vec<Option<i64>>,
    Vec<Option<f64>>,
);

/// Rows `(id, p, q, t, o, x)`: `id` unique, `p` and `q` small partition
/// keys (NULL sometimes), `t` text, `o` an order key with many ties and
/// NULLs, `x` a float with ties.
fn table(rows: usize, seed: u64, batches: usize) -> (Arc<Schema>, Vec<RecordBatch>) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("p", DataType::Int64, true),
        Field::new("q", DataType::Int64, true),
        Field::new("t", DataType::Utf8, true),
        Field::new("o", DataType::Int64, true),
        Field::new("x", DataType::Float64, true),
    ]));
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    let per = rows.div_ceil(batches.max(1)).max(1);
    let mut id = 0i64;
    while (id as usize) < rows {
        let n = per.min(rows - id as usize);
        let mut cols: Columns = Default::default();
        for _ in 0..n {
            let r = rng.next();
            cols.0.push(id);
            cols.1
                .push((!r.is_multiple_of(50)).then_some((r >> 8) as i64 % 97));
            cols.2
                .push((!r.is_multiple_of(23)).then_some((r >> 16) as i64 % 3));
            cols.3
                .push((!r.is_multiple_of(31)).then(|| format!("k{}", (r >> 24) % 5)));
            cols.4
                .push((!r.is_multiple_of(7)).then_some((r >> 32) as i64 % 6));
            cols.5
                .push((!r.is_multiple_of(11)).then_some(((r >> 40) % 4) as f64 / 2.0));
            id += 1;
        }
        out.push(
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from(cols.0)) as ArrayRef,
                    Arc::new(Int64Array::from(cols.1)),
                    Arc::new(Int64Array::from(cols.2)),
                    Arc::new(StringArray::from(cols.3)),
                    Arc::new(Int64Array::from(cols.4)),
                    Arc::new(Float64Array::from(cols.5)),
                ],
            )
            .expect("batch"),
        );
    }
    (schema, out)
}

async fn rows_of(ctx: &SessionContext, sql: &str) -> Vec<String> {
    let batches = ctx
        .sql(sql)
        .await
        .expect("plan")
        .collect()
        .await
        .expect("run");
    let text = arrow::util::pretty::pretty_format_batches(&batches)
        .expect("format")
        .to_string();
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("| ") && !l.contains(" id "))
        .map(|l| l.split('|').map(str::trim).collect::<Vec<_>>().join("|"))
        .collect();
    lines.sort();
    lines
}

fn register(ctx: &SessionContext, schema: Arc<Schema>, batches: Vec<RecordBatch>) {
    ctx.register_table(
        "r",
        Arc::new(MemTable::try_new(schema, vec![batches]).expect("table")),
    )
    .expect("register");
}

/// Queries whose every output row is determined (ties only where the
/// function gives peers the same value, or broken by `id`).
const QUERIES: &[&str] = &[
    "SELECT id, row_number() OVER (PARTITION BY p ORDER BY o, id) AS r FROM r",
    "SELECT id, rank() OVER (PARTITION BY p ORDER BY o) AS r FROM r",
    "SELECT id, dense_rank() OVER (PARTITION BY p ORDER BY o) AS r FROM r",
    "SELECT id, dense_rank() OVER (PARTITION BY p, q ORDER BY o DESC NULLS FIRST, x) AS r FROM r",
    "SELECT id, rank() OVER (PARTITION BY t ORDER BY x DESC NULLS LAST) AS r FROM r",
    "SELECT id, dense_rank() OVER (PARTITION BY p) AS r FROM r",
    "SELECT id, rank() OVER (PARTITION BY q, t ORDER BY t, o) AS r FROM r",
    "SELECT id, row_number() OVER (PARTITION BY p ORDER BY o, id) AS a, \
     dense_rank() OVER (PARTITION BY p, q ORDER BY x) AS b FROM r",
    "SELECT id, a FROM (SELECT id, row_number() OVER (PARTITION BY p, t ORDER BY id DESC) AS a FROM r) WHERE a <= 2",
    "SELECT id, row_number() OVER (PARTITION BY p + q ORDER BY o * 2, id) AS r FROM r WHERE o IS NOT NULL",
    // One or two integer keys, one float or integer order without NULLs:
    // the operator's fast paths.
    "SELECT id, row_number() OVER (PARTITION BY p, q ORDER BY id * 1.5 DESC) AS r FROM r",
    "SELECT id, row_number() OVER (PARTITION BY q ORDER BY id) AS r FROM r",
];

#[tokio::test]
async fn ranks_equal_the_window_functions() {
    for (rows, batches, partitions) in [
        (0, 1, 1),
        (1, 1, 1),
        (700, 1, 1),
        (5000, 7, 4),
        (20_000, 3, 2),
    ] {
        let (schema, data) = table(rows, rows as u64 + 1, batches);
        let config = || {
            SessionConfig::new()
                .with_target_partitions(partitions)
                .with_batch_size(512)
        };
        let ours = confer_query::bounding::context_with_config(config());
        let theirs = SessionContext::new_with_config(config());
        register(&ours, schema.clone(), data.clone());
        register(&theirs, schema, data);
        for sql in QUERIES {
            let a = rows_of(&ours, sql).await;
            let b = rows_of(&theirs, sql).await;
            assert_eq!(a.len(), b.len(), "{sql} ({rows} rows)");
            assert!(a == b, "{sql} ({rows} rows): the ranks differ");
        }
    }
}

#[tokio::test]
async fn the_operator_runs_in_place_of_the_sort_and_the_window() {
    let (schema, data) = table(100, 3, 1);
    let ctx = confer_query::bounding::context();
    register(&ctx, schema, data);
    let plan = rows_of(
        &ctx,
        "EXPLAIN SELECT id, row_number() OVER (PARTITION BY p ORDER BY o) AS r FROM r",
    )
    .await
    .join("\n");
    assert!(plan.contains("HashRankExec"), "{plan}");
    assert!(!plan.contains("SortExec"), "{plan}");
    assert!(!plan.contains("WindowAggExec"), "{plan}");
    // Without PARTITION BY, or for another window function, DataFusion's
    // window runs.
    for sql in [
        "EXPLAIN SELECT id, row_number() OVER (ORDER BY o) AS r FROM r",
        "EXPLAIN SELECT id, sum(o) OVER (PARTITION BY p ORDER BY id) AS r FROM r",
    ] {
        let plan = rows_of(&ctx, sql).await.join("\n");
        assert!(!plan.contains("HashRankExec"), "{sql}: {plan}");
    }
}

#[tokio::test]
async fn the_operator_stays_within_the_memory_limit() {
    // Fails with a resources error (which a node charges), never by
    // exhausting the process.
    let (schema, data) = table(200_000, 5, 8);
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_limit(2 << 20, 1.0)
        .build_arc()
        .expect("runtime");
    let state = datafusion::execution::session_state::SessionStateBuilder::new_from_existing(
        confer_query::bounding::context().state(),
    )
    .with_runtime_env(runtime)
    .build();
    let ctx = SessionContext::new_with_state(state);
    register(&ctx, schema, data);
    let err = ctx
        .sql("SELECT id, row_number() OVER (PARTITION BY p, t ORDER BY o) AS r FROM r")
        .await
        .expect("plan")
        .collect()
        .await
        .expect_err("2 MiB cannot hold 200,000 rows");
    assert!(
        matches!(
            err.find_root(),
            datafusion::error::DataFusionError::ResourcesExhausted(_)
        ),
        "{err}"
    );
}

#[tokio::test]
async fn the_keyed_hash_depends_on_the_salt_and_the_values_only() {
    let (schema, data) = table(2000, 9, 3);
    let ctx = confer_query::bounding::context();
    register(&ctx, schema.clone(), data.clone());
    let hashes = |sql: &'static str| {
        let ctx = &ctx;
        async move { rows_of(ctx, sql).await }
    };
    let a = hashes("SELECT id, confer_hash(42, p, t, x) FROM r").await;
    let b = hashes("SELECT id, confer_hash(42, p, t, x) FROM r ORDER BY random()").await;
    assert_eq!(a, b, "a row's hash does not depend on the other rows");
    let c = hashes("SELECT id, confer_hash(43, p, t, x) FROM r").await;
    let same = a.iter().zip(&c).filter(|(x, y)| x == y).count();
    assert_eq!(same, 0, "another salt gives other hashes");
    // The same values in another table (a neighbouring dataset: one
    // person fewer) hash the same.
    let fewer = data[0].slice(1, data[0].num_rows() - 1);
    let ctx2 = confer_query::bounding::context();
    register(&ctx2, schema, vec![fewer]);
    let d = rows_of(&ctx2, "SELECT id, confer_hash(42, p, t, x) FROM r").await;
    assert!(d.iter().all(|row| a.contains(row)));
    let nulls = rows_of(
        &ctx,
        "SELECT count(*) AS id FROM r WHERE confer_hash(p, t, x) IS NULL",
    )
    .await;
    assert_eq!(nulls, vec!["|0|".to_string()]);
}

#[tokio::test]
async fn one_row_per_person_is_enforced_unless_the_node_checked_these_files() {
    use confer_protocol::catalog::{CatalogInfo, ColumnInfo, ColumnType, TableInfo};
    let column = |name: &str| ColumnInfo {
        name: name.into(),
        column_type: ColumnType::Int64,
        bounds: None,
        domain: None,
        unique: false,
    };
    let catalog = confer_query::Catalog::for_node(&CatalogInfo {
        node: "n".into(),
        tables: vec![
            TableInfo {
                name: "person".into(),
                privacy_unit: Some("person_id".into()),
                columns: vec![column("person_id"), column("year_of_birth")],
                one_row_per_unit: true,
            },
            TableInfo {
                name: "obs".into(),
                privacy_unit: Some("person_id".into()),
                columns: vec![column("person_id"), column("code")],
                one_row_per_unit: false,
            },
        ],
    });
    let local = |sql: &'static str, verified: &'static [&'static str]| {
        let catalog = &catalog;
        async move {
            let confer_query::Statement::Query(q) = confer_query::parse(sql).expect("parse") else {
                panic!("a query")
            };
            let options = confer_query::CompileOptions {
                verified_one_row: verified.iter().map(|t| t.to_string()).collect(),
                ..Default::default()
            };
            let plan = confer_query::compile_with(&q, catalog, Some("n"), &options)
                .await
                .expect("compiles");
            (
                plan.local_sql.contains("__confer_one"),
                plan.one_row_trusted,
            )
        }
    };
    let count = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6) COUNT(*) AS n FROM person";
    assert_eq!(local(count, &[]).await, (true, false));
    assert_eq!(local(count, &["person"]).await, (false, true));
    // Filtered by another table's persons: obs is not checked, so the
    // query enforces one row per person.
    let semi = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6) COUNT(*) AS n FROM person \
                WHERE person_id IN (SELECT person_id FROM obs WHERE code = 5)";
    assert_eq!(local(semi, &["person"]).await, (true, false));
    assert_eq!(local(semi, &["person", "obs"]).await, (false, true));
}
