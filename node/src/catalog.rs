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

async fn load_table(ctx: &SessionContext, name: &str, table: &TableConfig) -> Result<TableInfo> {
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
            } else {
                let raw = format!("__confer_raw_{name}");
                ctx.register_csv(&raw, &path_str(&table.path), options)
                    .await
                    .map_err(|e| source_err(&table.path, format!("cannot register: {e}")))?;
                let select = schema
                    .fields()
                    .iter()
                    .map(|f| convert_text_column(f, table, as_text(f.data_type())))
                    .collect::<Vec<_>>()
                    .join(", ");
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
    let probe = match format {
        Format::Csv => format!("SELECT * FROM {name}"),
        Format::Parquet => format!("SELECT * FROM {name} LIMIT 1000"),
    };
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
    let sql = format!(
        "SELECT CAST(COUNT(*) AS BIGINT), CAST(COUNT(DISTINCT \"{unit}\") AS BIGINT) FROM \"{table}\" WHERE \"{unit}\" IS NOT NULL"
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
    let (rows, persons) = (value(0), value(1));
    if rows != persons {
        return Err(format!(
            "one_row_per_unit: {rows} rows hold only {persons} distinct {unit} values; fix the data, or set \
             one_row_per_unit = false for this table in node.toml"
        ));
    }
    Ok(())
}

fn path_str(p: &Path) -> String {
    let s = p.display().to_string();
    if p.is_dir() && !s.ends_with('/') {
        format!("{s}/")
    } else {
        s
    }
}

/// The extension DataFusion should list: the file's own when the source is
/// one file (so `processed.cleveland.data` loads), else the format's.
fn extension_of(source: &Path, first: &Path) -> String {
    if source.is_file() {
        first
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default()
    } else {
        first
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_else(|| ".csv".into())
    }
}

fn source_files(path: &Path, format: Format) -> std::result::Result<Vec<PathBuf>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot open: {e}"))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let want = match format {
        Format::Csv => "csv",
        Format::Parquet => "parquet",
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| format!("cannot list: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case(want)))
        .collect();
    files.sort();
    Ok(files)
}

/// Serves table `name` with a first column numbering its rows (the privacy
/// unit of a one-row-per-person source without identifiers).
async fn number_rows(
    ctx: &SessionContext,
    name: &str,
    table: &TableConfig,
    schema: Schema,
) -> std::result::Result<Schema, String> {
    let unit = table.privacy_unit.as_deref().unwrap_or_default();
    if schema.field_with_name(unit).is_ok() {
        return Err(format!(
            "unit_from_row_number: the source already has a column {unit}; use it as privacy_unit and drop unit_from_row_number"
        ));
    }
    let rows = format!("__confer_rows_{name}");
    let provider = ctx
        .deregister_table(name)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("table {name} was not registered"))?;
    ctx.register_table(&rows, provider)
        .map_err(|e| e.to_string())?;
    let view = ctx
        .sql(&format!(
            "SELECT CAST(row_number() OVER () AS BIGINT) AS \"{unit}\", * FROM \"{rows}\""
        ))
        .await
        .map_err(|e| format!("cannot number the rows: {e}"))?;
    ctx.register_table(name, view.into_view())
        .map_err(|e| e.to_string())?;
    let mut fields = vec![Field::new(unit, DataType::Int64, false)];
    fields.extend(schema.fields().iter().map(|f| f.as_ref().clone()));
    Ok(Schema::new(fields))
}

