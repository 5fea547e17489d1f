//! Compiling a DP query against the catalog into a [`FederatedPlan`].
//!
//! The compiler checks what the query may do, resolves bounds and domains
//! from the catalog, and writes the *local bounded query*: plain SQL that
//! each node runs with DataFusion. Its shape is
//!
//! ```text
//! <the query's own CTEs>,
//! __confer_src   one row per input row: the person, the group keys, the aggregate arguments
//!                (WHERE applied; keys outside public domains dropped)
//! __confer_rows  at most max_rows_contributed rows per person per group, chosen at random
//!                (row_number() over each person's rows in a group)
//! __confer_pg    one row per person per group: that person's contribution to each aggregate;
//!                at most max_groups_contributed groups per person, those whose keyed hash
//!                confer_hash(salt, person, group) is smallest (the salt drawn per task)
//! final SELECT   per group: the exact partials, and the number of persons
//! ```
//!
//! Steps that cannot change the result are left out: no sampling when each
//! person has one row (a table with one row per person, read alone), no
//! group sampling when a person cannot reach more groups than allowed, no
//! row sampling when every aggregate counts persons. The FROM clause, with
//! its joins, CTEs and subqueries, is planned by DataFusion and checked by
//! [`crate::analyze`] to keep every row attributable to one person. The
//! rankings run without a global sort ([`crate::bounding`]).
//!
//! The compiler runs in phases, one module each, with a typed value
//! between them:
//!
//! ```text
//! shape       the query's form; the rows it reads and who they belong to  -> Shape
//! aggregates  group keys and DP aggregates of the SELECT list, as written  -> Selected
//! keys        key types and domains, aggregate bounds (source planned)     -> Keys
//! budget      contribution bounds, sensitivities, the budget split         -> Bounded
//! local_sql   the query each node runs, checked total                      -> Local
//! post        what the researcher sees: derived columns, HAVING, ORDER BY  -> Released
//! ```
//!
//! The node adds noise to the partials ([`crate::release`]); the
//! coordinator combines them ([`crate::combine`]). The dialect's refusals
//! and EXPLAIN PRIVACY output are kept as data in `query-lang/tests/slt/`.

mod aggregates;
mod budget;
mod keys;
mod local_sql;
mod post;
mod shape;

use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{Expr, Ident, ObjectName, UnaryOperator, Value};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use crate::catalog::Catalog;
use crate::derive;
use crate::engine;
use crate::error::{QueryError, Result};
use crate::options::Aggregation;
use crate::parse::ParsedQuery;
use crate::plan::FederatedPlan;

pub(crate) use shape::make_total;

/// Name of the pseudo-column that holds the node's site name.
pub const SITE_COLUMN: &str = "site";

/// Upper limit on the number of public groups (the product of the domains).
pub const MAX_PUBLIC_GROUPS: usize = 1_000_000;

/// How to compile, beyond the query and the catalog.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompileOptions {
    /// Choose each person's groups and rows by a hash salted with this
    /// value instead of at random: the same choice on every run over the
    /// same rows. For the sensitivity auditor and tests; nodes sample at
    /// random.
    pub sampling_salt: Option<u64>,
    /// Tables in which the node has checked, on the files as they are now,
    /// that each person has at most one row (`one_row_per_unit`, checked
    /// at start; the files' sizes and modification times unchanged since).
    /// A query reading only such tables, with one row per person, skips
    /// the per-query enforcement (a GROUP BY over every person). Empty at
    /// the coordinator and in the auditor: the query then enforces it.
    pub verified_one_row: std::collections::BTreeSet<String>,
}

/// The largest magnitude of a contribution bound: beyond it, sums over
/// persons lose precision and can overflow.
pub const MAX_BOUND: f64 = 1e15;

/// Compiles a parsed DP query. `site` is the node's name when a node
/// compiles (it fills the `site` pseudo-column and salts the random choice
/// of groups); `None` at the coordinator.
pub async fn compile(
    parsed: &ParsedQuery,
    catalog: &Catalog,
    site: Option<&str>,
) -> Result<FederatedPlan> {
    compile_with(parsed, catalog, site, &CompileOptions::default()).await
}
/// [`compile`] with [`CompileOptions`].
pub async fn compile_with(
    parsed: &ParsedQuery,
    catalog: &Catalog,
    site: Option<&str>,
    options: &CompileOptions,
) -> Result<FederatedPlan> {
    let shape = shape::read(parsed, catalog, site).await?;
    let mut selected = aggregates::select(&shape)?;
    let keys = keys::resolve(&shape, &mut selected, catalog).await?;
    let bounded = budget::bound(&shape, &selected, &keys)?;
    let local =
        local_sql::write(&shape, &selected, &keys, &bounded, site, options, catalog).await?;
    let released = post::release(&shape, &selected, &keys, &bounded)?;

    let mut plan = FederatedPlan {
        options: shape.options,
        local_sql: local.sql,
        key_sql: local.key_sql,
        groups: keys.groups,
        aggregates: bounded.aggregates,
        partials: bounded.partials,
        selection: bounded.selection,
        select: selected.select_items,
        post: released.post,
        derived: None,
        cost: bounded.cost,
        max_groups: bounded.max_groups,
        max_rows: bounded.max_rows,
        tables: shape.source_prov.tables.iter().cloned().collect(),
        one_row_trusted: local.one_row_trusted,
        amplification: crate::analyze::amplification(&keys.src_plan, catalog),
    };
    if let Some(columns) = released.derived {
        plan.derived = Some(engine::derive(&plan, columns).await?);
    }
    if plan.options.aggregation == Aggregation::Secure {
        // The vector each node sends must fit (per key found, under
        // secure partition selection).
        if plan.public_groups() {
            crate::secure::vector_len(&plan)?;
        } else {
            crate::secure_select::with_selected_keys(&plan, &[0])?;
        }
    }
    Ok(plan)
}

