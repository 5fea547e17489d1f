//! Every dataset the repository ships a config for loads through the node's
//! catalog, and broken catalogs are refused with the file, column and problem.

use std::path::{Path, PathBuf};

use confer_node::NodeConfig;
use confer_protocol::catalog::{CatalogInfo, ColumnType};
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::prelude::SessionContext;

const KEY: &str = "c3265eaebc30ff2a54fe44a7b11ae19ef1d05bc012cf9acf03a9615e7222d361";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// An example config as the repository ships it, with a throwaway state
/// directory, an inline coordinator key and a free port.
fn example(relative: &str, state: &Path) -> (String, PathBuf) {
    let path = repo().join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{relative}: {e}"));
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("coordinator_key_file") {
                format!("coordinator_key = \"{KEY}\"")
            } else if l.starts_with("state_dir") {
                format!("state_dir = {:?}", state.display().to_string())
            } else if l.starts_with("listen") {
                "listen = \"127.0.0.1:0\"".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    (text, path.parent().expect("a directory").to_path_buf())
}

async fn load_in(text: &str, base: &Path, ctx: &SessionContext) -> Result<CatalogInfo, String> {
    let config = NodeConfig::parse(text, base).map_err(|e| e.to_string())?;
    confer_node::catalog::load(&config, ctx)
        .await
        .map_err(|e| e.to_string())
}

async fn load(text: &str, base: &Path) -> Result<CatalogInfo, String> {
    load_in(text, base, &SessionContext::new()).await
}

/// The first row of a one-row result, as text cells.
async fn row(ctx: &SessionContext, sql: &str) -> Vec<String> {
    let batches = ctx
        .sql(sql)
        .await
        .expect("plan")
        .collect()
        .await
        .expect("run");
    let text = pretty_format_batches(&batches).expect("format").to_string();
    text.lines()
        .nth(3)
        .expect("a row")
        .split('|')
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect()
}

#[tokio::test]
async fn the_uci_heart_centres_load_as_four_nodes() {
    let state = tempfile::tempdir().expect("tempdir");
    let mut rows = 0;
    for (site, want) in [
        ("cleveland", 303),
        ("hungary", 294),
        ("switzerland", 123),
        ("va-long-beach", 200),
    ] {
        let (text, base) = example(
            &format!("examples/datasets/uci-heart/{site}.toml"),
            state.path(),
        );
        let ctx = SessionContext::new();
        let info = load_in(&text, &base, &ctx)
            .await
            .unwrap_or_else(|e| panic!("{site}: {e}"));
        let heart = info.table("heart").expect("heart");
        assert_eq!(heart.privacy_unit.as_deref(), Some("patient"));
        assert!(heart.one_row_per_unit);
        assert_eq!(heart.columns.len(), 15, "patient + 14 columns");
        assert_eq!(
            heart.column("chol").map(|c| c.column_type),
            Some(ColumnType::Float64)
        );
        // Rows are numbered 1..n; "?" reads as missing, not as an error.
        let got = row(
            &ctx,
            "SELECT COUNT(*), COUNT(DISTINCT patient), MIN(patient), MAX(patient), COUNT(ca) FROM heart",
        )
        .await;
        let n = want.to_string();
        assert_eq!(
            got[..4],
            [n.clone(), n, "1".into(), want.to_string()],
            "{site}"
        );
        let with_ca: i64 = got[4].parse().expect("a count");
        assert!(with_ca < want, "{site}: ca has missing values");
        rows += want;
    }
    assert_eq!(rows, 920);
}

#[tokio::test]
async fn synthea27nj_loads_with_lower_case_headers() {
    let dir = repo().join("build/data/synthea27nj");
    assert!(
        dir.join(".complete").is_file(),
        "{} is missing: run deploy/bootstrap.sh (make does) to unzip Synthea27Nj",
        dir.display()
    );
    let state = tempfile::tempdir().expect("tempdir");
    let (text, base) = example("examples/datasets/synthea27nj.toml", state.path());
    let info = load(&text, &base).await.expect("synthea27nj loads");
    for table in ["person", "visit_occurrence", "measurement", "concept"] {
        assert!(info.table(table).is_some(), "{table}");
    }
    let person = info.table("person").expect("person");
    assert!(person.one_row_per_unit);
    assert_eq!(
        person.column("birth_datetime").map(|c| c.column_type),
        Some(ColumnType::Timestamp)
    );
}

#[tokio::test]
async fn gibleed_loads_with_upper_case_headers() {
    let state = tempfile::tempdir().expect("tempdir");
    let (text, base) = example("examples/node.toml", state.path());
    let info = load(&text, &base).await.expect("GiBleed loads");
    let person = info.table("person").expect("person");
    assert!(
        person
            .columns
            .iter()
            .all(|c| c.name == c.name.to_ascii_lowercase())
    );
}

/// A small CSV file and a node config over it, to break one thing at a time.
fn broken(csv: &str, table_toml: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("t.csv"), csv).expect("write");
    let text = format!(
        "[node]\nname = \"n\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"\ncoordinator_key = \"{KEY}\"\n{table_toml}"
    );
    (dir, text)
}

