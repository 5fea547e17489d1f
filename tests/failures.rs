//! Bad input and failures: each gets a clear error naming the problem.

use std::time::Duration;

use crate::fixture::federation;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_are_refused_with_what_to_change() {
    let fed = federation(2).await;
    let mut client = fed.client().await;
    let dp = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6)";
    let cases = [
        ("SELEC COUNT(*) FROM person".to_string(), "syntax error"),
        (
            format!("{dp} COUNT(*) FROM persons"),
            "table persons is not in the network catalog",
        ),
        (format!("{dp} COUNT(*) FROM person WHERE yob > 1950"), "yob"),
        (
            format!("{dp} year_of_birth, COUNT(*) FROM person GROUP BY gender_concept_id"),
            "year_of_birth is neither",
        ),
        (
            format!("{dp} person_id FROM person"),
            "neither a GROUP BY key nor a DP aggregate",
        ),
        (
            format!(
                "{dp} COUNT(*) FROM person WHERE year_of_birth > (SELECT AVG(year_of_birth) FROM person)"
            ),
            "scalar subquery over person-level tables",
        ),
        (
            format!("{dp} MAX(year_of_birth) FROM person"),
            "MAX on private values is not allowed",
        ),
        (
            "SELECT COUNT(*) FROM person".to_string(),
            "needs the DP clause",
        ),
        (
            "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1) COUNT(*) FROM person"
                .to_string(),
            "needs delta > 0",
        ),
        (
            format!("{dp} COUNT(*) OVER () FROM person"),
            "window functions",
        ),
    ];
    for (sql, want) in cases {
        let err = client
            .run(&sql, Some("test"))
            .await
            .expect_err(&sql)
            .to_string();
        assert!(err.contains(want), "{sql}\n  gave: {err}\n  want: {want}");
    }
    fed.federation.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_is_down_is_named() {
    let mut fed = federation(2).await;
    let mut client = fed.client().await;
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6) COUNT(*) AS n FROM person";
    client.run(sql, Some("test")).await.expect("both nodes up");

    let down = fed.federation.nodes.pop().expect("a node");
    let name = down.label.trim_start_matches("node ").to_string();
    down.kill().await.expect("kill node");
    tokio::time::sleep(Duration::from_millis(200)).await;

    let err = client
        .run(sql, Some("test"))
        .await
        .expect_err("a node is down")
        .to_string();
    assert!(err.contains(&name), "error should name {name}: {err}");
    fed.federation.stop().await.expect("clean stop");
}
