//! The demo's last act: the health commission's monthly supervision
//! release over a synthetic region (`confer synth --region`).

use std::path::Path;

use anyhow::Context as _;

use crate::client::Client;
use crate::demo::{Federation, FederationOptions, start_coordinator, start_nodes_from};

/// The region's node policy in the demo: the supervision study's yearly
/// budget, no small-cell suppression, a short padded time (one indicator,
/// readmissions, is a query one person could slow down).
pub const REGION_POLICY: &str = r#"[policy]
approval = "auto"
min_group_size = 0

[policy.limits]
padded_secs = 5

[policy.studies.supervision]
budget = { epsilon = 12.0, delta = 1e-6 }
researchers = ["commission"]
"#;

/// Writes a synthetic region of `sites` institutions and `persons`
/// residents up to the end of last month into `work`, starts its nodes and
/// a coordinator with `[supervision]`, and returns the federation and the
/// period to release (last month).
pub async fn start_region(
    program: &Path,
    work: &Path,
    sites: usize,
    persons: u64,
    log_level: &str,
) -> anyhow::Result<(Federation, String)> {
    std::fs::create_dir_all(work)?;
    let today = chrono::Local::now().date_naive();
    let period = confer_coordinator::supervision::period::Period::month_before(today);
    let key_path = work.join("coordinator.key");
    let identity = confer_protocol::signing::Identity::generate()?;
    let public = identity.save(&key_path)?;
    let mut options = confer_synth::SynthOptions::new(work.join("region"));
    options.sites = sites;
    options.persons = persons;
    options.region = true;
    options.coordinator_key = Some(public);
    options.window_end = confer_synth::WindowEnd::new(period.year, period.index)?;
    let summary = tokio::task::spawn_blocking(move || confer_synth::generate(&options, |_| {}))
        .await?
        .context("confer synth --region")?;
    let mut configs = Vec::new();
    for site in &summary.sites {
        let config = summary.out.join(&site.name).join("node.toml");
        let mut text = std::fs::read_to_string(&config)?;
        text.push_str(REGION_POLICY);
        std::fs::write(&config, text)?;
        configs.push((site.name.clone(), config));
    }
    let nodes = start_nodes_from(program, configs, log_level).await?;
    let urls: Vec<String> = nodes
        .nodes
        .iter()
        .map(|n| format!("http://{}", n.addr))
        .collect();
    let options = FederationOptions {
        sites: urls.len(),
        coordinator_port: 0,
        log_level,
        policy: REGION_POLICY,
        users: &[],
        studies: &[],
        extra_tables: &[],
    };
    let extra = format!(
        "node_timeout_secs = 120\n\n[supervision]\nregion = {:?}\nepsilon_per_year = 12.0\ndelta = 1e-6\n",
        summary.out.join("region.toml").display().to_string()
    );
    let federation = start_coordinator(program, work, nodes, &urls, &extra, &options).await?;
    Ok((federation, period.to_string()))
}

/// The demo step: start the region, release last month, print the report
/// (city and counties), show that a re-run spends nothing; then stop, or
/// with `keep` return the running region (for `confer demo --serve`).
pub async fn supervision_demo(
    program: &Path,
    work: &Path,
    log_level: &str,
    step: usize,
    keep: bool,
) -> anyhow::Result<Option<Federation>> {
    println!(
        "── {step}. Supervision statistics for the health commission: a synthetic region (confer synth --region:\n\
         12 institutions, 150,000 residents, up to last month), whose village clinics' records are held by their\n\
         township's node; the monthly release of every indicator for every org unit, under a yearly budget of\n\
         epsilon 12 per node; starting its nodes...\n"
    );
    let (federation, period) = start_region(program, work, 12, 150_000, log_level).await?;
    let outcome = async {
        let url = federation.url();
        let admin = federation
            .tokens
            .get("admin")
            .cloned()
            .unwrap_or_default();
        let mut client = Client::connect(&url, Some(&admin)).await?;
        println!("confer supervision run --period {period}\n");
        let report = crate::supervision::run_and_report(&mut client, &period, 2, crate::supervision::Lang::En).await?;
        print!("{report}");
        println!("\nconfer supervision run --period {period}   (again)");
        let again = crate::supervision::run_and_report(&mut client, &period, 0, crate::supervision::Lang::En).await?;
        print!("{again}");
        let values = client
            .run(
                &format!(
                    "SELECT level, COUNT(*) AS values, SUM(CASE WHEN flags LIKE '%insufficient%' THEN 1 ELSE 0 END) AS insufficient \
                     FROM supervision.values WHERE period = '{period}' AND category = '' GROUP BY level ORDER BY MIN(length(unit))"
                ),
                None,
            )
            .await?;
        println!(
            "\nThe values are Flight SQL tables anyone may read (supervision.values, org_units, indicators, periods):\n\
             SELECT level, COUNT(*), ... FROM supervision.values WHERE period = '{period}' GROUP BY level\n{}",
            crate::client::render(&values, crate::client::OutputFormat::Table)?
        );
        anyhow::Ok(())
    }
    .await;
    if keep && outcome.is_ok() {
        return Ok(Some(federation));
    }
    let stopped = federation.stop().await;
    outcome?;
    stopped.map(|()| None)
}
