//! Ranking within partitions by hashing instead of sorting.
//!
//! DataFusion runs `row_number()`, `rank()` and `dense_rank()` `OVER
//! (PARTITION BY p ORDER BY o)` by sorting all input rows on `(p, o)`.
//! Contribution bounding partitions by person (and group), so each
//! partition is a handful of rows and the global sort is wasted work.
//! [`RankExec`] computes the same column without it: it buffers its
//! input (as the sort does, and under the same memory pool), numbers each
//! row's partition through a hash table, orders each partition's rows
//! among themselves, and appends the rank to the rows in their input order.
//!
//! The planner ([`planner`]) replaces a logical `Window` whose every
//! expression is one of these three functions, with a non-empty PARTITION
//! BY, no arguments, no FILTER and no DISTINCT. Anything else keeps
//! DataFusion's window operator. The column computed is the one the
//! window computes (tested against it in `tests/bounding.rs`), so the SQL
//! a node runs, EXPLAIN PRIVACY and the sensitivity auditor all read the
//! standard window functions; only their execution differs.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, UInt64Array};
use arrow::compute::concat;
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, Rows, SortField};
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::tree_node::{Transformed, TreeNodeRecursion};
use datafusion::common::{DFSchemaRef, Result, internal_err};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::expr::WindowFunction;
use datafusion::logical_expr::{
    Expr, Extension, LogicalPlan, UserDefinedLogicalNode, UserDefinedLogicalNodeCore,
    WindowFunctionDefinition,
};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr, PhysicalSortExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, ExecutionPlanProperties,
    PlanProperties,
};
use datafusion::physical_planner::{DefaultPhysicalPlanner, ExtensionPlanner, PhysicalPlanner};
use futures::{StreamExt, TryStreamExt};

/// The ranking functions this operator computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    RowNumber,
    Rank,
    DenseRank,
}

impl Kind {
    fn of(name: &str) -> Option<Self> {
        match name {
            "row_number" => Some(Kind::RowNumber),
            "rank" => Some(Kind::Rank),
            "dense_rank" => Some(Kind::DenseRank),
            _ => None,
        }
    }
}

/// The window function of a `Window` expression this operator can run.
fn rankable(expr: &Expr) -> Option<(&WindowFunction, Kind)> {
    let Expr::WindowFunction(w) = expr else {
        return None;
    };
    let WindowFunctionDefinition::WindowUDF(udf) = &w.fun else {
        return None;
    };
    let kind = Kind::of(udf.name())?;
    let p = &w.params;
    (p.args.is_empty()
        && !p.partition_by.is_empty()
        && p.filter.is_none()
        && !p.distinct
        && p.null_treatment.is_none())
    .then_some((w.as_ref(), kind))
}

/// The logical node standing for a `Window` of ranking functions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RankNode {
    input: LogicalPlan,
    window_expr: Vec<Expr>,
    schema: DFSchemaRef,
}

impl PartialOrd for RankNode {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        match self.window_expr.partial_cmp(&other.window_expr) {
            Some(Ordering::Equal) => self.input.partial_cmp(&other.input),
            o => o,
        }
    }
}

