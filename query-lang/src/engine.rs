//! DataFusion glue shared by the coordinator and the nodes: checking a plan
//! against the catalog without data, and post-processing released tables.

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;

use crate::catalog::Catalog;
use crate::error::{QueryError, Result};
use crate::plan::FederatedPlan;

/// A session whose tables have the catalog's schemas and no rows.
pub fn empty_context(catalog: &Catalog) -> Result<SessionContext> {
    let ctx = SessionContext::new();
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

/// Applies HAVING, ORDER BY, LIMIT and OFFSET to the combined result.
pub async fn post_process(plan: &FederatedPlan, batch: RecordBatch) -> Result<Vec<RecordBatch>> {
    if plan.post.is_empty() {
        return Ok(vec![batch]);
    }
    let schema = batch.schema();
    let ctx = SessionContext::new();
    let mem = MemTable::try_new(schema.clone(), vec![vec![batch]])?;
    ctx.register_table("__confer_result", Arc::new(mem))?;
    let mut sql = String::from("SELECT * FROM __confer_result");
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
    let batches = ctx
        .sql(&sql)
        .await
        .map_err(|e| {
            QueryError::Rejected(format!(
                "HAVING / ORDER BY / LIMIT may use only the released columns ({}): {}",
                schema
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                QueryError::from(e)
            ))
        })?
        .collect()
        .await?;
    // Put back the schema with its metadata (intervals, noise, cost).
    batches
        .into_iter()
        .map(|b| Ok(RecordBatch::try_new(schema.clone(), b.columns().to_vec())?))
        .collect()
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
