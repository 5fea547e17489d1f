use super::*;

fn charge(id: Uuid, rho: f64, budget: f64) -> Charge {
    Charge {
        task_id: id,
        payload_hash: "p".into(),
        study: "s".into(),
        researcher: "r".into(),
        kind: "query".into(),
        cost: Cost {
            rho,
            epsilon: 1.0,
            delta: 1e-6,
            selection_delta: 0.0,
        },
        study_budget: budget,
        researcher_budget: None,
        study_delta_budget: 0.0,
        ..Default::default()
    }
}

#[test]
fn a_task_is_charged_once_and_retries_get_the_stored_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path()).expect("open");
    let id = Uuid::new_v4();
    assert_eq!(
        ledger
            .release(&charge(id, 0.5, 1.0), b"first".to_vec())
            .expect("db"),
        Ok(b"first".to_vec())
    );
    assert_eq!(
        ledger
            .release(&charge(id, 0.5, 1.0), b"second".to_vec())
            .expect("db"),
        Ok(b"first".to_vec())
    );
    assert_eq!(ledger.spent("s", None).expect("spent"), 0.5);
    let mut replay = charge(id, 0.5, 1.0);
    replay.payload_hash = "other".into();
    assert!(matches!(
        ledger.release(&replay, vec![]).expect("db"),
        Err(Refusal::Replay(_))
    ));
}

#[test]
fn tasks_are_charged_before_they_run_and_failures_raise_the_charge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path()).expect("open");
    let mut c = charge(Uuid::new_v4(), 0.1, 10.0);
    c.failure_rho = 0.5;
    assert_eq!(ledger.begin(&c).expect("db"), Ok(Begun::Charged));
    assert_eq!(ledger.spent("s", None).expect("spent"), 0.1);
    let stored = ledger.stored(c.task_id).expect("db").expect("on record");
    assert_eq!(stored.state, TaskState::Running);
    // A second begin is the same task: it finds it running.
    assert!(matches!(
        ledger.begin(&c).expect("db"),
        Ok(Begun::Existing(Stored {
            state: TaskState::Running,
            ..
        }))
    ));
    ledger.fail(&c, "time limit").expect("fail");
    assert_eq!(
        ledger.spent("s", None).expect("spent"),
        0.5,
        "raised to the floor"
    );
    let stored = ledger.stored(c.task_id).expect("db").expect("on record");
    assert_eq!(stored.state, TaskState::Failed);
    assert_eq!(ledger.failures_since_lift("r").expect("count"), 1);

    // A released task keeps its cost.
    let ok = charge(Uuid::new_v4(), 0.2, 10.0);
    ledger.begin(&ok).expect("db").expect("charged");
    assert_eq!(
        ledger.finish(&ok, b"bytes".to_vec()).expect("finish"),
        b"bytes"
    );
    let stored = ledger.stored(ok.task_id).expect("db").expect("on record");
    assert_eq!(
        (stored.state, stored.result),
        (TaskState::Released, b"bytes".to_vec())
    );
    assert!((ledger.spent("s", None).expect("spent") - 0.7).abs() < 1e-12);
    assert!(ledger.verify().expect("verify").problem.is_none());
}

#[test]
fn a_restart_turns_running_tasks_into_charged_failures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = Uuid::new_v4();
    {
        let ledger = Ledger::open(dir.path()).expect("open");
        let mut c = charge(id, 0.1, 10.0);
        c.failure_rho = 0.3;
        ledger.begin(&c).expect("db").expect("charged");
    }
    let ledger = Ledger::open(dir.path()).expect("reopen");
    let stored = ledger.stored(id).expect("db").expect("on record");
    assert_eq!(stored.state, TaskState::Failed);
    assert_eq!(ledger.spent("s", None).expect("spent"), 0.3);
    assert!(ledger.verify().expect("verify").problem.is_none());
}

