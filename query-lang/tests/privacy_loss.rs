//! Empirical privacy loss of each mechanism as a node releases it.
//!
//! A query is compiled as a node compiles it; its partials are noised by
//! the very [`confer_privacy::Noise`] the release path uses, many times over
//! two neighbouring exact values (one person more). The best threshold test
//! tells the two apart with probabilities `p` and `q`; the measured epsilon
//! is `ln((q_low - delta) / p_high)`, with `q_low` and `p_high` Hoeffding
//! bounds that hold with probability 1 - 1e-9 each. It must not exceed the
//! epsilon the query is charged, and (so that the test can see a mechanism
//! that leaks) it must come near it for the Laplace mechanism, whose loss
//! is exactly epsilon in its tails.

use confer_protocol::catalog::{CatalogInfo, ColumnInfo, ColumnType, TableInfo};
use confer_query::{Catalog, Statement, compile, parse};

/// Draws per neighbour: integers are cheap, floats (sampled exactly at a
/// fine granularity) are not.
const INT_DRAWS: usize = 200_000;
const FLOAT_DRAWS: usize = 25_000;

fn catalog() -> Catalog {
    Catalog::for_node(&CatalogInfo {
        node: "a".into(),
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
                    name: "v".into(),
                    column_type: ColumnType::Float64,
                    bounds: Some((0.0, 10.0)),
                    domain: None,
                    unique: false,
                },
            ],
            one_row_per_unit: true,
        }],
    })
}

async fn plan(sql: &str) -> confer_query::FederatedPlan {
    let Statement::Query(parsed) = parse(sql).expect("parse") else {
        panic!("not a query")
    };
    compile(&parsed, &catalog(), Some("a"))
        .await
        .expect("compile")
}

/// Hoeffding's half-width for `n` draws at failure probability `p`.
fn hoeffding(n: usize, p: f64) -> f64 {
    ((1.0 / p).ln() / (2.0 * n as f64)).sqrt()
}

/// The largest log-ratio a threshold test shows between draws `a` (the
/// smaller neighbour) and `b` (one person more), conservatively.
fn measured_epsilon(a: &[f64], b: &[f64], delta: f64) -> f64 {
    let mut sorted_a = a.to_vec();
    let mut sorted_b = b.to_vec();
    sorted_a.sort_by(f64::total_cmp);
    sorted_b.sort_by(f64::total_cmp);
    let n = a.len();
    // Thresholds tested: quantiles of b's draws; a union bound over them.
    let thresholds: Vec<f64> = (1..200).map(|i| sorted_b[i * n / 200]).collect();
    let slack = hoeffding(n, 1e-9 / thresholds.len() as f64);
    let above =
        |s: &[f64], t: f64| (s.len() - s.partition_point(|x| *x < t)) as f64 / s.len() as f64;
    let mut best = f64::NEG_INFINITY;
    for t in thresholds {
        let q_low = above(&sorted_b, t) - slack - delta;
        let p_high = above(&sorted_a, t) + slack;
        if q_low > 0.0 && p_high > 0.0 {
            best = best.max((q_low / p_high).ln());
        }
    }
    best
}

async fn check(sql: &str, exact: (f64, f64), float: bool, power: Option<f64>) {
    let plan = plan(sql).await;
    assert_eq!(plan.partials.len(), 1, "{sql}");
    let noise = plan.noise(0).expect("noise");
    let draws = |value: f64| -> Vec<f64> {
        if float {
            noise.apply_f64(&vec![value; FLOAT_DRAWS]).expect("noise")
        } else {
            noise
                .apply_i64(&vec![value as i64; INT_DRAWS])
                .expect("noise")
                .into_iter()
                .map(|v| v as f64)
                .collect()
        }
    };
    let (a, b) = (draws(exact.0), draws(exact.1));
    let charged = plan.cost.epsilon;
    let delta = plan.cost.delta;
    let measured = measured_epsilon(&a, &b, delta);
    println!(
        "{sql}\n  charged epsilon {charged:.4} (delta {delta:e}), measured at most {measured:.4}"
    );
    assert!(
        measured <= charged,
        "{sql}: the releases tell neighbours apart with epsilon {measured} > the charged {charged}"
    );
    if let Some(share) = power {
        assert!(
            measured >= share * charged,
            "{sql}: measured epsilon {measured} is below {share} of the charged {charged}: the test \
             has lost its power to see a leak"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measured_privacy_loss_stays_below_the_charge() {
    // Laplace counts: the loss in the tails is exactly epsilon.
    check(
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, mechanism = 'laplace') COUNT(*) AS n FROM t",
        (100.0, 101.0),
        false,
        Some(0.6),
    )
    .await;
    // Gaussian counts, at (1, 1e-6).
    check(
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, delta = 1e-6) COUNT(*) AS n FROM t",
        (100.0, 101.0),
        false,
        Some(0.05),
    )
    .await;
    // A Gaussian sum of values in [0, 10], one person adding the bound.
    check(
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 2.0, delta = 1e-6) SUM(v) AS s FROM t",
        (500.0, 510.0),
        true,
        Some(0.02),
    )
    .await;
    // A Laplace sum.
    check(
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 2.0, mechanism = 'laplace') SUM(v) AS s FROM t",
        (500.0, 510.0),
        true,
        Some(0.4),
    )
    .await;
}
