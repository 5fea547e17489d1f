//! The node's Arrow Flight service.
//!
//! * `DoGet(ticket = task envelope)`: run a task and stream its release.
//! * `DoAction("confer.catalog")`: the public catalog, as JSON.
//! * `DoAction("confer.health")`: liveness and basic facts, as JSON.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use confer_protocol::catalog::{CatalogInfo, Health};
use confer_protocol::task::{Envelope, Task, TaskKind, unix_now};
use confer_protocol::{ErrorKind, ProtocolError, actions};
use confer_query::{Catalog, Statement};
use datafusion::prelude::SessionContext;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, instrument, warn};

use crate::error::{NodeError, Result};
use crate::ledger::{Debit, Ledger};

/// Shared state of a running node.
pub struct NodeState {
    /// Site name.
    pub name: String,
    /// DataFusion session with the node's tables.
    pub ctx: SessionContext,
    /// The published catalog.
    pub catalog: CatalogInfo,
    /// The catalog as the query compiler sees it.
    pub query_catalog: Catalog,
    /// The privacy ledger.
    pub ledger: Arc<Ledger>,
    /// When the node started.
    pub started: Instant,
}

/// The Flight service of a node.
#[derive(Clone)]
pub struct NodeService {
    state: Arc<NodeState>,
}

impl NodeService {
    /// Wraps the node's state.
    pub fn new(state: Arc<NodeState>) -> Self {
        Self { state }
    }

    /// Runs a task and returns the batch to release. Rows and SQL text never
    /// reach the logs: only ids, study and cost do.
    #[instrument(skip_all, fields(node = %self.state.name))]
    async fn run(&self, envelope: Envelope) -> Result<RecordBatch> {
        let task: Task = envelope.task()?;
        if task.is_expired_at(unix_now()) {
            return Err(ProtocolError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "task {} expired before it reached node {}",
                    task.id, self.state.name
                ),
            )
            .into());
        }
        let TaskKind::Query(query) = &task.kind;

        // A retried task gets exactly what was released the first time.
        let ledger = self.state.ledger.clone();
        let id = task.id;
        if let Some(bytes) = blocking(move || ledger.stored_result(id)).await? {
            info!(task = %task.id, "task seen before: returning its stored release, no new charge");
            return decode_ipc(&bytes);
        }

        let parsed = match confer_query::parse(&query.sql)? {
            Statement::Query(q) => q,
            _ => {
                return Err(ProtocolError::invalid(
                    "nodes run DP queries only; EXPLAIN and SHOW are answered by the coordinator",
                )
                .into());
            }
        };
        let plan =
            confer_query::compile(&parsed, &self.state.query_catalog, Some(&self.state.name))?;
        let batches = self
            .state
            .ctx
            .sql(&plan.local_sql)
            .await
            .map_err(NodeError::from)?
            .collect()
            .await
            .map_err(NodeError::from)?;

        let name = self.state.name.clone();
        let release_plan = plan.clone();
        let batch = blocking(move || {
            confer_query::release::release(&release_plan, &batches, &name, id)
                .map_err(NodeError::from)
        })
        .await?;
        let bytes = encode_ipc(&batch)?;

        let debit = Debit {
            task_id: task.id,
            study: task.study.clone(),
            researcher: task.researcher.clone(),
            rho: plan.cost.rho,
            epsilon: plan.cost.epsilon,
            delta: plan.cost.delta,
        };
        let ledger = self.state.ledger.clone();
        let released = blocking(move || ledger.record(&debit, bytes)).await?;
        info!(
            task = %task.id,
            study = %task.study,
            rho = plan.cost.rho,
            epsilon = plan.cost.epsilon,
            delta = plan.cost.delta,
            "released after durable debit"
        );
        decode_ipc(&released)
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NodeError::Protocol(ProtocolError::internal(format!("worker failed: {e}"))))?
}

fn encode_ipc(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let encode = |buf: &mut Vec<u8>| -> std::result::Result<(), arrow::error::ArrowError> {
        let mut w = StreamWriter::try_new(buf, &batch.schema())?;
        w.write(batch)?;
        w.finish()
    };
    encode(&mut buf)
        .map_err(|e| NodeError::Protocol(ProtocolError::internal(format!("encode: {e}"))))?;
    Ok(buf)
}

