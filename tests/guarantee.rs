//! The guarantee against any query a researcher (or a dishonest
//! coordinator) can write: one regression test per attack shape of issue
//! 13, with real coordinator and node processes. Each shape is refused
//! before anything is spent, or runs in a form that one person cannot
//! sway beyond the charged epsilon, or is charged when it fails.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use confer_coordinator::config::NodeEntry;
use confer_coordinator::fanout::NodeHandle;
use confer_protocol::actions;
use confer_protocol::signing::Identity;
use confer_protocol::task::{
    Envelope, KeyPrefix, SecaggIdentity, SecaggRound, SecureQueryTask, SecureStep, SelectStep,
    Task, TaskKind,
};

use crate::fixture::{TEST_POLICY, federation_with, keyed, plain, plain_gibleed, single_i64};

const CONFER: &str = env!("CARGO_BIN_EXE_confer");
const DP: &str = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6)";

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

fn handle(fed: &crate::fixture::Running, site: &str) -> NodeHandle {
    let label = format!("node {site}");
    let node = fed
        .federation
        .nodes
        .iter()
        .find(|n| n.label == label)
        .expect("node");
    NodeHandle::new(
        &NodeEntry {
            name: site.into(),
            url: format!("http://{}", node.addr),
        },
        None,
    )
    .expect("handle")
}

async fn spent(client: &mut confer_cli::client::Client, study: &str) -> Vec<(String, f64)> {
    let show = client
        .run(
            &format!("SHOW PRIVACY BUDGET FOR STUDY {study}"),
            Some(study),
        )
        .await
        .expect("show budget");
    keyed(&show.batches, 1, &["spent_rho"])
        .into_iter()
        .filter(|(k, _)| k.starts_with("site-"))
        .map(|(k, v)| (k, v[0]))
        .collect()
}

/// Shapes 1, 2, 4, 5, 6 and 8: DISTINCT ON rebinding the unit, lossy casts
/// of the unit, float sums that could overflow, functions that fail on a
/// row, an epsilon that buys nothing and a delta that hides the cost are
/// all refused before any node runs anything; nothing is spent, and each
/// node's audit log holds the refusals it made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_queries_are_refused_before_anything_is_spent() {
    let policy = "[policy]\napproval = \"auto\"\nmax_query_epsilon = 1.0\n\n\
                  [policy.studies.test]\nbudget = { epsilon = 100.0, delta = 1e-5 }\n";
    let fed = federation_with(2, policy).await;
    let mut client = fed.client().await;
    let cases = [
        // 1. DISTINCT ON: one person's fact as thousands of fake persons.
        (
            format!(
                "{DP} COUNT(DISTINCT person_id) AS n FROM (SELECT DISTINCT ON (k.concept_id) k.concept_id AS person_id \
                 FROM condition_occurrence c JOIN concept k ON c.condition_concept_id = 192671 \
                 ORDER BY k.concept_id) d"
            ),
            "DISTINCT ON over person-level rows must list the privacy unit",
        ),
        // 2. Lossy casts of the unit: all persons become one.
        (
            format!(
                "{DP} COUNT(*) AS n FROM person WHERE CAST(person_id AS BOOLEAN) IN \
                 (SELECT CAST(person_id AS BOOLEAN) FROM condition_occurrence WHERE condition_concept_id = 192671)"
            ),
            "must compare the privacy unit",
        ),
        (
            format!(
                "{DP} COUNT(*) AS n FROM person p JOIN condition_occurrence c \
                 ON CAST(c.person_id AS DOUBLE) * 0 = CAST(p.person_id AS DOUBLE) * 0"
            ),
            "joined only on the privacy unit",
        ),
        (
            format!(
                "{DP} COUNT(*) AS n FROM (SELECT CAST(person_id AS BOOLEAN) AS person_id, COUNT(*) AS k \
                 FROM condition_occurrence GROUP BY CAST(person_id AS BOOLEAN)) t"
            ),
            "aggregates person-level rows across persons",
        ),
        // 4. A float partial that overflows to infinity.
        (
            format!(
                "{DP} SUM(year_of_birth, contribution_bounds_per_group => (-1e300, 1e300)) AS s FROM person"
            ),
            "beyond",
        ),
        // 5 and 6. Functions that fail on some rows.
        (
            format!("{DP} COUNT(*) AS n FROM person WHERE to_timestamp(person_source_value) IS NULL"),
            "to_timestamp may fail on some rows",
        ),
        (
            format!("{DP} COUNT(*) AS n FROM person WHERE person_source_value = 7"),
            "quoted literal",
        ),
        // 6. An epsilon that buys nothing.
        (
            "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1e-9, delta = 1e-6) COUNT(*) AS n FROM person"
                .to_string(),
            "min_query_epsilon",
        ),
        // 8. A delta that makes a costly query look cheap at its own delta.
        (
            "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 6.41, delta = 0.999999) COUNT(*) AS n FROM person"
                .to_string(),
            "max_query_delta",
        ),
        (
            "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 6.41, delta = 1e-5) COUNT(*) AS n FROM person"
                .to_string(),
            "per-task cap of epsilon 1",
        ),
    ];
    for (sql, want) in &cases {
        let err = client
            .run(sql, Some("test"))
            .await
            .expect_err(want)
            .to_string();
        assert!(err.contains(want), "{sql}\n  gave: {err}\n  want: {want}");
    }
    for (site, rho) in spent(&mut client, "test").await {
        assert_eq!(rho, 0.0, "{site} spent {rho} on refused queries");
    }
    // The node-side refusals are audited.
    let config = fed.federation.work_dir.join("site-a.toml");
    let (ok, log) = confer(&[
        "audit",
        "show",
        "--config",
        config.to_str().expect("utf8"),
        "--format",
        "jsonl",
    ]);
    assert!(ok, "{log}");
    for want in ["min_query_epsilon", "max_query_delta", "per-task cap"] {
        assert!(log.contains(want), "audit log lacks {want:?}");
    }
    fed.federation.stop().await.expect("clean stop");
}

