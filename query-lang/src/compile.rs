//! Compiling a DP query against the catalog into a [`FederatedPlan`].
//!
//! The compiler checks what the query may do, resolves bounds and domains
//! from the catalog, and writes the *local bounded query*: plain SQL that
//! each node runs with DataFusion. Its shape is always
//!
//! ```text
//! __confer_src   one row per input row: the person, the group keys, the aggregate arguments
//! __confer_rows  at most max_rows_contributed rows per person per group, chosen at random
//! __confer_pg    one row per person per group: that person's contribution to each aggregate
//! __confer_sel   at most max_groups_contributed groups per person, chosen at random
//! final SELECT   per group: the exact partial aggregates, summed over persons
//! ```
//!
//! Steps that cannot change the result are left out (no row sampling when
//! every aggregate counts persons; no group sampling when a person cannot
//! reach more groups than allowed). The node adds noise to the partials
//! ([`crate::release`]); the coordinator combines them ([`crate::combine`]).

use std::fmt::Write as _;

use confer_protocol::catalog::{ColumnType, DomainValue, TableInfo};
use datafusion::sql::sqlparser::ast::{
    DuplicateTreatment, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, Ident,
    ObjectName, Query, Select, SelectItem, SetExpr, TableFactor, Visit, VisitMut, Visitor,
    VisitorMut,
};
use std::ops::ControlFlow;

use crate::catalog::Catalog;
use crate::error::{QueryError, Result};
use crate::options::{Aggregation, DpOptions, Mechanism};
use crate::parse::ParsedQuery;
use crate::plan::{
    AggregateKind, AggregateSpec, FederatedPlan, GroupSpec, OutputItem, PartialSpec, PlanCost,
    PostProcess,
};

/// Name of the pseudo-column that holds the node's site name.
pub const SITE_COLUMN: &str = "site";

/// Upper limit on the number of public groups (the product of the domains).
pub const MAX_PUBLIC_GROUPS: usize = 1_000_000;

