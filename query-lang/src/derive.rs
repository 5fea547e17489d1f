//! The SELECT list as people write it.
//!
//! * Names are compared as DataFusion resolves them, not as text: `p.x` and
//!   `x` are the same key when `x` is a column of `p` only, `(SUM(x))` is
//!   `SUM(x)`, and `GROUP BY 1` / `GROUP BY <alias>` name SELECT items.
//! * Post-processing: an item that is neither a GROUP BY key nor a DP
//!   aggregate may be any expression of released values (aggregates, keys,
//!   constants), evaluated by the coordinator over the released table. It
//!   costs nothing beyond the aggregates it uses. Its interval is derived
//!   where the expression is a monotone map of one released value, and
//!   otherwise omitted with a note.

use std::collections::HashMap;
use std::ops::ControlFlow;

use datafusion::common::DFSchema;
use datafusion::sql::sqlparser::ast::{
    BinaryOperator, DataType as SqlType, Expr, FunctionArg, FunctionArgExpr, FunctionArguments,
    Ident, ObjectNamePart, SelectItem, UnaryOperator, Value, VisitMut, VisitorMut,
};

use crate::error::{QueryError, Result};

/// The columns a query reads, for comparing expressions as resolved.
pub(crate) struct Names {
    /// Column name (lower case unless quoted) → the relations that have it.
    columns: HashMap<String, Vec<String>>,
}

impl Names {
    /// The columns of the relation the query reads (its FROM and WHERE).
    pub(crate) fn new(schema: &DFSchema) -> Self {
        let mut columns: HashMap<String, Vec<String>> = HashMap::new();
        for (qualifier, field) in schema.iter() {
            columns
                .entry(field.name().clone())
                .or_default()
                .push(qualifier.map(|q| q.table().to_string()).unwrap_or_default());
        }
        Self { columns }
    }

    /// Whether `ident` names a column of the relation.
    pub(crate) fn is_column(&self, ident: &Ident) -> bool {
        self.columns.contains_key(&normal(ident))
    }

    /// A text that two expressions share exactly when they compute the same
    /// thing as DataFusion resolves them: outer parentheses dropped,
    /// unquoted names in lower case, each column qualified by its relation
    /// where that is unambiguous.
    pub(crate) fn key(&self, expr: &Expr) -> String {
        let mut e = strip(expr).clone();
        let mut q = Qualify(self);
        let _ = VisitMut::visit(&mut e, &mut q);
        e.to_string()
    }
}

/// The name as DataFusion resolves it: unquoted identifiers are lower case.
fn normal(ident: &Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_ascii_lowercase()
    }
}

struct Qualify<'a>(&'a Names);

