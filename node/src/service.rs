//! The node's Arrow Flight service.
//!
//! * `DoGet(ticket = signed task envelope)`: verify, apply the steward's
//!   policy, run, record durably, then stream the release.
//! * `DoAction("confer.catalog")`: the public catalog, as JSON.
//! * `DoAction("confer.health")`: liveness and basic facts, as JSON.
//!
//! Every task received is audited, whether it is released, answered from
//! the ledger (a retry), or refused, with the reason.

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use confer_protocol::catalog::Health;
use confer_protocol::task::{Envelope, SecaggIdentity, SecaggRound};
use confer_protocol::{ErrorKind, ProtocolError, actions};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{instrument, warn};

pub use crate::handler::NodeService;
pub use crate::state::NodeState;

fn json_result<T: serde::Serialize>(value: &T) -> Result<arrow_flight::Result, Status> {
    let body = serde_json::to_vec(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(arrow_flight::Result::new(body))
}

#[tonic::async_trait]
impl FlightService for NodeService {
    type HandshakeStream = BoxStream<'static, Result<HandshakeResponse, Status>>;
    type ListFlightsStream = BoxStream<'static, Result<FlightInfo, Status>>;
    type DoGetStream = BoxStream<'static, Result<FlightData, Status>>;
    type DoPutStream = BoxStream<'static, Result<PutResult, Status>>;
    type DoActionStream = BoxStream<'static, Result<arrow_flight::Result, Status>>;
    type ListActionsStream = BoxStream<'static, Result<ActionType, Status>>;
    type DoExchangeStream = BoxStream<'static, Result<FlightData, Status>>;

    async fn handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        Err(Status::unimplemented("nodes need no handshake"))
    }

    async fn list_flights(
        &self,
        _request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        Err(Status::unimplemented(
            "nodes list no flights: send a task with DoGet",
        ))
    }

    async fn get_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(Status::unimplemented("send a task with DoGet"))
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented("send a task with DoGet"))
    }

    async fn get_schema(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        Err(Status::unimplemented("send a task with DoGet"))
    }

    #[instrument(skip_all)]
    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let envelope = match Envelope::from_bytes(&request.into_inner().ticket) {
            Ok(e) => e,
            Err(e) => {
                let err = self.refuse(None, ErrorKind::InvalidArgument, e.message);
                return Err(err.into());
            }
        };
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
    ) -> Result<Response<Self::DoPutStream>, Status> {
        Err(Status::permission_denied("nodes accept no data"))
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("no exchange is served here"))
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        let action = request.into_inner();
        let result = match action.r#type.as_str() {
            actions::CATALOG => json_result(&self.state.catalog)?,
            actions::SUPERVISION_UNITS => json_result(&self.state.supervision)?,
            actions::SECAGG_IDENTITY => {
                let policy = self
                    .state
                    .policy()
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                json_result(&SecaggIdentity {
                    key: self.state.secure.identity(),
                    min_group_size: policy.min_group_size,
                    proof: self.state.identity_proof(),
                    max_corrupt_peers: policy.secure.max_corrupt_peers,
                })?
            }
            actions::QUERY_CHECK => {
                let envelope = Envelope::from_bytes(&action.body).map_err(|e| {
                    Status::from(self.refuse(None, ErrorKind::InvalidArgument, e.message))
                })?;
                json_result(&self.check_query(envelope).await?)?
            }
            actions::QUERY_RELEASE => {
                let envelope = Envelope::from_bytes(&action.body).map_err(|e| {
                    Status::from(self.refuse(None, ErrorKind::InvalidArgument, e.message))
                })?;
                json_result(&serde_json::json!({ "released": self.release_query(envelope)? }))?
            }
            actions::SECAGG_ROUND => {
                let round: SecaggRound = serde_json::from_slice(&action.body).map_err(|e| {
                    Status::invalid_argument(format!("unreadable secure-aggregation round: {e}"))
                })?;
                let (task_id, number) = (round.task_id, round.round);
                let answer = if number == 0 {
                    self.secure_start(round).await?
                } else {
                    self.state
                        .secure
                        .step(round.task_id, round.round, round.payload)?
                };
                json_result(&SecaggRound {
                    task_id,
                    round: number,
                    payload: answer,
                })?
            }
            actions::TRAIN_PREPARE | actions::TRAIN_COMMIT => {
                let envelope = Envelope::from_bytes(&action.body).map_err(|e| {
                    Status::from(self.refuse(None, ErrorKind::InvalidArgument, e.message))
                })?;
                if action.r#type == actions::TRAIN_PREPARE {
                    json_result(&self.train_prepare(envelope).await?)?
                } else {
                    json_result(&self.train_commit(envelope).await?)?
                }
            }
            actions::TRAIN_START => {
                let round: SecaggRound = serde_json::from_slice(&action.body).map_err(|e| {
                    Status::invalid_argument(format!("unreadable training round: {e}"))
                })?;
                let (task_id, number) = (round.task_id, round.round);
                if number != 0 {
                    return Err(Status::invalid_argument(format!(
                        "{} carries round 0; rounds 1 to 4 go through {}",
                        actions::TRAIN_START,
                        actions::SECAGG_ROUND
                    )));
                }
                let answer = self.train_start(round).await?;
                json_result(&SecaggRound {
                    task_id,
                    round: number,
                    payload: answer,
                })?
            }
            actions::TRAIN_EVALUATE => {
                let request: confer_protocol::train::TrainRequest =
                    serde_json::from_slice(&action.body).map_err(|e| {
                        Status::invalid_argument(format!("unreadable evaluation request: {e}"))
                    })?;
                json_result(&self.train_evaluate(request).await?)?
            }
            actions::HEALTH => {
                let request: confer_protocol::catalog::HealthRequest = if action.body.is_empty() {
                    Default::default()
                } else {
                    serde_json::from_slice(&action.body).map_err(|e| {
                        Status::invalid_argument(format!("unreadable health request: {e}"))
                    })?
                };
                json_result(&Health {
                    node: self.state.name.clone(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    uptime_secs: self.state.started.elapsed().as_secs(),
                    tables: self.state.catalog.tables.len(),
                    audit: Some(self.state.ledger.head(request.anchor_seq)?),
                    time_ms: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .ok()
                        .map(|d| d.as_millis() as i64),
                })?
            }
            other => {
                return Err(ProtocolError::unimplemented(format!(
                    "unknown action {other}: this node serves {} (list_actions describes each)",
                    confer_protocol::names_of(confer_protocol::NODE_ACTIONS)
                ))
                .into());
            }
        };
        Ok(Response::new(futures::stream::iter([Ok(result)]).boxed()))
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        let list: Vec<_> = confer_protocol::NODE_ACTIONS
            .iter()
            .map(|a| {
                Ok(ActionType {
                    r#type: a.name.to_string(),
                    description: format!(
                        "{} (request: {}; answer: {})",
                        a.doc, a.request, a.response
                    ),
                })
            })
            .collect();
        Ok(Response::new(futures::stream::iter(list).boxed()))
    }
}
