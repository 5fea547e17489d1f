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
//! __confer_rows  at most max_groups_contributed groups per person and max_rows_contributed
//!                rows per person per group, chosen at random
//! __confer_pg    one row per person per group: that person's contribution to each aggregate
//! final SELECT   per group: the exact partials, and the number of persons
//! ```
//!
//! Steps that cannot change the result are left out: no sampling when each
//! person has one row (a table with one row per person, read alone), no
//! group sampling when a person cannot reach more groups than allowed, no
//! row sampling when every aggregate counts persons. The FROM clause, with
//! its joins, CTEs and subqueries, is planned by DataFusion and checked by
//! [`crate::analyze`] to keep every row attributable to one person.
//!
//! The node adds noise to the partials ([`crate::release`]); the
//! coordinator combines them ([`crate::combine`]).

use std::fmt::Write as _;
use std::ops::ControlFlow;

use confer_privacy::selection::Selection;
use confer_protocol::catalog::{ColumnType, DomainValue};
use datafusion::arrow::datatypes::DataType;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{
    BinaryOperator, CastKind, DuplicateTreatment, Expr, FunctionArg, FunctionArgExpr,
    FunctionArgOperator, FunctionArguments, GroupByExpr, Ident, ObjectName, Query, Select,
    SelectItem, SetExpr, UnaryOperator, Value, Visit, VisitMut, Visitor, VisitorMut,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use crate::analyze::{self, Origin};
use crate::catalog::Catalog;
use crate::derive;
use crate::engine;
use crate::error::{QueryError, Result};
use crate::options::{Aggregation, DpOptions, Mechanism};
use crate::parse::ParsedQuery;
use crate::plan::{
    AggregateKind, AggregateSpec, Bounds, CI_HIGH_SUFFIX, CI_LOW_SUFFIX, FederatedPlan,
    FinalColumn, GroupSpec, OutputItem, PERCENTILE_BINS, PartialSpec, PlanCost, PostProcess,
};

/// Name of the pseudo-column that holds the node's site name.
pub const SITE_COLUMN: &str = "site";

/// Upper limit on the number of public groups (the product of the domains).
pub const MAX_PUBLIC_GROUPS: usize = 1_000_000;

/// An aggregate of the SELECT list, before compilation.
struct Agg {
    kind: AggregateKind,
    name: String,
    expr: String,
    /// The argument, if any (index into the value columns).
    value: Option<usize>,
    bounds: Option<(f64, f64, bool)>,
    percentile: Option<f64>,
}

/// An item of the SELECT list as the researcher sees it.
enum Final {
    /// A released key or aggregate, as released.
    Released(OutputItem),
    /// An expression of released values, evaluated after release.
    Derived {
        /// Its output name.
        name: String,
        /// The expression over released column names.
        sql: Box<Expr>,
        /// As written (for HAVING / ORDER BY to refer to it).
        written: Box<Expr>,
    },
}

/// Rewrites a post-processing item over released names: keys to their
/// released columns, aggregates to released (perhaps hidden) values.
struct ToReleased<'a> {
    names: &'a derive::Names,
    group_keys: &'a [String],
    group_exprs: &'a [Expr],
    group_names: &'a [Option<String>],
    hidden_groups: &'a mut Vec<usize>,
    agg_keys: &'a mut Vec<String>,
    aggs: &'a mut Vec<Agg>,
    values: &'a mut Vec<String>,
    raw_values: &'a mut Vec<Option<String>>,
    error: Option<QueryError>,
}

impl VisitorMut for ToReleased<'_> {
    type Break = ();
    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        let key = self.names.key(expr);
        let released = |name: &str| Expr::Identifier(Ident::with_quote('"', name));
        if let Some(g) = self.group_keys.iter().position(|k| *k == key) {
            if !self.hidden_groups.contains(&g) {
                self.hidden_groups.push(g);
            }
            *expr = released(self.group_names[g].as_deref().unwrap_or_default());
            return ControlFlow::Continue(());
        }
        if is_aggregate_call(expr) {
            if let Some(a) = self.agg_keys.iter().position(|k| *k == key) {
                *expr = released(&self.aggs[a].name);
                return ControlFlow::Continue(());
            }
            match classify(derive::strip(expr), self.values, self.raw_values) {
                Ok(Some(mut agg)) => {
                    agg.name = format!("__agg{}", self.aggs.len());
                    *expr = released(&agg.name);
                    self.agg_keys.push(key);
                    self.aggs.push(agg);
                    return ControlFlow::Continue(());
                }
                Ok(None) => {}
                Err(e) => {
                    self.error = Some(e);
                    return ControlFlow::Break(());
                }
            }
        }
        match expr {
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) => {
                let keys: Vec<String> = self.group_exprs.iter().map(ToString::to_string).collect();
                self.error = Some(QueryError::Rejected(format!(
                    "{expr} is neither a GROUP BY key nor inside a DP aggregate: releasing it would reveal \
                     person-level values; add it to GROUP BY{} or aggregate it",
                    if keys.is_empty() {
                        String::new()
                    } else {
                        format!(" (now: {})", keys.join(", "))
                    }
                )));
                ControlFlow::Break(())
            }
            Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. } => {
                self.error = Some(unsupported("subqueries in the SELECT list"));
                ControlFlow::Break(())
            }
            _ => ControlFlow::Continue(()),
        }
    }
}

/// Whether `expr` (outer parentheses aside) calls an aggregate function.
fn is_aggregate_call(expr: &Expr) -> bool {
    matches!(derive::strip(expr), Expr::Function(f) if AGGREGATE_NAMES.contains(&function_name(&f.name).as_str()))
}

