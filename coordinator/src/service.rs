//! The coordinator's Flight SQL front door.
//!
//! `GetFlightInfo(CommandStatementQuery)` compiles and validates the
//! statement against the network catalog (a bad query is refused here, and
//! no task reaches any node) and returns the result schema with a ticket.
//! `DoGet(ticket)` sends the task to every node, combines the releases and
//! streams the answer. The ticket names a task id fixed at planning time,
//! so a client that retries `DoGet` is answered from the nodes' stored
//! releases and is never charged twice.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt, SqlInfo, TicketStatementQuery};
use arrow_flight::{FlightDescriptor, FlightEndpoint, FlightInfo, Ticket};
use confer_protocol::task::{DEFAULT_STUDY, Envelope, Task};
use confer_protocol::{ErrorKind, ProtocolError};
use confer_query::combine::combine;
use confer_query::{Catalog, FederatedPlan, Statement};
use futures::{Stream, TryStreamExt};
use prost::Message;
use tonic::{Request, Response, Status};
use tracing::{info, instrument};
use uuid::Uuid;

use crate::config::CoordinatorConfig;
use crate::fanout::{self, NodeHandle};

/// gRPC header naming the study a request runs under.
pub const STUDY_HEADER: &str = "x-confer-study";
/// gRPC header naming the researcher (until users and tokens arrive).
pub const RESEARCHER_HEADER: &str = "x-confer-researcher";

/// How long a fetched network catalog is reused.
const CATALOG_TTL: Duration = Duration::from_secs(30);
/// How long a planned statement waits for its DoGet.
const STATEMENT_TTL: Duration = Duration::from_secs(3600);

/// A statement planned by GetFlightInfo, waiting for DoGet.
enum Prepared {
    /// A DP query: the plan and the task that carries it.
    Query {
        plan: Box<FederatedPlan>,
        envelope: Envelope,
        task_id: Uuid,
    },
    /// An answer computed at planning time (EXPLAIN PRIVACY).
    Ready(RecordBatch),
}

struct Entry {
    prepared: Arc<Prepared>,
    created: Instant,
}

/// Shared state of the coordinator.
pub struct CoordinatorState {
    config: CoordinatorConfig,
    nodes: Vec<NodeHandle>,
    catalog: tokio::sync::Mutex<Option<(Instant, Arc<Catalog>)>>,
    statements: Mutex<HashMap<Uuid, Entry>>,
}

impl CoordinatorState {
    /// State for a config (channels connect lazily).
    pub fn new(config: CoordinatorConfig) -> crate::Result<Self> {
        let nodes = config
            .nodes
            .iter()
            .map(NodeHandle::new)
            .collect::<crate::Result<Vec<_>>>()?;
        Ok(Self {
            config,
            nodes,
            catalog: tokio::sync::Mutex::new(None),
            statements: Mutex::new(HashMap::new()),
        })
    }

    /// The network catalog, fetched from every node (cached briefly).
    pub async fn network_catalog(&self) -> Result<Arc<Catalog>, ProtocolError> {
        let mut cached = self.catalog.lock().await;
        if let Some((at, catalog)) = cached.as_ref()
            && at.elapsed() < CATALOG_TTL
        {
            return Ok(catalog.clone());
        }
        let timeout = self.config.node_timeout().min(Duration::from_secs(15));
        let infos = fanout::all(&self.nodes, |n| async move { n.catalog(timeout).await }).await?;
        let catalog = Arc::new(Catalog::merge(&infos).map_err(ProtocolError::from)?);
        *cached = Some((Instant::now(), catalog.clone()));
        Ok(catalog)
    }

    fn store(&self, prepared: Prepared) -> Result<Uuid, ProtocolError> {
        let handle = Uuid::new_v4();
        let mut map = self
            .statements
            .lock()
            .map_err(|_| ProtocolError::internal("statement table lock poisoned"))?;
        map.retain(|_, e| e.created.elapsed() < STATEMENT_TTL);
        map.insert(
            handle,
            Entry {
                prepared: Arc::new(prepared),
                created: Instant::now(),
            },
        );
        Ok(handle)
    }

