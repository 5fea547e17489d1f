//! [`NodeService`]: a node's handler of requests, over its shared state.
//! DoGet's tasks are dispatched here ([`NodeService::run`]); the query
//! path (`query.rs`), secure sessions (`secure_query.rs`) and training
//! (`train/`) are its peers over the admission gate (`gate.rs`). The Flight
//! adapter (`service.rs`) only decodes requests and encodes answers.

use std::sync::Arc;

use arrow::array::RecordBatch;
use confer_protocol::task::{Envelope, TaskKind};
use confer_protocol::{ErrorKind, ProtocolError, actions};
use tracing::instrument;

use crate::error::{NodeError, Result};
use crate::state::NodeState;

/// The Flight service of a node.
#[derive(Clone)]
pub struct NodeService {
    pub(crate) state: Arc<NodeState>,
}

impl NodeService {
    /// Wraps the node's state.
    pub fn new(state: Arc<NodeState>) -> Self {
        Self { state }
    }

    /// The node's state.
    pub(crate) fn state(&self) -> &NodeState {
        &self.state
    }

    /// Runs a task and returns the batch to release. Rows and SQL text never
    /// reach the logs: only ids, study and cost do.
    #[instrument(skip_all, fields(node = %self.state.name))]
    pub(crate) async fn run(&self, envelope: Envelope) -> Result<RecordBatch> {
        let policy = self.state.policy()?;
        let (task, rules) = self.admit(&envelope, &policy)?;
        match &task.kind {
            TaskKind::Query(query) => {
                self.run_query(&envelope, &task, &rules, &policy, &query.sql)
                    .await
            }
            TaskKind::Budget(b) => self.report_budget(&task, &b.study, &policy),
            TaskKind::PublicQuery(query) => {
                self.run_public(&task, &rules, &policy, &query.sql).await
            }
            TaskKind::SecureQuery(_) => Err(self.refuse(
                Some(&task),
                ErrorKind::InvalidArgument,
                format!(
                    "secure queries run through the {} action, not DoGet",
                    actions::SECAGG_ROUND
                ),
            )),
            TaskKind::Train(_) | TaskKind::TrainRound(_) => Err(self.refuse(
                Some(&task),
                ErrorKind::InvalidArgument,
                format!(
                    "training runs through the {} actions, not DoGet",
                    actions::TRAIN_PREPARE
                ),
            )),
        }
    }
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NodeError::Protocol(ProtocolError::internal(format!("worker failed: {e}"))))?
}
