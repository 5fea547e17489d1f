//! DataFusion glue shared by the coordinator and the nodes: checking a plan
//! against the catalog without data, and post-processing released tables.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use confer_protocol::metadata;
use datafusion::datasource::MemTable;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{DataFrame, SessionContext};

use crate::catalog::Catalog;
use crate::error::{QueryError, Result};
use crate::plan::{Derived, FederatedPlan, FinalColumn};

/// A session whose tables have the catalog's schemas and no rows.
pub fn empty_context(catalog: &Catalog) -> Result<SessionContext> {
    let ctx = crate::bounding::context();
    for table in catalog.tables() {
        let schema = Catalog::arrow_schema(table);
        let mem = MemTable::try_new(schema, vec![vec![]])?;
        ctx.register_table(table.name.as_str(), Arc::new(mem))?;
    }
    Ok(ctx)
}

/// Plans `sql` and applies DataFusion's analyzer (type coercion and the
/// checks that go with it), as the node's execution will.
pub async fn analyzed(ctx: &SessionContext, sql: &str) -> Result<LogicalPlan> {
    let plan = ctx.sql(sql).await?.logical_plan().clone();
    let state = ctx.state();
    Ok(state
        .analyzer()
        .execute_and_check(plan, state.config_options(), |_, _| {})?)
}

/// Plans the local query against the catalog (no data read): catches unknown
/// columns, type errors and unsupported functions before any node is asked.
pub async fn validate(plan: &FederatedPlan, catalog: &Catalog) -> Result<()> {
    let ctx = empty_context(catalog)?;
    ctx.sql(&plan.local_sql)
        .await
        .map_err(|e| QueryError::from(e).into_user_error())?;
    Ok(())
}

/// The SQL that turns the combined release (`__confer_result`) into the
/// researcher's result: the SELECT list's expressions, HAVING, ORDER BY,
/// LIMIT and OFFSET.
fn final_sql(plan: &FederatedPlan, columns: Option<&[FinalColumn]>) -> String {
    let quote = |n: &str| format!("\"{}\"", n.replace('"', "\"\""));
    let (outer, inner) = match columns {
        None => ("*".to_string(), "__confer_result".to_string()),
        Some(columns) => {
            let computed: Vec<String> = columns
                .iter()
                .filter_map(|c| {
                    c.sql
                        .as_ref()
                        .map(|sql| format!("{sql} AS {}", quote(&c.name)))
                })
                .collect();
            let outer = columns
                .iter()
                .map(|c| quote(&c.name))
                .collect::<Vec<_>>()
                .join(", ");
            let inner = if computed.is_empty() {
                "__confer_result".to_string()
            } else {
                format!(
                    "(SELECT *, {} FROM __confer_result) AS __confer_released",
                    computed.join(", ")
                )
            };
            (outer, inner)
        }
    };
    let mut sql = format!("SELECT {outer} FROM {inner}");
    if let Some(having) = &plan.post.having {
        sql.push_str(&format!(" WHERE {having}"));
    }
    if !plan.post.order_by.is_empty() {
        sql.push_str(&format!(" ORDER BY {}", plan.post.order_by.join(", ")));
    }
    if let Some(limit) = &plan.post.limit {
        sql.push_str(&format!(" LIMIT {limit}"));
    }
    if let Some(offset) = &plan.post.offset {
        sql.push_str(&format!(" OFFSET {offset}"));
    }
    sql
}

/// Plans the researcher's result over `batch` (the combined release).
async fn final_frame(
    plan: &FederatedPlan,
    columns: Option<&[FinalColumn]>,
    batch: RecordBatch,
) -> Result<DataFrame> {
    let schema = batch.schema();
    let ctx = SessionContext::new();
    let mem = MemTable::try_new(schema.clone(), vec![vec![batch]])?;
    ctx.register_table("__confer_result", Arc::new(mem))?;
    ctx.sql(&final_sql(plan, columns)).await.map_err(|e| {
        QueryError::Rejected(format!(
            "the SELECT list, HAVING, ORDER BY and LIMIT may use only released values and keys ({}): {}",
            schema
                .fields()
                .iter()
                .filter(|f| !f.name().starts_with("__"))
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(", "),
            QueryError::from(e)
        ))
    })
}

/// Checks the SELECT list's expressions of released values against the
/// released table's schema (no data) and gives the result's schema.
pub(crate) async fn derive(plan: &FederatedPlan, columns: Vec<FinalColumn>) -> Result<Derived> {
    let release = plan.release_schema();
    let planned = final_frame(
        plan,
        Some(&columns),
        RecordBatch::new_empty(release.clone()),
    )
    .await?
    .schema()
    .as_arrow()
    .clone();
    let mut fields = Vec::with_capacity(columns.len());
    for (c, field) in columns.iter().zip(planned.fields()) {
        let field = match &c.sql {
            None => release
                .field_with_name(&c.name)
                .cloned()
                .unwrap_or_else(|_| field.as_ref().clone()),
            Some(_) => {
                let field = field
                    .as_ref()
                    .clone()
                    .with_name(&c.name)
                    .with_nullable(true);
                if c.noisy {
                    let mut meta = plan.value_metadata(&c.name);
                    if let Some(note) = &c.interval_note {
                        meta.insert(metadata::INTERVAL_NOTE.to_string(), note.clone());
                    }
                    field.with_metadata(meta)
                } else {
                    field
                }
            }
        };
        fields.push(field);
    }
    Ok(Derived {
        columns,
        schema: Arc::new(Schema::new(fields)),
    })
}

/// Applies the SELECT list's expressions, HAVING, ORDER BY, LIMIT and
/// OFFSET to the combined result.
pub async fn post_process(
    plan: &FederatedPlan,
    batch: RecordBatch,
) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    if plan.post.is_empty() && plan.derived.is_none() {
        return Ok((batch.schema(), vec![batch]));
    }
    let released = batch.schema();
    let schema = match &plan.derived {
        None => released.clone(),
        Some(d) => {
            // Released columns keep what combining put on them (noise sd);
            // the result keeps the release's metadata (cost, sites).
            let fields: Vec<Field> = d
                .columns
                .iter()
                .zip(d.schema.fields())
                .map(|(c, f)| match &c.sql {
                    None => released
                        .field_with_name(&c.name)
                        .cloned()
                        .unwrap_or_else(|_| f.as_ref().clone()),
                    Some(_) => f.as_ref().clone(),
                })
                .collect();
            Arc::new(Schema::new_with_metadata(
                fields,
                released.metadata().clone(),
            ))
        }
    };
    let batches = final_frame(
        plan,
        plan.derived.as_ref().map(|d| d.columns.as_slice()),
        batch,
    )
    .await?
    .collect()
    .await?;
    // Put back the schema with its metadata (intervals, noise, cost).
    let batches = batches
        .into_iter()
        .map(|b| {
            let columns = b
                .columns()
                .iter()
                .zip(schema.fields())
                .map(|(c, f)| Ok(arrow::compute::cast(c, f.data_type())?))
                .collect::<Result<Vec<_>>>()?;
            Ok(RecordBatch::try_new(schema.clone(), columns)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((schema, batches))
}

impl QueryError {
    /// Re-labels a planning error of the generated local query as the
    /// user's: the names in it are the user's names.
    pub(crate) fn into_user_error(self) -> Self {
        match self {
            QueryError::Plan(msg) => QueryError::Plan(msg.replace("__confer_src.", "")),
            other => other,
        }
    }
}