/// How to compile, beyond the query and the catalog.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompileOptions {
    /// Choose each person's groups and rows by a hash salted with this
    /// value instead of at random: the same choice on every run over the
    /// same rows. For the sensitivity auditor and tests; nodes sample at
    /// random.
    pub sampling_salt: Option<u64>,
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
    options_in: &CompileOptions,
) -> Result<FederatedPlan> {
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
    let site_literal = site.unwrap_or("");
    if !catalog.tables().any(|t| t.column(SITE_COLUMN).is_some()) {
        let mut sub = SiteLiteral(site_literal.to_string());
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

    // 1. The rows the query reads, and who they belong to.
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

    // 2. Group keys and aggregates, as written, compared as resolved.
    let names_in_source = derive::Names::new(source.schema());
    let mut group_exprs = match &select.group_by {
        GroupByExpr::Expressions(exprs, modifiers) => {
            if !modifiers.is_empty() {
                return Err(unsupported(
                    "GROUP BY modifiers (ROLLUP, CUBE, GROUPING SETS)",
                ));
            }
            exprs.clone()
        }
        GroupByExpr::All(_) => {
            return Err(QueryError::Rejected(
                "GROUP BY ALL is not accepted: list the group columns".into(),
            ));
        }
    };
    derive::resolve_group_by(
        &mut group_exprs,
        &select.projection,
        &names_in_source,
        is_aggregate_call,
    )?;
    for g in &group_exprs {
        reject_aggregates_in(g, "GROUP BY")?;
        if matches!(g, Expr::Rollup(_) | Expr::Cube(_) | Expr::GroupingSets(_))
            || matches!(g, Expr::Function(f) if ["rollup", "cube", "grouping sets"].contains(&function_name(&f.name).as_str()))
        {
            return Err(unsupported(
                "GROUP BY modifiers (ROLLUP, CUBE, GROUPING SETS)",
            ));
        }
    }
    let group_keys: Vec<String> = group_exprs.iter().map(|g| names_in_source.key(g)).collect();
    // The value columns of the local query (as it computes them), and the
    // argument as written where the local query converts it (to check its
    // type before converting).
    let mut values: Vec<String> = Vec::new();
    let mut raw_values: Vec<Option<String>> = Vec::new();
    let mut aggs: Vec<Agg> = Vec::new();
    let mut agg_keys: Vec<String> = Vec::new();
    let mut select_items: Vec<OutputItem> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let mut group_names: Vec<Option<String>> = vec![None; group_exprs.len()];
    // What the SELECT list releases, in its order: released columns, or
    // expressions of them (post-processing).
    let mut finals: Vec<Final> = Vec::new();
    let mut pending: Vec<(usize, &Expr, Option<&Ident>)> = Vec::new();
    for item in &select.projection {
        let (expr, alias) = match item {
            SelectItem::UnnamedExpr(e) => (e, None),
            SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias)),
            _ => {
                return Err(QueryError::Rejected(
                    "SELECT * would release private columns: name the group columns and aggregates"
                        .into(),
                ));
            }
        };
        let bare = derive::strip(expr);
        let key = names_in_source.key(bare);
        if let Some(mut agg) = classify(bare, &mut values, &mut raw_values)? {
            agg.name = unique_name(&mut names, alias.map(ident_name).unwrap_or(agg.name));
            select_items.push(OutputItem::Aggregate(aggs.len()));
            finals.push(Final::Released(OutputItem::Aggregate(aggs.len())));
            agg_keys.push(key);
            aggs.push(agg);
        } else if let Some(index) = group_keys.iter().position(|g| *g == key)
            && group_names[index].is_none()
        {
            let default = group_default_name(&group_exprs[index], index);
            let name = unique_name(&mut names, alias.map(ident_name).unwrap_or(default));
            group_names[index] = Some(name);
            select_items.push(OutputItem::Group(index));
            finals.push(Final::Released(OutputItem::Group(index)));
        } else {
            pending.push((finals.len(), expr, alias));
            finals.push(Final::Derived {
                name: String::new(),
                sql: Box::new(Expr::Value(Value::Null.into())),
                written: Box::new(expr.clone()),
            });
        }
    }
    for (i, g) in group_exprs.iter().enumerate() {
        if group_names[i].is_none() {
            group_names[i] = Some(unique_name(&mut names, group_default_name(g, i)));
        }
    }
    // Post-processing items: each aggregate in them becomes a released
    // value (hidden unless selected itself), each key a released key.
    let mut hidden_groups: Vec<usize> = Vec::new();
    for (slot, expr, alias) in pending {
        let mut rewritten = expr.clone();
        let mut to_released = ToReleased {
            names: &names_in_source,
            group_keys: &group_keys,
            group_exprs: &group_exprs,
            group_names: &group_names,
            hidden_groups: &mut hidden_groups,
            agg_keys: &mut agg_keys,
            aggs: &mut aggs,
            values: &mut values,
            raw_values: &mut raw_values,
            error: None,
        };
        let _ = VisitMut::visit(&mut rewritten, &mut to_released);
        if let Some(e) = to_released.error {
            return Err(e);
        }
        let name = unique_name(
            &mut names,
            alias.map(ident_name).unwrap_or_else(|| expr.to_string()),
        );
        finals[slot] = Final::Derived {
            name,
            sql: Box::new(rewritten),
            written: Box::new(expr.clone()),
        };
    }
    for g in &hidden_groups {
        if !select_items.contains(&OutputItem::Group(*g)) {
            select_items.push(OutputItem::Group(*g));
        }
    }
    for a in 0..aggs.len() {
        if !select_items.contains(&OutputItem::Aggregate(a)) {
            select_items.push(OutputItem::Aggregate(a));
        }
    }
    if aggs.is_empty() && group_exprs.is_empty() {
        return Err(QueryError::Rejected(
            "a DP query must release at least one aggregate, such as COUNT(*), or group keys \
             (SELECT k FROM t GROUP BY k)"
                .into(),
        ));
    }

    // 3. The source projection, planned: key types, origins (for domains and
    //    bounds), and which arguments are the unit.
    let mut src_cols = vec![format!("{unit_sql} AS __unit")];
    for (i, g) in group_exprs.iter().enumerate() {
        src_cols.push(format!("{g} AS __g{i}"));
    }
    for (j, v) in values.iter().enumerate() {
        let v = raw_values[j].as_ref().unwrap_or(v);
        src_cols.push(format!("{v} AS __v{j}"));
    }
    let src_plan = plan_sql(
        &ctx,
        &format!(
            "{with_sql}SELECT {} FROM {from_sql}{where_sql}",
            src_cols.join(", ")
        ),
        catalog,
    )
    .await?;
    let src_prov = analyze::provenance(&src_plan, catalog)?;
    if !src_prov.unit_fields.contains(&0) {
        return Err(QueryError::Internal(
            "the unit column was lost in the source projection".into(),
        ));
    }
    let n_groups = group_exprs.len();
    let value_origin = |j: usize| src_prov.origins.get(&(1 + n_groups + j));
    let value_is_unit = |j: usize| src_prov.unit_fields.contains(&(1 + n_groups + j));

    let mut groups = Vec::with_capacity(n_groups);
    for (i, g) in group_exprs.iter().enumerate() {
        let field = src_plan.schema().field(1 + i);
        let column_type = column_type_of(field.data_type()).ok_or_else(|| {
            QueryError::Rejected(format!(
                "GROUP BY {g} has type {}, which cannot be a group key",
                field.data_type()
            ))
        })?;
        let is_site = matches!(g, Expr::Value(v) if matches!(&v.value, Value::SingleQuotedString(s) if s == site_literal))
            && group_default_name(g, i) == SITE_COLUMN;
        if is_site && options.aggregation == Aggregation::Secure {
            return Err(QueryError::Rejected(
                "GROUP BY site with aggregation = 'secure': secure aggregation releases only the network's sum; use aggregation = 'per_site' for per-site figures"
                    .into(),
            ));
        }
        let domain = if is_site {
            Some(
                catalog
                    .sites()
                    .iter()
                    .map(|s| DomainValue::Text(s.clone()))
                    .collect(),
            )
        } else {
            src_prov
                .origins
                .get(&(1 + i))
                .and_then(|o| column_of(catalog, o))
                .and_then(|c| c.domain.as_ref().map(|d| d.values()))
        };
        if let Some(values) = &domain {
            check_domain_type(
                &group_names[i].clone().unwrap_or_default(),
                column_type,
                values,
            )?;
        }
        groups.push(GroupSpec {
            name: group_names[i].clone().unwrap_or_default(),
            column_type,
            domain,
            is_site,
        });
    }
    let private_keys = groups.iter().any(|g| g.domain.is_none());
    if private_keys && options.delta == 0.0 {
        return Err(QueryError::Rejected(format!(
            "group key {} has no public domain, so its groups are released by DP partition selection, which \
             needs delta > 0: set delta (for example 1e-6), or declare a public domain for it in node.toml",
            groups
                .iter()
                .find(|g| g.domain.is_none())
                .map(|g| g.name.as_str())
                .unwrap_or("?")
        )));
    }
    let public_groups: usize = if private_keys {
        usize::MAX
    } else {
        groups
            .iter()
            .try_fold(1usize, |acc, g| {
                acc.checked_mul(g.domain.as_ref().map_or(1, Vec::len).max(1))
                    .filter(|n| *n <= MAX_PUBLIC_GROUPS)
            })
            .ok_or_else(|| {
                QueryError::Rejected(format!(
                    "the public group domains multiply to more than {MAX_PUBLIC_GROUPS} groups: group by fewer \
                     or coarser columns"
                ))
            })?
    };

    // 4. Bounds and argument checks.
    for agg in &mut aggs {
        let Some(j) = agg.value else { continue };
        match agg.kind {
            AggregateKind::CountDistinctUnit => {
                if !value_is_unit(j) {
                    return Err(QueryError::Rejected(format!(
                        "{} is supported only for the privacy unit: write COUNT(DISTINCT {})",
                        agg.expr,
                        unit_sql
                            .rsplit('.')
                            .next()
                            .unwrap_or("person_id")
                            .trim_matches('"')
                    )));
                }
            }
            AggregateKind::Sum
            | AggregateKind::Avg
            | AggregateKind::VarPop
            | AggregateKind::StddevPop
            | AggregateKind::Percentile => {
                let numeric = matches!(
                    src_plan.schema().field(1 + n_groups + j).data_type(),
                    DataType::Int8
                        | DataType::Int16
                        | DataType::Int32
                        | DataType::Int64
                        | DataType::UInt8
                        | DataType::UInt16
                        | DataType::UInt32
                        | DataType::UInt64
                        | DataType::Float16
                        | DataType::Float32
                        | DataType::Float64
                        | DataType::Decimal128(_, _)
                );
                if !numeric {
                    return Err(QueryError::Rejected(format!(
                        "{} needs a numeric argument: cast it, or use COUNT",
                        agg.expr
                    )));
                }
                if agg.bounds.is_none() {
                    let declared = value_origin(j)
                        .and_then(|o| column_of(catalog, o))
                        .and_then(|c| c.bounds);
                    match declared {
                        Some((lo, hi)) => agg.bounds = Some((lo, hi, true)),
                        None => {
                            let arg = match agg.kind {
                                AggregateKind::Sum | AggregateKind::Avg => {
                                    "contribution_bounds_per_group"
                                }
                                _ => "contribution_bounds_per_row",
                            };
                            return Err(QueryError::Rejected(format!(
                                "{} needs bounds: add {arg} => (lo, hi), or declare bounds for the column in the \
                                 catalog (node.toml)",
                                agg.expr
                            )));
                        }
                    }
                }
            }
            AggregateKind::CountStar | AggregateKind::Count => {}
        }
    }

    // 5. Contribution bounds and sensitivities.
    let single_row = source_prov.one_row_per_unit;
    let max_rows = if single_row {
        1
    } else {
        options.max_rows_contributed as usize
    };
    let max_groups = if group_exprs.is_empty() || single_row {
        1
    } else {
        (options.max_groups_contributed as usize).min(public_groups)
    };
    let needs_group_sampling = !single_row
        && !group_exprs.is_empty()
        && (options.max_groups_contributed as usize) < public_groups;
    let needs_row_sampling = !single_row
        && aggs
            .iter()
            .any(|a| a.kind != AggregateKind::CountDistinctUnit);

    let mut aggregates = Vec::with_capacity(aggs.len());
    let mut partials: Vec<PartialSpec> = Vec::new();
    for (index, agg) in aggs.iter().enumerate() {
        let r = max_rows as f64;
        let bounds = agg
            .bounds
            .map(|(lo, hi, per_row)| Bounds { lo, hi, per_row });
        if let Some(b) = bounds
            && b.lo >= b.hi
        {
            return Err(QueryError::Rejected(format!(
                "{}: the bounds ({}, {}) (from the query, or else the catalog) leave no room for noise \
                 calibration; write lo < hi (if every value is the same, use COUNT and multiply)",
                agg.expr, b.lo, b.hi
            )));
        }
        if let Some(b) = bounds
            && b.lo.abs().max(b.hi.abs()) > MAX_BOUND
        {
            return Err(QueryError::Rejected(format!(
                "{}: the bounds ({}, {}) are beyond ±{MAX_BOUND:e}, where sums over persons lose \
                 precision and can overflow: rescale the values (for example to thousands)",
                agg.expr, b.lo, b.hi
            )));
        }
        let half = bounds.map(|b| (b.hi - b.lo) / 2.0).unwrap_or(0.0);
        let add =
            |suffixes: &[&str], integer: bool, per_group: f64, partials: &mut Vec<PartialSpec>| {
                let n = partials.len();
                let columns: Vec<String> = if suffixes.is_empty() {
                    vec![format!("__p{n}")]
                } else {
                    suffixes.iter().map(|s| format!("__p{n}_{s}")).collect()
                };
                let k = max_groups as f64;
                partials.push(PartialSpec {
                    columns,
                    aggregate: index,
                    integer,
                    per_group_bound: per_group,
                    l1: per_group * k,
                    l2: per_group * k.sqrt(),
                });
                n
            };
        let ids: Vec<usize> = match agg.kind {
            AggregateKind::CountStar | AggregateKind::Count => {
                vec![add(&[], true, r, &mut partials)]
            }
            AggregateKind::CountDistinctUnit => vec![add(&[], true, 1.0, &mut partials)],
            AggregateKind::Sum => {
                let b = bounds.ok_or_else(|| QueryError::Internal("SUM without bounds".into()))?;
                let (lo, hi) = if b.per_row {
                    (b.lo.min(r * b.lo), b.hi.max(r * b.hi))
                } else {
                    (b.lo, b.hi)
                };
                vec![add(&[], false, lo.abs().max(hi.abs()), &mut partials)]
            }
            AggregateKind::Avg => vec![
                add(&["sum"], false, half, &mut partials),
                add(&["n"], true, 1.0, &mut partials),
            ],
            AggregateKind::VarPop | AggregateKind::StddevPop => vec![
                add(&["n"], true, r, &mut partials),
                add(&["s1"], false, r * half, &mut partials),
                add(&["s2"], false, r * half * half, &mut partials),
            ],
            AggregateKind::Percentile => {
                let bins: Vec<String> = (0..PERCENTILE_BINS).map(|k| format!("b{k}")).collect();
                let refs: Vec<&str> = bins.iter().map(String::as_str).collect();
                vec![add(&refs, true, r, &mut partials)]
            }
        };
        aggregates.push(AggregateSpec {
            name: agg.name.clone(),
            kind: agg.kind,
            expr: agg.expr.clone(),
            partials: ids,
            bounds,
            percentile: agg.percentile,
            value: agg.value,
        });
    }
    // Keys only: private keys cost their partition selection alone; the
    // keys of public domains are the domains, released for nothing.
    let (cost, selection) = if partials.is_empty() && !private_keys {
        (
            PlanCost {
                rho: 0.0,
                epsilon: 0.0,
                delta: 0.0,
                selection_delta: 0.0,
                per_partial: 0.0,
            },
            None,
        )
    } else {
        split_budget(&options, partials.len(), private_keys.then_some(max_groups))?
    };

    // 6. The local bounded query.
    let salt = match (options_in.sampling_salt, site) {
        (Some(s), _) => s,
        (None, Some(_)) => fresh_salt(),
        (None, None) => 0,
    };
    let (person_groups, partials_select) = local_sql(&LocalSql {
        with: query.with.as_ref().map(|w| {
            w.cte_tables
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }),
        from: &from_sql,
        selection: select.selection.as_ref().map(|e| e.to_string()),
        unit: &unit_sql,
        groups: &group_exprs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        specs: &groups,
        one_row_per_unit: single_row,
        values: &values,
        aggregates: &aggregates,
        partials: &partials,
        max_rows: needs_row_sampling.then_some(max_rows),
        max_groups: needs_group_sampling.then_some(max_groups),
        salt,
        deterministic: options_in.sampling_salt.is_some(),
    });
    let local_sql = format!("{person_groups}\n{partials_select}");
    // Nothing in the query a node will run may fail on a row: every
    // expression, ours and the researcher's, after type coercion.
    let local_plan = plan_sql(&ctx, &local_sql, catalog).await?;
    crate::total::check_plan(&local_plan)?;

    let named_groups: Vec<GroupSpec> = groups;
    let private: Vec<usize> = (0..named_groups.len())
        .filter(|&i| named_groups[i].domain.is_none())
        .collect();
    let key_sql = if options.aggregation == Aggregation::Secure && !private.is_empty() {
        let i = crate::secure_select::secure_private_key(&named_groups)?;
        let sql = format!(
            "{person_groups}\nSELECT DISTINCT __unit, __g{i} AS __key FROM __confer_pg WHERE __g{i} IS NOT NULL"
        );
        crate::total::check_plan(&plan_sql(&ctx, &sql, catalog).await?)?;
        Some(sql)
    } else {
        None
    };
    // 7. What the researcher sees: the released table itself, or the
    //    SELECT list's expressions of it (post-processing).
    let mut post_items: Vec<(String, String)> = Vec::new();
    for (key, agg) in agg_keys.iter().zip(&aggregates) {
        post_items.push((key.clone(), agg.name.clone()));
    }
    for (key, g) in group_keys.iter().zip(&named_groups) {
        post_items.push((key.clone(), g.name.clone()));
    }
    let noisy: Vec<(String, String, String)> = aggregates
        .iter()
        .map(|a| {
            (
                a.name.clone(),
                format!("{}{CI_LOW_SUFFIX}", a.name),
                format!("{}{CI_HIGH_SUFFIX}", a.name),
            )
        })
        .collect();
    let mut item_names: Vec<String> = Vec::new();
    let mut columns: Vec<FinalColumn> = Vec::new();
    let passthrough = |name: &str| FinalColumn {
        name: name.to_string(),
        sql: None,
        noisy: false,
        interval_note: None,
    };
    for f in &finals {
        match f {
            Final::Released(OutputItem::Group(i)) => {
                let name = &named_groups[*i].name;
                item_names.push(name.clone());
                columns.push(passthrough(name));
            }
            Final::Released(OutputItem::Aggregate(a)) => {
                let name = &aggregates[*a].name;
                item_names.push(name.clone());
                columns.push(passthrough(name));
                columns.push(passthrough(&format!("{name}{CI_LOW_SUFFIX}")));
                columns.push(passthrough(&format!("{name}{CI_HIGH_SUFFIX}")));
            }
            Final::Derived { name, sql, written } => {
                item_names.push(name.clone());
                post_items.push((names_in_source.key(written), name.clone()));
                let interval = derive::interval(sql, &noisy);
                let noisy_value = interval != derive::Interval::Exact;
                let note = match &interval {
                    derive::Interval::Omitted(why) => Some(why.clone()),
                    _ => None,
                };
                columns.push(FinalColumn {
                    name: name.clone(),
                    sql: Some(sql.to_string()),
                    noisy: noisy_value,
                    interval_note: note.clone(),
                });
                let (low, high) = match interval {
                    derive::Interval::Exact => continue,
                    derive::Interval::Derived { low, high } => (low, high),
                    derive::Interval::Omitted(_) => (
                        "CAST(NULL AS DOUBLE)".to_string(),
                        "CAST(NULL AS DOUBLE)".to_string(),
                    ),
                };
                for (suffix, sql) in [(CI_LOW_SUFFIX, low), (CI_HIGH_SUFFIX, high)] {
                    columns.push(FinalColumn {
                        name: format!("{name}{suffix}"),
                        sql: Some(sql),
                        noisy: false,
                        interval_note: None,
                    });
                }
            }
        }
    }
    let post = compile_post(&query, &select, &post_items, &item_names, &names_in_source)?;
    let derived = if finals.len() == select_items.len()
        && finals.iter().all(|f| matches!(f, Final::Released(_)))
    {
        None
    } else {
        Some(columns)
    };
    let mut plan = FederatedPlan {
        options,
        local_sql,
        key_sql,
        groups: named_groups,
        aggregates,
        partials,
        selection,
        select: select_items,
        post,
        derived: None,
        cost,
        max_groups,
        max_rows,
        tables: source_prov.tables.iter().cloned().collect(),
        amplification: analyze::amplification(&src_plan, catalog),
    };
    if let Some(columns) = derived {
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
        .map_err(|e| QueryError::Plan(user_terms(&e.to_string(), catalog)))
}