/// Shape 3: `unit NOT IN (person-level subquery)` where a LEFT JOIN makes
/// the subquery return NULL. Under SQL's three-valued logic that NULL would
/// empty the result for everyone; the compiled query ignores the
/// subquery's NULLs, so the answer is what plain DataFusion gives for the
/// NULL-free subquery, and far from empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_in_cannot_be_emptied_by_one_persons_null() {
    let fed = federation_with(1, TEST_POLICY).await;
    let mut client = fed.client().await;
    let ctx = plain_gibleed().await;
    let subquery = "SELECT c.person_id FROM person p2 LEFT JOIN condition_occurrence c \
                    ON c.person_id = p2.person_id AND c.condition_concept_id = 192671";
    let sql = format!(
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1e9, delta = 1e-6) COUNT(*) AS n \
         FROM person WHERE person_id NOT IN ({subquery})"
    );
    let answer = client.run(&sql, Some("test")).await.expect("runs");
    let dp = single_i64(&answer.batches);
    let naive = single_i64(
        &plain(
            &ctx,
            &format!("SELECT COUNT(*) FROM person WHERE person_id NOT IN ({subquery})"),
        )
        .await,
    );
    let guarded = single_i64(
        &plain(
            &ctx,
            &format!(
                "SELECT COUNT(*) FROM person WHERE person_id NOT IN ({subquery} WHERE c.person_id IS NOT NULL)"
            ),
        )
        .await,
    );
    assert_eq!(naive, 0, "plain SQL: one NULL empties NOT IN");
    assert!(guarded > 1000, "{guarded}");
    assert_eq!(dp, guarded, "the DP query ignores the subquery's NULLs");
    fed.federation.stop().await.expect("clean stop");
}

