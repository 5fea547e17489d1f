//! The federated plan: what each node runs, how it releases, how the
//! coordinator combines.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use confer_privacy::Noise;
use confer_privacy::selection::Selection;
use confer_protocol::catalog::{ColumnType, DomainValue};
use confer_protocol::metadata;
use confer_protocol::release::Cost;
use datafusion::scalar::ScalarValue;
use serde::Serialize;

use crate::error::{QueryError, Result};
use crate::options::{DpOptions, Mechanism};

/// Number of bins of the candidate grid PERCENTILE_CONT searches.
pub const PERCENTILE_BINS: usize = 64;

/// A compiled DP query.
#[derive(Debug, Clone, PartialEq)]
pub struct FederatedPlan {
    /// The validated options.
    pub options: DpOptions,
    /// The local bounded query each node runs (DataFusion SQL). It returns
    /// one row per non-empty group: columns `__g0..` (the keys), the exact
    /// partials named in [`PartialSpec::columns`], and `__persons` (the
    /// number of persons in the group, for partition selection).
    pub local_sql: String,
    /// Under `aggregation = 'secure'` with a private group key: the query
    /// that gives each person's values of that key (columns `__unit`,
    /// `__key`) after the same contribution bounding, for secure partition
    /// selection ([`crate::secure_select`]).
    pub key_sql: Option<String>,
    /// Group keys, in GROUP BY order.
    pub groups: Vec<GroupSpec>,
    /// DP aggregates, in SELECT order.
    pub aggregates: Vec<AggregateSpec>,
    /// Noisy partials the aggregates are computed from.
    pub partials: Vec<PartialSpec>,
    /// Partition selection, when a group key has no public domain.
    pub selection: Option<Selection>,
    /// The SELECT list.
    pub select: Vec<OutputItem>,
    /// HAVING / ORDER BY / LIMIT, applied to released values.
    pub post: PostProcess,
    /// The SELECT list's columns when they are not the released table
    /// itself (expressions of released values, hidden values they use).
    pub derived: Option<Derived>,
    /// The cost at each node.
    pub cost: PlanCost,
    /// Effective groups per person (the option, capped by the number of public groups).
    pub max_groups: usize,
    /// Rows per person per group.
    pub max_rows: usize,
    /// The tables the query reads.
    pub tables: Vec<String>,
    /// Whether the local bounded query relies on the node's own check
    /// that each person has one row in these tables (files unchanged since
    /// it was made: see [`crate::CompileOptions::verified_one_row`]) instead
    /// of enforcing it. A node compiles afresh if they changed meanwhile.
    pub one_row_trusted: bool,
    /// Why one person's rows could multiply the query's work (and so its
    /// run time), if they can: a node then answers only at a fixed time
    /// after it started (see [`crate::analyze::amplification`]).
    pub amplification: Option<String>,
}

/// A group key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupSpec {
    /// Output column name.
    pub name: String,
    /// Its type.
    pub column_type: ColumnType,
    /// Its public domain (every value released, empty groups included), or
    /// `None` for a private key released through partition selection.
    pub domain: Option<Vec<DomainValue>>,
    /// Whether this key is the `site` pseudo-column: each group then holds
    /// one site's release only.
    pub is_site: bool,
}

/// The DP aggregates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregateKind {
    /// `COUNT(*)`: rows, at most `max_rows_contributed` per person per group.
    CountStar,
    /// `COUNT(expr)`: rows where `expr` is not NULL.
    Count,
    /// `COUNT(DISTINCT unit)`: persons.
    CountDistinctUnit,
    /// `SUM(expr)`: per person the sum over kept rows, clamped.
    Sum,
    /// `AVG(expr)`: per person the mean over kept rows, clamped; mean over persons.
    Avg,
    /// `VAR_POP(expr)`: each kept row clamped; from noisy moments.
    VarPop,
    /// `STDDEV_POP(expr)`.
    StddevPop,
    /// `PERCENTILE_CONT(expr, p)`: from a noisy histogram over a grid.
    Percentile,
}

/// Where an aggregate's bounds came from and what they bound.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Bounds {
    /// Lower bound.
    pub lo: f64,
    /// Upper bound.
    pub hi: f64,
    /// Whether they bound each row's value (true), or each person's
    /// contribution to a group (false).
    pub per_row: bool,
}

/// One DP aggregate of the SELECT list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AggregateSpec {
    /// Output column name.
    pub name: String,
    /// What it computes.
    pub kind: AggregateKind,
    /// The expression as written.
    pub expr: String,
    /// Indices into [`FederatedPlan::partials`].
    pub partials: Vec<usize>,
    /// Bounds, for value aggregates.
    pub bounds: Option<Bounds>,
    /// The percentile, for PERCENTILE_CONT.
    pub percentile: Option<f64>,
    /// The value column (`__v{j}`) the aggregate reads in the local query.
    pub value: Option<usize>,
}