/// Rewrites DataFusion's planning messages for researchers.
fn user_terms(msg: &str, catalog: &Catalog) -> String {
    let msg = msg
        .trim_start_matches("Error during planning: ")
        .replace("datafusion.public.", "")
        .replace("__confer_src.", "");
    if let Some(rest) = msg.strip_prefix("table '")
        && let Some((table, _)) = rest.split_once("' not found")
    {
        let known: Vec<&str> = catalog.tables().map(|t| t.name.as_str()).collect();
        return format!(
            "table {table} is not in the network catalog; known tables: {}",
            known.join(", ")
        );
    }
    if let Some(rest) = msg.strip_prefix("No field named ") {
        return format!("no column named {rest}");
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
        return format!(
            "{name} is not a built-in SQL function, and user-defined functions are not allowed in DP \
             queries: use built-in functions only{hint}"
        );
    }
    msg
}

/// The unit column of the source, as SQL.
fn unit_column(
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

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn column_of<'c>(
    catalog: &'c Catalog,
    origin: &Origin,
) -> Option<&'c confer_protocol::catalog::ColumnInfo> {
    catalog
        .table(&origin.table)
        .and_then(|t| t.column(&origin.column))
}

fn column_type_of(ty: &DataType) -> Option<ColumnType> {
    Some(match ty {
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => ColumnType::Int64,
        DataType::Float16 | DataType::Float32 | DataType::Float64 | DataType::Decimal128(_, _) => {
            ColumnType::Float64
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => ColumnType::Utf8,
        DataType::Date32 | DataType::Date64 => ColumnType::Date,
        DataType::Timestamp(_, _) => ColumnType::Timestamp,
        DataType::Boolean => ColumnType::Boolean,
        DataType::Null => ColumnType::Utf8,
        _ => return None,
    })
}

fn group_default_name(expr: &Expr, index: usize) -> String {
    match expr {
        Expr::Identifier(id) => ident_name(id),
        Expr::CompoundIdentifier(ids) => ids
            .last()
            .map(ident_name)
            .unwrap_or_else(|| format!("group_{index}")),
        Expr::Value(v) if matches!(v.value, Value::SingleQuotedString(_)) => {
            SITE_COLUMN.to_string()
        }
        Expr::Nested(inner) => group_default_name(inner, index),
        _ => format!("group_{index}"),
    }
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

fn parse_sql_expr(sql: &str) -> std::result::Result<Expr, String> {
    Parser::new(&GenericDialect {})
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| e.to_string())
}

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
/// `SELECT v FROM (subquery) AS t(v) WHERE v IS NOT NULL`.
fn guard_nulls(query: &mut Query) -> std::result::Result<(), String> {
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
            return Ok(());
        }
    }
    let sql = format!(
        "SELECT __confer_in_value FROM ({query}) AS __confer_in (__confer_in_value) \
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

/// A fresh random salt for the random choice of groups (OS randomness).
fn fresh_salt() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // The salt only decorrelates which groups a person keeps across
        // queries; privacy does not depend on it.
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

/// Classifies a SELECT item: a DP aggregate, or not.
fn classify(
    expr: &Expr,
    values: &mut Vec<String>,
    raw_values: &mut Vec<Option<String>>,
) -> Result<Option<Agg>> {
    let Expr::Function(f) = expr else {
        return Ok(None);
    };
    let name = function_name(&f.name);
    if !AGGREGATE_NAMES.contains(&name.as_str()) {
        return Ok(None);
    }
    if f.null_treatment.is_some() || !f.within_group.is_empty() || f.over.is_some() {
        return Err(unsupported(
            "WITHIN GROUP, OVER and null treatments on aggregates",
        ));
    }
    // `AGG(x) FILTER (WHERE c)` is `AGG(CASE WHEN c THEN x END)`: rows
    // outside the filter count as NULL, after contribution bounding as
    // any NULL does.
    if let Some(cond) = &f.filter {
        reject_aggregates_in(cond, "FILTER")?;
        let mut unfiltered = f.clone();
        unfiltered.filter = None;
        let FunctionArguments::List(list) = &mut unfiltered.args else {
            return Err(QueryError::Rejected(format!(
                "{expr}: aggregates take an argument list"
            )));
        };
        if matches!(list.duplicate_treatment, Some(DuplicateTreatment::Distinct)) {
            return Err(QueryError::Rejected(format!(
                "{expr}: FILTER with DISTINCT is not supported: put the condition in WHERE"
            )));
        }
        let filtered = |value: &str| {
            parse_sql_expr(&format!("CASE WHEN ({cond}) THEN ({value}) END"))
                .map_err(|e| QueryError::Internal(format!("cannot rewrite FILTER of {expr}: {e}")))
        };
        let first = list.args.iter_mut().find(|a| {
            matches!(
                a,
                FunctionArg::Unnamed(FunctionArgExpr::Wildcard | FunctionArgExpr::Expr(_))
            )
        });
        match first {
            Some(arg @ FunctionArg::Unnamed(FunctionArgExpr::Wildcard)) => {
                *arg = FunctionArg::Unnamed(FunctionArgExpr::Expr(filtered("1")?));
            }
            Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(e))) => {
                *e = filtered(&e.to_string())?;
            }
            _ => {
                return Err(QueryError::Rejected(format!(
                    "{expr}: FILTER needs an aggregate with an argument"
                )));
            }
        }
        let mut agg = classify(&Expr::Function(unfiltered), values, raw_values)?;
        if let Some(agg) = agg.as_mut() {
            agg.expr = expr.to_string();
        }
        return Ok(agg);
    }
    let FunctionArguments::List(list) = &f.args else {
        return Err(QueryError::Rejected(format!(
            "{expr}: aggregates take an argument list"
        )));
    };
    if !list.clauses.is_empty() {
        return Err(unsupported("ORDER BY / LIMIT inside aggregate arguments"));
    }
    let distinct = matches!(list.duplicate_treatment, Some(DuplicateTreatment::Distinct));
    let mut positional: Vec<&Expr> = Vec::new();
    let mut star = false;
    let mut per_group: Option<(f64, f64)> = None;
    let mut per_row: Option<(f64, f64)> = None;
    for arg in &list.args {
        match arg {
            FunctionArg::Unnamed(FunctionArgExpr::Wildcard) => star = true,
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => positional.push(e),
            FunctionArg::Named {
                name: arg_name,
                arg: FunctionArgExpr::Expr(e),
                operator: FunctionArgOperator::RightArrow,
            } => {
                let which = arg_name.value.to_ascii_lowercase();
                let pair = bounds_pair(e).ok_or_else(|| {
                    QueryError::Rejected(format!(
                        "{which} in {expr} must be a pair of numbers: (lo, hi)"
                    ))
                })?;
                if !pair.0.is_finite() || !pair.1.is_finite() {
                    return Err(QueryError::Rejected(format!(
                        "{which} in {expr} must be finite numbers: write bounds the values can reach, such as (0, 1000)"
                    )));
                }
                if pair.0 > pair.1 {
                    return Err(QueryError::Rejected(format!(
                        "{which} in {expr} has lo > hi: write ({}, {})",
                        pair.1, pair.0
                    )));
                }
                match which.as_str() {
                    "contribution_bounds_per_group" => per_group = Some(pair),
                    "contribution_bounds_per_row" => per_row = Some(pair),
                    other => {
                        return Err(QueryError::Rejected(format!(
                            "unknown argument {other} in {expr}: use contribution_bounds_per_group or \
                             contribution_bounds_per_row"
                        )));
                    }
                }
            }
            _ => {
                return Err(QueryError::Rejected(format!(
                    "{expr}: unsupported argument form"
                )));
            }
        }
    }
    for e in &positional {
        reject_aggregates_in(e, &format!("the argument of {}", name.to_ascii_uppercase()))?;
    }
    let mut push_value = |e: &Expr| {
        values.push(format!("CAST(({e}) AS DOUBLE)"));
        raw_values.push(Some(e.to_string()));
        values.len() - 1
    };
    let upper = name.to_ascii_uppercase();
    let default_name = |suffix: Option<&Expr>| match suffix {
        Some(Expr::Identifier(id)) => format!("{name}_{}", ident_name(id)),
        Some(Expr::CompoundIdentifier(ids)) => {
            format!("{name}_{}", ids.last().map(ident_name).unwrap_or_default())
        }
        _ => name.clone(),
    };
    let no_bounds = |kind: &str| -> Result<()> {
        if per_group.is_some() || per_row.is_some() {
            return Err(QueryError::Rejected(format!(
                "{kind} takes no contribution bounds: remove them"
            )));
        }
        Ok(())
    };
    let agg = match (name.as_str(), star, positional.as_slice(), distinct) {
        ("count", true, [], false) => {
            no_bounds("COUNT(*)")?;
            Agg {
                kind: AggregateKind::CountStar,
                name: "count".into(),
                expr: expr.to_string(),
                value: None,
                bounds: None,
                percentile: None,
            }
        }
        ("count", false, [arg], true) => {
            no_bounds("COUNT(DISTINCT ...)")?;
            values.push(arg.to_string());
            raw_values.push(None);
            Agg {
                kind: AggregateKind::CountDistinctUnit,
                name: "count_distinct".into(),
                expr: expr.to_string(),
                value: Some(values.len() - 1),
                bounds: None,
                percentile: None,
            }
        }
        ("count", false, [arg], false) => {
            no_bounds("COUNT(expr)")?;
            values.push(format!("CASE WHEN ({arg}) IS NULL THEN NULL ELSE 1.0 END"));
            raw_values.push(None);
            Agg {
                kind: AggregateKind::Count,
                name: default_name(Some(arg)),
                expr: expr.to_string(),
                value: Some(values.len() - 1),
                bounds: None,
                percentile: None,
            }
        }
        ("sum" | "avg", false, [arg], false) => {
            if per_row.is_some() {
                return Err(QueryError::Rejected(format!(
                    "{upper} bounds each person's contribution to a group: write contribution_bounds_per_group => \
                     (lo, hi), not contribution_bounds_per_row"
                )));
            }
            Agg {
                kind: if name == "sum" {
                    AggregateKind::Sum
                } else {
                    AggregateKind::Avg
                },
                name: default_name(Some(arg)),
                expr: expr.to_string(),
                value: Some(push_value(arg)),
                bounds: per_group.map(|(lo, hi)| (lo, hi, false)),
                percentile: None,
            }
        }
        ("var_pop" | "stddev_pop" | "variance" | "stddev", false, [arg], false) => {
            if per_group.is_some() {
                return Err(QueryError::Rejected(format!(
                    "{upper} bounds each row's value: write contribution_bounds_per_row => (lo, hi)"
                )));
            }
            if name == "variance" || name == "stddev" {
                return Err(QueryError::Rejected(format!(
                    "{upper} is the sample statistic; confer releases population statistics: use {}_POP",
                    if name == "variance" { "VAR" } else { "STDDEV" }
                )));
            }
            Agg {
                kind: if name == "var_pop" {
                    AggregateKind::VarPop
                } else {
                    AggregateKind::StddevPop
                },
                name: default_name(Some(arg)),
                expr: expr.to_string(),
                value: Some(push_value(arg)),
                bounds: per_row.map(|(lo, hi)| (lo, hi, true)),
                percentile: None,
            }
        }
        ("percentile_cont", false, [arg, p], false) => {
            if per_group.is_some() {
                return Err(QueryError::Rejected(
                    "PERCENTILE_CONT bounds each row's value: write contribution_bounds_per_row => (lo, hi)".into(),
                ));
            }
            let p = number(p)
                .filter(|p| (0.0..=1.0).contains(p))
                .ok_or_else(|| {
                    QueryError::Rejected(format!(
                        "the percentile in {expr} must be a number from 0 to 1 (0.5 for the median)"
                    ))
                })?;
            Agg {
                kind: AggregateKind::Percentile,
                name: default_name(Some(arg)),
                expr: expr.to_string(),
                value: Some(push_value(arg)),
                bounds: per_row.map(|(lo, hi)| (lo, hi, true)),
                percentile: Some(p),
            }
        }
        ("min" | "max", ..) => {
            return Err(QueryError::Rejected(format!(
                "{upper} on private values is not allowed: it reveals one person's value; use PERCENTILE_CONT \
                 with bounds instead"
            )));
        }
        ("count", ..) => {
            return Err(QueryError::Rejected(format!(
                "{expr}: COUNT takes *, one expression, or DISTINCT unit"
            )));
        }
        ("sum" | "avg" | "var_pop" | "stddev_pop", _, _, true) => {
            return Err(QueryError::Rejected(format!(
                "{upper}(DISTINCT ...) is not supported: aggregate a per-person value instead"
            )));
        }
        _ => {
            return Err(QueryError::Rejected(format!(
                "{expr} is not a DP aggregate: use COUNT, SUM, AVG, VAR_POP, STDDEV_POP or PERCENTILE_CONT"
            )));
        }
    };
    Ok(Some(agg))
}

