//! At epsilon = 1e9 the noise vanishes, so a federated DP query must return
//! exactly what the same bounded query returns in plain DataFusion over the
//! unsplit data (issue 2's acceptance test).

use crate::fixture::{federation, keyed, plain, plain_gibleed, single_i64};

const HUGE: &str = "epsilon = 1e9, delta = 1e-6";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_counts_equal_plain_datafusion_over_unsplit_data() {
    let fed = federation(3).await;
    let mut client = fed.client().await;
    let ctx = plain_gibleed().await;

    // 1. One row per person: COUNT(*) and COUNT(DISTINCT person_id) per sex.
    let dp = client
        .run(
            &format!(
                "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS ({HUGE}) gender_concept_id, COUNT(*) AS n, \
                 COUNT(DISTINCT person_id) AS persons FROM person GROUP BY gender_concept_id"
            ),
            Some("test"),
        )
        .await
        .expect("dp query");
    let truth = plain(
        &ctx,
        "SELECT gender_concept_id, COUNT(*) AS n, COUNT(DISTINCT person_id) AS persons FROM person \
         WHERE gender_concept_id IN (8507, 8532) GROUP BY gender_concept_id",
    )
    .await;
    assert_eq!(
        keyed(&dp.batches, 1, &["n", "persons"]),
        keyed(&truth, 1, &["n", "persons"])
    );
    assert_eq!(keyed(&dp.batches, 1, &["n"]).len(), 2);

    // 2. Many rows per person, a WHERE clause, and contribution bounds large
    //    enough to keep every row and group (no GiBleed person has 1000
    //    diagnoses of one condition; the sensitivity stays small enough for
    //    the noise to vanish at this epsilon): the plain GROUP BY.
    let dp = client
        .run(
            &format!(
                "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS ({HUGE}, max_groups_contributed = 10, \
                 max_rows_contributed = 1000) condition_concept_id, COUNT(*) AS n, \
                 COUNT(DISTINCT person_id) AS persons FROM condition_occurrence \
                 WHERE condition_start_date >= DATE '1990-01-01' GROUP BY condition_concept_id"
            ),
            Some("test"),
        )
        .await
        .expect("dp query");
    let truth = plain(
        &ctx,
        "SELECT condition_concept_id, COUNT(*) AS n, COUNT(DISTINCT person_id) AS persons \
         FROM condition_occurrence WHERE condition_start_date >= DATE '1990-01-01' \
         AND condition_concept_id IN (192671, 40481087, 4112343, 260139, 372328, 80180, 28060, 81151, 378001, 4283893) \
         GROUP BY condition_concept_id",
    )
    .await;
    let dp_rows = keyed(&dp.batches, 1, &["n", "persons"]);
    assert_eq!(dp_rows, keyed(&truth, 1, &["n", "persons"]));
    assert_eq!(
        dp_rows.len(),
        10,
        "every group of the public domain is released"
    );

    // 3. max_rows_contributed = 2: each person adds min(rows, 2) to a group.
    //    (Which two rows are kept is random; the count is not.)
    let dp = client
        .run(
            &format!(
                "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS ({HUGE}, max_groups_contributed = 10, \
                 max_rows_contributed = 2) condition_concept_id, COUNT(*) AS n FROM condition_occurrence \
                 GROUP BY condition_concept_id"
            ),
            Some("test"),
        )
        .await
        .expect("dp query");
    let truth = plain(
        &ctx,
        "SELECT condition_concept_id, CAST(SUM(LEAST(k, 2)) AS BIGINT) AS n FROM \
         (SELECT person_id, condition_concept_id, COUNT(*) AS k FROM condition_occurrence \
          WHERE condition_concept_id IN (192671, 40481087, 4112343, 260139, 372328, 80180, 28060, 81151, 378001, 4283893) \
          GROUP BY person_id, condition_concept_id) GROUP BY condition_concept_id",
    )
    .await;
    assert_eq!(keyed(&dp.batches, 1, &["n"]), keyed(&truth, 1, &["n"]));

    // 4. max_groups_contributed = 1: every person with a condition in the
    //    domain counts in exactly one (random) group, so the groups sum to
    //    the number of such persons.
    let dp = client
        .run(
            &format!(
                "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS ({HUGE}) condition_concept_id, \
                 COUNT(DISTINCT person_id) AS persons FROM condition_occurrence GROUP BY condition_concept_id"
            ),
            Some("test"),
        )
        .await
        .expect("dp query");
    let total: f64 = keyed(&dp.batches, 1, &["persons"])
        .values()
        .map(|v| v[0])
        .sum();
    let truth = single_i64(
        &plain(
            &ctx,
            "SELECT COUNT(DISTINCT person_id) FROM condition_occurrence WHERE condition_concept_id IN \
             (192671, 40481087, 4112343, 260139, 372328, 80180, 28060, 81151, 378001, 4283893)",
        )
        .await,
    );
    assert_eq!(total, truth as f64);

    // 5. Empty public groups are released (visit types absent from GiBleed),
    //    and `site` splits per node: person_id mod 3 decides the site.
    let dp = client
        .run(
            &format!(
                "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS ({HUGE}) site, visit_concept_id, COUNT(*) AS n \
                 FROM visit_occurrence GROUP BY site, visit_concept_id"
            ),
            Some("test"),
        )
        .await
        .expect("dp query");
    let truth = plain(
        &ctx,
        "SELECT CASE s WHEN 0 THEN 'site-a' WHEN 1 THEN 'site-b' ELSE 'site-c' END AS site, \
         visit_concept_id, COUNT(*) AS n FROM (SELECT DISTINCT person_id, person_id % 3 AS s, visit_concept_id \
         FROM visit_occurrence) GROUP BY 1, 2",
    )
    .await;
    let dp_rows = keyed(&dp.batches, 2, &["n"]);
    let mut want = keyed(&truth, 2, &["n"]);
    for site in ["site-a", "site-b", "site-c"] {
        for v in ["9201", "9202", "9203"] {
            want.entry(format!("{site}|{v}")).or_insert(vec![0.0]);
        }
    }
    assert_eq!(dp_rows, want);

    fed.federation.stop().await.expect("clean stop");
}

