//! `node.toml`: who the node is, where it listens, and which tables it serves.
//!
//! ```toml
//! [node]
//! name = "site-a"                 # the site name researchers see
//! listen = "127.0.0.1:50051"      # host:port (port 0 picks a free port)
//! state_dir = "state/site-a"      # privacy ledger and audit log (SQLite)
//! coordinator_key = "9f2c..."     # the coordinator's Ed25519 public key (hex)
//!
//! [policy]                        # see crate::policy
//! approval = "manual"
//!
//! [tables.person]
//! path = "data/site-a/PERSON.csv" # a file or a directory of files
//! format = "csv"                  # csv | parquet (default: from the extension)
//! privacy_unit = "person_id"      # omit for public tables (vocabularies)
//! [tables.person.columns]
//! gender_concept_id = { domain = [8507, 8532] }
//! year_of_birth = { bounds = [1900, 2030], domain = { from = 1900, to = 2030 } }
//! ```
//!
//! Relative paths are resolved against the directory of the config file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use confer_protocol::catalog::DomainValue;
use serde::Deserialize;

use crate::error::{NodeError, Result};
use crate::policy::{Policy, PolicyConfig};

/// The whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Identity and network.
    pub node: NodeSection,
    /// The data steward's policy (reloaded when the file changes).
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Tables, by the name queries use.
    #[serde(default)]
    pub tables: BTreeMap<String, TableConfig>,
    /// Mutual TLS: this node's certificate and key, and the network CA.
    /// Only the coordinator's certificate may connect.
    #[serde(default)]
    pub tls: Option<confer_transport::TlsFiles>,
    /// The org units of the region whose records this node holds
    /// (supervision statistics for the health commission).
    #[serde(default)]
    pub supervision: Option<SupervisionSection>,
    /// `[console]`: the data steward's page (docs/console.md).
    #[serde(default)]
    pub console: Option<confer_console::ConsoleConfig>,
    /// The file this was read from, if any (for policy reloads).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[node]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Site name; appears in results and in `GROUP BY site`.
    pub name: String,
    /// Address to listen on.
    pub listen: String,
    /// Directory for the node's durable state (privacy ledger, audit log).
    pub state_dir: PathBuf,
    /// The coordinator's Ed25519 public key, hex: only tasks it signed are
    /// run. Give this or `coordinator_key_file`.
    #[serde(default)]
    pub coordinator_key: Option<String>,
    /// A file holding that public key (as `confer keygen` writes it beside
    /// the secret key, `<key>.pub`).
    #[serde(default)]
    pub coordinator_key_file: Option<PathBuf>,
}

/// `[supervision]`: which org units of the region's tree (the
/// coordinator's `region.toml`) this node's records belong to.
///
/// ```toml
/// [supervision]
/// # org unit code = the OMOP care_site_ids whose records are that unit's
/// units = { "370101001" = [7], "370101001001" = [12, 13] }
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisionSection {
    /// Org unit code → care_site_ids.
    pub units: BTreeMap<String, Vec<i64>>,
}