/// The SQL that reads column `field` of a CSV view: the null marker
/// becomes NULL and text becomes the declared type (in the declared date
/// format). DataFusion 55's CSV scan ignores `null_regex`, hence the view.
fn convert_text_column(field: &Field, table: &TableConfig, from_text: bool) -> String {
    let quote = |s: &str| s.replace('\'', "''");
    let column = format!("\"{}\"", field.name());
    let mut expr = column.clone();
    if let Some(marker) = &table.null_marker {
        expr = format!("NULLIF({expr}, '{}')", quote(marker));
    }
    if from_text {
        expr = match (
            field.data_type(),
            &table.date_format,
            &table.datetime_format,
        ) {
            (DataType::Date32, Some(fmt), _) => format!("to_date({expr}, '{}')", quote(fmt)),
            (DataType::Timestamp(..), _, Some(fmt)) => format!(
                "arrow_cast(to_timestamp_micros({expr}, '{}'), 'Timestamp(Microsecond, None)')",
                quote(fmt)
            ),
            (DataType::Timestamp(..), _, None) => {
                format!("arrow_cast({expr}, 'Timestamp(Microsecond, None)')")
            }
            (ty, _, _) => format!("arrow_cast({expr}, '{ty}')"),
        };
    }
    format!("{expr} AS {column}")
}

/// The number of fields on the first line of a CSV file without a header.
fn csv_width(path: &Path, delimiter: char) -> std::result::Result<usize, String> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter as u8)
        .has_headers(false)
        .from_path(path)
        .map_err(|e| format!("cannot read: {e}"))?;
    match reader.records().next() {
        Some(Ok(record)) => Ok(record.len()),
        Some(Err(e)) => Err(format!("cannot read the first line: {e}")),
        None => Err("the file is empty".into()),
    }
}

fn read_csv_header(path: &Path, delimiter: char) -> std::result::Result<Vec<String>, String> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter as u8)
        .has_headers(true)
        .from_path(path)
        .map_err(|e| format!("cannot read: {e}"))?;
    let header = reader
        .headers()
        .map_err(|e| format!("cannot read the header line: {e}"))?;
    let names: Vec<String> = header
        .iter()
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    if names.is_empty() || names.iter().all(String::is_empty) {
        return Err("the file is empty or has no header line".into());
    }
    for (i, n) in names.iter().enumerate() {
        if n.is_empty() {
            return Err(format!("header column {} has no name", i + 1));
        }
        if names[..i].contains(n) {
            return Err(format!("header names column {n} twice"));
        }
    }
    Ok(names)
}

/// The schema of a CSV source: header order, declared types.
fn csv_schema(
    table: &str,
    header: &[String],
    config: &TableConfig,
) -> std::result::Result<Schema, String> {
    let omop = omop::table(table);
    if let Some(cols) = &omop {
        let missing: Vec<&str> = cols
            .iter()
            .filter(|c| c.required && !header.iter().any(|h| h == c.name))
            .map(|c| c.name)
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "the header lacks the OMOP CDM column(s) {} that table {table} requires; found: {}",
                missing.join(", "),
                header.join(", ")
            ));
        }
    }
    for declared in config.columns.keys() {
        if !header.iter().any(|h| h == declared) {
            return Err(format!(
                "tables.{table}.columns.{declared} is declared but the header has no such column; found: {}",
                header.join(", ")
            ));
        }
    }
    let mut fields = Vec::with_capacity(header.len());
    for name in header {
        let declared = config
            .columns
            .get(name)
            .and_then(|c| c.column_type.as_deref());
        let ty = match declared {
            Some(t) => ColumnType::parse(t).ok_or_else(|| {
                format!(
                    "tables.{table}.columns.{name}.type = {t:?} is not a type: use int64, float64, utf8, date, timestamp or boolean"
                )
            })?,
            None => omop
                .as_ref()
                .and_then(|cols| cols.iter().find(|c| c.name == name))
                .map(|c| c.column_type)
                .unwrap_or(ColumnType::Utf8),
        };
        fields.push(Field::new(name, ty.arrow_type(), true));
    }
    Ok(Schema::new(fields))
}