/// One noisy partial: a vector over groups (times `columns.len()` bins)
/// with a known sensitivity.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartialSpec {
    /// Column names in the local query and the released batch.
    pub columns: Vec<String>,
    /// The aggregate it belongs to.
    pub aggregate: usize,
    /// Whether values are integers (counts) or floats (sums).
    pub integer: bool,
    /// Most one person can change one group's value(s) by (L1 within a group).
    pub per_group_bound: f64,
    /// L1 sensitivity over all groups.
    pub l1: f64,
    /// L2 sensitivity over all groups.
    pub l2: f64,
}

/// An item of the SELECT list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputItem {
    /// The i-th group key.
    Group(usize),
    /// The i-th aggregate.
    Aggregate(usize),
}

/// The columns the researcher gets, computed from the released table.
#[derive(Debug, Clone, PartialEq)]
pub struct Derived {
    /// In output order, interval columns included.
    pub columns: Vec<FinalColumn>,
    /// Their schema (with each noisy value's metadata).
    pub schema: SchemaRef,
}

/// One output column.
#[derive(Debug, Clone, PartialEq)]
pub struct FinalColumn {
    /// Its name.
    pub name: String,
    /// SQL over the released table's columns, or `None` for the released
    /// column of this name.
    pub sql: Option<String>,
    /// Whether it is computed from a noisy value (it then carries the
    /// mechanism and confidence).
    pub noisy: bool,
    /// Why its interval is not given, where it is not.
    pub interval_note: Option<String>,
}

/// Post-processing over the released table, as SQL fragments that refer to
/// released column names.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PostProcess {
    /// HAVING, as a filter.
    pub having: Option<String>,
    /// ORDER BY items.
    pub order_by: Vec<String>,
    /// LIMIT.
    pub limit: Option<String>,
    /// OFFSET.
    pub offset: Option<String>,
}

impl PostProcess {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.having.is_none()
            && self.order_by.is_empty()
            && self.limit.is_none()
            && self.offset.is_none()
    }
}

/// What the query costs at each node, and its share per partial.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PlanCost {
    /// zCDP rho charged to the ledger.
    pub rho: f64,
    /// The epsilon that is reported (pure epsilon for Laplace).
    pub epsilon: f64,
    /// The delta that is reported.
    pub delta: f64,
    /// The part of `delta` that adds up across releases (partition
    /// selection); the rest only converts rho to epsilon.
    pub selection_delta: f64,
    /// Budget of each partial (and of partition selection): rho (Gaussian)
    /// or epsilon (Laplace).
    pub per_partial: f64,
}

impl PlanCost {
    /// As the wire type.
    pub fn to_cost(self) -> Cost {
        Cost {
            rho: self.rho,
            epsilon: self.epsilon,
            delta: self.delta,
        }
    }
}

/// Suffixes of the interval columns next to every DP value.
pub const CI_LOW_SUFFIX: &str = "_ci_low";
/// See [`CI_LOW_SUFFIX`].
pub const CI_HIGH_SUFFIX: &str = "_ci_high";

impl FederatedPlan {
    /// The calibrated noise of partial `index`.
    pub fn noise(&self, index: usize) -> Result<Noise> {
        let p = &self.partials[index];
        let result = match self.options.mechanism {
            Mechanism::Gaussian => Noise::gaussian(p.l2, self.cost.per_partial),
            Mechanism::Laplace => Noise::laplace(p.l1, self.cost.per_partial),
        };
        result.map_err(|e| QueryError::Rejected(format!("cannot calibrate noise: {e}")))
    }

    /// Whether the query releases only the keys of public domains: its
    /// answer is the domains themselves, and no node need be asked.
    pub fn public_keys_only(&self) -> bool {
        self.partials.is_empty() && self.selection.is_none()
    }

    /// Whether every group key has a public domain.
    pub fn public_groups(&self) -> bool {
        self.groups.iter().all(|g| g.domain.is_some())
    }

    /// Every group key of the public domains, in release order (one empty
    /// key when the query has no GROUP BY). Private keys have no such list.
    pub fn group_keys(&self) -> Result<Vec<Vec<ScalarValue>>> {
        let mut keys: Vec<Vec<ScalarValue>> = vec![Vec::new()];
        for g in &self.groups {
            let domain = g.domain.as_ref().ok_or_else(|| {
                QueryError::Internal(format!("group {} has no public domain", g.name))
            })?;
            let values: Vec<ScalarValue> = domain
                .iter()
                .map(|v| domain_scalar(v, g.column_type))
                .collect::<Result<_>>()?;
            let mut next = Vec::with_capacity(keys.len() * values.len());
            for k in &keys {
                for v in &values {
                    let mut key = k.clone();
                    key.push(v.clone());
                    next.push(key);
                }
            }
            keys = next;
        }
        Ok(keys)
    }

