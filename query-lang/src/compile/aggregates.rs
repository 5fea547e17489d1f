//! Phase 2: the group keys and DP aggregates of the SELECT list, as
//! written, compared as resolved.
//!
//! Each SELECT item is a released key, a DP aggregate, or an expression of
//! them evaluated after release (post-processing); anything else would
//! release a person-level value and is refused.

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    DuplicateTreatment, Expr, FunctionArg, FunctionArgExpr, FunctionArgOperator, FunctionArguments,
    GroupByExpr, Ident, SelectItem, Value, VisitMut, VisitorMut,
};

use super::shape::{Shape, reject_aggregates_in};
use super::{
    AGGREGATE_NAMES, SITE_COLUMN, function_name, ident_name, is_aggregate_call, number,
    parse_sql_expr, unsupported,
};
use crate::derive;
use crate::error::{QueryError, Result};
use crate::plan::{AggregateKind, OutputItem};

/// The SELECT list and GROUP BY, resolved against the rows read.
pub(super) struct Selected {
    /// The GROUP BY expressions (positions and aliases resolved).
    pub(super) group_exprs: Vec<Expr>,
    /// Their keys, to compare with other expressions as resolved.
    pub(super) group_keys: Vec<String>,
    /// Their released names.
    pub(super) group_names: Vec<String>,
    /// The value columns of the local query (as it computes them).
    pub(super) values: Vec<String>,
    /// The argument as written where the local query converts it (to
    /// check its type before converting).
    pub(super) raw_values: Vec<Option<String>>,
    /// The aggregates released, including those only post-processing uses.
    pub(super) aggs: Vec<Agg>,
    /// Their keys, as [`Selected::group_keys`].
    pub(super) agg_keys: Vec<String>,
    /// What the released table holds, in order.
    pub(super) select_items: Vec<OutputItem>,
    /// What the SELECT list shows, in its order.
    pub(super) finals: Vec<Final>,
}

/// Phase 2: classifies the SELECT list and resolves GROUP BY.
pub(super) fn select(shape: &Shape) -> Result<Selected> {
    let select = &shape.select;
    let names_in_source = &shape.names_in_source;
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
        names_in_source,
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
            names: names_in_source,
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
    Ok(Selected {
        group_exprs,
        group_keys,
        group_names: group_names
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect(),
        values,
        raw_values,
        aggs,
        agg_keys,
        select_items,
        finals,
    })
}

/// An aggregate of the SELECT list, before compilation.
pub(super) struct Agg {
    pub(super) kind: AggregateKind,
    pub(super) name: String,
    pub(super) expr: String,
    /// The argument, if any (index into the value columns).
    pub(super) value: Option<usize>,
    pub(super) bounds: Option<(f64, f64, bool)>,
    pub(super) percentile: Option<f64>,
}

/// An item of the SELECT list as the researcher sees it.
pub(super) enum Final {
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

/// Classifies a SELECT item: a DP aggregate, or not.
pub(super) fn classify(
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

pub(super) fn bounds_pair(e: &Expr) -> Option<(f64, f64)> {
    match e {
        Expr::Tuple(items) if items.len() == 2 => Some((number(&items[0])?, number(&items[1])?)),
        _ => None,
    }
}

pub(super) fn unique_name(names: &mut Vec<String>, wanted: String) -> String {
    let mut name = wanted.clone();
    let mut n = 2;
    while names.contains(&name) {
        name = format!("{wanted}_{n}");
        n += 1;
    }
    names.push(name.clone());
    name
}

pub(super) fn group_default_name(expr: &Expr, index: usize) -> String {
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
