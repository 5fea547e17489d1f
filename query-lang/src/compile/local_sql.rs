//! Phase 5: the local bounded query each node runs (see the module map in
//! [`super`]), planned and checked total: nothing in it may fail on a row.

use std::fmt::Write as _;

use confer_protocol::catalog::{ColumnType, DomainValue};

use super::CompileOptions;
use super::aggregates::Selected;
use super::budget::Bounded;
use super::keys::Keys;
use super::plan_sql;
use super::shape::Shape;
use crate::catalog::Catalog;
use crate::error::Result;
use crate::options::Aggregation;
use crate::plan::{AggregateKind, AggregateSpec, Bounds, GroupSpec, PERCENTILE_BINS, PartialSpec};

/// The SQL a node runs.
pub(super) struct Local {
    /// The local bounded query: per group, the exact partials and the
    /// number of persons.
    pub(super) sql: String,
    /// Under secure aggregation with a private key: each person's distinct
    /// keys, for secure partition selection.
    pub(super) key_sql: Option<String>,
    /// Whether one row per person was trusted rather than enforced.
    pub(super) one_row_trusted: bool,
}

/// Phase 5: writes the local bounded query and checks that it is total.
pub(super) async fn write(
    shape: &Shape,
    selected: &Selected,
    keys: &Keys,
    bounded: &Bounded,
    site: Option<&str>,
    options: &CompileOptions,
    catalog: &Catalog,
) -> Result<Local> {
    let salt = match (options.sampling_salt, site) {
        (Some(s), _) => s,
        (None, Some(_)) => fresh_salt(),
        (None, None) => 0,
    };
    let prov = &shape.source_prov;
    let one_row_trusted = prov.one_row_per_unit
        && !prov.tables.is_empty()
        && prov
            .tables
            .iter()
            .all(|t| options.verified_one_row.contains(t));
    let (person_groups, partials_select) = local_sql(&LocalSql {
        with: shape.query.with.as_ref().map(|w| {
            w.cte_tables
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }),
        from: &shape.from_sql,
        selection: shape.select.selection.as_ref().map(|e| e.to_string()),
        unit: &shape.unit_sql,
        groups: &selected
            .group_exprs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        specs: &keys.groups,
        one_row_per_unit: shape.source_prov.one_row_per_unit,
        one_row_trusted,
        values: &selected.values,
        aggregates: &bounded.aggregates,
        partials: &bounded.partials,
        max_rows: bounded.needs_row_sampling.then_some(bounded.max_rows),
        max_groups: bounded.needs_group_sampling.then_some(bounded.max_groups),
        salt,
        deterministic: options.sampling_salt.is_some(),
    });
    let sql = format!("{person_groups}\n{partials_select}");
    // Nothing in the query a node will run may fail on a row: every
    // expression, ours and the researcher's, after type coercion.
    let local_plan = plan_sql(&shape.ctx, &sql, catalog).await?;
    crate::total::check_plan(&local_plan)?;

    let private = keys.groups.iter().any(|g| g.domain.is_none());
    let key_sql = if shape.options.aggregation == Aggregation::Secure && private {
        let i = crate::secure_select::secure_private_key(&keys.groups)?;
        let sql = format!(
            "{person_groups}\nSELECT DISTINCT __unit, __g{i} AS __key FROM __confer_pg WHERE __g{i} IS NOT NULL"
        );
        crate::total::check_plan(&plan_sql(&shape.ctx, &sql, catalog).await?)?;
        Some(sql)
    } else {
        None
    };
    Ok(Local {
        sql,
        key_sql,
        one_row_trusted,
    })
}

pub(super) struct LocalSql<'a> {
    with: Option<String>,
    from: &'a str,
    selection: Option<String>,
    unit: &'a str,
    groups: &'a [String],
    specs: &'a [GroupSpec],
    /// Each person has at most one row: a person's contribution is their
    /// row, with no per-person aggregation.
    one_row_per_unit: bool,
    /// One row per person, and the node has checked it on these very
    /// files: the query need not enforce it.
    one_row_trusted: bool,
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

