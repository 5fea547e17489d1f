//! The DP dialect's semantics as data-driven files (`tests/slt/*.slt`, the
//! sqllogictest format DataFusion uses), run against a real federation at
//! epsilon = 1e9, where the noise vanishes.
//!
//! Each file pairs a DP query with the same bounded query written in plain
//! SQL: statements with `WITH DIFFERENTIAL_PRIVACY` go through the
//! coordinator to three nodes; the others run in plain DataFusion over the
//! unsplit data. Both must produce the expected rows written below them, so
//! every DP answer is checked against its plain counterpart. Interval
//! columns are left out of the comparison; floats are printed with four
//! decimals and compared within 1e-2 (queries over large bounds use
//! epsilon = 1e18 so that the noise on float sums stays far below that).
//!
//! To regenerate expected rows: `CONFER_SLT_COMPLETE=1 cargo test -p confer-cli --test e2e slt`
//! (then check that each DP block still equals its plain block).

use std::path::{Path, PathBuf};

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::DataType;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use confer_cli::client::Client;
use confer_cli::demo::ExtraTable;
use datafusion::prelude::SessionContext;
use sqllogictest::{AsyncDB, DBOutput, DefaultColumnType, Runner};

use crate::fixture::{Running, federation_with_tables, gibleed, plain_with_tables};

pub fn shared(path: &str) -> PathBuf {
    gibleed()
        .join("../..")
        .join(path)
        .canonicalize()
        .expect("shared data")
}

/// The research tables beside GiBleed: the SmartNoise PUMS sample (one row
/// per person) and a ZetaSQL DP test table (NULLs, several rows per person).
pub fn extra_tables() -> Vec<(String, PathBuf, &'static str, &'static str)> {
    vec![
        (
            "pums".into(),
            shared("smartnoise_pums/PUMS_pid.csv"),
            "pid",
            "pid = { type = \"int64\" }\nage = { type = \"int64\", bounds = [0, 100] }\n\
             sex = { type = \"int64\", domain = [0, 1] }\neduc = { type = \"int64\", domain = { from = 1, to = 16 } }\n\
             race = { type = \"int64\", domain = { from = 1, to = 6 } }\nincome = { type = \"float64\", bounds = [0, 500000] }\n\
             married = { type = \"int64\", domain = [0, 1] }",
        ),
        (
            "zeta".into(),
            shared("zetasql_dp_tables/TestTableWithUid2.csv"),
            "uid",
            "id = { type = \"int64\" }\nuid = { type = \"int64\" }\nint64_val = { type = \"int64\" }\n\
             double_val = { type = \"float64\" }",
        ),
    ]
}

/// A study that may spend (almost) anything, for noise-free semantics.
pub const POLICY: &str = "[policy]\napproval = \"auto\"\n\n[policy.studies.test]\nbudget = { rho = 1e30, delta = 0.5 }\n";

struct SltDb {
    client: Client,
    plain: SessionContext,
}

#[derive(Debug)]
struct SltError(String);

impl std::fmt::Display for SltError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SltError {}

fn format_batches(batches: &[RecordBatch]) -> Result<Vec<Vec<String>>, SltError> {
    let mut rows = Vec::new();
    for b in batches {
        let keep: Vec<usize> = (0..b.num_columns())
            .filter(|&i| {
                let n = b.schema().field(i).name().clone();
                !n.ends_with("_ci_low") && !n.ends_with("_ci_high")
            })
            .collect();
        let options = FormatOptions::default().with_null("NULL");
        for row in 0..b.num_rows() {
            let mut out = Vec::with_capacity(keep.len());
            for &i in &keep {
                let col = b.column(i);
                let text = if col.is_null(row) {
                    "NULL".to_string()
                } else if matches!(col.data_type(), DataType::Float64 | DataType::Float32) {
                    let v = arrow::compute::cast(col, &DataType::Float64)
                        .map_err(|e| SltError(e.to_string()))?;
                    let v = v
                        .as_any()
                        .downcast_ref::<arrow::array::Float64Array>()
                        .map(|a| a.value(row))
                        .unwrap_or(f64::NAN);
                    let s = format!("{v:.4}");
                    if s == "-0.0000" {
                        "0.0000".to_string()
                    } else {
                        s
                    }
                } else {
                    ArrayFormatter::try_new(col.as_ref(), &options)
                        .map_err(|e| SltError(e.to_string()))?
                        .value(row)
                        .to_string()
                };
                out.push(text);
            }
            rows.push(out);
        }
    }
    Ok(rows)
}

