//! `confer synth` writes a network that real nodes serve as written: the
//! federation answers per-site counts equal to the generator's manifest, and
//! `confer catalog` shows declarations without counts.

use std::path::Path;
use std::process::Command;

use arrow::array::{Array, Int64Array, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use confer_cli::demo::{FederationOptions, start_coordinator, start_nodes_from};

use crate::fixture::{STUDIES, TEST_POLICY, USERS};

fn confer(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_confer"))
        .args(args)
        .output()
        .expect("run confer");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "confer {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synthetic_network_is_served_as_generated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path();
    let key = work.join("coordinator.key");
    confer(&["keygen", "--out", key.to_str().expect("utf8")]);
    let net = work.join("net");
    let summary = confer(&[
        "synth",
        "--sites",
        "5",
        "--persons",
        "3000",
        "--seed",
        "7",
        "--out",
        net.to_str().expect("utf8"),
        "--coordinator-key-file",
        work.join("coordinator.key.pub").to_str().expect("utf8"),
        "--quiet",
    ]);
    assert!(summary.contains("3000 residents, 5 sites"), "{summary}");
    // A second run into the same directory is refused without --force.
    let again = Command::new(env!("CARGO_BIN_EXE_confer"))
        .args([
            "synth",
            "--sites",
            "2",
            "--persons",
            "10",
            "--quiet",
            "--out",
        ])
        .arg(&net)
        .output()
        .expect("run confer");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(net.join("manifest.json")).expect("manifest"),
    )
    .expect("json");
    let mut configs = Vec::new();
    let mut expected = std::collections::BTreeMap::new();
    for site in manifest["sites"].as_array().expect("sites") {
        let name = site["name"].as_str().expect("name").to_string();
        expected.insert(name.clone(), site["persons"].as_i64().expect("persons"));
        let config = net.join(&name).join("node.toml");
        let mut text = std::fs::read_to_string(&config).expect("node.toml");
        assert!(!text.contains("[policy]"), "synth writes no policy");
        text.push_str(TEST_POLICY);
        std::fs::write(&config, text).expect("write node.toml");
        configs.push((name, config));
    }
    let program = Path::new(env!("CARGO_BIN_EXE_confer"));
    let nodes = start_nodes_from(program, configs, "warn")
        .await
        .expect("every synthetic site starts as a node");
    let urls: Vec<String> = nodes
        .nodes
        .iter()
        .map(|n| format!("http://{}", n.addr))
        .collect();
    let options = FederationOptions {
        sites: urls.len(),
        coordinator_port: 0,
        log_level: "warn",
        policy: TEST_POLICY,
        users: USERS,
        studies: STUDIES,
        extra_tables: &[],
    };
    let federation = start_coordinator(program, work, nodes, &urls, "", &options)
        .await
        .expect("coordinator starts");

    // Per-site person counts: at an epsilon where noise vanishes they equal
    // the manifest's.
    let mut client = federation.client("tester").await.expect("connect");
    let answer = client
        .run(
            "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1e9, delta = 1e-6) \
             site, COUNT(*) AS n FROM person GROUP BY site",
            Some("test"),
        )
        .await
        .expect("per-site counts");
    let mut got = std::collections::BTreeMap::new();
    for batch in &answer.batches {
        let site = cast(batch.column(0), &DataType::Utf8).expect("text");
        let site = site.as_any().downcast_ref::<StringArray>().expect("str");
        let n = cast(batch.column(1), &DataType::Int64).expect("int");
        let n = n.as_any().downcast_ref::<Int64Array>().expect("i64");
        for i in 0..batch.num_rows() {
            got.insert(site.value(i).to_string(), n.value(i));
        }
    }
    assert_eq!(got, expected);

    // The catalog: declarations, never counts.
    let url = federation.url();
    let token = federation.tokens["tester"].clone();
    let listing = confer(&["catalog", "--coordinator", &url, "--token", &token]);
    assert!(
        listing.contains("private (unit person_id, one row each)"),
        "{listing}"
    );
    assert!(
        listing.contains("concept") && listing.contains("public"),
        "{listing}"
    );
    assert!(listing.contains("all 5"), "{listing}");
    let person = confer(&[
        "catalog",
        "person",
        "--coordinator",
        &url,
        "--token",
        &token,
    ]);
    assert!(
        person.contains("gender_concept_id") && person.contains("8507, 8532"),
        "{person}"
    );
    assert!(
        person.contains("year_of_birth") && person.contains("[1924, 2024]"),
        "{person}"
    );
    let json = confer(&[
        "catalog",
        "--json",
        "--coordinator",
        &url,
        "--token",
        &token,
    ]);
    for (site, n) in &expected {
        for text in [&listing, &person, &json] {
            assert!(
                !text.contains(&format!(" {n} ")) && !text.contains(&format!("\"{n}\"")),
                "the catalog must not show {site}'s person count {n}"
            );
        }
    }
    federation.stop().await.expect("clean stop");
}
