//! Onboarding: `confer node init` surveys a data directory and writes a
//! commented `node.toml` the steward finishes.
//!
//! * OMOP CDM tables (by file name: `PERSON.csv`, `condition_occurrence/`,
//!   `measurement.parquet`) get the CDM's types, `person_id` as privacy unit
//!   where the CDM has it, and are loaded with the node's own start-up checks
//!   (types, one row per person, required columns): a table that fails is
//!   written commented out with the reason.
//! * Vocabulary tables (`concept`, `vocabulary`, ...) are public.
//! * Everything else, an OMOP table without `person_id` that may hold staff
//!   or addresses (`provider`, `location`, `care_site`, ...), and any other
//!   file, is written **commented out**: other files list the types
//!   inferred from a sample for the steward to confirm, and a privacy unit
//!   to choose. Refuse by default: nothing unknown is served until the
//!   steward says how.
//! * No domains or bounds are guessed; commented lines show where they go.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use confer_protocol::catalog::ColumnType;
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};

use crate::config::{Format, TableConfig};
use crate::omop;

/// OMOP tables without persons that describe the vocabulary: public.
const VOCABULARY: &[&str] = &[
    "concept",
    "vocabulary",
    "domain",
    "concept_class",
    "concept_relationship",
    "relationship",
    "concept_synonym",
    "concept_ancestor",
    "source_to_concept_map",
    "drug_strength",
    "cdm_source",
];

/// Rows read to infer the types of a file that is not an OMOP table.
const INFER_ROWS: usize = 10_000;

/// What the survey made of one table source.
#[derive(Debug, Clone, PartialEq)]
pub enum Finding {
    /// An OMOP table about persons, loaded and checked: served with
    /// `privacy_unit = "person_id"`.
    OmopPersons,
    /// An OMOP vocabulary table, loaded and checked: served as public.
    OmopVocabulary,
    /// An OMOP table left for the steward (written commented out), and why.
    OmopHeld(String),
    /// Another file: its columns with inferred types, to confirm.
    Other {
        /// Column names (lower case) and inferred types.
        columns: Vec<(String, ColumnType)>,
        /// Columns whose type confer cannot serve, and their type.
        unsupported: Vec<(String, String)>,
    },
    /// A file that could not be read, and why.
    Unreadable(String),
}

/// One table source the survey found.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// Table name (lower case file or directory name without extension).
    pub table: String,
    /// The file or directory (absolute).
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// What it is.
    pub finding: Finding,
}

/// What `init` found in a data directory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Survey {
    /// Table sources, by name.
    pub sources: Vec<Source>,
    /// Entries that are not table sources, and why.
    pub ignored: Vec<(PathBuf, String)>,
}

fn format_of(path: &Path) -> Option<Format> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "csv" => Some(Format::Csv),
        "parquet" => Some(Format::Parquet),
        _ => None,
    }
}

fn table_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let name: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if name.starts_with(|c: char| c.is_ascii_digit()) || name.is_empty() {
        format!("t_{name}")
    } else {
        name
    }
}

/// The format of a directory's table files, if they all share one.
fn directory_format(dir: &Path) -> Result<Format, String> {
    let mut formats = BTreeSet::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot list it: {e}"))?;
    for entry in entries.flatten() {
        if let Some(f) = format_of(&entry.path()) {
            formats.insert(f == Format::Csv);
        }
    }
    match formats.len() {
        0 => Err("no CSV or Parquet files in it".into()),
        1 if formats.contains(&true) => Ok(Format::Csv),
        1 => Ok(Format::Parquet),
        _ => Err("it mixes CSV and Parquet files: one format per table".into()),
    }
}

