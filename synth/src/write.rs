//! Rows to files: per-chunk row buffers (filled on worker threads) and the
//! per-site, per-table Parquet or CSV writers (on the calling thread).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use datafusion::arrow::csv::{Writer as CsvWriter, WriterBuilder as CsvWriterBuilder};
use datafusion::arrow::datatypes::{DataType, Field, SchemaRef};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::parquet::schema::types::ColumnPath;

use crate::model::Sink;
use crate::schema::*;
use crate::{Format, Result, SynthError};

/// Rows per Parquet row group.
pub(crate) const ROW_GROUP_ROWS: usize = 256 * 1024;

/// The person-level tables, in the order their files are listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PersonTable {
    Person,
    ObservationPeriod,
    VisitOccurrence,
    ConditionOccurrence,
    DrugExposure,
    ProcedureOccurrence,
    Measurement,
    Death,
    Cost,
}

impl PersonTable {
    pub(crate) const ALL: [PersonTable; 9] = [
        PersonTable::Person,
        PersonTable::ObservationPeriod,
        PersonTable::VisitOccurrence,
        PersonTable::ConditionOccurrence,
        PersonTable::DrugExposure,
        PersonTable::ProcedureOccurrence,
        PersonTable::Measurement,
        PersonTable::Death,
        PersonTable::Cost,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            PersonTable::Person => PersonBuf::NAME,
            PersonTable::ObservationPeriod => ObservationPeriodBuf::NAME,
            PersonTable::VisitOccurrence => VisitOccurrenceBuf::NAME,
            PersonTable::ConditionOccurrence => ConditionOccurrenceBuf::NAME,
            PersonTable::DrugExposure => DrugExposureBuf::NAME,
            PersonTable::ProcedureOccurrence => ProcedureOccurrenceBuf::NAME,
            PersonTable::Measurement => MeasurementBuf::NAME,
            PersonTable::Death => DeathBuf::NAME,
            PersonTable::Cost => CostBuf::NAME,
        }
    }

    pub(crate) fn schema(self) -> SchemaRef {
        match self {
            PersonTable::Person => PersonBuf::schema(),
            PersonTable::ObservationPeriod => ObservationPeriodBuf::schema(),
            PersonTable::VisitOccurrence => VisitOccurrenceBuf::schema(),
            PersonTable::ConditionOccurrence => ConditionOccurrenceBuf::schema(),
            PersonTable::DrugExposure => DrugExposureBuf::schema(),
            PersonTable::ProcedureOccurrence => ProcedureOccurrenceBuf::schema(),
            PersonTable::Measurement => MeasurementBuf::schema(),
            PersonTable::Death => DeathBuf::schema(),
            PersonTable::Cost => CostBuf::schema(),
        }
    }
}

/// The public tables, written once per site before any person.
pub(crate) const PUBLIC_TABLES: [&str; 5] = [
    ConceptBuf::NAME,
    ConceptAncestorBuf::NAME,
    CareSiteBuf::NAME,
    ProviderBuf::NAME,
    LocationBuf::NAME,
];

/// One site's rows from one chunk of residents.
struct SiteBufs {
    person: PersonBuf,
    observation_period: ObservationPeriodBuf,
    visit: VisitOccurrenceBuf,
    condition: ConditionOccurrenceBuf,
    drug: DrugExposureBuf,
    procedure: ProcedureOccurrenceBuf,
    measurement: MeasurementBuf,
    death: DeathBuf,
    cost: CostBuf,
}

impl SiteBufs {
    fn new() -> Self {
        const N: usize = 64;
        Self {
            person: PersonBuf::with_capacity(N),
            observation_period: ObservationPeriodBuf::with_capacity(N),
            visit: VisitOccurrenceBuf::with_capacity(N),
            condition: ConditionOccurrenceBuf::with_capacity(N),
            drug: DrugExposureBuf::with_capacity(N),
            procedure: ProcedureOccurrenceBuf::with_capacity(N),
            measurement: MeasurementBuf::with_capacity(N),
            death: DeathBuf::with_capacity(N),
            cost: CostBuf::with_capacity(N),
        }
    }
}

/// A batch for one table of one site.
pub(crate) struct SiteBatch {
    pub(crate) site: usize,
    pub(crate) table: PersonTable,
    pub(crate) batch: RecordBatch,
}

/// The rows of one chunk of residents, by site.
pub(crate) struct ChunkSink {
    sites: Vec<Option<Box<SiteBufs>>>,
}

impl ChunkSink {
    pub(crate) fn new(sites: usize) -> Self {
        Self {
            sites: (0..sites).map(|_| None).collect(),
        }
    }

    fn site(&mut self, site: usize) -> &mut SiteBufs {
        self.sites[site].get_or_insert_with(|| Box::new(SiteBufs::new()))
    }

    /// The chunk as batches, in (site, table) order; empty tables are left out.
    pub(crate) fn finish(self) -> std::result::Result<Vec<SiteBatch>, ArrowError> {
        let mut out = Vec::new();
        for (site, bufs) in self.sites.into_iter().enumerate() {
            let Some(mut b) = bufs else { continue };
            macro_rules! take {
                ($buf:expr, $table:expr) => {
                    if $buf.len() > 0 {
                        out.push(SiteBatch {
                            site,
                            table: $table,
                            batch: $buf.finish()?,
                        });
                    }
                };
            }
            take!(b.person, PersonTable::Person);
            take!(b.observation_period, PersonTable::ObservationPeriod);
            take!(b.visit, PersonTable::VisitOccurrence);
            take!(b.condition, PersonTable::ConditionOccurrence);
            take!(b.drug, PersonTable::DrugExposure);
            take!(b.procedure, PersonTable::ProcedureOccurrence);
            take!(b.measurement, PersonTable::Measurement);
            take!(b.death, PersonTable::Death);
            take!(b.cost, PersonTable::Cost);
        }
        Ok(out)
    }
}