/// Shapes 6 and 7: a query that runs past the node's time limit fails
/// after admission; it is charged at the node's floor (not at the
/// researcher's epsilon), stored (a retry gets the failure and runs
/// nothing), and counted: after `max_failures_per_researcher` failures the
/// node refuses the researcher until the steward lifts it. A public query
/// that runs too long is stopped without a charge, and the node stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_after_admission_are_charged_stored_and_counted() {
    let policy = "[policy]\napproval = \"auto\"\nmax_failures_per_researcher = 2\nmin_charge_epsilon = 2.0\n\n\
                  [policy.limits]\ntime_limit_secs = 2\npadded_secs = 2\n\n\
                  [policy.studies.test]\nbudget = { epsilon = 1000.0, delta = 1e-5 }\n";
    let fed = federation_with(1, policy).await;
    let work = fed.federation.work_dir.clone();
    let node = handle(&fed, "site-a");
    let coordinator = Identity::load(&work.join("coordinator.key")).expect("key");
    let timeout = Duration::from_secs(60);
    // person × concept × concept: hundreds of millions of rows.
    let slow = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.1, delta = 1e-6) COUNT(*) AS n \
                FROM person p JOIN concept a ON a.concept_id > p.year_of_birth \
                JOIN concept b ON b.concept_id > a.concept_id";
    let floor = confer_privacy::accounting::rho_for_epsilon_delta(2.0, 1e-5).expect("rho");

    let task = Task::query("test", "alice", slow, Duration::from_secs(600)).for_nodes(["site-a"]);
    let envelope = coordinator.sign(&task).expect("sign");
    let err = node.run(&envelope, timeout).await.expect_err("times out");
    assert!(
        err.message
            .contains("ran longer than this node's limit of 2 s")
            && err.message.contains("charged"),
        "{}",
        err.message
    );
    // The retry gets the stored failure; nothing runs or is charged again.
    let again = node.run(&envelope, timeout).await.expect_err("stored");
    assert!(
        again.message.contains("failed while it ran"),
        "{}",
        again.message
    );
    let db = work.join("state").join("site-a").join("ledger.sqlite");
    let ledger = || rusqlite::Connection::open(&db).expect("ledger");
    let (rows, rho): (i64, f64) = ledger()
        .query_row(
            "SELECT COUNT(*), SUM(rho) FROM releases WHERE task_id = ?1 AND state = 'failed'",
            [task.id.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("ledger");
    assert_eq!(rows, 1);
    assert!(
        (rho - floor).abs() < 1e-12,
        "charged {rho}, the floor is {floor} (the query asked for epsilon 0.1)"
    );

    // A second failure reaches the quota: alice is refused, bob is not.
    let second = coordinator
        .sign(&Task::query("test", "alice", slow, Duration::from_secs(600)).for_nodes(["site-a"]))
        .expect("sign");
    node.run(&second, timeout).await.expect_err("times out");
    let count = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.5, delta = 1e-6) COUNT(*) AS n FROM person";
    let blocked = node
        .run(
            &coordinator
                .sign(
                    &Task::query("test", "alice", count, Duration::from_secs(600))
                        .for_nodes(["site-a"]),
                )
                .expect("sign"),
            timeout,
        )
        .await
        .expect_err("over the quota");
    assert!(
        blocked
            .message
            .contains("confer node lift --researcher alice"),
        "{}",
        blocked.message
    );
    node.run(
        &coordinator
            .sign(
                &Task::query("test", "bob", count, Duration::from_secs(600)).for_nodes(["site-a"]),
            )
            .expect("sign"),
        timeout,
    )
    .await
    .expect("another researcher is not blocked");

    // The steward reviews and lifts; alice may query again.
    let config = work.join("site-a.toml");
    let config = config.to_str().expect("utf8");
    let (ok, out) = confer(&["node", "failures", "--config", config]);
    assert!(ok && out.contains("alice: 2 charged failure(s)"), "{out}");
    let (ok, out) = confer(&[
        "node",
        "lift",
        "--researcher",
        "alice",
        "--reason",
        "reviewed: an accidental cross join",
        "--config",
        config,
    ]);
    assert!(ok, "{out}");
    node.run(
        &coordinator
            .sign(
                &Task::query("test", "alice", count, Duration::from_secs(600))
                    .for_nodes(["site-a"]),
            )
            .expect("sign"),
        timeout,
    )
    .await
    .expect("lifted");

    // A public cross join past the limit: stopped, not charged, node up.
    let spent_before: f64 = ledger()
        .query_row("SELECT SUM(rho) FROM releases", [], |r| r.get(0))
        .expect("sum");
    let public = Task::new(
        "test",
        "alice",
        TaskKind::PublicQuery(confer_protocol::task::QueryTask {
            sql: "SELECT SUM(length(a.concept_name || b.concept_name || c.concept_name)) \
                  FROM concept a, concept b, concept c"
                .into(),
        }),
        Duration::from_secs(600),
    )
    .for_nodes(["site-a"]);
    let err = node
        .run(&coordinator.sign(&public).expect("sign"), timeout)
        .await
        .expect_err("too long");
    assert!(err.message.contains("ran longer"), "{}", err.message);
    let spent_after: f64 = ledger()
        .query_row("SELECT SUM(rho) FROM releases", [], |r| r.get(0))
        .expect("sum");
    assert_eq!(spent_before, spent_after, "a public query is never charged");
    node.health(timeout, None)
        .await
        .expect("the node is still up");
    let (ok, out) = confer(&["audit", "verify", "--config", config]);
    assert!(ok, "{out}");
    fed.federation.stop().await.expect("clean stop");
}

