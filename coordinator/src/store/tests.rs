use super::*;

fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = SqliteStore::open(&dir.path().join("state.sqlite")).expect("open");
    (dir, s)
}

#[test]
fn tokens_authenticate_until_revoked_and_only_hashes_are_stored() {
    let (dir, s) = store();
    let token = s.add_user("alice", Role::Researcher).expect("add");
    assert!(token.starts_with("cft_"));
    assert_eq!(
        s.user_by_token(&token).expect("lookup").map(|u| u.role),
        Some(Role::Researcher)
    );
    assert!(s.user_by_token("cft_wrong").expect("lookup").is_none());
    assert!(s.add_user("alice", Role::Admin).is_err());
    let raw = std::fs::read(dir.path().join("state.sqlite")).expect("read");
    assert!(
        !raw.windows(token.len()).any(|w| w == token.as_bytes()),
        "token stored in clear"
    );
    s.revoke_user("alice").expect("revoke");
    assert!(s.user_by_token(&token).expect("lookup").is_none());
    assert!(s.revoke_user("alice").is_err());
}

#[test]
fn a_revoked_name_can_be_given_again_and_tokens_rotate() {
    let (_dir, s) = store();
    let first = s.add_user("bob", Role::Researcher).expect("add");
    s.add_certificate("bob", "f1").expect("cert");
    let rotated = s.rotate_token("bob").expect("rotate");
    assert!(
        s.user_by_token(&first).expect("lookup").is_none(),
        "old token stops"
    );
    assert!(s.user_by_token(&rotated).expect("lookup").is_some());
    s.revoke_user("bob").expect("revoke");
    assert!(
        s.rotate_token("bob").is_err(),
        "a revoked user has no token to rotate"
    );
    let again = s
        .add_user("bob", Role::Analyst)
        .expect("a revoked name is free again");
    let user = s.user_by_token(&again).expect("lookup").expect("active");
    assert_eq!(user.role, Role::Analyst);
    assert!(s.user_by_token(&rotated).expect("lookup").is_none());
    assert!(
        s.user_by_certificate("f1").expect("lookup").is_none(),
        "the old certificate stays revoked"
    );
}

#[test]
fn the_audit_log_is_chained_and_edits_or_deletions_are_found() {
    let (dir, s) = store();
    for i in 0..5 {
        s.audit(&CoordinatorAudit {
            at_ms: i,
            user: "alice".into(),
            study: Some("gi".into()),
            action: "query".into(),
            outcome: "ok".into(),
            detail: format!("task {i}"),
        })
        .expect("audit");
    }
    assert_eq!(s.verify_audit().expect("verify"), (5, None));
    let raw = Connection::open(dir.path().join("state.sqlite")).expect("open");
    raw.execute("UPDATE audit SET outcome = 'refused' WHERE seq = 3", [])
        .expect("edit");
    let (good, problem) = s.verify_audit().expect("verify");
    assert_eq!(good, 2);
    assert!(problem.expect("found").contains("record 3 was edited"));
    raw.execute("UPDATE audit SET outcome = 'ok' WHERE seq = 3", [])
        .expect("undo");
    raw.execute("DELETE FROM audit WHERE seq = 2", [])
        .expect("delete");
    let (_, problem) = s.verify_audit().expect("verify");
    assert!(problem.expect("found").contains("record 2 is missing"));
}

#[test]
fn a_log_from_before_the_chain_is_chained_when_opened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("old.sqlite");
    {
        let raw = Connection::open(&path).expect("open");
        raw.execute_batch(
            "CREATE TABLE audit (
                 seq INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, user TEXT NOT NULL, study TEXT,
                 action TEXT NOT NULL, outcome TEXT NOT NULL, detail TEXT NOT NULL);
             INSERT INTO audit VALUES (4, 1, 'a', NULL, 'query', 'ok', 'x');
             INSERT INTO audit VALUES (9, 2, 'b', NULL, 'query', 'ok', 'y');",
        )
        .expect("old log");
    }
    let s = SqliteStore::open(&path).expect("open");
    assert_eq!(s.verify_audit().expect("verify"), (2, None));
    s.audit(&CoordinatorAudit {
        at_ms: 3,
        user: "c".into(),
        study: None,
        action: "explain".into(),
        outcome: "ok".into(),
        detail: String::new(),
    })
    .expect("audit");
    assert_eq!(s.verify_audit().expect("verify"), (3, None));
    assert_eq!(s.audit_log().expect("log").len(), 3);
}

