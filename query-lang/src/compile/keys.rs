//! Phase 3: the source projection, planned: the type and public domain
//! of each group key, the bounds of each aggregate's argument (from the
//! query, or else the catalog), and which arguments are the unit.

use confer_protocol::catalog::{ColumnType, DomainValue};
use datafusion::arrow::datatypes::DataType;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::ast::{Expr, Value};

use super::aggregates::{Selected, group_default_name};
use super::shape::Shape;
use super::{MAX_PUBLIC_GROUPS, SITE_COLUMN, plan_sql};
use crate::analyze::{self, Origin};
use crate::catalog::Catalog;
use crate::error::{QueryError, Result};
use crate::options::Aggregation;
use crate::plan::{AggregateKind, GroupSpec};

/// The released keys, typed, and what the rows read look like once projected.
pub(super) struct Keys {
    /// Each group key: name, type, public domain (if any).
    pub(super) groups: Vec<GroupSpec>,
    /// Whether some key has no public domain (partition selection).
    pub(super) private_keys: bool,
    /// The number of public groups (`usize::MAX` with private keys).
    pub(super) public_groups: usize,
    /// The planned source projection: unit, keys, values.
    pub(super) src_plan: LogicalPlan,
}

/// Phase 3: plans the source projection; types the keys and fills each
/// aggregate's bounds (in `selected`) from the catalog where the query
/// gives none.
pub(super) async fn resolve(
    shape: &Shape,
    selected: &mut Selected,
    catalog: &Catalog,
) -> Result<Keys> {
    let Shape {
        options,
        ctx,
        with_sql,
        from_sql,
        where_sql,
        unit_sql,
        site_literal,
        ..
    } = shape;
    let group_exprs = &selected.group_exprs;
    let mut src_cols = vec![format!("{unit_sql} AS __unit")];
    for (i, g) in group_exprs.iter().enumerate() {
        src_cols.push(format!("{g} AS __g{i}"));
    }
    for (j, v) in selected.values.iter().enumerate() {
        let v = selected.raw_values[j].as_ref().unwrap_or(v);
        src_cols.push(format!("{v} AS __v{j}"));
    }
    let src_plan = plan_sql(
        ctx,
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
        let name = selected.group_names[i].clone();
        if let Some(values) = &domain {
            check_domain_type(&name, column_type, values)?;
        }
        groups.push(GroupSpec {
            name,
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

    // Bounds and argument checks.
    for agg in &mut selected.aggs {
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
    Ok(Keys {
        groups,
        private_keys,
        public_groups,
        src_plan,
    })
}

pub(super) fn column_of<'c>(
    catalog: &'c Catalog,
    origin: &Origin,
) -> Option<&'c confer_protocol::catalog::ColumnInfo> {
    catalog
        .table(&origin.table)
        .and_then(|t| t.column(&origin.column))
}

pub(super) fn column_type_of(ty: &DataType) -> Option<ColumnType> {
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

pub(super) fn check_domain_type(
    column: &str,
    ty: ColumnType,
    values: &[DomainValue],
) -> Result<()> {
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