/// Public tables need no DP clause: each node answers from its own copy and
/// the rows come back tagged with their site. A subquery over a private
/// table makes the query private again, and it is refused without the
/// clause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_tables_are_queried_without_the_dp_clause() {
    use arrow::array::{Array, StringArray};
    let fed = federation(3).await;
    let mut client = fed.client().await;
    let answer = client
        .run(
            "SELECT concept_id, concept_name FROM concept WHERE concept_id = 192671",
            Some("test"),
        )
        .await
        .expect("public query");
    let schema = answer.schema.clone();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["site", "concept_id", "concept_name"]);
    let mut sites = Vec::new();
    for batch in &answer.batches {
        let site = batch
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("site");
        let name = batch
            .column(2)
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("name");
        for i in 0..batch.num_rows() {
            assert_eq!(name.value(i), "Gastrointestinal hemorrhage");
            sites.push(site.value(i).to_string());
        }
        assert_eq!(name.null_count(), 0);
    }
    sites.sort();
    assert_eq!(sites, ["site-a", "site-b", "site-c"]);

    for sql in [
        "SELECT gender_concept_id FROM person",
        "SELECT concept_name FROM concept WHERE concept_id IN (SELECT condition_concept_id FROM condition_occurrence)",
    ] {
        let err = client
            .run(sql, Some("test"))
            .await
            .expect_err("person-level data needs the clause")
            .to_string();
        assert!(err.contains("needs the DP clause"), "{sql}: {err}");
    }
    let err = client
        .run("SELECT concept_id AS site FROM concept", Some("test"))
        .await
        .expect_err("site is taken")
        .to_string();
    assert!(err.contains("rename it"), "{err}");
    fed.federation.stop().await.expect("clean stop");
}

/// EXPLAIN PRIVACY reports the noise as it reaches the released value:
/// summed over the sites for per-site aggregation, one site's for `GROUP BY
/// site`, and for secure aggregation the distributed noise of the sum,
/// which must equal what a real secure answer declares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_privacy_reports_the_released_noise() {
    use arrow::array::StringArray;
    use confer_protocol::metadata;
    let fed = federation(3).await;
    let mut client = fed.client().await;
    let explain = |batches: &[arrow::array::RecordBatch]| -> String {
        let mut out = String::new();
        for b in batches {
            let item = b
                .column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("item");
            let value = b
                .column(1)
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("value");
            for i in 0..b.num_rows() {
                if item.value(i).starts_with("aggregate") {
                    out.push_str(value.value(i));
                    out.push('\n');
                }
            }
        }
        out
    };
    let per_site = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6) gender_concept_id, COUNT(*) AS n FROM person GROUP BY gender_concept_id";
    let text = explain(
        &client
            .run(&format!("EXPLAIN PRIVACY {per_site}"), None)
            .await
            .expect("explain")
            .batches,
    );
    assert!(text.contains("over 3 node(s)"), "{text}");
    let by_site = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6) site, COUNT(*) AS n FROM person GROUP BY site";
    let text = explain(
        &client
            .run(&format!("EXPLAIN PRIVACY {by_site}"), None)
            .await
            .expect("explain")
            .batches,
    );
    assert!(text.contains("from its one site"), "{text}");

    let secure = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6, aggregation = 'secure') gender_concept_id, COUNT(*) AS n FROM person GROUP BY gender_concept_id";
    let text = explain(
        &client
            .run(&format!("EXPLAIN PRIVACY {secure}"), None)
            .await
            .expect("explain")
            .batches,
    );
    assert!(text.contains("2 contributing node(s)"), "{text}");
    let all: f64 = text
        .split("up to ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("the sd with every node");
    let answer = client
        .run(secure, Some("test"))
        .await
        .expect("secure query");
    let declared: f64 = answer
        .schema
        .field_with_name("n")
        .expect("n")
        .metadata()
        .get(metadata::NOISE_STDDEV)
        .and_then(|v| v.parse().ok())
        .expect("declared sd");
    assert!(
        (declared / all - 1.0).abs() < 1e-3,
        "explain {all} vs released {declared}"
    );
    fed.federation.stop().await.expect("clean stop");
}
