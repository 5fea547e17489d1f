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
    start_region_with(program, work, sites, persons, log_level, 12.0, 0).await
}

/// [`start_region`] with the coordinator's yearly supervision budget
/// (`epsilon_per_year`; the nodes' study budget is at least that) and its
/// web console's port on loopback (0: any free port). A region already in
/// `work` is served again as it is. Besides `admin`, the coordinator has
/// the commission's analyst `commission`.
pub async fn start_region_with(
    program: &Path,
    work: &Path,
    sites: usize,
    persons: u64,
    log_level: &str,
    epsilon_per_year: f64,
    console_port: u16,
) -> anyhow::Result<(Federation, String)> {
    std::fs::create_dir_all(work)?;
    let today = chrono::Local::now().date_naive();
    let period = confer_coordinator::supervision::period::Period::month_before(today);
    let key_path = work.join("coordinator.key");
    let public = if key_path.is_file() {
        confer_protocol::signing::Identity::load(&key_path)?.public_hex()
    } else {
        confer_protocol::signing::Identity::generate()?.save(&key_path)?
    };
    let mut options = confer_synth::SynthOptions::new(work.join("region"));
    options.sites = sites;
    options.persons = persons;
    options.region = true;
    options.coordinator_key = Some(public);
    options.window_end = confer_synth::WindowEnd::new(period.year, period.index)?;
    let out = options.out.clone();
    // A region written before (a benchmark's --data) is served again as it is.
    let names: Vec<String> = if out.join("manifest.json").is_file() {
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json"))?)?;
        manifest["sites"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["name"].as_str().map(str::to_string))
            .collect()
    } else {
        let summary = tokio::task::spawn_blocking(move || confer_synth::generate(&options, |_| {}))
            .await?
            .context("confer synth --region")?;
        summary.sites.iter().map(|s| s.name.clone()).collect()
    };
    let mut configs = Vec::new();
    for name in names {
        let config = out.join(&name).join("node.toml");
        let mut text = std::fs::read_to_string(&config)?;
        if !text.contains("[policy]") {
            text.push_str(&REGION_POLICY.replace(
                "budget = { epsilon = 12.0, delta = 1e-6 }",
                &format!(
                    "budget = {{ epsilon = {:?}, delta = 1e-6 }}",
                    epsilon_per_year.max(12.0)
                ),
            ));
            std::fs::write(&config, text)?;
        }
        configs.push((name, config));
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
        "node_timeout_secs = 600\n\n[supervision]\nregion = {:?}\nepsilon_per_year = {epsilon_per_year:?}\ndelta = 1e-6\n\n\
         [console]\nlisten = \"127.0.0.1:{console_port}\"\n",
        out.join("region.toml").display().to_string()
    );
    // The commission's analyst, who reads the dashboard.
    let state = work.join("state").join("coordinator.sqlite");
    if let Some(dir) = state.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let analyst = {
        use confer_coordinator::store::{Role, SqliteStore, Store};
        SqliteStore::open(&state)?.add_user("commission", Role::Analyst)?
    };
    let mut federation = start_coordinator(program, work, nodes, &urls, &extra, &options).await?;
    federation.tokens.insert("commission".into(), analyst);
    Ok((federation, period.to_string()))
}

/// Where `confer demo --serve` serves the commission's console (the
/// README's link), when that port is free.
pub const DEMO_CONSOLE_PORT: u16 = 8470;