/// Writes `[tables.<name>]` as TOML for a source, with `extra` lines.
fn table_toml(source: &Source, unit: Option<&str>) -> String {
    let mut out = format!(
        "[tables.{}]\npath = {}\n",
        source.table,
        toml_string(&source.path.display().to_string())
    );
    if source.format == Format::Parquet {
        out.push_str("format = \"parquet\"\n");
    } else {
        out.push_str("format = \"csv\"\n");
    }
    if let Some(unit) = unit {
        let _ = writeln!(out, "privacy_unit = {}", toml_string(unit));
    }
    out
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Loads an OMOP table as the node's start would; `Err` says why not.
async fn check_omop(source: &Source, unit: Option<&str>) -> Result<(), String> {
    let config: TableConfig = toml::from_str(&table_toml(source, unit).replacen(
        &format!("[tables.{}]\n", source.table),
        "",
        1,
    ))
    .map_err(|e| format!("internal: {e}"))?;
    let ctx = SessionContext::new();
    crate::catalog::load_table(&ctx, &source.table, &config)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Columns of a non-OMOP file, with types inferred from its first rows.
async fn infer(path: &Path, format: Format) -> Result<Finding, String> {
    let ctx = SessionContext::new();
    let text = path.display().to_string();
    let frame = match format {
        Format::Csv => {
            let ext = if path.is_dir() {
                ".csv".to_string()
            } else {
                format!(
                    ".{}",
                    path.extension().and_then(|e| e.to_str()).unwrap_or("csv")
                )
            };
            ctx.read_csv(
                &text,
                CsvReadOptions::new()
                    .has_header(true)
                    .schema_infer_max_records(INFER_ROWS)
                    .file_extension(&ext),
            )
            .await
        }
        Format::Parquet => {
            let ext = if path.is_dir() {
                ".parquet".to_string()
            } else {
                format!(
                    ".{}",
                    path.extension()
                        .and_then(|e| e.to_str())
                        .unwrap_or("parquet")
                )
            };
            ctx.read_parquet(&text, ParquetReadOptions::default().file_extension(&ext))
                .await
        }
    }
    .map_err(|e| format!("cannot read it: {e}"))?;
    let mut columns = Vec::new();
    let mut unsupported = Vec::new();
    for field in frame.schema().fields() {
        let name = field.name().trim().to_ascii_lowercase();
        match crate::catalog::column_type_of(field.data_type()) {
            Some(t) => columns.push((name, t)),
            // Small integers and floats are widened by the node.
            None => match field.data_type() {
                d if d.is_integer() => columns.push((name, ColumnType::Int64)),
                d if d.is_floating() => columns.push((name, ColumnType::Float64)),
                arrow::datatypes::DataType::Null => columns.push((name, ColumnType::Utf8)),
                d => unsupported.push((name, d.to_string())),
            },
        }
    }
    Ok(Finding::Other {
        columns,
        unsupported,
    })
}

/// Surveys `dir`: its CSV and Parquet files, and its directories of them,
/// one table each. Reads the data; writes nothing.
pub async fn survey(dir: &Path) -> Result<Survey, String> {
    let dir = std::fs::canonicalize(dir).map_err(|e| format!("--data {}: {e}", dir.display()))?;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("--data {}: cannot list it: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    let mut survey = Survey::default();
    let mut names = BTreeSet::new();
    for path in entries {
        let format = if path.is_dir() {
            match directory_format(&path) {
                Ok(f) => f,
                Err(why) => {
                    survey.ignored.push((path, why));
                    continue;
                }
            }
        } else {
            match format_of(&path) {
                Some(f) => f,
                None => {
                    survey
                        .ignored
                        .push((path, "not a CSV or Parquet file".into()));
                    continue;
                }
            }
        };
        let table = table_name(&path);
        if !names.insert(table.clone()) {
            survey.ignored.push((
                path,
                format!("another source already provides table {table}"),
            ));
            continue;
        }
        let mut source = Source {
            table: table.clone(),
            path: path.clone(),
            format,
            finding: Finding::Unreadable(String::new()),
        };
        source.finding = match omop::table(&table) {
            Some(cols) => {
                let persons = cols.iter().any(|c| c.name == "person_id");
                if persons {
                    match check_omop(&source, Some("person_id")).await {
                        Ok(()) => Finding::OmopPersons,
                        Err(e) => Finding::OmopHeld(e),
                    }
                } else if VOCABULARY.contains(&table.as_str()) {
                    match check_omop(&source, None).await {
                        Ok(()) => Finding::OmopVocabulary,
                        Err(e) => Finding::OmopHeld(e),
                    }
                } else {
                    Finding::OmopHeld(format!(
                        "{table} has no person_id but may describe staff, places or links between records: serve it as public only if the steward agrees (uncomment), or leave it out"
                    ))
                }
            }
            None => match infer(&path, format).await {
                Ok(f) => f,
                Err(e) => Finding::Unreadable(e),
            },
        };
        survey.sources.push(source);
    }
    Ok(survey)
}

/// What `init` writes besides the tables.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The site's name.
    pub site: String,
    /// The address the node serves on.
    pub listen: String,
    /// The state directory.
    pub state_dir: PathBuf,
    /// The node's TLS key and certificate, as written in the config
    /// (relative to it).
    pub pki_dir: PathBuf,
}

fn comment_out(text: &str) -> String {
    text.lines()
        .map(|l| {
            if l.is_empty() {
                "#".to_string()
            } else {
                format!("# {l}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn wrap_comment(text: &str) -> String {
    let mut out = String::new();
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() + word.len() + 1 > 78 && line.len() > 1 {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
    out
}

/// Where a domain or bounds would go, for the main columns of an OMOP table.
fn omop_hints(table: &str) -> String {
    let Some(cols) = omop::table(table) else {
        return String::new();
    };
    let main = format!("{}_concept_id", table.split('_').next().unwrap_or(table));
    let mut lines = Vec::new();
    for c in &cols {
        if c.name == main || (table == "person" && c.name == "gender_concept_id") {
            lines.push(format!(
                "# {} = {{ domain = [ ... ] }}   # a public list of codes makes it a public group key",
                c.name
            ));
        } else if c.name == "year_of_birth" {
            lines.push(
                "# year_of_birth = { bounds = [LOW, HIGH], domain = { from = LOW, to = HIGH } }"
                    .to_string(),
            );
        } else if c.column_type == ColumnType::Float64 && !c.name.starts_with("range_") {
            lines.push(format!(
                "# {} = {{ bounds = [LOW, HIGH] }}   # what SUM/AVG clip to when a query gives none",
                c.name
            ));
        }
    }
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "[tables.{table}.columns]\n# No domains or bounds are guessed from the data: set them from public\n# knowledge (code lists, clinical ranges) if researchers need them.\n{}\n",
        lines.join("\n")
    )
}

/// The commented `node.toml` for a survey.
pub fn render(survey: &Survey, options: &InitOptions) -> String {
    let pki = |file: &str| toml_string(&options.pki_dir.join(file).display().to_string());
    let mut out = String::new();
    let _ = write!(
        out,
        r#"# node.toml for site "{site}", written by `confer node init`.
# Every line may be edited; `confer node check --config node.toml` says
# whether the node would start, and what to change if not. The full list of
# options, each explained, is examples/node.toml (docs/deploy.md, docs/data.md,
# docs/governance.md).

[node]
# The site name: it must match the certificate the network issues you.
name = {site_q}
# Where the coordinator connects (the address in your certificate request).
listen = {listen}
# The privacy ledger, approvals and audit chain (a directory this node alone
# writes; the systemd unit allows /var/lib/confer/node).
state_dir = {state}
# The coordinator's public signing key: arrives in the enrolment bundle.
coordinator_key_file = {coordinator_key}

[tls]
cert = {cert}
key = {key}
ca = {ca}

[policy]
# "manual": a new study waits for the steward (the web page below, or
# `confer node approve <study> --config node.toml`).
approval = "manual"
# Largest epsilon (and delta) of one task; smaller ones are refused below 0.01.
max_query_epsilon = 1.0
max_query_delta = 1e-6
min_query_epsilon = 0.01
# A task that fails after admission is charged at least this much.
min_charge_epsilon = 1.0
max_failures_per_researcher = 3
# Small-cell rule on top of DP.
min_group_size = 10
# Everything this node may lose over all studies, and per researcher.
node_budget = {{ epsilon = 20.0, delta = 1e-6 }}
researcher_total_budget = {{ epsilon = 10.0, delta = 1e-6 }}
# Budget of a study the steward approves without listing it below; remove it
# to refuse every study not listed as [policy.studies.<name>].
default_study_budget = {{ epsilon = 3.0, delta = 1e-6 }}
# Model architectures unlisted studies may train (none by default).
default_models = []

[policy.limits]
memory_mb = 2048
time_limit_secs = 600
max_concurrent_tasks = 4
padded_secs = 30

[policy.secure]
min_survivors = 2
max_corrupt_peers = 0

# The steward's web page (sign in with `confer node steward-token`).
[console]
listen = "127.0.0.1:8480"

"#,
        site = options.site,
        site_q = toml_string(&options.site),
        listen = toml_string(&options.listen),
        state = toml_string(&options.state_dir.display().to_string()),
        coordinator_key = pki("coordinator.key.pub"),
        cert = pki(&format!("{}.pem", options.site)),
        key = pki(&format!("{}.key", options.site)),
        ca = pki("ca.pem"),
    );
    let count = |f: fn(&Finding) -> bool| survey.sources.iter().filter(|s| f(&s.finding)).count();
    let _ = writeln!(
        out,
        "# ---- Tables ({} OMOP CDM tables about persons, {} vocabulary tables served;\n# {} held for the steward, commented out below) ----\n",
        count(|f| matches!(f, Finding::OmopPersons)),
        count(|f| matches!(f, Finding::OmopVocabulary)),
        count(|f| !matches!(f, Finding::OmopPersons | Finding::OmopVocabulary)),
    );
    for source in &survey.sources {
        match &source.finding {
            Finding::OmopPersons => {
                let _ = writeln!(
                    out,
                    "# OMOP CDM table {}: the CDM's column types; privacy unit person_id.",
                    source.table
                );
                out.push_str(&table_toml(source, Some("person_id")));
                out.push('\n');
                let hints = omop_hints(&source.table);
                if !hints.is_empty() {
                    out.push_str(&hints);
                    out.push('\n');
                }
            }
            Finding::OmopVocabulary => {
                let _ = writeln!(
                    out,
                    "# OMOP vocabulary table {}: public (no persons), answered exactly.",
                    source.table
                );
                out.push_str(&table_toml(source, None));
                out.push('\n');
            }
            Finding::OmopHeld(why) => {
                out.push_str(&wrap_comment(&format!(
                    "HELD: OMOP table {} is not served: {why}",
                    source.table
                )));
                let unit = omop::table(&source.table)
                    .is_some_and(|c| c.iter().any(|c| c.name == "person_id"))
                    .then_some("person_id");
                out.push_str(&comment_out(&table_toml(source, unit)));
                out.push('\n');
            }
            Finding::Other {
                columns,
                unsupported,
            } => {
                out.push_str(&wrap_comment(&format!(
                    "TO CONFIRM: {} is not an OMOP CDM table. The types below were inferred from its first {INFER_ROWS} rows: check them. Choose its privacy unit (the column that identifies a person) or, only if it holds no persons, leave privacy_unit out to serve it as public; then uncomment.",
                    source.table
                )));
                let unit = columns
                    .iter()
                    .find(|(n, _)| n == "person_id" || n == "patient_id")
                    .map(|(n, _)| n.as_str())
                    .unwrap_or("CHOOSE_A_COLUMN");
                let mut table = table_toml(source, Some(unit));
                let _ = writeln!(table, "\n[tables.{}.columns]", source.table);
                for (name, ty) in columns {
                    let _ = writeln!(table, "{name} = {{ type = \"{ty}\" }}");
                }
                out.push_str(&comment_out(&table));
                for (name, ty) in unsupported {
                    let _ = writeln!(
                        out,
                        "# (column {name} has type {ty}, which confer cannot serve: convert it, or leave the table out)"
                    );
                }
                out.push('\n');
            }
            Finding::Unreadable(why) => {
                out.push_str(&wrap_comment(&format!(
                    "UNREADABLE: {} ({}): {why}",
                    source.table,
                    source.path.display()
                )));
                out.push('\n');
            }
        }
    }
    if !survey.ignored.is_empty() {
        out.push_str("# Not table sources (ignored):\n");
        for (path, why) in &survey.ignored {
            let _ = writeln!(out, "#   {}: {why}", path.display());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn omop_tables_are_served_typed_and_other_files_held_with_inferred_types() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("mkdir");
        std::fs::write(
            data.join("PERSON.csv"),
            "person_id,gender_concept_id,year_of_birth,race_concept_id,ethnicity_concept_id\n1,8507,1950,0,0\n2,8532,1961,0,0\n",
        )
        .expect("person");
        std::fs::write(
            data.join("death.csv"),
            "person_id,death_date\n1,2020-01-01\n",
        )
        .expect("death");
        std::fs::write(
            data.join("observation_period.csv"),
            "person_id,observation_period_start_date\n1,2020-01-01\n",
        )
        .expect("lacks columns");
        std::fs::write(
            data.join("concept.csv"),
            "concept_id,concept_name,domain_id,vocabulary_id,concept_class_id,concept_code,valid_start_date,valid_end_date\n8507,MALE,Gender,Gender,Gender,M,1970-01-01,2099-12-31\n",
        )
        .expect("concept");
        std::fs::write(
            data.join("provider.csv"),
            "provider_id,provider_name\n1,Dr A\n",
        )
        .expect("provider");
        std::fs::write(
            data.join("Lab Results.csv"),
            "Patient_ID,value,taken,flag\n1,3.5,2020-01-02,true\n2,4,2020-02-03,false\n",
        )
        .expect("labs");
        std::fs::write(data.join("README.txt"), "notes").expect("readme");
        let survey = survey(&data).await.expect("survey");
        let finding = |t: &str| {
            survey
                .sources
                .iter()
                .find(|s| s.table == t)
                .unwrap_or_else(|| panic!("{t} in {survey:?}"))
                .finding
                .clone()
        };
        assert_eq!(finding("person"), Finding::OmopPersons);
        assert_eq!(finding("concept"), Finding::OmopVocabulary);
        assert_eq!(finding("death"), Finding::OmopPersons);
        assert!(
            matches!(finding("observation_period"), Finding::OmopHeld(ref why) if why.contains("observation_period_id")),
            "{:?}",
            finding("observation_period")
        );
        assert!(matches!(finding("provider"), Finding::OmopHeld(_)));
        assert_eq!(
            finding("lab_results"),
            Finding::Other {
                columns: vec![
                    ("patient_id".into(), ColumnType::Int64),
                    ("value".into(), ColumnType::Float64),
                    ("taken".into(), ColumnType::Date),
                    ("flag".into(), ColumnType::Boolean),
                ],
                unsupported: vec![],
            }
        );
        assert_eq!(survey.ignored.len(), 1);

        let text = render(
            &survey,
            &InitOptions {
                site: "site-a".into(),
                listen: "0.0.0.0:50051".into(),
                state_dir: "state".into(),
                pki_dir: "pki".into(),
            },
        );
        // It is TOML, and only the checked tables are live.
        let value: toml::Table = toml::from_str(&text).expect("toml");
        let tables = value["tables"].as_table().expect("tables");
        let mut live: Vec<&str> = tables.keys().map(String::as_str).collect();
        live.sort_unstable();
        assert_eq!(live, ["concept", "death", "person"]);
        assert_eq!(tables["person"]["privacy_unit"].as_str(), Some("person_id"));
        assert!(tables["concept"].get("privacy_unit").is_none());
        assert!(text.contains("# privacy_unit = \"patient_id\""), "{text}");
        assert!(text.contains("# taken = { type = \"date\" }"), "{text}");
        assert!(text.contains("HELD: OMOP table provider"), "{text}");
        assert!(
            text.contains("README.txt: not a CSV or Parquet file"),
            "{text}"
        );
        // No bounds or domains guessed: only commented hints.
        assert!(
            text.contains("# year_of_birth = { bounds = [LOW, HIGH]"),
            "{text}"
        );
        assert!(
            tables["person"]["columns"]
                .as_table()
                .is_some_and(toml::Table::is_empty)
        );
    }
}