#[test]
fn the_failure_quota_holds_until_the_steward_lifts_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path()).expect("open");
    let quota = |id| {
        let mut c = charge(id, 0.01, 10.0);
        c.failure_quota = Some(2);
        c
    };
    // No failures: concurrent tasks are not limited by the quota.
    for _ in 0..3 {
        ledger
            .begin(&quota(Uuid::new_v4()))
            .expect("db")
            .expect("charged");
    }
    let failing = quota(Uuid::new_v4());
    ledger.begin(&failing).expect("db").expect("charged");
    ledger.fail(&failing, "x").expect("fail");
    // One failure and three running reach the quota of 2.
    assert!(matches!(
        ledger.begin(&quota(Uuid::new_v4())).expect("db"),
        Err(Refusal::Quota(_))
    ));
    assert_eq!(ledger.lift("r", "steward", "reviewed").expect("lift"), 1);
    assert_eq!(ledger.failures_since_lift("r").expect("count"), 0);
    ledger
        .begin(&quota(Uuid::new_v4()))
        .expect("db")
        .expect("lifted");
}

#[test]
fn node_and_researcher_totals_cap_every_study() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path()).expect("open");
    let in_study = |study: &str, researcher: &str| {
        let mut c = charge(Uuid::new_v4(), 0.4, 1.0);
        c.study = study.into();
        c.researcher = researcher.into();
        c.node_budget = Some(1.0);
        c.researcher_total_budget = Some(0.5);
        c
    };
    ledger
        .begin(&in_study("a", "r"))
        .expect("db")
        .expect("fits");
    let err = ledger
        .begin(&in_study("b", "r"))
        .expect("db")
        .expect_err("researcher total");
    assert!(
        matches!(&err, Refusal::Budget(m) if m.contains("all studies")),
        "{err:?}"
    );
    ledger
        .begin(&in_study("b", "q"))
        .expect("db")
        .expect("another researcher");
    let err = ledger
        .begin(&in_study("c", "z"))
        .expect("db")
        .expect_err("node total");
    assert!(
        matches!(&err, Refusal::Budget(m) if m.contains("budget exhausted for node")),
        "{err:?}"
    );
    assert!((ledger.spent_total().expect("total") - 0.8).abs() < 1e-12);
    assert!((ledger.spent_by_researcher("r").expect("r") - 0.4).abs() < 1e-12);
}

