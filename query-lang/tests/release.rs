//! The release path as a node runs it (compile, DataFusion, OpenDP noise)
//! and the combine path as the coordinator runs it, on in-memory data.

use std::sync::Arc;

use arrow::array::{Array, Float64Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use confer_protocol::catalog::{CatalogInfo, ColumnInfo, ColumnType, Domain, TableInfo};
use confer_protocol::metadata;
use confer_protocol::release::ReleaseInfo;
use confer_query::combine::{SitePartial, combine};
use confer_query::{Catalog, Statement, compile, parse};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use uuid::Uuid;

const GROUPS: i64 = 5000;

fn catalog(node: &str) -> CatalogInfo {
    CatalogInfo {
        node: node.into(),
        tables: vec![TableInfo {
            name: "t".into(),
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
                    name: "g".into(),
                    column_type: ColumnType::Int64,
                    bounds: None,
                    domain: Some(Domain::Range {
                        lo: 0,
                        hi: GROUPS - 1,
                    }),
                    unique: false,
                },
            ],
            one_row_per_unit: false,
        }],
    }
}

/// Person p is in group p mod GROUPS, with one row: group g holds `persons / GROUPS` rows.
async fn session(persons: i64) -> SessionContext {
    let rows: Vec<(i64, i64)> = (0..persons).map(|p| (p, p % GROUPS)).collect();
    session_rows(&rows).await
}

/// A table `t` holding the given (person_id, g) rows.
async fn session_rows(rows: &[(i64, i64)]) -> SessionContext {
    let schema = Arc::new(Schema::new(vec![
        Field::new("person_id", DataType::Int64, false),
        Field::new("g", DataType::Int64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
        ],
    )
    .expect("batch");
    let ctx = confer_query::bounding::context();
    ctx.register_table(
        "t",
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).expect("table")),
    )
    .expect("register");
    ctx
}

/// What the node's local bounded query returns for `plan`.
async fn local_batches(
    ctx: &SessionContext,
    plan: &confer_query::FederatedPlan,
) -> Vec<RecordBatch> {
    ctx.sql(&plan.local_sql)
        .await
        .expect("plan")
        .collect()
        .await
        .expect("run")
}

async fn release_once(ctx: &SessionContext, sql: &str, node: &str) -> RecordBatch {
    let Statement::Query(parsed) = parse(sql).expect("parse") else {
        panic!("not a query")
    };
    let plan = compile(&parsed, &Catalog::for_node(&catalog(node)), Some(node))
        .await
        .expect("compile");
    let batches = local_batches(ctx, &plan).await;
    confer_query::release::release(&plan, &batches, node, Uuid::new_v4(), &Default::default())
        .expect("release")
}

fn release_info(batch: &RecordBatch) -> ReleaseInfo {
    serde_json::from_str(&batch.schema().metadata()[metadata::RELEASE]).expect("release info")
}

fn ints(batch: &RecordBatch, name: &str) -> Vec<i64> {
    let col = batch.column_by_name(name).expect("column");
    col.as_any()
        .downcast_ref::<Int64Array>()
        .expect("i64")
        .values()
        .to_vec()
}

/// The empirical spread of released counts around the truth matches the
/// noise scale the release declares (40,000 draws; the tolerance of 7
/// standard errors of the sample SD fails with probability below 1e-11).
#[tokio::test]
async fn released_noise_has_the_declared_spread() {
    let persons = 3 * GROUPS;
    let ctx = session(persons).await;
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.5, delta = 1e-6) g, COUNT(*) AS n FROM t GROUP BY g";
    let mut errors: Vec<f64> = Vec::new();
    let mut declared = None;
    for _ in 0..8 {
        let batch = release_once(&ctx, sql, "a").await;
        let info = release_info(&batch);
        let sd = info.partials[0].noise_stddev;
        assert!(declared.is_none_or(|d| d == sd));
        declared = Some(sd);
        let keys = ints(&batch, "g");
        let values = ints(&batch, "__p0");
        assert_eq!(
            keys.len(),
            GROUPS as usize,
            "every public group is released"
        );
        for v in values {
            errors.push((v - 3) as f64);
        }
    }
    let declared = declared.expect("releases");
    let n = errors.len() as f64;
    let mean = errors.iter().sum::<f64>() / n;
    let sd = (errors.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let tolerance = 7.0 * (2.0 / n).sqrt() / 2.0;
    assert!(
        (sd / declared - 1.0).abs() < tolerance,
        "empirical sd {sd} vs declared {declared}"
    );
    assert!(
        mean.abs() < 7.0 * declared / n.sqrt(),
        "noise is centred: mean {mean}"
    );
}

