//! Phase 1: the query's form, and the rows it reads and who they belong to.
//!
//! Refuses what the dialect does not take (window functions, DISTINCT,
//! recursive CTEs, reserved names, a query over public tables only),
//! rewrites the query so that no expression can fail on a row
//! ([`make_total`]), fills the `site` pseudo-column, and plans the FROM
//! and WHERE to find the privacy unit.

use std::ops::ControlFlow;

use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{
    BinaryOperator, CastKind, Expr, GroupByExpr, Query, Select, SelectItem, SetExpr, Value, Visit,
    VisitMut, Visitor, VisitorMut,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use super::{SITE_COLUMN, is_aggregate_call, number, parse_sql_expr, plan_sql, quote, unsupported};
use crate::analyze;
use crate::catalog::Catalog;
use crate::derive;
use crate::engine;
use crate::error::{QueryError, Result};
use crate::options::{Aggregation, DpOptions, Mechanism};
use crate::parse::ParsedQuery;

/// The query as the later phases read it.
pub(super) struct Shape {
    /// The DP clause.
    pub(super) options: DpOptions,
    /// The query, made total and with the `site` pseudo-column filled.
    pub(super) query: Query,
    /// Its outermost SELECT.
    pub(super) select: Select,
    /// The node's name (empty at the coordinator).
    pub(super) site_literal: String,
    /// A session over the catalog's empty tables, for planning.
    pub(super) ctx: SessionContext,
    /// `WITH ... ` (or empty), the FROM list and ` WHERE ...` (or empty), as SQL.
    pub(super) with_sql: String,
    pub(super) from_sql: String,
    pub(super) where_sql: String,
    /// Where the rows read come from, and whether each person has one.
    pub(super) source_prov: analyze::Provenance,
    /// The privacy unit column, as SQL.
    pub(super) unit_sql: String,
    /// The columns of the rows read, to compare expressions as resolved.
    pub(super) names_in_source: derive::Names,
}

/// Phase 1: checks the query's form and plans the rows it reads.
pub(super) async fn read(
    parsed: &ParsedQuery,
    catalog: &Catalog,
    site: Option<&str>,
) -> Result<Shape> {
    let options = parsed.options.clone().ok_or_else(|| {
        QueryError::Rejected(
            "this query reads person-level data and needs the DP clause: write \
             SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, delta = 1e-6) ..."
                .into(),
        )
    })?;
    if options.aggregation == Aggregation::Secure && options.mechanism != Mechanism::Gaussian {
        return Err(QueryError::Rejected(
            "aggregation = 'secure' adds distributed discrete Gaussian noise: drop mechanism = 'laplace' (or use aggregation = 'per_site')"
                .into(),
        ));
    }
    let mut query = (*parsed.query).clone();
    reject_reserved_names(&query)?;
    make_total(&mut query)?;
    reject_inner_order_by(&query)?;
    if query.fetch.is_some() || !query.locks.is_empty() || query.for_clause.is_some() {
        return Err(unsupported("FETCH / FOR clauses"));
    }
    if query.with.as_ref().is_some_and(|w| w.recursive) {
        return Err(QueryError::Rejected(
            "recursive CTEs are not supported in DP queries".into(),
        ));
    }
    // The `site` pseudo-column becomes the node's name (when no table has a
    // real column of that name).
    let site_literal = site.unwrap_or("").to_string();
    if !catalog.tables().any(|t| t.column(SITE_COLUMN).is_some()) {
        let mut sub = SiteLiteral(site_literal.clone());
        if let SetExpr::Select(select) = query.body.as_mut() {
            let _ = VisitMut::visit(select.as_mut(), &mut sub);
        }
    }
    let select = match query.body.as_ref() {
        SetExpr::Select(select) => select.as_ref().clone(),
        SetExpr::Query(_) => {
            return Err(QueryError::Rejected(
                "put the DP clause on the outermost SELECT, not around a parenthesised query"
                    .into(),
            ));
        }
        _ => {
            return Err(QueryError::Rejected(
                "UNION, INTERSECT, EXCEPT and VALUES cannot carry the DP clause: run each SELECT as its own \
                 DP query"
                    .into(),
            ));
        }
    };
    check_select_shape(&select)?;
    if select.from.is_empty() {
        return Err(QueryError::Rejected(
            "a DP query must read a table: add FROM <table>".into(),
        ));
    }

    let ctx = engine::empty_context(catalog)?;
    let with_sql = query
        .with
        .as_ref()
        .map(|w| format!("{w} "))
        .unwrap_or_default();
    let from_sql = select
        .from
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if let Some(selection) = &select.selection {
        reject_aggregates_in(selection, "WHERE")?;
    }
    let where_sql = select
        .selection
        .as_ref()
        .map(|w| format!(" WHERE {w}"))
        .unwrap_or_default();

    let source = plan_sql(
        &ctx,
        &format!("{with_sql}SELECT * FROM {from_sql}{where_sql}"),
        catalog,
    )
    .await?;
    let source_prov = analyze::provenance(&source, catalog)?;
    if !source_prov.is_private() {
        return Err(QueryError::Rejected(format!(
            "this query reads only public tables ({}): query them without the DP clause",
            source_prov
                .tables
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let unit_sql = unit_column(&source, &source_prov, &options, catalog)?;
    let names_in_source = derive::Names::new(source.schema());
    Ok(Shape {
        options,
        query,
        select,
        site_literal,
        ctx,
        with_sql,
        from_sql,
        where_sql,
        source_prov,
        unit_sql,
        names_in_source,
    })
}

/// The unit column of the source, as SQL.
pub(super) fn unit_column(
    source: &LogicalPlan,
    prov: &analyze::Provenance,
    options: &DpOptions,
    catalog: &Catalog,
) -> Result<String> {
    let schema = source.schema();
    let candidates: Vec<usize> = prov.unit_fields.iter().copied().collect();
    let chosen = match &options.privacy_unit_column {
        Some(wanted) => candidates
            .iter()
            .copied()
            .find(|&i| schema.field(i).name().eq_ignore_ascii_case(wanted))
            .ok_or_else(|| {
                let declared: Vec<String> = prov
                    .tables
                    .iter()
                    .filter_map(|t| catalog.table(t).and_then(|t| t.privacy_unit.clone()))
                    .collect();
                QueryError::Rejected(format!(
                    "privacy_unit_column = {wanted} is not the privacy unit of the tables read (declared: {}): \
                     drop the option or name the unit column",
                    declared.join(", ")
                ))
            })?,
        None => candidates
            .first()
            .copied()
            .ok_or_else(|| QueryError::Internal("a private source without unit".into()))?,
    };
    let (qualifier, field) = schema.qualified_field(chosen);
    Ok(match qualifier {
        Some(q) => format!("{}.{}", quote(&q.to_string()), quote(field.name())),
        None => quote(field.name()),
    })
}

/// Rewrites the written query so that what commonly fails on some rows, or
/// depends on other persons' NULLs, cannot:
///
/// * casts of anything but a literal become TRY_CAST (NULL where a value
///   does not convert);
/// * divisors other than numeric literals become NULLIF(divisor, 0); a
///   literal zero divisor is refused;
/// * every `x [NOT] IN (subquery)` gets `IS NOT NULL` on the subquery's
///   value, so that one NULL (which a LEFT JOIN can make depend on one
///   person) cannot turn `NOT IN` into "no row" for everyone.
///
/// A query that fails on one person's row would reveal that the row
/// exists, outside any DP mechanism; a NULL is dropped by the aggregate or
/// the filter like any other missing value. What is still not total after
/// this is refused by [`crate::total`] before anything runs.
pub(crate) fn make_total(query: &mut Query) -> Result<()> {
    let mut total = TotalExpressions(None);
    let _ = VisitMut::visit(query, &mut total);
    match total.0 {
        Some(why) => Err(why),
        None => Ok(()),
    }
}
struct TotalExpressions(Option<QueryError>);

impl VisitorMut for TotalExpressions {
    type Break = ();
    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        match expr {
            Expr::Cast {
                kind, expr: inner, ..
            } if matches!(kind, CastKind::Cast | CastKind::DoubleColon)
                && !matches!(inner.as_ref(), Expr::Value(_)) =>
            {
                *kind = CastKind::TryCast;
            }
            Expr::BinaryOp {
                op: BinaryOperator::Divide | BinaryOperator::Modulo,
                right,
                ..
            } => {
                if let Some(n) = number(right) {
                    if n == 0.0 {
                        self.0 = Some(QueryError::Rejected(format!(
                            "{expr} divides by zero: fix the divisor"
                        )));
                        return ControlFlow::Break(());
                    }
                    return ControlFlow::Continue(());
                }
                match parse_sql_expr(&format!("NULLIF(({right}), 0)")) {
                    Ok(total) => **right = total,
                    Err(e) => {
                        self.0 = Some(QueryError::Internal(format!(
                            "cannot guard the divisor {right}: {e}"
                        )));
                        return ControlFlow::Break(());
                    }
                }
            }
            Expr::InSubquery { subquery, .. } => {
                if let Err(e) = guard_nulls(subquery) {
                    self.0 = Some(QueryError::Internal(format!(
                        "cannot guard the IN subquery against NULLs: {e}"
                    )));
                    return ControlFlow::Break(());
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// Makes an IN subquery return no NULL: `AND value IS NOT NULL` in its
/// WHERE (or HAVING when it groups), or, for other shapes, a wrapper
/// `SELECT v FROM (subquery) AS t(v) WHERE v IS NOT NULL`; and makes it
/// DISTINCT, so that the hash join it becomes matches each row at most
/// once per key (DataFusion lists every pair of equal keys, even for semi
/// joins: without it one person's rows on both sides multiply).
pub(super) fn guard_nulls(query: &mut Query) -> std::result::Result<(), String> {
    let simple = query.with.is_none()
        && query.order_by.is_none()
        && query.limit_clause.is_none()
        && query.fetch.is_none();
    if simple && let SetExpr::Select(select) = query.body.as_mut() {
        let item = match select.projection.as_slice() {
            [SelectItem::UnnamedExpr(e)] | [SelectItem::ExprWithAlias { expr: e, .. }] => {
                Some(e.clone())
            }
            _ => None,
        };
        if let Some(item) = item {
            let guard = parse_sql_expr(&format!("({item}) IS NOT NULL"))?;
            let grouped = match &select.group_by {
                GroupByExpr::Expressions(exprs, _) => !exprs.is_empty(),
                GroupByExpr::All(_) => true,
            } || select.having.is_some();
            let slot = if grouped {
                &mut select.having
            } else {
                &mut select.selection
            };
            *slot = Some(match slot.take() {
                Some(w) => parse_sql_expr(&format!("({w}) AND ({guard})"))?,
                None => guard,
            });
            if select.distinct.is_none() {
                select.distinct = Some(datafusion::sql::sqlparser::ast::Distinct::Distinct);
            }
            return Ok(());
        }
    }
    let sql = format!(
        "SELECT DISTINCT __confer_in_value FROM ({query}) AS __confer_in (__confer_in_value) \
         WHERE __confer_in_value IS NOT NULL"
    );
    let wrapped = Parser::new(&GenericDialect {})
        .try_with_sql(&sql)
        .and_then(|mut p| p.parse_query())
        .map_err(|e| e.to_string())?;
    *query = *wrapped;
    Ok(())
}
/// Replaces the `site` pseudo-column with the node's name.
struct SiteLiteral(String);

impl VisitorMut for SiteLiteral {
    type Break = ();
    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        if let Expr::Identifier(id) = expr
            && id.quote_style.is_none()
            && id.value.eq_ignore_ascii_case(SITE_COLUMN)
        {
            *expr = Expr::Value(Value::SingleQuotedString(self.0.clone()).into());
        }
        ControlFlow::Continue(())
    }
}

/// Rejects identifiers that could collide with the names the compiler generates.
pub(super) fn reject_reserved_names(query: &Query) -> Result<()> {
    struct Finder(Option<String>);
    impl Visitor for Finder {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            let hit = match expr {
                Expr::Identifier(id) => id.value.to_ascii_lowercase().starts_with("__"),
                Expr::CompoundIdentifier(ids) => ids
                    .iter()
                    .any(|id| id.value.to_ascii_lowercase().starts_with("__")),
                _ => false,
            };
            if hit {
                self.0 = Some(expr.to_string());
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
    }
    let mut finder = Finder(None);
    let _ = query.visit(&mut finder);
    match finder.0 {
        Some(name) => Err(QueryError::Rejected(format!(
            "names starting with two underscores are reserved for confer: rename {name}"
        ))),
        None => Ok(()),
    }
}

pub(super) fn check_select_shape(select: &Select) -> Result<()> {
    if select.distinct.is_some() {
        return Err(QueryError::Rejected(
            "SELECT DISTINCT releases private keys: use GROUP BY with a DP aggregate instead"
                .into(),
        ));
    }
    if select.top.is_some() || select.into.is_some() {
        return Err(unsupported("TOP and SELECT INTO"));
    }
    if !select.lateral_views.is_empty()
        || select.prewhere.is_some()
        || !select.cluster_by.is_empty()
        || !select.distribute_by.is_empty()
        || !select.sort_by.is_empty()
        || !select.connect_by.is_empty()
    {
        return Err(unsupported(
            "LATERAL VIEW, PREWHERE, CLUSTER/DISTRIBUTE/SORT BY and CONNECT BY",
        ));
    }
    if !select.named_window.is_empty() || select.qualify.is_some() {
        return Err(QueryError::Rejected(
            "window functions (WINDOW, QUALIFY) are not allowed in DP queries: they expose \
             individual rows"
                .into(),
        ));
    }
    struct WindowFinder(bool);
    impl Visitor for WindowFinder {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            if let Expr::Function(f) = expr
                && f.over.is_some()
            {
                self.0 = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
    }
    let mut finder = WindowFinder(false);
    let _ = select.visit(&mut finder);
    if finder.0 {
        return Err(QueryError::Rejected(
            "window functions (OVER ...) are not allowed in DP queries: they expose individual rows"
                .into(),
        ));
    }
    Ok(())
}

pub(super) fn reject_aggregates_in(expr: &Expr, clause: &str) -> Result<()> {
    /// Finds aggregates outside nested queries (subqueries are analysed on their own).
    struct Finder(Option<String>, usize);
    impl Visitor for Finder {
        type Break = ();
        fn pre_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.1 += 1;
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.1 -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            if self.1 == 0 && is_aggregate_call(expr) {
                self.0 = Some(expr.to_string());
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
    }
    let mut finder = Finder(None, 0);
    let _ = expr.visit(&mut finder);
    match finder.0 {
        Some(agg) => Err(QueryError::Rejected(format!(
            "the aggregate {agg} may not appear in {clause}: DP aggregates go directly in the SELECT list"
        ))),
        None => Ok(()),
    }
}

/// Rejects ORDER BY in CTEs and subqueries (ordering before aggregation).
pub(super) fn reject_inner_order_by(query: &Query) -> Result<()> {
    struct Finder(usize, bool);
    impl Visitor for Finder {
        type Break = ();
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            self.0 += 1;
            // DISTINCT ON picks its row by the ORDER BY: allowed here, and
            // the plan analysis requires the unit among its keys.
            let distinct_on = matches!(q.body.as_ref(),
                SetExpr::Select(s) if matches!(s.distinct, Some(datafusion::sql::sqlparser::ast::Distinct::On(_))));
            if self.0 > 1 && q.order_by.is_some() && q.limit_clause.is_none() && !distinct_on {
                self.1 = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.0 -= 1;
            ControlFlow::Continue(())
        }
    }
    let mut finder = Finder(0, false);
    let _ = query.visit(&mut finder);
    if finder.1 {
        return Err(QueryError::Rejected(
            "ORDER BY before aggregation is not allowed: order the released values in the outermost SELECT \
             instead"
                .into(),
        ));
    }
    Ok(())
}
