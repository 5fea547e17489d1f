//! The dialect as data: every `tests/slt/*.slt` file (the sqllogictest
//! format DataFusion uses), run in-process against a fixed catalog: the
//! compiler, then DataFusion over the catalog's empty tables. No processes;
//! a few seconds.
//!
//! * `statement ok` + a DP query: it compiles as the coordinator compiles
//!   it, and its local bounded query plans and runs in DataFusion.
//! * `statement error <regex>` + a query: it is refused, with a message
//!   the regex matches (unanchored: a fragment of the message, with `( ) . ?
//!   + * [ ] { } | ^ $` escaped).
//! * `query TT` + `EXPLAIN PRIVACY <query>`: the rows EXPLAIN PRIVACY gives
//!   for a network of three sites, one `item value` row per line (a value's
//!   further lines as rows of their own under the same item).
//!
//! The catalog is [`catalog_info`] at three sites (site-a, site-b, site-c).
//! After a deliberate compiler change, rewrite the expected rows with
//! `CONFER_SLT_COMPLETE=1 cargo test -p confer-query --test slt` and read
//! the diff.

use std::path::{Path, PathBuf};

mod common;

use common::catalog_info;
use confer_protocol::catalog::CatalogInfo;
use confer_query::{Catalog, FederatedPlan, Statement, compile, engine, parse};
use sqllogictest::{AsyncDB, DBOutput, DefaultColumnType, Runner};

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];

fn catalog() -> Catalog {
    let infos: Vec<CatalogInfo> = SITES.iter().map(|s| catalog_info(s)).collect();
    Catalog::merge(&infos).expect("the test catalog merges")
}

#[derive(Debug)]
struct SltError(String);

impl std::fmt::Display for SltError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SltError {}

/// The compiler and DataFusion, as a sqllogictest database.
struct Dialect {
    catalog: Catalog,
}

impl Dialect {
    /// Compiles a DP query as the coordinator does, and runs its local
    /// bounded query over the catalog's empty tables.
    async fn plan(&self, query: &confer_query::ParsedQuery) -> Result<FederatedPlan, SltError> {
        let plan = compile(query, &self.catalog, None)
            .await
            .map_err(|e| SltError(e.to_string()))?;
        let ctx = engine::empty_context(&self.catalog).map_err(|e| SltError(e.to_string()))?;
        ctx.sql(&plan.local_sql)
            .await
            .map_err(|e| SltError(format!("the local bounded query does not plan: {e}")))?
            .collect()
            .await
            .map_err(|e| SltError(format!("the local bounded query does not run: {e}")))?;
        Ok(plan)
    }
}

/// A value as text on one line: control characters written as escapes.
fn visible(line: &str) -> String {
    line.chars()
        .map(|c| {
            if c.is_control() {
                format!("\\u{{{:x}}}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[async_trait::async_trait]
impl AsyncDB for Dialect {
    type Error = SltError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<Self::ColumnType>, Self::Error> {
        match parse(sql).map_err(|e| SltError(e.to_string()))? {
            Statement::Query(query) => {
                self.plan(&query).await?;
                Ok(DBOutput::StatementComplete(0))
            }
            Statement::ExplainPrivacy(query) => {
                let plan = self.plan(&query).await?;
                let rows = confer_query::explain::explain(&plan, SITES.len())
                    .map_err(|e| SltError(e.to_string()))?;
                let mut out = Vec::new();
                for (item, value) in rows {
                    for line in value.lines().filter(|l| !l.trim().is_empty()) {
                        out.push(vec![item.replace(' ', "_"), visible(line)]);
                    }
                }
                Ok(DBOutput::Rows {
                    types: vec![DefaultColumnType::Text; 2],
                    rows: out,
                })
            }
            other => Err(SltError(format!(
                "not a DP query or EXPLAIN PRIVACY: {other:?}"
            ))),
        }
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "confer-dialect"
    }

    async fn sleep(dur: std::time::Duration) {
        tokio::time::sleep(dur).await;
    }
}

fn slt_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slt");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "slt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .slt files in {}", dir.display());
    files
}

#[tokio::test]
async fn the_dialect_as_data() {
    let mut records = 0;
    for file in slt_files() {
        let text = std::fs::read_to_string(&file).expect("readable .slt file");
        records += text
            .lines()
            .filter(|l| l.starts_with("statement ") || l.starts_with("query "))
            .count();
        let mut runner = Runner::new(|| async { Ok(Dialect { catalog: catalog() }) });
        if std::env::var_os("CONFER_SLT_COMPLETE").is_some() {
            runner
                .update_test_file(
                    &file,
                    " ",
                    sqllogictest::default_validator,
                    sqllogictest::default_normalizer,
                    sqllogictest::default_column_validator,
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
    let refusals = slt_files()
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with("statement error"))
                .count()
        })
        .sum::<usize>();
    assert!(
        refusals >= 30,
        "the refusal suite must hold at least 30 refusals, has {refusals}"
    );
    assert!(records > refusals, "no accepted query or EXPLAIN snapshot");
}
