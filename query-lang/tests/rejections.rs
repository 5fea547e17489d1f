//! What the dialect makes of the SELECT list, joins and post-processing,
//! checked on the compiled plan. The refusal suite itself is data:
//! `tests/slt/refusals.slt`, run by `tests/slt.rs`.

mod common;

use common::{catalog_info, col};
use confer_protocol::catalog::{CatalogInfo, ColumnType, TableInfo};
use confer_query::{Catalog, Statement, compile, parse};

/// The tests' catalog at one node.
fn catalog() -> Catalog {
    Catalog::for_node(&catalog_info("site-a"))
}

const DP: &str = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6)";

async fn refusal(sql: &str) -> String {
    let catalog = catalog();
    let result = match parse(sql) {
        Err(e) => return e.to_string(),
        Ok(Statement::Query(q)) | Ok(Statement::ExplainPrivacy(q)) => {
            compile(&q, &catalog, None).await
        }
        Ok(other) => panic!("{sql}: unexpected statement {other:?}"),
    };
    match result {
        Ok(_) => "(accepted)".into(),
        Err(e) => e.to_string(),
    }
}

/// Joins through which one person's rows could multiply the work are
/// marked (a node then answers the query at a fixed time); the usual
/// shapes are not.
#[tokio::test]
async fn joins_one_person_could_slow_down_are_marked() {
    let mut catalog = catalog();
    catalog.set_unique("concept", "concept_id");
    let cases = [
        (
            "FROM person p JOIN condition_occurrence c ON c.person_id = p.person_id",
            false,
        ),
        (
            "FROM condition_occurrence c JOIN concept k ON k.concept_id = c.condition_concept_id",
            false,
        ),
        (
            "FROM person WHERE person_id IN (SELECT person_id FROM condition_occurrence)",
            false,
        ),
        (
            "FROM condition_occurrence c JOIN concept k ON k.concept_name = 'x'",
            true,
        ),
        ("FROM condition_occurrence c CROSS JOIN concept k", true),
        (
            "FROM condition_occurrence c1 JOIN condition_occurrence c2 ON c1.person_id = c2.person_id",
            true,
        ),
        // A self-equality of the public side keys nothing.
        (
            "FROM condition_occurrence c JOIN concept k ON k.concept_id = k.concept_id",
            true,
        ),
        // Correlated subqueries, concatenation, costly public relations.
        (
            "FROM condition_occurrence c WHERE EXISTS (SELECT 1 FROM concept k WHERE k.concept_id > c.provider_id)",
            true,
        ),
        (
            "FROM condition_occurrence c WHERE CAST(c.provider_id AS VARCHAR) || 'x' = 'a'",
            true,
        ),
        (
            "FROM condition_occurrence c JOIN (SELECT k1.concept_id FROM concept k1 JOIN concept k2 \
             ON k1.concept_name = k2.concept_name) j ON j.concept_id = c.condition_concept_id",
            true,
        ),
        (
            "FROM condition_occurrence c WHERE c.condition_concept_id IN (SELECT concept_id FROM concept)",
            false,
        ),
    ];
    for (from, marked) in cases {
        let sql = format!("{DP} COUNT(*) AS n {from}");
        let Ok(Statement::Query(q)) = parse(&sql) else {
            panic!("{sql}")
        };
        let plan = compile(&q, &catalog, None).await.expect(&sql);
        assert_eq!(
            plan.amplification.is_some(),
            marked,
            "{from}: {:?}",
            plan.amplification
        );
    }
}