    fn lookup(&self, handle: &[u8]) -> Result<Arc<Prepared>, ProtocolError> {
        let id = std::str::from_utf8(handle)
            .ok()
            .and_then(|s| Uuid::parse_str(s).ok())
            .ok_or_else(|| ProtocolError::invalid("the ticket is not a confer statement handle"))?;
        let map = self
            .statements
            .lock()
            .map_err(|_| ProtocolError::internal("statement table lock poisoned"))?;
        map.get(&id).map(|e| e.prepared.clone()).ok_or_else(|| {
            ProtocolError::new(
                ErrorKind::NotFound,
                "this statement is unknown or expired (tickets last one hour, and do not survive a \
                 coordinator restart): execute the query again",
            )
        })
    }

    /// Compiles a statement; returns the result schema and a handle for DoGet.
    #[instrument(skip_all)]
    pub async fn plan(
        &self,
        sql: &str,
        study: &str,
        researcher: &str,
    ) -> Result<(SchemaRef, Uuid), ProtocolError> {
        let statement = confer_query::parse(sql).map_err(ProtocolError::from)?;
        match statement {
            Statement::Query(parsed) => {
                let catalog = self.network_catalog().await?;
                let plan =
                    confer_query::compile(&parsed, &catalog, None).map_err(ProtocolError::from)?;
                confer_query::engine::validate(&plan, &catalog)
                    .await
                    .map_err(ProtocolError::from)?;
                let schema = plan.output_schema();
                let task = Task::query(
                    study,
                    researcher,
                    sql,
                    Duration::from_secs(self.config.coordinator.task_ttl_secs),
                );
                let task_id = task.id;
                let envelope = Envelope::new(&task)?;
                let handle = self.store(Prepared::Query {
                    plan: Box::new(plan),
                    envelope,
                    task_id,
                })?;
                Ok((schema, handle))
            }
            Statement::ExplainPrivacy(parsed) => {
                let catalog = self.network_catalog().await?;
                let plan =
                    confer_query::compile(&parsed, &catalog, None).map_err(ProtocolError::from)?;
                confer_query::engine::validate(&plan, &catalog)
                    .await
                    .map_err(ProtocolError::from)?;
                let batch = explain(&plan, catalog.sites().len())?;
                let schema = batch.schema();
                let handle = self.store(Prepared::Ready(batch))?;
                Ok((schema, handle))
            }
            Statement::ShowPrivacyBudget { .. } => Err(ProtocolError::invalid(
                "SHOW PRIVACY BUDGET is not available in this version: each node's ledger records \
                 its spending, and reporting it arrives with node governance",
            )),
        }
    }

    /// Runs a planned statement and returns its result.
    #[instrument(skip_all)]
    pub async fn execute(
        &self,
        handle: &[u8],
    ) -> Result<(SchemaRef, Vec<RecordBatch>), ProtocolError> {
        let prepared = self.lookup(handle)?;
        match prepared.as_ref() {
            Prepared::Ready(batch) => Ok((batch.schema(), vec![batch.clone()])),
            Prepared::Query {
                plan,
                envelope,
                task_id,
            } => {
                let timeout = self.config.node_timeout();
                let started = Instant::now();
                let partials =
                    fanout::all(
                        &self.nodes,
                        |n| async move { n.run(envelope, timeout).await },
                    )
                    .await?;
                let combined = combine(plan, &partials, *task_id).map_err(ProtocolError::from)?;
                let schema = combined.schema();
                let batches = confer_query::engine::post_process(plan, combined)
                    .await
                    .map_err(ProtocolError::from)?;
                info!(
                    task = %task_id,
                    sites = partials.len(),
                    millis = started.elapsed().as_millis() as u64,
                    "query answered"
                );
                Ok((schema, batches))
            }
        }
    }
}