pub(super) fn lit(v: f64) -> String {
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
pub(super) fn clamp(expr: &str, lo: f64, hi: f64) -> String {
    format!(
        "CASE WHEN ({expr}) IS NULL OR isnan({expr}) THEN NULL ELSE least(greatest({expr}, {}), {}) END",
        lit(lo),
        lit(hi)
    )
}

/// How a person's rows are ordered before the first `max_rows` of each
/// group are kept: at random, or by a salted hash of the row.
pub(super) fn row_order(l: &LocalSql<'_>) -> String {
    if !l.deterministic {
        return "random()".into();
    }
    let mut parts = vec!["__unit".to_string()];
    parts.extend((0..l.groups.len()).map(|i| format!("__g{i}")));
    parts.extend((0..l.values.len()).map(|j| format!("__v{j}")));
    keyed_hash(l.salt, &parts.join(", "))
}

/// `confer_hash` of `columns` keyed with `salt` (see `crate::bounding::hash`).
fn keyed_hash(salt: u64, columns: &str) -> String {
    format!(
        "{}({}, {columns})",
        crate::bounding::hash::NAME,
        salt as i64
    )
}

/// The local bounded query as its `WITH` part (ending with `__confer_pg`,
/// one row per person and group after contribution bounding) and the final
/// `SELECT` of the partials over it.
pub(super) fn local_sql(l: &LocalSql<'_>) -> (String, String) {
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
    if l.one_row_trusted {
        // Checked by the node on these files (see
        // `CompileOptions::verified_one_row`): each source row is a person.
    } else if l.one_row_per_unit {
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
    } else if let Some(r) = l.max_rows {
        // Each person's rows in a group, at most `r` of them. The ranking
        // runs per person and group without a global sort (see
        // `crate::bounding::rank`).
        let _ = write!(
            sql,
            ",\n__confer_ranked AS (SELECT *, row_number() OVER (PARTITION BY {person_group} ORDER BY {}) AS __row_rank FROM __confer_src),\n\
             __confer_rows AS (SELECT * FROM __confer_ranked WHERE __row_rank <= {r})",
            row_order(l)
        );
        rows_table = "__confer_rows";
    }

    // Per person and group: each person's contribution (their row itself
    // when each person has at most one row: no per-person aggregation).
    let one = l.one_row_per_unit;
    // With a choice of groups to make, each person's groups are first
    // aggregated (`__confer_pgall`), each with a salted hash of the person
    // and the group, and the `max_groups` with the smallest hashes kept.
    let choose_groups = l.max_groups.filter(|_| !one);
    let pg_name = if choose_groups.is_some() {
        "__confer_pgall"
    } else {
        "__confer_pg"
    };
    let _ = write!(sql, ",\n{pg_name} AS (SELECT {person_group}");
    if choose_groups.is_some() {
        let _ = write!(
            sql,
            ", {} AS __group_hash",
            keyed_hash(l.salt, &person_group)
        );
    }
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
    if let Some(k) = choose_groups {
        let _ = write!(
            sql,
            ",\n__confer_grouped AS (SELECT *, row_number() OVER (PARTITION BY __unit ORDER BY __group_hash, {}) AS __group_rank FROM __confer_pgall),\n\
             __confer_pg AS (SELECT * FROM __confer_grouped WHERE __group_rank <= {k})",
            gcols.join(", ")
        );
    }
    finals.push("CAST(count(*) AS BIGINT) AS __persons".into());
    let mut last = format!("SELECT {} FROM __confer_pg", finals.join(", "));
    if !gcols.is_empty() {
        let _ = write!(last, " GROUP BY {}", gcols.join(", "));
    }
    (sql, last)
}

/// The value column an aggregate reads (`__v{j}`), from its partial's position.
pub(super) fn value_index(a: &AggregateSpec) -> Option<usize> {
    a.value
}

/// The filter that keeps rows whose key is in the public domain: runs of
/// consecutive integers as BETWEEN (a range domain of any size is one
/// comparison), other values as an IN list.
pub(super) fn domain_condition(expr: &str, domain: &[DomainValue]) -> String {
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

/// A fresh random salt for the random choice of groups (OS randomness).
pub(super) fn fresh_salt() -> u64 {
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