#[tonic::async_trait]
impl AsyncDB for SltDb {
    type Error = SltError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<Self::ColumnType>, Self::Error> {
        let batches = if sql.to_ascii_uppercase().contains("DIFFERENTIAL_PRIVACY") {
            self.client
                .run(sql, Some("test"))
                .await
                .map_err(|e| SltError(format!("{e:#}")))?
                .batches
        } else {
            self.plain
                .sql(sql)
                .await
                .map_err(|e| SltError(e.to_string()))?
                .collect()
                .await
                .map_err(|e| SltError(e.to_string()))?
        };
        let rows = format_batches(&batches)?;
        let width = rows.first().map_or(0, Vec::len);
        Ok(DBOutput::Rows {
            types: vec![DefaultColumnType::Any; width],
            rows,
        })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "confer"
    }

    async fn sleep(dur: std::time::Duration) {
        tokio::time::sleep(dur).await;
    }
}

fn accept_any_columns(_: &Vec<DefaultColumnType>, _: &Vec<DefaultColumnType>) -> bool {
    true
}

/// Compares rows token by token; numbers may differ by 1e-2 + 1e-6 relative
/// (the noise left at epsilon = 1e18 on float sums with large bounds).
fn tolerant(
    normalizer: sqllogictest::Normalizer,
    actual: &[Vec<String>],
    expected: &[String],
) -> bool {
    let actual: Vec<String> = actual.iter().map(|r| normalizer(&r.join(" "))).collect();
    let expected: Vec<String> = expected.iter().map(normalizer).collect();
    actual.len() == expected.len()
        && actual.iter().zip(&expected).all(|(a, e)| {
            let (a, e): (Vec<&str>, Vec<&str>) = (a.split(' ').collect(), e.split(' ').collect());
            a.len() == e.len()
                && a.iter()
                    .zip(&e)
                    .all(|(x, y)| match (x.parse::<f64>(), y.parse::<f64>()) {
                        (Ok(x), Ok(y)) => (x - y).abs() <= 1e-2 + 1e-6 * y.abs(),
                        _ => x == y,
                    })
        })
}

async fn run_files(fed: &Running, dir: &Path) {
    let plain_ctx = plain_with_tables(&extra_owned(&extra_tables())).await;
    let url = fed.federation.url();
    let token = fed.federation.tokens["tester"].clone();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("slt dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .slt files in {}", dir.display());
    for file in files {
        let (url, token, plain) = (url.clone(), token.clone(), plain_ctx.clone());
        let mut runner = Runner::new(move || {
            let (url, token, plain) = (url.clone(), token.clone(), plain.clone());
            async move {
                let client = Client::connect(&url, Some(&token))
                    .await
                    .map_err(|e| SltError(e.to_string()))?;
                Ok(SltDb { client, plain })
            }
        });
        runner.with_column_validator(accept_any_columns);
        runner.with_validator(tolerant);
        if std::env::var_os("CONFER_SLT_COMPLETE").is_some() {
            runner
                .update_test_file(
                    &file,
                    " ",
                    tolerant,
                    sqllogictest::default_normalizer,
                    accept_any_columns,
                )
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        } else {
            runner
                .run_file_async(&file)
                .await
                .unwrap_or_else(|e| panic!("{}:\n{e}", file.display()));
        }
    }
}

/// Extra tables as the fixture wants them.
pub fn extra_owned(t: &[(String, PathBuf, &'static str, &'static str)]) -> Vec<ExtraOwned> {
    t.iter()
        .map(|(name, source, unit, columns)| ExtraOwned {
            name: name.clone(),
            source: source.clone(),
            unit,
            columns,
        })
        .collect()
}

/// An owned [`ExtraTable`].
pub struct ExtraOwned {
    pub name: String,
    pub source: PathBuf,
    pub unit: &'static str,
    pub columns: &'static str,
}

impl ExtraOwned {
    pub fn table(&self) -> ExtraTable<'_> {
        ExtraTable {
            name: &self.name,
            source: &self.source,
            unit: self.unit,
            columns: self.columns,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_semantics_equal_plain_bounded_queries() {
    let extras = extra_owned(&extra_tables());
    let tables: Vec<ExtraTable<'_>> = extras.iter().map(ExtraOwned::table).collect();
    let fed = federation_with_tables(3, POLICY, &tables).await;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/slt");
    run_files(&fed, &dir).await;
    fed.federation.stop().await.expect("clean stop");
}
