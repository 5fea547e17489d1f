//! The released values as tables any Flight SQL client reads with plain
//! SQL (no DP clause: they are public by construction):
//! `supervision.values`, `supervision.org_units`, `supervision.indicators`
//! and `supervision.periods`.

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use confer_protocol::ProtocolError;
use datafusion::catalog::MemorySchemaProvider;
use datafusion::datasource::MemTable;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::SessionContext;

use super::Supervision;
use super::run::PeriodRelease;
use crate::state::CoordinatorState;

/// Whether `sql` reads the supervision tables (and is not a DP query).
pub fn reads_supervision(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    lower.contains("supervision.") && !lower.contains("differential_privacy")
}

fn batch(fields: Vec<Field>, columns: Vec<ArrayRef>) -> Result<RecordBatch, ProtocolError> {
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| ProtocolError::internal(e.to_string()))
}

fn text(v: impl IntoIterator<Item = String>) -> ArrayRef {
    Arc::new(StringArray::from(v.into_iter().collect::<Vec<_>>()))
}

fn opt_text(v: impl IntoIterator<Item = Option<String>>) -> ArrayRef {
    Arc::new(StringArray::from(v.into_iter().collect::<Vec<_>>()))
}

fn floats(v: impl IntoIterator<Item = Option<f64>>) -> ArrayRef {
    Arc::new(Float64Array::from(v.into_iter().collect::<Vec<_>>()))
}

impl Supervision {
    /// `supervision.org_units`: one row per unit, with a column per group set.
    pub fn org_units_table(&self) -> Result<RecordBatch, ProtocolError> {
        let r = &self.region;
        let holdings = self
            .last_holdings
            .lock()
            .map_err(|_| ProtocolError::internal("lock poisoned"))?
            .clone();
        let mut fields = vec![
            Field::new("code", DataType::Utf8, false),
            Field::new("name_zh", DataType::Utf8, false),
            Field::new("name_en", DataType::Utf8, false),
            Field::new("level", DataType::Utf8, false),
            Field::new("depth", DataType::Int64, false),
            Field::new("parent", DataType::Utf8, true),
            Field::new("path", DataType::Utf8, false),
            Field::new("node", DataType::Utf8, true),
        ];
        let mut columns: Vec<ArrayRef> = vec![
            text(r.units.iter().map(|u| u.code.clone())),
            text(r.units.iter().map(|u| u.name_zh.clone())),
            text(r.units.iter().map(|u| u.name_en.clone())),
            text(r.units.iter().map(|u| u.level.clone())),
            Arc::new(Int64Array::from(
                (0..r.units.len())
                    .map(|i| r.depth(i) as i64)
                    .collect::<Vec<_>>(),
            )),
            opt_text(r.units.iter().map(|u| u.parent.clone())),
            text((0..r.units.len()).map(|i| r.path(i))),
            opt_text(
                r.units
                    .iter()
                    .map(|u| holdings.holder(&u.code).map(str::to_string)),
            ),
        ];
        for g in &r.group_sets {
            fields.push(Field::new(g.id.as_str(), DataType::Utf8, true));
            columns.push(opt_text(
                r.units.iter().map(|u| u.groups.get(&g.id).cloned()),
            ));
        }
        batch(fields, columns)
    }