/// A node survives what a query over public tables can ask of it: an
/// answer longer than the node returns is refused (nothing charged), a
/// health check answers while long work runs, and a stopping node cuts the
/// work off after its grace instead of waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_queries_are_bounded_and_never_hold_a_node() {
    let policy = "[policy]\napproval = \"auto\"\n\n[policy.limits]\ntime_limit_secs = 300\n\
                  max_public_rows = 50000\n\n[policy.studies.test]\nbudget = { epsilon = 10.0, delta = 1e-5 }\n";
    let mut fed = federation_with(1, policy).await;
    let work = fed.federation.work_dir.clone();
    let node = handle(&fed, "site-a");
    let coordinator = Identity::load(&work.join("coordinator.key")).expect("key");
    let timeout = Duration::from_secs(60);
    let public = |sql: &str| {
        let task = Task::new(
            "test",
            "alice",
            TaskKind::PublicQuery(confer_protocol::task::QueryTask { sql: sql.into() }),
            Duration::from_secs(600),
        )
        .for_nodes(["site-a"]);
        coordinator.sign(&task).expect("sign")
    };
    // 444 x 444 rows: past the cap, refused with what to change.
    let err = node
        .run(
            &public("SELECT a.concept_id AS x, b.concept_id AS y FROM concept a, concept b"),
            timeout,
        )
        .await
        .expect_err("too many rows");
    assert!(
        err.message.contains("more than 50000 rows") && err.message.contains("max_public_rows"),
        "{}",
        err.message
    );
    let fine = node
        .run(&public("SELECT concept_id FROM concept"), timeout)
        .await
        .expect("under the cap");
    assert_eq!(fine.batch.num_rows(), 444);

    // Long work (444^3 rows): health checks answer meanwhile...
    let heavy = public(
        "SELECT COUNT(*) AS n FROM concept a, concept b, concept c \
         WHERE length(a.concept_name || b.concept_name || c.concept_name) > 3",
    );
    let running = tokio::spawn({
        let node = node.clone();
        async move { node.run(&heavy, Duration::from_secs(300)).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!running.is_finished(), "the heavy query should still run");
    for _ in 0..3 {
        node.health(Duration::from_secs(5), None)
            .await
            .expect("a node under load still answers its health check");
    }
    // ...and a stop does not wait for it.
    let child = fed.federation.take_node("site-a").expect("site-a");
    let stopping = std::time::Instant::now();
    child
        .stop(Duration::from_secs(40))
        .await
        .expect("the node stops by itself");
    assert!(
        stopping.elapsed() < Duration::from_secs(25),
        "the node took {:?} to stop",
        stopping.elapsed()
    );
    assert!(running.await.expect("join").is_err());
    fed.federation.stop().await.expect("clean stop");
}

/// Shape 9: with `approval = "auto"` and a default study budget, every new
/// study name gets a fresh budget; the node's own budget over all studies
/// caps the total, and SHOW PRIVACY BUDGET reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_budget_caps_every_study_together() {
    let policy = "[policy]\napproval = \"auto\"\n\
                  default_study_budget = { epsilon = 1.0, delta = 1e-6 }\n\
                  node_budget = { epsilon = 2.0, delta = 1e-6 }\n";
    let fed = federation_with(1, policy).await;
    let mut client = fed.client().await;
    let rho = confer_privacy::accounting::rho_for_epsilon_delta(1.0, 1e-6).expect("rho");
    let node = confer_privacy::accounting::rho_for_epsilon_delta(2.0, 1e-6).expect("rho");
    let fits = (node / rho).floor() as usize;
    let sql = format!("{DP} COUNT(*) AS n FROM person");
    let mut answered = 0;
    let mut refusal = None;
    for study in crate::fixture::STUDIES {
        match client.run(&sql, Some(study)).await {
            Ok(_) => answered += 1,
            Err(e) => {
                refusal = Some(e.to_string());
                break;
            }
        }
    }
    assert_eq!(
        answered, fits,
        "each fresh study fits one query; the node fits {fits}"
    );
    let refusal = refusal.expect("the node budget refused one");
    assert!(refusal.contains("budget exhausted for node"), "{refusal}");
    let show = client
        .run("SHOW PRIVACY BUDGET FOR STUDY test", Some("test"))
        .await
        .expect("show");
    let rows = keyed(&show.batches, 1, &["node_budget_rho", "node_spent_rho"]);
    assert!((rows["site-a"][0] - node).abs() < 1e-12);
    assert!((rows["site-a"][1] - fits as f64 * rho).abs() < 1e-9);
    fed.federation.stop().await.expect("clean stop");
}