/// Combining three sites sums the counts and reports intervals whose
/// half-width is z * sqrt(sum of the sites' noise variances), rounded up
/// to a whole number.
#[tokio::test]
async fn combined_intervals_use_the_summed_variance() {
    let ctx = session(GROUPS).await;
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6, confidence = 0.9, nonnegative = 'false') g, COUNT(*) AS n FROM t GROUP BY g";
    let mut partials = Vec::new();
    let mut sds = Vec::new();
    for node in ["a", "b", "c"] {
        let batch = release_once(&ctx, sql, node).await;
        sds.push(release_info(&batch).partials[0].noise_stddev);
        partials.push(SitePartial {
            site: node.into(),
            batch,
        });
    }
    let infos: Vec<CatalogInfo> = ["a", "b", "c"].iter().map(|n| catalog(n)).collect();
    let Statement::Query(parsed) = parse(sql).expect("parse") else {
        panic!()
    };
    let plan = compile(&parsed, &Catalog::merge(&infos).expect("merge"), None)
        .await
        .expect("compile");
    let out = combine(&plan, &partials, Uuid::new_v4()).expect("combine");
    let n = ints(&out, "n");
    let low = out.column_by_name("n_ci_low").expect("low");
    let low = low.as_any().downcast_ref::<Float64Array>().expect("f64");
    let se = sds.iter().map(|s| s * s).sum::<f64>().sqrt();
    let z = confer_privacy::stats::z_for_confidence(0.9);
    for (i, value) in n.iter().enumerate() {
        // Integer noise: the half-width is z * se rounded up.
        assert!((*value as f64 - low.value(i) - (z * se - 1e-9).ceil()).abs() < 1e-6);
    }
    // The totals are the sums of the three sites' noisy counts.
    let by_site: Vec<Vec<i64>> = partials.iter().map(|p| ints(&p.batch, "__p0")).collect();
    for (i, value) in n.iter().enumerate() {
        assert_eq!(*value, by_site.iter().map(|v| v[i]).sum::<i64>());
    }
    let field = out.schema().field_with_name("n").expect("n").clone();
    assert_eq!(field.metadata()[metadata::MECHANISM], "gaussian");
    assert!(low.null_count() == 0);
}

/// With max_groups_contributed = 1, each person keeps one of their groups
/// chosen at random, independently of other persons: 4,000 persons in
/// groups 0 and 1 split about evenly (a shared order would put them all in
/// one group). Binomial sd is 32; the tolerance of 400 fails with
/// negligible probability.
#[tokio::test]
async fn each_person_keeps_independently_chosen_groups() {
    let persons = 4000;
    let rows: Vec<(i64, i64)> = (0..persons).flat_map(|p| [(p, 0), (p, 1)]).collect();
    let ctx = session_rows(&rows).await;
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1e9, delta = 1e-6, max_groups_contributed = 1) \
               g, COUNT(*) AS n FROM t GROUP BY g";
    let batch = release_once(&ctx, sql, "a").await;
    let keys = ints(&batch, "g");
    let values = ints(&batch, "__p0");
    let count = |g: i64| values[keys.iter().position(|k| *k == g).expect("group")];
    assert_eq!(count(0) + count(1), persons, "one group per person");
    assert!(
        (count(0) - persons / 2).abs() < 400,
        "groups 0 and 1 kept {} and {} times",
        count(0),
        count(1)
    );
}

