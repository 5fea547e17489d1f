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
                },
                ColumnInfo {
                    name: "g".into(),
                    column_type: ColumnType::Int64,
                    bounds: None,
                    domain: Some(Domain::Range {
                        lo: 0,
                        hi: GROUPS - 1,
                    }),
                },
            ],
            one_row_per_unit: false,
        }],
    }
}

/// Person p is in group p mod GROUPS, with one row: group g holds `persons / GROUPS` rows.
async fn session(persons: i64) -> SessionContext {
    let schema = Arc::new(Schema::new(vec![
        Field::new("person_id", DataType::Int64, false),
        Field::new("g", DataType::Int64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from_iter_values(0..persons)),
            Arc::new(Int64Array::from_iter_values(
                (0..persons).map(|p| p % GROUPS),
            )),
        ],
    )
    .expect("batch");
    let ctx = SessionContext::new();
    ctx.register_table(
        "t",
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).expect("table")),
    )
    .expect("register");
    ctx
}

async fn release_once(ctx: &SessionContext, sql: &str, node: &str) -> RecordBatch {
    let Statement::Query(parsed) = parse(sql).expect("parse") else {
        panic!("not a query")
    };
    let plan = compile(&parsed, &Catalog::for_node(&catalog(node)), Some(node))
        .await
        .expect("compile");
    let batches = ctx
        .sql(&plan.local_sql)
        .await
        .expect("plan")
        .collect()
        .await
        .expect("run");
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
/// half-width is z * sqrt(sum of the sites' noise variances).
#[tokio::test]
async fn combined_intervals_use_the_summed_variance() {
    let ctx = session(GROUPS).await;
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6, confidence = 0.9) g, COUNT(*) AS n FROM t GROUP BY g";
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
        assert!((*value as f64 - low.value(i) - z * se).abs() < 1e-6);
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