/// Shape 10: a table declared one row per person is read again for every
/// query; if its file gains a second row for some persons, the local query
/// still counts each person once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_row_per_person_is_enforced_by_the_plan() {
    let fed = federation_with(1, TEST_POLICY).await;
    let mut client = fed.client().await;
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1e9, delta = 1e-6) \
               gender_concept_id, COUNT(*) AS n FROM person GROUP BY gender_concept_id";
    let before = keyed(
        &client.run(sql, Some("test")).await.expect("runs").batches,
        1,
        &["n"],
    );
    // Every person listed twice, the second time with the other sex.
    let file = fed
        .federation
        .work_dir
        .join("data")
        .join("site-a")
        .join("PERSON.csv");
    let text = std::fs::read_to_string(&file).expect("PERSON.csv");
    let mut doubled = text.clone();
    for line in text.lines().skip(1) {
        let swapped = if line.contains(",8507,") {
            line.replacen(",8507,", ",8532,", 1)
        } else {
            line.replacen(",8532,", ",8507,", 1)
        };
        doubled.push_str(&swapped);
        doubled.push('\n');
    }
    std::fs::write(&file, doubled).expect("write");
    let after = keyed(
        &client.run(sql, Some("test")).await.expect("runs").batches,
        1,
        &["n"],
    );
    let total =
        |m: &std::collections::BTreeMap<String, Vec<f64>>| m.values().map(|v| v[0]).sum::<f64>();
    assert_eq!(
        total(&before),
        total(&after),
        "each person still counts once: {before:?} then {after:?}"
    );
    fed.federation.stop().await.expect("clean stop");
}

