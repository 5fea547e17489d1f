//! The query check (`confer.query.check`) a coordinator asks of every node
//! before any node runs a query: it admits and compiles the signed task and
//! applies the node's policy and budget, and runs and charges nothing. A
//! refusal of the query itself is an answer (the coordinator stops the
//! query everywhere); a table this node does not publish is an error (the
//! node is left out, as when the query runs).

use std::sync::Arc;
use std::time::Duration;

use arrow_flight::Action;
use arrow_flight::flight_service_server::FlightService;
use confer_node::NodeConfig;
use confer_node::service::{NodeService, NodeState};
use confer_protocol::actions;
use confer_protocol::signing::Identity;
use confer_protocol::task::{QueryCheck, Task};
use futures::TryStreamExt;
use tonic::Request;

fn count(epsilon: f64, table: &str) -> String {
    format!(
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = {epsilon}, delta = 1e-6) COUNT(*) AS n FROM {table}"
    )
}

#[tokio::test]
async fn the_check_refuses_answers_or_leaves_the_node_out_and_charges_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("person.csv"),
        "person_id,gender_concept_id,year_of_birth,race_concept_id,ethnicity_concept_id\n1,8507,1970,0,0\n2,8532,1980,0,0\n",
    )
    .expect("csv");
    let coordinator = Identity::generate().expect("key");
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        format!(
            "[node]\nname = \"n\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"\ncoordinator_key = \"{}\"\n\
             [policy]\napproval = \"auto\"\nmax_query_epsilon = 1.0\n\
             default_study_budget = {{ epsilon = 1.5, delta = 1e-6 }}\nnode_budget = {{ epsilon = 100.0, delta = 1e-6 }}\n\
             [tables.person]\npath = \"person.csv\"\nprivacy_unit = \"person_id\"\n",
            coordinator.public_hex()
        ),
    )
    .expect("node.toml");
    let config = NodeConfig::load(&path).expect("config");
    let state = NodeState::open(&config).await.expect("state");
    let ledger = state.ledger.clone();
    let service = NodeService::new(Arc::new(state));
    let check = |sql: String| {
        let task = Task::query("s", "alice", &sql, Duration::from_secs(60)).for_nodes(["n"]);
        let body = coordinator
            .sign(&task)
            .expect("sign")
            .to_bytes()
            .expect("bytes");
        let service = &service;
        async move {
            let answer = service
                .do_action(Request::new(Action::new(actions::QUERY_CHECK, body)))
                .await?
                .into_inner()
                .try_collect::<Vec<_>>()
                .await?;
            let check: QueryCheck = serde_json::from_slice(&answer[0].body).expect("json");
            Ok::<QueryCheck, tonic::Status>(check)
        }
    };

    // Within the cap and the budget: it would run, at this cost.
    let ok = check(count(0.5, "person")).await.expect("check");
    assert!(ok.refused.is_none(), "{:?}", ok.refused);
    let rho = confer_privacy::accounting::rho_for_epsilon_delta(0.5, 1e-6).expect("rho");
    assert!((ok.rho - rho).abs() < 1e-12 && ok.node == "n");

    // Over the per-query cap: refused, with the figures, as an answer.
    let capped = check(count(1.2, "person")).await.expect("check");
    let why = capped.refused.expect("over the cap").message;
    assert!(why.contains("per-task cap of epsilon 1"), "{why}");

    // Nothing was charged by either check, so the budget still fits 1.0.
    assert_eq!(ledger.spent("s", None).expect("spent"), 0.0);
    let fits = check(count(1.0, "person")).await.expect("check");
    assert!(fits.refused.is_none(), "{:?}", fits.refused);

    // A table this node does not publish: an error, so it is left out.
    let status = check(count(0.5, "condition_occurrence"))
        .await
        .expect_err("not published here");
    assert!(
        status.message().contains("is not in the network catalog"),
        "{}",
        status.message()
    );
    // The coordinator decides on the typed reason, not on the words.
    let err = confer_protocol::ProtocolError::from_status(&status);
    assert!(err.is(confer_protocol::Reason::NotInCatalog), "{err:?}");
    assert_eq!(err.site.as_deref(), Some("n"));

    // An action the node does not serve: unimplemented, not retryable.
    let err = confer_protocol::ProtocolError::from_status(
        &service
            .do_action(Request::new(Action::new("confer.nope", Vec::new())))
            .await
            .err()
            .expect("unknown action"),
    );
    assert_eq!(err.kind, confer_protocol::ErrorKind::Unimplemented);
    assert!(
        !err.retryable && err.message.contains("confer.query.check"),
        "{err:?}"
    );
}
