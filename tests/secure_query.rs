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
