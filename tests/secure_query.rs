//! `aggregation = 'secure'` end to end: real node processes run a
//! secure-aggregation session over Flight (one action per round); the
//! coordinator learns only the sum, which equals the plain bounded answer up
//! to the distributed noise, and a node that is down is left out.

use std::collections::BTreeMap;
use std::time::Duration;

use arrow::array::{Array, Float64Array, Int64Array};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use confer_protocol::metadata;

use crate::fixture::{federation, plain, plain_gibleed};

fn column(batches: &[arrow::array::RecordBatch], i: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for b in batches {
        let c = cast(b.column(i), &DataType::Float64).expect("number");
        let c = c.as_any().downcast_ref::<Float64Array>().expect("f64");
        out.extend((0..c.len()).map(|r| c.value(r)));
    }
    out
}

fn keys(batches: &[arrow::array::RecordBatch]) -> Vec<i64> {
    let mut out = Vec::new();
    for b in batches {
        let c = cast(b.column(0), &DataType::Int64).expect("int");
        let c = c.as_any().downcast_ref::<Int64Array>().expect("i64");
        out.extend((0..c.len()).map(|r| c.value(r)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_sums_equal_the_plain_bounded_query() {
    let mut fed = federation(3).await;
    let mut client = fed.client().await;
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1e9, delta = 1e-6, aggregation = 'secure') \
               gender_concept_id, COUNT(*) AS n, \
               AVG(year_of_birth, contribution_bounds_per_group => (1900, 2030)) AS yob \
               FROM person GROUP BY gender_concept_id ORDER BY gender_concept_id";
    let answer = client.run(sql, Some("test")).await.expect("secure query");
    let ctx = plain_gibleed().await;
    let want = plain(
        &ctx,
        "SELECT gender_concept_id, COUNT(*) AS n, AVG(LEAST(GREATEST(year_of_birth, 1900), 2030)) AS yob \
         FROM person GROUP BY gender_concept_id ORDER BY gender_concept_id",
    )
    .await;
    assert_eq!(keys(&answer.batches), keys(&want));
    // Each of 3 nodes adds N_Z(0, sigma^2 / t) with sigma at its floor of
    // sqrt(t)/2: the sum's standard deviation is below 1, so 8 is > 8 sigma.
    let yob = answer.schema.index_of("yob").expect("yob column");
    for (got, exact) in column(&answer.batches, 1).iter().zip(column(&want, 1)) {
        assert!((got - exact).abs() <= 8.0, "count {got} vs {exact}");
    }
    for (got, exact) in column(&answer.batches, yob).iter().zip(column(&want, 2)) {
        assert!(
            (got - exact).abs() <= 0.5,
            "mean year of birth {got} vs {exact}"
        );
    }
    let info = answer
        .schema
        .metadata()
        .get(metadata::RESULT)
        .expect("result info");
    assert!(
        info.contains("secure sum of site-a+site-b+site-c"),
        "{info}"
    );

    // A node that is down is a dropout: by default a secure query needs a
    // majority (n/2 + 1 = 2 of 3), so the others answer, and the result
    // names the missing site.
    let down = fed.federation.take_node("site-c").expect("site-c");
    down.kill().await.expect("kill");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = client
        .run(sql, Some("test"))
        .await
        .expect("two sites suffice");
    let missing = answer
        .schema
        .metadata()
        .get(metadata::MISSING_SITES)
        .cloned()
        .unwrap_or_default();
    assert_eq!(missing, "site-c");
    let counts: BTreeMap<i64, f64> = keys(&answer.batches)
        .into_iter()
        .zip(column(&answer.batches, 1))
        .collect();
    let all: f64 = column(&want, 1).iter().sum();
    assert!(
        counts.values().sum::<f64>() < all - 100.0,
        "site-c's persons are left out"
    );
    // With min_sites = 3 every site is needed, and the refusal names site-c.
    let sql3 = sql.replace(
        "aggregation = 'secure'",
        "aggregation = 'secure', min_sites = 3",
    );
    let err = client
        .run(&sql3, Some("test"))
        .await
        .expect_err("three sites needed")
        .to_string();
    assert!(err.contains("site-c"), "{err}");
    fed.federation.stop().await.expect("clean stop");
}

/// A private group key under `aggregation = 'secure'`: the keys are found
/// from the network's securely summed counts, level by level, and the
/// counts released over them equal the plain ones up to the distributed
/// noise. Every node's ledger is charged the query's cost (the levels and
/// the release together), never more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_selection_finds_private_keys_from_the_combined_counts() {
    let fed = federation(3).await;
    let mut client = fed.client().await;
    // procedure_concept_id has no public domain; no person has more than
    // 15 procedures: nothing is cut by bounding.
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1e9, delta = 1e-6, \
               aggregation = 'secure', max_groups_contributed = 15) \
               procedure_concept_id, COUNT(DISTINCT person_id) AS persons \
               FROM procedure_occurrence GROUP BY procedure_concept_id ORDER BY 1";
    let explain = client
        .run(&format!("EXPLAIN PRIVACY {sql}"), Some("test"))
        .await
        .expect("explain");
    let text = crate::fixture::keyed(&explain.batches, 2, &[]);
    assert!(
        text.keys()
            .any(|k| k.contains("secure, over the network's combined counts")),
        "{text:?}"
    );
    let spent =
        |batches: &[arrow::array::RecordBatch]| crate::fixture::keyed(batches, 1, &["spent_rho"]);
    let before = spent(
        &client
            .run("SHOW PRIVACY BUDGET FOR STUDY test", Some("test"))
            .await
            .expect("budget")
            .batches,
    );
    let answer = client
        .run(sql, Some("test"))
        .await
        .expect("secure selection");
    let after = spent(
        &client
            .run("SHOW PRIVACY BUDGET FOR STUDY test", Some("test"))
            .await
            .expect("budget")
            .batches,
    );
    let ctx = plain_gibleed().await;
    let want: BTreeMap<i64, f64> = {
        let b = plain(
            &ctx,
            "SELECT procedure_concept_id, COUNT(DISTINCT person_id) FROM procedure_occurrence \
             GROUP BY procedure_concept_id ORDER BY 1",
        )
        .await;
        keys(&b).into_iter().zip(column(&b, 1)).collect()
    };
    let got: BTreeMap<i64, f64> = keys(&answer.batches)
        .into_iter()
        .zip(column(&answer.batches, 1))
        .collect();
    // Summed noise has sd below 1 here (three nodes at their floor): a key
    // nobody holds passes the threshold with probability below delta, and
    // every key of 20 persons or more clears it by far.
    for (k, n) in &got {
        let exact = want
            .get(k)
            .unwrap_or_else(|| panic!("key {k} is held by nobody"));
        assert!((n - exact).abs() <= 8.0, "key {k}: {n} vs {exact}");
    }
    for (k, n) in &want {
        if *n >= 20.0 {
            assert!(got.contains_key(k), "key {k} with {n} persons not found");
        }
    }
    assert!(
        got.len() >= 44,
        "{} keys found of {}",
        got.len(),
        want.len()
    );
    // Every node paid the query's cost once (selection levels + release).
    let cost = text
        .keys()
        .find_map(|k| {
            k.split("rho (zCDP) = ")
                .nth(1)
                .and_then(|t| {
                    t.split(|c: char| c != '.' && !c.is_ascii_digit() && c != 'e' && c != '+')
                        .next()
                })
                .and_then(|v| v.parse::<f64>().ok())
        })
        .expect("cost in EXPLAIN");
    for (node, b) in &before {
        let a = after.get(node).expect("node still reported");
        let paid = a[0] - b[0];
        assert!(
            paid > 0.5 * cost && paid <= cost * (1.0 + 1e-6),
            "{node} paid {paid} for a query that costs {cost}"
        );
    }
    fed.federation.stop().await.expect("clean stop");
}
