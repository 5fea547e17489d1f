//! Does the source of a DP query keep the privacy unit? The allowlist of
//! plan nodes.
//!
//! The FROM and WHERE of a DP query (with its CTEs and subqueries), and a
//! training job's feature query, are planned by DataFusion against the
//! catalog and analysed (type coercion applied, so every cast DataFusion
//! adds is visible). The logical plan is then walked bottom-up to decide,
//! for every relation, whether each of its rows belongs to exactly one
//! person (and which columns carry that person's id), or holds no person's
//! data at all (public tables), or mixes persons, which is refused.
//!
//! Only the plan nodes below are accepted; any other node is refused with
//! its name. For each, the rule that keeps every row one person's:
//!
//! | plan node | over person-level rows |
//! |---|---|
//! | table scan | a private table's rows belong to the person in its unit column; a public table's to nobody |
//! | projection | keeps the unit only if an output is the unit column itself: a column reference, an alias, or a lossless cast (integer widening) |
//! | filter | always; its subqueries follow the subquery rules |
//! | subquery alias, repartition | always |
//! | DISTINCT | always (every column, the unit included, is part of the key) |
//! | DISTINCT ON | only when the ON list holds the unit column, and an output is the unit |
//! | join | anything with a public relation; two person-level relations only when a top-level equality of the join condition equates their units |
//! | aggregate | only grouped by the unit (a per-person summary) |
//! | UNION | the unit in the same column of every branch, never person-level rows with public rows |
//! | LIMIT, ORDER BY | only over public rows |
//! | VALUES, empty relation | public |
//!
//! Subqueries inside expressions: over public tables, anything (a scalar
//! subquery must return at most one row, see [`crate::total`]). Over
//! person-level tables, only `unit IN (SELECT unit FROM ...)` and its
//! negation, where both sides are units; the compiler adds `unit IS NOT
//! NULL` to such a subquery, so that one person's NULL cannot empty a
//! `NOT IN` for everyone (SQL's three-valued logic), and the analysis checks
//! that the guard is there. Scalar subqueries, `EXISTS` and `ANY` / `ALL`
//! over person-level tables are refused.
//!
//! Because DataFusion resolves every name, aliases, CTEs and qualified
//! columns need no special handling here.

use std::collections::{BTreeSet, HashMap};

use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{Distinct, Expr, ExprSchemable, JoinType, LogicalPlan};

use crate::catalog::Catalog;
use crate::error::{QueryError, Result};

/// Where a column of a relation comes from, when it is a base column passed
/// through unchanged (used to find public domains and bounds).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Origin {
    /// Catalog table.
    pub table: String,
    /// Column of that table.
    pub column: String,
}

/// What a relation holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Provenance {
    /// Output columns that carry the person's id (empty: a public relation).
    pub unit_fields: BTreeSet<usize>,
    /// Base-column origin of output columns that pass one through.
    pub origins: HashMap<usize, Origin>,
    /// Catalog tables read.
    pub tables: BTreeSet<String>,
    /// Whether every person has at most one row (a table declared one row
    /// per person, read alone, or a per-person summary). The local query
    /// still enforces it: see `crate::compile`.
    pub one_row_per_unit: bool,
    /// Output columns known to hold no value twice: of a public relation
    /// (measured by the node), or a column declared `unique` (see
    /// [`amplification`]).
    pub unique_fields: BTreeSet<usize>,
}

impl Provenance {
    /// Whether the rows belong to persons.
    pub fn is_private(&self) -> bool {
        !self.unit_fields.is_empty()
    }

    fn public(tables: BTreeSet<String>) -> Self {
        Self {
            unit_fields: BTreeSet::new(),
            origins: HashMap::new(),
            tables,
            one_row_per_unit: false,
            unique_fields: BTreeSet::new(),
        }
    }
}

fn refuse(msg: impl Into<String>) -> QueryError {
    QueryError::Rejected(msg.into())
}

/// Whether a cast from `from` to `to` keeps every value distinct and
/// unchanged: the identity, or an integer widening. Only such casts keep
/// the privacy unit (a cast to BOOLEAN, FLOAT or text would merge persons).
pub fn lossless_cast(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    from == to
        || matches!(
            (from, to),
            (Int8, Int16 | Int32 | Int64)
                | (Int16, Int32 | Int64)
                | (Int32, Int64)
                | (UInt8, UInt16 | UInt32 | UInt64 | Int16 | Int32 | Int64)
                | (UInt16, UInt32 | UInt64 | Int32 | Int64)
                | (UInt32, UInt64 | Int64)
        )
}

/// The index of `expr`'s column in `plan`'s output when `expr` is that
/// column unchanged: a column reference, an alias of one, or a lossless
/// cast of one. This is how the privacy unit may travel.
pub fn unit_index(expr: &Expr, plan: &LogicalPlan) -> Option<usize> {
    match expr {
        Expr::Column(c) => plan.schema().index_of_column(c).ok(),
        Expr::Alias(a) => unit_index(&a.expr, plan),
        Expr::Cast(c) => {
            let from = c.expr.get_type(plan.schema()).ok()?;
            lossless_cast(&from, c.field.data_type())
                .then(|| unit_index(&c.expr, plan))
                .flatten()
        }
        Expr::TryCast(c) => {
            let from = c.expr.get_type(plan.schema()).ok()?;
            lossless_cast(&from, c.field.data_type())
                .then(|| unit_index(&c.expr, plan))
                .flatten()
        }
        _ => None,
    }
}