impl UserDefinedLogicalNodeCore for RankNode {
    fn name(&self) -> &str {
        "HashRank"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![&self.input]
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    fn expressions(&self) -> Vec<Expr> {
        self.window_expr.clone()
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exprs: Vec<String> = self.window_expr.iter().map(|e| e.to_string()).collect();
        write!(f, "HashRank: {}", exprs.join(", "))
    }

    fn with_exprs_and_inputs(
        &self,
        exprs: Vec<Expr>,
        mut inputs: Vec<LogicalPlan>,
    ) -> Result<Self> {
        if inputs.len() != 1 {
            return internal_err!("HashRank takes one input");
        }
        Ok(Self {
            input: inputs.remove(0),
            window_expr: exprs,
            schema: Arc::clone(&self.schema),
        })
    }
}

/// Replaces every `Window` of ranking functions (in subqueries too) with
/// a [`RankNode`].
fn rewrite(plan: LogicalPlan) -> Result<LogicalPlan> {
    plan.transform_up_with_subqueries(|p| match p {
        LogicalPlan::Window(w)
            if !w.window_expr.is_empty() && w.window_expr.iter().all(|e| rankable(e).is_some()) =>
        {
            Ok(Transformed::yes(LogicalPlan::Extension(Extension {
                node: Arc::new(RankNode {
                    input: w.input.as_ref().clone(),
                    window_expr: w.window_expr,
                    schema: w.schema,
                }),
            })))
        }
        other => Ok(Transformed::no(other)),
    })
    .map(|t| t.data)
}

/// The query planner of confer's sessions: DataFusion's, with ranking
/// windows run by [`RankExec`].
#[derive(Debug, Default)]
pub struct Planner;

#[async_trait]
impl datafusion::execution::context::QueryPlanner for Planner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session_state: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let plan = rewrite(logical_plan.clone())?;
        DefaultPhysicalPlanner::with_extension_planners(vec![Arc::new(RankPlanner)])
            .create_physical_plan(&plan, session_state)
            .await
    }
}

struct RankPlanner;