    /// Index of every key.
    pub fn key_index(keys: &[Vec<ScalarValue>]) -> HashMap<Vec<ScalarValue>, usize> {
        keys.iter()
            .enumerate()
            .map(|(i, k)| (k.clone(), i))
            .collect()
    }

    /// Schema of the batch a node releases: group columns, then partials.
    pub fn partial_schema(&self) -> SchemaRef {
        let mut fields: Vec<Field> = self
            .groups
            .iter()
            .map(|g| Field::new(&g.name, g.column_type.arrow_type(), true))
            .collect();
        for p in &self.partials {
            let ty = if p.integer {
                DataType::Int64
            } else {
                DataType::Float64
            };
            for c in &p.columns {
                fields.push(Field::new(c, ty.clone(), true));
            }
        }
        Arc::new(Schema::new(fields))
    }

    /// The metadata of a DP value column `name`: mechanism, confidence and
    /// the names of its interval columns.
    pub fn value_metadata(&self, name: &str) -> HashMap<String, String> {
        HashMap::from([
            (
                metadata::MECHANISM.to_string(),
                self.options.mechanism.name().to_string(),
            ),
            (
                metadata::CONFIDENCE.to_string(),
                self.options.confidence.to_string(),
            ),
            (
                metadata::INTERVAL.to_string(),
                format!("{name}{CI_LOW_SUFFIX},{name}{CI_HIGH_SUFFIX}"),
            ),
        ])
    }

    /// Schema of the result the researcher gets.
    pub fn output_schema(&self) -> SchemaRef {
        match &self.derived {
            Some(d) => d.schema.clone(),
            None => self.release_schema(),
        }
    }

    /// Schema of the combined release: the released keys and values, each
    /// DP value followed by its interval columns.
    pub fn release_schema(&self) -> SchemaRef {
        let mut fields: Vec<Field> = Vec::new();
        for item in &self.select {
            match item {
                OutputItem::Group(i) => {
                    let g = &self.groups[*i];
                    fields.push(Field::new(&g.name, g.column_type.arrow_type(), true));
                }
                OutputItem::Aggregate(i) => {
                    let a = &self.aggregates[*i];
                    let meta = self.value_metadata(&a.name);
                    fields.push(Field::new(&a.name, a.kind.value_type(), true).with_metadata(meta));
                    fields.push(Field::new(
                        format!("{}{CI_LOW_SUFFIX}", a.name),
                        DataType::Float64,
                        true,
                    ));
                    fields.push(Field::new(
                        format!("{}{CI_HIGH_SUFFIX}", a.name),
                        DataType::Float64,
                        true,
                    ));
                }
            }
        }
        Arc::new(Schema::new(fields))
    }
}

impl AggregateKind {
    /// Whether the aggregate is a count (subject to the small-cell rule).
    pub fn is_count(self) -> bool {
        matches!(
            self,
            AggregateKind::CountStar | AggregateKind::Count | AggregateKind::CountDistinctUnit
        )
    }

    /// The Arrow type of released values.
    pub fn value_type(self) -> DataType {
        if self.is_count() {
            DataType::Int64
        } else {
            DataType::Float64
        }
    }

    /// SQL name, upper case.
    pub fn sql_name(self) -> &'static str {
        match self {
            AggregateKind::CountStar | AggregateKind::Count | AggregateKind::CountDistinctUnit => {
                "COUNT"
            }
            AggregateKind::Sum => "SUM",
            AggregateKind::Avg => "AVG",
            AggregateKind::VarPop => "VAR_POP",
            AggregateKind::StddevPop => "STDDEV_POP",
            AggregateKind::Percentile => "PERCENTILE_CONT",
        }
    }
}

/// A domain value as a scalar of the column's type.
pub fn domain_scalar(value: &DomainValue, ty: ColumnType) -> Result<ScalarValue> {
    match (value, ty) {
        (DomainValue::Int(v), ColumnType::Int64) => Ok(ScalarValue::Int64(Some(*v))),
        (DomainValue::Text(v), ColumnType::Utf8) => Ok(ScalarValue::Utf8(Some(v.clone()))),
        (v, ty) => Err(QueryError::Plan(format!(
            "domain value {v} does not fit column type {ty}: fix the domain in node.toml"
        ))),
    }
}
