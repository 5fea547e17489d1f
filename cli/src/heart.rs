//! The four UCI heart-disease centres (FLamby's Fed-Heart-Disease) as a
//! local federation: node configs derived from the shipped examples in
//! `examples/datasets/uci-heart/`, for the demo, the end-to-end tests and
//! the training benchmark.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};

use crate::demo::{Federation, FederationOptions, start_coordinator, start_nodes_from};

/// The centres, as the example configs name them.
pub const CENTRES: [&str; 4] = ["cleveland", "hungary", "switzerland", "va-long-beach"];

/// The example configs' directory.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("examples")
        .join("datasets")
        .join("uci-heart")
}

/// The FLamby job of the examples (`job.toml`): logistic regression on 13
/// features, FedAvg, per-centre split as FLamby's.
pub fn example_job() -> anyhow::Result<String> {
    let path = examples_dir().join("job.toml");
    std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

/// Writes `<work>/<centre>.toml` for every centre: the example's catalog,
/// with the data path made absolute, a free loopback port, a state
/// directory under `work`, the coordinator key `key_hex` and `policy` as
/// the `[policy]` section.
pub fn write_node_configs(
    work: &Path,
    key_hex: &str,
    policy: &str,
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    std::fs::create_dir_all(work).with_context(|| format!("cannot create {}", work.display()))?;
    let policy: toml::Table = toml::from_str(policy).context("the policy is not TOML")?;
    let policy = policy
        .get("policy")
        .cloned()
        .ok_or_else(|| anyhow!("the policy text has no [policy] section"))?;
    CENTRES
        .iter()
        .map(|&centre| {
            let example = examples_dir().join(format!("{centre}.toml"));
            let text = std::fs::read_to_string(&example)
                .with_context(|| format!("cannot read {}", example.display()))?;
            let mut config: toml::Table =
                toml::from_str(&text).with_context(|| format!("{}", example.display()))?;
            let node = config
                .get_mut("node")
                .and_then(toml::Value::as_table_mut)
                .ok_or_else(|| anyhow!("{}: no [node]", example.display()))?;
            node.insert("listen".into(), "127.0.0.1:0".into());
            let state = work.join("state").join(centre);
            node.insert("state_dir".into(), state.display().to_string().into());
            node.remove("coordinator_key_file");
            node.insert("coordinator_key".into(), key_hex.into());
            let heart = config
                .get_mut("tables")
                .and_then(|t| t.get_mut("heart"))
                .and_then(toml::Value::as_table_mut)
                .ok_or_else(|| anyhow!("{}: no [tables.heart]", example.display()))?;
            let data = heart
                .get("path")
                .and_then(toml::Value::as_str)
                .ok_or_else(|| anyhow!("{}: no tables.heart.path", example.display()))?;
            let data = examples_dir().join(data);
            let data = data
                .canonicalize()
                .with_context(|| format!("UCI heart-disease data at {}", data.display()))?;
            heart.insert("path".into(), data.display().to_string().into());
            config.insert("policy".into(), policy.clone());
            let path = work.join(format!("{centre}.toml"));
            std::fs::write(&path, toml::to_string(&config)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok((centre.to_string(), path))
        })
        .collect()
}

/// Starts the four centres and a coordinator (plaintext, loopback) in
/// `work`, with `policy` at every node; `extra` goes into the
/// coordinator's `[coordinator]` section.
pub async fn start_federation(
    program: &Path,
    work: &Path,
    policy: &str,
    extra: &str,
    options: &FederationOptions<'_>,
) -> anyhow::Result<Federation> {
    std::fs::create_dir_all(work).with_context(|| format!("cannot create {}", work.display()))?;
    let identity = confer_protocol::signing::Identity::generate()?;
    let public = identity.save(&work.join("coordinator.key"))?;
    let configs = write_node_configs(work, &public, policy)?;
    let nodes = start_nodes_from(program, configs, options.log_level).await?;
    let urls: Vec<String> = nodes
        .nodes
        .iter()
        .map(|n| format!("http://{}", n.addr))
        .collect();
    start_coordinator(program, work, nodes, &urls, extra, options).await
}

/// The training and held-out sets of every centre for `job`, read by the
/// nodes' own code over the example configs (for checking a trained model
/// against the data; no network involved). `work` holds the configs.
pub async fn local_datasets(
    work: &Path,
    job: &confer_models::job::JobSpec,
) -> anyhow::Result<Vec<(String, confer_models::Dataset, confer_models::Dataset)>> {
    let key = confer_protocol::signing::Identity::generate()?.public_hex();
    let mut out = Vec::new();
    for (centre, path) in write_node_configs(work, &key, "[policy]\n")? {
        let config = confer_node::NodeConfig::load(&path)?;
        let ctx = datafusion::prelude::SessionContext::new();
        let catalog = confer_node::catalog::load(&config, &ctx).await?;
        let query_catalog = confer_query::Catalog::for_node(&catalog);
        let (train, test, _) =
            confer_node::train::job_datasets(&ctx, &query_catalog, job, |_| None)
                .await
                .map_err(|e| anyhow!("{centre}: {e}"))?;
        out.push((centre, train, test));
    }
    Ok(out)
}
