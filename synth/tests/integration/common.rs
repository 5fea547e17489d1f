use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use confer_synth::{Format, SynthOptions, SynthSummary, Tier, generate};
use datafusion::arrow::array::{Array, AsArray, RecordBatch, RecordBatchReader};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{Date32Type, Float64Type, Int64Type, TimestampMicrosecondType};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// The person-level tables.
pub const PERSON_TABLES: [&str; 9] = [
    "person",
    "observation_period",
    "visit_occurrence",
    "condition_occurrence",
    "drug_exposure",
    "procedure_occurrence",
    "measurement",
    "death",
    "cost",
];

/// The public tables.
pub const PUBLIC_TABLES: [&str; 5] = [
    "concept",
    "concept_ancestor",
    "care_site",
    "provider",
    "location",
];

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub out: PathBuf,
    pub summary: SynthSummary,
}

impl Fixture {
    pub fn site_dir(&self, name: &str) -> PathBuf {
        self.out.join(name)
    }

    pub fn sites_of(&self, tier: Tier) -> impl Iterator<Item = &confer_synth::SiteSummary> {
        self.summary.sites.iter().filter(move |s| s.tier == tier)
    }
}

/// A 5-site (1 tertiary, 1 county, 1 township, 2 villages) network of 2,000
/// residents, seed 7, Parquet.
pub fn network() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("net");
        let summary =
            generate(&options(&out, 5, 2000, 7, Format::Parquet), |_| {}).expect("generate");
        Fixture {
            _dir: dir,
            out,
            summary,
        }
    })
}

pub fn options(out: &Path, sites: usize, persons: u64, seed: u64, format: Format) -> SynthOptions {
    let mut o = SynthOptions::new(out);
    o.sites = sites;
    o.persons = persons;
    o.seed = seed;
    o.format = format;
    o
}

/// A whole Parquet table as one batch.
pub fn read(dir: &Path, table: &str) -> RecordBatch {
    let path = dir.join(format!("{table}.parquet"));
    let file = File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let schema = reader.schema();
    let batches: Vec<RecordBatch> = reader
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    concat_batches(&schema, &batches).expect("concat")
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> &'a dyn Array {
    batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"))
        .as_ref()
}

pub fn ints(batch: &RecordBatch, name: &str) -> Vec<Option<i64>> {
    column(batch, name)
        .as_primitive::<Int64Type>()
        .iter()
        .collect()
}

pub fn ints_req(batch: &RecordBatch, name: &str) -> Vec<i64> {
    ints(batch, name)
        .into_iter()
        .map(|v| v.unwrap_or_else(|| panic!("{name} is null")))
        .collect()
}

pub fn floats(batch: &RecordBatch, name: &str) -> Vec<Option<f64>> {
    column(batch, name)
        .as_primitive::<Float64Type>()
        .iter()
        .collect()
}

pub fn dates(batch: &RecordBatch, name: &str) -> Vec<Option<i32>> {
    column(batch, name)
        .as_primitive::<Date32Type>()
        .iter()
        .collect()
}

pub fn timestamps(batch: &RecordBatch, name: &str) -> Vec<Option<i64>> {
    column(batch, name)
        .as_primitive::<TimestampMicrosecondType>()
        .iter()
        .collect()
}

/// Every site's table, by site name.
pub fn all(table: &str) -> Vec<(String, RecordBatch)> {
    let net = network();
    net.summary
        .sites
        .iter()
        .map(|s| (s.name.clone(), read(&net.site_dir(&s.name), table)))
        .collect()
}

/// Visits of the whole network by id: (site, person, start datetime).
pub fn visits_by_id() -> HashMap<i64, (String, i64, i64)> {
    let mut out = HashMap::new();
    for (site, b) in all("visit_occurrence") {
        let ids = ints_req(&b, "visit_occurrence_id");
        let persons = ints_req(&b, "person_id");
        let starts = timestamps(&b, "visit_start_datetime");
        for i in 0..b.num_rows() {
            out.insert(
                ids[i],
                (site.clone(), persons[i], starts[i].expect("start datetime")),
            );
        }
    }
    out
}