impl VisitorMut for Qualify<'_> {
    type Break = ();
    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        match expr {
            Expr::Identifier(id) => {
                let name = normal(id);
                *expr = match self.0.columns.get(&name).map(Vec::as_slice) {
                    Some([q]) if !q.is_empty() => Expr::CompoundIdentifier(vec![
                        Ident::with_quote('"', q.clone()),
                        Ident::with_quote('"', name),
                    ]),
                    _ => Expr::Identifier(Ident::with_quote('"', name)),
                };
            }
            Expr::CompoundIdentifier(ids) => {
                for id in ids.iter_mut() {
                    *id = Ident::with_quote('"', normal(id));
                }
            }
            Expr::Function(f) => {
                for part in f.name.0.iter_mut() {
                    if let ObjectNamePart::Identifier(id) = part
                        && id.quote_style.is_none()
                    {
                        id.value = id.value.to_ascii_lowercase();
                    }
                }
            }
            Expr::Nested(inner) => {
                // Parentheses only group: `(a + b)` is `a + b` where it stands alone.
                if matches!(
                    inner.as_ref(),
                    Expr::Identifier(_)
                        | Expr::CompoundIdentifier(_)
                        | Expr::Function(_)
                        | Expr::Value(_)
                        | Expr::Nested(_)
                ) {
                    *expr = strip(inner).clone();
                    return self.pre_visit_expr(expr);
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// The expression inside any outer parentheses.
pub(crate) fn strip(expr: &Expr) -> &Expr {
    match expr {
        Expr::Nested(inner) => strip(inner),
        e => e,
    }
}

/// Replaces `GROUP BY <n>` by the n-th SELECT item and `GROUP BY <alias>`
/// (a name that is not a column the query reads) by the aliased item.
pub(crate) fn resolve_group_by(
    groups: &mut [Expr],
    projection: &[SelectItem],
    names: &Names,
    is_aggregate: impl Fn(&Expr) -> bool,
) -> Result<()> {
    for g in groups.iter_mut() {
        let target = match strip(g) {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => {
                    let k: usize = n.parse().ok().filter(|k| *k >= 1).ok_or_else(|| {
                        QueryError::Rejected(format!(
                            "GROUP BY {n}: a position in the SELECT list is a whole number from 1"
                        ))
                    })?;
                    let item = projection.get(k - 1).ok_or_else(|| {
                        QueryError::Rejected(format!(
                            "GROUP BY {k}: the SELECT list has only {} item(s)",
                            projection.len()
                        ))
                    })?;
                    match item {
                        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                            Some((e.clone(), format!("GROUP BY {k}")))
                        }
                        _ => {
                            return Err(QueryError::Rejected(format!(
                                "GROUP BY {k} names a wildcard: name the group column instead"
                            )));
                        }
                    }
                }
                _ => None,
            },
            Expr::Identifier(id) if !names.is_column(id) => {
                projection.iter().find_map(|item| match item {
                    SelectItem::ExprWithAlias { expr, alias } if normal(alias) == normal(id) => {
                        Some((expr.clone(), format!("GROUP BY {id}")))
                    }
                    _ => None,
                })
            }
            _ => None,
        };
        if let Some((expr, what)) = target {
            if is_aggregate(&expr) {
                return Err(QueryError::Rejected(format!(
                    "{what} names {expr}, an aggregate: group by a column or expression of the rows"
                )));
            }
            *g = expr;
        }
    }
    Ok(())
}

/// How the interval of a post-processed item is found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Interval {
    /// The item uses no noisy value (constants and keys): no interval.
    Exact,
    /// A monotone map of one noisy value: SQL for its bounds over the
    /// released table.
    Derived { low: String, high: String },
    /// Not derived, and why.
    Omitted(String),
}

/// The interval of `expr` (written over released column names), given the
/// names of the noisy values and their interval columns.
pub(crate) fn interval(expr: &Expr, noisy: &[(String, String, String)]) -> Interval {
    let mut found = Uses(noisy, Vec::new());
    let _ = VisitMut::visit(&mut expr.clone(), &mut found);
    let uses = found.1;
    match uses.as_slice() {
        [] => Interval::Exact,
        [one] => {
            let (name, low_col, high_col) = &noisy[*one];
            let mut guards = Vec::new();
            match monotone(expr, name, &mut guards) {
                Ok(true) => {}
                Ok(false) => return Interval::Exact,
                Err(why) => return Interval::Omitted(why),
            }
            let at = |col: &str| -> String {
                let mut e = expr.clone();
                let _ = VisitMut::visit(&mut e, &mut Rename(name, col));
                e.to_string()
            };
            let guard_at = |col: &str| -> Vec<String> {
                guards
                    .iter()
                    .map(|g| {
                        let mut e = g.clone();
                        let _ = VisitMut::visit(&mut e, &mut Rename(name, col));
                        format!("({e}) >= 0")
                    })
                    .collect()
            };
            let (a, b) = (at(low_col), at(high_col));
            let mut conditions = guard_at(low_col);
            conditions.extend(guard_at(high_col));
            let wrap = |v: String| {
                let v = format!("CAST({v} AS DOUBLE)");
                if conditions.is_empty() {
                    v
                } else {
                    format!("CASE WHEN {} THEN {v} END", conditions.join(" AND "))
                }
            };
            Interval::Derived {
                low: wrap(format!("LEAST({a}, {b})")),
                high: wrap(format!("GREATEST({a}, {b})")),
            }
        }
        _ => Interval::Omitted(
            "the interval of an expression of several released values (or of one used twice) is not \
             derived: their noise may partly cancel or add up; use each value's own interval"
                .into(),
        ),
    }
}

/// Counts references to noisy values.
struct Uses<'a>(&'a [(String, String, String)], Vec<usize>);

