//! `confer demo`: a local federation over the GiBleed OMOP data.
//!
//! Splits GiBleed by person into sites, starts one node per site and a
//! coordinator as child processes on loopback ports, runs example DP queries
//! and prints their answers with confidence intervals. With `--serve` the
//! federation stays up for your own queries until Ctrl-C.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};

use crate::DemoArgs;
use crate::children::ServerChild;
use crate::client::{Client, OutputFormat, render};
use crate::gibleed;
use std::collections::BTreeMap;

/// A scripted query: what it shows, the statement, and whether confer must refuse it.
pub struct DemoQuery {
    /// What the query shows.
    pub title: &'static str,
    /// The statement.
    pub sql: &'static str,
    /// Whether the coordinator must refuse it (the demo shows the message).
    pub refused: bool,
}

const fn q(title: &'static str, sql: &'static str) -> DemoQuery {
    DemoQuery {
        title,
        sql,
        refused: false,
    }
}

/// The scripted queries.
pub const QUERIES: &[DemoQuery] = &[
    q(
        "Persons by sex (public domain {8507 male, 8532 female}; one row per person)",
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, delta = 1e-6)
  gender_concept_id, COUNT(*) AS persons
FROM person
GROUP BY gender_concept_id
ORDER BY gender_concept_id",
    ),
    q(
        "Patients with gastrointestinal bleeding (concept 192671), per site",
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, delta = 1e-6)
  site, COUNT(DISTINCT person_id) AS patients
FROM condition_occurrence
WHERE condition_concept_id = 192671
GROUP BY site
ORDER BY site",
    ),
    q(
        "Most frequent conditions of a public concept set; each person counts in at most 3 of them, with at most 2 diagnoses each",
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 2.0, delta = 1e-6,
    max_groups_contributed = 3, max_rows_contributed = 2)
  condition_concept_id, COUNT(DISTINCT person_id) AS patients, COUNT(*) AS diagnoses
FROM condition_occurrence
GROUP BY condition_concept_id
ORDER BY patients DESC
LIMIT 5",
    ),
    q(
        "Visits by type under pure DP (Laplace): empty public groups are released too, with noise",
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, mechanism = 'laplace', max_rows_contributed = 3)
  visit_concept_id, COUNT(*) AS visits
FROM visit_occurrence
GROUP BY visit_concept_id",
    ),
    q(
        "What a query would cost and how accurate it would be, without spending anything",
        "EXPLAIN PRIVACY SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.5, delta = 1e-6,
    max_groups_contributed = 2)
  drug_concept_id, COUNT(DISTINCT person_id) AS patients
FROM drug_exposure
GROUP BY drug_concept_id",
    ),
    DemoQuery {
        title: "A query that would release person-level values is refused before any node is asked",
        sql: "SELECT person_id, year_of_birth FROM person",
        refused: true,
    },
];

/// A running demo federation.
pub struct Federation {
    /// Node children.
    pub nodes: Vec<ServerChild>,
    /// The coordinator child.
    pub coordinator: ServerChild,
    /// Where configs, split data and ledgers live.
    pub work_dir: PathBuf,
    /// Bearer tokens by user name (`admin` and the options' users).
    pub tokens: BTreeMap<String, String>,
    /// Steward tokens of the nodes that serve a steward page, by site.
    pub steward_tokens: BTreeMap<String, String>,
}

impl Federation {
    /// The coordinator's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.coordinator.addr)
    }

    /// Takes a node out of the federation (to kill or stop it by hand).
    pub fn take_node(&mut self, site: &str) -> Option<ServerChild> {
        let label = format!("node {site}");
        let i = self.nodes.iter().position(|n| n.label == label)?;
        Some(self.nodes.remove(i))
    }

    /// A client connected as `user`.
    pub async fn client(&self, user: &str) -> anyhow::Result<Client> {
        let token = self
            .tokens
            .get(user)
            .ok_or_else(|| anyhow!("the federation has no user {user}"))?;
        Client::connect(&self.url(), Some(token)).await
    }

    /// Stops every child (coordinator first).
    pub async fn stop(self) -> anyhow::Result<()> {
        let grace = Duration::from_secs(10);
        let mut errors = Vec::new();
        if let Err(e) = self.coordinator.stop(grace).await {
            errors.push(e.to_string());
        }
        for n in self.nodes {
            if let Err(e) = n.stop(grace).await {
                errors.push(e.to_string());
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("{}", errors.join("; "))
        }
    }
}