/// The confidence intervals cover the true value at their stated rate:
/// 20,000 intervals at confidence 0.9 for a count and a bounded sum. The
/// sd of the coverage fraction is 0.0021; the tolerance of 0.015 is 7 sd.
#[tokio::test]
async fn intervals_cover_the_truth_at_the_stated_rate() {
    let ctx = session(GROUPS).await;
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.2, delta = 1e-6, confidence = 0.9) \
               g, COUNT(*) AS n, SUM(g, contribution_bounds_per_group => (0, 10)) AS s FROM t GROUP BY g";
    let Statement::Query(parsed) = parse(sql).expect("parse") else {
        panic!()
    };
    let plan = compile(
        &parsed,
        &Catalog::merge(&[catalog("a")]).expect("merge"),
        None,
    )
    .await
    .expect("compile");
    let mut covered = [0usize; 2];
    let mut total = 0usize;
    for _ in 0..4 {
        let batch = release_once(&ctx, sql, "a").await;
        let out = combine(
            &plan,
            &[SitePartial {
                site: "a".into(),
                batch,
            }],
            Uuid::new_v4(),
        )
        .expect("combine");
        let g = ints(&out, "g");
        for (k, name) in ["n", "s"].iter().enumerate() {
            let low = out.column_by_name(&format!("{name}_ci_low")).expect("low");
            let low = low.as_any().downcast_ref::<Float64Array>().expect("f64");
            let high = out
                .column_by_name(&format!("{name}_ci_high"))
                .expect("high");
            let high = high.as_any().downcast_ref::<Float64Array>().expect("f64");
            for (i, group) in g.iter().enumerate() {
                let truth = if k == 0 { 1.0 } else { (*group).min(10) as f64 };
                if low.value(i) <= truth && truth <= high.value(i) {
                    covered[k] += 1;
                }
            }
        }
        total += g.len();
    }
    assert_eq!(total, 4 * GROUPS as usize);
    for (k, name) in ["COUNT", "SUM"].iter().enumerate() {
        let rate = covered[k] as f64 / total as f64;
        assert!(
            (rate - 0.9).abs() < 0.0165,
            "{name} intervals covered {rate}"
        );
    }
}

/// Under secure aggregation the small-cell rule applies to the decoded sum:
/// two nodes' inputs summed, each group of 2 × 3 = 6 persons, is kept with
/// a threshold of 1 and suppressed with a threshold of 1,000 (the noise sd
/// at epsilon = 1e6 is the secure floor, about 1).
#[tokio::test]
async fn secure_sums_follow_the_small_cell_rule() {
    use confer_privacy::secagg::{ChaCha20Rng, SeedableRng};
    let ctx = session(3 * GROUPS).await;
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1e6, delta = 1e-6, aggregation = 'secure') \
               g, COUNT(*) AS n FROM t GROUP BY g";
    let Statement::Query(parsed) = parse(sql).expect("parse") else {
        panic!()
    };
    let plan = compile(&parsed, &Catalog::for_node(&catalog("a")), Some("a"))
        .await
        .expect("compile");
    let batches = local_batches(&ctx, &plan).await;
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let a = confer_query::secure::node_input(&plan, &batches, 2, &mut rng).expect("input");
    let b = confer_query::secure::node_input(&plan, &batches, 2, &mut rng).expect("input");
    let sum: Vec<u64> = a.iter().zip(&b).map(|(x, y)| x.wrapping_add(*y)).collect();
    let decode = |threshold| {
        confer_query::secure::decode(&plan, &sum, &[2, 2], threshold, "a+b", Uuid::new_v4())
            .expect("decode")
    };
    let kept = decode(1);
    assert_eq!(kept.column_by_name("__p0").expect("column").null_count(), 0);
    let counts = ints(&kept, "__p0");
    let mean = counts.iter().sum::<i64>() as f64 / counts.len() as f64;
    assert!(
        (mean - 6.0).abs() < 0.2,
        "the sums hold 6 per group: mean {mean}"
    );
    let suppressed = decode(1000);
    let column = suppressed.column_by_name("__p0").expect("column");
    assert_eq!(
        column.null_count(),
        GROUPS as usize,
        "every group suppressed"
    );
}

/// Interval columns of `name` in a combined result.
fn interval(out: &RecordBatch, name: &str) -> (Vec<f64>, Vec<f64>) {
    let column = |suffix: &str| {
        let c = out
            .column_by_name(&format!("{name}_{suffix}"))
            .expect("interval column");
        c.as_any()
            .downcast_ref::<Float64Array>()
            .expect("f64")
            .values()
            .to_vec()
    };
    (column("ci_low"), column("ci_high"))
}