/// Shape 12: a coordinator proposes secure-aggregation sessions a node can
/// check itself. Forged or unknown peer keys, a member listed twice, and a
/// threshold under the node's floor are refused; two concurrent round 0
/// calls for one task get one noisy input and one debit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_sessions_a_dishonest_coordinator_proposes_are_checked() {
    let policy = "[policy]\napproval = \"auto\"\n\n[policy.secure]\nmin_survivors = 2\n\n\
                  [policy.studies.test]\nbudget = { epsilon = 100.0, delta = 1e-5 }\n";
    let fed = federation_with(2, policy).await;
    let work = fed.federation.work_dir.clone();
    let coordinator = Identity::load(&work.join("coordinator.key")).expect("key");
    let (a, b) = (handle(&fed, "site-a"), handle(&fed, "site-b"));
    let timeout = Duration::from_secs(60);
    let identity = |h: NodeHandle| async move {
        h.action_json::<SecaggIdentity>(actions::SECAGG_IDENTITY, Vec::new(), "identity", timeout)
            .await
            .expect("identity")
            .key
    };
    let (key_a, key_b) = (identity(a.clone()).await, identity(b.clone()).await);
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6, aggregation = 'secure') \
               gender_concept_id, COUNT(*) AS n FROM person GROUP BY gender_concept_id";
    let session = |n: usize, t: usize| {
        let id: [u8; 32] = rand::random();
        confer_privacy::secagg::Config::new(n, 64, 2, id)
            .and_then(|c| c.min_survivors(t))
            .expect("config")
    };
    let round0_step = |sql: &str,
                       step: Option<SecureStep>,
                       members: Vec<&str>,
                       identities: Vec<String>,
                       t: usize| {
        let config = session(members.len(), t);
        let mut task =
            Task::query("test", "alice", sql, Duration::from_secs(600)).for_nodes(&members);
        task.kind = TaskKind::SecureQuery(SecureQueryTask {
            sql: sql.into(),
            session: serde_json::to_value(&config).expect("json"),
            members: members.iter().map(|m| m.to_string()).collect(),
            identities,
            proofs: vec![None; members.len()],
            corrupt_peers: vec![0; members.len()],
            step,
        });
        let envelope: Envelope = coordinator.sign(&task).expect("sign");
        serde_json::to_vec(&SecaggRound {
            task_id: task.id,
            round: 0,
            payload: serde_json::to_value(&envelope).expect("json"),
        })
        .expect("json")
    };
    let round0 = |members: Vec<&str>, identities: Vec<String>, t: usize| {
        round0_step(sql, None, members, identities, t)
    };
    let start = |h: &NodeHandle, body: Vec<u8>| {
        let h = h.clone();
        async move {
            h.action_json::<serde_json::Value>(actions::SECAGG_ROUND, body, "round 0", timeout)
                .await
        }
    };
    let forged = "ab".repeat(32);
    let cases = [
        (
            round0(
                vec!["site-a", "site-b"],
                vec![key_a.clone(), forged.clone()],
                2,
            ),
            "other than the one pinned",
        ),
        (
            round0(
                vec!["site-a", "mallory"],
                vec![key_a.clone(), forged.clone()],
                2,
            ),
            "cannot check the identity key of mallory",
        ),
        (
            round0(
                vec!["site-a", "site-a"],
                vec![key_a.clone(), key_b.clone()],
                2,
            ),
            "lists site-a twice",
        ),
    ];
    for (body, want) in cases {
        let err = start(&a, body).await.expect_err(want);
        assert!(err.message.contains(want), "{want}: {}", err.message);
    }

    // Secure partition selection: the node runs only the steps the query
    // has, never a level over the query's share for selection, never a
    // level whose candidates are not prefixes.
    let private = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6, aggregation = 'secure') \
                   procedure_concept_id, COUNT(*) AS n FROM procedure_occurrence GROUP BY procedure_concept_id";
    let level = |rho: f64, parents: Vec<KeyPrefix>| {
        Some(SecureStep::Select(SelectStep {
            level: 1,
            rho,
            parents,
            width: 4,
        }))
    };
    let members = || vec!["site-a", "site-b"];
    let keys = || vec![key_a.clone(), key_b.clone()];
    let steps = [
        (
            round0_step(private, None, members(), keys(), 2),
            "runs as secure partition selection steps",
        ),
        (
            round0_step(private, level(1e6, Vec::new()), members(), keys(), 2),
            "asks for rho 1000000",
        ),
        (
            round0_step(
                private,
                level(
                    1e-3,
                    vec![KeyPrefix {
                        class: 20,
                        depth: 3,
                        value: 8,
                    }],
                ),
                members(),
                keys(),
                2,
            ),
            "is not a prefix that can be extended",
        ),
        (
            round0_step(sql, level(1e-3, Vec::new()), members(), keys(), 2),
            "has no selection step",
        ),
    ];
    for (body, want) in steps {
        let err = start(&a, body).await.expect_err(want);
        assert!(err.message.contains(want), "{want}: {}", err.message);
    }

    // Two concurrent round 0 calls for one valid task: one input, one debit.
    let body = round0(
        vec!["site-a", "site-b"],
        vec![key_a.clone(), key_b.clone()],
        2,
    );
    let task_id = serde_json::from_slice::<SecaggRound>(&body)
        .expect("round")
        .task_id;
    let (first, second) = tokio::join!(start(&a, body.clone()), start(&a, body));
    assert!(
        first.is_ok() != second.is_ok(),
        "exactly one round 0 joins: {:?} / {:?}",
        first.as_ref().err(),
        second.as_ref().err()
    );
    let db = work.join("state").join("site-a").join("ledger.sqlite");
    let rows: i64 = rusqlite::Connection::open(&db)
        .expect("ledger")
        .query_row(
            "SELECT COUNT(*) FROM releases WHERE task_id = ?1",
            [task_id.to_string()],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(rows, 1, "one debit");

    // A threshold under the node's floor.
    let config = work.join("site-a.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replacen("min_survivors = 2", "min_survivors = 3", 1),
    )
    .expect("write");
    let file = std::fs::File::options()
        .write(true)
        .open(&config)
        .expect("open");
    file.set_modified(std::time::SystemTime::now() + Duration::from_secs(10))
        .expect("mtime");
    let err = start(&a, round0(vec!["site-a", "site-b"], vec![key_a, key_b], 2))
        .await
        .expect_err("under the floor");
    assert!(
        err.message.contains("policy needs at least 3"),
        "{}",
        err.message
    );
    let _ = Path::new(&work);
    fed.federation.stop().await.expect("clean stop");
}