/// The demo's node policy: studies approved automatically, a per-query
/// cap, and a budget for the `demo` study.
pub const DEMO_POLICY: &str = r#"[policy]
approval = "auto"
max_query_epsilon = 5.0
min_group_size = 0

[policy.studies.demo]
budget = { epsilon = 50.0, delta = 1e-5 }
"#;

/// How to start a federation.
pub struct FederationOptions<'a> {
    /// Number of sites.
    pub sites: usize,
    /// Coordinator port (0: any free port).
    pub coordinator_port: u16,
    /// Log level for the children (CONFER_LOG).
    pub log_level: &'a str,
    /// The nodes' `[policy]` section.
    pub policy: &'a str,
    /// Researchers to create at the coordinator (besides `admin`).
    pub users: &'a [&'a str],
    /// Studies to create, each with every user as a member.
    pub studies: &'a [&'a str],
    /// More person-level tables to split by their unit and serve.
    pub extra_tables: &'a [ExtraTable<'a>],
}

/// A person-level CSV table served beside GiBleed's.
#[derive(Debug, Clone, Copy)]
pub struct ExtraTable<'a> {
    /// Table name queries use.
    pub name: &'a str,
    /// The CSV file.
    pub source: &'a Path,
    /// Its privacy unit column (a whole number; rows go to site unit mod sites).
    pub unit: &'a str,
    /// TOML lines for `[tables.<name>.columns]` (types, bounds, domains).
    pub columns: &'a str,
}

impl ExtraTable<'_> {
    /// The node.toml section for this table read from `path`.
    pub fn config(&self, path: &Path) -> String {
        format!(
            "\n[tables.{}]\npath = {:?}\nformat = \"csv\"\nprivacy_unit = \"{}\"\n[tables.{}.columns]\n{}\n",
            self.name,
            path.display().to_string(),
            self.unit,
            self.name,
            self.columns
        )
    }
}

/// Nodes started over split GiBleed data, before the coordinator.
pub struct NodeSet {
    /// The node children.
    pub nodes: Vec<ServerChild>,
    /// Site names, in order.
    pub names: Vec<String>,
    /// Steward tokens of the nodes that serve a steward page, by site.
    pub steward_tokens: BTreeMap<String, String>,
}

/// Splits the data, makes the coordinator's signing key, writes node
/// configs and starts the nodes.
pub async fn start_nodes(
    program: &Path,
    data: &Path,
    work_dir: &Path,
    options: &FederationOptions<'_>,
) -> anyhow::Result<NodeSet> {
    let split_dir = work_dir.join("data");
    let dirs = gibleed::split(data, &split_dir, options.sites, gibleed::PERSON_TABLES)?;
    let key_path = work_dir.join("coordinator.key");
    let identity = confer_protocol::signing::Identity::generate()?;
    let public = identity.save(&key_path)?;
    let mut configs = Vec::new();
    let mut steward_tokens = BTreeMap::new();
    for (i, dir) in dirs.iter().enumerate() {
        let name = format!("site-{}", gibleed::site_letter(i));
        let config = work_dir.join(format!("{name}.toml"));
        let state_dir = work_dir.join("state").join(&name);
        let setup = gibleed::NodeSetup {
            name: &name,
            state_dir: &state_dir,
            coordinator_key: &public,
            policy: options.policy,
        };
        gibleed::write_node_config(&config, &setup, dir, data)?;
        let mut text = std::fs::read_to_string(&config)?;
        for extra in options.extra_tables {
            let file = format!("{}.csv", extra.name);
            text.push_str(&extra.config(&dir.join(&file)));
        }
        // Each node serves its steward's page on loopback.
        text.push_str("\n[console]\nlisten = \"127.0.0.1:0\"\n");
        std::fs::write(&config, text)?;
        steward_tokens.insert(
            name.clone(),
            confer_node::console::new_steward_token(&state_dir)
                .with_context(|| format!("cannot write {name}'s steward token"))?,
        );
        configs.push((name, config));
    }
    for extra in options.extra_tables {
        gibleed::split_file(
            extra.source,
            &dirs,
            &format!("{}.csv", extra.name),
            extra.unit,
        )?;
    }
    let mut nodes = start_nodes_from(program, configs, options.log_level).await?;
    nodes.steward_tokens = steward_tokens;
    Ok(nodes)
}

