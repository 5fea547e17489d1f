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
pub(crate) use crate::state::study_info;
pub use crate::state::{CoordinatorState, MAX_STATEMENTS_PER_USER};
use crate::store::Study;
pub use crate::studies::{NewStudy, StudyEdit};

/// gRPC header naming the study a request runs under.
pub const STUDY_HEADER: &str = "x-confer-study";

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

/// Names of the custom actions.
pub mod custom {
    /// Node registry and health.
    pub const NODES: &str = "confer.nodes";
    /// The calling user.
    pub const WHOAMI: &str = "confer.whoami";
    /// Create a study (admin). Body: JSON study.
    pub const STUDY_CREATE: &str = "confer.study.create";
    /// Change a study's title, principal investigator, members or
    /// min_sites (admin). Body: JSON [`super::StudyEdit`]; answer the study.
    pub const STUDY_EDIT: &str = "confer.study.edit";
    /// Studies the caller may use (all for admins).
    pub const STUDY_LIST: &str = "confer.study.list";
    /// One study. Body: its name.
    pub const STUDY_SHOW: &str = "confer.study.show";
    /// Users (admin).
    pub const USER_LIST: &str = "confer.user.list";
    /// The network catalog (JSON [`super::CatalogListing`]): tables, columns,
    /// types, bounds, domains and the sites publishing each table. Never
    /// row counts or values of private tables.
    pub const CATALOG: &str = "confer.catalog";
    /// Start a training job. Body: JSON `TrainSubmit`; answer `JobStatus`.
    pub const TRAIN_SUBMIT: &str = "confer.train.submit";
    /// A job's status and history. Body: JSON `JobRef`.
    pub const TRAIN_STATUS: &str = "confer.train.status";
    /// The jobs the caller may see.
    pub const TRAIN_LIST: &str = "confer.train.list";
    /// Stop a job after the step under way. Body: JSON `JobRef`.
    pub const TRAIN_CANCEL: &str = "confer.train.cancel";
    /// A job's latest model, standardisation and privacy statement. Body: JSON `JobRef`.
    pub const MODEL_EXPORT: &str = "confer.model.export";
}

/// The network catalog as `confer.catalog` returns it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CatalogListing {
    /// Sites that answered, in configuration order.
    pub sites: Vec<String>,
    /// Sites that did not answer (their tables may be missing here).
    pub missing_sites: Vec<String>,
    /// Tables, by name.
    pub tables: Vec<CatalogTable>,
}

/// One table of [`CatalogListing`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CatalogTable {
    /// The table as published (columns, privacy unit, bounds, domains).
    #[serde(flatten)]
    pub info: confer_protocol::catalog::TableInfo,
    /// The sites that publish it.
    pub sites: Vec<String>,
}

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
        let perm = match kind.as_str() {
            custom::NODES => Perm::NodeStatus,
            custom::WHOAMI | custom::STUDY_LIST | custom::STUDY_SHOW | custom::CATALOG => {
                Perm::ReadStudies
            }
            custom::STUDY_CREATE | custom::STUDY_EDIT => Perm::ManageStudies,
            custom::USER_LIST => Perm::ManageUsers,
            custom::TRAIN_SUBMIT | custom::TRAIN_CANCEL => Perm::Train,
            custom::TRAIN_STATUS | custom::TRAIN_LIST | custom::MODEL_EXPORT => Perm::ReadStudies,
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown action {other}: the coordinator serves {}",
                    [
                        custom::NODES,
                        custom::CATALOG,
                        custom::WHOAMI,
                        custom::STUDY_CREATE,
                        custom::STUDY_EDIT,
                        custom::STUDY_LIST,
                        custom::STUDY_SHOW,
                        custom::USER_LIST,
                        custom::TRAIN_SUBMIT,
                        custom::TRAIN_STATUS,
                        custom::TRAIN_LIST,
                        custom::TRAIN_CANCEL,
                        custom::MODEL_EXPORT,
                    ]
                    .join(", ")
                )));
            }
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
            custom::STUDY_LIST => {
                let studies: Vec<Study> = self
                    .state
                    .store
                    .studies()
                    .map_err(ProtocolError::from)?
                    .into_iter()
                    .filter(|s| s.admits(&user))
                    .collect();
                json_result(&studies)?
            }
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
            _ => return Err(Status::internal("unhandled action")),
        };
        Ok(Response::new(stream))
    }

    async fn list_custom_actions(&self) -> Option<Vec<Result<ActionType, Status>>> {
        Some(
            [
                (custom::NODES, "node registry and health (JSON)"),
                (custom::WHOAMI, "the calling user (JSON)"),
                (custom::CATALOG, "the network catalog (JSON)"),
                (custom::STUDY_CREATE, "create a study (admin; body: JSON)"),
                (
                    custom::STUDY_EDIT,
                    "change a study's title, PI, members or min_sites (admin; body: JSON)",
                ),
                (custom::STUDY_LIST, "studies you may use (JSON)"),
                (custom::STUDY_SHOW, "one study (body: its name)"),
                (custom::USER_LIST, "users (admin; JSON)"),
                (custom::TRAIN_SUBMIT, "start a training job (body: JSON)"),
                (custom::TRAIN_STATUS, "a training job's status and history"),
                (custom::TRAIN_LIST, "training jobs you may see"),
                (custom::TRAIN_CANCEL, "stop a training job"),
                (
                    custom::MODEL_EXPORT,
                    "a training job's model and privacy statement",
                ),
            ]
            .into_iter()
            .map(|(t, d)| {
                Ok(ActionType {
                    r#type: t.into(),
                    description: d.into(),
                })
            })
            .collect(),
        )
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
