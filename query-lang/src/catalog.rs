//! The network catalog: the tables every node publishes, merged.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::datatypes::{Field, Schema, SchemaRef};
use confer_protocol::catalog::{CatalogInfo, TableInfo};

use crate::error::{QueryError, Result};

/// Tables of the network as the compiler sees them, and the sites that serve them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Catalog {
    tables: BTreeMap<String, TableInfo>,
    sites: Vec<String>,
    /// For each table, the sites that publish it.
    published_by: BTreeMap<String, Vec<String>>,
    /// Columns of public tables known to hold no value twice (table,
    /// column): a node measures its own; the network catalog knows none.
    unique: BTreeSet<(String, String)>,
}

impl Catalog {
    /// The catalog of one node (what the node compiles against).
    pub fn for_node(info: &CatalogInfo) -> Self {
        Self {
            tables: info
                .tables
                .iter()
                .map(|t| (t.name.to_ascii_lowercase(), t.clone()))
                .collect(),
            sites: vec![info.node.clone()],
            published_by: info
                .tables
                .iter()
                .map(|t| (t.name.to_ascii_lowercase(), vec![info.node.clone()]))
                .collect(),
            unique: BTreeSet::new(),
        }
    }

    /// Records that `column` of public table `table` holds no value twice
    /// (a node measures this on its own tables; see
    /// [`crate::analyze::Provenance::amplified`]).
    pub fn set_unique(&mut self, table: &str, column: &str) {
        self.unique
            .insert((table.to_ascii_lowercase(), column.to_ascii_lowercase()));
    }

    /// Whether `column` of `table` is known to hold no value twice.
    pub fn is_unique(&self, table: &str, column: &str) -> bool {
        self.unique
            .contains(&(table.to_ascii_lowercase(), column.to_ascii_lowercase()))
    }

    /// Merges the catalogs nodes publish. A table may be missing at some
    /// nodes, but where two nodes publish the same table they must agree on
    /// its columns, types, privacy unit, domains and bounds: the coordinator
    /// combines their partials as one.
    pub fn merge(infos: &[CatalogInfo]) -> Result<Self> {
        let mut tables: BTreeMap<String, (String, TableInfo)> = BTreeMap::new();
        let mut published_by: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for info in infos {
            for table in &info.tables {
                let key = table.name.to_ascii_lowercase();
                published_by
                    .entry(key.clone())
                    .or_default()
                    .push(info.node.clone());
                match tables.get(&key) {
                    None => {
                        tables.insert(key, (info.node.clone(), table.clone()));
                    }
                    Some((first, existing)) if existing != table => {
                        return Err(QueryError::Plan(format!(
                            "nodes {first} and {} publish table {key} differently ({}): \
                             align their catalogs (node.toml) before querying it",
                            info.node,
                            describe_difference(existing, table)
                        )));
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(Self {
            tables: tables.into_iter().map(|(k, (_, t))| (k, t)).collect(),
            sites: infos.iter().map(|i| i.node.clone()).collect(),
            published_by,
            unique: BTreeSet::new(),
        })
    }

    /// The sites that publish table `name`, in configuration order.
    pub fn sites_of(&self, name: &str) -> &[String] {
        self.published_by
            .get(&name.to_ascii_lowercase())
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The table called `name` (case-insensitive).
    pub fn table(&self, name: &str) -> Option<&TableInfo> {
        self.tables.get(&name.to_ascii_lowercase())
    }

    /// All tables, sorted by name.
    pub fn tables(&self) -> impl Iterator<Item = &TableInfo> {
        self.tables.values()
    }

    /// The sites (node names) of the network, in configuration order.
    pub fn sites(&self) -> &[String] {
        &self.sites
    }

    /// The Arrow schema of a table as loaded at a node.
    pub fn arrow_schema(table: &TableInfo) -> SchemaRef {
        Arc::new(Schema::new(
            table
                .columns
                .iter()
                .map(|c| Field::new(&c.name, c.column_type.arrow_type(), true))
                .collect::<Vec<_>>(),
        ))
    }
}

fn describe_difference(a: &TableInfo, b: &TableInfo) -> String {
    if a.privacy_unit != b.privacy_unit {
        return format!(
            "privacy unit {:?} vs {:?}",
            a.privacy_unit.as_deref().unwrap_or("none (public)"),
            b.privacy_unit.as_deref().unwrap_or("none (public)")
        );
    }
    for ca in &a.columns {
        match b.column(&ca.name) {
            None => return format!("column {} missing at one", ca.name),
            Some(cb) if cb != ca => {
                return format!("column {} differs: {:?} vs {:?}", ca.name, ca, cb);
            }
            Some(_) => {}
        }
    }
    for cb in &b.columns {
        if a.column(&cb.name).is_none() {
            return format!("column {} missing at one", cb.name);
        }
    }
    "column order differs".into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use confer_protocol::catalog::{ColumnInfo, ColumnType};

    fn info(node: &str, ty: ColumnType) -> CatalogInfo {
        CatalogInfo {
            node: node.into(),
            tables: vec![TableInfo {
                name: "person".into(),
                privacy_unit: Some("person_id".into()),
                columns: vec![ColumnInfo {
                    name: "person_id".into(),
                    column_type: ty,
                    bounds: None,
                    domain: None,
                    unique: false,
                }],
                one_row_per_unit: false,
            }],
        }
    }

    #[test]
    fn agreeing_nodes_merge() {
        let c = Catalog::merge(&[info("a", ColumnType::Int64), info("b", ColumnType::Int64)])
            .expect("merge");
        assert_eq!(c.sites(), ["a", "b"]);
        assert!(c.table("PERSON").is_some());
    }

    #[test]
    fn disagreeing_nodes_are_named() {
        let err = Catalog::merge(&[info("a", ColumnType::Int64), info("b", ColumnType::Utf8)])
            .expect_err("conflict");
        let msg = err.to_string();
        assert!(
            msg.contains("nodes a and b") && msg.contains("person_id"),
            "{msg}"
        );
    }
}
