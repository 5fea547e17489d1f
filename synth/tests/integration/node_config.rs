use confer_node::NodeConfig;
use confer_synth::{Format, PLACEHOLDER_COORDINATOR_KEY, generate};
use datafusion::prelude::SessionContext;

use crate::common::*;

/// The RFC 8032 test key 2 (its private key is public: tests only).
const TEST_KEY: &str = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";

async fn load_site(dir: &std::path::Path) -> (NodeConfig, SessionContext) {
    let path = dir.join("node.toml");
    let config = NodeConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let ctx = SessionContext::new();
    let catalog = confer_node::catalog::load(&config, &ctx)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(catalog.node, config.node.name);
    assert_eq!(catalog.tables.len(), 14);
    for t in &catalog.tables {
        let public = [
            "concept",
            "concept_ancestor",
            "care_site",
            "provider",
            "location",
        ]
        .contains(&t.name.as_str());
        assert_eq!(t.privacy_unit.is_none(), public, "{}", t.name);
    }
    let person = catalog
        .tables
        .iter()
        .find(|t| t.name == "person")
        .expect("person");
    let yob = person
        .columns
        .iter()
        .find(|c| c.name == "year_of_birth")
        .expect("column");
    assert!(yob.bounds.is_some() && yob.domain.is_some());
    (config, ctx)
}

#[tokio::test]
async fn the_node_accepts_every_parquet_site() {
    let net = network();
    for site in &net.summary.sites {
        let (config, ctx) = load_site(&net.site_dir(&site.name)).await;
        assert_eq!(config.node.name, site.name);
        let text =
            std::fs::read_to_string(net.site_dir(&site.name).join("node.toml")).expect("read");
        assert!(text.contains(&format!(
            "coordinator_key = \"{PLACEHOLDER_COORDINATOR_KEY}\""
        )));
        let rows = ctx
            .sql(
                "SELECT visit_concept_id, COUNT(*) FROM visit_occurrence GROUP BY visit_concept_id",
            )
            .await
            .expect("plan")
            .collect()
            .await
            .expect("run");
        assert!(!rows.is_empty());
    }
}

#[tokio::test]
async fn the_node_accepts_every_csv_site_and_reads_every_row() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("csv");
    let mut o = options(&out, 3, 400, 5, Format::Csv);
    o.coordinator_key = Some(TEST_KEY.into());
    let summary = generate(&o, |_| {}).expect("generate");
    for site in &summary.sites {
        let (_, ctx) = load_site(&out.join(&site.name)).await;
        let text = std::fs::read_to_string(out.join(&site.name).join("node.toml")).expect("read");
        assert!(text.contains(&format!("coordinator_key = \"{TEST_KEY}\"")));
        for table in PERSON_TABLES.iter().chain(PUBLIC_TABLES.iter()) {
            let batches = ctx
                .sql(&format!("SELECT * FROM {table}"))
                .await
                .expect("plan")
                .collect()
                .await
                .unwrap_or_else(|e| panic!("{}/{table}: {e}", site.name));
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            assert_eq!(
                Some(rows as u64),
                site.rows.get(*table).copied(),
                "{}/{table}",
                site.name
            );
        }
    }
}
