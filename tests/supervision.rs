//! Supervision statistics end to end: a synthetic region (`confer synth
//! --region`), its nodes and a coordinator with `[supervision]`; at an
//! epsilon where noise vanishes, every indicator of every org unit at every
//! level equals the same definition computed exactly by plain DataFusion
//! over the sites' files; the tree adds up; a re-run charges nothing; the
//! values are plain Flight SQL tables; bad input is refused before anything
//! is spent.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use arrow::array::{Array, Float64Array, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use confer_cli::demo::{FederationOptions, start_coordinator, start_nodes_from};
use confer_coordinator::supervision::indicators::{Catalogue, STANDARD};
use confer_coordinator::supervision::period::Period;

use crate::fixture::{STUDIES, USERS};

const PERIOD: &str = "2024-03";

/// Every study may spend anything here; no small-cell suppression.
const POLICY: &str = r#"[policy]
approval = "auto"

[policy.limits]
padded_secs = 8

[policy.studies.supervision]
budget = { rho = 1e20, delta = 0.5 }

[policy.studies.test]
budget = { rho = 1e15, delta = 0.5 }
"#;

fn confer(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_confer"))
        .args(args)
        .output()
        .expect("run confer");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The standard catalogue with bounds that never bind (so that the
/// bounded query is the plain one): many rows and care sites per person,
/// sums bounded far above any person's.
fn unbounded_catalogue() -> String {
    let mut text = String::new();
    for line in STANDARD.lines() {
        let l = if line.starts_with("max_rows = ") {
            "max_rows = 400".to_string()
        } else if line.starts_with("max_units = ") {
            "max_units = 12".to_string()
        } else if line.starts_with("aggregate = \"SUM(") {
            // No stay lasts 400 days; no person is charged 200,000 at one
            // site in a month.
            let head = line
                .split(", contribution_bounds_per_group")
                .next()
                .expect("sum");
            let hi = if head.contains("visit_end_date") {
                400
            } else {
                200_000
            };
            format!("{head}, contribution_bounds_per_group => (0, {hi}))\"")
        } else {
            line.to_string()
        };
        text.push_str(&l);
        text.push('\n');
    }
    text
}

fn column_f64(b: &arrow::array::RecordBatch, name: &str) -> Vec<Option<f64>> {
    let c = cast(b.column_by_name(name).expect(name), &DataType::Float64).expect("f64");
    let a = c.as_any().downcast_ref::<Float64Array>().expect("f64");
    (0..a.len())
        .map(|i| (!a.is_null(i)).then(|| a.value(i)))
        .collect()
}

fn column_str(b: &arrow::array::RecordBatch, name: &str) -> Vec<String> {
    let c = cast(b.column_by_name(name).expect(name), &DataType::Utf8).expect("utf8");
    let a = c.as_any().downcast_ref::<StringArray>().expect("str");
    (0..a.len()).map(|i| a.value(i).to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervision_statistics_equal_the_exact_definitions_at_every_level() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path();
    let key = work.join("coordinator.key");
    assert!(confer(&["keygen", "--out", key.to_str().expect("utf8")]).0);
    let net = work.join("net");
    let (ok, out, err) = confer(&[
        "synth",
        "--region",
        "--sites",
        "12",
        "--persons",
        "6000",
        "--seed",
        "11",
        "--out",
        net.to_str().expect("utf8"),
        "--coordinator-key-file",
        work.join("coordinator.key.pub").to_str().expect("utf8"),
        "--quiet",
    ]);
    assert!(ok, "{out}\n{err}");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(net.join("manifest.json")).expect("manifest"),
    )
    .expect("json");
    let mut configs = Vec::new();
    for site in manifest["sites"].as_array().expect("sites") {
        let name = site["name"].as_str().expect("name").to_string();
        let config = net.join(&name).join("node.toml");
        let mut text = std::fs::read_to_string(&config).expect("node.toml");
        text.push_str(POLICY);
        std::fs::write(&config, text).expect("write node.toml");
        configs.push((name.clone(), config));
    }
    assert!(configs.len() >= 5, "at least 5 nodes: {}", configs.len());
    let node_configs = configs.clone();
    let catalogue_file = work.join("indicators.toml");
    std::fs::write(&catalogue_file, unbounded_catalogue()).expect("catalogue");
    let program = Path::new(env!("CARGO_BIN_EXE_confer"));
    let nodes = start_nodes_from(program, configs, "warn")
        .await
        .expect("nodes start");
    let urls: Vec<String> = nodes
        .nodes
        .iter()
        .map(|n| format!("http://{}", n.addr))
        .collect();
    let options = FederationOptions {
        sites: urls.len(),
        coordinator_port: 0,
        log_level: "warn",
        policy: POLICY,
        users: USERS,
        studies: STUDIES,
        extra_tables: &[],
    };
    let extra = format!(
        "node_timeout_secs = 120\n\n[supervision]\nregion = {:?}\nindicators = {:?}\nepsilon_per_year = 1e19\ndelta = 1e-6\n",
        net.join("region.toml").display().to_string(),
        catalogue_file.display().to_string()
    );
    let federation = start_coordinator(program, work, nodes, &urls, &extra, &options)
        .await
        .expect("coordinator starts");
    let url = federation.url();
    let admin = federation.tokens["admin"].clone();
    let tester = federation.tokens["tester"].clone();
    // `confer supervision <args> --coordinator <url> --token <token>`.
    let supervision = |args: &[&str], token: &str| {
        let mut all = vec!["supervision"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--coordinator", &url, "--token", token]);
        confer(&all)
    };

    // Bad input first: nothing is spent.
    let (ok, _, err) = supervision(&["run", "--period", "2999-01"], &admin);
    assert!(!ok && err.contains("has not ended"), "{err}");
    let (ok, _, err) = supervision(&["run", "--period", "2024-13"], &admin);
    assert!(!ok && err.contains("write a month as 2026-10"), "{err}");
    let (ok, _, err) = supervision(&["run", "--period", PERIOD], &tester);
    assert!(
        !ok && err.contains("release supervision statistics"),
        "a researcher may not: {err}"
    );

    let (ok, listing, err) = supervision(&["indicators"], &tester);
    assert!(ok, "{err}");
    assert!(
        listing.contains("药占比") && listing.contains("red line 30"),
        "{listing}"
    );

    // The release.
    let (ok, report, err) = supervision(&["run", "--period", PERIOD, "--depth", "3"], &admin);
    assert!(ok, "{report}\n{err}");
    assert!(report.contains("DP queries at each node"), "{report}");
    assert!(!report.contains("missing"), "{report}");

    let mut client = federation.client("tester").await.expect("connect");
    let spent = |batches: &[arrow::array::RecordBatch]| -> Vec<f64> {
        batches
            .iter()
            .flat_map(|b| column_f64(b, "spent_rho"))
            .flatten()
            .collect()
    };
    let budget = client
        .run("SHOW PRIVACY BUDGET FOR STUDY supervision", None)
        .await;
    // tester is not a member of the supervision study: the admin asks.
    assert!(budget.is_err());
    let mut admin_client = federation.client("admin").await.expect("admin");
    let before = admin_client
        .run("SHOW PRIVACY BUDGET FOR STUDY supervision", None)
        .await
        .expect("budget");
    let before = spent(&before.batches);
    assert!(
        before.iter().any(|s| *s > 0.0),
        "the release spent: {before:?}"
    );

    // Values through Flight SQL, as any client reads them.
    let values = client
        .run(
            &format!("SELECT unit, indicator, category, value, numerator, denominator, flags FROM supervision.values WHERE period = '{PERIOD}'"),
            None,
        )
        .await
        .expect("supervision.values");
    let units = client
        .run("SELECT code, parent FROM supervision.org_units", None)
        .await
        .expect("org units");
    let mut parent: HashMap<String, Option<String>> = HashMap::new();
    for b in &units.batches {
        let code = column_str(b, "code");
        let p = cast(b.column_by_name("parent").expect("parent"), &DataType::Utf8).expect("utf8");
        let p = p.as_any().downcast_ref::<StringArray>().expect("str");
        for (i, code) in code.into_iter().enumerate() {
            parent.insert(code, (!p.is_null(i)).then(|| p.value(i).to_string()));
        }
    }
    let levels: std::collections::BTreeSet<usize> = parent
        .keys()
        .map(|c| {
            let mut d = 0;
            let mut at = c.clone();
            while let Some(Some(p)) = parent.get(&at) {
                at = p.clone();
                d += 1;
            }
            d
        })
        .collect();
    assert!(levels.len() >= 3, "at least 3 levels: {levels:?}");

    // The exact values: every aggregate per care site, over each node's
    // files, without DP or bounds, summed up the tree.
    let catalogue = Catalogue::parse(&unbounded_catalogue()).expect("catalogue");
    let period = Period::parse(PERIOD).expect("period");
    let exact = confer_cli::commission::exact(&net, &catalogue, &period)
        .await
        .expect("exact values");
    let mut compared = 0;
    for b in &values.batches {
        let (unit, ind, cat, flags) = (
            column_str(b, "unit"),
            column_str(b, "indicator"),
            column_str(b, "category"),
            column_str(b, "flags"),
        );
        let (value, num, den) = (
            column_f64(b, "value"),
            column_f64(b, "numerator"),
            column_f64(b, "denominator"),
        );
        for i in 0..b.num_rows() {
            assert!(
                !flags[i].contains("incomplete"),
                "{} {}: {}",
                ind[i],
                unit[i],
                flags[i]
            );
            if !cat[i].is_empty() {
                continue;
            }
            let def = catalogue
                .indicators
                .iter()
                .find(|x| x.id == ind[i])
                .expect("indicator");
            if def.numerator.is_none() {
                continue;
            }
            let total = |part: &'static str| {
                exact
                    .totals
                    .get(&(ind[i].clone(), part, unit[i].clone()))
                    .copied()
                    .unwrap_or(0.0)
            };
            let n_exact = total("numerator");
            let n = num[i].expect("numerator");
            assert!(
                (n - n_exact).abs() <= 0.1 + 1e-6 * n_exact.abs(),
                "{} at {}: numerator {n}, exact {n_exact}",
                ind[i],
                unit[i]
            );
            if def.denominator.is_some() {
                let d_exact = total("denominator");
                let d = den[i].expect("denominator");
                assert!(
                    (d - d_exact).abs() <= 0.1 + 1e-6 * d_exact.abs(),
                    "{} at {}: denominator {d}, exact {d_exact}",
                    ind[i],
                    unit[i]
                );
            }
            match (value[i], exact.value(def, &unit[i])) {
                (Some(v), Some(want)) => assert!(
                    (v - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{} at {}: {v}, exact {want}",
                    ind[i],
                    unit[i]
                ),
                (None, None) => {}
                (got, want) => panic!(
                    "{} at {}: released {got:?}, exact {want:?}",
                    ind[i], unit[i]
                ),
            }
            compared += 1;
        }
    }
    assert!(compared > 100, "compared {compared} values");

    // A re-run returns the stored release and charges nothing.
    let (ok, again, err) = supervision(&["run", "--period", PERIOD], &admin);
    assert!(ok, "{err}");
    assert!(again.contains("already released"), "{again}");
    let after = admin_client
        .run("SHOW PRIVACY BUDGET FOR STUDY supervision", None)
        .await
        .expect("budget");
    assert_eq!(spent(&after.batches), before, "a re-run spends nothing");

    // Exports.
    for ext in ["csv", "parquet", "xlsx"] {
        let path = work.join(format!("report.{ext}"));
        let (ok, out, err) = supervision(
            &[
                "report",
                "--period",
                PERIOD,
                "--out",
                path.to_str().expect("utf8"),
            ],
            &tester,
        );
        assert!(ok, "{out}{err}");
        assert!(std::fs::metadata(&path).expect("written").len() > 100);
    }
    let csv = std::fs::read_to_string(work.join("report.csv")).expect("csv");
    assert!(csv.starts_with("indicator,name,unit"), "{csv}");
    assert!(csv.contains("drug_share_of_cost"), "{csv}");

    // A node whose budget cannot pay a period refuses it at the check: it
    // spends nothing, the period is released without it (flagged
    // incomplete, completeness below 100), and a later run asks only it.
    let spent_by_node = |batches: &[arrow::array::RecordBatch]| -> HashMap<String, f64> {
        let mut out = HashMap::new();
        for b in batches {
            for (n, s) in column_str(b, "node")
                .into_iter()
                .zip(column_f64(b, "spent_rho"))
            {
                // Nodes only, not the network's worst-case row.
                if !n.starts_with("network") {
                    out.insert(n, s.unwrap_or(0.0));
                }
            }
        }
        out
    };
    let (poor, poor_config) = node_configs[1].clone();
    let rich = std::fs::read_to_string(&poor_config).expect("node.toml");
    let supervision_budget = "[policy.studies.supervision]\nbudget = { rho = 1e20, delta = 0.5 }";
    assert!(rich.contains(supervision_budget));
    std::fs::write(
        &poor_config,
        rich.replace(
            supervision_budget,
            "[policy.studies.supervision]\nbudget = { rho = 1e-3, delta = 0.5 }",
        ),
    )
    .expect("poorer policy");
    let before = spent_by_node(
        &admin_client
            .run("SHOW PRIVACY BUDGET FOR STUDY supervision", None)
            .await
            .expect("budget")
            .batches,
    );
    let second = "2024-04";
    let run = |token: &str| supervision(&["run", "--period", second], token);
    let (ok, first_run, err) = run(&admin);
    assert!(ok, "{first_run}{err}");
    assert!(
        first_run.contains(&format!("node {poor} missing")),
        "{first_run}"
    );
    let after = spent_by_node(
        &admin_client
            .run("SHOW PRIVACY BUDGET FOR STUDY supervision", None)
            .await
            .expect("budget")
            .batches,
    );
    assert_eq!(
        after[&poor], before[&poor],
        "the refusing node spent nothing"
    );
    assert!(
        after
            .iter()
            .filter(|(n, _)| **n != poor)
            .all(|(n, s)| *s > before[n])
    );
    let partial = root_values(&mut client, second).await;
    assert!(partial["reporting_completeness"].0.expect("completeness") < 100.0);
    assert!(
        partial["outpatient_emergency_visits"]
            .1
            .contains("incomplete")
    );
    // The steward restores the budget; the next run asks the missing node only.
    std::fs::write(&poor_config, &rich).expect("restore policy");
    let (ok, retry, err) = run(&admin);
    assert!(ok, "{retry}{err}");
    assert!(
        !retry.contains("missing") && !retry.contains("already released"),
        "{retry}"
    );
    let last = spent_by_node(
        &admin_client
            .run("SHOW PRIVACY BUDGET FOR STUDY supervision", None)
            .await
            .expect("budget")
            .batches,
    );
    assert!(last[&poor] > after[&poor], "the missing node released now");
    for (n, s) in &last {
        if *n != poor {
            assert_eq!(*s, after[n], "node {n} was not asked again");
        }
    }
    let complete = root_values(&mut client, second).await;
    assert_eq!(complete["reporting_completeness"].0, Some(100.0));
    assert!(
        complete["reporting_timeliness"].0.expect("timeliness") < 100.0,
        "one node came late"
    );
    assert!(
        !complete["outpatient_emergency_visits"]
            .1
            .contains("incomplete")
    );
    federation.stop().await.expect("clean stop");
}

/// The root unit's values of `period`: indicator → (value, flags).
async fn root_values(
    client: &mut confer_cli::client::Client,
    period: &str,
) -> HashMap<String, (Option<f64>, String)> {
    let sql = format!(
        "SELECT v.indicator, v.value, v.flags FROM supervision.values v JOIN supervision.org_units u \
         ON v.unit = u.code WHERE v.period = '{period}' AND u.parent IS NULL AND v.category = ''"
    );
    let answer = client.run(&sql, None).await.expect("values");
    let mut out = HashMap::new();
    for b in &answer.batches {
        let (ind, flags) = (column_str(b, "indicator"), column_str(b, "flags"));
        for (i, v) in column_f64(b, "value").into_iter().enumerate() {
            out.insert(ind[i].clone(), (v, flags[i].clone()));
        }
    }
    out
}
