//! Set-up shared by the benches: a coordinator on loopback in front of
//! in-process nodes, with a researcher `bench` and a study `bench`.

use std::path::Path;

use confer_coordinator::RunningCoordinator;
use confer_coordinator::config::CoordinatorConfig;
use confer_coordinator::store::{Role, SqliteStore, Store, Study, now_ms};
use confer_node::RunningNode;

/// Starts a coordinator in `dir` (which holds `coordinator.key`) for
/// `nodes`; `extra` is appended to its `[coordinator]` section. Returns it
/// with the researcher's bearer token.
pub async fn coordinator(
    dir: &Path,
    nodes: &[RunningNode],
    extra: &str,
) -> anyhow::Result<(RunningCoordinator, String)> {
    let mut text = format!(
        "[coordinator]\nlisten = \"127.0.0.1:0\"\nsigning_key = \"coordinator.key\"\nstate = \"state.sqlite\"\n\
         health_interval_secs = 3600\n{extra}"
    );
    for n in nodes {
        text.push_str(&format!(
            "[[nodes]]\nname = \"{}\"\nurl = \"http://{}\"\n",
            n.name, n.addr
        ));
    }
    let config_path = dir.join("coordinator.toml");
    std::fs::write(&config_path, text)?;
    let config = CoordinatorConfig::load(&config_path)?;
    let store = SqliteStore::open(&config.coordinator.state)?;
    let token = store.add_user("bench", Role::Researcher)?;
    store.create_study(&Study {
        name: "bench".into(),
        title: "benchmark".into(),
        principal_investigator: "bench".into(),
        members: vec![],
        tables: vec![],
        requested_epsilon: 1.0,
        requested_delta: 1e-6,
        ethics_ref: "-".into(),
        min_sites: None,
        created_ms: now_ms(),
        created_by: "bench".into(),
    })?;
    drop(store);
    let coordinator =
        confer_coordinator::start(config, confer_coordinator::Transport::InsecureLoopback).await?;
    Ok((coordinator, token))
}
