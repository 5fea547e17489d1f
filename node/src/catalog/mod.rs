//! Loading the node's tables into DataFusion and describing them as a
//! public [`CatalogInfo`].
//!
//! Column names are normalised to lower case (GiBleed's CSVs have upper-case
//! headers, Synthea's lower-case). CSV columns get their declared type: the
//! config's `type`, else the OMOP CDM's, else text. A source that lacks a
//! declared or required column, or cannot be read, stops the node with a
//! message naming the file and the column.

use std::path::{Path, PathBuf};

use arrow::datatypes::{DataType, Field, Schema};
use confer_protocol::catalog::{
    CatalogInfo, ColumnInfo, ColumnType, Domain, DomainValue, TableInfo,
};
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};
use futures::StreamExt;
use tracing::info;

use crate::config::{ColumnConfig, DomainConfig, Format, NodeConfig, TableConfig};
use crate::error::{NodeError, Result};
use crate::omop;

mod sources;

use sources::*;

/// Registers every configured table in `ctx` and returns the public catalog.
pub async fn load(config: &NodeConfig, ctx: &SessionContext) -> Result<CatalogInfo> {
    let mut tables = Vec::new();
    for (name, table) in &config.tables {
        tables.push(load_table(ctx, name, table).await?);
    }
    tables.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(CatalogInfo {
        node: config.node.name.clone(),
        tables,
    })
}

/// The columns of the public tables that hold no value twice (NULLs
/// aside), measured on the node's own data: a join of person-level rows
/// with a public table on such a column matches each row at most once, so
/// one person cannot multiply a query's work through it (see
/// `confer_query::analyze::amplification`).
pub async fn unique_public_columns(
    ctx: &SessionContext,
    catalog: &CatalogInfo,
) -> Result<Vec<(String, String)>> {
    let mut unique = Vec::new();
    for table in catalog.tables.iter().filter(|t| !t.is_private()) {
        let candidates: Vec<&str> = table
            .columns
            .iter()
            .filter(|c| matches!(c.column_type, ColumnType::Int64 | ColumnType::Utf8))
            .map(|c| c.name.as_str())
            .collect();
        if candidates.is_empty() {
            continue;
        }
        let quote = |c: &str| format!("\"{}\"", c.replace('"', "\"\""));
        let counts: Vec<String> = candidates
            .iter()
            .map(|c| format!("count({}), count(DISTINCT {})", quote(c), quote(c)))
            .collect();
        let sql = format!("SELECT {} FROM {}", counts.join(", "), quote(&table.name));
        let batches = ctx.sql(&sql).await?.collect().await?;
        let Some(batch) = batches.first().filter(|b| b.num_rows() == 1) else {
            continue;
        };
        for (i, column) in candidates.iter().enumerate() {
            let value = |j: usize| {
                arrow::compute::cast(batch.column(j), &DataType::Int64)
                    .ok()
                    .and_then(|a| {
                        a.as_any()
                            .downcast_ref::<arrow::array::Int64Array>()
                            .map(|a| a.value(0))
                    })
            };
            if let (Some(all), Some(distinct)) = (value(2 * i), value(2 * i + 1))
                && all == distinct
            {
                unique.push((table.name.clone(), column.to_string()));
            }
        }
    }
    Ok(unique)
}

