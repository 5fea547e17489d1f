//! Crash safety: a node killed with SIGKILL at random moments while tasks
//! run, then restarted, never loses a debit, never releases without one, and
//! never charges a task twice. Tasks are charged before they run, so a task
//! the kill interrupted is a charged failure after the restart (the kill
//! could have been caused by the rows: issue 13), never a free retry.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::RecordBatch;
use confer_cli::children::ServerChild;
use confer_coordinator::config::NodeEntry;
use confer_coordinator::fanout::NodeHandle;
use confer_protocol::signing::Identity;
use confer_protocol::task::{Envelope, Task};
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const CONFER: &str = env!("CARGO_BIN_EXE_confer");
const SQL: &str = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, delta = 1e-6) \
                   gender_concept_id, COUNT(*) AS n FROM person GROUP BY gender_concept_id";

fn write_node(dir: &Path, key: &str) -> std::path::PathBuf {
    let mut csv = String::from(
        "person_id,gender_concept_id,year_of_birth,race_concept_id,ethnicity_concept_id\n",
    );
    for p in 0..60 {
        csv.push_str(&format!(
            "{p},{},{},0,0\n",
            if p % 2 == 0 { 8507 } else { 8532 },
            1950 + p % 40
        ));
    }
    std::fs::write(dir.join("person.csv"), csv).expect("csv");
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"crash\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"\ncoordinator_key = \"{key}\"\n\n\
             [policy]\napproval = \"auto\"\nmax_failures_per_researcher = 1000000\n[policy.studies.crash]\nbudget = {{ rho = 1e9, delta = 0.5 }}\n\n\
             [tables.person]\npath = \"person.csv\"\nprivacy_unit = \"person_id\"\n\
             [tables.person.columns]\ngender_concept_id = {{ domain = [8507, 8532] }}\n"
        ),
    )
    .expect("config");
    config
}

async fn start(config: &Path) -> (ServerChild, NodeHandle) {
    let child = ServerChild::start(Path::new(CONFER), "node", "node crash", config, "error")
        .await
        .expect("node starts");
    let handle = NodeHandle::new(
        &NodeEntry {
            name: "crash".into(),
            url: format!("http://{}", child.addr),
        },
        None,
    )
    .expect("handle");
    (child, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_never_loses_or_doubles_a_debit() {
    let iterations: usize = std::env::var("CONFER_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::generate().expect("key");
    let config = write_node(dir.path(), &identity.public_hex());
    let timeout = Duration::from_secs(20);
    // A fixed seed for the kill schedule, so a failure can be replayed.
    let mut rng = rand::rngs::StdRng::seed_from_u64(20261124);

    let mut tasks: Vec<(Uuid, Envelope)> = Vec::new();
    let received: Arc<Mutex<HashMap<Uuid, RecordBatch>>> = Arc::new(Mutex::new(HashMap::new()));
    let mut kills_mid_flight = 0;

    for _ in 0..iterations {
        let (child, handle) = start(&config).await;
        let mut running = Vec::new();
        // Three new tasks, plus a retry of one earlier task now and then.
        let mut batch: Vec<(Uuid, Envelope)> = (0..3)
            .map(|_| {
                let task =
                    Task::query("crash", "r", SQL, Duration::from_secs(3600)).for_nodes(["crash"]);
                (task.id, identity.sign(&task).expect("sign"))
            })
            .collect();
        tasks.extend(batch.iter().cloned());
        if rng.random_bool(0.3) {
            let i = rng.random_range(0..tasks.len());
            batch.push(tasks[i].clone());
        }
        for (id, envelope) in batch {
            let handle = handle.clone();
            let received = received.clone();
            running.push(tokio::spawn(async move {
                if let Ok(part) = handle.run(&envelope, timeout).await {
                    let mut map = received.lock().expect("lock");
                    if let Some(previous) = map.get(&id) {
                        assert_eq!(
                            previous, &part.batch,
                            "task {id} released twice with different results"
                        );
                    }
                    map.insert(id, part.batch);
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await;
        if running.iter().any(|h| !h.is_finished()) {
            kills_mid_flight += 1;
        }
        child.kill().await.expect("SIGKILL");
        for h in running {
            h.await.expect("task join");
        }
    }
    assert!(
        kills_mid_flight > iterations / 10,
        "only {kills_mid_flight} kills hit running tasks"
    );

    // Restart once more and resend every task: each is answered with its
    // stored release (identical to what reached us before a crash), or, if a
    // kill interrupted it, with its stored, charged failure.
    let (child, handle) = start(&config).await;
    let mut failed = 0usize;
    for (id, envelope) in &tasks {
        match handle.run(envelope, timeout).await {
            Ok(part) => {
                if let Some(seen) = received.lock().expect("lock").get(id) {
                    assert_eq!(
                        seen, &part.batch,
                        "task {id}: released before the crash without a durable debit"
                    );
                }
            }
            Err(e) => {
                assert!(
                    e.message.contains("failed while it ran"),
                    "task {id}: {}",
                    e.message
                );
                assert!(
                    !received.lock().expect("lock").contains_key(id),
                    "task {id} was released, then reported failed"
                );
                failed += 1;
            }
        }
    }
    assert!(
        failed > 0,
        "no kill interrupted a charged task: the test no longer exercises it"
    );
    child
        .stop(Duration::from_secs(10))
        .await
        .expect("clean stop");

    let db = dir.path().join("state").join("ledger.sqlite");
    let conn = rusqlite::Connection::open(&db).expect("ledger");
    let (rows, distinct, spent): (i64, i64, f64) = conn
        .query_row(
            "SELECT COUNT(*), COUNT(DISTINCT task_id), SUM(rho) FROM releases",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("ledger totals");
    let rho = confer_privacy::accounting::rho_for_epsilon_delta(1.0, 1e-6).expect("rho");
    // A failure is charged at least the node's floor (epsilon 1 at 1e-5).
    let floor = confer_privacy::accounting::rho_for_epsilon_delta(1.0, 1e-5).expect("rho");
    assert_eq!(
        rows as usize,
        tasks.len(),
        "every task has exactly one debit"
    );
    assert_eq!(distinct, rows);
    let released = tasks.len() - failed;
    let want = rho * released as f64 + rho.max(floor) * failed as f64;
    assert!(
        (spent - want).abs() < 1e-6 * spent,
        "spent {spent}, want {want} ({released} released, {failed} failed)"
    );
    let running: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM releases WHERE state = 'running'",
            [],
            |r| r.get(0),
        )
        .expect("running");
    assert_eq!(running, 0, "no task is left running after the restart");

    let out = std::process::Command::new(CONFER)
        .args(["audit", "verify", "--config"])
        .arg(&config)
        .output()
        .expect("audit verify");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