#[test]
fn selection_delta_is_summed_and_capped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path()).expect("open");
    let with_delta = |delta: f64| {
        let mut c = charge(Uuid::new_v4(), 0.01, 1.0);
        c.cost.selection_delta = delta;
        c.study_delta_budget = 1e-6;
        c
    };
    // Queries without partition selection do not touch the delta cap.
    for _ in 0..5 {
        assert!(
            ledger
                .release(&with_delta(0.0), vec![1])
                .expect("db")
                .is_ok()
        );
    }
    for _ in 0..2 {
        assert!(
            ledger
                .release(&with_delta(5e-7), vec![1])
                .expect("db")
                .is_ok()
        );
    }
    match ledger.release(&with_delta(5e-7), vec![1]).expect("db") {
        Err(Refusal::Budget(msg)) => {
            assert!(msg.contains("delta budget exhausted for study s"), "{msg}");
            assert!(msg.contains("public"), "{msg}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Reopening keeps the column (and old ledgers gain it).
    drop(ledger);
    let ledger = Ledger::open(dir.path()).expect("reopen");
    assert!(matches!(
        ledger.release(&with_delta(1e-9), vec![1]).expect("db"),
        Err(Refusal::Budget(_))
    ));
}

#[test]
fn leases_hold_budget_until_run_released_or_expired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path()).expect("open");
    let later = now_ms() + 60_000;
    let reserve = |id: Uuid, until: i64| ledger.reserve(&charge(id, 0.4, 1.0), until).expect("db");
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    // Two of three queries of 0.4 fit a budget of 1.0.
    assert_eq!(reserve(a, later), None);
    assert_eq!(reserve(b, later), None);
    let why = reserve(c, later).expect("the third does not fit beside two leases");
    assert!(why.contains("held by queries"), "{why}");
    // A lease renewed for the same task does not count twice.
    assert_eq!(reserve(a, later), None);
    // The holders run; an unchecked charge cannot take their room.
    assert!(matches!(
        ledger.begin(&charge(c, 0.4, 1.0)).expect("db"),
        Err(Refusal::Budget(_))
    ));
    assert!(matches!(
        ledger.begin(&charge(a, 0.4, 1.0)).expect("db"),
        Ok(Begun::Charged)
    ));
    assert!(
        !ledger.release_lease(a, later).expect("db"),
        "the lease became a charge"
    );
    // A check of a task already charged (a retry) holds nothing more.
    assert_eq!(reserve(a, later), None);
    assert_eq!(ledger.leased_total().expect("db"), 0.4, "b only");
    // b is released (refused elsewhere): its room is free again, and a
    // check of b that arrives late holds nothing.
    assert!(ledger.release_lease(b, later).expect("db"));
    assert_eq!(reserve(b, later), None);
    assert_eq!(ledger.leased_total().expect("db"), 0.0);
    assert_eq!(reserve(c, later), None);
    // An expired lease holds nothing.
    let d = Uuid::new_v4();
    assert!(reserve(d, later).is_some(), "a charged and c held: no room");
    ledger.release_lease(c, later).expect("db");
    assert_eq!(reserve(d, now_ms() - 1), None);
    assert_eq!(ledger.leased_total().expect("db"), 0.0);
    let e = Uuid::new_v4();
    assert_eq!(reserve(e, later), None);
    assert!((ledger.leased_total().expect("db") - 0.4).abs() < 1e-12);
    assert_eq!(ledger.spent("s", None).expect("spent"), 0.4);
}

#[test]
fn budgets_are_enforced_with_figures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path()).expect("open");
    for _ in 0..4 {
        assert!(
            ledger
                .release(&charge(Uuid::new_v4(), 0.25, 1.0), vec![1])
                .expect("db")
                .is_ok()
        );
    }
    match ledger
        .release(&charge(Uuid::new_v4(), 0.25, 1.0), vec![1])
        .expect("db")
    {
        Err(Refusal::Budget(msg)) => {
            assert!(msg.contains("budget exhausted for study s"), "{msg}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(ledger.spent("s", None).expect("spent"), 1.0);
}

#[test]
fn the_audit_chain_detects_edits_deletions_and_truncation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path()).expect("open");
    for _ in 0..5 {
        ledger
            .release(&charge(Uuid::new_v4(), 0.1, 10.0), vec![7])
            .expect("db")
            .expect("released");
    }
    ledger
        .deny("other", "no ethics approval", "steward")
        .expect("deny");
    assert_eq!(ledger.verify().expect("verify").problem, None);
    let conn = Connection::open(ledger.path()).expect("open raw");

    conn.execute("UPDATE audit SET rho = 0.0 WHERE seq = 3", [])
        .expect("edit");
    let problem = ledger.verify().expect("verify").problem.expect("detected");
    assert!(problem.contains("record 3 was edited"), "{problem}");
    conn.execute("UPDATE audit SET rho = 0.1 WHERE seq = 3", [])
        .expect("restore");
    assert_eq!(ledger.verify().expect("verify").problem, None);

    conn.execute("DELETE FROM audit WHERE seq = 2", [])
        .expect("delete");
    let problem = ledger.verify().expect("verify").problem.expect("detected");
    assert!(problem.contains("record 2 is missing"), "{problem}");
}

