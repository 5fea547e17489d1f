//! The coordinator's Flight SQL front door.
//!
//! * Statements: `GetFlightInfo(CommandStatementQuery)` authenticates the
//!   caller, checks the study, compiles and validates the statement against
//!   the network catalog (a bad query is refused here, and no task reaches
//!   any node) and returns the result schema with a ticket. `DoGet(ticket)`
//!   sends the signed task to the nodes, combines the releases and streams
//!   the answer. The ticket names a task id fixed at planning time, so a
//!   client that retries `DoGet` is answered from the nodes' stored releases
//!   and is never charged twice.
//! * Metadata: `GetSqlInfo`, `GetCatalogs`, `GetDbSchemas`, `GetTables`
//!   (with Arrow schemas whose field metadata carries the privacy unit,
//!   bounds and public domains) and `GetTableTypes`, from the network catalog.
//! * Handshake: Basic `user:token` returns a bearer token, for clients
//!   configured with a username and password.
//! * Actions: `confer.nodes`, `confer.whoami`, `confer.study.create`,
//!   `confer.study.list`, `confer.study.show`, `confer.user.list`, and the
//!   training actions `confer.train.submit|status|list|cancel` and
//!   `confer.model.export` (see [`crate::train`]).
use std::pin::Pin;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes,
    CommandGetTables, CommandStatementQuery, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    Action, ActionType, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest,
    HandshakeResponse, Ticket,
};
use confer_protocol::ProtocolError;
use futures::{Stream, TryStreamExt};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Action as Perm;
pub use crate::state::{CoordinatorState, MAX_STATEMENTS_PER_USER};
pub use confer_protocol::coordinator::{NewStudy, STUDY_HEADER, StudyEdit};

/// The catalog and schema names clients browse.
pub const CATALOG_NAME: &str = "confer";
/// See [`CATALOG_NAME`].
pub const SCHEMA_NAME: &str = "omop";
type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The Flight SQL service.
#[derive(Clone)]
pub struct CoordinatorService {
    pub(crate) state: Arc<CoordinatorState>,
}

impl CoordinatorService {
    /// Wraps the state.
    pub fn new(state: Arc<CoordinatorState>) -> Self {
        Self { state }
    }
}

fn header<T>(request: &Request<T>, name: &str) -> Option<String> {
    request
        .metadata()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

fn batch_stream(schema: SchemaRef, batches: Vec<RecordBatch>) -> Stream_<arrow_flight::FlightData> {
    Box::pin(
        FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(futures::stream::iter(batches.into_iter().map(Ok)))
            .map_err(Status::from),
    )
}

fn flight_info<M: ProstMessageExt>(
    schema: &Schema,
    ticket: M,
    descriptor: FlightDescriptor,
) -> Result<FlightInfo, Status> {
    Ok(FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| Status::internal(e.to_string()))?
        .with_endpoint(
            FlightEndpoint::new().with_ticket(Ticket::new(ticket.as_any().encode_to_vec())),
        )
        .with_descriptor(descriptor))
}

fn json_result<T: serde::Serialize>(value: &T) -> Result<Stream_<arrow_flight::Result>, Status> {
    let body = serde_json::to_vec(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Box::pin(futures::stream::iter([Ok(
        arrow_flight::Result::new(body),
    )])))
}

pub use confer_protocol::coordinator::actions as custom;
pub use confer_protocol::coordinator::{CatalogListing, CatalogTable};