impl SupervisionSection {
    /// Codes are non-empty, each unit names at least one care site, and no
    /// care site belongs to two units.
    pub fn validate(&self) -> Result<()> {
        let mut seen: BTreeMap<i64, &str> = BTreeMap::new();
        for (code, sites) in &self.units {
            if code.trim().is_empty() || code.trim() != code {
                return Err(NodeError::Config(format!(
                    "supervision.units: org unit code {code:?} is empty or has spaces: use the code of region.toml"
                )));
            }
            if sites.is_empty() {
                return Err(NodeError::Config(format!(
                    "supervision.units.\"{code}\" lists no care_site_id: give the care sites whose records are this unit's, or drop the unit"
                )));
            }
            for id in sites {
                if let Some(other) = seen.insert(*id, code) {
                    return Err(NodeError::Config(format!(
                        "supervision.units: care_site_id {id} is listed under both \"{other}\" and \"{code}\": a care site's records belong to one org unit"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The file format of a table source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Comma-separated values with a header line.
    Csv,
    /// Apache Parquet.
    Parquet,
}

/// `[tables.<name>]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// A file, or a directory whose files (of the format) form the table.
    pub path: PathBuf,
    /// File format; defaults from the extension of `path`.
    #[serde(default)]
    pub format: Option<Format>,
    /// The column that identifies a person; absent for public tables.
    #[serde(default)]
    pub privacy_unit: Option<String>,
    /// Whether each person has at most one row (OMOP's person table does;
    /// default true there, false elsewhere). Checked when the node starts.
    #[serde(default)]
    pub one_row_per_unit: Option<bool>,
    /// The source has one row per person and no identifier (a research
    /// extract such as the UCI heart-disease files): the node numbers the
    /// rows 1..n as the `privacy_unit` column. The numbers are not stable
    /// across restarts, so never join on them.
    #[serde(default)]
    pub unit_from_row_number: bool,
    /// CSV field delimiter (one character).
    #[serde(default = "default_delimiter")]
    pub delimiter: char,
    /// CSV: whether the first line names the columns (default true). Header
    /// names are normalised to lower case (GiBleed's are upper case).
    #[serde(default = "default_true")]
    pub header: bool,
    /// CSV without a header: the column names, in file order.
    #[serde(default)]
    pub column_names: Option<Vec<String>>,
    /// CSV: the text that marks a missing value (e.g. `"?"` or `"NA"`);
    /// empty fields are always missing.
    #[serde(default)]
    pub null_marker: Option<String>,
    /// CSV: the format of `date` columns, chrono style (default ISO
    /// `%Y-%m-%d`), e.g. `"%d/%m/%Y"` or `"%Y%m%d"`.
    #[serde(default)]
    pub date_format: Option<String>,
    /// CSV: the format of `timestamp` columns, chrono style (default ISO
    /// 8601 / RFC 3339), e.g. `"%d/%m/%Y %H:%M"`.
    #[serde(default)]
    pub datetime_format: Option<String>,
    /// Per-column declarations.
    #[serde(default)]
    pub columns: BTreeMap<String, ColumnConfig>,
}

fn default_delimiter() -> char {
    ','
}

fn default_true() -> bool {
    true
}

/// `[tables.<name>.columns.<column>]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnConfig {
    /// Column type (`int64`, `float64`, `utf8`, `date`, `timestamp`,
    /// `boolean`); OMOP tables default to the CDM's types, others to utf8.
    #[serde(default, rename = "type")]
    pub column_type: Option<String>,
    /// Value bounds `[lo, hi]` used when a query gives none.
    #[serde(default)]
    pub bounds: Option<[f64; 2]>,
    /// Public domain: a list of values, or `{ from = a, to = b }`.
    #[serde(default)]
    pub domain: Option<DomainConfig>,
    /// Each value at most once (NULLs aside), checked when the node starts:
    /// a join on this column cannot multiply one person's rows (for example
    /// `visit_occurrence.visit_occurrence_id`, which event tables join on).
    #[serde(default)]
    pub unique: bool,
}

/// A declared domain.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DomainConfig {
    /// An explicit list.
    Values(Vec<DomainValue>),
    /// An integer range, both ends included.
    Range {
        /// First value.
        from: i64,
        /// Last value.
        to: i64,
    },
}

impl NodeConfig {
    /// Reads and validates a config file; relative paths are resolved
    /// against its directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| NodeError::Config(format!("cannot read {}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = Self::parse(&text, base).map_err(|e| match e {
            NodeError::Config(msg) => NodeError::Config(format!("{}: {msg}", path.display())),
            other => other,
        })?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self> {
        let mut config: NodeConfig =
            toml::from_str(text).map_err(|e| NodeError::Config(e.to_string()))?;
        config.resolve(base);
        config.validate()?;
        Ok(config)
    }

    fn resolve(&mut self, base: &Path) {
        if self.node.state_dir.is_relative() {
            self.node.state_dir = base.join(&self.node.state_dir);
        }
        if let Some(f) = &self.node.coordinator_key_file
            && f.is_relative()
        {
            self.node.coordinator_key_file = Some(base.join(f));
        }
        if let Some(tls) = &mut self.tls {
            tls.resolve(base);
        }
        for table in self.tables.values_mut() {
            if table.path.is_relative() {
                table.path = base.join(&table.path);
            }
        }
    }

    fn validate(&self) -> Result<()> {
        let name = &self.node.name;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(NodeError::Config(format!(
                "node.name = {name:?}: use letters, digits, '-', '_' or '.'"
            )));
        }
        self.listen_addr()?;
        self.coordinator_key()?;
        Policy::from_config(&self.policy)?;
        if let Some(sup) = &self.supervision {
            sup.validate()?;
        }
        for (table, t) in &self.tables {
            if table.is_empty() || !table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(NodeError::Config(format!(
                    "tables.{table}: table names use letters, digits and '_'"
                )));
            }
            match (&t.column_names, t.header) {
                (Some(_), true) => {
                    return Err(NodeError::Config(format!(
                        "tables.{table}.column_names is given but header = true: set header = false if the file has no header line, or drop column_names"
                    )));
                }
                (None, false) => {
                    return Err(NodeError::Config(format!(
                        "tables.{table}: header = false needs column_names = [\"...\", ...] in file order"
                    )));
                }
                (Some(names), false) => {
                    for (i, n) in names.iter().enumerate() {
                        if n.trim().is_empty()
                            || names[..i].iter().any(|m| m.eq_ignore_ascii_case(n))
                        {
                            return Err(NodeError::Config(format!(
                                "tables.{table}.column_names: name {} is empty or repeated",
                                i + 1
                            )));
                        }
                    }
                }
                (None, true) => {}
            }
            if t.unit_from_row_number {
                if t.privacy_unit.is_none() {
                    return Err(NodeError::Config(format!(
                        "tables.{table}.unit_from_row_number needs privacy_unit = \"<name>\" for the numbered column"
                    )));
                }
                if t.one_row_per_unit == Some(false) {
                    return Err(NodeError::Config(format!(
                        "tables.{table}: unit_from_row_number means one row per person; drop one_row_per_unit = false"
                    )));
                }
            }
            if let Some(marker) = &t.null_marker
                && marker.is_empty()
            {
                return Err(NodeError::Config(format!(
                    "tables.{table}.null_marker is empty: empty fields are already missing; give the marker text (e.g. \"?\" or \"NA\") or drop it"
                )));
            }
            for (field, fmt) in [
                ("date_format", &t.date_format),
                ("datetime_format", &t.datetime_format),
            ] {
                if let Some(fmt) = fmt
                    && chrono::format::StrftimeItems::new(fmt)
                        .any(|i| matches!(i, chrono::format::Item::Error))
                {
                    return Err(NodeError::Config(format!(
                        "tables.{table}.{field} = {fmt:?} is not a valid chrono format (use e.g. \"%d/%m/%Y\")"
                    )));
                }
            }
            for (column, c) in &t.columns {
                if let Some([lo, hi]) = c.bounds
                    && (lo.is_nan() || hi.is_nan() || lo > hi)
                {
                    return Err(NodeError::Config(format!(
                        "tables.{table}.columns.{column}.bounds = [{lo}, {hi}]: the lower bound must not exceed the upper"
                    )));
                }
                if let Some(DomainConfig::Range { from, to }) = &c.domain
                    && from > to
                {
                    return Err(NodeError::Config(format!(
                        "tables.{table}.columns.{column}.domain: from = {from} is after to = {to}"
                    )));
                }
                if let Some(DomainConfig::Values(v)) = &c.domain
                    && v.is_empty()
                {
                    return Err(NodeError::Config(format!(
                        "tables.{table}.columns.{column}.domain is empty: list at least one value"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The coordinator's public key, from `coordinator_key` or `coordinator_key_file`.
    pub fn coordinator_key(&self) -> Result<confer_protocol::signing::PublicKey> {
        let (field, text) = match (&self.node.coordinator_key, &self.node.coordinator_key_file) {
            (Some(k), None) => ("node.coordinator_key", k.clone()),
            (None, Some(f)) => (
                "node.coordinator_key_file",
                std::fs::read_to_string(f).map_err(|e| {
                    NodeError::Config(format!("node.coordinator_key_file = {}: {e}", f.display()))
                })?,
            ),
            _ => {
                return Err(NodeError::Config(
                    "[node] needs exactly one of coordinator_key (hex) or coordinator_key_file: \
                     the coordinator's public key, printed by `confer keygen`"
                        .into(),
                ));
            }
        };
        confer_protocol::signing::PublicKey::from_hex(&text).map_err(|e| {
            NodeError::Config(format!(
                "{field}: {e} (`confer keygen` prints the public key)"
            ))
        })
    }

    /// The listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr> {
        self.node.listen.parse().map_err(|e| {
            NodeError::Config(format!(
                "node.listen = {:?} is not host:port ({e}); for example \"127.0.0.1:50051\"",
                self.node.listen
            ))
        })
    }
}

impl TableConfig {
    /// The format, declared or from the extension.
    pub fn format(&self, table: &str) -> Result<Format> {
        if let Some(f) = self.format {
            return Ok(f);
        }
        match self
            .path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
        {
            Some(e) if e == "csv" => Ok(Format::Csv),
            Some(e) if e == "parquet" => Ok(Format::Parquet),
            _ => Err(NodeError::Config(format!(
                "tables.{table}: cannot tell the format of {} from its name: add format = \"csv\" or \"parquet\"",
                self.path.display()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
name = "site-a"
listen = "127.0.0.1:0"
state_dir = "state"
coordinator_key = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"

[tables.person]
path = "PERSON.csv"
privacy_unit = "person_id"
[tables.person.columns]
gender_concept_id = { domain = [8507, 8532] }
year_of_birth = { bounds = [1900, 2030], domain = { from = 1900, to = 2030 } }
"#;

    #[test]
    fn parses_and_resolves_paths() {
        let c = NodeConfig::parse(GOOD, Path::new("/etc/confer")).expect("valid");
        assert_eq!(c.node.state_dir, PathBuf::from("/etc/confer/state"));
        let p = &c.tables["person"];
        assert_eq!(p.path, PathBuf::from("/etc/confer/PERSON.csv"));
        assert_eq!(p.format("person").expect("format"), Format::Csv);
        assert!(matches!(
            p.columns["year_of_birth"].domain,
            Some(DomainConfig::Range {
                from: 1900,
                to: 2030
            })
        ));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (GOOD.replace("127.0.0.1:0", "nowhere"), "node.listen"),
            (
                GOOD.replace("[1900, 2030]", "[2030, 1900]"),
                "year_of_birth.bounds",
            ),
            (
                GOOD.replace("from = 1900, to = 2030", "from = 2030, to = 1900"),
                "year_of_birth.domain",
            ),
            (GOOD.replace("site-a", "site a"), "node.name"),
            (
                GOOD.replace("privacy_unit", "privacy_units"),
                "privacy_units",
            ),
        ];
        for (text, want) in cases {
            let err = NodeConfig::parse(&text, Path::new("."))
                .expect_err("invalid")
                .to_string();
            assert!(err.contains(want), "{err} should mention {want}");
        }
    }
}