#[test]
fn debits_deleted_or_cheapened_are_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path()).expect("open");
    let tasks: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for t in &tasks {
        ledger
            .release(&charge(*t, 0.1, 10.0), vec![7])
            .expect("db")
            .expect("released");
    }
    assert_eq!(ledger.verify().expect("verify").problem, None);
    let conn = Connection::open(ledger.path()).expect("open raw");
    let id = tasks[1].to_string();
    for (tamper, undo) in [
        (
            "UPDATE releases SET rho = 0 WHERE task_id = ?1",
            "UPDATE releases SET rho = 0.1 WHERE task_id = ?1",
        ),
        (
            "UPDATE releases SET study = 'other' WHERE task_id = ?1",
            "UPDATE releases SET study = 's' WHERE task_id = ?1",
        ),
    ] {
        conn.execute(tamper, [&id]).expect("tamper");
        let problem = ledger.verify().expect("verify").problem.expect("detected");
        assert!(
            problem.contains(&id) && problem.contains("refunded"),
            "{problem}"
        );
        conn.execute(undo, [&id]).expect("undo");
        assert_eq!(ledger.verify().expect("verify").problem, None);
    }
    conn.execute("DELETE FROM releases WHERE task_id = ?1", [&id])
        .expect("delete");
    let problem = ledger.verify().expect("verify").problem.expect("detected");
    assert!(problem.contains(&id), "{problem}");
}

#[test]
fn swapping_audit_records_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path()).expect("open");
    for _ in 0..4 {
        ledger
            .release(&charge(Uuid::new_v4(), 0.1, 10.0), vec![7])
            .expect("db")
            .expect("released");
    }
    assert_eq!(ledger.verify().expect("verify").problem, None);
    let conn = Connection::open(ledger.path()).expect("open raw");
    // Swap records 2 and 3 whole (each keeps its own valid hash).
    conn.execute_batch(
        "UPDATE audit SET seq = -2 WHERE seq = 2;
         UPDATE audit SET seq = 2 WHERE seq = 3;
         UPDATE audit SET seq = 3 WHERE seq = -2;",
    )
    .expect("swap");
    let problem = ledger.verify().expect("verify").problem.expect("detected");
    assert!(
        problem.contains("record 2 does not follow record 1"),
        "{problem}"
    );
}

#[test]
fn researcher_budgets_cap_each_researcher_within_the_study() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path()).expect("open");
    let by = |researcher: &str| {
        let mut c = charge(Uuid::new_v4(), 0.3, 10.0);
        c.researcher = researcher.into();
        c.researcher_budget = Some(0.5);
        c
    };
    assert!(ledger.release(&by("ann"), vec![1]).expect("db").is_ok());
    match ledger.release(&by("ann"), vec![1]).expect("db") {
        Err(Refusal::Budget(msg)) => {
            assert!(msg.contains("researcher ann in study s"), "{msg}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Another researcher of the same study still has their own budget.
    assert!(ledger.release(&by("ben"), vec![1]).expect("db").is_ok());
    assert!((ledger.spent("s", Some("ann")).expect("spent") - 0.3).abs() < 1e-12);
    assert!((ledger.spent("s", None).expect("spent") - 0.6).abs() < 1e-12);
}

#[test]
fn deleting_the_newest_records_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path()).expect("open");
    for _ in 0..3 {
        ledger
            .release(&charge(Uuid::new_v4(), 0.1, 10.0), vec![7])
            .expect("db")
            .expect("released");
    }
    let conn = Connection::open(ledger.path()).expect("open raw");
    conn.execute(
        "DELETE FROM releases WHERE task_id IN (SELECT task_id FROM audit WHERE seq = 3)",
        [],
    )
    .expect("delete release");
    conn.execute("DELETE FROM audit WHERE seq = 3", [])
        .expect("delete");
    let problem = ledger.verify().expect("verify").problem.expect("detected");
    assert!(
        problem.contains("records at the end were deleted"),
        "{problem}"
    );
}