/// The demo step: start the region, release last month, print the report
/// (city and counties), show that a re-run spends nothing; then stop, or
/// with `keep` (for `confer demo --serve`) release that many months before
/// it too (the web console's trend lines) and return the running region.
pub async fn supervision_demo(
    program: &Path,
    work: &Path,
    log_level: &str,
    step: usize,
    keep: Option<u32>,
) -> anyhow::Result<Option<Federation>> {
    let (keep, trend_months) = (keep.is_some(), keep.unwrap_or(0));
    println!(
        "── {step}. Supervision statistics for the health commission: a synthetic region (confer synth --region:\n\
         12 institutions, 150,000 residents, up to last month), whose village clinics' records are held by their\n\
         township's node; the monthly release of every indicator for every org unit, under a yearly budget of\n\
         epsilon 12 per node; starting its nodes...\n"
    );
    // Served on, the dashboard is at the README's address when it is free.
    let console_port =
        if keep && std::net::TcpListener::bind(("127.0.0.1", DEMO_CONSOLE_PORT)).is_ok() {
            DEMO_CONSOLE_PORT
        } else {
            0
        };
    let (federation, period) =
        start_region_with(program, work, 12, 150_000, log_level, 12.0, console_port).await?;
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
        if trend_months > 0 {
            // The dashboard's trend lines: months before as well.
            use confer_coordinator::supervision::period::Period;
            let mut p = Period::parse(&period).map_err(|e| anyhow::anyhow!(e))?;
            let mut earlier = Vec::new();
            for _ in 0..trend_months {
                p = Period::month_before(p.start());
                earlier.push(p.to_string());
            }
            earlier.reverse();
            println!(
                "For the web console's trend lines, releasing {} as well.",
                earlier.join(" and ")
            );
            for e in &earlier {
                let summary =
                    crate::supervision::run_and_report(&mut client, e, 0, crate::supervision::Lang::En).await?;
                print!("{summary}");
            }
        }
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

/// The exact value of every count, numerator and denominator of a
/// catalogue for every unit of a synthetic region (its subtree's total),
/// computed by plain DataFusion over each node's files, without DP and
/// without contribution bounds: the truth that released values are
/// compared with (tests, `benches/supervision.rs`).
pub struct Exact {
    /// `(indicator, "numerator" | "denominator", unit) → total`.
    pub totals: std::collections::HashMap<(String, &'static str, String), f64>,
    /// Unit → parent.
    pub parent: std::collections::HashMap<String, Option<String>>,
    /// Unit → level.
    pub level: std::collections::HashMap<String, String>,
}

impl Exact {
    /// The exact value of an indicator at a unit, as the release computes
    /// it (factor × N, or factor × N / D; none when D is 0).
    pub fn value(
        &self,
        ind: &confer_coordinator::supervision::indicators::Indicator,
        unit: &str,
    ) -> Option<f64> {
        use confer_coordinator::supervision::indicators::Kind;
        let get = |part: &'static str| {
            self.totals
                .get(&(ind.id.clone(), part, unit.to_string()))
                .copied()
                .unwrap_or(0.0)
        };
        match ind.kind {
            Kind::Count => Some(ind.factor * get("numerator")),
            Kind::Proportion | Kind::Ratio => {
                let d = get("denominator");
                (d != 0.0).then(|| ind.factor * get("numerator") / d)
            }
            Kind::Completeness | Kind::Timeliness => None,
        }
    }
}

/// The plain SQL of an aggregate for a period: the same rows, no DP, no
/// bounds, one row per care site.
pub fn plain_sql(
    a: &confer_coordinator::supervision::indicators::Aggregate,
    period: &confer_coordinator::supervision::period::Period,
) -> String {
    let aggregate = match a.aggregate.split_once(", contribution_bounds_per_group") {
        Some((head, _)) => format!("{head})"),
        None => a.aggregate.clone(),
    };
    let mut sql = format!(
        "SELECT CAST({} AS BIGINT) AS care_site_id, CAST({aggregate} AS DOUBLE) AS value FROM {} \
         WHERE {d} >= DATE '{}' AND {d} < DATE '{}'",
        a.unit_column,
        a.from,
        period.start(),
        period.end(),
        d = a.date
    );
    if let Some(c) = a.condition_for(period) {
        sql.push_str(&format!(" AND ({c})"));
    }
    sql.push_str(&format!(" GROUP BY {}", a.unit_column));
    sql
}

/// Computes [`Exact`] for the region written by `confer synth --region`
/// into `region_dir`.
pub async fn exact(
    region_dir: &Path,
    catalogue: &confer_coordinator::supervision::indicators::Catalogue,
    period: &confer_coordinator::supervision::period::Period,
) -> anyhow::Result<Exact> {
    use arrow::array::{Array, Float64Array, Int64Array};
    use std::collections::HashMap;
    let region =
        confer_coordinator::supervision::region::Region::load(&region_dir.join("region.toml"))?;
    let mut parent = HashMap::new();
    let mut level = HashMap::new();
    let mut tier = HashMap::new();
    for u in &region.units {
        parent.insert(u.code.clone(), u.parent.clone());
        level.insert(u.code.clone(), u.level.clone());
        tier.insert(u.code.clone(), u.groups.clone());
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(region_dir.join("manifest.json"))?)?;
    let mut nodes = Vec::new();
    for site in manifest["sites"].as_array().into_iter().flatten() {
        let name = site["name"].as_str().unwrap_or_default().to_string();
        let dir = region_dir.join(&name);
        let config: toml::Value = toml::from_str(&std::fs::read_to_string(dir.join("node.toml"))?)?;
        let mut unit_of = HashMap::new();
        if let Some(units) = config
            .get("supervision")
            .and_then(|s| s.get("units"))
            .and_then(|u| u.as_table())
        {
            for (code, ids) in units {
                for id in ids.as_array().into_iter().flatten() {
                    if let Some(id) = id.as_integer() {
                        unit_of.insert(id, code.clone());
                    }
                }
            }
        }
        let ctx = datafusion::prelude::SessionContext::new();
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) == Some("parquet")
                && let Some(table) = path.file_stem().and_then(|s| s.to_str())
            {
                ctx.register_parquet(
                    table,
                    path.to_str().unwrap_or_default(),
                    datafusion::prelude::ParquetReadOptions::default(),
                )
                .await?;
            }
        }
        nodes.push((ctx, unit_of));
    }
    let mut totals = HashMap::new();
    for ind in &catalogue.indicators {
        for (part, agg) in [
            ("numerator", &ind.numerator),
            ("denominator", &ind.denominator),
        ] {
            let Some(a) = agg else { continue };
            let sql = plain_sql(a, period);
            let mut own: HashMap<String, f64> = HashMap::new();
            for (ctx, unit_of) in &nodes {
                let batches = ctx
                    .sql(&sql)
                    .await
                    .with_context(|| format!("indicator {}: {sql}", ind.id))?
                    .collect()
                    .await?;
                for b in &batches {
                    let site = b.column(0).as_any().downcast_ref::<Int64Array>();
                    let value = b.column(1).as_any().downcast_ref::<Float64Array>();
                    let (Some(site), Some(value)) = (site, value) else {
                        anyhow::bail!("indicator {}: unexpected column types", ind.id);
                    };
                    for i in 0..b.num_rows() {
                        if site.is_null(i) {
                            continue;
                        }
                        let Some(unit) = unit_of.get(&site.value(i)) else {
                            continue;
                        };
                        let keep = a.units.iter().all(|(set, options)| {
                            tier.get(unit)
                                .and_then(|g| g.get(set))
                                .is_some_and(|o| options.contains(o))
                        });
                        if keep && !value.is_null(i) {
                            *own.entry(unit.clone()).or_default() += value.value(i);
                        }
                    }
                }
            }
            for (unit, v) in own {
                let mut at = Some(unit);
                while let Some(u) = at {
                    *totals.entry((ind.id.clone(), part, u.clone())).or_default() += v;
                    at = parent.get(&u).cloned().flatten();
                }
            }
        }
    }
    Ok(Exact {
        totals,
        parent,
        level,
    })
}
