//! A federation of real processes, and a plain DataFusion session over the
//! same data unsplit, for comparing answers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow::array::{Array, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use confer_cli::client::Client;
use confer_cli::demo::{ExtraTable, Federation, FederationOptions, start_federation};
use datafusion::prelude::SessionContext;

/// The GiBleed CSV directory.
pub fn gibleed() -> PathBuf {
    confer_cli::gibleed::default_data_dir()
        .expect("GiBleed CSVs at ../shared/data/eunomia_gibleed/csv")
        .canonicalize()
        .expect("canonical path")
}

/// A running federation and the directory that holds its files.
pub struct Running {
    pub federation: Federation,
    _dir: tempfile::TempDir,
}

impl Running {
    /// A client connected as the `tester` researcher.
    pub async fn client(&self) -> Client {
        self.client_as("tester").await
    }

    /// A client connected as `user`.
    pub async fn client_as(&self, user: &str) -> Client {
        self.federation
            .client(user)
            .await
            .expect("connect to coordinator")
    }
}

/// Researchers every test federation has (all members of every study).
pub const USERS: &[&str] = &["tester", "alice", "mallory"];
/// Studies every test federation has.
pub const STUDIES: &[&str] = &["test", "small", "other", "s"];

/// A policy for semantic tests: the `test` study may spend (almost) anything.
pub const TEST_POLICY: &str = r#"[policy]
approval = "auto"

[policy.studies.test]
budget = { rho = 1e15, delta = 0.5 }
"#;

/// Starts `sites` nodes over GiBleed and a coordinator, as the demo does,
/// with the given node policy.
pub async fn federation_with(sites: usize, policy: &str) -> Running {
    federation_with_tables(sites, policy, &[]).await
}

/// [`federation_with`], serving more tables beside GiBleed's.
pub async fn federation_with_tables(
    sites: usize,
    policy: &str,
    extra_tables: &[ExtraTable<'_>],
) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let program = Path::new(env!("CARGO_BIN_EXE_confer"));
    let options = FederationOptions {
        sites,
        coordinator_port: 0,
        log_level: "warn",
        policy,
        users: USERS,
        studies: STUDIES,
        extra_tables,
    };
    let federation = start_federation(program, &gibleed(), dir.path(), &options)
        .await
        .expect("federation starts");
    Running {
        federation,
        _dir: dir,
    }
}

/// Starts `sites` nodes with [`TEST_POLICY`].
pub async fn federation(sites: usize) -> Running {
    federation_with(sites, TEST_POLICY).await
}

/// A DataFusion session with the unsplit GiBleed tables, loaded through the
/// node's own catalog loader (same names, same types).
pub async fn plain_gibleed() -> SessionContext {
    plain_with_tables(&[]).await
}

/// [`plain_gibleed`] with more tables, read from their original files.
pub async fn plain_with_tables(extras: &[crate::slt::ExtraOwned]) -> SessionContext {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = gibleed();
    let config_path = dir.path().join("plain.toml");
    // One "site" holding everything: the demo's config, pointed at the originals.
    let key = confer_protocol::signing::Identity::generate()
        .expect("key")
        .public_hex();
    let state = dir.path().join("state");
    let setup = confer_cli::gibleed::NodeSetup {
        name: "plain",
        state_dir: &state,
        coordinator_key: &key,
        policy: "",
    };
    confer_cli::gibleed::write_node_config(&config_path, &setup, &data, &data).expect("config");
    let mut text = std::fs::read_to_string(&config_path).expect("config");
    for extra in extras {
        text.push_str(&extra.table().config(&extra.source));
    }
    std::fs::write(&config_path, text).expect("config");
    let config = confer_node::NodeConfig::load(&config_path).expect("load config");
    let ctx = SessionContext::new();
    confer_node::catalog::load(&config, &ctx)
        .await
        .expect("load tables");
    ctx
}

/// Rows of a result keyed by the text of the first `key_columns` columns,
/// with the named value columns as f64.
pub fn keyed(
    batches: &[RecordBatch],
    key_columns: usize,
    values: &[&str],
) -> BTreeMap<String, Vec<f64>> {
    let mut out = BTreeMap::new();
    for b in batches {
        let keys: Vec<_> = (0..key_columns)
            .map(|i| cast(b.column(i), &DataType::Utf8).expect("key as text"))
            .collect();
        let vals: Vec<_> = values
            .iter()
            .map(|name| {
                let col = b
                    .column_by_name(name)
                    .unwrap_or_else(|| panic!("no column {name} in {:?}", b.schema()));
                cast(col, &DataType::Float64).expect("value as float")
            })
            .collect();
        for row in 0..b.num_rows() {
            let key = keys
                .iter()
                .map(|k| {
                    let k = k.as_any().downcast_ref::<StringArray>().expect("text");
                    if k.is_null(row) {
                        "NULL".to_string()
                    } else {
                        k.value(row).to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("|");
            let v = vals
                .iter()
                .map(|a| {
                    let a = a.as_any().downcast_ref::<Float64Array>().expect("f64");
                    if a.is_null(row) {
                        f64::NAN
                    } else {
                        a.value(row)
                    }
                })
                .collect();
            out.insert(key, v);
        }
    }
    out
}

/// Runs plain SQL in DataFusion.
pub async fn plain(ctx: &SessionContext, sql: &str) -> Vec<RecordBatch> {
    ctx.sql(sql)
        .await
        .expect("plain SQL plans")
        .collect()
        .await
        .expect("plain SQL runs")
}

/// One Int64 value.
pub fn single_i64(batches: &[RecordBatch]) -> i64 {
    let col = cast(batches[0].column(0), &DataType::Int64).expect("int");
    col.as_any()
        .downcast_ref::<Int64Array>()
        .expect("i64")
        .value(0)
}
