//! The steward's policy is re-read from node.toml when the file changes,
//! without a restart; a file that no longer parses keeps the previous
//! policy. Both are audited.

use std::time::{Duration, SystemTime};

use confer_node::NodeConfig;
use confer_node::ledger::AuditFilter;
use confer_node::service::NodeState;

fn write(path: &std::path::Path, text: &str, at: SystemTime) {
    std::fs::write(path, text).expect("write node.toml");
    // A distinct modification time, whatever the filesystem's resolution.
    std::fs::File::options()
        .write(true)
        .open(path)
        .expect("open")
        .set_modified(at)
        .expect("set mtime");
}

fn config(key: &str, cap: &str) -> String {
    format!(
        "[node]\nname = \"n\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"\ncoordinator_key = \"{key}\"\n\
         [policy]\napproval = \"auto\"\n{cap}\n\
         [tables.person]\npath = \"person.csv\"\nprivacy_unit = \"person_id\"\n"
    )
}

#[tokio::test]
async fn policy_changes_take_effect_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("person.csv"),
        "person_id,gender_concept_id,year_of_birth,race_concept_id,ethnicity_concept_id\n1,8507,1970,0,0\n",
    )
    .expect("csv");
    let key = confer_protocol::signing::Identity::generate()
        .expect("key")
        .public_hex();
    let path = dir.path().join("node.toml");
    let start = SystemTime::now();
    write(&path, &config(&key, "max_query_epsilon = 1.0"), start);
    let node = NodeConfig::load(&path).expect("config");
    let state = NodeState::open(&node).await.expect("state");
    let ledger = state.ledger.clone();
    assert_eq!(state.policy().expect("policy").max_query_epsilon, Some(1.0));

    write(
        &path,
        &config(&key, "max_query_epsilon = 2.0\nmin_group_size = 5"),
        start + Duration::from_secs(10),
    );
    let policy = state.policy().expect("reloaded");
    assert_eq!(policy.max_query_epsilon, Some(2.0));
    assert_eq!(policy.min_group_size, 5);

    write(&path, "[policy\nbroken", start + Duration::from_secs(20));
    let kept = state.policy().expect("previous policy kept");
    assert_eq!(kept.max_query_epsilon, Some(2.0));

    let reasons: Vec<String> = ledger
        .audit_records(&AuditFilter::default())
        .expect("audit")
        .into_iter()
        .filter(|r| r.kind == "policy")
        .filter_map(|r| r.reason)
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].starts_with("policy reloaded from"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].starts_with("policy reload failed, previous policy kept"),
        "{reasons:?}"
    );
    assert_eq!(ledger.verify().expect("verify").problem, None);
}