/// A join of two person-level tables on the person and on a column one of
/// them declares unique (checked by the node at start) matches each row at
/// most once, so it is not marked; the same join on a column not declared
/// unique, or without the unique side, is.
#[tokio::test]
async fn joins_on_a_declared_unique_column_are_not_marked() {
    let mut info = catalog_info("site-a");
    let int = ColumnType::Int64;
    let mut visit_id = col("visit_occurrence_id", int);
    visit_id.unique = true;
    info.tables.push(TableInfo {
        name: "visit_occurrence".into(),
        privacy_unit: Some("person_id".into()),
        columns: vec![visit_id, col("person_id", int), col("care_site_id", int)],
        one_row_per_unit: false,
    });
    info.tables.push(TableInfo {
        name: "cost".into(),
        privacy_unit: Some("person_id".into()),
        columns: vec![
            col("cost_event_id", int),
            col("person_id", int),
            col("visit_detail_id", int),
        ],
        one_row_per_unit: false,
    });
    let catalog = Catalog::for_node(&info);
    let cases = [
        (
            "FROM cost c JOIN visit_occurrence v ON c.person_id = v.person_id AND c.cost_event_id = v.visit_occurrence_id",
            false,
        ),
        (
            "FROM visit_occurrence v JOIN cost c ON v.visit_occurrence_id = c.cost_event_id AND v.person_id = c.person_id",
            false,
        ),
        // Not on the unique column: a person's cost rows times their visits.
        (
            "FROM cost c JOIN visit_occurrence v ON c.person_id = v.person_id AND c.visit_detail_id = v.care_site_id",
            true,
        ),
        (
            "FROM cost c JOIN visit_occurrence v ON c.person_id = v.person_id",
            true,
        ),
        // Two copies of the non-unique side.
        (
            "FROM cost c JOIN cost d ON c.person_id = d.person_id AND c.cost_event_id = d.cost_event_id",
            true,
        ),
    ];
    for (from, marked) in cases {
        let sql = format!("{DP} COUNT(*) AS n {from}");
        let Ok(Statement::Query(q)) = parse(&sql) else {
            panic!("{sql}")
        };
        let plan = compile(&q, &catalog, None).await.expect(&sql);
        assert_eq!(
            plan.amplification.is_some(),
            marked,
            "{from}: {:?}",
            plan.amplification
        );
    }
}