/// The index of the column `expr` passes through, looking through aliases
/// and any cast: used only to find a column's public domain and bounds,
/// which the local query enforces itself (values outside a domain are
/// dropped, values outside bounds clamped).
fn origin_index(expr: &Expr, plan: &LogicalPlan) -> Option<usize> {
    match expr {
        Expr::Column(c) => plan.schema().index_of_column(c).ok(),
        Expr::Alias(a) => origin_index(&a.expr, plan),
        Expr::Cast(c) => origin_index(&c.expr, plan),
        Expr::TryCast(c) => origin_index(&c.expr, plan),
        // `CASE WHEN c THEN x END` (an aggregate's FILTER): x or NULL, so
        // x's declared bounds and domain still describe it (values are
        // clamped into the bounds in any case).
        Expr::Case(case)
            if case.expr.is_none()
                && case.when_then_expr.len() == 1
                && case
                    .else_expr
                    .as_deref()
                    .is_none_or(|e| matches!(e, Expr::Literal(v, _) if v.is_null())) =>
        {
            origin_index(&case.when_then_expr[0].1, plan)
        }
        _ => None,
    }
}

/// Output provenance of a list of expressions evaluated over `input` (a
/// projection, or the select list of DISTINCT ON).
fn project(exprs: &[Expr], input: &LogicalPlan, input_prov: &Provenance) -> Provenance {
    let mut out = Provenance {
        unit_fields: BTreeSet::new(),
        origins: HashMap::new(),
        tables: input_prov.tables.clone(),
        one_row_per_unit: input_prov.one_row_per_unit,
        unique_fields: BTreeSet::new(),
    };
    for (i, e) in exprs.iter().enumerate() {
        if unit_index(e, input).is_some_and(|j| input_prov.unit_fields.contains(&j)) {
            out.unit_fields.insert(i);
        }
        if unit_index(e, input).is_some_and(|j| input_prov.unique_fields.contains(&j)) {
            out.unique_fields.insert(i);
        }
        if let Some(o) = origin_index(e, input).and_then(|j| input_prov.origins.get(&j)) {
            out.origins.insert(i, o.clone());
        }
    }
    out
}

const DROPS_UNIT: &str = "a CTE or subquery drops the privacy unit column: keep person_id itself in its SELECT \
    list (renaming it, or widening an integer type, is fine; a cast to another type, an expression of it or \
    a hash is not), so that every row stays attributable to one person";

/// Analyzes a planned (and analysed) relation.
pub fn provenance(plan: &LogicalPlan, catalog: &Catalog) -> Result<Provenance> {
    provenance_inner(plan, catalog).map_err(|e| in_unit_terms(e, plan, catalog))
}

/// Refusals name the unit column `person_id` (OMOP's); where the tables
/// read call it something else, they name that.
fn in_unit_terms(e: QueryError, plan: &LogicalPlan, catalog: &Catalog) -> QueryError {
    let QueryError::Rejected(msg) = e else {
        return e;
    };
    let units: BTreeSet<String> = tables_read(plan, catalog)
        .0
        .iter()
        .filter_map(|t| catalog.table(t).and_then(|t| t.privacy_unit.clone()))
        .collect();
    match units.iter().collect::<Vec<_>>().as_slice() {
        [unit] if !unit.contains("person_id") => {
            QueryError::Rejected(msg.replace("person_id", unit))
        }
        _ => QueryError::Rejected(msg),
    }
}

fn provenance_inner(plan: &LogicalPlan, catalog: &Catalog) -> Result<Provenance> {
    let mut p = relation(plan, catalog)?;
    // Every catalog table the relation reads, subqueries in any of its
    // expressions included (for the study's table rules).
    p.tables.extend(tables_read(plan, catalog).0);
    // Whatever the node: rows computed from person-level rows are never
    // public. (A semi join of a public table filtered by one person's rows,
    // for one, would otherwise pass for public rows.)
    if !p.is_private() && reads_private_rows(plan, catalog) {
        return Err(refuse(
            "this part of the query keeps or drops public rows according to person-level rows, so its \
             rows depend on persons without belonging to one: filter person-level rows with \
             person_id IN (SELECT person_id FROM ...) instead",
        ));
    }
    Ok(p)
}