fn number(e: &Expr) -> Option<f64> {
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

fn bounds_pair(e: &Expr) -> Option<(f64, f64)> {
    match e {
        Expr::Tuple(items) if items.len() == 2 => Some((number(&items[0])?, number(&items[1])?)),
        _ => None,
    }
}

/// Splits the query's budget over its partials and partition selection.
fn split_budget(
    options: &DpOptions,
    partials: usize,
    selection_groups: Option<usize>,
) -> Result<(PlanCost, Option<Selection>)> {
    let shares = (partials + usize::from(selection_groups.is_some())).max(1) as f64;
    let privacy_err = |e: confer_privacy::PrivacyError| QueryError::Rejected(e.to_string());
    match options.mechanism {
        Mechanism::Gaussian => {
            let delta_selection = if selection_groups.is_some() {
                options.delta / 2.0
            } else {
                0.0
            };
            let delta_noise = options.delta - delta_selection;
            let rho =
                confer_privacy::accounting::rho_for_epsilon_delta(options.epsilon, delta_noise)
                    .map_err(privacy_err)?;
            let per_partial = rho / shares;
            let selection = selection_groups
                .map(|k| {
                    Selection::gaussian(k as u32, per_partial, delta_selection).map_err(privacy_err)
                })
                .transpose()?;
            let epsilon = confer_privacy::accounting::epsilon_for_rho(rho, delta_noise)
                .map_err(privacy_err)?;
            Ok((
                PlanCost {
                    rho,
                    epsilon,
                    delta: options.delta,
                    selection_delta: delta_selection,
                    per_partial,
                },
                selection,
            ))
        }
        Mechanism::Laplace => {
            let per_partial = options.epsilon / shares;
            let selection = selection_groups
                .map(|k| {
                    Selection::laplace(k as u32, per_partial, options.delta).map_err(privacy_err)
                })
                .transpose()?;
            Ok((
                PlanCost {
                    rho: confer_privacy::accounting::rho_for_pure_epsilon(options.epsilon),
                    epsilon: options.epsilon,
                    delta: if selection.is_some() {
                        options.delta
                    } else {
                        0.0
                    },
                    selection_delta: if selection.is_some() {
                        options.delta
                    } else {
                        0.0
                    },
                    per_partial,
                },
                selection,
            ))
        }
    }
}

struct LocalSql<'a> {
    with: Option<String>,
    from: &'a str,
    selection: Option<String>,
    unit: &'a str,
    groups: &'a [String],
    specs: &'a [GroupSpec],
    /// Each person has at most one row: a person's contribution is their
    /// row, with no per-person aggregation.
    one_row_per_unit: bool,
    values: &'a [String],
    aggregates: &'a [AggregateSpec],
    partials: &'a [PartialSpec],
    max_rows: Option<usize>,
    max_groups: Option<usize>,
    salt: u64,
    /// Order a person's rows by a salted hash of the row instead of at
    /// random (the sensitivity auditor runs the query twice and needs the
    /// same choice for the persons it did not change).
    deterministic: bool,
}