impl VisitorMut for Uses<'_> {
    type Break = ();
    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        if let Expr::Identifier(id) = expr
            && let Some(i) = self.0.iter().position(|(n, _, _)| *n == id.value)
        {
            self.1.push(i);
        }
        ControlFlow::Continue(())
    }
}

struct Rename<'a>(&'a str, &'a str);

impl VisitorMut for Rename<'_> {
    type Break = ();
    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        if let Expr::Identifier(id) = expr
            && id.value == self.0
        {
            *expr = Expr::Identifier(Ident::with_quote('"', self.1));
        }
        ControlFlow::Continue(())
    }
}

fn mentions(expr: &Expr, name: &str) -> bool {
    let noisy = [(name.to_string(), String::new(), String::new())];
    let mut found = Uses(&noisy, Vec::new());
    let _ = VisitMut::visit(&mut expr.clone(), &mut found);
    !found.1.is_empty()
}

/// Functions that never decrease as their first argument grows (the
/// others fixed), with whether they need that argument to be >= 0.
const MONOTONE_FUNCTIONS: &[(&str, bool)] = &[
    ("round", false),
    ("floor", false),
    ("ceil", false),
    ("trunc", false),
    ("exp", false),
    ("cbrt", false),
    ("sqrt", true),
    ("ln", true),
    ("log10", true),
    ("log2", true),
];

/// Whether `expr` is monotone (either way) in the noisy value `name`, which
/// it uses once: `Ok(false)` when it does not use it. Conditions on the way
/// (an argument that must be >= 0 at both ends) go to `guards`.
fn monotone(expr: &Expr, name: &str, guards: &mut Vec<Expr>) -> std::result::Result<bool, String> {
    if !mentions(expr, name) {
        return Ok(false);
    }
    let not_monotone = || {
        Err(format!(
            "the interval of {expr} is not derived: it is not a monotone map of the released value"
        ))
    };
    match expr {
        Expr::Identifier(_) => Ok(true),
        Expr::Nested(inner) => monotone(inner, name, guards),
        Expr::UnaryOp {
            op: UnaryOperator::Minus | UnaryOperator::Plus,
            expr,
        } => monotone(expr, name, guards),
        Expr::BinaryOp { left, op, right } => {
            let (l, r) = (mentions(left, name), mentions(right, name));
            match op {
                BinaryOperator::Plus | BinaryOperator::Minus | BinaryOperator::Multiply => {
                    if l {
                        monotone(left, name, guards)
                    } else if r {
                        monotone(right, name, guards)
                    } else {
                        Ok(false)
                    }
                }
                BinaryOperator::Divide if l && !r => monotone(left, name, guards),
                _ => not_monotone(),
            }
        }
        Expr::Cast {
            expr, data_type, ..
        } if numeric(data_type) => monotone(expr, name, guards),
        Expr::Function(f) => {
            let fname = f.name.to_string().to_ascii_lowercase();
            let FunctionArguments::List(list) = &f.args else {
                return not_monotone();
            };
            let args: Vec<&Expr> = list
                .args
                .iter()
                .filter_map(|a| match a {
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
                    _ => None,
                })
                .collect();
            if args.len() != list.args.len()
                || args.is_empty()
                || args[1..].iter().any(|a| mentions(a, name))
            {
                return not_monotone();
            }
            let first = args[0];
            if let Some((_, needs_positive)) = MONOTONE_FUNCTIONS.iter().find(|(f, _)| *f == fname)
            {
                if *needs_positive {
                    guards.push(first.clone());
                }
                return monotone(first, name, guards);
            }
            if (fname == "power" || fname == "pow") && args.len() == 2 {
                // x^c is monotone for x >= 0 at any constant c, and
                // everywhere for odd whole c.
                let odd = matches!(strip(args[1]), Expr::Value(v) if matches!(&v.value, Value::Number(n, _) if n.parse::<i64>().is_ok_and(|c| c > 0 && c % 2 == 1)));
                if !odd {
                    guards.push(first.clone());
                }
                return monotone(first, name, guards);
            }
            not_monotone()
        }
        _ => not_monotone(),
    }
}

fn numeric(ty: &SqlType) -> bool {
    let text = ty.to_string().to_ascii_lowercase();
    [
        "int", "bigint", "smallint", "tinyint", "integer", "double", "float", "real", "decimal",
        "numeric",
    ]
    .iter()
    .any(|t| text.starts_with(t))
}