/// EXPLAIN PRIVACY: the plan, each aggregate's noise and expected error, the cost.
fn explain(plan: &FederatedPlan, sites: usize) -> Result<RecordBatch, ProtocolError> {
    let mut rows: Vec<(String, String)> = Vec::new();
    let o = &plan.options;
    rows.push(("mechanism".into(), o.mechanism.name().into()));
    rows.push((
        "cost per node".into(),
        format!(
            "epsilon = {:.6}, delta = {:e}, rho (zCDP) = {:.6}",
            plan.cost.epsilon, plan.cost.delta, plan.cost.rho
        ),
    ));
    rows.push((
        "contribution bounds".into(),
        format!(
            "max_groups_contributed = {} (effective {}), max_rows_contributed = {}",
            o.max_groups_contributed, plan.max_groups, o.max_rows_contributed
        ),
    ));
    let groups: Vec<String> = plan
        .groups
        .iter()
        .map(|g| format!("{} (public domain of {} values)", g.name, g.domain.len()))
        .collect();
    rows.push((
        "groups".into(),
        if groups.is_empty() {
            "none (one global group)".into()
        } else {
            groups.join(", ")
        },
    ));
    let z = confer_privacy::stats::z_for_confidence(o.confidence);
    for agg in &plan.aggregates {
        for &p in &agg.partials {
            let spec = &plan.partials[p];
            let noise = plan.noise(p).map_err(ProtocolError::from)?;
            let network_sd = noise.stddev() * (sites as f64).sqrt();
            rows.push((
                format!("aggregate {}", agg.name),
                format!(
                    "{}: per-group bound {}, sensitivity L1 {} / L2 {:.4}, noise scale {:.4} per node, \
                     standard deviation {:.4} over {sites} node(s), {:.0}% interval +/- {:.4}",
                    agg.expr,
                    spec.per_group_bound,
                    spec.l1,
                    spec.l2,
                    noise.scale,
                    network_sd,
                    o.confidence * 100.0,
                    z * network_sd
                ),
            ));
        }
    }
    rows.push(("local bounded query".into(), plan.local_sql.clone()));
    let schema = Arc::new(Schema::new_with_metadata(
        vec![
            Field::new("item", DataType::Utf8, false),
            Field::new("value", DataType::Utf8, false),
        ],
        HashMap::from([(
            confer_protocol::metadata::EXPLAIN.to_string(),
            "true".to_string(),
        )]),
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

/// The Flight SQL service.
#[derive(Clone)]
pub struct CoordinatorService {
    state: Arc<CoordinatorState>,
}

impl CoordinatorService {
    /// Wraps the state.
    pub fn new(state: Arc<CoordinatorState>) -> Self {
        Self { state }
    }
}

fn header<T>(request: &Request<T>, name: &str, default: &str) -> String {
    request
        .metadata()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .unwrap_or(default)
        .to_string()
}

type DoGetStream =
    Pin<Box<dyn Stream<Item = Result<arrow_flight::FlightData, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl FlightSqlService for CoordinatorService {
    type FlightService = CoordinatorService;

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let study = header(&request, STUDY_HEADER, DEFAULT_STUDY);
        let researcher = header(&request, RESEARCHER_HEADER, "anonymous");
        let (schema, handle) = self.state.plan(&query.query, &study, &researcher).await?;
        let ticket = TicketStatementQuery {
            statement_handle: handle.to_string().into_bytes().into(),
        };
        let info = FlightInfo::new()
            .try_with_schema(schema.as_ref())
            .map_err(|e| Status::internal(e.to_string()))?
            .with_endpoint(
                FlightEndpoint::new().with_ticket(Ticket::new(ticket.as_any().encode_to_vec())),
            )
            .with_descriptor(request.into_inner());
        Ok(Response::new(info))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let (schema, batches) = self.state.execute(&ticket.statement_handle).await?;
        let stream: DoGetStream = Box::pin(
            FlightDataEncoderBuilder::new()
                .with_schema(schema)
                .build(futures::stream::iter(batches.into_iter().map(Ok)))
                .map_err(Status::from),
        );
        Ok(Response::new(stream))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