#[tonic::async_trait]
impl FlightSqlService for CoordinatorService {
    type FlightService = CoordinatorService;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Stream_<HandshakeResponse>>, Status> {
        let header = header(&request, "authorization").ok_or_else(|| {
            Status::unauthenticated(
                "the handshake expects `authorization: Basic <base64(user:token)>`",
            )
        })?;
        let token = self.state.auth.basic(&header)?;
        let out: Stream_<HandshakeResponse> =
            Box::pin(futures::stream::iter([Ok(HandshakeResponse {
                protocol_version: 0,
                payload: token.clone().into_bytes().into(),
            })]));
        let mut response = Response::new(out);
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| Status::internal("token is not a valid header value"))?;
        response.metadata_mut().insert("authorization", value);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let user = self.state.auth.authorize(&request, Perm::Query)?;
        let study = header(&request, STUDY_HEADER);
        let (schema, handle) = self
            .state
            .plan(&query.query, &user, study.as_deref())
            .await?;
        let ticket = TicketStatementQuery {
            statement_handle: handle.to_string().into_bytes().into(),
        };
        Ok(Response::new(flight_info(
            schema.as_ref(),
            ticket,
            request.into_inner(),
        )?))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let user = self.state.auth.authorize(&request, Perm::Query)?;
        let (schema, batches) = self.state.execute(&ticket.statement_handle, &user).await?;
        Ok(Response::new(batch_stream(schema, batches)))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.state.auth.authorize(&request, Perm::Browse)?;
        let schema = query.clone().into_builder(&self.state.sql_info).schema();
        Ok(Response::new(flight_info(
            schema.as_ref(),
            query,
            request.into_inner(),
        )?))
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.state.auth.authorize(&request, Perm::Browse)?;
        let builder = query.into_builder(&self.state.sql_info);
        let schema = builder.schema();
        let batch = builder.build().map_err(Status::from)?;
        Ok(Response::new(batch_stream(schema, vec![batch])))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.state.auth.authorize(&request, Perm::Browse)?;
        let schema = query.into_builder().schema();
        Ok(Response::new(flight_info(
            schema.as_ref(),
            query,
            request.into_inner(),
        )?))
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.state.auth.authorize(&request, Perm::Browse)?;
        let mut builder = query.into_builder();
        builder.append(CATALOG_NAME);
        let schema = builder.schema();
        let batch = builder.build().map_err(Status::from)?;
        Ok(Response::new(batch_stream(schema, vec![batch])))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.state.auth.authorize(&request, Perm::Browse)?;
        let schema = query.clone().into_builder().schema();
        Ok(Response::new(flight_info(
            schema.as_ref(),
            query,
            request.into_inner(),
        )?))
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.state.auth.authorize(&request, Perm::Browse)?;
        let mut builder = query.into_builder();
        builder.append(CATALOG_NAME, SCHEMA_NAME);
        let schema = builder.schema();
        let batch = builder.build().map_err(Status::from)?;
        Ok(Response::new(batch_stream(schema, vec![batch])))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.state.auth.authorize(&request, Perm::Browse)?;
        let schema = query.clone().into_builder().schema();
        Ok(Response::new(flight_info(
            schema.as_ref(),
            query,
            request.into_inner(),
        )?))
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.state.auth.authorize(&request, Perm::Browse)?;
        let catalog = self.state.network_catalog().await?;
        let mut builder = query.into_builder();
        for table in catalog.tables() {
            let schema = crate::catalog_view::table_schema(table);
            builder
                .append(CATALOG_NAME, SCHEMA_NAME, &table.name, "TABLE", &schema)
                .map_err(Status::from)?;
        }
        let schema = builder.schema();
        let batch = builder.build().map_err(Status::from)?;
        Ok(Response::new(batch_stream(schema, vec![batch])))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.state.auth.authorize(&request, Perm::Browse)?;
        let schema = query.into_builder().schema();
        Ok(Response::new(flight_info(
            schema.as_ref(),
            query,
            request.into_inner(),
        )?))
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.state.auth.authorize(&request, Perm::Browse)?;
        let mut builder = query.into_builder();
        builder.append("TABLE");
        let schema = builder.schema();
        let batch = builder.build().map_err(Status::from)?;
        Ok(Response::new(batch_stream(schema, vec![batch])))
    }

    async fn do_action_fallback(
        &self,
        request: Request<Action>,
    ) -> Result<Response<<Self as FlightService>::DoActionStream>, Status> {
        let kind = request.get_ref().r#type.clone();
        let Some(perm) =
            confer_protocol::coordinator::action(&kind).and_then(|a| Perm::of(a.access))
        else {
            return Err(ProtocolError::unimplemented(format!(
                "unknown action {kind}: the coordinator serves {} (list_actions describes each)",
                confer_protocol::coordinator::action_names()
            ))
            .into());
        };
        let user = match self.state.auth.authorize(&request, perm) {
            Ok(u) => u,
            Err(e) => {
                let who = self
                    .state
                    .auth
                    .user(&request)
                    .map(|u| u.name)
                    .unwrap_or_default();
                self.state
                    .audit(&who, None, &kind, "refused", e.message.clone());
                return Err(e.into());
            }
        };
        let body = request.into_inner().body;
        let stream = match kind.as_str() {
            custom::NODES => {
                // Check now rather than report what the last periodic check saw.
                self.state.check_health().await;
                json_result(&self.state.node_statuses())?
            }
            custom::WHOAMI => json_result(&user)?,
            custom::CATALOG => {
                let catalog = self.state.network_catalog().await?;
                let answered = catalog.sites();
                json_result(&CatalogListing {
                    sites: answered.to_vec(),
                    missing_sites: self
                        .state
                        .nodes
                        .iter()
                        .map(|n| n.name.clone())
                        .filter(|n| !answered.contains(n))
                        .collect(),
                    tables: catalog
                        .tables()
                        .map(|t| CatalogTable {
                            info: t.clone(),
                            sites: catalog.sites_of(&t.name).to_vec(),
                        })
                        .collect(),
                })?
            }
            custom::STUDY_CREATE => {
                let study = self.create_study(&user, &body)?;
                self.state
                    .audit(&user.name, Some(&study.name), &kind, "ok", String::new());
                json_result(&study)?
            }
            custom::STUDY_EDIT => {
                let (study, changes) = self.edit_study(&body)?;
                self.state
                    .audit(&user.name, Some(&study.name), &kind, "ok", changes);
                json_result(&study)?
            }
            custom::STUDY_LIST => json_result(&self.state.studies_of(&user)?)?,
            custom::STUDY_SHOW => {
                let name = String::from_utf8_lossy(&body).trim().to_string();
                json_result(&self.state.auth.study(&user, &name)?)?
            }
            custom::USER_LIST => {
                json_result(&self.state.store.users().map_err(ProtocolError::from)?)?
            }
            custom::TRAIN_SUBMIT => {
                let outcome = crate::train::submit(&self.state, &user, &body).await;
                if let Err(e) = &outcome {
                    self.state
                        .audit(&user.name, None, &kind, "refused", e.message.clone());
                }
                json_result(&outcome?)?
            }
            custom::TRAIN_STATUS => json_result(&crate::train::status(&self.state, &user, &body)?)?,
            custom::TRAIN_LIST => json_result(&crate::train::list(&self.state, &user)?)?,
            custom::TRAIN_CANCEL => json_result(&crate::train::cancel(&self.state, &user, &body)?)?,
            custom::MODEL_EXPORT => json_result(&crate::train::export(&self.state, &user, &body)?)?,
            custom::SUPERVISION_RUN => {
                let outcome = crate::supervision::run_action(&self.state, &user, &body).await;
                if let Err(e) = &outcome {
                    self.state
                        .audit(&user.name, None, &kind, "refused", e.message.clone());
                }
                json_result(&outcome?)?
            }
            custom::SUPERVISION_INDICATORS => {
                json_result(&crate::supervision::overview(&self.state, &body)?)?
            }
            _ => return Err(Status::internal("unhandled action")),
        };
        Ok(Response::new(stream))
    }

    async fn list_custom_actions(&self) -> Option<Vec<Result<ActionType, Status>>> {
        Some(
            confer_protocol::coordinator::ACTIONS
                .iter()
                .map(|a| {
                    Ok(ActionType {
                        r#type: a.name.into(),
                        description: a.doc.into(),
                    })
                })
                .collect(),
        )
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