/// Plans SQL in DataFusion and applies its analyzer (type coercion: the
/// casts DataFusion adds become visible), with planning errors in the
/// user's terms.
pub(crate) async fn plan_sql(
    ctx: &SessionContext,
    sql: &str,
    catalog: &Catalog,
) -> Result<LogicalPlan> {
    engine::analyzed(ctx, sql)
        .await
        .map_err(|e| user_terms(&e.to_string(), catalog))
}

/// Rewrites DataFusion's planning messages for researchers.
pub(super) fn user_terms(msg: &str, catalog: &Catalog) -> QueryError {
    QueryError::Plan(match user_message(msg, catalog) {
        Ok(msg) => msg,
        Err(missing) => return missing,
    })
}

/// DataFusion's planning message in the user's terms; a table the
/// catalog lacks as its own error.
fn user_message(msg: &str, catalog: &Catalog) -> std::result::Result<String, QueryError> {
    let msg = msg
        .trim_start_matches("Error during planning: ")
        .replace("datafusion.public.", "")
        .replace("__confer_src.", "");
    if let Some(rest) = msg.strip_prefix("table '")
        && let Some((table, _)) = rest.split_once("' not found")
    {
        let known: Vec<&str> = catalog.tables().map(|t| t.name.as_str()).collect();
        return Err(QueryError::NotInCatalog(format!(
            "table {table} is not in the network catalog; known tables: {}",
            known.join(", ")
        )));
    }
    if let Some(rest) = msg.strip_prefix("No field named ") {
        return Ok(format!("no column named {rest}"));
    }
    // DP queries run with DataFusion's built-in functions only: no session
    // at a coordinator or node registers user-defined ones.
    if let Some(rest) = msg.strip_prefix("Invalid function '")
        && let Some((name, after)) = rest.split_once('\'')
    {
        let hint = after
            .split_once("Did you mean '")
            .and_then(|(_, s)| s.split_once('\''))
            .map(|(s, _)| format!(" (did you mean {s}?)"))
            .unwrap_or_default();
        return Ok(format!(
            "{name} is not a built-in SQL function, and user-defined functions are not allowed in DP \
             queries: use built-in functions only{hint}"
        ));
    }
    Ok(msg)
}

pub(super) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub(super) fn unsupported(what: &str) -> QueryError {
    QueryError::Rejected(format!("{what} are not supported in DP queries yet"))
}

pub(super) fn ident_name(ident: &Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_ascii_lowercase()
    }
}

pub(super) fn function_name(name: &ObjectName) -> String {
    name.to_string().to_ascii_lowercase()
}

/// Whether `expr` (outer parentheses aside) calls an aggregate function.
pub(super) fn is_aggregate_call(expr: &Expr) -> bool {
    matches!(derive::strip(expr), Expr::Function(f) if AGGREGATE_NAMES.contains(&function_name(&f.name).as_str()))
}

/// Names of SQL aggregate functions that must not appear outside DP aggregates.
pub(super) const AGGREGATE_NAMES: &[&str] = &[
    "count",
    "sum",
    "avg",
    "mean",
    "min",
    "max",
    "var_pop",
    "var_samp",
    "variance",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "median",
    "percentile_cont",
    "approx_percentile_cont",
    "approx_distinct",
    "approx_median",
    "array_agg",
    "string_agg",
    "first_value",
    "last_value",
    "bit_and",
    "bit_or",
    "bit_xor",
    "bool_and",
    "bool_or",
    "corr",
    "covar_pop",
    "covar_samp",
];

pub(super) fn number(e: &Expr) -> Option<f64> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse().ok(),
            _ => None,
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => number(expr).map(|n| -n),
        Expr::Nested(inner) => number(inner),
        _ => None,
    }
}

pub(super) fn parse_sql_expr(sql: &str) -> std::result::Result<Expr, String> {
    Parser::new(&GenericDialect {})
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| e.to_string())
}