/// Compiles a parsed DP query. `site` is the node's name when a node
/// compiles (it fills the `site` pseudo-column); `None` at the coordinator.
pub fn compile(
    parsed: &ParsedQuery,
    catalog: &Catalog,
    site: Option<&str>,
) -> Result<FederatedPlan> {
    let options = parsed.options.clone().ok_or_else(|| {
        QueryError::Rejected(
            "this query reads person-level data and needs the DP clause: write \
             SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, delta = 1e-6) ..."
                .into(),
        )
    })?;
    if options.aggregation == Aggregation::Secure {
        return Err(QueryError::Rejected(
            "aggregation = 'secure' is not available yet in this version: use aggregation = 'per_site' \
             (the default)"
                .into(),
        ));
    }
    let query = &parsed.query;
    reject_reserved_names(query)?;
    if query.with.is_some() {
        return Err(unsupported("WITH (common table expressions) in DP queries"));
    }
    if query.fetch.is_some() || !query.locks.is_empty() || query.for_clause.is_some() {
        return Err(unsupported("FETCH / FOR clauses"));
    }
    let select = match query.body.as_ref() {
        SetExpr::Select(select) => select.as_ref(),
        SetExpr::Query(_) => {
            return Err(QueryError::Rejected(
                "put the DP clause on the outermost SELECT, not around a parenthesised query"
                    .into(),
            ));
        }
        _ => {
            return Err(QueryError::Rejected(
                "UNION, INTERSECT, EXCEPT and VALUES cannot carry the DP clause: \
                 run each SELECT as its own DP query"
                    .into(),
            ));
        }
    };
    check_select_shape(select)?;

    let scope = Scope::from_select(select, catalog)?;
    let unit = scope.unit(&options)?;
    let site_literal = format!("'{}'", site.unwrap_or("").replace('\'', "''"));

    // Group keys.
    let group_exprs = match &select.group_by {
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
    let mut groups: Vec<GroupSpec> = Vec::new();
    let mut group_sql: Vec<String> = Vec::new();
    for expr in &group_exprs {
        reject_aggregates_in(expr, "GROUP BY")?;
        let (spec, sql) = scope.group(expr, catalog, &site_literal)?;
        groups.push(spec);
        group_sql.push(sql);
    }
    let public_groups: usize = groups
        .iter()
        .try_fold(1usize, |acc, g| {
            acc.checked_mul(g.domain.len().max(1))
                .filter(|n| *n <= MAX_PUBLIC_GROUPS)
        })
        .ok_or_else(|| {
            QueryError::Rejected(format!(
                "the public group domains multiply to more than {MAX_PUBLIC_GROUPS} groups: \
             group by fewer or coarser columns"
            ))
        })?;

    // Select list: group references and aggregates.
    let mut aggregates: Vec<AggregateSpec> = Vec::new();
    let mut select_items: Vec<OutputItem> = Vec::new();
    let mut names: Vec<String> = Vec::new();
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
        if let Some(kind) = scope.aggregate(expr, &unit)? {
            let name = unique_name(
                &mut names,
                alias.map(ident_name).unwrap_or_else(|| kind.default_name()),
            );
            select_items.push(OutputItem::Aggregate(aggregates.len()));
            aggregates.push(AggregateSpec {
                name,
                kind,
                expr: expr.to_string(),
                partials: Vec::new(),
            });
        } else if let Some(index) = group_exprs.iter().position(|g| same_expr(g, expr)) {
            let name = unique_name(
                &mut names,
                alias
                    .map(ident_name)
                    .unwrap_or_else(|| groups[index].name.clone()),
            );
            groups[index].name = name.clone();
            select_items.push(OutputItem::Group(index));
        } else {
            reject_aggregates_in(expr, "SELECT")?;
            return Err(QueryError::Rejected(format!(
                "{expr} is neither a GROUP BY key nor a DP aggregate: releasing it would reveal \
                 person-level values; add it to GROUP BY (with a public domain) or aggregate it"
            )));
        }
    }
    if aggregates.is_empty() {
        return Err(QueryError::Rejected(
            "a DP query must release at least one aggregate, such as COUNT(*)".into(),
        ));
    }
    // Group keys that are not selected still shape the result; name them anyway.
    for g in &mut groups {
        if !names.contains(&g.name) {
            g.name = unique_name(&mut names, g.name.clone());
        }
    }

    if let Some(selection) = &select.selection {
        reject_aggregates_in(selection, "WHERE")?;
        reject_subqueries(selection, "WHERE")?;
    }

    // Contribution bounds and sensitivities.
    let max_groups = if groups.is_empty() {
        1
    } else {
        (options.max_groups_contributed as usize).min(public_groups)
    };
    let max_rows = options.max_rows_contributed as usize;
    let mut partials: Vec<PartialSpec> = Vec::new();
    for (index, agg) in aggregates.iter_mut().enumerate() {
        let bound = agg.kind.per_group_bound(max_rows);
        agg.partials.push(partials.len());
        partials.push(PartialSpec {
            column: format!("__p{}", partials.len()),
            aggregate: index,
            integer: true,
            per_group_bound: bound,
            l1: bound * max_groups as f64,
            l2: bound * (max_groups as f64).sqrt(),
        });
    }
    let cost = PlanCost::split(&options, &partials)?;

    let needs_row_sampling = aggregates.iter().any(|a| a.kind.depends_on_rows());
    let needs_group_sampling =
        !groups.is_empty() && (options.max_groups_contributed as usize) < public_groups;
    let local_sql = local_sql(LocalSql {
        from: &scope.from_sql,
        selection: select.selection.as_ref().map(|e| e.to_string()),
        unit: &unit.sql,
        groups: &group_sql,
        domains: &groups,
        aggregates: &aggregates,
        partials: &partials,
        max_rows: needs_row_sampling.then_some(max_rows),
        max_groups: needs_group_sampling.then_some(max_groups),
    });

    let post = compile_post(
        query,
        select,
        &select_items,
        &aggregates,
        &groups,
        &group_exprs,
    )?;

    Ok(FederatedPlan {
        options,
        local_sql,
        groups,
        aggregates,
        partials,
        select: select_items,
        post,
        cost,
        max_groups,
        max_rows,
        tables: scope.tables.iter().map(|(_, t)| t.name.clone()).collect(),
    })
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

fn same_expr(a: &Expr, b: &Expr) -> bool {
    a.to_string().eq_ignore_ascii_case(&b.to_string())
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
    struct Finder(Option<String>);
    impl Visitor for Finder {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            if let Expr::Function(f) = expr
                && AGGREGATE_NAMES.contains(&function_name(&f.name).as_str())
            {
                self.0 = Some(expr.to_string());
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
    }
    let mut finder = Finder(None);
    let _ = expr.visit(&mut finder);
    match finder.0 {
        Some(agg) => Err(QueryError::Rejected(format!(
            "the aggregate {agg} may not appear in {clause}: DP aggregates go directly in the SELECT list"
        ))),
        None => Ok(()),
    }
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

/// The privacy unit as the local query reads it.
struct Unit {
    sql: String,
    name: String,
}

/// The tables in scope of the DP SELECT.
struct Scope<'c> {
    /// (qualifier the query uses, table)
    tables: Vec<(String, &'c TableInfo)>,
    from_sql: String,
}

impl<'c> Scope<'c> {
    fn from_select(select: &Select, catalog: &'c Catalog) -> Result<Self> {
        if select.from.is_empty() {
            return Err(QueryError::Rejected(
                "a DP query must read a table: add FROM <table>".into(),
            ));
        }
        if select.from.len() > 1 || !select.from[0].joins.is_empty() {
            return Err(unsupported("joins"));
        }
        let relation = &select.from[0].relation;
        let (name, alias) = match relation {
            TableFactor::Table {
                name,
                alias,
                args: None,
                with_hints,
                version: None,
                with_ordinality: false,
                partitions,
                json_path: None,
                sample: None,
                index_hints,
            } if with_hints.is_empty() && partitions.is_empty() && index_hints.is_empty() => {
                (name, alias)
            }
            TableFactor::Derived { .. } => return Err(unsupported("subqueries in FROM")),
            other => {
                return Err(QueryError::Rejected(format!(
                    "FROM {other} is not a plain table: DP queries read catalog tables"
                )));
            }
        };
        if name.0.len() != 1 {
            return Err(QueryError::Plan(format!(
                "table {name} is not in the network catalog: name tables without schema or catalog prefixes"
            )));
        }
        let table_name = name.to_string().trim_matches('"').to_ascii_lowercase();
        let table = catalog.table(&table_name).ok_or_else(|| {
            let known: Vec<&str> = catalog.tables().map(|t| t.name.as_str()).collect();
            QueryError::Plan(format!(
                "table {table_name} is not in the network catalog; known tables: {}",
                known.join(", ")
            ))
        })?;
        if let Some(alias) = alias
            && !alias.columns.is_empty()
        {
            return Err(unsupported("column lists in table aliases"));
        }
        let qualifier = alias
            .as_ref()
            .map(|a| ident_name(&a.name))
            .unwrap_or_else(|| table.name.clone());
        let from_sql = match alias {
            Some(a) => format!("{} AS {}", table.name, a.name),
            None => table.name.clone(),
        };
        Ok(Self {
            tables: vec![(qualifier, table)],
            from_sql,
        })
    }

    /// The privacy unit column, from the options or the catalog.
    fn unit(&self, options: &DpOptions) -> Result<Unit> {
        let (qualifier, table) = &self.tables[0];
        let declared = table.privacy_unit.as_deref().ok_or_else(|| {
            QueryError::Rejected(format!(
                "table {} is public: query it without the DP clause",
                table.name
            ))
        })?;
        if let Some(asked) = &options.privacy_unit_column
            && !asked.eq_ignore_ascii_case(declared)
        {
            return Err(QueryError::Rejected(format!(
                "privacy_unit_column = {asked} is not the privacy unit of {} (declared: {declared}): \
                 drop the option or set it to {declared}",
                table.name
            )));
        }
        Ok(Unit {
            sql: format!("{qualifier}.{declared}"),
            name: declared.to_string(),
        })
    }

    /// Resolves a column reference to its table and column.
    fn column(&self, expr: &Expr) -> Option<(&'c TableInfo, String)> {
        let (qualifier, name) = match expr {
            Expr::Identifier(id) => (None, ident_name(id)),
            Expr::CompoundIdentifier(ids) if ids.len() == 2 => {
                (Some(ident_name(&ids[0])), ident_name(&ids[1]))
            }
            Expr::Nested(inner) => return self.column(inner),
            _ => return None,
        };
        self.tables.iter().find_map(|(q, table)| {
            if qualifier.as_ref().is_some_and(|wanted| wanted != q) {
                return None;
            }
            table.column(&name).map(|c| (*table, c.name.clone()))
        })
    }

    /// A GROUP BY key: its spec and its SQL in the local query.
    fn group(
        &self,
        expr: &Expr,
        catalog: &Catalog,
        site_literal: &str,
    ) -> Result<(GroupSpec, String)> {
        if let Some((table, column)) = self.column(expr) {
            let info = table.column(&column).ok_or_else(|| {
                QueryError::Internal(format!("resolved column {column} vanished"))
            })?;
            let domain = info.domain.as_ref().ok_or_else(|| {
                QueryError::Rejected(format!(
                    "group column {column} has no public domain in the catalog; grouping by \
                     private keys needs DP partition selection, which is not available yet: \
                     group by a column with a declared domain, or declare one for {}.{column} in node.toml",
                    table.name
                ))
            })?;
            check_domain_type(&column, info.column_type, &domain.values())?;
            let spec = GroupSpec {
                name: column.clone(),
                column_type: info.column_type,
                domain: domain.values(),
            };
            return Ok((spec, format!("{}", expr)));
        }
        if let Expr::Identifier(id) = expr
            && ident_name(id) == SITE_COLUMN
        {
            let spec = GroupSpec {
                name: SITE_COLUMN.into(),
                column_type: ColumnType::Utf8,
                domain: catalog
                    .sites()
                    .iter()
                    .map(|s| DomainValue::Text(s.clone()))
                    .collect(),
            };
            return Ok((spec, site_literal.to_string()));
        }
        match expr {
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) => {
                let table = self.tables[0].1;
                let names: Vec<&str> = table.columns.iter().map(|c| c.name.as_str()).collect();
                Err(QueryError::Plan(format!(
                    "column {expr} is not in table {}; its columns are: {}",
                    table.name,
                    names.join(", ")
                )))
            }
            _ => Err(unsupported("GROUP BY expressions other than columns")),
        }
    }

    /// Classifies a SELECT item as a DP aggregate (or not).
    fn aggregate(&self, expr: &Expr, unit: &Unit) -> Result<Option<AggregateKind>> {
        let Expr::Function(f) = expr else {
            return Ok(None);
        };
        let name = function_name(&f.name);
        if !AGGREGATE_NAMES.contains(&name.as_str()) {
            return Ok(None);
        }
        if f.filter.is_some() || f.null_treatment.is_some() || !f.within_group.is_empty() {
            return Err(unsupported(
                "FILTER, WITHIN GROUP and null treatments on aggregates",
            ));
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
        match (name.as_str(), list.args.as_slice(), distinct) {
            ("count", [FunctionArg::Unnamed(FunctionArgExpr::Wildcard)], false) => {
                Ok(Some(AggregateKind::CountStar))
            }
            ("count", [FunctionArg::Unnamed(FunctionArgExpr::Expr(arg))], true) => {
                match self.column(arg) {
                    Some((_, column)) if column == unit.name => {
                        Ok(Some(AggregateKind::CountDistinctUnit))
                    }
                    _ => Err(QueryError::Rejected(format!(
                        "COUNT(DISTINCT {arg}) is supported only for the privacy unit: write \
                         COUNT(DISTINCT {})",
                        unit.name
                    ))),
                }
            }
            ("min" | "max", _, _) => Err(QueryError::Rejected(format!(
                "{} on private values is not allowed: it reveals one person's value; use \
                 PERCENTILE_CONT with bounds instead",
                name.to_ascii_uppercase()
            ))),
            _ => Err(QueryError::Rejected(format!(
                "{expr} is not available yet: this version releases COUNT(*) and COUNT(DISTINCT {})",
                unit.name
            ))),
        }
    }
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

struct LocalSql<'a> {
    from: &'a str,
    selection: Option<String>,
    unit: &'a str,
    groups: &'a [String],
    domains: &'a [GroupSpec],
    aggregates: &'a [AggregateSpec],
    partials: &'a [PartialSpec],
    max_rows: Option<usize>,
    max_groups: Option<usize>,
}

fn local_sql(l: LocalSql<'_>) -> String {
    let gcols: Vec<String> = (0..l.groups.len()).map(|i| format!("__g{i}")).collect();
    let mut sql = String::from("WITH __confer_src AS (SELECT ");
    let _ = write!(sql, "{} AS __unit", l.unit);
    for (i, g) in l.groups.iter().enumerate() {
        let _ = write!(sql, ", {g} AS __g{i}");
    }
    let _ = write!(sql, " FROM {}", l.from);
    let mut conditions: Vec<String> = Vec::new();
    if let Some(s) = &l.selection {
        conditions.push(format!("({s})"));
    }
    conditions.push(format!("{} IS NOT NULL", l.unit));
    for (g, spec) in l.groups.iter().zip(l.domains) {
        conditions.push(domain_condition(g, &spec.domain));
    }
    let _ = write!(sql, " WHERE {})", conditions.join(" AND "));

    let person_group: Vec<&str> = std::iter::once("__unit")
        .chain(gcols.iter().map(String::as_str))
        .collect();
    let person_group = person_group.join(", ");
    // Random choices: each row gets a random number, and row_number() over
    // it keeps the first max_rows rows per person and group.
    let mut rows_table = "__confer_src";
    if let Some(max_rows) = l.max_rows {
        let _ = write!(
            sql,
            ",\n__confer_rows AS (SELECT * FROM (SELECT *, row_number() OVER \
             (PARTITION BY {person_group} ORDER BY __r) AS __rn FROM \
             (SELECT *, random() AS __r FROM __confer_src) AS __t1) AS __t2 WHERE __rn <= {max_rows})"
        );
        rows_table = "__confer_rows";
    }

    let _ = write!(sql, ",\n__confer_pg AS (SELECT {person_group}");
    for p in l.partials {
        if let Some(contrib) = l.aggregates[p.aggregate].kind.person_contribution() {
            let _ = write!(sql, ", {contrib} AS {}", p.column);
        }
    }
    let _ = write!(sql, " FROM {rows_table} GROUP BY {person_group})");

    let mut pg_table = "__confer_pg";
    if let Some(max_groups) = l.max_groups {
        let _ = write!(
            sql,
            ",\n__confer_sel AS (SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY __unit ORDER BY __r) \
             AS __gn FROM (SELECT *, random() AS __r FROM __confer_pg) AS __t3) AS __t4 WHERE __gn <= {max_groups})"
        );
        pg_table = "__confer_sel";
    }

    let _ = write!(sql, "\nSELECT ");
    let mut outs: Vec<String> = gcols.clone();
    for p in l.partials {
        outs.push(format!(
            "{} AS {}",
            l.aggregates[p.aggregate].kind.group_partial(&p.column),
            p.column
        ));
    }
    let _ = write!(sql, "{} FROM {pg_table}", outs.join(", "));
    if !gcols.is_empty() {
        let _ = write!(sql, " GROUP BY {}", gcols.join(", "));
    }
    sql
}

fn domain_condition(expr: &str, domain: &[DomainValue]) -> String {
    let values: Vec<String> = domain.iter().map(|v| v.to_string()).collect();
    format!("({expr}) IN ({})", values.join(", "))
}

/// Rewrites post-processing expressions (HAVING, ORDER BY) to refer to
/// released columns by name.
pub(crate) struct ReleasedNames<'a> {
    pub(crate) items: Vec<(&'a Expr, String)>,
    pub(crate) missing: Option<String>,
}

impl VisitorMut for ReleasedNames<'_> {
    type Break = ();
    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        if let Some((_, name)) = self.items.iter().find(|(e, _)| same_expr(e, expr)) {
            *expr = Expr::Identifier(Ident::with_quote('"', name.clone()));
            return ControlFlow::Continue(());
        }
        if let Expr::Function(f) = expr
            && AGGREGATE_NAMES.contains(&function_name(&f.name).as_str())
        {
            self.missing = Some(expr.to_string());
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }
}

/// Compiles HAVING / ORDER BY / LIMIT into post-processing over the released table.
pub(crate) fn compile_post(
    query: &Query,
    select: &Select,
    select_items: &[OutputItem],
    aggregates: &[AggregateSpec],
    groups: &[GroupSpec],
    group_exprs: &[Expr],
) -> Result<PostProcess> {
    let mut items: Vec<(&Expr, String)> = Vec::new();
    for (item, out) in select.projection.iter().zip(select_items) {
        let expr = match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
            _ => continue,
        };
        let name = match out {
            OutputItem::Aggregate(i) => aggregates[*i].name.clone(),
            OutputItem::Group(i) => groups[*i].name.clone(),
        };
        items.push((expr, name));
    }
    for (expr, g) in group_exprs.iter().zip(groups) {
        items.push((expr, g.name.clone()));
    }
    let rewrite = |expr: &Expr, clause: &str| -> Result<String> {
        let mut e = expr.clone();
        let mut names = ReleasedNames {
            items: items.clone(),
            missing: None,
        };
        let _ = VisitMut::visit(&mut e, &mut names);
        if let Some(agg) = names.missing {
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

impl AggregateKind {
    fn default_name(self) -> String {
        match self {
            AggregateKind::CountStar => "count".into(),
            AggregateKind::CountDistinctUnit => "count_distinct".into(),
        }
    }

    /// The most one person can add to one group's partial.
    fn per_group_bound(self, max_rows: usize) -> f64 {
        match self {
            AggregateKind::CountStar => max_rows as f64,
            AggregateKind::CountDistinctUnit => 1.0,
        }
    }

    /// Whether the value depends on how many rows a person has in a group.
    fn depends_on_rows(self) -> bool {
        match self {
            AggregateKind::CountStar => true,
            AggregateKind::CountDistinctUnit => false,
        }
    }

    /// The per-person-per-group contribution, over the kept rows.
    fn person_contribution(self) -> Option<&'static str> {
        match self {
            AggregateKind::CountStar => Some("count(*)"),
            AggregateKind::CountDistinctUnit => None,
        }
    }

    /// The per-group partial from the per-person contributions.
    fn group_partial(self, column: &str) -> String {
        match self {
            AggregateKind::CountStar => format!("CAST(sum({column}) AS BIGINT)"),
            AggregateKind::CountDistinctUnit => "CAST(count(*) AS BIGINT)".into(),
        }
    }
}

impl PlanCost {
    /// Splits the query's budget equally over its noisy partials.
    fn split(options: &DpOptions, partials: &[PartialSpec]) -> Result<Self> {
        let n = partials.len().max(1) as f64;
        let privacy_err = |e: confer_privacy::PrivacyError| QueryError::Rejected(e.to_string());
        match options.mechanism {
            Mechanism::Gaussian => {
                let rho = confer_privacy::accounting::rho_for_epsilon_delta(
                    options.epsilon,
                    options.delta,
                )
                .map_err(privacy_err)?;
                let epsilon = confer_privacy::accounting::epsilon_for_rho(rho, options.delta)
                    .map_err(privacy_err)?;
                Ok(Self {
                    rho,
                    epsilon,
                    delta: options.delta,
                    per_partial: rho / n,
                })
            }
            Mechanism::Laplace => Ok(Self {
                rho: confer_privacy::accounting::rho_for_pure_epsilon(options.epsilon),
                epsilon: options.epsilon,
                delta: 0.0,
                per_partial: options.epsilon / n,
            }),
        }
    }
}