fn lit(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v:e}")
    }
}

/// Clamps a value (a DOUBLE) into [lo, hi]. NULL stays NULL: DataFusion's
/// `greatest` skips NULL arguments, so without the CASE a missing value
/// would become `lo` and count in sums, means, variances and percentile
/// bins. NaN is missing too (it is no number to clamp); infinities clamp
/// to the bounds.
fn clamp(expr: &str, lo: f64, hi: f64) -> String {
    format!(
        "CASE WHEN ({expr}) IS NULL OR isnan({expr}) THEN NULL ELSE least(greatest({expr}, {}), {}) END",
        lit(lo),
        lit(hi)
    )
}

/// How a person's rows are ordered before the first `max_rows` of each
/// group are kept: at random, or by a salted hash of the row.
fn row_order(l: &LocalSql<'_>) -> String {
    if !l.deterministic {
        return "random()".into();
    }
    let mut parts = vec![
        format!("'{}'", l.salt),
        "CAST(__unit AS VARCHAR)".to_string(),
    ];
    for i in 0..l.groups.len() {
        parts.push(format!("coalesce(CAST(__g{i} AS VARCHAR), '\u{1}')"));
    }
    for j in 0..l.values.len() {
        parts.push(format!("coalesce(CAST(__v{j} AS VARCHAR), '\u{1}')"));
    }
    format!("md5(concat({}))", parts.join(", '\u{2}', "))
}