#[test]
fn studies_move_through_approval() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path()).expect("open");
    assert_eq!(
        ledger.study_status("s").expect("status"),
        StudyStatus::Unknown
    );
    assert_eq!(
        ledger
            .register_study("s", false, "policy", Some("\"S\" (PI p)"))
            .expect("register"),
        StudyStatus::Pending
    );
    let listed = ledger.studies().expect("studies");
    assert_eq!(listed[0].description.as_deref(), Some("\"S\" (PI p)"));
    ledger.approve("s", Some(0.5), "steward").expect("approve");
    assert_eq!(
        ledger.study_status("s").expect("status"),
        StudyStatus::Approved {
            budget_rho: Some(0.5)
        }
    );
    ledger.deny("s", "withdrawn", "steward").expect("deny");
    assert_eq!(
        ledger.study_status("s").expect("status"),
        StudyStatus::Denied {
            reason: "withdrawn".into()
        }
    );
    assert_eq!(ledger.verify().expect("verify").problem, None);
}

/// Turns a ledger back into the previous release's format: the same tables
/// without a schema version, an application id or the node's name.
fn as_previous_release(dir: &Path) {
    let raw = Connection::open(dir.join("ledger.sqlite")).expect("raw");
    raw.execute_batch("DROP TABLE meta; PRAGMA application_id = 0; PRAGMA user_version = 0;")
        .expect("downgrade");
}

#[test]
fn a_ledger_of_the_previous_release_is_upgraded_keeping_debits_and_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = Uuid::new_v4();
    {
        let ledger = Ledger::open(dir.path()).expect("open");
        assert_eq!(
            ledger
                .release(&charge(id, 0.5, 1.0), b"answer".to_vec())
                .expect("db"),
            Ok(b"answer".to_vec())
        );
    }
    as_previous_release(dir.path());
    assert_eq!(
        confer_store::inspect(&dir.path().join("ledger.sqlite"), &SCHEMA).expect("inspect"),
        confer_store::Found::Older { from: 0, to: 2 }
    );
    let ledger = Ledger::open(dir.path()).expect("upgrade");
    // The debit, the stored answer and the audit chain survive.
    assert_eq!(ledger.spent("s", None).expect("spent"), 0.5);
    assert_eq!(
        ledger
            .release(&charge(id, 0.5, 1.0), b"again".to_vec())
            .expect("db"),
        Ok(b"answer".to_vec())
    );
    let check = ledger.verify().expect("verify");
    assert!(check.problem.is_none(), "{:?}", check.problem);
    assert!(check.records >= 1);
    // The old file is kept beside it.
    assert!(dir.path().join("ledger.sqlite.schema-v0.bak").exists());
    assert_eq!(
        confer_store::inspect(&dir.path().join("ledger.sqlite"), &SCHEMA).expect("inspect"),
        confer_store::Found::Current(2)
    );
}

#[test]
fn a_ledger_of_a_newer_release_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(Ledger::open(dir.path()).expect("open"));
    Connection::open(dir.path().join("ledger.sqlite"))
        .expect("raw")
        .execute_batch("PRAGMA user_version = 7")
        .expect("bump");
    let err = Ledger::open(dir.path()).err().expect("refused").to_string();
    assert!(
        err.contains("schema version 7, written by a newer confer"),
        "{err}"
    );
}

#[test]
fn a_state_directory_belongs_to_one_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path()).expect("open");
    assert_eq!(ledger.node_name().expect("name"), None);
    ledger.bind_node("site-a").expect("bind");
    ledger.bind_node("site-a").expect("same node again");
    drop(ledger);
    let ledger = Ledger::open(dir.path()).expect("reopen");
    assert_eq!(ledger.node_name().expect("name").as_deref(), Some("site-a"));
    let err = ledger
        .bind_node("site-b")
        .expect_err("another node")
        .to_string();
    assert!(
        err.contains("is the ledger of node \"site-a\", but this node is \"site-b\""),
        "{err}"
    );
}