    /// `supervision.indicators`: the catalogue, definitions included.
    pub fn indicators_table(&self) -> Result<RecordBatch, ProtocolError> {
        let inds = &self.catalogue.indicators;
        let describe = |a: &Option<super::indicators::Aggregate>| {
            a.as_ref().map(|a| {
                let mut s = format!("{} FROM {}", a.aggregate, a.from);
                if let Some(c) = &a.condition {
                    let concepts = a.concepts.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ");
                    s.push_str(&format!(" WHERE {}", c.replace("{concepts}", &concepts)));
                }
                s.push_str(&format!(
                    " (per {} in the period by {}; at most {} rows per person and care site, {} care sites per person)",
                    a.unit_column, a.date, a.max_rows, a.max_units
                ));
                if !a.units.is_empty() {
                    let f: Vec<String> =
                        a.units.iter().map(|(k, v)| format!("{k} in {}", v.join("/"))).collect();
                    s.push_str(&format!(" over units with {}", f.join(", ")));
                }
                s
            })
        };
        batch(
            vec![
                Field::new("id", DataType::Utf8, false),
                Field::new("name_zh", DataType::Utf8, false),
                Field::new("name_en", DataType::Utf8, false),
                Field::new("group", DataType::Utf8, false),
                Field::new("kind", DataType::Utf8, false),
                Field::new("factor", DataType::Float64, false),
                Field::new("unit", DataType::Utf8, false),
                Field::new("period", DataType::Utf8, false),
                Field::new("disaggregations", DataType::Utf8, false),
                Field::new("red_line", DataType::Float64, true),
                Field::new("target", DataType::Float64, true),
                Field::new("better", DataType::Utf8, false),
                Field::new("description", DataType::Utf8, false),
                Field::new("numerator", DataType::Utf8, true),
                Field::new("denominator", DataType::Utf8, true),
            ],
            vec![
                text(inds.iter().map(|i| i.id.clone())),
                text(inds.iter().map(|i| i.name_zh.clone())),
                text(inds.iter().map(|i| i.name_en.clone())),
                text(inds.iter().map(|i| i.group.clone())),
                text(inds.iter().map(|i| format!("{:?}", i.kind).to_lowercase())),
                floats(inds.iter().map(|i| Some(i.factor))),
                text(inds.iter().map(|i| i.unit.clone())),
                text(inds.iter().map(|i| i.period.as_str().to_string())),
                text(inds.iter().map(|i| i.disaggregations.join(","))),
                floats(inds.iter().map(|i| i.red_line)),
                floats(inds.iter().map(|i| i.target)),
                text(
                    inds.iter()
                        .map(|i| format!("{:?}", i.better).to_lowercase()),
                ),
                text(inds.iter().map(|i| i.description.clone())),
                opt_text(inds.iter().map(|i| describe(&i.numerator))),
                opt_text(inds.iter().map(|i| describe(&i.denominator))),
            ],
        )
    }
}

/// The schema of `supervision.values`.
pub fn values_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("period", DataType::Utf8, false),
        Field::new("unit", DataType::Utf8, false),
        Field::new("level", DataType::Utf8, false),
        Field::new("indicator", DataType::Utf8, false),
        Field::new("category", DataType::Utf8, false),
        Field::new("value", DataType::Float64, true),
        Field::new("ci_low", DataType::Float64, true),
        Field::new("ci_high", DataType::Float64, true),
        Field::new("numerator", DataType::Float64, true),
        Field::new("denominator", DataType::Float64, true),
        Field::new("flags", DataType::Utf8, false),
    ]))
}

fn values_table(releases: &[PeriodRelease]) -> Result<RecordBatch, ProtocolError> {
    let rows: Vec<&super::ValueRow> = releases.iter().flat_map(|r| &r.values).collect();
    RecordBatch::try_new(
        values_schema(),
        vec![
            text(rows.iter().map(|v| v.period.clone())),
            text(rows.iter().map(|v| v.unit.clone())),
            text(rows.iter().map(|v| v.level.clone())),
            text(rows.iter().map(|v| v.indicator.clone())),
            text(rows.iter().map(|v| v.category.clone())),
            floats(rows.iter().map(|v| v.value)),
            floats(rows.iter().map(|v| v.ci_low)),
            floats(rows.iter().map(|v| v.ci_high)),
            floats(rows.iter().map(|v| v.numerator)),
            floats(rows.iter().map(|v| v.denominator)),
            text(rows.iter().map(|v| v.flags.clone())),
        ],
    )
    .map_err(|e| ProtocolError::internal(e.to_string()))
}