#[test]
fn studies_round_trip_and_admit_members() {
    let (_dir, s) = store();
    let study = Study {
        name: "gi".into(),
        title: "GI bleeding".into(),
        principal_investigator: "pi".into(),
        members: vec!["alice".into()],
        tables: vec![],
        requested_epsilon: 5.0,
        requested_delta: 1e-6,
        ethics_ref: "IRB-1".into(),
        min_sites: Some(2),
        created_ms: 1,
        created_by: "admin".into(),
    };
    s.create_study(&study).expect("create");
    assert!(s.create_study(&study).is_err());
    assert_eq!(s.study("gi").expect("get"), Some(study.clone()));
    let user = |name: &str, role| User {
        name: name.into(),
        role,
        created_ms: 0,
        revoked_ms: None,
    };
    assert!(study.admits(&user("alice", Role::Researcher)));
    assert!(study.admits(&user("pi", Role::Researcher)));
    assert!(study.admits(&user("root", Role::Admin)));
    assert!(!study.admits(&user("mallory", Role::Researcher)));
}

#[test]
fn results_written_before_statements_were_kept_still_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("old.sqlite");
    {
        // The results table as the previous release wrote it.
        let raw = Connection::open(&path).expect("open");
        raw.execute_batch(
            "CREATE TABLE results (
                 query_id TEXT PRIMARY KEY, study TEXT NOT NULL, user TEXT NOT NULL,
                 statement_hash TEXT NOT NULL, sites TEXT NOT NULL, created_ms INTEGER NOT NULL,
                 result BLOB NOT NULL);
             INSERT INTO results VALUES ('q-old', 'gi', 'alice', 'h', 'site-a,site-b', 5, x'00');",
        )
        .expect("old table");
    }
    let s = SqliteStore::open(&path).expect("open");
    s.record_result(&ResultRecord {
        query_id: "q-new".into(),
        study: "gi".into(),
        user: "bob".into(),
        statement_hash: "h2".into(),
        sites: vec!["site-a".into()],
        result: vec![1, 2],
        statement: Some("SELECT WITH DIFFERENTIAL_PRIVACY ...".into()),
        cost: Some((1.0, 1e-6, 0.02)),
        created_ms: 9,
    })
    .expect("record");
    let all = s.results(None, None, 10).expect("results");
    assert_eq!(
        all.iter().map(|r| r.query_id.as_str()).collect::<Vec<_>>(),
        ["q-new", "q-old"],
        "newest first"
    );
    assert_eq!(all[1].statement, None);
    assert_eq!(all[1].cost, None);
    assert_eq!(all[1].sites, ["site-a", "site-b"]);
    assert_eq!(all[0].cost, Some((1.0, 1e-6, 0.02)));
    let bobs = s.results(Some("bob"), None, 10).expect("results");
    assert!(
        s.results(None, Some("other"), 10)
            .expect("results")
            .is_empty()
    );
    assert_eq!(bobs.len(), 1);
    assert_eq!(
        bobs[0].statement.as_deref(),
        Some("SELECT WITH DIFFERENTIAL_PRIVACY ...")
    );
    // Opening again adds nothing twice.
    drop(s);
    let again = SqliteStore::open(&path).expect("reopen");
    assert_eq!(
        again.results(None, Some("gi"), 1).expect("results").len(),
        1
    );
}

#[test]
fn a_store_of_the_previous_release_is_upgraded_and_a_newer_one_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.sqlite");
    let token = {
        let s = SqliteStore::open(&path).expect("open");
        s.add_user("alice", Role::Researcher).expect("user")
    };
    // The previous release wrote the same tables without a version.
    Connection::open(&path)
        .expect("raw")
        .execute_batch("PRAGMA application_id = 0; PRAGMA user_version = 0;")
        .expect("downgrade");
    let s = SqliteStore::open(&path).expect("upgrade");
    assert_eq!(
        s.user_by_token(&token).expect("lookup").map(|u| u.name),
        Some("alice".to_string())
    );
    assert!(dir.path().join("state.sqlite.schema-v0.bak").exists());
    drop(s);
    assert_eq!(
        confer_store::inspect(&path, &SCHEMA).expect("inspect"),
        confer_store::Found::Current(SCHEMA.version())
    );
    Connection::open(&path)
        .expect("raw")
        .execute_batch("PRAGMA user_version = 42")
        .expect("bump");
    let err = SqliteStore::open(&path).err().expect("refused").to_string();
    assert!(err.contains("written by a newer confer"), "{err}");
    // A node's ledger is not a coordinator store.
    let ledger = dir.path().join("ledger.sqlite");
    Connection::open(&ledger)
        .expect("raw")
        .execute_batch(&format!(
            "PRAGMA application_id = {}; CREATE TABLE releases (task_id TEXT);",
            confer_store::NODE_LEDGER_ID
        ))
        .expect("ledger");
    let err = SqliteStore::open(&ledger)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("holds a confer node ledger, not a confer coordinator store"),
        "{err}"
    );
}