pub(crate) async fn load_table(
    ctx: &SessionContext,
    name: &str,
    table: &TableConfig,
) -> Result<TableInfo> {
    let source_err = |path: &Path, message: String| NodeError::Source {
        table: name.to_string(),
        path: path.display().to_string(),
        message,
    };
    let format = table.format(name)?;
    let files = source_files(&table.path, format).map_err(|m| source_err(&table.path, m))?;
    let first = files.first().ok_or_else(|| {
        source_err(
            &table.path,
            "the directory holds no files of this format".into(),
        )
    })?;

    // What the start-up probe reads: every CSV value, converted strictly.
    let mut probe = String::new();
    let schema = match format {
        Format::Csv => {
            let header = match &table.column_names {
                Some(names) if !table.header => {
                    let names: Vec<String> = names
                        .iter()
                        .map(|n| n.trim().to_ascii_lowercase())
                        .collect();
                    let width =
                        csv_width(first, table.delimiter).map_err(|m| source_err(first, m))?;
                    if width != names.len() {
                        return Err(source_err(
                            first,
                            format!(
                                "the first line has {width} fields but tables.{name}.column_names names {}",
                                names.len()
                            ),
                        ));
                    }
                    names
                }
                _ => read_csv_header(first, table.delimiter).map_err(|m| source_err(first, m))?,
            };
            let schema = csv_schema(name, &header, table).map_err(|m| source_err(first, m))?;
            // Columns with a null marker or a custom date format are read as
            // text and converted by a view, so a bad value fails the probe below.
            let as_text = |ty: &DataType| {
                *ty != DataType::Utf8
                    && (table.null_marker.is_some()
                        || matches!(ty, DataType::Date32) && table.date_format.is_some()
                        || matches!(ty, DataType::Timestamp(..)) && table.datetime_format.is_some())
            };
            let raw_schema = Schema::new(
                schema
                    .fields()
                    .iter()
                    .map(|f| {
                        if as_text(f.data_type()) {
                            Field::new(f.name(), DataType::Utf8, true)
                        } else {
                            f.as_ref().clone()
                        }
                    })
                    .collect::<Vec<_>>(),
            );
            let ext = extension_of(&table.path, first);
            let options = CsvReadOptions::new()
                .has_header(table.header)
                .delimiter(table.delimiter as u8)
                .schema(&raw_schema)
                .file_extension(&ext);
            if table.null_marker.is_none() && raw_schema == schema {
                ctx.register_csv(name, &path_str(&table.path), options)
                    .await
                    .map_err(|e| source_err(&table.path, format!("cannot register: {e}")))?;
                probe = format!("SELECT * FROM {name}");
            } else {
                let raw = format!("__confer_raw_{name}");
                ctx.register_csv(&raw, &path_str(&table.path), options)
                    .await
                    .map_err(|e| source_err(&table.path, format!("cannot register: {e}")))?;
                let select = |conversion| {
                    schema
                        .fields()
                        .iter()
                        .map(|f| convert_text_column(f, table, as_text(f.data_type()), conversion))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                probe = format!("SELECT {} FROM \"{raw}\"", select(Conversion::Strict));
                let select = select(Conversion::Total);
                let view = ctx
                    .sql(&format!("SELECT {select} FROM \"{raw}\""))
                    .await
                    .map_err(|e| source_err(&table.path, format!("cannot convert values: {e}")))?;
                ctx.register_table(name, view.into_view())
                    .map_err(|e| source_err(&table.path, format!("cannot register: {e}")))?;
            }
            schema
        }
        Format::Parquet => {
            let ext = extension_of(&table.path, first);
            let options = ParquetReadOptions::default().file_extension(&ext);
            ctx.register_parquet(name, &path_str(&table.path), options)
                .await
                .map_err(|e| source_err(&table.path, format!("cannot read Parquet: {e}")))?;
            let provider = ctx
                .table_provider(name)
                .await
                .map_err(|e| source_err(&table.path, e.to_string()))?;
            let schema = provider.schema().as_ref().clone();
            check_parquet_schema(name, &schema, table).map_err(|m| source_err(&table.path, m))?;
            check_parquet_types(name, &schema, table).map_err(|m| source_err(&table.path, m))?;
            schema
        }
    };

    let schema = if table.unit_from_row_number {
        number_rows(ctx, name, table, schema)
            .await
            .map_err(|m| source_err(&table.path, m))?
    } else {
        schema
    };

    // Text sources are parsed in full now, so that a value that does not
    // fit its column's type fails at start, not in the middle of a query
    // (batch by batch: memory stays bounded). Parquet stores types, checked
    // above; a first batch shows that the files can be decoded.
    let started = std::time::Instant::now();
    if format == Format::Parquet {
        probe = format!("SELECT * FROM {name} LIMIT 1000");
    }
    let bad_values = |e: datafusion::error::DataFusionError| {
        source_err(
            &table.path,
            format!(
                "values do not match the declared types ({}); fix the data or declare the column's type in node.toml",
                without_values(
                    &datafusion::error::DataFusionError::find_root(&e).to_string(),
                    &schema
                )
            ),
        )
    };
    let mut batches = ctx
        .sql(&probe)
        .await
        .map_err(|e| source_err(&table.path, e.to_string()))?
        .execute_stream()
        .await
        .map_err(bad_values)?;
    while let Some(batch) = batches.next().await {
        batch.map_err(bad_values)?;
    }
    info!(
        table = name,
        seconds = started.elapsed().as_secs_f64(),
        "source validated"
    );

    let mut columns = Vec::new();
    for field in schema.fields() {
        let column_type = column_type_of(field.data_type()).ok_or_else(|| {
            source_err(
                &table.path,
                format!(
                    "column {} has type {}, which confer does not support",
                    field.name(),
                    field.data_type()
                ),
            )
        })?;
        let decl = table.columns.get(field.name()).cloned().unwrap_or_default();
        columns.push(column_info(name, field.name(), column_type, &decl)?);
    }
    if let Some(unit) = &table.privacy_unit
        && !columns.iter().any(|c| &c.name == unit)
    {
        return Err(NodeError::Config(format!(
            "tables.{name}.privacy_unit = {unit:?}: the source has no such column"
        )));
    }
    let declared_one_row = table
        .one_row_per_unit
        .or(table.unit_from_row_number.then_some(true));
    let one_row_per_unit = match (&table.privacy_unit, declared_one_row) {
        (None, Some(true)) => {
            return Err(NodeError::Config(format!(
                "tables.{name}.one_row_per_unit needs a privacy_unit: public tables have no persons"
            )));
        }
        (None, _) => false,
        (Some(unit), declared) => {
            let expect = declared.unwrap_or(name == "person" && unit == "person_id");
            if expect {
                check_one_row_per_unit(ctx, name, unit)
                    .await
                    .map_err(|m| source_err(&table.path, m))?;
            }
            expect
        }
    };
    for column in columns.iter().filter(|c| c.unique) {
        let (rows, distinct) = distinct_counts(ctx, name, &column.name)
            .await
            .map_err(|m| source_err(&table.path, m))?;
        if rows != distinct {
            return Err(source_err(
                &table.path,
                format!(
                    "columns.{col}.unique: {rows} non-NULL values but only {distinct} distinct ones; \
                     fix the data, or drop unique = true for {col} in node.toml",
                    col = column.name
                ),
            ));
        }
    }
    Ok(TableInfo {
        name: name.to_string(),
        privacy_unit: table.privacy_unit.clone(),
        columns,
        one_row_per_unit,
    })
}

/// Verifies that no person has two rows (the DP compiler relies on it).
async fn check_one_row_per_unit(
    ctx: &SessionContext,
    table: &str,
    unit: &str,
) -> std::result::Result<(), String> {
    let (rows, persons) = distinct_counts(ctx, table, unit).await?;
    if rows != persons {
        return Err(format!(
            "one_row_per_unit: {rows} rows hold only {persons} distinct {unit} values; fix the data, or set \
             one_row_per_unit = false for this table in node.toml"
        ));
    }
    Ok(())
}

/// The non-NULL values of `column` and how many of them are distinct.
async fn distinct_counts(
    ctx: &SessionContext,
    table: &str,
    column: &str,
) -> std::result::Result<(i64, i64), String> {
    let sql = format!(
        "SELECT CAST(COUNT(*) AS BIGINT), CAST(COUNT(DISTINCT \"{column}\") AS BIGINT) FROM \"{table}\" WHERE \"{column}\" IS NOT NULL"
    );
    let batches = ctx
        .sql(&sql)
        .await
        .map_err(|e| e.to_string())?
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let value = |col: usize| {
        batches
            .first()
            .and_then(|b| {
                b.column(col)
                    .as_any()
                    .downcast_ref::<arrow::array::Int64Array>()
                    .map(|a| a.value(0))
            })
            .unwrap_or(0)
    };
    Ok((value(0), value(1)))
}

pub(crate) fn column_type_of(ty: &DataType) -> Option<ColumnType> {
    Some(match ty {
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32 => ColumnType::Int64,
        DataType::Float16 | DataType::Float32 | DataType::Float64 | DataType::Decimal128(_, _) => {
            ColumnType::Float64
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => ColumnType::Utf8,
        DataType::Date32 | DataType::Date64 => ColumnType::Date,
        DataType::Timestamp(_, _) => ColumnType::Timestamp,
        DataType::Boolean => ColumnType::Boolean,
        _ => return None,
    })
}

fn column_info(
    table: &str,
    name: &str,
    column_type: ColumnType,
    decl: &ColumnConfig,
) -> Result<ColumnInfo> {
    let field = format!("tables.{table}.columns.{name}");
    if decl.bounds.is_some() && !column_type.is_numeric() {
        return Err(NodeError::Config(format!(
            "{field}.bounds: bounds need a numeric column, and {name} is {column_type}"
        )));
    }
    let domain = match &decl.domain {
        None => None,
        Some(DomainConfig::Range { from, to }) => {
            if column_type != ColumnType::Int64 {
                return Err(NodeError::Config(format!(
                    "{field}.domain: a from/to range needs an integer column, and {name} is {column_type}"
                )));
            }
            Some(Domain::Range { lo: *from, hi: *to })
        }
        Some(DomainConfig::Values(values)) => {
            for v in values {
                let fits = matches!(
                    (column_type, v),
                    (ColumnType::Int64, DomainValue::Int(_))
                        | (ColumnType::Utf8, DomainValue::Text(_))
                );
                if !fits {
                    return Err(NodeError::Config(format!(
                        "{field}.domain: value {v} does not match the column type {column_type}"
                    )));
                }
            }
            let mut sorted = values.clone();
            sorted.sort();
            sorted.dedup();
            if sorted.len() != values.len() {
                return Err(NodeError::Config(format!(
                    "{field}.domain lists a value twice"
                )));
            }
            Some(Domain::Values {
                values: values.clone(),
            })
        }
    };
    Ok(ColumnInfo {
        name: name.to_string(),
        column_type,
        bounds: decl.bounds.map(|[lo, hi]| (lo, hi)),
        domain,
        unique: decl.unique,
    })
}

/// Checks a node's `[supervision]` units against its data: the
/// supervision statistics group `visit_occurrence` by `care_site_id`, so
/// that column needs a public domain holding every care site listed, and
/// each listed care site must be in the node's `care_site` table (when it
/// publishes one).
pub async fn check_supervision(
    ctx: &SessionContext,
    catalog: &CatalogInfo,
    section: &crate::config::SupervisionSection,
) -> Result<()> {
    let visits = catalog.table("visit_occurrence").ok_or_else(|| {
        NodeError::Config(
            "[supervision] needs a visit_occurrence table: supervision statistics count visits by care_site_id"
                .into(),
        )
    })?;
    let domain = visits
        .column("care_site_id")
        .and_then(|c| c.domain.as_ref())
        .ok_or_else(|| {
            NodeError::Config(
                "[supervision] needs a public domain on visit_occurrence.care_site_id (for example \
                 care_site_id = { domain = { from = 1, to = 700 } } under [tables.visit_occurrence.columns], \
                 the care_site_ids of the whole region, the same at every node)"
                    .into(),
            )
        })?;
    let values = domain.values();
    let mut known = None;
    if catalog.table("care_site").is_some() {
        let batches = ctx
            .sql("SELECT DISTINCT CAST(care_site_id AS BIGINT) FROM care_site WHERE care_site_id IS NOT NULL")
            .await?
            .collect()
            .await?;
        let mut ids = std::collections::BTreeSet::new();
        for b in &batches {
            if let Some(a) = b
                .column(0)
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
            {
                ids.extend(a.iter().flatten());
            }
        }
        known = Some(ids);
    }
    for (code, sites) in &section.units {
        for id in sites {
            if !values.contains(&DomainValue::Int(*id)) {
                return Err(NodeError::Config(format!(
                    "supervision.units.\"{code}\": care_site_id {id} is outside the domain of \
                     visit_occurrence.care_site_id: add it to that domain"
                )));
            }
            if let Some(ids) = &known
                && !ids.contains(id)
            {
                return Err(NodeError::Config(format!(
                    "supervision.units.\"{code}\": care_site_id {id} is not in this node's care_site table: \
                     fix the id, or add the care site to the table"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_errors_lose_their_values() {
        let schema = Schema::new(vec![
            Field::new("person_id", DataType::Int64, true),
            Field::new("year_of_birth", DataType::Int64, true),
        ]);
        let csv = "Arrow error: Parser error: Error while parsing value 'x1' as type 'Int64' for \
                   column 1 at line 7. Row data: '[3,x1]'";
        assert_eq!(
            without_values(csv, &schema),
            "line 7, column year_of_birth: a value that is not a valid Int64 (not shown)"
        );
        let quoted = "Error parsing timestamp from '31/12/2020' using format '%Y'";
        assert_eq!(
            without_values(quoted, &schema),
            "Error parsing timestamp from '…' using format '…'"
        );
        let apostrophe = "cannot parse 'O'Brien' here";
        assert_eq!(without_values(apostrophe, &schema), "cannot parse '…'");
    }
}

/// The files of a table as they are now: each file's path, device and
/// inode, size, modification time and change time (the change time, with
/// nanoseconds, is set by the kernel on every write or replacement and no
/// tool can set it back, unlike the modification time that `cp -p` or
/// `rsync -a` keep). The checks the node makes at start (one row per
/// person) hold for as long as these are unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamps(Vec<(PathBuf, FileStamp)>);

/// One file's identity and times.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

impl FileStamps {
    /// Reads the stamps of `table`'s files; `None` when they cannot be
    /// read (then nothing is trusted). Every file under a directory
    /// counts, in subdirectories too and of any extension (DataFusion
    /// lists a directory recursively): a file added anywhere there is a
    /// change.
    pub fn of(table: &TableConfig) -> Option<Self> {
        let mut stamps = Vec::new();
        let mut pending = vec![table.path.clone()];
        while let Some(path) = pending.pop() {
            let meta = std::fs::metadata(&path).ok()?;
            if meta.is_dir() {
                for entry in std::fs::read_dir(&path).ok()? {
                    pending.push(entry.ok()?.path());
                }
            } else {
                let stamp = FileStamp::of(&meta);
                stamps.push((path, stamp));
            }
        }
        stamps.sort();
        Some(Self(stamps))
    }
}

/// The stamps of every configured table that can be read.
pub fn config_stamps(config: &NodeConfig) -> std::collections::BTreeMap<String, FileStamps> {
    config
        .tables
        .iter()
        .filter_map(|(name, table)| Some((name.clone(), FileStamps::of(table)?)))
        .collect()
}

/// The stamps of every table declared (and checked at start) to hold one
/// row per person.
pub fn one_row_stamps(
    config: &NodeConfig,
    catalog: &CatalogInfo,
) -> std::collections::BTreeMap<String, FileStamps> {
    catalog
        .tables
        .iter()
        .filter(|t| t.one_row_per_unit && t.privacy_unit.is_some())
        .filter_map(|t| {
            let table = config.tables.get(&t.name)?;
            Some((t.name.clone(), FileStamps::of(table)?))
        })
        .collect()
}