async fn plan_of(sql: &str) -> confer_query::FederatedPlan {
    let Ok(Statement::Query(q)) = parse(sql) else {
        panic!("{sql}")
    };
    compile(&q, &catalog(), None)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn columns(plan: &confer_query::FederatedPlan) -> Vec<String> {
    plan.output_schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect()
}

/// The SELECT list as people write it is accepted, and means what it
/// means in plain SQL: positions and aliases in GROUP BY name SELECT
/// items, qualification and parentheses do not change an expression.
#[tokio::test]
async fn group_by_positions_aliases_and_qualified_names_are_the_keys() {
    let plain = plan_of(&format!(
        "{DP} gender_concept_id, COUNT(*) AS n FROM person GROUP BY gender_concept_id"
    ))
    .await;
    for sql in [
        format!("{DP} gender_concept_id, COUNT(*) AS n FROM person GROUP BY 1 ORDER BY 1"),
        format!("{DP} gender_concept_id AS g, COUNT(*) AS n FROM person GROUP BY g"),
        format!("{DP} p.gender_concept_id, COUNT(*) AS n FROM person p GROUP BY gender_concept_id"),
        format!("{DP} gender_concept_id, COUNT(*) AS n FROM person p GROUP BY p.gender_concept_id"),
        format!("{DP} GENDER_CONCEPT_ID, (COUNT(*)) AS n FROM person GROUP BY (gender_concept_id)"),
    ] {
        let plan = plan_of(&sql).await;
        assert_eq!(plan.groups.len(), 1, "{sql}");
        assert_eq!(plan.groups[0].domain, plain.groups[0].domain, "{sql}");
        assert_eq!(plan.aggregates.len(), 1, "{sql}");
        assert_eq!(plan.aggregates[0].name, "n", "{sql}");
        assert!(plan.derived.is_none(), "{sql}: nothing to post-process");
        assert_eq!(columns(&plan).len(), 4, "{sql}: {:?}", columns(&plan));
    }
    // A name that is both an alias and a column is the column (as in
    // PostgreSQL): the aliased item is then not a key.
    let msg = refusal(&format!(
        "{DP} year_of_birth AS gender_concept_id, COUNT(*) AS n FROM person GROUP BY gender_concept_id"
    ))
    .await;
    assert!(
        msg.contains("year_of_birth is neither a GROUP BY key"),
        "{msg}"
    );
}

/// Expressions of released values in the SELECT list are post-processing:
/// the aggregates in them are released (once each), the expression is
/// evaluated over them, and intervals follow monotone maps of one value.
#[tokio::test]
async fn expressions_of_released_values_are_post_processing() {
    let plan = plan_of(&format!(
        "{DP} gender_concept_id + 0 AS g, COUNT(*) * 2 AS twice, 3 AS three, \
         100.0 * COUNT(year_of_birth) / COUNT(*) AS pct, COUNT(*) AS n, \
         POWER(AVG(year_of_birth, contribution_bounds_per_group => (1900, 2030)), 2) AS sq \
         FROM person GROUP BY gender_concept_id"
    ))
    .await;
    // COUNT(*) once, COUNT(year_of_birth) and AVG (two partials each).
    assert_eq!(plan.aggregates.len(), 3, "{:?}", plan.aggregates);
    let derived = plan.derived.as_ref().expect("post-processed");
    let names = columns(&plan);
    assert_eq!(
        names,
        [
            "g",
            "twice",
            "twice_ci_low",
            "twice_ci_high",
            "three",
            "pct",
            "pct_ci_low",
            "pct_ci_high",
            "n",
            "n_ci_low",
            "n_ci_high",
            "sq",
            "sq_ci_low",
            "sq_ci_high"
        ],
        "{derived:?}"
    );
    let column = |name: &str| derived.columns.iter().find(|c| c.name == name).expect(name);
    assert!(column("twice").interval_note.is_none());
    assert!(
        column("twice_ci_low")
            .sql
            .as_deref()
            .unwrap()
            .contains("LEAST")
    );
    assert!(
        column("pct")
            .interval_note
            .as_deref()
            .unwrap()
            .contains("several released values")
    );
    assert!(!column("three").noisy && !column("g").noisy);
    // x^2 is monotone only where x >= 0: its interval is guarded.
    assert!(column("sq_ci_low").sql.as_deref().unwrap().contains(">= 0"));
    let meta = plan
        .output_schema()
        .field_with_name("pct")
        .unwrap()
        .metadata()
        .clone();
    assert!(
        meta.contains_key(confer_protocol::metadata::INTERVAL_NOTE),
        "{meta:?}"
    );
}

/// A refusal names the unit column the tables have, not OMOP's.
#[tokio::test]
async fn refusals_name_the_tables_own_unit_column() {
    let int = ColumnType::Int64;
    let catalog = Catalog::for_node(&CatalogInfo {
        node: "site-a".into(),
        tables: vec![TableInfo {
            name: "pums".into(),
            privacy_unit: Some("pid".into()),
            columns: vec![col("pid", int), col("age", int)],
            one_row_per_unit: true,
        }],
    });
    let sql = format!("{DP} COUNT(*) AS n FROM (SELECT age FROM pums) t");
    let Ok(Statement::Query(q)) = parse(&sql) else {
        panic!("{sql}")
    };
    let msg = compile(&q, &catalog, None)
        .await
        .expect_err("drops the unit")
        .to_string();
    assert!(
        msg.contains("keep pid itself") && !msg.contains("person_id"),
        "{msg}"
    );
}

/// The SELECT list's expressions are evaluated over the released table,
/// with intervals mapped through monotone functions.
#[tokio::test]
async fn post_processing_evaluates_over_the_released_table() {
    use arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch};
    use std::sync::Arc;
    let plan = plan_of(&format!(
        "{DP} gender_concept_id + 0 AS g, COUNT(*) * 2 AS twice, 3 AS three, \
         100.0 * COUNT(year_of_birth) / COUNT(*) AS pct \
         FROM person GROUP BY gender_concept_id ORDER BY twice DESC"
    ))
    .await;
    let release = plan.release_schema();
    let names: Vec<String> = release.fields().iter().map(|f| f.name().clone()).collect();
    // Two groups: counts 10 (interval 8..12) and 20 (18..22), COUNT(year) 5 and 10.
    let columns: Vec<ArrayRef> = names
        .iter()
        .map(|n| -> ArrayRef {
            let (a, b) = match n.as_str() {
                "gender_concept_id" => return Arc::new(Int64Array::from(vec![8507, 8532])),
                "twice" | "__agg0" => (10.0, 20.0),
                "twice_ci_low" | "__agg0_ci_low" => (8.0, 18.0),
                "twice_ci_high" | "__agg0_ci_high" => (12.0, 22.0),
                _ if n.ends_with("_ci_low") => (4.0, 9.0),
                _ if n.ends_with("_ci_high") => (6.0, 11.0),
                _ => (5.0, 10.0),
            };
            if release.field_with_name(n).unwrap().data_type() == &arrow::datatypes::DataType::Int64
            {
                Arc::new(Int64Array::from(vec![a as i64, b as i64]))
            } else {
                Arc::new(Float64Array::from(vec![a, b]))
            }
        })
        .collect();
    let batch = RecordBatch::try_new(release.clone(), columns).expect("batch");
    let (schema, out) = confer_query::engine::post_process(&plan, batch)
        .await
        .expect("post");
    let out = arrow::compute::concat_batches(&schema, &out).expect("concat");
    let f = |name: &str| -> Vec<f64> {
        let c = arrow::compute::cast(
            out.column_by_name(name).expect(name),
            &arrow::datatypes::DataType::Float64,
        )
        .unwrap();
        c.as_any()
            .downcast_ref::<Float64Array>()
            .unwrap()
            .values()
            .to_vec()
    };
    assert_eq!(f("g"), [8532.0, 8507.0], "{names:?}");
    assert_eq!(f("twice"), [40.0, 20.0]);
    assert_eq!(f("twice_ci_low"), [36.0, 16.0]);
    assert_eq!(f("twice_ci_high"), [44.0, 24.0]);
    assert_eq!(f("three"), [3.0, 3.0]);
    assert_eq!(f("pct"), [50.0, 50.0]);
    assert!(out.column_by_name("pct_ci_low").unwrap().is_null(0));
}

