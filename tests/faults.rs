//! Resilient fan-out with real node processes: a node killed mid-query, a
//! node slower than its deadline, a node answering garbage. Each gives the
//! documented outcome (the query fails naming the node, or, when the
//! query's `min_sites` allows, answers from the others and names the missing
//! site), and leaves every ledger consistent.

use std::path::Path;
use std::time::Duration;

use confer_cli::demo::{FederationOptions, start_coordinator, start_nodes};
use confer_coordinator::config::NodeEntry;
use confer_coordinator::fanout::NodeHandle;
use confer_protocol::metadata;

use crate::fixture::{STUDIES, TEST_POLICY, USERS, gibleed, keyed};
use crate::proxy::{Proxy, RogueNode};

const CONFER: &str = env!("CARGO_BIN_EXE_confer");

fn options() -> FederationOptions<'static> {
    FederationOptions {
        sites: 3,
        coordinator_port: 0,
        log_level: "error",
        policy: TEST_POLICY,
        users: USERS,
        studies: STUDIES,
        extra_tables: &[],
    }
}

fn query(min_sites: Option<usize>) -> String {
    let min = min_sites
        .map(|m| format!(", min_sites = {m}"))
        .unwrap_or_default();
    format!(
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1e9, delta = 1e-6{min}) site, COUNT(*) AS n \
         FROM person GROUP BY site"
    )
}

fn audit_ok(work: &Path, site: &str) {
    let out = std::process::Command::new(CONFER)
        .args(["audit", "verify", "--config"])
        .arg(work.join(format!("{site}.toml")))
        .output()
        .expect("audit verify");
    assert!(
        out.status.success(),
        "{site}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_killed_and_garbage_nodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path();
    let opts = options();
    let mut nodes = start_nodes(Path::new(CONFER), &gibleed(), work, &opts)
        .await
        .expect("nodes");
    // Each site sits behind a proxy that can slow its link; a fourth node,
    // rogue, answers with garbage.
    let mut proxies = Vec::new();
    for n in &nodes.nodes {
        proxies.push(Proxy::start(n.addr).await);
    }
    let real_c = NodeHandle::new(
        &NodeEntry {
            name: "site-c".into(),
            url: format!("http://{}", nodes.nodes[2].addr),
        },
        None,
    )
    .expect("handle");
    let catalog = real_c
        .catalog(Duration::from_secs(10))
        .await
        .expect("catalog");
    let rogue = RogueNode::start(catalog, "rogue").await;
    let mut urls: Vec<String> = proxies
        .iter()
        .map(|p| format!("http://{}", p.addr))
        .collect();
    nodes.names.push("rogue".into());
    urls.push(format!("http://{rogue}"));
    let fed = start_coordinator(
        Path::new(CONFER),
        work,
        nodes,
        &urls,
        "node_timeout_secs = 2\nretries = 1",
        &opts,
    )
    .await
    .expect("coordinator");
    let mut client = fed.client("tester").await.expect("client");

    // Garbage: with every site required the query fails naming the rogue node.
    let err = client
        .run(&query(None), Some("test"))
        .await
        .expect_err("garbage")
        .to_string();
    assert!(
        err.contains("rogue") && err.contains("does not fit"),
        "{err}"
    );
    // With min_sites = 3 the three honest sites answer, and the answer says rogue is missing.
    let answer = client
        .run(&query(Some(3)), Some("test"))
        .await
        .expect("three sites suffice");
    let rows = keyed(&answer.batches, 1, &["n"]);
    assert_eq!(rows.len(), 4, "every site of the network is a group");
    assert!(
        rows["rogue"][0].is_nan(),
        "the rogue site's group is unknown (NULL), not 0"
    );
    assert_eq!(
        answer
            .schema
            .metadata()
            .get(metadata::MISSING_SITES)
            .map(String::as_str),
        Some("rogue")
    );

    // Slow: site-c answers after its 2 s deadline. It misses the check
    // every node gets before any runs the query, so it is left out before
    // anything is spent, there or elsewhere.
    proxies[2].set_delay_down_ms(2500);
    let err = client
        .run(&query(Some(4)), Some("test"))
        .await
        .expect_err("deadline")
        .to_string();
    assert!(
        err.contains("site-c") && err.contains("did not answer within 2 s"),
        "{err}"
    );
    assert!(
        err.contains("only 3 of 4 sites can answer") && err.contains("nothing was spent"),
        "{err}"
    );
    // A node that missed a deadline is left out at once for a while (a
    // probe in the background brings it back when it answers in time), so
    // a hung node costs one deadline, not one per query and attempt.
    let err = client
        .run(&query(Some(4)), Some("test"))
        .await
        .expect_err("still slow")
        .to_string();
    assert!(
        err.contains("site-c did not answer within 2 s") && err.contains("left out"),
        "{err}"
    );
    let answer = client
        .run(&query(Some(2)), Some("test"))
        .await
        .expect("two sites suffice");
    let missing = answer
        .schema
        .metadata()
        .get(metadata::MISSING_SITES)
        .cloned()
        .unwrap_or_default();
    assert!(
        missing.contains("site-c") && missing.contains("rogue"),
        "{missing}"
    );
    proxies[2].set_delay_down_ms(0);

    // Killed mid-query: site-b dies while the query is in flight (the link
    // holds each request for a second, so the kill lands after the
    // coordinator sent site-b the query's check and before site-b could
    // answer).
    let mut fed = fed;
    proxies[1].set_delay_up_ms(1000);
    let victim = fed.take_node("site-b").expect("site-b");
    let slow = tokio::spawn({
        let url = fed.url();
        let token = fed.tokens["tester"].clone();
        async move {
            let mut c = confer_cli::client::Client::connect(&url, Some(&token))
                .await
                .expect("client");
            c.run(&query(Some(4)), Some("test")).await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    victim.kill().await.expect("kill site-b");
    proxies[1].set_delay_up_ms(0);
    let err = slow
        .await
        .expect("join")
        .expect_err("site-b died")
        .to_string();
    assert!(err.contains("site-b"), "{err}");

    // Every surviving node's ledger and audit log are consistent, and the
    // federation still answers with the sites it has: site-c, whose link is
    // fast again, is back as soon as a probe finds it answering in time.
    let mut attempts = 0;
    let answer = loop {
        match client.run(&query(Some(2)), Some("test")).await {
            Ok(a) => break a,
            Err(e) if attempts < 20 && e.to_string().contains("left out") => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("still answering: {e}"),
        }
    };
    assert!(answer.schema.metadata()[metadata::MISSING_SITES].contains("site-b"));
    fed.stop().await.expect("clean stop");
    for site in ["site-a", "site-b", "site-c"] {
        audit_ok(work, site);
    }
    // site-c, left out at its check while slow, holds a debit only for
    // each query it released: none for the queries it missed.
    let ledger = confer_node::ledger::Ledger::open(&work.join("state").join("site-c"))
        .expect("site-c ledger");
    let records = ledger
        .audit_records(&confer_node::ledger::AuditFilter::default())
        .expect("audit");
    let released: f64 = records
        .iter()
        .filter(|r| r.decision == "released" && r.kind == "query")
        .map(|r| r.rho)
        .sum();
    let spent = ledger.spent("test", None).expect("spent");
    assert!(
        (spent - released).abs() <= 1e-9 * released,
        "spent {spent}, released {released}"
    );
}