impl Sink for ChunkSink {
    fn person(&mut self, site: usize, row: Person) {
        self.site(site).person.push(row);
    }
    fn observation_period(&mut self, site: usize, row: ObservationPeriod) {
        self.site(site).observation_period.push(row);
    }
    fn visit(&mut self, site: usize, row: VisitOccurrence) {
        self.site(site).visit.push(row);
    }
    fn condition(&mut self, site: usize, row: ConditionOccurrence) {
        self.site(site).condition.push(row);
    }
    fn drug(&mut self, site: usize, row: DrugExposure) {
        self.site(site).drug.push(row);
    }
    fn procedure(&mut self, site: usize, row: ProcedureOccurrence) {
        self.site(site).procedure.push(row);
    }
    fn measurement(&mut self, site: usize, row: Measurement) {
        self.site(site).measurement.push(row);
    }
    fn death(&mut self, site: usize, row: Death) {
        self.site(site).death.push(row);
    }
    fn cost(&mut self, site: usize, row: Cost) {
        self.site(site).cost.push(row);
    }
}

/// A table file being written.
pub(crate) struct TableFile {
    path: PathBuf,
    inner: Inner,
    rows: u64,
}

enum Inner {
    Parquet(ArrowWriter<BufWriter<File>>),
    Csv(CsvWriter<BufWriter<File>>),
}

impl TableFile {
    /// Creates `dir/<table>.<ext>`.
    pub(crate) fn create(
        dir: &Path,
        table: &str,
        schema: SchemaRef,
        format: Format,
    ) -> Result<Self> {
        let path = dir.join(format!("{table}.{}", format.extension()));
        let file = File::create(&path).map_err(|e| SynthError::io(&path, e))?;
        let out = BufWriter::with_capacity(1 << 20, file);
        let inner = match format {
            Format::Parquet => {
                let mut props = WriterProperties::builder()
                    .set_compression(Compression::ZSTD(
                        ZstdLevel::try_new(1).map_err(|e| SynthError::parquet(&path, e))?,
                    ))
                    .set_max_row_group_row_count(Some(ROW_GROUP_ROWS));
                // Dictionaries pay for concept ids, codes and dates; for ids,
                // datetimes and amounts they only cost memory (each column
                // writer would hold a dictionary of up to 1 MiB and its hash
                // table per open file).
                for field in schema.fields() {
                    if !dictionary_worthwhile(field) {
                        props = props.set_column_dictionary_enabled(
                            ColumnPath::from(field.name().as_str()),
                            false,
                        );
                    }
                }
                let props = props.build();
                Inner::Parquet(
                    ArrowWriter::try_new(out, schema, Some(props))
                        .map_err(|e| SynthError::parquet(&path, e))?,
                )
            }
            Format::Csv => {
                let mut w = CsvWriterBuilder::new().with_header(true).build(out);
                // An empty batch writes the header line, so a table with no
                // rows is still a readable CSV file.
                w.write(&RecordBatch::new_empty(schema))
                    .map_err(|e| SynthError::arrow(&path, e))?;
                Inner::Csv(w)
            }
        };
        Ok(Self {
            path,
            inner,
            rows: 0,
        })
    }

    /// Appends a batch.
    pub(crate) fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        match &mut self.inner {
            Inner::Parquet(w) => w
                .write(batch)
                .map_err(|e| SynthError::parquet(&self.path, e))?,
            Inner::Csv(w) => w
                .write(batch)
                .map_err(|e| SynthError::arrow(&self.path, e))?,
        }
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Flushes and closes the file; returns its row count.
    pub(crate) fn close(self) -> Result<u64> {
        match self.inner {
            Inner::Parquet(w) => {
                let out = w
                    .into_inner()
                    .map_err(|e| SynthError::parquet(&self.path, e))?;
                finish_file(&self.path, out)?;
            }
            Inner::Csv(w) => finish_file(&self.path, w.into_inner())?,
        }
        Ok(self.rows)
    }
}

/// Whether a column has few enough distinct values for dictionary encoding.
fn dictionary_worthwhile(field: &Field) -> bool {
    let name = field.name().as_str();
    match field.data_type() {
        DataType::Timestamp(_, _) => false,
        DataType::Float64 => matches!(name, "range_low" | "range_high" | "quantity"),
        DataType::Int64 => {
            !name.ends_with("_id")
                || name.ends_with("_concept_id")
                || matches!(name, "provider_id" | "care_site_id" | "location_id")
        }
        _ => true,
    }
}

fn finish_file(path: &Path, out: BufWriter<File>) -> Result<()> {
    let file = out
        .into_inner()
        .map_err(|e| SynthError::io(path, e.into_error()))?;
    file.sync_all().map_err(|e| SynthError::io(path, e))
}

/// Writes one whole table to `dir` in one go.
pub(crate) fn write_table(
    dir: &Path,
    table: &str,
    batch: &RecordBatch,
    format: Format,
) -> Result<u64> {
    let mut f = TableFile::create(dir, table, batch.schema(), format)?;
    f.write(batch)?;
    f.close()
}

/// Writes a text file (node.toml, manifest.json).
pub(crate) fn write_text(path: &Path, text: &str) -> Result<()> {
    let mut f = File::create(path).map_err(|e| SynthError::io(path, e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| SynthError::io(path, e))
}
