//! `EXPLAIN PRIVACY` as a batch ([`confer_query::explain`] writes its
//! rows); nothing is spent.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use confer_protocol::{ProtocolError, metadata};
use confer_query::FederatedPlan;

/// EXPLAIN PRIVACY: the plan, each aggregate's noise and expected error, the cost.
pub(crate) fn explain(plan: &FederatedPlan, sites: usize) -> Result<RecordBatch, ProtocolError> {
    let rows = confer_query::explain::explain(plan, sites).map_err(ProtocolError::from)?;
    let schema = Arc::new(Schema::new_with_metadata(
        vec![
            Field::new("item", DataType::Utf8, false),
            Field::new("value", DataType::Utf8, false),
        ],
        HashMap::from([(metadata::EXPLAIN.to_string(), "true".to_string())]),
    ));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.0.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.1.as_str()),
            )),
        ],
    )
    .map_err(|e| ProtocolError::internal(e.to_string()))
}