/// Pins every node's secure-aggregation identity key in every other node's
/// `policy.secure.peers`, as a steward of a plaintext network does (with
/// mutual TLS, certificates prove the keys instead). Each node's key is
/// created in its state directory now, as the node would on first start.
pub fn pin_peers(configs: &[(String, PathBuf)]) -> anyhow::Result<()> {
    let mut keys = Vec::new();
    for (_, path) in configs {
        let config = confer_node::NodeConfig::load(path)?;
        let secure = confer_node::secure::SecureSessions::open(&config.node.state_dir)?;
        keys.push((config.node.name.clone(), secure.identity()));
    }
    for (_, path) in configs {
        let mut text = std::fs::read_to_string(path)?;
        let parsed: toml::Table =
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        let pinned = parsed
            .get("policy")
            .and_then(|p| p.get("secure"))
            .and_then(|s| s.get("peers"))
            .is_some();
        if pinned {
            continue;
        }
        // Appended as its own table, leaving the rest of the file as written.
        text.push_str(
            "
# Peers' secure-aggregation keys, pinned by the federation's set-up.
[policy.secure.peers]
",
        );
        for (name, key) in &keys {
            text.push_str(&format!("{name:?} = \"{key}\"\n"));
        }
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Starts one node per `(site name, node.toml)`, concurrently, each with
/// the others' secure-aggregation keys pinned ([`pin_peers`]).
pub async fn start_nodes_from(
    program: &Path,
    configs: Vec<(String, PathBuf)>,
    log_level: &str,
) -> anyhow::Result<NodeSet> {
    pin_peers(&configs)?;
    let labels: Vec<String> = configs
        .iter()
        .map(|(name, _)| format!("node {name}"))
        .collect();
    let starts = configs
        .iter()
        .zip(&labels)
        .map(|((_, config), label)| ServerChild::start(program, "node", label, config, log_level));
    let nodes: Vec<ServerChild> = futures::future::try_join_all(starts).await?;
    Ok(NodeSet {
        nodes,
        names: configs.into_iter().map(|(name, _)| name).collect(),
        steward_tokens: BTreeMap::new(),
    })
}

/// Writes coordinator.toml for `nodes` reached at `urls` (with `extra`
/// lines in its `[coordinator]` section), registers the options' users and
/// studies, and starts the coordinator.
pub async fn start_coordinator(
    program: &Path,
    work_dir: &Path,
    nodes: NodeSet,
    urls: &[String],
    extra: &str,
    options: &FederationOptions<'_>,
) -> anyhow::Result<Federation> {
    let mut text = format!(
        "# Written by `confer demo`.\n[coordinator]\nlisten = \"127.0.0.1:{}\"\n\
         signing_key = \"coordinator.key\"\nstate = \"state/coordinator.sqlite\"\n\
         max_sites_per_person = 1\n{extra}\n",
        options.coordinator_port
    );
    if !extra.contains("node_timeout_secs") {
        text.push_str("node_timeout_secs = 60\n");
    }
    if !extra.contains("[console]") {
        text.push_str("\n[console]\nlisten = \"127.0.0.1:0\"\n");
    }
    for (name, url) in nodes.names.iter().zip(urls) {
        text.push_str(&format!(
            "\n[[nodes]]\nname = \"{name}\"\nurl = \"{url}\"\n"
        ));
    }
    let coordinator_config = work_dir.join("coordinator.toml");
    std::fs::write(&coordinator_config, text)
        .with_context(|| format!("cannot write {}", coordinator_config.display()))?;
    let tokens = register_people(&work_dir.join("state").join("coordinator.sqlite"), options)?;
    let coordinator = ServerChild::start(
        program,
        "coordinator",
        "coordinator",
        &coordinator_config,
        options.log_level,
    )
    .await?;
    Ok(Federation {
        steward_tokens: nodes.steward_tokens,
        nodes: nodes.nodes,
        coordinator,
        work_dir: work_dir.to_path_buf(),
        tokens,
    })
}

/// Splits the data, makes a signing key, writes configs and starts the
/// nodes and the coordinator (plaintext, loopback).
pub async fn start_federation(
    program: &Path,
    data: &Path,
    work_dir: &Path,
    options: &FederationOptions<'_>,
) -> anyhow::Result<Federation> {
    let nodes = start_nodes(program, data, work_dir, options).await?;
    let urls: Vec<String> = nodes
        .nodes
        .iter()
        .map(|n| format!("http://{}", n.addr))
        .collect();
    start_coordinator(program, work_dir, nodes, &urls, "", options).await
}

/// Creates the users and studies of a federation in the coordinator's state.
fn register_people(
    state: &Path,
    options: &FederationOptions<'_>,
) -> anyhow::Result<BTreeMap<String, String>> {
    use confer_coordinator::store::{Role, SqliteStore, Store, Study, now_ms};
    let store = SqliteStore::open(state)?;
    let mut tokens = BTreeMap::new();
    tokens.insert("admin".to_string(), store.add_user("admin", Role::Admin)?);
    for user in options.users {
        tokens.insert(user.to_string(), store.add_user(user, Role::Researcher)?);
    }
    for study in options.studies {
        store.create_study(&Study {
            name: study.to_string(),
            title: format!("{study} (created by confer demo)"),
            principal_investigator: options
                .users
                .first()
                .copied()
                .unwrap_or("admin")
                .to_string(),
            members: options.users.iter().map(|u| u.to_string()).collect(),
            tables: Vec::new(),
            requested_epsilon: 50.0,
            requested_delta: 1e-5,
            ethics_ref: "DEMO-0001".into(),
            min_sites: None,
            created_ms: now_ms(),
            created_by: "admin".into(),
        })?;
    }
    Ok(tokens)
}

/// `confer demo`.
pub async fn run(args: DemoArgs, verbose: u8) -> anyhow::Result<()> {
    let data = match args.data {
        Some(d) => d,
        None => gibleed::default_data_dir().ok_or_else(|| {
            anyhow!("cannot find the GiBleed CSVs at ../shared/data/eunomia_gibleed/csv: pass --data DIR")
        })?,
    };
    if !data.join("PERSON.csv").is_file() {
        bail!(
            "{} holds no PERSON.csv: --data must be the GiBleed csv directory",
            data.display()
        );
    }
    let data = data
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", data.display()))?;
    let temp;
    let work_dir = match &args.work_dir {
        Some(d) => {
            if d.exists() && std::fs::read_dir(d)?.next().is_some() {
                bail!(
                    "--work-dir {} is not empty: choose an empty or new directory",
                    d.display()
                );
            }
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new().prefix("confer-demo-").tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let program = std::env::current_exe().context("cannot find the confer executable")?;
    let log_level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };

    println!(
        "confer demo: splitting the OHDSI GiBleed OMOP data ({}) into {} sites by person_id,\n\
         then starting {} nodes and a coordinator on loopback ports...",
        data.display(),
        args.sites,
        args.sites
    );
    let options = FederationOptions {
        sites: args.sites,
        coordinator_port: args.port,
        log_level,
        policy: DEMO_POLICY,
        users: &["researcher"],
        studies: &["demo"],
        extra_tables: &[],
    };
    let federation = tokio::select! {
        f = start_federation(&program, &data, &work_dir, &options) => f?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted during start-up"),
    };
    println!(
        "federation up: coordinator at {}, nodes {}\n",
        federation.url(),
        federation
            .nodes
            .iter()
            .map(|n| format!("{} ({})", n.label.trim_start_matches("node "), n.addr))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let url = federation.url();
    let token = federation
        .tokens
        .get("researcher")
        .cloned()
        .unwrap_or_default();
    let mut outcome = tokio::select! {
        r = scripted_queries(&url, &token) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    if outcome.is_ok() && !args.no_training {
        let heart_dir = work_dir.join("heart");
        outcome = tokio::select! {
            r = training(&program, &heart_dir, log_level) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        };
    }
    let mut region: Option<Federation> = None;
    if outcome.is_ok() && !args.no_supervision {
        let step = QUERIES.len() + if args.no_training { 1 } else { 2 };
        let commission_dir = work_dir.join("commission");
        outcome = tokio::select! {
            r = crate::commission::supervision_demo(&program, &commission_dir, log_level, step, args.serve.then_some(args.trend_months)) => {
                r.map(|f| region = f)
            }
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        };
    }
    if outcome.is_ok() && args.serve {
        println!(
            "The federation keeps running. Coordinator: {url} (plaintext, loopback)\n\
             Researcher token (user `researcher`, study `demo`):\n  export CONFER_TOKEN={token}\n\
             Try, in another terminal:\n  confer query --coordinator {url} --study demo \"SELECT WITH DIFFERENTIAL_PRIVACY \
             OPTIONS (epsilon = 1, delta = 1e-6) year_of_birth, COUNT(*) AS persons FROM person \
             GROUP BY year_of_birth ORDER BY year_of_birth\"\n\
             or from Python (ADBC Flight SQL):\n  adbc_driver_flightsql.dbapi.connect(\"grpc://{addr}\", \
             db_kwargs={{\"username\": \"researcher\", \"password\": \"$CONFER_TOKEN\"}})\n\
             Admin token (user `admin`): {admin}\n\
             Web console (studies, queries, training; operations for admin): {console}\n\
             {stewards}\
             {commission}\
             Configs, split data and ledgers: {work}\nPress Ctrl-C to stop.",
            commission = region.as_ref().map_or(String::new(), |r| format!(
                "Commission coordinator (the synthetic region's supervision statistics): {}\n\
                 Commission token (user `admin`): {}\n\
                 Try: confer supervision report --period <last month> --coordinator {} --token <it>\n\
                 Commission dashboard (web console): {}commission\n\
                 Analyst token (user `commission`): {}\n\
                 Sign-in link (the token filled in): {}login#token={}\n",
                r.url(),
                r.tokens.get("admin").cloned().unwrap_or_default(),
                r.url(),
                r.coordinator.console.clone().unwrap_or_default(),
                r.tokens.get("commission").cloned().unwrap_or_default(),
                r.coordinator.console.clone().unwrap_or_default(),
                r.tokens.get("commission").cloned().unwrap_or_default(),
            )),
            url = federation.url(),
            addr = federation.coordinator.addr,
            work = federation.work_dir.display(),
            admin = federation.tokens.get("admin").cloned().unwrap_or_default(),
            console = federation.coordinator.console.clone().unwrap_or_default(),
            stewards = federation
                .nodes
                .iter()
                .filter_map(|n| {
                    let site = n.label.strip_prefix("node ")?;
                    Some(format!(
                        "Steward page of {site}: {}steward (steward token: {})\n",
                        n.console.as_deref()?,
                        federation.steward_tokens.get(site)?
                    ))
                })
                .collect::<String>(),
        );
        let _ = tokio::signal::ctrl_c().await;
        println!("\nstopping...");
    }
    let stopped = federation.stop().await;
    let region_stopped = match region {
        Some(r) => r.stop().await,
        None => Ok(()),
    };
    outcome?;
    stopped?;
    region_stopped?;
    println!("federation stopped cleanly.");
    Ok(())
}

/// The demo's training policy at the heart-disease centres.
const HEART_POLICY: &str = r#"[policy]
approval = "auto"
max_query_epsilon = 5.0

[policy.studies.demo]
budget = { epsilon = 20.0, delta = 1e-5 }
models = ["logistic_regression", "mlp"]
# The example job is FLamby's baseline, without DP noise on the updates
# (their sum is secure-aggregated only): the steward allows it here.
allow_non_dp_training = true
"#;

/// Federated training across the four UCI heart-disease centres: the
/// example job, followed round by round, then the per-site evaluation.
async fn training(program: &Path, work: &Path, log_level: &str) -> anyhow::Result<()> {
    println!(
        "── {}. Federated training: logistic regression across the four UCI heart-disease hospitals\n\
         (FLamby's Fed-Heart-Disease set-up, examples/datasets/uci-heart/job.toml); starting four more nodes...\n",
        QUERIES.len() + 1
    );
    let options = FederationOptions {
        sites: crate::heart::CENTRES.len(),
        coordinator_port: 0,
        log_level,
        policy: HEART_POLICY,
        users: &["researcher"],
        studies: &["demo"],
        extra_tables: &[],
    };
    let federation =
        crate::heart::start_federation(program, work, HEART_POLICY, "", &options).await?;
    let outcome = async {
        let mut client = federation.client("researcher").await?;
        // One evaluation, after the last round, at a larger budget than the
        // example's: the per-site counts are small, and DP noise is per count.
        let text = crate::heart::example_job()?
            .replace("epsilon = 2.0", "epsilon = 5.0")
            .replace("every = 5", "every = 0");
        let spec = confer_models::job::JobSpec::from_toml_str(&text)?;
        let submit = confer_protocol::train::TrainSubmit {
            study: "demo".into(),
            job: serde_json::to_value(&spec)?,
        };
        let status: confer_protocol::train::JobStatus = serde_json::from_value(
            client
                .action(
                    confer_protocol::coordinator::actions::TRAIN_SUBMIT,
                    serde_json::to_vec(&submit)?,
                )
                .await?,
        )?;
        if let Some(summary) = status.privacy.as_ref().and_then(|p| p["summary"].as_str()) {
            println!("privacy: {summary}\n");
        }
        let done = crate::train::follow(&mut client, status.job_id, &work.join("out")).await?;
        if let Some(last) = done.history.iter().rev().find(|r| !r.evaluation.is_empty()) {
            println!("\nHeld-out evaluation after round {} (DP counts, noise sd per count in the last column):", last.round);
            println!("{:<14} {:>9} {:>9} {:>7} {:>7} {:>9}", "site", "examples", "accuracy", "AUC", "loss", "noise sd");
            let f = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
            for m in &last.evaluation {
                println!(
                    "{:<14} {:>9.1} {:>9} {:>7} {:>7} {:>9.2}",
                    m.site,
                    m.examples,
                    f(m.accuracy),
                    f(m.auc),
                    f(m.loss),
                    m.noise_stddev
                );
            }
        }
        println!();
        anyhow::Ok(())
    }
    .await;
    let stopped = federation.stop().await;
    outcome?;
    stopped
}

async fn scripted_queries(url: &str, token: &str) -> anyhow::Result<()> {
    let mut client = Client::connect(url, Some(token)).await?;
    for (i, query) in QUERIES.iter().enumerate() {
        println!("── {}. {}\n{}\n", i + 1, query.title, query.sql);
        match (client.run(query.sql, Some("demo")).await, query.refused) {
            (Ok(answer), false) => print!("{}", render(&answer, OutputFormat::Table)?),
            (Err(e), true) => println!("refused: {e:#}"),
            (Ok(_), true) => bail!("demo query {} should have been refused", i + 1),
            (Err(e), false) => return Err(e.context(format!("demo query {} failed", i + 1))),
        }
        println!();
    }
    Ok(())
}
