//! Node governance end to end: budgets drain and then refuse with figures,
//! policy refusals are explained and audited, manual approval holds a study,
//! signatures, expiry and replays are checked, and the audit log detects
//! tampering.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use confer_cli::children::ServerChild;
use confer_coordinator::config::NodeEntry;
use confer_coordinator::fanout::NodeHandle;
use confer_coordinator::service::custom;
use confer_coordinator::store::NodeStatus;
use confer_protocol::ErrorKind;
use confer_protocol::signing::Identity;
use confer_protocol::task::Task;

use crate::fixture::{federation_with, keyed};

const CONFER: &str = env!("CARGO_BIN_EXE_confer");

const POLICY: &str = r#"[policy]
approval = "auto"
max_query_epsilon = 2.0

[policy.studies.small]
budget = { epsilon = 1.0, delta = 1e-6 }
researchers = ["alice"]
tables = ["person"]
"#;

fn count_query(epsilon: f64) -> String {
    format!(
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = {epsilon}, delta = 1e-6) \
         gender_concept_id, COUNT(*) AS n FROM person GROUP BY gender_concept_id"
    )
}

fn confer(args: &[&str]) -> (bool, String) {
    let out = Command::new(CONFER)
        .args(args)
        .output()
        .expect("run confer");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn node_config(work: &Path, site: &str) -> String {
    work.join(format!("{site}.toml")).display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_drain_then_refuse_and_refusals_are_audited() {
    let fed = federation_with(2, POLICY).await;
    let work = fed.federation.work_dir.clone();
    let mut alice = fed.client_as("alice").await;

    // Drain: queries at epsilon 0.4 until the study's budget refuses one.
    let mut answered = 0;
    let err = loop {
        match alice.run(&count_query(0.4), Some("small")).await {
            Ok(_) => answered += 1,
            Err(e) => break e.to_string(),
        }
        assert!(answered < 50, "the budget never ran out");
    };
    let rho_each = confer_privacy::accounting::rho_for_epsilon_delta(0.4, 1e-6).expect("rho");
    let budget = confer_privacy::accounting::rho_for_epsilon_delta(1.0, 1e-6).expect("rho");
    assert_eq!(answered, (budget / rho_each).floor() as usize, "{err}");
    assert!(err.contains("budget exhausted for study small"), "{err}");
    assert!(
        err.contains("remains") && err.contains("needs rho"),
        "the figures are given: {err}"
    );

    // The coordinator reports what each node and the network spent.
    let show = alice
        .run("SHOW PRIVACY BUDGET FOR STUDY small", Some("small"))
        .await
        .expect("show");
    let rows = keyed(&show.batches, 1, &["spent_rho", "budget_rho"]);
    for site in ["site-a", "site-b"] {
        let spent = rows[site][0];
        assert!(
            (spent - answered as f64 * rho_each).abs() < 1e-9,
            "{site}: {spent}"
        );
        assert!((rows[site][1] - budget).abs() < 1e-12);
    }
    let network = rows
        .iter()
        .find(|(k, _)| k.starts_with("network"))
        .expect("network row");
    assert!((network.1[0] - answered as f64 * rho_each).abs() < 1e-9);

    // Policy refusals, each with its reason.
    let cases = [
        ("alice", "small", count_query(3.0), "per-task cap"),
        (
            "mallory",
            "small",
            count_query(0.1),
            "researcher mallory is not a member of study small",
        ),
        (
            "alice",
            "other",
            count_query(0.1),
            "study other is not admitted",
        ),
        (
            "alice",
            "small",
            "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.1, delta = 1e-6) COUNT(*) AS n \
             FROM condition_occurrence"
                .to_string(),
            "may not read table condition_occurrence",
        ),
    ];
    for (researcher, study, sql, want) in cases {
        let mut c = fed.client_as(researcher).await;
        let err = c.run(&sql, Some(study)).await.expect_err(want).to_string();
        assert!(err.contains(want), "{err}\n  want: {want}");
    }

    // Every refusal is in each node's audit log, and the log verifies.
    let cfg = node_config(&work, "site-a");
    let (ok, out) = confer(&["audit", "verify", "--config", &cfg]);
    assert!(ok, "{out}");
    let (ok, log) = confer(&["audit", "show", "--config", &cfg, "--format", "jsonl"]);
    assert!(ok, "{log}");
    for want in [
        "per-task cap",
        "researcher mallory is not a member",
        "study other is not admitted",
        "may not read table condition_occurrence",
        "budget exhausted",
    ] {
        assert!(log.contains(want), "audit log lacks {want:?}");
    }
    let released = log
        .lines()
        .filter(|l| l.contains("\"decision\":\"released\"") && l.contains("\"kind\":\"query\""))
        .count();
    assert_eq!(released, answered);

    // Tampering with the database is detected and the record named.
    let db = work.join("state").join("site-a").join("ledger.sqlite");
    let conn = rusqlite::Connection::open(&db).expect("open ledger");

    // Deleting the debits (which refunds the budget) is detected from the
    // audit log, and the node refuses to start on such a ledger.
    conn.execute("DELETE FROM releases", [])
        .expect("delete debits");
    let (ok, out) = confer(&["audit", "verify", "--config", &cfg]);
    assert!(!ok && out.contains("refunded"), "verify must fail: {out}");
    let mut restart = Command::new(CONFER)
        .args(["node", "--config", &cfg, "--insecure-loopback"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start a node");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = restart.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = restart.kill();
            panic!("a node started on a ledger whose debits were deleted");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = restart.wait_with_output().expect("output");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        !status.success() && text.contains("fails its check"),
        "{text}"
    );
    conn.execute(
        "UPDATE audit SET reason = 'nothing happened' WHERE seq = 3",
        [],
    )
    .expect("tamper");
    let (ok, out) = confer(&["audit", "verify", "--config", &cfg]);
    assert!(!ok, "verify must fail: {out}");
    assert!(out.contains("record 3 was edited"), "{out}");

    fed.federation.stop().await.expect("clean stop");
}

/// Rewrites one node's policy lines in place; the node re-reads its
/// node.toml when the file's modification time changes.
fn edit_policy(path: &Path, from: &str, to: &str, step: u64) {
    let text = std::fs::read_to_string(path).expect("node.toml");
    assert!(text.contains(from), "{from:?} not in {}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).expect("write node.toml");
    std::fs::File::options()
        .write(true)
        .open(path)
        .expect("open")
        .set_modified(std::time::SystemTime::now() + Duration::from_secs(10 * step))
        .expect("mtime");
}

fn spent(batches: &[arrow::array::RecordBatch], site: &str) -> f64 {
    keyed(batches, 1, &["spent_rho"])[site][0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_at_one_node_spends_nothing_anywhere() {
    let fed = federation_with(2, POLICY).await;
    let work = fed.federation.work_dir.clone();
    let mut alice = fed.client_as("alice").await;
    let rho_each = confer_privacy::accounting::rho_for_epsilon_delta(0.4, 1e-6).expect("rho");
    alice
        .run(&count_query(0.4), Some("small"))
        .await
        .expect("first query");
    let site_b = Path::new(&node_config(&work, "site-b")).to_path_buf();
    let show = "SHOW PRIVACY BUDGET FOR STUDY small";

    // Only site-b's per-query cap is too low for the next query.
    edit_policy(
        &site_b,
        "max_query_epsilon = 2.0",
        "max_query_epsilon = 0.3",
        1,
    );
    let err = alice
        .run(&count_query(0.4), Some("small"))
        .await
        .expect_err("over site-b's cap")
        .to_string();
    assert!(
        err.contains("refused before any node ran it, nothing spent")
            && err.contains("node site-b")
            && err.contains("per-task cap of epsilon 0.3"),
        "{err}"
    );
    assert!(
        !err.contains("node site-a"),
        "site-a would have answered: {err}"
    );
    let budget = alice.run(show, Some("small")).await.expect("show").batches;
    for site in ["site-a", "site-b"] {
        let s = spent(&budget, site);
        assert!((s - rho_each).abs() < 1e-12, "{site} spent {s}");
    }

    // Only site-b's study budget is too small for a second query.
    edit_policy(
        &site_b,
        "max_query_epsilon = 0.3",
        "max_query_epsilon = 2.0",
        2,
    );
    edit_policy(
        &site_b,
        "budget = { epsilon = 1.0, delta = 1e-6 }",
        "budget = { epsilon = 0.5, delta = 1e-6 }",
        3,
    );
    let err = alice
        .run(&count_query(0.4), Some("small"))
        .await
        .expect_err("over site-b's budget")
        .to_string();
    assert!(
        err.contains("refused before any node ran it, nothing spent")
            && err.contains("node site-b")
            && err.contains("budget exhausted for study small"),
        "{err}"
    );
    let budget = alice.run(show, Some("small")).await.expect("show").batches;
    let a = spent(&budget, "site-a");
    assert!((a - rho_each).abs() < 1e-12, "site-a spent {a}");

    // Within both nodes' rules the query runs and both are charged.
    alice
        .run(&count_query(0.1), Some("small"))
        .await
        .expect("fits everywhere");
    let rho_small = confer_privacy::accounting::rho_for_epsilon_delta(0.1, 1e-6).expect("rho");
    let budget = alice.run(show, Some("small")).await.expect("show").batches;
    for site in ["site-a", "site-b"] {
        let s = spent(&budget, site);
        assert!((s - rho_each - rho_small).abs() < 1e-12, "{site} spent {s}");
    }
    fed.federation.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_approval_holds_a_study_until_the_steward_approves() {
    let policy = "[policy]\napproval = \"manual\"\n\n[policy.studies.s]\nbudget = { epsilon = 10.0, delta = 1e-6 }\n";
    let fed = federation_with(2, policy).await;
    let work = fed.federation.work_dir.clone();
    let mut client = fed.client().await;
    let err = client
        .run(&count_query(0.5), Some("s"))
        .await
        .expect_err("pending")
        .to_string();
    assert!(err.contains("awaits approval"), "{err}");

    for site in ["site-a", "site-b"] {
        let (ok, out) = confer(&[
            "node",
            "approve",
            "s",
            "--config",
            &node_config(&work, site),
        ]);
        assert!(ok, "{out}");
    }
    client
        .run(&count_query(0.5), Some("s"))
        .await
        .expect("approved");

    let (ok, out) = confer(&[
        "node",
        "deny",
        "s",
        "--reason",
        "ethics approval withdrawn",
        "--config",
        &node_config(&work, "site-b"),
    ]);
    assert!(ok, "{out}");
    let err = client
        .run(&count_query(0.5), Some("s"))
        .await
        .expect_err("denied")
        .to_string();
    assert!(
        err.contains("ethics approval withdrawn") && err.contains("site-b"),
        "{err}"
    );

    let (ok, out) = confer(&["node", "studies", "--config", &node_config(&work, "site-b")]);
    assert!(ok && out.contains("denied"), "{out}");
    // The steward sees what the coordinator said of the study.
    assert!(
        out.contains("ethics approval DEMO-0001") && out.contains("principal investigator tester"),
        "{out}"
    );
    fed.federation.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_expiry_retries_and_replays() {
    let fed = federation_with(1, POLICY).await;
    let work = fed.federation.work_dir.clone();
    let node = &fed.federation.nodes[0];
    let handle = NodeHandle::new(
        &NodeEntry {
            name: "site-a".into(),
            url: format!("http://{}", node.addr),
        },
        None,
    )
    .expect("handle");
    let timeout = Duration::from_secs(30);
    let coordinator = Identity::load(&work.join("coordinator.key")).expect("key");
    let task = Task::query("small", "alice", &count_query(0.1), Duration::from_secs(60))
        .for_nodes(["site-a"]);

    // A task signed by another key is refused.
    let forged = Identity::generate()
        .expect("key")
        .sign(&task)
        .expect("sign");
    let err = handle.run(&forged, timeout).await.expect_err("forged");
    assert_eq!(err.kind, ErrorKind::PermissionDenied);
    assert!(
        err.message.contains("signature does not verify"),
        "{}",
        err.message
    );

    // An expired task is refused.
    let mut old = Task::query("small", "alice", &count_query(0.1), Duration::from_secs(60))
        .for_nodes(["site-a"]);
    old.expires_at = old.issued_at - 1;
    let err = handle
        .run(&coordinator.sign(&old).expect("sign"), timeout)
        .await
        .expect_err("expired");
    assert!(err.message.contains("expired"), "{}", err.message);

    // A task signed for another node (captured and replayed here), or for
    // no node at all, is refused: a task runs only where it was sent.
    for nodes in [vec!["site-b"], vec![]] {
        let elsewhere = Task::query("small", "alice", &count_query(0.1), Duration::from_secs(60))
            .for_nodes(nodes.clone());
        let err = handle
            .run(&coordinator.sign(&elsewhere).expect("sign"), timeout)
            .await
            .expect_err("not addressed here");
        assert!(
            err.message.contains("not for this node"),
            "{nodes:?}: {}",
            err.message
        );
    }

    // A retried task is answered with the same release and charged once.
    let envelope = coordinator.sign(&task).expect("sign");
    let first = handle.run(&envelope, timeout).await.expect("released");
    let again = handle.run(&envelope, timeout).await.expect("retry");
    assert_eq!(
        first.batch, again.batch,
        "a retry returns the stored release"
    );
    let db = work.join("state").join("site-a").join("ledger.sqlite");
    let conn = rusqlite::Connection::open(&db).expect("ledger");
    let rows: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM releases WHERE task_id = ?1",
            [task.id.to_string()],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(rows, 1, "one debit for the task and its retry");

    // The same task id with other content is a replay.
    let mut replay = task.clone();
    replay.kind = Task::query("small", "alice", &count_query(0.2), Duration::from_secs(60)).kind;
    let err = handle
        .run(&coordinator.sign(&replay).expect("sign"), timeout)
        .await
        .expect_err("replay");
    assert!(err.message.contains("replay"), "{}", err.message);

    let (ok, log) = confer(&[
        "audit",
        "show",
        "--config",
        &node_config(&work, "site-a"),
        "--format",
        "jsonl",
    ]);
    assert!(ok);
    for want in ["signature does not verify", "expired", "retried", "replay"] {
        assert!(log.contains(want), "audit log lacks {want:?}:\n{log}");
    }
    fed.federation.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_queries_never_overspend_nor_pay_for_refused_ones() {
    let fed = federation_with(2, POLICY).await;
    let per_query = confer_privacy::accounting::rho_for_epsilon_delta(0.3, 1e-6).expect("rho");
    let budget = confer_privacy::accounting::rho_for_epsilon_delta(1.0, 1e-6).expect("rho");
    let fits = (budget / per_query).floor() as usize;
    let mut handles = Vec::new();
    for _ in 0..(3 * fits) {
        let mut c = fed.client_as("alice").await;
        handles.push(tokio::spawn(async move {
            c.run(&count_query(0.3), Some("small")).await.is_ok()
        }));
    }
    let mut ok = 0;
    for h in handles {
        if h.await.expect("join") {
            ok += 1;
        }
    }
    assert!(
        ok <= fits,
        "{ok} queries answered but only {fits} fit the budget"
    );
    assert!(ok >= 1);
    let work = fed.federation.work_dir.clone();
    for site in ["site-a", "site-b"] {
        let db = work.join("state").join(site).join("ledger.sqlite");
        let conn = rusqlite::Connection::open(&db).expect("ledger");
        let spent: f64 = conn
            .query_row(
                "SELECT COALESCE(SUM(rho), 0) FROM releases WHERE study = 'small'",
                [],
                |r| r.get(0),
            )
            .expect("sum");
        assert!(
            spent <= budget * (1.0 + 1e-9),
            "{site} spent {spent} of {budget}"
        );
        // Budget is held at the check, so a query refused at one node is
        // charged nowhere: every debit bought an answer.
        assert!(
            (spent - ok as f64 * per_query).abs() < 1e-9,
            "{site} spent {spent} for {ok} answers of {per_query} each"
        );
    }
    fed.federation.stop().await.expect("clean stop");
}

/// Restarts a node stopped by the test on the address it had.
async fn restart_node(work: &Path, site: &str, addr: std::net::SocketAddr) -> ServerChild {
    let config = work.join(format!("{site}.toml"));
    let text = std::fs::read_to_string(&config).expect("node config");
    // The node's own address: the first `listen` line, in [node] (the
    // steward page's [console] keeps its own).
    let mut done = false;
    let text: String = text
        .lines()
        .map(|line| {
            if !done && line.starts_with("listen = ") {
                done = true;
                format!("listen = \"{addr}\"\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    std::fs::write(&config, text).expect("node config");
    ServerChild::start(
        Path::new(CONFER),
        "node",
        &format!("node {site}"),
        &config,
        "warn",
    )
    .await
    .expect("node restarts")
}

const LEDGER_FILES: [&str; 4] = [
    "ledger.sqlite",
    "ledger.sqlite-wal",
    "ledger.sqlite-shm",
    "audit.head",
];

async fn nodes_report(c: &mut confer_cli::client::Client) -> Vec<NodeStatus> {
    serde_json::from_value(
        c.action(custom::NODES, Vec::new())
            .await
            .expect("node registry"),
    )
    .expect("statuses")
}

fn status_of<'a>(statuses: &'a [NodeStatus], site: &str) -> &'a NodeStatus {
    statuses
        .iter()
        .find(|s| s.name == site)
        .expect("site listed")
}

/// A node whose ledger is deleted would start again with every budget full.
/// The coordinator anchors each node's audit chain at every health check
/// and holds a node whose chain does not extend it out of every task, until
/// the steward restores the ledger or an operator accepts the loss (both
/// audited in the coordinator's own, hash-chained, log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_ledger_was_reset_is_held_until_restored_or_accepted() {
    let mut fed = federation_with(2, POLICY).await;
    let work = fed.federation.work_dir.clone();
    let state = work.join("state").join("site-a");
    let coordinator_config = work.join("coordinator.toml");
    let mut c = fed.client_as("alice").await;
    c.run(&count_query(0.3), Some("small"))
        .await
        .expect("first query");
    let statuses = nodes_report(&mut c).await;
    assert!(status_of(&statuses, "site-a").healthy, "{statuses:?}");

    // The steward keeps a backup; then the ledger is deleted.
    let node = fed.federation.take_node("site-a").expect("site-a");
    let addr = node.addr;
    node.stop(Duration::from_secs(20)).await.expect("stop");
    let backup = tempfile::tempdir().expect("tempdir");
    for f in LEDGER_FILES {
        if state.join(f).exists() {
            std::fs::copy(state.join(f), backup.path().join(f)).expect("backup");
        }
    }
    for f in LEDGER_FILES {
        let _ = std::fs::remove_file(state.join(f));
    }
    fed.federation
        .nodes
        .push(restart_node(&work, "site-a", addr).await);

    // Held at once by the query's check (its chain is shorter than the anchor).
    let err = c
        .run(&count_query(0.3), Some("small"))
        .await
        .expect_err("a reset node is held")
        .to_string();
    assert!(err.contains("left out of every task"), "{err}");
    assert!(err.contains("reset"), "{err}");
    let statuses = nodes_report(&mut c).await;
    let a = status_of(&statuses, "site-a");
    assert!(!a.healthy, "{a:?}");
    assert!(
        a.error
            .as_deref()
            .unwrap_or_default()
            .contains("accept-ledger"),
        "{a:?}"
    );

    // Restored from the backup: used again at the next health check.
    let node = fed.federation.take_node("site-a").expect("site-a");
    node.stop(Duration::from_secs(20)).await.expect("stop");
    for f in LEDGER_FILES {
        let _ = std::fs::remove_file(state.join(f));
        if backup.path().join(f).exists() {
            std::fs::copy(backup.path().join(f), state.join(f)).expect("restore");
        }
    }
    fed.federation
        .nodes
        .push(restart_node(&work, "site-a", addr).await);
    let statuses = nodes_report(&mut c).await;
    assert!(status_of(&statuses, "site-a").healthy, "{statuses:?}");
    c.run(&count_query(0.3), Some("small"))
        .await
        .expect("a restored node answers");

    // Lost for good: held until an operator accepts the loss.
    let node = fed.federation.take_node("site-a").expect("site-a");
    node.stop(Duration::from_secs(20)).await.expect("stop");
    for f in LEDGER_FILES {
        let _ = std::fs::remove_file(state.join(f));
    }
    fed.federation
        .nodes
        .push(restart_node(&work, "site-a", addr).await);
    let statuses = nodes_report(&mut c).await;
    assert!(!status_of(&statuses, "site-a").healthy, "{statuses:?}");
    let config = coordinator_config.to_str().expect("utf-8");
    let (ok, out) = confer(&[
        "coordinator",
        "node",
        "accept-ledger",
        "--name",
        "site-a",
        "--reason",
        "disk failed, no backup (ticket 42)",
        "--config",
        config,
    ]);
    assert!(ok, "{out}");
    let statuses = nodes_report(&mut c).await;
    assert!(status_of(&statuses, "site-a").healthy, "{statuses:?}");
    c.run(&count_query(0.3), Some("small"))
        .await
        .expect("used again after the loss is accepted");

    // Every step is in the coordinator's audit log, whose chain holds and
    // catches an edit.
    let (ok, out) = confer(&["coordinator", "audit", "verify", "--config", config]);
    assert!(ok && out.contains("hash chain intact"), "{out}");
    let db = work.join("state").join("coordinator.sqlite");
    let conn = rusqlite::Connection::open(&db).expect("coordinator state");
    let outcomes: Vec<String> = conn
        .prepare("SELECT outcome FROM audit WHERE action = 'node_ledger' ORDER BY seq")
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(
        outcomes,
        ["held", "restored", "held", "accepted", "restored"],
        "{outcomes:?}"
    );
    conn.execute(
        "UPDATE audit SET detail = 'nothing happened' WHERE action = 'node_ledger'",
        [],
    )
    .expect("tamper");
    let (ok, out) = confer(&["coordinator", "audit", "verify", "--config", config]);
    assert!(!ok && out.contains("was edited"), "{out}");
    fed.federation.stop().await.expect("clean stop");
}

/// A study's title, principal investigator, members and min_sites change
/// (audited); what stewards approved does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn studies_can_be_edited_within_what_stewards_approved() {
    let fed = federation_with(2, POLICY).await;
    let mut admin = fed.client_as("admin").await;
    let edit = |body: serde_json::Value| serde_json::to_vec(&body).expect("json");
    let study: confer_coordinator::store::Study = serde_json::from_value(
        admin
            .action(
                custom::STUDY_EDIT,
                edit(serde_json::json!({
                    "name": "small",
                    "title": "Small, amended",
                    "remove_members": ["mallory"],
                    "min_sites": 1
                })),
            )
            .await
            .expect("edit"),
    )
    .expect("study");
    assert_eq!(study.title, "Small, amended");
    assert!(!study.members.contains(&"mallory".to_string()));
    assert_eq!(study.min_sites, Some(1));
    // Mallory is no longer a member.
    let mut mallory = fed.client_as("mallory").await;
    let err = mallory
        .run(&count_query(0.3), Some("small"))
        .await
        .expect_err("not a member")
        .to_string();
    assert!(err.contains("small"), "{err}");
    // The approved budget is not editable, and unknown fields are named.
    for bad in [
        serde_json::json!({"name": "small", "requested_epsilon": 9.0}),
        serde_json::json!({"name": "small", "add_members": ["nobody"]}),
        serde_json::json!({"name": "small"}),
        serde_json::json!({"name": "nope", "title": "x"}),
    ] {
        let err = admin
            .action(custom::STUDY_EDIT, edit(bad.clone()))
            .await
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("nothing to change")
                || err.contains("not an active user")
                || err.contains("does not exist")
                || err.contains("create a new study"),
            "{bad}: {err}"
        );
    }
    // Researchers cannot edit.
    let mut alice = fed.client_as("alice").await;
    assert!(
        alice
            .action(
                custom::STUDY_EDIT,
                edit(serde_json::json!({"name": "small", "title": "x"}))
            )
            .await
            .is_err()
    );
    fed.federation.stop().await.expect("clean stop");
}

/// A statement grouped by `site` planned while a node was unknown runs only
/// at the sites it names: the node that is back by then is not asked, so it
/// is not charged for a release the answer has no place for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_grouping_runs_only_at_the_sites_it_was_planned_for() {
    use arrow_flight::sql::client::FlightSqlServiceClient;
    use futures::TryStreamExt;
    let mut fed = federation_with(2, POLICY).await;
    let work = fed.federation.work_dir.clone();
    // site-b is down before the coordinator ever saw its catalog.
    let node = fed.federation.take_node("site-b").expect("site-b");
    let addr = node.addr;
    node.kill().await.expect("kill");
    let channel = tonic::transport::Endpoint::from_shared(fed.federation.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut client = FlightSqlServiceClient::new(channel);
    client.set_token(fed.federation.tokens["alice"].clone());
    client.set_header(confer_coordinator::service::STUDY_HEADER, "small");
    let info = client
        .execute(
            "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.3, delta = 1e-6, min_sites = 1) \
             site, COUNT(*) AS n FROM person GROUP BY site"
                .into(),
            None,
        )
        .await
        .expect("planned with site-a only");
    fed.federation
        .nodes
        .push(restart_node(&work, "site-b", addr).await);
    let ticket = info.endpoint[0].ticket.clone().expect("ticket");
    let batches: Vec<arrow::array::RecordBatch> = client
        .do_get(ticket)
        .await
        .expect("runs")
        .try_collect()
        .await
        .expect("answer");
    let sites: Vec<String> = batches
        .iter()
        .flat_map(|b| {
            let a =
                arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).expect("text");
            let a = a
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .expect("strings")
                .clone();
            (0..arrow::array::Array::len(&a)).map(move |i| a.value(i).to_string())
        })
        .collect();
    assert_eq!(sites, ["site-a"]);
    let db = work.join("state").join("site-b").join("ledger.sqlite");
    let charged: i64 = rusqlite::Connection::open(&db)
        .expect("ledger")
        .query_row("SELECT COUNT(*) FROM releases", [], |r| r.get(0))
        .expect("count");
    assert_eq!(
        charged, 0,
        "site-b was charged for a query planned without it"
    );
    fed.federation.stop().await.expect("clean stop");
}
