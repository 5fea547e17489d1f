//! Reading a table's files: which files a source names, CSV headers and
//! declared types, Parquet schemas checked against the declaration.

use super::*;

pub(super) fn path_str(p: &Path) -> String {
    let s = p.display().to_string();
    if p.is_dir() && !s.ends_with('/') {
        format!("{s}/")
    } else {
        s
    }
}

/// The extension DataFusion should list: the file's own when the source is
/// one file (so `processed.cleveland.data` loads), else the format's.
pub(super) fn extension_of(source: &Path, first: &Path) -> String {
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

pub(super) fn source_files(
    path: &Path,
    format: Format,
) -> std::result::Result<Vec<PathBuf>, String> {
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
/// unit of a one-row-per-person source without identifiers). The number is
/// converted with TRY_CAST: a row number always fits a BIGINT, and every
/// DP query's local plan, this view included, must pass the check that no
/// expression can fail on a row.
pub(super) async fn number_rows(
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
            "SELECT TRY_CAST(row_number() OVER () AS BIGINT) AS \"{unit}\", * FROM \"{rows}\""
        ))
        .await
        .map_err(|e| format!("cannot number the rows: {e}"))?;
    ctx.register_table(name, view.into_view())
        .map_err(|e| e.to_string())?;
    let mut fields = vec![Field::new(unit, DataType::Int64, false)];
    fields.extend(schema.fields().iter().map(|f| f.as_ref().clone()));
    Ok(Schema::new(fields))
}

/// How a CSV view converts text to a column's declared type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Conversion {
    /// Fails on a value that does not convert: the probe at start, so that
    /// such a value stops the node with a message naming the column.
    Strict,
    /// Never fails (TRY_CAST) where SQL can name the type: the view that
    /// DP queries read, since every expression of a DP query's local plan,
    /// the views it reads included, must be checked never to fail on a row
    /// (the probe has shown that every value converts).
    Total,
}

/// The SQL that reads column `field` of a CSV view: the null marker
/// becomes NULL and text becomes the declared type (in the declared date
/// format). DataFusion 55's CSV scan ignores `null_regex`, hence the view.
/// Dates in a custom format and timestamps are converted by functions that
/// fail on bad text either way (DataFusion has no total form of them).
pub(super) fn convert_text_column(
    field: &Field,
    table: &TableConfig,
    from_text: bool,
    conversion: Conversion,
) -> String {
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
            (ty, _, _) => match (conversion, sql_type(ty)) {
                (Conversion::Total, Some(sql)) => format!("TRY_CAST({expr} AS {sql})"),
                _ => format!("arrow_cast({expr}, '{ty}')"),
            },
        };
    }
    format!("{expr} AS {column}")
}

/// The SQL name of a declared column type DataFusion plans as that type.
fn sql_type(ty: &DataType) -> Option<&'static str> {
    Some(match ty {
        DataType::Int64 => "BIGINT",
        DataType::Float64 => "DOUBLE",
        DataType::Boolean => "BOOLEAN",
        DataType::Utf8 => "VARCHAR",
        DataType::Date32 => "DATE",
        _ => return None,
    })
}

/// The number of fields on the first line of a CSV file without a header.
pub(super) fn csv_width(path: &Path, delimiter: char) -> std::result::Result<usize, String> {
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

pub(crate) fn read_csv_header(
    path: &Path,
    delimiter: char,
) -> std::result::Result<Vec<String>, String> {
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
pub(super) fn csv_schema(
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

pub(super) fn check_parquet_schema(
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
pub(super) fn without_values(message: &str, schema: &Schema) -> String {
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
pub(super) fn check_parquet_types(
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