#[async_trait]
impl ExtensionPlanner for RankPlanner {
    async fn plan_extension(
        &self,
        planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        session_state: &dyn Session,
        planning_ctx: &datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(node) = node.as_any().downcast_ref::<RankNode>() else {
            return Ok(None);
        };
        let (Some(logical), Some(input)) = (logical_inputs.first(), physical_inputs.first()) else {
            return internal_err!("HashRank takes one input");
        };
        let input_schema = logical.schema();
        let mut ranks = Vec::with_capacity(node.window_expr.len());
        for e in &node.window_expr {
            let Some((w, kind)) = rankable(e) else {
                return internal_err!("HashRank holds a window it cannot run: {e}");
            };
            let partition_by = w
                .params
                .partition_by
                .iter()
                .map(|p| planner.create_physical_expr(p, input_schema, session_state, planning_ctx))
                .collect::<Result<Vec<_>>>()?;
            let order_by = w
                .params
                .order_by
                .iter()
                .map(|s| {
                    let expr = planner.create_physical_expr(
                        &s.expr,
                        input_schema,
                        session_state,
                        planning_ctx,
                    )?;
                    Ok(PhysicalSortExpr::new(
                        expr,
                        arrow::compute::SortOptions::new(!s.asc, s.nulls_first),
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            ranks.push(RankSpec {
                kind,
                partition_by,
                order_by,
            });
        }
        let schema: SchemaRef = Arc::new(node.schema.as_arrow().clone());
        Ok(Some(Arc::new(RankExec::new(
            Arc::clone(input),
            ranks,
            schema,
        ))))
    }
}

/// One ranking column.
#[derive(Debug, Clone)]
struct RankSpec {
    kind: Kind,
    partition_by: Vec<Arc<dyn PhysicalExpr>>,
    order_by: Vec<PhysicalSortExpr>,
}

/// Appends ranking columns to its input, computed per partition by hashing
/// (see the module docs).
#[derive(Debug)]
pub struct RankExec {
    input: Arc<dyn ExecutionPlan>,
    ranks: Vec<RankSpec>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl RankExec {
    fn new(input: Arc<dyn ExecutionPlan>, ranks: Vec<RankSpec>, schema: SchemaRef) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            input.output_partitioning().clone(),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        Self {
            input,
            ranks,
            schema,
            properties,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// The PARTITION BY expressions every ranking column shares: rows
    /// with equal values of these are in one partition of every column,
    /// so the input may be split on them.
    fn shared_keys(&self) -> Vec<Arc<dyn PhysicalExpr>> {
        let Some(first) = self.ranks.first() else {
            return Vec::new();
        };
        first
            .partition_by
            .iter()
            .filter(|e| {
                self.ranks
                    .iter()
                    .all(|r| r.partition_by.iter().any(|o| o.as_ref() == e.as_ref()))
            })
            .cloned()
            .collect()
    }
}

impl DisplayAs for RankExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ranks: Vec<String> = self
            .ranks
            .iter()
            .map(|r| {
                let p: Vec<String> = r.partition_by.iter().map(|e| e.to_string()).collect();
                let o: Vec<String> = r.order_by.iter().map(|e| e.to_string()).collect();
                format!(
                    "{:?} partition by [{}] order by [{}]",
                    r.kind,
                    p.join(", "),
                    o.join(", ")
                )
            })
            .collect();
        write!(f, "HashRankExec: {}", ranks.join("; "))
    }
}

impl ExecutionPlan for RankExec {
    fn name(&self) -> &str {
        "HashRankExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        for r in &self.ranks {
            for e in r
                .partition_by
                .iter()
                .chain(r.order_by.iter().map(|s| &s.expr))
            {
                if f(e)? == TreeNodeRecursion::Stop {
                    return Ok(TreeNodeRecursion::Stop);
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        let keys = self.shared_keys();
        if keys.is_empty() {
            vec![Distribution::SinglePartition]
        } else {
            vec![Distribution::KeyPartitioned(keys)]
        }
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![true]
    }

    #[allow(deprecated)]
    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return internal_err!("HashRankExec takes one input");
        }
        Ok(Arc::new(RankExec::new(
            children.remove(0),
            self.ranks.clone(),
            Arc::clone(&self.schema),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, Arc::clone(&context))?;
        let reservation = MemoryConsumer::new(format!("HashRankExec[{partition}]"))
            .register(context.memory_pool());
        let ranks = self.ranks.clone();
        let schema = Arc::clone(&self.schema);
        let metrics = BaselineMetrics::new(&self.metrics, partition);
        let out = futures::stream::once(async move {
            let mut reservation = reservation;
            let batches = rank_all(input, &ranks, &schema, &mut reservation, &metrics).await?;
            // The memory stays counted until each batch has gone on.
            Ok::<_, datafusion::error::DataFusionError>(futures::stream::iter(
                batches.into_iter().map(move |b| {
                    let size = b.get_array_memory_size().min(reservation.size());
                    reservation.shrink(size);
                    Ok(b)
                }),
            ))
        })
        .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            out,
        )))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

/// Reads all of one input partition and returns its batches with the
/// ranking columns appended.
async fn rank_all(
    mut input: SendableRecordBatchStream,
    ranks: &[RankSpec],
    schema: &SchemaRef,
    reservation: &mut MemoryReservation,
    metrics: &BaselineMetrics,
) -> Result<Vec<RecordBatch>> {
    let mut batches = Vec::new();
    while let Some(batch) = input.next().await {
        let batch = batch?;
        reservation.try_grow(batch.get_array_memory_size())?;
        if batch.num_rows() > 0 {
            batches.push(batch);
        }
    }
    let total: usize = batches.iter().map(RecordBatch::num_rows).sum();
    if total == 0 {
        return Ok(Vec::new());
    }
    let timer = metrics.elapsed_compute().timer();
    if u32::try_from(total).is_err() {
        return datafusion::common::exec_err!("HashRankExec: more than 2^32 rows in one partition");
    }
    let mut columns: Vec<Vec<u64>> = Vec::with_capacity(ranks.len());
    for spec in ranks {
        columns.push(rank_column(&batches, spec, total, reservation)?);
    }
    let mut out = Vec::with_capacity(batches.len());
    let mut start = 0;
    for batch in batches {
        let n = batch.num_rows();
        let mut arrays = batch.columns().to_vec();
        for c in &columns {
            arrays.push(Arc::new(UInt64Array::from(c[start..start + n].to_vec())) as ArrayRef);
        }
        start += n;
        out.push(RecordBatch::try_new(Arc::clone(schema), arrays)?);
    }
    timer.done();
    metrics.record_output(total);
    Ok(out)
}

/// Evaluates `exprs` over every batch, one array per expression holding
/// every row in input order.
fn evaluate(batches: &[RecordBatch], exprs: &[Arc<dyn PhysicalExpr>]) -> Result<Vec<ArrayRef>> {
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(exprs.len());
    for e in exprs {
        let parts = batches
            .iter()
            .map(|b| e.evaluate(b)?.into_array(b.num_rows()))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&dyn Array> = parts.iter().map(|a| a.as_ref()).collect();
        // Never empty: the caller has rows.
        columns.push(concat(&refs)?);
    }
    Ok(columns)
}

/// Comparable rows of `columns`, one per input row.
fn rows_of(
    columns: &[ArrayRef],
    options: &[arrow::compute::SortOptions],
    reservation: &mut MemoryReservation,
) -> Result<Rows> {
    let converter = RowConverter::new(
        columns
            .iter()
            .zip(options)
            .map(|(c, o)| SortField::new_with_options(c.data_type().clone(), *o))
            .collect(),
    )?;
    let rows = converter.convert_columns(columns)?;
    reservation.try_grow(rows.size())?;
    Ok(rows)
}

/// Each row's partition, numbered in order of first appearance, and the
/// number of partitions. One or two 64-bit integer keys (a person, or a
/// person and a group) are hashed as integers; other keys as rows.
fn partition_ids(
    columns: &[ArrayRef],
    total: usize,
    reservation: &mut MemoryReservation,
) -> Result<(Vec<u32>, usize)> {
    let mut group = Vec::with_capacity(total);
    let ints: Vec<&arrow::array::Int64Array> = columns
        .iter()
        .filter_map(|c| c.as_any().downcast_ref::<arrow::array::Int64Array>())
        .collect();
    if ints.len() == columns.len() && ints.len() <= 2 {
        let mut ids: datafusion::common::HashMap<(i64, i64, u8), u32> =
            datafusion::common::HashMap::with_capacity(total / 4 + 1);
        for i in 0..total {
            let mut key = (0i64, 0i64, 0u8);
            for (j, c) in ints.iter().enumerate() {
                let v = if c.is_null(i) {
                    key.2 |= 1 << j;
                    0
                } else {
                    c.value(i)
                };
                if j == 0 {
                    key.0 = v;
                } else {
                    key.1 = v;
                }
            }
            let next = ids.len() as u32;
            group.push(*ids.entry(key).or_insert(next));
        }
        return Ok((group, ids.len()));
    }
    let options = vec![arrow::compute::SortOptions::default(); columns.len()];
    let keys = rows_of(columns, &options, reservation)?;
    let mut ids: datafusion::common::HashMap<&[u8], u32> =
        datafusion::common::HashMap::with_capacity(total / 4 + 1);
    for i in 0..total {
        let next = ids.len() as u32;
        group.push(*ids.entry(keys.row(i).data()).or_insert(next));
    }
    Ok((group, ids.len()))
}

/// How the rows of a partition are ordered.
enum OrderKeys {
    /// No ORDER BY: every row is a peer of every other.
    None,
    /// One float key without NULLs, for `row_number` (which has no peers
    /// to find): compared as numbers.
    Floats(Vec<f64>, bool),
    /// 64-bit integer keys (a keyed hash, then a group key), NULLs
    /// allowed: compared as numbers, exactly, so peers are found too.
    Ints(Vec<IntKey>),
    /// Anything else, as comparable rows.
    Rows(Rows),
}

/// One integer ORDER BY key.
struct IntKey {
    values: arrow::array::Int64Array,
    options: arrow::compute::SortOptions,
}

impl IntKey {
    fn cmp(&self, a: usize, b: usize) -> Ordering {
        match (self.values.is_null(a), self.values.is_null(b)) {
            (true, true) => Ordering::Equal,
            (true, false) if self.options.nulls_first => Ordering::Less,
            (true, false) => Ordering::Greater,
            (false, true) if self.options.nulls_first => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) => {
                let o = self.values.value(a).cmp(&self.values.value(b));
                if self.options.descending {
                    o.reverse()
                } else {
                    o
                }
            }
        }
    }
}

impl OrderKeys {
    fn cmp(&self, a: usize, b: usize) -> Ordering {
        let directed = |o: Ordering, descending: bool| if descending { o.reverse() } else { o };
        match self {
            OrderKeys::None => Ordering::Equal,
            OrderKeys::Floats(v, d) => directed(v[a].total_cmp(&v[b]), *d),
            OrderKeys::Ints(keys) => {
                for k in keys {
                    let o = k.cmp(a, b);
                    if o != Ordering::Equal {
                        return o;
                    }
                }
                Ordering::Equal
            }
            OrderKeys::Rows(r) => r.row(a).cmp(&r.row(b)),
        }
    }
}

/// One ranking column over all rows, in input order.
fn rank_column(
    batches: &[RecordBatch],
    spec: &RankSpec,
    total: usize,
    reservation: &mut MemoryReservation,
) -> Result<Vec<u64>> {
    let columns = evaluate(batches, &spec.partition_by)?;
    reservation.try_grow(columns.iter().map(|c| c.get_array_memory_size()).sum())?;
    let (group, partitions) = partition_ids(&columns, total, reservation)?;
    drop(columns);
    // Rows grouped by partition (a counting sort: no comparison of keys).
    let mut start = vec![0u32; partitions + 1];
    for &g in &group {
        start[g as usize + 1] += 1;
    }
    for p in 0..partitions {
        start[p + 1] += start[p];
    }
    let mut fill = start.clone();
    let mut order = vec![0u32; total];
    for (i, &g) in group.iter().enumerate() {
        order[fill[g as usize] as usize] = i as u32;
        fill[g as usize] += 1;
    }
    drop(fill);
    drop(group);
    reservation.try_grow(total * 16)?;

    let sort_exprs: Vec<_> = spec.order_by.iter().map(|s| Arc::clone(&s.expr)).collect();
    let keys = if sort_exprs.is_empty() {
        OrderKeys::None
    } else {
        let columns = evaluate(batches, &sort_exprs)?;
        let options: Vec<_> = spec.order_by.iter().map(|s| s.options).collect();
        let single_float = columns.len() == 1
            && columns[0].null_count() == 0
            && spec.kind == Kind::RowNumber
            && columns[0].data_type() == &arrow::datatypes::DataType::Float64;
        let all_ints = columns
            .iter()
            .all(|c| c.data_type() == &arrow::datatypes::DataType::Int64);
        if single_float {
            OrderKeys::Floats(
                columns[0]
                    .as_primitive::<arrow::datatypes::Float64Type>()
                    .values()
                    .to_vec(),
                options[0].descending,
            )
        } else if all_ints {
            OrderKeys::Ints(
                columns
                    .iter()
                    .zip(&options)
                    .map(|(c, o)| IntKey {
                        values: c.as_primitive::<arrow::datatypes::Int64Type>().clone(),
                        options: *o,
                    })
                    .collect(),
            )
        } else {
            OrderKeys::Rows(rows_of(&columns, &options, reservation)?)
        }
    };
    let mut rank = vec![0u64; total];
    for p in 0..partitions {
        let rows = &mut order[start[p] as usize..start[p + 1] as usize];
        if rows.len() > 1 && !matches!(keys, OrderKeys::None) {
            rows.sort_unstable_by(|a, b| keys.cmp(*a as usize, *b as usize));
        }
        let (mut current_rank, mut dense) = (0u64, 0u64);
        for k in 0..rows.len() {
            let r = rows[k] as usize;
            let peer = spec.kind != Kind::RowNumber
                && k > 0
                && keys.cmp(r, rows[k - 1] as usize) == Ordering::Equal;
            if !peer {
                current_rank = k as u64 + 1;
                dense += 1;
            }
            rank[r] = match spec.kind {
                Kind::RowNumber => k as u64 + 1,
                Kind::Rank => current_rank,
                Kind::DenseRank => dense,
            };
        }
    }
    Ok(rank)
}
