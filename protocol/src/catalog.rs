//! What a node publishes about its data: names, types, the privacy unit,
//! public group domains and value bounds. Never row counts or values of
//! private tables: the catalog is itself public.

use std::fmt;

use arrow::datatypes::{DataType, TimeUnit};
use serde::{Deserialize, Serialize};

/// The column types confer understands. OMOP CDM types map onto these
/// (integer and bigint to `Int64`, float and numeric to `Float64`, varchar to
/// `Utf8`, date to `Date`, datetime to `Timestamp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    /// 64-bit signed integer.
    Int64,
    /// 64-bit float.
    Float64,
    /// UTF-8 text.
    Utf8,
    /// Calendar date.
    Date,
    /// Date and time, without time zone, microsecond precision.
    Timestamp,
    /// true / false.
    Boolean,
}

impl ColumnType {
    /// The Arrow type a column of this type has once loaded.
    pub fn arrow_type(self) -> DataType {
        match self {
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Float64 => DataType::Float64,
            ColumnType::Utf8 => DataType::Utf8,
            ColumnType::Date => DataType::Date32,
            ColumnType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            ColumnType::Boolean => DataType::Boolean,
        }
    }

    /// Whether values of this type are numbers (bounds make sense).
    pub fn is_numeric(self) -> bool {
        matches!(self, ColumnType::Int64 | ColumnType::Float64)
    }

    /// Parses the names used in configs (`int64`, `bigint`, `varchar`, ...).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "int" | "integer" | "int32" | "int64" | "bigint" | "smallint" => ColumnType::Int64,
            "float" | "float64" | "double" | "real" | "numeric" | "decimal" => ColumnType::Float64,
            "utf8" | "string" | "text" | "varchar" => ColumnType::Utf8,
            "date" => ColumnType::Date,
            "timestamp" | "datetime" => ColumnType::Timestamp,
            "bool" | "boolean" => ColumnType::Boolean,
            _ => return None,
        })
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ColumnType::Int64 => "int64",
            ColumnType::Float64 => "float64",
            ColumnType::Utf8 => "utf8",
            ColumnType::Date => "date",
            ColumnType::Timestamp => "timestamp",
            ColumnType::Boolean => "boolean",
        })
    }
}

/// One value of a public group domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DomainValue {
    /// An integer key (concept ids, years).
    Int(i64),
    /// A text key.
    Text(String),
}

impl fmt::Display for DomainValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainValue::Int(v) => write!(f, "{v}"),
            DomainValue::Text(v) => write!(f, "'{}'", v.replace('\'', "''")),
        }
    }
}

/// The public set of values a group column can take. Declaring it lets every
/// group be released (empty ones included) without partition selection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Domain {
    /// An explicit list of values.
    Values {
        /// The values, in the order results list them.
        values: Vec<DomainValue>,
    },
    /// Every integer from `lo` to `hi`, both included.
    Range {
        /// First value.
        lo: i64,
        /// Last value.
        hi: i64,
    },
}

impl Domain {
    /// The values of the domain, in order.
    pub fn values(&self) -> Vec<DomainValue> {
        match self {
            Domain::Values { values } => values.clone(),
            Domain::Range { lo, hi } => (*lo..=*hi).map(DomainValue::Int).collect(),
        }
    }

    /// How many values the domain has.
    pub fn len(&self) -> usize {
        match self {
            Domain::Values { values } => values.len(),
            Domain::Range { lo, hi } => usize::try_from(hi - lo + 1).unwrap_or(0),
        }
    }

    /// Whether the domain has no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One column as published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnInfo {
    /// Column name, lower case.
    pub name: String,
    /// Its type.
    pub column_type: ColumnType,
    /// Declared value bounds `(lo, hi)`, used when a query gives none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounds: Option<(f64, f64)>,
    /// Declared public domain, which makes the column a public group key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<Domain>,
    /// Declared to hold each value at most once (NULLs aside), and checked
    /// by the node at start: a join on it cannot multiply one person's rows.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unique: bool,
}

/// One table as published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableInfo {
    /// Table name, lower case.
    pub name: String,
    /// The column identifying a person, for private tables; `None` for public
    /// tables (vocabulary, care sites), which may be queried without DP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy_unit: Option<String>,
    /// The columns, in order.
    pub columns: Vec<ColumnInfo>,
    /// Whether each person has at most one row (checked by the node at
    /// start-up). Queries reading such a table alone need no sampling of
    /// rows or groups.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub one_row_per_unit: bool,
}

impl TableInfo {
    /// Whether the table holds person-level records.
    pub fn is_private(&self) -> bool {
        self.privacy_unit.is_some()
    }

    /// The column called `name` (names are compared case-insensitively).
    pub fn column(&self, name: &str) -> Option<&ColumnInfo> {
        self.columns
            .iter()
            .find(|c| c.name.eq_ignore_ascii_case(name))
    }
}

/// Everything a node publishes about its data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogInfo {
    /// The node's name (its site).
    pub node: String,
    /// Its tables, sorted by name.
    pub tables: Vec<TableInfo>,
}

impl CatalogInfo {
    /// The table called `name` (compared case-insensitively).
    pub fn table(&self, name: &str) -> Option<&TableInfo> {
        self.tables
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(name))
    }
}

/// A node's answer to a health check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// The node's name.
    pub node: String,
    /// confer version the node runs.
    pub version: String,
    /// Seconds since the node started.
    pub uptime_secs: u64,
    /// Number of tables in its catalog.
    pub tables: usize,
    /// The head of the node's audit chain, and the hash of the record the
    /// coordinator anchored (see [`HealthRequest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditHead>,
    /// The node's clock when it answered, ms since the epoch (absent from
    /// older nodes): `confer coordinator check` compares it with its own,
    /// since tasks expire by the coordinator's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ms: Option<i64>,
}

/// The body of a health check (JSON; an empty body asks for no anchor).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthRequest {
    /// The sequence number of the audit record the coordinator holds as
    /// this node's anchor: the node answers with that record's hash, so
    /// the coordinator can tell a chain that grew from one that was reset,
    /// cut back or rewritten.
    #[serde(default)]
    pub anchor_seq: Option<i64>,
}

/// A node's audit chain as a health check reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditHead {
    /// Sequence number of the newest record (0: none).
    pub seq: i64,
    /// Its chain hash.
    pub hash: String,
    /// The chain hash of the record at the requested anchor, if there is one.
    #[serde(default)]
    pub at_anchor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_list_their_values() {
        let d = Domain::Range { lo: 2000, hi: 2002 };
        assert_eq!(d.len(), 3);
        assert_eq!(d.values()[2], DomainValue::Int(2002));
        let d: Domain =
            serde_json::from_str(r#"{"kind":"values","values":[8507,"x"]}"#).expect("domain json");
        assert_eq!(
            d.values(),
            vec![DomainValue::Int(8507), DomainValue::Text("x".into())]
        );
    }

    #[test]
    fn type_names_parse() {
        assert_eq!(ColumnType::parse("BIGINT"), Some(ColumnType::Int64));
        assert_eq!(ColumnType::parse("datetime"), Some(ColumnType::Timestamp));
        assert_eq!(ColumnType::parse("blob"), None);
    }
}