/// The local bounded query as its `WITH` part (ending with `__confer_pg`,
/// one row per person and group after contribution bounding) and the final
/// `SELECT` of the partials over it.
fn local_sql(l: &LocalSql<'_>) -> (String, String) {
    let gcols: Vec<String> = (0..l.groups.len()).map(|i| format!("__g{i}")).collect();
    let mut sql = String::from("WITH ");
    if let Some(w) = &l.with
        && !w.is_empty()
    {
        let _ = writeln!(sql, "{w},");
    }
    // Source rows.
    let _ = write!(sql, "__confer_src AS (SELECT {} AS __unit", l.unit);
    for (i, g) in l.groups.iter().enumerate() {
        let cast = match l.specs[i].column_type {
            ColumnType::Int64 => format!("TRY_CAST({g} AS BIGINT)"),
            ColumnType::Float64 => format!("TRY_CAST({g} AS DOUBLE)"),
            ColumnType::Utf8 => format!("TRY_CAST({g} AS VARCHAR)"),
            _ => g.clone(),
        };
        let _ = write!(sql, ", {cast} AS __g{i}");
    }
    for (j, v) in l.values.iter().enumerate() {
        let _ = write!(sql, ", {v} AS __v{j}");
    }
    // Percentile bins are computed per row here.
    for a in l.aggregates {
        if a.kind == AggregateKind::Percentile
            && let (Some(b), Some(j)) = (a.bounds, value_index(a))
        {
            let width = (b.hi - b.lo) / PERCENTILE_BINS as f64;
            let bin = format!(
                "CASE WHEN ({v}) IS NULL THEN NULL ELSE least(greatest(TRY_CAST(floor(({} - {}) / {}) AS BIGINT), 0), {}) END",
                clamp(&l.values[j], b.lo, b.hi),
                lit(b.lo),
                lit(width.max(f64::MIN_POSITIVE)),
                PERCENTILE_BINS - 1,
                v = l.values[j],
            );
            let _ = write!(sql, ", {bin} AS __bin{j}");
        }
    }
    let _ = write!(sql, " FROM {}", l.from);
    let mut conditions: Vec<String> = Vec::new();
    if let Some(s) = &l.selection {
        conditions.push(format!("({s})"));
    }
    conditions.push(format!("{} IS NOT NULL", l.unit));
    for (g, spec) in l.groups.iter().zip(l.specs) {
        if let Some(domain) = &spec.domain {
            conditions.push(domain_condition(g, domain));
        }
    }
    let _ = write!(sql, " WHERE {})", conditions.join(" AND "));

    // Random choice of groups per person and rows per person and group.
    let person_group: Vec<&str> = std::iter::once("__unit")
        .chain(gcols.iter().map(String::as_str))
        .collect();
    let person_group = person_group.join(", ");
    let mut rows_table = "__confer_src";
    if l.one_row_per_unit {
        // The catalog (or a per-person summary) says one row per person;
        // the plan enforces it rather than trusting files that are read
        // again for every query: one row per person, each column taken
        // from that person's own rows.
        let mut cols: Vec<String> = gcols.iter().map(|g| format!("min({g}) AS {g}")).collect();
        cols.extend((0..l.values.len()).map(|j| format!("min(__v{j}) AS __v{j}")));
        for a in l.aggregates {
            if a.kind == AggregateKind::Percentile
                && let Some(j) = value_index(a)
            {
                cols.push(format!("min(__bin{j}) AS __bin{j}"));
            }
        }
        let mut select = vec!["__unit".to_string()];
        select.extend(cols);
        let _ = write!(
            sql,
            ",\n__confer_one AS (SELECT {} FROM __confer_src GROUP BY __unit)",
            select.join(", ")
        );
        rows_table = "__confer_one";
    } else if l.max_rows.is_some() || l.max_groups.is_some() {
        let _ = write!(sql, ",\n__confer_ranked AS (SELECT *");
        if l.max_groups.is_some() {
            let keys: Vec<String> = gcols
                .iter()
                .map(|g| format!("coalesce(CAST({g} AS VARCHAR), '\u{1}')"))
                .collect();
            let _ = write!(
                sql,
                ", dense_rank() OVER (PARTITION BY __unit ORDER BY md5(concat('{}', CAST(__unit AS VARCHAR), '\u{2}', {})), {}) AS __group_rank",
                l.salt,
                keys.join(", '\u{2}', "),
                gcols.join(", ")
            );
        }
        if l.max_rows.is_some() {
            let _ = write!(
                sql,
                ", row_number() OVER (PARTITION BY {person_group} ORDER BY {}) AS __row_rank",
                row_order(l)
            );
        }
        let _ = write!(sql, " FROM __confer_src)");
        let mut keep = Vec::new();
        if let Some(k) = l.max_groups {
            keep.push(format!("__group_rank <= {k}"));
        }
        if let Some(r) = l.max_rows {
            keep.push(format!("__row_rank <= {r}"));
        }
        let _ = write!(
            sql,
            ",\n__confer_rows AS (SELECT * FROM __confer_ranked WHERE {})",
            keep.join(" AND ")
        );
        rows_table = "__confer_rows";
    }

    // Per person and group: each person's contribution (their row itself
    // when each person has at most one row: no per-person aggregation).
    let one = l.one_row_per_unit;
    let _ = write!(sql, ",\n__confer_pg AS (SELECT {person_group}");
    let mut finals: Vec<String> = gcols.clone();
    for a in l.aggregates {
        let j = value_index(a);
        let v = j.map(|j| format!("__v{j}")).unwrap_or_default();
        let cols = |i: usize| &l.partials[a.partials[i]].columns;
        match a.kind {
            AggregateKind::CountStar => {
                let c = &cols(0)[0];
                let _ = write!(
                    sql,
                    ", {} AS {c}",
                    if one {
                        "1".to_string()
                    } else {
                        "count(*)".to_string()
                    }
                );
                finals.push(format!("CAST(sum({c}) AS BIGINT) AS {c}"));
            }
            AggregateKind::Count => {
                let c = &cols(0)[0];
                let _ = write!(
                    sql,
                    ", {} AS {c}",
                    if one {
                        format!("CASE WHEN {v} IS NULL THEN 0 ELSE 1 END")
                    } else {
                        format!("count({v})")
                    }
                );
                finals.push(format!("CAST(sum({c}) AS BIGINT) AS {c}"));
            }
            AggregateKind::CountDistinctUnit => {
                finals.push(format!("CAST(count(*) AS BIGINT) AS {}", cols(0)[0]));
            }
            AggregateKind::Sum => {
                let c = &cols(0)[0];
                let b = a.bounds.unwrap_or(Bounds {
                    lo: 0.0,
                    hi: 0.0,
                    per_row: true,
                });
                if b.per_row {
                    let row = clamp(&v, b.lo, b.hi);
                    let _ = write!(
                        sql,
                        ", {} AS {c}",
                        if one { row } else { format!("sum({row})") }
                    );
                } else {
                    let total = if one { v.clone() } else { format!("sum({v})") };
                    let _ = write!(sql, ", {} AS {c}", clamp(&total, b.lo, b.hi));
                }
                finals.push(format!("CAST(sum({c}) AS DOUBLE) AS {c}"));
            }
            AggregateKind::Avg => {
                let (s, n) = (&cols(0)[0], &cols(1)[0]);
                let b = a.bounds.unwrap_or(Bounds {
                    lo: 0.0,
                    hi: 0.0,
                    per_row: true,
                });
                let mid = (b.lo + b.hi) / 2.0;
                let mean = if one {
                    clamp(&v, b.lo, b.hi)
                } else if b.per_row {
                    format!("avg({})", clamp(&v, b.lo, b.hi))
                } else {
                    clamp(&format!("avg({v})"), b.lo, b.hi)
                };
                let _ = write!(sql, ", {mean} - {} AS {s}", lit(mid));
                finals.push(format!("CAST(sum({s}) AS DOUBLE) AS {s}"));
                finals.push(format!("CAST(count({s}) AS BIGINT) AS {n}"));
            }
            AggregateKind::VarPop | AggregateKind::StddevPop => {
                let (n, s1, s2) = (&cols(0)[0], &cols(1)[0], &cols(2)[0]);
                let b = a.bounds.unwrap_or(Bounds {
                    lo: 0.0,
                    hi: 0.0,
                    per_row: true,
                });
                let mid = (b.lo + b.hi) / 2.0;
                let centred = format!("({} - {})", clamp(&v, b.lo, b.hi), lit(mid));
                if one {
                    let _ = write!(
                        sql,
                        ", CASE WHEN {v} IS NULL THEN 0 ELSE 1 END AS {n}, {centred} AS {s1}, {centred} * {centred} AS {s2}"
                    );
                } else {
                    let _ = write!(
                        sql,
                        ", count({v}) AS {n}, sum({centred}) AS {s1}, sum({centred} * {centred}) AS {s2}"
                    );
                }
                finals.push(format!("CAST(sum({n}) AS BIGINT) AS {n}"));
                finals.push(format!("CAST(sum({s1}) AS DOUBLE) AS {s1}"));
                finals.push(format!("CAST(sum({s2}) AS DOUBLE) AS {s2}"));
            }
            AggregateKind::Percentile => {
                let j = j.unwrap_or(0);
                for (k, c) in cols(0).iter().enumerate() {
                    if one {
                        let _ = write!(sql, ", CASE WHEN __bin{j} = {k} THEN 1 ELSE 0 END AS {c}");
                    } else {
                        let _ = write!(sql, ", count(CASE WHEN __bin{j} = {k} THEN 1 END) AS {c}");
                    }
                    finals.push(format!("CAST(sum({c}) AS BIGINT) AS {c}"));
                }
            }
        }
    }
    if one {
        let _ = write!(sql, " FROM {rows_table})");
    } else {
        let _ = write!(sql, " FROM {rows_table} GROUP BY {person_group})");
    }
    finals.push("CAST(count(*) AS BIGINT) AS __persons".into());
    let mut last = format!("SELECT {} FROM __confer_pg", finals.join(", "));
    if !gcols.is_empty() {
        let _ = write!(last, " GROUP BY {}", gcols.join(", "));
    }
    (sql, last)
}