/// Shape 7, latency: a query through whose joins one person's rows could
/// multiply the work is answered at a fixed time after it started, whether
/// its rows are few or many, so its latency tells nothing about a person.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_one_person_could_slow_down_answer_at_a_fixed_time() {
    let policy = "[policy]\napproval = \"auto\"\n\n[policy.limits]\npadded_secs = 6\n\n\
                  [policy.studies.test]\nbudget = { epsilon = 1000.0, delta = 1e-5 }\n";
    let fed = federation_with(1, policy).await;
    let mut client = fed.client().await;
    let join = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6) COUNT(*) AS n \
                FROM condition_occurrence c1 JOIN condition_occurrence c2 ON c1.person_id = c2.person_id";
    async fn timed(client: &mut confer_cli::client::Client, sql: String) -> f64 {
        let started = std::time::Instant::now();
        client.run(&sql, Some("test")).await.expect(&sql);
        started.elapsed().as_secs_f64()
    }
    // Almost no rows, and every person's rows multiplied with each other.
    let few = timed(&mut client, format!("{join} WHERE c1.person_id = 1")).await;
    let many = timed(
        &mut client,
        format!("{join} WHERE c1.condition_concept_id = 192671"),
    )
    .await;
    assert!(few >= 6.0 && many >= 6.0, "{few} s, {many} s");
    assert!(
        (few - many).abs() < 1.5,
        "the latency depends on the rows: {few} s against {many} s"
    );
    // A query no person can slow down is not held.
    let plain = timed(
        &mut client,
        format!("{DP} COUNT(*) AS n FROM condition_occurrence"),
    )
    .await;
    assert!(plain < 6.0, "{plain} s");
    fed.federation.stop().await.expect("clean stop");
}