fn check_parquet_schema(
    table: &str,
    schema: &Schema,
    config: &TableConfig,
) -> std::result::Result<(), String> {
    for f in schema.fields() {
        if f.name() != &f.name().to_ascii_lowercase() {
            return Err(format!(
                "column {} is not lower case: write Parquet columns in lower case",
                f.name()
            ));
        }
    }
    for declared in config.columns.keys() {
        if schema.field_with_name(declared).is_err() {
            return Err(format!(
                "tables.{table}.columns.{declared} is declared but the file has no such column"
            ));
        }
    }
    if let Some(cols) = omop::table(table) {
        let missing: Vec<&str> = cols
            .iter()
            .filter(|c| c.required && schema.field_with_name(c.name).is_err())
            .map(|c| c.name)
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "the file lacks the OMOP CDM column(s) {} that table {table} requires",
                missing.join(", ")
            ));
        }
    }
    Ok(())
}

/// A reader's error without the values it quotes (logs and errors never
/// carry row data): where it is arrow-csv's parse error, the line, column
/// and type; otherwise every quoted span is elided.
fn without_values(message: &str, schema: &Schema) -> String {
    let parsed = (|| {
        let rest = message.split_once("Error while parsing value '")?.1;
        let (_, rest) = rest.split_once("' as type '")?;
        let (ty, rest) = rest.split_once("' for column ")?;
        let (column, rest) = rest.split_once(" at line ")?;
        let line: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let index: usize = column.trim().parse().ok()?;
        let name = schema.fields().get(index).map(|f| f.name().as_str())?;
        Some(format!(
            "line {line}, column {name}: a value that is not a valid {ty} (not shown)"
        ))
    })();
    parsed.unwrap_or_else(|| {
        // Unbalanced quotes (a value with an apostrophe) would misalign the
        // pairs: then everything after the first quote is elided.
        if message.matches('\'').count() % 2 == 1 {
            let head = message.split('\'').next().unwrap_or_default();
            return format!("{head}'…'");
        }
        message
            .split('\'')
            .enumerate()
            .map(|(i, part)| if i % 2 == 1 { "…" } else { part })
            .collect::<Vec<_>>()
            .join("'")
    })
}

/// Each Parquet column's stored type must be the one node.toml declares
/// for it, else the OMOP CDM's (integers may stand for floats, dates and
/// timestamps for each other): a column of the wrong type would fail
/// queries later, or compare as text.
fn check_parquet_types(
    table: &str,
    schema: &Schema,
    config: &TableConfig,
) -> std::result::Result<(), String> {
    let omop = omop::table(table);
    for field in schema.fields() {
        let name = field.name();
        // Unsupported types get their own message when columns are listed.
        let Some(stored) = column_type_of(field.data_type()) else {
            continue;
        };
        let declared = config
            .columns
            .get(name)
            .and_then(|c| c.column_type.as_deref());
        let (expected, whose) = match declared {
            Some(t) => (
                ColumnType::parse(t).ok_or_else(|| {
                    format!(
                        "tables.{table}.columns.{name}.type = {t:?} is not a type: use int64, float64, utf8, date, timestamp or boolean"
                    )
                })?,
                format!("tables.{table}.columns.{name}.type declares"),
            ),
            None => match omop.as_ref().and_then(|cols| cols.iter().find(|c| c.name == name)) {
                Some(c) => (c.column_type, format!("the OMOP CDM defines {table}.{name} as")),
                None => continue,
            },
        };
        let fits = stored == expected
            || matches!(
                (stored, expected),
                (ColumnType::Int64, ColumnType::Float64)
                    | (ColumnType::Date, ColumnType::Timestamp)
                    | (ColumnType::Timestamp, ColumnType::Date)
            );
        if !fits {
            return Err(format!(
                "column {name} is stored as {} ({stored}), but {whose} {expected}: rewrite the column as \
                 {expected}{}",
                field.data_type(),
                if declared.is_some() {
                    format!(", or declare {stored}")
                } else {
                    format!(
                        ", or declare its type as tables.{table}.columns.{name}.type in node.toml"
                    )
                }
            ));
        }
    }
    Ok(())
}

fn column_type_of(ty: &DataType) -> Option<ColumnType> {
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
    })
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
