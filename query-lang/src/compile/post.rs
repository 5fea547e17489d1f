//! Phase 6: what the researcher sees: the released table itself, or the
//! SELECT list's expressions of it (post-processing, with intervals where
//! they can be derived), then HAVING, ORDER BY and LIMIT over released
//! names only.

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    Expr, Ident, Query, Select, Value, Visit, VisitMut, Visitor, VisitorMut,
};

use super::aggregates::{Final, Selected};
use super::budget::Bounded;
use super::keys::Keys;
use super::shape::Shape;
use super::{is_aggregate_call, unsupported};
use crate::derive;
use crate::error::{QueryError, Result};
use crate::plan::{CI_HIGH_SUFFIX, CI_LOW_SUFFIX, FinalColumn, OutputItem, PostProcess};

/// What the researcher sees, beyond the released table.
pub(super) struct Released {
    /// HAVING, ORDER BY, LIMIT and OFFSET over released names.
    pub(super) post: PostProcess,
    /// The SELECT list's columns when it computes from released values
    /// (`None` when it shows the released table as is).
    pub(super) derived: Option<Vec<FinalColumn>>,
}

/// Phase 6: derived columns and post-processing.
pub(super) fn release(
    shape: &Shape,
    selected: &Selected,
    keys: &Keys,
    bounded: &Bounded,
) -> Result<Released> {
    let names_in_source = &shape.names_in_source;
    let aggregates = &bounded.aggregates;
    let named_groups = &keys.groups;
    let finals = &selected.finals;
    let mut post_items: Vec<(String, String)> = Vec::new();
    for (key, agg) in selected.agg_keys.iter().zip(aggregates) {
        post_items.push((key.clone(), agg.name.clone()));
    }
    for (key, g) in selected.group_keys.iter().zip(named_groups) {
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
    for f in finals {
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
    let post = compile_post(
        &shape.query,
        &shape.select,
        &post_items,
        &item_names,
        names_in_source,
    )?;
    let derived = if finals.len() == selected.select_items.len()
        && finals.iter().all(|f| matches!(f, Final::Released(_)))
    {
        None
    } else {
        Some(columns)
    };
    Ok(Released { post, derived })
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

pub(super) fn reject_subqueries(expr: &Expr, clause: &str) -> Result<()> {
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