fn periods_table(releases: &[PeriodRelease]) -> Result<RecordBatch, ProtocolError> {
    batch(
        vec![
            Field::new("period", DataType::Utf8, false),
            Field::new("complete", DataType::Boolean, false),
            Field::new("runs", DataType::Int64, false),
            Field::new("first_run_ms", DataType::Int64, false),
            Field::new("last_run_ms", DataType::Int64, false),
            Field::new("measures", DataType::Int64, false),
            Field::new("epsilon_per_measure", DataType::Float64, false),
            Field::new("delta", DataType::Float64, false),
            Field::new("rho_per_node", DataType::Float64, false),
            Field::new("confidence", DataType::Float64, false),
            Field::new("missing_nodes", DataType::Utf8, false),
        ],
        vec![
            text(releases.iter().map(|r| r.period.clone())),
            Arc::new(BooleanArray::from(
                releases.iter().map(|r| r.complete()).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(
                releases.iter().map(|r| r.runs as i64).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(
                releases.iter().map(|r| r.first_run_ms).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(
                releases.iter().map(|r| r.last_run_ms).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(
                releases
                    .iter()
                    .map(|r| r.measures.len() as i64)
                    .collect::<Vec<_>>(),
            )),
            floats(releases.iter().map(|r| Some(r.epsilon_per_measure))),
            floats(releases.iter().map(|r| Some(r.delta))),
            floats(releases.iter().map(|r| Some(r.rho_per_node))),
            floats(releases.iter().map(|r| Some(r.confidence))),
            text(releases.iter().map(|r| {
                r.nodes
                    .iter()
                    .filter(|n| !n.complete)
                    .map(|n| n.node.clone())
                    .collect::<Vec<_>>()
                    .join(",")
            })),
        ],
    )
}

/// Answers plain SQL over the supervision tables (read-only).
pub async fn query(state: &CoordinatorState, sql: &str) -> Result<RecordBatch, ProtocolError> {
    let sup = state.supervision.as_ref().ok_or_else(|| {
        ProtocolError::new(
            confer_protocol::ErrorKind::NotFound,
            "this coordinator has no [supervision] section, so there are no supervision tables",
        )
    })?;
    let releases: Vec<PeriodRelease> = state
        .store
        .supervision_releases()
        .map_err(ProtocolError::from)?
        .into_iter()
        .map(|(_, body)| serde_json::from_str(&body))
        .collect::<Result<_, _>>()
        .map_err(|e| ProtocolError::internal(format!("stored release unreadable: {e}")))?;
    let ctx = SessionContext::new();
    let schema = Arc::new(MemorySchemaProvider::new());
    let internal = |e: datafusion::error::DataFusionError| ProtocolError::internal(e.to_string());
    for (name, b) in [
        ("values", values_table(&releases)?),
        ("org_units", sup.org_units_table()?),
        ("indicators", sup.indicators_table()?),
        ("periods", periods_table(&releases)?),
    ] {
        let table = MemTable::try_new(b.schema(), vec![vec![b]]).map_err(internal)?;
        datafusion::catalog::SchemaProvider::register_table(
            schema.as_ref(),
            name.to_string(),
            Arc::new(table),
        )
        .map_err(internal)?;
    }
    ctx.catalog("datafusion")
        .ok_or_else(|| ProtocolError::internal("no default catalog"))?
        .register_schema("supervision", schema)
        .map_err(internal)?;
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let df = ctx
        .sql_with_options(sql, options)
        .await
        .map_err(|e| ProtocolError::invalid(format!("{e} (the supervision tables: supervision.values, supervision.org_units, supervision.indicators, supervision.periods)")))?;
    let out_schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await.map_err(internal)?;
    arrow::compute::concat_batches(&out_schema, &batches)
        .map_err(|e| ProtocolError::internal(e.to_string()))
}