/// Whether a relation reads a person-level table, itself or through a
/// subquery in any of its expressions.
fn reads_private_rows(plan: &LogicalPlan, catalog: &Catalog) -> bool {
    let mut private = false;
    let _ = plan.apply_with_subqueries(|p| {
        if let LogicalPlan::TableScan(scan) = p
            && catalog
                .table(scan.table_name.table())
                .is_some_and(|t| t.is_private())
        {
            private = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    private
}

fn relation(plan: &LogicalPlan, catalog: &Catalog) -> Result<Provenance> {
    let p = match plan {
        LogicalPlan::TableScan(scan) => {
            let name = scan.table_name.table().to_ascii_lowercase();
            let table = catalog.table(&name).ok_or_else(|| {
                QueryError::NotInCatalog(format!("table {name} is not in the network catalog"))
            })?;
            let schema = plan.schema();
            let mut unit_fields = BTreeSet::new();
            let mut unique_fields = BTreeSet::new();
            let mut origins = HashMap::new();
            for (i, field) in schema.fields().iter().enumerate() {
                origins.insert(
                    i,
                    Origin {
                        table: table.name.clone(),
                        column: field.name().to_ascii_lowercase(),
                    },
                );
                if table.privacy_unit.as_deref() == Some(field.name().as_str()) {
                    unit_fields.insert(i);
                }
                // Measured on a public table by the node, or declared
                // `unique` (and checked at start) on any table.
                let declared = table.column(field.name()).is_some_and(|c| c.unique);
                if declared || (!table.is_private() && catalog.is_unique(&table.name, field.name()))
                {
                    unique_fields.insert(i);
                }
            }
            let one_row_per_unit = table.one_row_per_unit && !unit_fields.is_empty();
            Provenance {
                unit_fields,
                origins,
                tables: BTreeSet::from([table.name.clone()]),
                one_row_per_unit,
                unique_fields,
            }
        }
        LogicalPlan::Projection(proj) => {
            let input = provenance(&proj.input, catalog)?;
            let mut tables = input.tables.clone();
            for e in &proj.expr {
                check_subqueries(e, &proj.input, &input, catalog, &mut tables)?;
            }
            let mut out = project(&proj.expr, &proj.input, &input);
            out.tables = tables;
            if input.is_private() && !out.is_private() {
                return Err(refuse(DROPS_UNIT));
            }
            out
        }
        LogicalPlan::Filter(filter) => {
            let mut input = provenance(&filter.input, catalog)?;
            let mut tables = input.tables.clone();
            check_subqueries(
                &filter.predicate,
                &filter.input,
                &input,
                catalog,
                &mut tables,
            )?;
            input.tables = tables;
            input
        }
        LogicalPlan::SubqueryAlias(a) => provenance(&a.input, catalog)?,
        LogicalPlan::Subquery(s) => provenance(&s.subquery, catalog)?,
        LogicalPlan::Repartition(r) => {
            let input = provenance(&r.input, catalog)?;
            let mut tables = BTreeSet::new();
            for e in plan.expressions() {
                check_subqueries(&e, &r.input, &input, catalog, &mut tables)?;
            }
            input
        }
        LogicalPlan::Distinct(Distinct::All(input)) => {
            let mut p = provenance(input, catalog)?;
            if input.schema().fields().len() == 1 {
                p.unique_fields.insert(0);
            }
            p
        }
        LogicalPlan::Distinct(Distinct::On(on)) => {
            let input = provenance(&on.input, catalog)?;
            let mut tables = input.tables.clone();
            for e in on.on_expr.iter().chain(&on.select_expr) {
                check_subqueries(e, &on.input, &input, catalog, &mut tables)?;
            }
            for s in on.sort_expr.iter().flatten() {
                check_subqueries(&s.expr, &on.input, &input, catalog, &mut tables)?;
            }
            if !input.is_private() {
                let mut out = project(&on.select_expr, &on.input, &input);
                out.tables = tables;
                return Ok(out);
            }
            let keyed = on
                .on_expr
                .iter()
                .any(|e| unit_index(e, &on.input).is_some_and(|i| input.unit_fields.contains(&i)));
            if !keyed {
                return Err(refuse(
                    "DISTINCT ON over person-level rows must list the privacy unit among its keys \
                     (DISTINCT ON (person_id, ...)): otherwise it keeps one row of one person for many \
                     persons",
                ));
            }
            let mut out = project(&on.select_expr, &on.input, &input);
            out.tables = tables;
            if !out.is_private() {
                return Err(refuse(DROPS_UNIT));
            }
            out
        }
        LogicalPlan::Join(join) => {
            let left = provenance(&join.left, catalog)?;
            let right = provenance(&join.right, catalog)?;
            let offset = join.left.schema().fields().len();
            let mut tables = left.tables.clone();
            tables.extend(right.tables.iter().cloned());
            let mut all = Vec::new();
            for (l, r) in &join.on {
                all.push(l);
                all.push(r);
            }
            if let Some(f) = &join.filter {
                if has_subquery(f) {
                    return Err(refuse(
                        "subqueries in JOIN conditions are not supported in DP queries: move them to WHERE",
                    ));
                }
                all.push(f);
            }
            if all.iter().any(|e| has_subquery(e)) {
                return Err(refuse(
                    "subqueries in JOIN conditions are not supported in DP queries: move them to WHERE",
                ));
            }
            if left.is_private() && right.is_private() {
                let keyed = join.on.iter().any(|(l, r)| {
                    unit_index(l, &join.left).is_some_and(|i| left.unit_fields.contains(&i))
                        && unit_index(r, &join.right)
                            .is_some_and(|i| right.unit_fields.contains(&i))
                }) || join
                    .filter
                    .as_ref()
                    .is_some_and(|f| equates_units(f, join, &left, &right));
                if !keyed {
                    return Err(refuse(
                        "person-level tables may be joined only on the privacy unit \
                         (for example ON c.person_id = p.person_id): any other join condition \
                         combines different persons' rows",
                    ));
                }
            }
            let shift = |p: &Provenance, by: usize| -> (BTreeSet<usize>, HashMap<usize, Origin>) {
                (
                    p.unit_fields.iter().map(|i| i + by).collect(),
                    p.origins.iter().map(|(i, o)| (i + by, o.clone())).collect(),
                )
            };
            let semi_refusal = || {
                refuse(
                    "a semi or anti join that keeps public rows according to person-level rows is not \
                     allowed: its rows would depend on persons; filter person-level rows with \
                     person_id IN (SELECT person_id FROM ...) instead",
                )
            };
            match join.join_type {
                JoinType::LeftSemi | JoinType::LeftAnti => {
                    if right.is_private() && !left.is_private() {
                        return Err(semi_refusal());
                    }
                    Provenance { tables, ..left }
                }
                JoinType::RightSemi | JoinType::RightAnti => {
                    if left.is_private() && !right.is_private() {
                        return Err(semi_refusal());
                    }
                    Provenance { tables, ..right }
                }
                JoinType::LeftMark | JoinType::RightMark => {
                    return Err(refuse(format!(
                        "{} joins are not allowed in a DP query",
                        join.join_type
                    )));
                }
                _ => {
                    let (mut unit_fields, mut origins) = shift(&left, 0);
                    let (ru, ro) = shift(&right, offset);
                    unit_fields.extend(ru);
                    origins.extend(ro);
                    Provenance {
                        unit_fields,
                        origins,
                        tables,
                        // A join may repeat a person's rows.
                        one_row_per_unit: false,
                        unique_fields: BTreeSet::new(),
                    }
                }
            }
        }
        LogicalPlan::Aggregate(agg) => {
            let input = provenance(&agg.input, catalog)?;
            let mut tables = input.tables.clone();
            for e in agg.group_expr.iter().chain(&agg.aggr_expr) {
                check_subqueries(e, &agg.input, &input, catalog, &mut tables)?;
                if matches!(e, Expr::GroupingSet(_)) {
                    return Err(refuse(
                        "GROUPING SETS, ROLLUP and CUBE are not supported in DP queries",
                    ));
                }
            }
            if !input.is_private() {
                let mut out = Provenance::public(tables);
                // Grouped by one key: each value of it once.
                if agg.group_expr.len() == 1 {
                    out.unique_fields.insert(0);
                }
                return Ok(out);
            }
            let mut out = Provenance {
                unit_fields: BTreeSet::new(),
                origins: HashMap::new(),
                tables,
                // Grouped by the unit alone: one row per person.
                one_row_per_unit: agg.group_expr.len() == 1,
                unique_fields: BTreeSet::new(),
            };
            for (i, g) in agg.group_expr.iter().enumerate() {
                if unit_index(g, &agg.input).is_some_and(|j| input.unit_fields.contains(&j)) {
                    out.unit_fields.insert(i);
                }
                if let Some(o) = origin_index(g, &agg.input).and_then(|j| input.origins.get(&j)) {
                    out.origins.insert(i, o.clone());
                }
            }
            if !out.is_private() {
                return Err(refuse(
                    "a CTE or subquery aggregates person-level rows across persons: group it by the \
                     privacy unit itself (a per-person summary: GROUP BY person_id), or aggregate in the \
                     DP SELECT",
                ));
            }
            out
        }
        LogicalPlan::Union(u) => {
            let parts: Vec<Provenance> = u
                .inputs
                .iter()
                .map(|i| provenance(i, catalog))
                .collect::<Result<_>>()?;
            let mut tables = BTreeSet::new();
            for p in &parts {
                tables.extend(p.tables.iter().cloned());
            }
            if parts.iter().all(|p| !p.is_private()) {
                return Ok(Provenance::public(tables));
            }
            let common: BTreeSet<usize> = parts
                .iter()
                .map(|p| p.unit_fields.clone())
                .reduce(|a, b| a.intersection(&b).copied().collect())
                .unwrap_or_default();
            if common.is_empty() {
                return Err(refuse(
                    "UNION must keep the privacy unit in the same column of every branch, and may not \
                     mix person-level rows with public rows",
                ));
            }
            Provenance {
                unit_fields: common,
                origins: HashMap::new(),
                tables,
                one_row_per_unit: false,
                unique_fields: BTreeSet::new(),
            }
        }
        LogicalPlan::Values(_) | LogicalPlan::EmptyRelation(_) => {
            let mut tables = BTreeSet::new();
            let empty = Provenance::public(BTreeSet::new());
            for e in plan.expressions() {
                check_subqueries(&e, plan, &empty, catalog, &mut tables)?;
            }
            Provenance::public(tables)
        }
        LogicalPlan::Limit(l) => {
            let input = provenance(&l.input, catalog)?;
            let mut tables = BTreeSet::new();
            for e in l.skip.iter().chain(l.fetch.iter()) {
                check_subqueries(e, &l.input, &input, catalog, &mut tables)?;
            }
            if input.is_private() {
                return Err(refuse(
                    "LIMIT inside a CTE or subquery picks persons by the other rows: move LIMIT to the \
                     outermost SELECT, where it applies to released values",
                ));
            }
            input
        }
        LogicalPlan::Sort(s) => {
            let input = provenance(&s.input, catalog)?;
            // Its expressions may hold subqueries too (ORDER BY (SELECT ...)).
            let mut tables = BTreeSet::new();
            for e in &s.expr {
                check_subqueries(&e.expr, &s.input, &input, catalog, &mut tables)?;
            }
            if input.is_private() {
                return Err(refuse(
                    "ORDER BY before aggregation is not allowed: order the released values in the \
                     outermost SELECT instead",
                ));
            }
            input
        }
        LogicalPlan::Window(_) => {
            return Err(refuse(
                "window functions (OVER ...) are not allowed in DP queries: they expose individual rows",
            ));
        }
        LogicalPlan::RecursiveQuery(_) => {
            return Err(refuse("recursive CTEs are not supported in DP queries"));
        }
        LogicalPlan::Unnest(_) => return Err(refuse("UNNEST is not supported in DP queries")),
        other => {
            return Err(refuse(format!(
                "{} is not allowed in a DP query",
                other
                    .display()
                    .to_string()
                    .split(':')
                    .next()
                    .unwrap_or("this statement")
            )));
        }
    };
    Ok(p)
}

/// Whether one person's rows can multiply the work of a query: the reason,
/// or `None` when the work stays proportional to the rows read.
///
/// A query whose run time one person could amplify (a join that matches one
/// person's row with any number of rows, so that a property of one person
/// makes the query slow) would tell that property by its latency, outside
/// any DP mechanism. A node answers such a query only at a fixed time after
/// it started, whatever its real run time (`policy.limits.padded_secs`).
/// What keeps the work proportional:
///
/// * joins of public relations with each other, when they are not joined
///   with person-level rows afterwards (the engine may skip a public
///   relation whose other side is empty, so an expensive one joined with
///   person-level rows is marked);
/// * semi and anti joins on equalities (`IN` subqueries, hash joins): a row
///   is kept or not;
/// * a person-level relation with a public table on an equality between a
///   column of the person-level side and a column of the public table that
///   holds no value twice (a node measures this on its own public tables:
///   `concept.concept_id`, `care_site.care_site_id`, ...);
/// * two person-level relations on the unit when one of them has one row
///   per person (`person`, or a per-person summary).
///
/// Also marked: correlated subqueries (evaluated against other rows for
/// every row), subqueries that join, and text concatenation of values
/// read from rows (`a || b`, `concat`: chained in CTEs, one person's text
/// can grow exponentially).
pub fn amplification(plan: &LogicalPlan, catalog: &Catalog) -> Option<String> {
    let mut reason = None;
    let _ = plan.apply_with_subqueries(|node| {
        let found = match node {
            LogicalPlan::Join(join) => join_amplifies(join, catalog),
            _ => None,
        }
        .or_else(|| expressions_amplify(node, catalog));
        match found {
            Some(why) => {
                reason = Some(why);
                Ok(TreeNodeRecursion::Stop)
            }
            None => Ok(TreeNodeRecursion::Continue),
        }
    });
    reason
}

/// Expressions of a plan node that can multiply one person's work.
fn expressions_amplify(node: &LogicalPlan, catalog: &Catalog) -> Option<String> {
    let mut reason = None;
    // The rows a subquery of this node is evaluated against.
    let outer = node.inputs().first().map(|input| {
        let prov = provenance(input, catalog).ok();
        (*input, prov)
    });
    let outer = outer.as_ref().map(|(p, prov)| (*p, prov.as_ref()));
    let _ = node.apply_expressions(|e| {
        let _ = e.apply(|x| {
            let why = match x {
                Expr::BinaryExpr(b)
                    if b.op == datafusion::logical_expr::Operator::StringConcat
                        && x.any_column_refs() =>
                {
                    Some(
                        "text concatenation of values read from rows (one person's text can grow)"
                            .into(),
                    )
                }
                Expr::ScalarFunction(f)
                    if matches!(f.func.name(), "concat" | "concat_ws") && x.any_column_refs() =>
                {
                    Some(
                        "text concatenation of values read from rows (one person's text can grow)"
                            .into(),
                    )
                }
                Expr::ScalarSubquery(q) => subquery_amplifies(q, catalog, outer),
                Expr::Exists(q) => subquery_amplifies(&q.subquery, catalog, outer),
                Expr::InSubquery(q) => subquery_amplifies(&q.subquery, catalog, outer),
                _ => None,
            };
            match why {
                Some(w) => {
                    reason = Some(w);
                    Ok(TreeNodeRecursion::Stop)
                }
                None => Ok(TreeNodeRecursion::Continue),
            }
        });
        Ok(if reason.is_some() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    reason
}

/// A subquery that is correlated (evaluated against other rows for each
/// row) other than on keys, that joins (its work could run only when rows
/// reach it), or that reads public relations that aggregate or join.
///
/// A correlated subquery keeps the work proportional when the engine turns
/// it into a hash join whose pairs of equal keys are at most the rows on
/// one side (DataFusion lists every such pair, even for semi joins):
///
/// * every condition that reads the outer row is an equality between an
///   outer column and an inner column (the join's keys), and the subquery
///   is DISTINCT (the compiler makes IN subqueries so), so each outer row
///   meets each distinct key once; or
/// * one such equality is on a column that holds each value once, inner
///   or outer (declared `unique`, or a public column the node measured):
///   each row of the other side meets at most one row, against which the
///   other conditions are evaluated once.
fn subquery_amplifies(
    q: &datafusion::logical_expr::Subquery,
    catalog: &Catalog,
    outer: Option<(&LogicalPlan, Option<&Provenance>)>,
) -> Option<String> {
    let (_, private) = tables_read(&q.subquery, catalog);
    if !private && costly_public(strip_distinct(&q.subquery)) {
        return Some(
            "a subquery over public relations that join or aggregate: its work runs only when \
             person-level rows reach it"
                .into(),
        );
    }
    if !q.outer_ref_columns.is_empty() && !keyed_correlation(&q.subquery, catalog, outer) {
        return Some(
            "a correlated subquery (evaluated against other rows for every row); write it as an IN \
             subquery on a key"
                .into(),
        );
    }
    let mut joins = false;
    let _ = q.subquery.apply(|p| {
        if matches!(p, LogicalPlan::Join(_)) {
            joins = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    joins.then(|| "a subquery that joins tables".to_string())
}

/// The plan under a top-level DISTINCT (and the projections and aliases
/// above it), or the plan itself.
fn strip_distinct(plan: &LogicalPlan) -> &LogicalPlan {
    match plan {
        LogicalPlan::Distinct(Distinct::All(input)) => input,
        LogicalPlan::Projection(p) => match strip_distinct(&p.input) {
            inner if std::ptr::eq(inner, p.input.as_ref()) => plan,
            inner => inner,
        },
        LogicalPlan::SubqueryAlias(a) => match strip_distinct(&a.input) {
            inner if std::ptr::eq(inner, a.input.as_ref()) => plan,
            inner => inner,
        },
        _ => plan,
    }
}

/// Whether a correlated subquery's conditions on the outer row make a
/// hash join that stays proportional (see [`subquery_amplifies`]). Outer
/// references anywhere but in the top-level conjuncts of a filter are not
/// keys; a key equates an outer column with an inner column (not an
/// expression or a constant).
fn keyed_correlation(
    sub: &LogicalPlan,
    catalog: &Catalog,
    outer_rows: Option<(&LogicalPlan, Option<&Provenance>)>,
) -> bool {
    let outer = |e: &Expr| e.contains_outer();
    let outer_column = |e: &Expr| match e {
        Expr::OuterReferenceColumn(_, c) => Some(c.clone()),
        _ => None,
    };
    // Whether an outer column holds each value once in the outer rows.
    let outer_unique = |c: &datafusion::common::Column| {
        outer_rows.is_some_and(|(plan, prov)| {
            prov.is_some_and(|prov| {
                plan.schema()
                    .index_of_column(c)
                    .is_ok_and(|i| prov.unique_fields.contains(&i))
            })
        })
    };
    let distinct = !std::ptr::eq(strip_distinct(sub), sub);
    let mut ok = true;
    let mut keys = 0usize;
    let mut unique_key = false;
    let mut others = 0usize;
    let _ = sub.apply(|p| {
        match p {
            LogicalPlan::Filter(f) => {
                for c in datafusion::logical_expr::utils::split_conjunction(&f.predicate) {
                    if !outer(c) {
                        continue;
                    }
                    let pair = match c {
                        Expr::BinaryExpr(b) if b.op == datafusion::logical_expr::Operator::Eq => {
                            match (outer_column(&b.left), outer_column(&b.right)) {
                                (Some(o), None) if !outer(&b.right) => Some((o, b.right.as_ref())),
                                (None, Some(o)) if !outer(&b.left) => Some((o, b.left.as_ref())),
                                _ => None,
                            }
                        }
                        _ => None,
                    };
                    // The inner side must be a column of the rows filtered.
                    let inner_index = pair
                        .as_ref()
                        .and_then(|(_, inner)| unit_index(inner, &f.input));
                    match (pair, inner_index) {
                        (Some((o, _)), Some(i)) => {
                            keys += 1;
                            let inner_unique = provenance(&f.input, catalog)
                                .is_ok_and(|prov| prov.unique_fields.contains(&i));
                            if inner_unique || outer_unique(&o) {
                                unique_key = true;
                            }
                        }
                        _ => others += 1,
                    }
                }
            }
            other => {
                if other.expressions().iter().any(outer) {
                    ok = false;
                    return Ok(TreeNodeRecursion::Stop);
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    ok && keys > 0 && (unique_key || (distinct && others == 0))
}

/// Whether a public relation does more than read one table (a join, an
/// aggregate, a union...): work that may run only when person-level rows
/// reach it.
fn costly_public(plan: &LogicalPlan) -> bool {
    let mut costly = false;
    let _ = plan.apply(|p| {
        if !matches!(
            p,
            LogicalPlan::TableScan(_)
                | LogicalPlan::Projection(_)
                | LogicalPlan::Filter(_)
                | LogicalPlan::SubqueryAlias(_)
                | LogicalPlan::Values(_)
                | LogicalPlan::EmptyRelation(_)
        ) {
            costly = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    costly
}

fn join_amplifies(
    join: &datafusion::logical_expr::logical_plan::Join,
    catalog: &Catalog,
) -> Option<String> {
    let left = provenance(&join.left, catalog).ok()?;
    let right = provenance(&join.right, catalog).ok()?;
    let names = |p: &Provenance| p.tables.iter().cloned().collect::<Vec<_>>().join(", ");
    let semi = matches!(
        join.join_type,
        JoinType::LeftSemi | JoinType::LeftAnti | JoinType::RightSemi | JoinType::RightAnti
    );
    match (left.is_private(), right.is_private()) {
        (false, false) => None,
        (true, true) => {
            // An equality with a column one side holds each value of once
            // (declared `unique`, checked when the node starts): each row
            // of the other side matches at most one row.
            let unique_of = |e: &Expr, plan: &LogicalPlan, p: &Provenance| {
                unit_index(e, plan).is_some_and(|i| p.unique_fields.contains(&i))
            };
            let keyed = some_equality(join, |a, b| {
                (unique_of(a, &join.left, &left) && reads_only(b, &join.right))
                    || (unique_of(b, &join.left, &left) && reads_only(a, &join.right))
                    || (unique_of(a, &join.right, &right) && reads_only(b, &join.left))
                    || (unique_of(b, &join.right, &right) && reads_only(a, &join.left))
            });
            if semi || keyed || left.one_row_per_unit || right.one_row_per_unit {
                None
            } else {
                Some(format!(
                    "a join of {} with {}, which both hold several rows per person: one person's rows \
                     multiply",
                    names(&left),
                    names(&right)
                ))
            }
        }
        (left_private, _) => {
            let (public, public_plan, private_plan) = if left_private {
                (&right, &join.right, &join.left)
            } else {
                (&left, &join.left, &join.right)
            };
            if costly_public(public_plan) {
                return Some(format!(
                    "a join with a public relation that itself joins or aggregates ({}): its work runs \
                     only when persons' rows reach it",
                    names(public)
                ));
            }
            let unique = |e: &Expr| {
                unit_index(e, public_plan).is_some_and(|i| public.unique_fields.contains(&i))
            };
            // The other side of the equality reads the person-level side
            // only (not `k.concept_id = k.concept_id`).
            let keyed = some_equality(join, |a, b| {
                (unique(a) && reads_only(b, private_plan))
                    || (unique(b) && reads_only(a, private_plan))
            });
            // A semi join on an equality between the two sides is a hash
            // join: each row is kept or not, whatever the other side holds.
            let hashed = !join.on.is_empty()
                || some_equality(join, |a, b| {
                    (reads_only(a, public_plan) && reads_only(b, private_plan))
                        || (reads_only(b, public_plan) && reads_only(a, private_plan))
                });
            if keyed || (semi && hashed) {
                None
            } else {
                Some(format!(
                    "the join with {} is not on a column of it that holds each value once: one \
                     person's row can match any number of its rows",
                    names(public)
                ))
            }
        }
    }
}

/// Whether `e` reads columns, and only columns of `plan`'s rows.
fn reads_only(e: &Expr, plan: &LogicalPlan) -> bool {
    let refs = e.column_refs();
    !refs.is_empty()
        && refs
            .iter()
            .all(|c| plan.schema().index_of_column(c).is_ok())
}

/// Whether some equality of a join satisfies `pair`: its keys, and (before
/// DataFusion's optimizer extracts them) the top-level equalities of its
/// filter.
fn some_equality(
    join: &datafusion::logical_expr::logical_plan::Join,
    pair: impl Fn(&Expr, &Expr) -> bool,
) -> bool {
    join.on.iter().any(|(l, r)| pair(l, r))
        || join.filter.as_ref().is_some_and(|f| {
            datafusion::logical_expr::utils::split_conjunction(f)
                .into_iter()
                .any(|c| {
                    matches!(c, Expr::BinaryExpr(b)
                        if b.op == datafusion::logical_expr::Operator::Eq && pair(&b.left, &b.right))
                })
        })
}

/// Whether a join filter equates a left unit column with a right one.
fn equates_units(
    filter: &Expr,
    join: &datafusion::logical_expr::logical_plan::Join,
    left: &Provenance,
    right: &Provenance,
) -> bool {
    // Only a top-level conjunct guarantees that joined rows share a unit:
    // an equality under OR or NOT does not.
    datafusion::logical_expr::utils::split_conjunction(filter)
        .into_iter()
        .any(|e| {
            let Expr::BinaryExpr(b) = e else {
                return false;
            };
            let pair = |l: &Expr, r: &Expr| {
                unit_index(l, &join.left).is_some_and(|i| left.unit_fields.contains(&i))
                    && unit_index(r, &join.right).is_some_and(|i| right.unit_fields.contains(&i))
            };
            b.op == datafusion::logical_expr::Operator::Eq
                && (pair(&b.left, &b.right) || pair(&b.right, &b.left))
        })
}

fn has_subquery(expr: &Expr) -> bool {
    let mut found = false;
    let _ = expr.apply(|e| {
        if matches!(
            e,
            Expr::ScalarSubquery(_)
                | Expr::Exists(_)
                | Expr::InSubquery(_)
                | Expr::SetComparison(_)
        ) {
            found = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// Catalog tables a plan reads, and whether any is private.
fn tables_read(plan: &LogicalPlan, catalog: &Catalog) -> (BTreeSet<String>, bool) {
    let mut tables = BTreeSet::new();
    let mut private = false;
    let _ = plan.apply_with_subqueries(|p| {
        if let LogicalPlan::TableScan(scan) = p {
            let name = scan.table_name.table().to_ascii_lowercase();
            if let Some(t) = catalog.table(&name) {
                private |= t.is_private();
                tables.insert(t.name.clone());
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    (tables, private)
}

/// Whether the first output column of `plan` is never NULL because a filter
/// on the way down says `column IS NOT NULL` (the guard the compiler adds
/// to IN subqueries over person-level rows).
fn null_guarded(plan: &LogicalPlan, column: usize) -> bool {
    match plan {
        LogicalPlan::Projection(p) => p
            .expr
            .get(column)
            .and_then(|e| unit_index(e, &p.input))
            .is_some_and(|j| null_guarded(&p.input, j)),
        LogicalPlan::SubqueryAlias(a) => null_guarded(&a.input, column),
        LogicalPlan::Filter(f) => {
            datafusion::logical_expr::utils::split_conjunction(&f.predicate)
                .into_iter()
                .any(|c| {
                    matches!(c, Expr::IsNotNull(inner)
                        if unit_index(inner, &f.input) == Some(column))
                })
                || null_guarded(&f.input, column)
        }
        LogicalPlan::Distinct(Distinct::All(input)) => null_guarded(input, column),
        _ => false,
    }
}

/// Checks the subqueries inside `expr`, evaluated over `input` rows.
fn check_subqueries(
    expr: &Expr,
    input: &LogicalPlan,
    input_prov: &Provenance,
    catalog: &Catalog,
    tables: &mut BTreeSet<String>,
) -> Result<()> {
    let mut outcome: Result<()> = Ok(());
    let _ = expr.apply(|e| {
        let step = match e {
            Expr::ScalarSubquery(s) => {
                let (read, private) = tables_read(&s.subquery, catalog);
                tables.extend(read);
                if private {
                    Err(refuse(
                        "a scalar subquery over person-level tables combines other persons' data into each \
                         row: compute it in its own DP query",
                    ))
                } else {
                    provenance(&s.subquery, catalog).map(|_| ())
                }
            }
            Expr::Exists(x) => {
                let (read, private) = tables_read(&x.subquery.subquery, catalog);
                tables.extend(read);
                if private {
                    Err(refuse(
                        "EXISTS over person-level tables is not supported: write \
                         person_id IN (SELECT person_id FROM ... WHERE ...) instead",
                    ))
                } else {
                    provenance(&x.subquery.subquery, catalog).map(|_| ())
                }
            }
            Expr::InSubquery(x) => {
                let (read, private) = tables_read(&x.subquery.subquery, catalog);
                tables.extend(read);
                if !private {
                    provenance(&x.subquery.subquery, catalog).map(|_| ())
                } else {
                    let sub = &x.subquery.subquery;
                    let lhs_is_unit = unit_index(&x.expr, input)
                        .is_some_and(|i| input_prov.unit_fields.contains(&i));
                    let must_compare = || {
                        refuse(
                            "an IN subquery over person-level tables must compare the privacy unit with the \
                             subquery's unit: person_id IN (SELECT person_id FROM ...)",
                        )
                    };
                    match provenance(sub, catalog) {
                        Err(_) if !lhs_is_unit => Err(must_compare()),
                        Err(e) => Err(e),
                        Ok(p) => {
                            let projects_unit =
                                p.unit_fields.contains(&0) && sub.schema().fields().len() == 1;
                            if !(lhs_is_unit && projects_unit) {
                                Err(must_compare())
                            } else if !null_guarded(sub, 0) {
                                // The compiler adds the guard; a subquery without it
                                // is a form it did not rewrite.
                                Err(refuse(
                                    "an IN subquery over person-level tables must exclude NULL units: add \
                                     WHERE person_id IS NOT NULL to it (one person's NULL would change \
                                     NOT IN for every row)",
                                ))
                            } else {
                                Ok(())
                            }
                        }
                    }
                }
            }
            Expr::SetComparison(_) => Err(refuse("ANY / ALL subqueries are not supported in DP queries")),
            _ => Ok(()),
        };
        match step {
            Ok(()) => Ok(TreeNodeRecursion::Continue),
            Err(err) => {
                outcome = Err(err);
                Ok(TreeNodeRecursion::Stop)
            }
        }
    });
    outcome
}