/// The value column an aggregate reads (`__v{j}`), from its partial's position.
fn value_index(a: &AggregateSpec) -> Option<usize> {
    a.value
}

fn check_domain_type(column: &str, ty: ColumnType, values: &[DomainValue]) -> Result<()> {
    for v in values {
        let ok = matches!(
            (ty, v),
            (ColumnType::Int64, DomainValue::Int(_)) | (ColumnType::Utf8, DomainValue::Text(_))
        );
        if !ok {
            return Err(QueryError::Plan(format!(
                "the catalog's domain for {column} holds {v}, which is not a {ty} value: fix the domain in node.toml"
            )));
        }
    }
    Ok(())
}

fn unsupported(what: &str) -> QueryError {
    QueryError::Rejected(format!("{what} are not supported in DP queries yet"))
}

fn ident_name(ident: &Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_ascii_lowercase()
    }
}

fn unique_name(names: &mut Vec<String>, wanted: String) -> String {
    let mut name = wanted.clone();
    let mut n = 2;
    while names.contains(&name) {
        name = format!("{wanted}_{n}");
        n += 1;
    }
    names.push(name.clone());
    name
}

/// Rejects identifiers that could collide with the names the compiler generates.
fn reject_reserved_names(query: &Query) -> Result<()> {
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

fn check_select_shape(select: &Select) -> Result<()> {
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

/// Names of SQL aggregate functions that must not appear outside DP aggregates.
const AGGREGATE_NAMES: &[&str] = &[
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

fn function_name(name: &ObjectName) -> String {
    name.to_string().to_ascii_lowercase()
}

fn reject_aggregates_in(expr: &Expr, clause: &str) -> Result<()> {
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
fn reject_inner_order_by(query: &Query) -> Result<()> {
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

fn reject_subqueries(expr: &Expr, clause: &str) -> Result<()> {
    struct Finder(bool);
    impl Visitor for Finder {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            if matches!(
                expr,
                Expr::Subquery(_) | Expr::InSubquery { .. } | Expr::Exists { .. }
            ) {
                self.0 = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
    }
    let mut finder = Finder(false);
    let _ = expr.visit(&mut finder);
    if finder.0 {
        return Err(unsupported(&format!("subqueries in {clause}")));
    }
    Ok(())
}

/// The filter that keeps rows whose key is in the public domain: runs of
/// consecutive integers as BETWEEN (a range domain of any size is one
/// comparison), other values as an IN list.
fn domain_condition(expr: &str, domain: &[DomainValue]) -> String {
    let mut ints: Vec<i64> = domain
        .iter()
        .filter_map(|v| match v {
            DomainValue::Int(i) => Some(*i),
            DomainValue::Text(_) => None,
        })
        .collect();
    ints.sort_unstable();
    ints.dedup();
    let mut singles: Vec<String> = domain
        .iter()
        .filter(|v| matches!(v, DomainValue::Text(_)))
        .map(ToString::to_string)
        .collect();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ints.len() {
        let mut j = i;
        while j + 1 < ints.len() && ints[j + 1] == ints[j] + 1 {
            j += 1;
        }
        if j - i >= 3 {
            parts.push(format!("({expr}) BETWEEN {} AND {}", ints[i], ints[j]));
        } else {
            singles.extend(ints[i..=j].iter().map(ToString::to_string));
        }
        i = j + 1;
    }
    if !singles.is_empty() {
        parts.push(format!("({expr}) IN ({})", singles.join(", ")));
    }
    if parts.is_empty() {
        return "FALSE".into();
    }
    format!("({})", parts.join(" OR "))
}

/// Rewrites post-processing expressions (HAVING, ORDER BY) to refer to
/// released columns by name.
pub(crate) struct ReleasedNames<'a> {
    /// (resolved expression, released name)
    pub(crate) items: &'a [(String, String)],
    pub(crate) names: &'a derive::Names,
    pub(crate) missing: Option<String>,
}

impl VisitorMut for ReleasedNames<'_> {
    type Break = ();
    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        let key = self.names.key(expr);
        if let Some((_, name)) = self.items.iter().find(|(k, _)| *k == key) {
            *expr = Expr::Identifier(Ident::with_quote('"', name.clone()));
            return ControlFlow::Continue(());
        }
        if is_aggregate_call(expr) {
            self.missing = Some(expr.to_string());
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }
}

/// Compiles HAVING / ORDER BY / LIMIT into post-processing over the
/// released table (`items`: what each released name computes;
/// `item_names`: the SELECT list's names, for ORDER BY positions).
pub(crate) fn compile_post(
    query: &Query,
    select: &Select,
    items: &[(String, String)],
    item_names: &[String],
    names: &derive::Names,
) -> Result<PostProcess> {
    let rewrite = |expr: &Expr, clause: &str| -> Result<String> {
        if clause == "ORDER BY"
            && let Expr::Value(v) = derive::strip(expr)
            && let Value::Number(n, _) = &v.value
        {
            let name = n
                .parse::<usize>()
                .ok()
                .and_then(|k| k.checked_sub(1))
                .and_then(|k| item_names.get(k))
                .ok_or_else(|| {
                    QueryError::Rejected(format!(
                        "ORDER BY {n}: the SELECT list has {} item(s), numbered from 1",
                        item_names.len()
                    ))
                })?;
            return Ok(Expr::Identifier(Ident::with_quote('"', name.clone())).to_string());
        }
        let mut e = expr.clone();
        let mut released = ReleasedNames {
            items,
            names,
            missing: None,
        };
        let _ = VisitMut::visit(&mut e, &mut released);
        if let Some(agg) = released.missing {
            return Err(QueryError::Rejected(format!(
                "{clause} uses {agg}, which the query does not release: add it to the SELECT list \
                 (with an alias) and refer to that"
            )));
        }
        reject_subqueries(&e, clause)?;
        Ok(e.to_string())
    };
    let having = select
        .having
        .as_ref()
        .map(|h| rewrite(h, "HAVING"))
        .transpose()?;
    let mut order_by = Vec::new();
    if let Some(ob) = &query.order_by {
        match &ob.kind {
            datafusion::sql::sqlparser::ast::OrderByKind::Expressions(exprs) => {
                for o in exprs {
                    if o.with_fill.is_some() {
                        return Err(unsupported("ORDER BY ... WITH FILL"));
                    }
                    let mut text = rewrite(&o.expr, "ORDER BY")?;
                    let opts = o.options.to_string();
                    if !opts.is_empty() {
                        text.push_str(&opts);
                    }
                    order_by.push(text);
                }
            }
            datafusion::sql::sqlparser::ast::OrderByKind::All(_) => {
                return Err(QueryError::Rejected(
                    "ORDER BY ALL is not accepted: list the columns".into(),
                ));
            }
        }
    }
    let (limit, offset) = match &query.limit_clause {
        None => (None, None),
        Some(datafusion::sql::sqlparser::ast::LimitClause::LimitOffset {
            limit,
            offset,
            limit_by,
        }) => {
            if !limit_by.is_empty() {
                return Err(unsupported("LIMIT BY"));
            }
            (
                limit.as_ref().map(|l| l.to_string()),
                offset.as_ref().map(|o| o.value.to_string()),
            )
        }
        Some(datafusion::sql::sqlparser::ast::LimitClause::OffsetCommaLimit { offset, limit }) => {
            (Some(limit.to_string()), Some(offset.to_string()))
        }
    };
    Ok(PostProcess {
        having,
        order_by,
        limit,
        offset,
    })
}