fn decode_ipc(bytes: &[u8]) -> Result<RecordBatch> {
    let err = |e: String| {
        NodeError::Protocol(ProtocolError::internal(format!(
            "stored release unreadable: {e}"
        )))
    };
    let reader =
        StreamReader::try_new(std::io::Cursor::new(bytes), None).map_err(|e| err(e.to_string()))?;
    let schema = reader.schema();
    let batches: Vec<RecordBatch> = reader
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    arrow::compute::concat_batches(&schema, &batches).map_err(|e| err(e.to_string()))
}

fn json_result<T: serde::Serialize>(
    value: &T,
) -> std::result::Result<arrow_flight::Result, Status> {
    let body = serde_json::to_vec(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(arrow_flight::Result::new(body))
}

#[tonic::async_trait]
impl FlightService for NodeService {
    type HandshakeStream = BoxStream<'static, std::result::Result<HandshakeResponse, Status>>;
    type ListFlightsStream = BoxStream<'static, std::result::Result<FlightInfo, Status>>;
    type DoGetStream = BoxStream<'static, std::result::Result<FlightData, Status>>;
    type DoPutStream = BoxStream<'static, std::result::Result<PutResult, Status>>;
    type DoActionStream = BoxStream<'static, std::result::Result<arrow_flight::Result, Status>>;
    type ListActionsStream = BoxStream<'static, std::result::Result<ActionType, Status>>;
    type DoExchangeStream = BoxStream<'static, std::result::Result<FlightData, Status>>;

    async fn handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> std::result::Result<Response<Self::HandshakeStream>, Status> {
        Err(Status::unimplemented("nodes need no handshake"))
    }

    async fn list_flights(
        &self,
        _request: Request<Criteria>,
    ) -> std::result::Result<Response<Self::ListFlightsStream>, Status> {
        Err(Status::unimplemented(
            "nodes list no flights: send a task with DoGet",
        ))
    }

    async fn get_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        Err(Status::unimplemented("send a task with DoGet"))
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented("send a task with DoGet"))
    }

    async fn get_schema(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<SchemaResult>, Status> {
        Err(Status::unimplemented("send a task with DoGet"))
    }

    #[instrument(skip_all)]
    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<Self::DoGetStream>, Status> {
        let envelope = Envelope::from_bytes(&request.into_inner().ticket)?;
        let batch = match self.run(envelope).await {
            Ok(b) => b,
            Err(e) => {
                let err = ProtocolError::from(e);
                warn!(kind = ?err.kind, "task refused or failed: {}", err.message);
                return Err(err.into());
            }
        };
        let schema = batch.schema();
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(futures::stream::iter([Ok(batch)]))
            .map_err(Status::from);
        Ok(Response::new(stream.boxed()))
    }

    async fn do_put(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> std::result::Result<Response<Self::DoPutStream>, Status> {
        Err(Status::permission_denied("nodes accept no data"))
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> std::result::Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("no exchange is served here"))
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> std::result::Result<Response<Self::DoActionStream>, Status> {
        let action = request.into_inner();
        let result = match action.r#type.as_str() {
            actions::CATALOG => json_result(&self.state.catalog)?,
            actions::HEALTH => json_result(&Health {
                node: self.state.name.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                uptime_secs: self.state.started.elapsed().as_secs(),
                tables: self.state.catalog.tables.len(),
            })?,
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown action {other}: this node serves {} and {}",
                    actions::CATALOG,
                    actions::HEALTH
                )));
            }
        };
        Ok(Response::new(futures::stream::iter([Ok(result)]).boxed()))
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> std::result::Result<Response<Self::ListActionsStream>, Status> {
        let list = [
            (actions::CATALOG, "the node's public catalog (JSON)"),
            (actions::HEALTH, "liveness and basic facts (JSON)"),
        ]
        .map(|(t, d)| {
            Ok(ActionType {
                r#type: t.to_string(),
                description: d.to_string(),
            })
        });
        Ok(Response::new(futures::stream::iter(list).boxed()))
    }
}