/// Keys-only queries: private keys cost their partition selection alone,
/// public ones nothing (their answer is the domain).
#[tokio::test]
async fn keys_only_queries_release_keys() {
    let private = plan_of(&format!(
        "{DP} care_site_id FROM person GROUP BY care_site_id"
    ))
    .await;
    assert!(private.partials.is_empty() && private.aggregates.is_empty());
    assert!(
        private.selection.is_some(),
        "private keys: partition selection"
    );
    assert!(private.cost.rho > 0.0);
    assert!(!private.public_keys_only());
    let public = plan_of(&format!(
        "{DP} gender_concept_id AS g FROM person GROUP BY 1"
    ))
    .await;
    assert!(public.public_keys_only());
    assert_eq!(public.cost.rho, 0.0);
    assert_eq!(columns(&public), ["g"]);
}

/// Statements too long, or with too many operators to plan safely, are
/// refused before planning.
#[test]
fn oversized_statements_are_refused_before_planning() {
    let chain = vec!["year_of_birth"; 600].join(" + ");
    let msg = parse(&format!("{DP} COUNT(*) FROM person WHERE {chain} > 0"))
        .expect_err("too many operators")
        .to_string();
    assert!(
        msg.contains("at most 500 are accepted") && msg.contains("IN (...)"),
        "{msg}"
    );
    let ok = vec!["year_of_birth"; 400].join(" + ");
    assert!(parse(&format!("{DP} COUNT(*) FROM person WHERE {ok} > 0")).is_ok());
    let long = format!(
        "{DP} COUNT(*) FROM person WHERE year_of_birth IN ({})",
        vec!["1"; 140_000].join(", ")
    );
    let msg = parse(&long).expect_err("too long").to_string();
    assert!(msg.contains("bytes long"), "{msg}");
}
