//! The dialect as data: every `tests/slt/*.slt` file, run in-process
//! (compile, then DataFusion over the catalog's empty tables; no
//! processes, a few seconds).
//!
//! A file is a list of records separated by blank lines; `#` starts a
//! comment line. Records, in the spirit of sqllogictest:
//!
//! ```text
//! statement ok                   the query compiles, and its local bounded
//! <SQL, one or more lines>       query runs in DataFusion
//!
//! statement error <text>         the query is refused with a message that
//! <SQL>                          contains <text> (plain text, not a regex)
//!
//! explain <sites>                EXPLAIN PRIVACY for a network of <sites>
//! <SQL>                          nodes, one `item: value` line per row (a
//! ----                           value's own lines indented by two spaces)
//! <expected rows>
//! ```
//!
//! Queries compile as the coordinator compiles them, against the network
//! catalog of three sites (site-a, site-b, site-c) that each hold the
//! tables of [`catalog_info`]. After a deliberate compiler change, rewrite
//! the expected EXPLAIN output with
//! `CONFER_SLT_COMPLETE=1 cargo test -p confer-query --test slt` and read
//! the diff.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use confer_protocol::catalog::{
    CatalogInfo, ColumnInfo, ColumnType, Domain, DomainValue, TableInfo,
};
use confer_query::{Catalog, FederatedPlan, Statement, compile, engine, parse};

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];

fn col(name: &str, ty: ColumnType) -> ColumnInfo {
    ColumnInfo {
        name: name.into(),
        column_type: ty,
        bounds: None,
        domain: None,
    }
}

/// The tables each site publishes: an OMOP-like person, condition and
/// measurement table, and a public vocabulary.
fn catalog_info(node: &str) -> CatalogInfo {
    let int = ColumnType::Int64;
    let mut gender = col("gender_concept_id", int);
    gender.domain = Some(Domain::Values {
        values: vec![DomainValue::Int(8507), DomainValue::Int(8532)],
    });
    let mut year = col("year_of_birth", int);
    year.bounds = Some((1900.0, 2030.0));
    let person = TableInfo {
        name: "person".into(),
        privacy_unit: Some("person_id".into()),
        columns: vec![
            col("person_id", int),
            gender,
            year,
            col("care_site_id", int),
        ],
        one_row_per_unit: true,
    };
    let condition = TableInfo {
        name: "condition_occurrence".into(),
        privacy_unit: Some("person_id".into()),
        columns: vec![
            col("condition_occurrence_id", int),
            col("person_id", int),
            col("condition_concept_id", int),
            col("provider_id", int),
            col("condition_start_date", ColumnType::Date),
        ],
        one_row_per_unit: false,
    };
    let mut value = col("value_as_number", ColumnType::Float64);
    value.bounds = Some((0.0, 200.0));
    let mut unit = col("unit_concept_id", int);
    unit.domain = Some(Domain::Values {
        values: vec![DomainValue::Int(8840), DomainValue::Int(8713)],
    });
    let measurement = TableInfo {
        name: "measurement".into(),
        privacy_unit: Some("person_id".into()),
        columns: vec![
            col("measurement_id", int),
            col("person_id", int),
            col("measurement_concept_id", int),
            value,
            unit,
        ],
        one_row_per_unit: false,
    };
    let concept = TableInfo {
        name: "concept".into(),
        privacy_unit: None,
        columns: vec![
            col("concept_id", int),
            col("concept_name", ColumnType::Utf8),
        ],
        one_row_per_unit: false,
    };
    CatalogInfo {
        node: node.into(),
        tables: vec![concept, condition, measurement, person],
    }
}

fn catalog() -> Catalog {
    let infos: Vec<CatalogInfo> = SITES.iter().map(|s| catalog_info(s)).collect();
    Catalog::merge(&infos).expect("the test catalog merges")
}

/// One record of a file.
#[derive(Debug)]
enum Record {
    Ok {
        line: usize,
        sql: String,
    },
    Error {
        line: usize,
        sql: String,
        want: String,
    },
    Explain {
        line: usize,
        sql: String,
        sites: usize,
        /// Where the expected rows start and end (lines, 0-based, end exclusive).
        expected: (usize, usize),
    },
}

fn parse_file(path: &Path, text: &str) -> Vec<Record> {
    let lines: Vec<&str> = text.lines().collect();
    let mut records = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let head = lines[i].trim_end();
        if head.is_empty() || head.starts_with('#') {
            i += 1;
            continue;
        }
        let line = i + 1;
        i += 1;
        let mut sql = Vec::new();
        while i < lines.len() && !lines[i].trim().is_empty() && lines[i] != "----" {
            sql.push(lines[i]);
            i += 1;
        }
        let sql = sql.join("\n");
        assert!(
            !sql.is_empty(),
            "{}:{line}: the record has no SQL",
            path.display()
        );
        if head == "statement ok" {
            records.push(Record::Ok { line, sql });
        } else if let Some(want) = head.strip_prefix("statement error ") {
            records.push(Record::Error {
                line,
                sql,
                want: want.trim().to_string(),
            });
        } else if let Some(sites) = head.strip_prefix("explain ") {
            let sites: usize = sites.trim().parse().unwrap_or_else(|_| {
                panic!(
                    "{}:{line}: write `explain <number of sites>`",
                    path.display()
                )
            });
            assert!(
                i < lines.len() && lines[i] == "----",
                "{}:{line}: an explain record needs ---- and the expected rows after its SQL",
                path.display()
            );
            i += 1;
            let start = i;
            while i < lines.len() && !lines[i].trim().is_empty() {
                i += 1;
            }
            records.push(Record::Explain {
                line,
                sql,
                sites,
                expected: (start, i),
            });
        } else {
            panic!(
                "{}:{line}: unknown record `{head}` (statement ok, statement error <text>, explain <sites>)",
                path.display()
            );
        }
    }
    records
}

