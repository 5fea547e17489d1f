//! Queries over public tables only (vocabulary, care sites, ...), which
//! need no DP clause: every node runs the plain SQL over its own copy and
//! the coordinator returns the rows of all sites, each tagged with its site.
//!
//! Whether a query is public is decided from DataFusion's logical plan over
//! the catalog's schemas (no data): every table scan, in subqueries too,
//! must be of a table without a privacy unit. Nodes decide it again against
//! their own catalog before running anything.

use std::collections::BTreeSet;

use arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::logical_expr::LogicalPlan;

use crate::catalog::Catalog;
use crate::engine::empty_context;
use crate::error::{QueryError, Result};
use crate::parse::ParsedQuery;

/// A query that reads only public tables.
#[derive(Debug, Clone)]
pub struct PublicQuery {
    /// The SQL each node runs.
    pub sql: String,
    /// The tables it reads.
    pub tables: Vec<String>,
    /// The schema of each node's answer.
    pub schema: SchemaRef,
}

/// The name of the column the coordinator puts first in a public query's
/// answer: the node each row came from.
pub const SITE_COLUMN: &str = "site";

/// `Some` when `parsed` has no DP clause and reads only public tables of
/// `catalog`; `None` when it reads a private table (or has the DP clause),
/// so that it must be compiled as a DP query. Unknown tables and columns are
/// errors.
pub async fn public_query(parsed: &ParsedQuery, catalog: &Catalog) -> Result<Option<PublicQuery>> {
    if parsed.options.is_some() {
        return Ok(None);
    }
    let sql = parsed.query.to_string();
    let ctx = empty_context(catalog)?;
    let df = ctx
        .sql(&sql)
        .await
        .map_err(|e| QueryError::from(e).into_user_error())?;
    let plan = df.logical_plan();
    let mut tables = BTreeSet::new();
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            tables.insert(scan.table_name.table().to_ascii_lowercase());
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if tables.is_empty() {
        return Err(QueryError::Rejected(
            "this query reads no table: add FROM <table> (see `confer catalog` for the tables)"
                .into(),
        ));
    }
    for name in &tables {
        match catalog.table(name) {
            Some(t) if t.privacy_unit.is_none() => {}
            Some(_) => return Ok(None),
            None => {
                return Err(QueryError::Plan(format!(
                    "table {name} is not in the catalog"
                )));
            }
        }
    }
    let schema = plan.schema().as_arrow().clone();
    if schema
        .fields()
        .iter()
        .any(|f| f.name().eq_ignore_ascii_case(SITE_COLUMN))
    {
        return Err(QueryError::Rejected(format!(
            "the answer already has a column named {SITE_COLUMN}, which confer adds to say where each row comes \
             from: rename it (AS ...)"
        )));
    }
    Ok(Some(PublicQuery {
        sql,
        tables: tables.into_iter().collect(),
        schema: std::sync::Arc::new(schema),
    }))
}