#[tokio::test]
async fn broken_catalogs_are_refused_naming_file_column_and_problem() {
    let header = "person_id,gender_concept_id,year_of_birth,race_concept_id,ethnicity_concept_id";
    let person_csv = format!("{header}\n1,8507,1950,0,0\n2,8532,1961,0,0\n");
    let person = "[tables.person]\npath = \"t.csv\"\nprivacy_unit = \"person_id\"\n";
    let cases: Vec<(String, String, &str)> = vec![
        // A column OMOP requires is missing.
        (
            "person_id,year_of_birth\n1,1950\n".into(),
            person.into(),
            "lacks the OMOP CDM column(s) gender_concept_id",
        ),
        // A value of the wrong type.
        (
            format!("{header}\n1,male,1950,0,0\n"),
            person.into(),
            "values do not match the declared types",
        ),
        // The file is not there.
        (
            person_csv.clone(),
            person.replace("t.csv", "nope.csv"),
            "nope.csv",
        ),
        // A declared column the file lacks.
        (
            person_csv.clone(),
            format!("{person}[tables.person.columns]\nyob = {{ bounds = [1900, 2000] }}\n"),
            "tables.person.columns.yob is declared but the header has no such column",
        ),
        // Bounds upside down.
        (
            person_csv.clone(),
            format!(
                "{person}[tables.person.columns]\nyear_of_birth = {{ bounds = [2000, 1900] }}\n"
            ),
            "the lower bound must not exceed the upper",
        ),
        // A text domain on an integer column.
        (
            person_csv.clone(),
            format!(
                "{person}[tables.person.columns]\ngender_concept_id = {{ domain = [\"M\", \"F\"] }}\n"
            ),
            "gender_concept_id",
        ),
        // An unknown type.
        (
            "id,score\n1,2\n".into(),
            "[tables.scores]\npath = \"t.csv\"\nprivacy_unit = \"id\"\n[tables.scores.columns]\nscore = { type = \"money\" }\n".into(),
            "is not a type: use int64, float64, utf8, date, timestamp or boolean",
        ),
        // No header, and column_names of the wrong width.
        (
            "1,2,3\n".into(),
            "[tables.scores]\npath = \"t.csv\"\nheader = false\ncolumn_names = [\"id\", \"score\"]\nprivacy_unit = \"id\"\n".into(),
            "the first line has 3 fields but tables.scores.column_names names 2",
        ),
        // A date in another format than declared.
        (
            "id,day\n1,31/12/2020\n".into(),
            "[tables.visits]\npath = \"t.csv\"\nprivacy_unit = \"id\"\ndate_format = \"%Y%m%d\"\n[tables.visits.columns]\nday = { type = \"date\" }\n".into(),
            "values do not match the declared types",
        ),
        // A typo in the table section.
        (
            person_csv.clone(),
            person.replace("privacy_unit", "privacy_unti"),
            "unknown field `privacy_unti`",
        ),
        // A person table with a person twice.
        (
            format!("{header}\n1,8507,1950,0,0\n1,8532,1961,0,0\n"),
            person.into(),
            "person_id",
        ),
        // A bad value far down the file (the whole file is parsed at start).
        (
            format!(
                "{header}\n{}20000,8507,unknown,0,0\n",
                (0..20_000)
                    .map(|p| format!("{p},8507,1950,0,0\n"))
                    .collect::<String>()
            ),
            person.into(),
            "values do not match the declared types",
        ),
    ];
    let mut failures = Vec::new();
    for (csv, table, want) in &cases {
        let (dir, text) = broken(csv, table);
        match load(&text, dir.path()).await {
            Ok(_) => failures.push(format!("accepted:\n{table}")),
            Err(e) if e.contains(want) => {}
            Err(e) => failures.push(format!("{table}\n  gave: {e}\n  want: {want}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Writes one Parquet file `t.parquet` with the given columns.
fn write_parquet(dir: &Path, columns: Vec<(&str, arrow::array::ArrayRef)>) {
    use arrow::array::RecordBatch;
    use datafusion::parquet::arrow::ArrowWriter;
    let batch = RecordBatch::try_from_iter(columns).expect("batch");
    let file = std::fs::File::create(dir.join("t.parquet")).expect("create");
    let mut writer = ArrowWriter::try_new(file, batch.schema(), None).expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");
}

#[tokio::test]
async fn parquet_columns_of_the_wrong_type_are_refused() {
    use arrow::array::{ArrayRef, Int32Array, Int64Array, StringArray};
    use std::sync::Arc;
    let ids: ArrayRef = Arc::new(Int64Array::from(vec![1, 2]));
    let concept: ArrayRef = Arc::new(Int32Array::from(vec![8507, 8532]));
    let years_text: ArrayRef = Arc::new(StringArray::from(vec!["1950", "1961"]));
    let years: ArrayRef = Arc::new(Int32Array::from(vec![1950, 1961]));
    let person = |dir: &Path, year: &ArrayRef| {
        write_parquet(
            dir,
            vec![
                ("person_id", ids.clone()),
                ("gender_concept_id", concept.clone()),
                ("year_of_birth", year.clone()),
                ("race_concept_id", concept.clone()),
                ("ethnicity_concept_id", concept.clone()),
            ],
        )
    };
    let config = |tables: &str| {
        format!(
            "[node]\nname = \"n\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"\ncoordinator_key = \"{KEY}\"\n{tables}"
        )
    };
    let person_table = "[tables.person]\npath = \"t.parquet\"\nprivacy_unit = \"person_id\"\n";

    // OMOP's int64 year of birth stored as text.
    let dir = tempfile::tempdir().expect("tempdir");
    person(dir.path(), &years_text);
    let err = load(&config(person_table), dir.path())
        .await
        .expect_err("text years");
    assert!(
        err.contains("t.parquet")
            && err.contains("column year_of_birth is stored as Utf8")
            && err.contains("the OMOP CDM defines person.year_of_birth as int64"),
        "{err}"
    );

    // A declared type the file does not have.
    let dir = tempfile::tempdir().expect("tempdir");
    person(dir.path(), &years);
    let declared =
        format!("{person_table}[tables.person.columns]\nyear_of_birth = {{ type = \"date\" }}\n");
    let err = load(&config(&declared), dir.path())
        .await
        .expect_err("declared date");
    assert!(
        err.contains("column year_of_birth is stored as Int32 (int64), but tables.person.columns.year_of_birth.type declares date"),
        "{err}"
    );

    // Narrower integers stand for OMOP's int64: accepted as such.
    let catalog = load(&config(person_table), dir.path())
        .await
        .expect("int32 columns load");
    let year = catalog.tables[0]
        .columns
        .iter()
        .find(|c| c.name == "year_of_birth")
        .expect("year");
    assert_eq!(year.column_type, ColumnType::Int64);
}

#[tokio::test]
async fn custom_date_formats_and_null_markers_are_read() {
    let (dir, text) = broken(
        "id;day;at;score\n1;31/12/2020;31/12/2020 10:30;NA\n2;01/02/2021;01/02/2021 08:00;7\n",
        "[tables.visits]\npath = \"t.csv\"\nprivacy_unit = \"id\"\ndelimiter = \";\"\nnull_marker = \"NA\"\n\
         date_format = \"%d/%m/%Y\"\ndatetime_format = \"%d/%m/%Y %H:%M\"\n[tables.visits.columns]\n\
         id = { type = \"int64\" }\nday = { type = \"date\" }\nat = { type = \"timestamp\" }\nscore = { type = \"float64\" }\n",
    );
    let ctx = SessionContext::new();
    load_in(&text, dir.path(), &ctx).await.expect("loads");
    let got = row(
        &ctx,
        "SELECT CAST(MAX(day) AS VARCHAR), CAST(MIN(at) AS VARCHAR), COUNT(score) FROM visits",
    )
    .await;
    assert_eq!(got[0], "2021-02-01");
    assert!(got[1].starts_with("2020-12-31T10:30:00"), "{got:?}");
    assert_eq!(got[2], "1");
}