/// Compiles `sql` as the coordinator does.
async fn compiled(sql: &str, catalog: &Catalog) -> Result<FederatedPlan, String> {
    let query = match parse(sql).map_err(|e| e.to_string())? {
        Statement::Query(q) | Statement::ExplainPrivacy(q) => q,
        other => return Err(format!("not a DP query: {other:?}")),
    };
    compile(&query, catalog, None)
        .await
        .map_err(|e| e.to_string())
}

/// Runs the plan's local bounded query over the catalog's empty tables.
async fn runs(plan: &FederatedPlan, catalog: &Catalog) -> Result<(), String> {
    let ctx = engine::empty_context(catalog).map_err(|e| e.to_string())?;
    let frame = ctx.sql(&plan.local_sql).await.map_err(|e| e.to_string())?;
    frame.collect().await.map_err(|e| e.to_string())?;
    Ok(())
}

fn render(rows: &[(String, String)]) -> String {
    let mut out = String::new();
    for (item, value) in rows {
        let mut lines = value.lines();
        let _ = writeln!(out, "{item}: {}", lines.next().unwrap_or(""));
        for more in lines {
            // Blank lines end a record: keep them visible.
            let more = if more.trim().is_empty() { "." } else { more };
            let _ = writeln!(out, "  {more}");
        }
    }
    out
}

fn slt_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slt");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "slt"))
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn the_dialect_as_data() {
    let complete = std::env::var_os("CONFER_SLT_COMPLETE").is_some();
    let catalog = catalog();
    let mut failures = Vec::new();
    let mut counts = (0usize, 0usize, 0usize);
    for path in slt_files() {
        let text = std::fs::read_to_string(&path).expect("readable .slt file");
        let lines: Vec<&str> = text.lines().collect();
        let mut rewritten: Vec<String> = Vec::new();
        let mut copied = 0;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        for record in parse_file(&path, &text) {
            match record {
                Record::Ok { line, sql } => {
                    counts.0 += 1;
                    let result = match compiled(&sql, &catalog).await {
                        Ok(plan) => runs(&plan, &catalog).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = result {
                        failures.push(format!("{name}:{line}: {sql}\n    refused: {e}"));
                    }
                }
                Record::Error { line, sql, want } => {
                    counts.1 += 1;
                    match compiled(&sql, &catalog).await {
                        Ok(_) => failures.push(format!(
                            "{name}:{line}: {sql}\n    accepted; want an error with: {want}"
                        )),
                        Err(e) if !e.contains(&want) => failures.push(format!(
                            "{name}:{line}: {sql}\n    gave: {e}\n    want: {want}"
                        )),
                        Err(_) => {}
                    }
                }
                Record::Explain {
                    line,
                    sql,
                    sites,
                    expected: (start, end),
                } => {
                    counts.2 += 1;
                    let got = match compiled(&sql, &catalog).await {
                        Ok(plan) => match confer_query::explain::explain(&plan, sites) {
                            Ok(rows) => match runs(&plan, &catalog).await {
                                Ok(()) => render(&rows),
                                Err(e) => format!("local query failed: {e}\n"),
                            },
                            Err(e) => format!("explain failed: {e}\n"),
                        },
                        Err(e) => format!("refused: {e}\n"),
                    };
                    let want: String = lines[start..end].iter().map(|l| format!("{l}\n")).collect();
                    if complete {
                        rewritten.extend(lines[copied..start].iter().map(|l| l.to_string()));
                        rewritten.extend(got.lines().map(str::to_string));
                        copied = end;
                    } else if got != want {
                        failures.push(format!(
                            "{name}:{line}: EXPLAIN PRIVACY differs\n--- expected\n{want}--- got\n{got}"
                        ));
                    }
                }
            }
        }
        if complete {
            rewritten.extend(lines[copied..].iter().map(|l| l.to_string()));
            let mut out = rewritten.join("\n");
            out.push('\n');
            if out != text {
                std::fs::write(&path, out).expect("writable .slt file");
            }
        }
    }
    assert!(
        counts.1 >= 30,
        "the refusal suite must hold at least 30 refusals, has {}",
        counts.1
    );
    assert!(
        failures.is_empty(),
        "{} of {} records failed (statement ok {}, statement error {}, explain {}):\n{}",
        failures.len(),
        counts.0 + counts.1 + counts.2,
        counts.0,
        counts.1,
        counts.2,
        failures.join("\n")
    );
}