/// Releases `sql` at one node and combines it as the coordinator would.
async fn release_and_combine(
    ctx: &SessionContext,
    info: &CatalogInfo,
    sql: &str,
) -> (RecordBatch, RecordBatch) {
    let Statement::Query(parsed) = parse(sql).expect("parse") else {
        panic!("not a query")
    };
    let node = info.node.as_str();
    let local = compile(&parsed, &Catalog::for_node(info), Some(node))
        .await
        .expect("compile");
    let batches = local_batches(ctx, &local).await;
    let batch =
        confer_query::release::release(&local, &batches, node, Uuid::new_v4(), &Default::default())
            .expect("release");
    let plan = compile(
        &parsed,
        &Catalog::merge(std::slice::from_ref(info)).expect("merge"),
        None,
    )
    .await
    .expect("compile");
    let out = combine(
        &plan,
        &[SitePartial {
            site: node.into(),
            batch: batch.clone(),
        }],
        Uuid::new_v4(),
    )
    .expect("combine");
    (batch, out)
}

/// Discrete Laplace releases (`mechanism = 'laplace'`): the spread of the
/// noise matches the declared sd, and the intervals at confidence 0.95
/// cover the truth at that rate. 40,000 counts (one person per group, the
/// scale b = 20). The Laplace's kurtosis is 6, so the sample sd has a
/// relative standard error of sqrt(5 / n) / 2 = 0.0056; the tolerance of 7
/// of them fails with probability below 1e-11. Coverage has sd 0.0011; the
/// tolerance of 0.0065 (6 sd) fails with probability below 1e-8, and would
/// catch normal-theory intervals (0.937 for one site's Laplace noise).
#[tokio::test]
async fn laplace_noise_has_the_declared_spread_and_its_intervals_cover() {
    let ctx = session(GROUPS).await;
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.05, delta = 0, mechanism = 'laplace', \
               confidence = 0.95, nonnegative = 'false') g, COUNT(*) AS n FROM t GROUP BY g";
    let info = catalog("a");
    let mut errors = Vec::new();
    let mut covered = 0usize;
    let mut declared = None;
    for _ in 0..8 {
        let (batch, out) = release_and_combine(&ctx, &info, sql).await;
        let release = release_info(&batch);
        assert_eq!(release.partials[0].mechanism, "laplace");
        let sd = release.partials[0].noise_stddev;
        assert!(declared.is_none_or(|d| d == sd));
        declared = Some(sd);
        let field = out.schema().field_with_name("n").expect("n").clone();
        assert_eq!(field.metadata()[metadata::MECHANISM], "laplace");
        let n = ints(&out, "n");
        let (low, high) = interval(&out, "n");
        assert_eq!(n.len(), GROUPS as usize);
        for (i, v) in n.iter().enumerate() {
            errors.push((v - 1) as f64);
            if low[i] <= 1.0 && 1.0 <= high[i] {
                covered += 1;
            }
        }
    }
    let declared = declared.expect("releases");
    assert!(
        (declared / (std::f64::consts::SQRT_2 * 20.0) - 1.0).abs() < 0.01,
        "b = 20: declared sd {declared}"
    );
    let n = errors.len() as f64;
    let mean = errors.iter().sum::<f64>() / n;
    let sd = (errors.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    assert!(
        (sd / declared - 1.0).abs() < 7.0 * (5.0 / n).sqrt() / 2.0,
        "empirical sd {sd} vs declared {declared}"
    );
    assert!(
        mean.abs() < 7.0 * declared / n.sqrt(),
        "centred: mean {mean}"
    );
    let rate = covered as f64 / n;
    eprintln!("laplace: sd {sd} declared {declared}, coverage {rate}");
    assert!((rate - 0.95).abs() < 0.0065, "coverage {rate}");
}

/// A table `m` of persons with a bounded value `v`, in 1,000 public groups.
fn moments_catalog() -> CatalogInfo {
    let int = |name: &str| ColumnInfo {
        name: name.into(),
        column_type: ColumnType::Int64,
        bounds: None,
        domain: None,
        unique: false,
    };
    let mut g = int("g");
    g.domain = Some(Domain::Range { lo: 0, hi: 999 });
    let mut v = int("v");
    v.bounds = Some((0.0, 100.0));
    CatalogInfo {
        node: "a".into(),
        tables: vec![TableInfo {
            name: "m".into(),
            privacy_unit: Some("person_id".into()),
            columns: vec![int("person_id"), g, v],
            one_row_per_unit: true,
        }],
    }
}

/// AVG, VAR_POP, STDDEV_POP and PERCENTILE_CONT intervals (ratios and moments of noisy sums,
/// by the delta method) cover the true group statistics at their stated
/// rate: 10,000 intervals each at confidence 0.9 (1,000 groups of 100
/// persons, 10 releases). The sd of a coverage fraction is 0.003; the
/// tolerance of 0.0165 is 5.5 sd (each fails with probability 4e-8).
/// The median's intervals (from the noisy 64-bin histogram) must cover at
/// least that often: they are conservative (0.999 measured). OpenDP's exact
/// samplers dominate the time (69,000 draws a release).
#[tokio::test]
async fn moment_intervals_cover_the_truth_at_the_stated_rate() {
    let persons: i64 = 100_000;
    let value = |p: i64| (p * 37 + p / 1000) % 101;
    let schema = Arc::new(Schema::new(vec![
        Field::new("person_id", DataType::Int64, false),
        Field::new("g", DataType::Int64, false),
        Field::new("v", DataType::Int64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from_iter_values(0..persons)),
            Arc::new(Int64Array::from_iter_values((0..persons).map(|p| p % 1000))),
            Arc::new(Int64Array::from_iter_values((0..persons).map(value))),
        ],
    )
    .expect("batch");
    let ctx = confer_query::bounding::context();
    ctx.register_table(
        "m",
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).expect("table")),
    )
    .expect("register");
    // The truth per group: mean and population variance of v.
    let mut sums = vec![(0.0f64, 0.0f64, 0.0f64); 1000];
    for p in 0..persons {
        let v = value(p) as f64;
        let s = &mut sums[(p % 1000) as usize];
        *s = (s.0 + 1.0, s.1 + v, s.2 + v * v);
    }
    // And the median (PERCENTILE_CONT's linear interpolation).
    let mut values: Vec<Vec<f64>> = vec![Vec::new(); 1000];
    for p in 0..persons {
        values[(p % 1000) as usize].push(value(p) as f64);
    }
    let medians: Vec<f64> = values
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            let at = (v.len() - 1) as f64 * 0.5;
            let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (at - lo as f64)
        })
        .collect();
    let truth = |g: usize| {
        let (n, s1, s2) = sums[g];
        let mean = s1 / n;
        (mean, s2 / n - mean * mean)
    };
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 2, delta = 1e-6, confidence = 0.9) \
               g, AVG(v) AS mean_v, VAR_POP(v) AS var_v, STDDEV_POP(v) AS sd_v, \
               PERCENTILE_CONT(v, 0.5) AS median_v FROM m GROUP BY g";
    let info = moments_catalog();
    let names = ["mean_v", "var_v", "sd_v", "median_v"];
    let mut covered = [0usize; 4];
    let mut total = 0usize;
    for _ in 0..10 {
        let (_, out) = release_and_combine(&ctx, &info, sql).await;
        let g = ints(&out, "g");
        for (k, name) in names.iter().enumerate() {
            let (low, high) = interval(&out, name);
            for (i, group) in g.iter().enumerate() {
                let (mean, var) = truth(*group as usize);
                let t = [mean, var, var.sqrt(), medians[*group as usize]][k];
                if low[i] <= t && t <= high[i] {
                    covered[k] += 1;
                }
            }
        }
        total += g.len();
    }
    assert_eq!(total, 10_000);
    for (k, name) in names.iter().enumerate() {
        let rate = covered[k] as f64 / total as f64;
        eprintln!("{name}: coverage {rate}");
        if *name == "median_v" {
            // The histogram's intervals are conservative: they bound the
            // noisy CDF's error, and the bins' width is inside them.
            assert!(rate > 0.9 - 0.0165, "{name} intervals covered {rate}");
        } else {
            assert!(
                (rate - 0.9).abs() < 0.0165,
                "{name} intervals covered {rate}"
            );
        }
    }
}
