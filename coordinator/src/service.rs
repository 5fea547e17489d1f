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

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes,
    CommandGetTables, CommandStatementQuery, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    Action, ActionType, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest,
    HandshakeResponse, Ticket,
};
use confer_protocol::catalog::CatalogInfo;
use confer_protocol::signing::{Identity, sha256_hex};
use confer_protocol::task::{Envelope, QueryCheck, QueryTask, StudyInfo, Task, TaskKind};
use confer_protocol::{ErrorKind, ProtocolError, actions, metadata};
use confer_query::combine::combine;
use confer_query::{Catalog, FederatedPlan, Statement};
use futures::{Stream, TryStreamExt};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, instrument, warn};
use uuid::Uuid;

use crate::auth::{Action as Perm, Authenticator};
use crate::config::CoordinatorConfig;
use crate::fanout::{self, NodeHandle};
use crate::store::{CoordinatorAudit, NodeStatus, ResultRecord, Store, Study, User, now_ms};

/// gRPC header naming the study a request runs under.
pub const STUDY_HEADER: &str = "x-confer-study";

/// The catalog and schema names clients browse.
pub const CATALOG_NAME: &str = "confer";
/// See [`CATALOG_NAME`].
pub const SCHEMA_NAME: &str = "omop";

/// How long a fetched network catalog is reused.
const CATALOG_TTL: Duration = Duration::from_secs(30);
/// How long a planned statement waits for its DoGet.
const STATEMENT_TTL: Duration = Duration::from_secs(3600);

/// Most statements one user may have planned and not yet fetched; past it
/// the oldest is forgotten.
pub const MAX_STATEMENTS_PER_USER: usize = 64;

/// A statement planned by GetFlightInfo, waiting for DoGet.
enum Prepared {
    /// A DP query: the plan, the signed task, and who asked.
    Query {
        plan: Box<FederatedPlan>,
        envelope: Envelope,
        task_id: Uuid,
        study: String,
        user: String,
        min_sites: usize,
        statement_hash: String,
        /// The task as bound to the nodes that passed the pre-check at the
        /// first DoGet (see `bound_to`).
        bound: std::sync::OnceLock<Envelope>,
    },
    /// SHOW PRIVACY BUDGET: the signed budget task for every node.
    Budget { envelope: Envelope },
    /// A query over public tables only: the signed task and the answer's
    /// schema (a `site` column, then each node's columns).
    Public {
        envelope: Envelope,
        schema: SchemaRef,
        study: String,
    },
    /// An answer computed at planning time (EXPLAIN PRIVACY).
    Ready(RecordBatch),
}

/// The network catalog, and each node's last good catalog (used while
/// the node does not answer). No lock is held across a network call.
#[derive(Default)]
struct CatalogCache {
    merged: Option<(Instant, Arc<Catalog>)>,
    nodes: HashMap<String, CatalogInfo>,
}

struct Entry {
    prepared: Arc<Prepared>,
    created: Instant,
    /// A statement that carries a signed task lives as long as the task.
    ttl: Duration,
    user: String,
}

/// Shared state of the coordinator.
pub struct CoordinatorState {
    config: CoordinatorConfig,
    identity: Identity,
    nodes: Vec<NodeHandle>,
    catalog: Mutex<CatalogCache>,
    statements: Mutex<HashMap<Uuid, Entry>>,
    store: Arc<dyn Store>,
    auth: Authenticator,
    health: RwLock<HashMap<String, NodeStatus>>,
    sql_info: SqlInfoData,
    training: crate::train::Training,
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl CoordinatorState {
    /// State for a config and a store (channels to nodes connect lazily).
    pub fn new(
        config: CoordinatorConfig,
        store: Arc<dyn Store>,
        nodes: Vec<NodeHandle>,
    ) -> crate::Result<Self> {
        let identity = Identity::load(&config.coordinator.signing_key).map_err(|e| {
            crate::CoordinatorError::Config(format!(
                "coordinator.signing_key: {} (create one with `confer keygen --out <file>`)",
                e.message
            ))
        })?;
        let mut info = SqlInfoDataBuilder::new();
        info.append(SqlInfo::FlightSqlServerName, "confer");
        info.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        info.append(SqlInfo::FlightSqlServerArrowVersion, "59");
        info.append(SqlInfo::FlightSqlServerReadOnly, true);
        info.append(SqlInfo::FlightSqlServerSql, true);
        info.append(SqlInfo::FlightSqlServerSubstrait, false);
        info.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        info.append(SqlInfo::FlightSqlServerCancel, false);
        info.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        info.append(SqlInfo::SqlDdlCatalog, false);
        info.append(SqlInfo::SqlDdlSchema, false);
        info.append(SqlInfo::SqlDdlTable, false);
        let sql_info = info
            .build()
            .map_err(|e| crate::CoordinatorError::Config(format!("sql info: {e}")))?;
        // Nodes held when the coordinator stopped stay held until a health
        // check finds their chains extend their anchors again.
        for (name, why) in store.holds()? {
            if let Some(node) = nodes.iter().find(|n| n.name == name) {
                node.hold(Some(why));
            }
        }
        Ok(Self {
            auth: Authenticator::new(store.clone()),
            store,
            identity,
            config,
            nodes,
            catalog: Mutex::new(CatalogCache::default()),
            statements: Mutex::new(HashMap::new()),
            health: RwLock::new(HashMap::new()),
            sql_info,
            training: crate::train::Training::default(),
        })
    }

    /// The state store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Who may do what.
    pub(crate) fn auth(&self) -> &Authenticator {
        &self.auth
    }

    /// The configured nodes.
    pub(crate) fn nodes(&self) -> &[NodeHandle] {
        &self.nodes
    }

    /// Signs a task with the coordinator's key.
    pub(crate) fn sign(&self, task: &Task) -> Result<Envelope, ProtocolError> {
        self.identity.sign(task)
    }

    /// The names of the configured nodes.
    fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// `envelope`'s task, signed again for `nodes` only: the nodes a query
    /// runs at, so that a captured task cannot be replayed to another.
    fn bound_to(
        &self,
        envelope: &Envelope,
        nodes: &[NodeHandle],
    ) -> Result<Envelope, ProtocolError> {
        let task: Task = serde_json::from_str(&envelope.payload)
            .map_err(|e| ProtocolError::internal(format!("stored task unreadable: {e}")))?;
        self.identity
            .sign(&task.for_nodes(nodes.iter().map(|n| &n.name)))
    }

    /// Training jobs running in this process.
    pub(crate) fn training(&self) -> &crate::train::Training {
        &self.training
    }

    /// Per-node deadline of one training step (preparing, one round's
    /// local training, an evaluation).
    pub(crate) fn train_timeout(&self) -> Duration {
        Duration::from_secs(self.config.coordinator.train_timeout_secs)
    }

    /// How long a round task stays valid at the nodes.
    pub(crate) fn round_ttl(&self) -> Duration {
        self.task_ttl()
            .max(self.train_timeout() + Duration::from_secs(60))
    }

    /// The network catalog, fetched from every node (cached briefly). A
    /// node that does not answer is left out, and named in the log; the
    /// catalog fails only if no node answers.
    pub async fn network_catalog(&self) -> Result<Arc<Catalog>, ProtocolError> {
        let lock = || {
            self.catalog
                .lock()
                .map_err(|_| ProtocolError::internal("catalog cache lock poisoned"))
        };
        if let Some((at, catalog)) = lock()?.merged.as_ref()
            && at.elapsed() < CATALOG_TTL
        {
            return Ok(catalog.clone());
        }
        let timeout = self.config.node_timeout().min(Duration::from_secs(15));
        let results = fanout::each(&self.nodes, |n| async move { n.catalog(timeout).await }).await;
        let mut cache = lock()?;
        let mut infos = Vec::new();
        let mut failures = Vec::new();
        for (name, r) in results {
            match r {
                Ok(info) => {
                    cache.nodes.insert(name, info.clone());
                    infos.push(info);
                }
                Err(e) => match cache.nodes.get(&name) {
                    // A node that does not answer now keeps its last catalog.
                    Some(last) => infos.push(last.clone()),
                    None => {
                        warn!(node = %name, "no catalog from node: {}", e.message);
                        failures.push(e);
                    }
                },
            }
        }
        if infos.is_empty() {
            return Err(fanout::joined(failures));
        }
        let catalog = Arc::new(Catalog::merge(&infos).map_err(ProtocolError::from)?);
        // A partial catalog is used but not cached, so a returning node is seen soon.
        if failures.is_empty() {
            cache.merged = Some((Instant::now(), catalog.clone()));
        }
        Ok(catalog)
    }

    fn store_statement(&self, prepared: Prepared, user: &User) -> Result<Uuid, ProtocolError> {
        let handle = Uuid::new_v4();
        let ttl = match &prepared {
            Prepared::Ready(_) => STATEMENT_TTL,
            _ => self.task_ttl().min(STATEMENT_TTL),
        };
        let mut map = self
            .statements
            .lock()
            .map_err(|_| ProtocolError::internal("statement table lock poisoned"))?;
        map.retain(|_, e| e.created.elapsed() < e.ttl);
        // One user cannot fill the table: past the cap, their oldest goes.
        let mut mine: Vec<(Instant, Uuid)> = map
            .iter()
            .filter(|(_, e)| e.user == user.name)
            .map(|(id, e)| (e.created, *id))
            .collect();
        if mine.len() >= MAX_STATEMENTS_PER_USER {
            mine.sort();
            for (_, id) in &mine[..=mine.len() - MAX_STATEMENTS_PER_USER] {
                map.remove(id);
            }
        }
        map.insert(
            handle,
            Entry {
                prepared: Arc::new(prepared),
                created: Instant::now(),
                ttl,
                user: user.name.clone(),
            },
        );
        Ok(handle)
    }

    fn lookup(&self, handle: &[u8], user: &User) -> Result<Arc<Prepared>, ProtocolError> {
        let id = std::str::from_utf8(handle)
            .ok()
            .and_then(|s| Uuid::parse_str(s).ok())
            .ok_or_else(|| ProtocolError::invalid("the ticket is not a confer statement handle"))?;
        let map = self
            .statements
            .lock()
            .map_err(|_| ProtocolError::internal("statement table lock poisoned"))?;
        let entry = map
            .get(&id)
            .filter(|e| e.created.elapsed() < e.ttl)
            .ok_or_else(|| {
                ProtocolError::new(
                    ErrorKind::NotFound,
                    format!(
                        "this statement is unknown or expired (a ticket lasts as long as its task, \
                         task_ttl_secs = {} s, EXPLAIN output one hour; the newest {MAX_STATEMENTS_PER_USER} \
                         per user are kept; none survive a coordinator restart): execute the query again",
                        self.task_ttl().as_secs()
                    ),
                )
            })?;
        if entry.user != user.name {
            return Err(ProtocolError::new(
                ErrorKind::PermissionDenied,
                "this ticket belongs to another user",
            ));
        }
        Ok(entry.prepared.clone())
    }

    pub(crate) fn audit(
        &self,
        user: &str,
        study: Option<&str>,
        action: &str,
        outcome: &str,
        detail: String,
    ) {
        let entry = CoordinatorAudit {
            at_ms: now_ms(),
            user: user.to_string(),
            study: study.map(str::to_string),
            action: action.to_string(),
            outcome: outcome.to_string(),
            detail,
        };
        if let Err(e) = self.store.audit(&entry) {
            warn!("cannot write the coordinator audit log: {e}");
        }
    }

    fn task_ttl(&self) -> Duration {
        Duration::from_secs(self.config.coordinator.task_ttl_secs)
    }

    /// Compiles a statement for `user`; returns the result schema and a handle for DoGet.
    #[instrument(skip_all, fields(user = %user.name))]
    pub async fn plan(
        &self,
        sql: &str,
        user: &User,
        study: Option<&str>,
    ) -> Result<(SchemaRef, Uuid), ProtocolError> {
        let outcome = self.plan_inner(sql, user, study).await;
        if let Err(e) = &outcome {
            self.audit(&user.name, study, "plan", "refused", e.message.clone());
        }
        outcome
    }

    async fn plan_inner(
        &self,
        sql: &str,
        user: &User,
        study: Option<&str>,
    ) -> Result<(SchemaRef, Uuid), ProtocolError> {
        let need_study = |what: &str| {
            study.ok_or_else(|| {
                ProtocolError::invalid(format!(
                    "{what} runs under a study: pass --study <name> (header {STUDY_HEADER})"
                ))
            })
        };
        let statement = confer_query::parse(sql).map_err(ProtocolError::from)?;
        match statement {
            Statement::Query(parsed) => {
                let study = self.auth.study(user, need_study("every query")?)?;
                let catalog = self.network_catalog().await?;
                if let Some(public) = confer_query::public::public_query(&parsed, &catalog)
                    .await
                    .map_err(ProtocolError::from)?
                {
                    study_reads(&study, &public.tables)?;
                    let mut fields = vec![Arc::new(Field::new(
                        confer_query::public::SITE_COLUMN,
                        DataType::Utf8,
                        false,
                    ))];
                    fields.extend(
                        public
                            .schema
                            .fields()
                            .iter()
                            .map(|f| Arc::new(f.as_ref().clone().with_nullable(true))),
                    );
                    let schema = Arc::new(Schema::new(fields));
                    let mut task =
                        Task::query(&study.name, &user.name, &public.sql, self.task_ttl())
                            .for_nodes(self.node_names());
                    task.kind = TaskKind::PublicQuery(QueryTask { sql: public.sql });
                    task.study_info = Some(study_info(&study));
                    let envelope = self.identity.sign(&task)?;
                    let handle = self.store_statement(
                        Prepared::Public {
                            envelope,
                            schema: schema.clone(),
                            study: study.name.clone(),
                        },
                        user,
                    )?;
                    return Ok((schema, handle));
                }
                let plan = confer_query::compile(&parsed, &catalog, None)
                    .await
                    .map_err(ProtocolError::from)?;
                study_reads(&study, &plan.tables)?;
                confer_query::engine::validate(&plan, &catalog)
                    .await
                    .map_err(ProtocolError::from)?;
                // Secure aggregation tolerates a minority of dropouts by
                // default (threshold n/2 + 1, SECAGG.md); per-site queries
                // need every node unless told otherwise.
                let all = self.nodes.len();
                let default_min_sites =
                    if plan.options.aggregation == confer_query::options::Aggregation::Secure {
                        crate::secure::default_min_sites(all)
                    } else {
                        all
                    };
                let min_sites = plan
                    .options
                    .min_sites
                    .or(study.min_sites)
                    .unwrap_or(default_min_sites)
                    .min(all);
                let schema = plan.output_schema();
                // Signed for every node now; bound to the nodes that pass
                // the pre-check when it runs.
                let mut task = Task::query(&study.name, &user.name, sql, self.task_ttl())
                    .for_nodes(self.node_names());
                task.study_info = Some(study_info(&study));
                let task_id = task.id;
                let envelope = self.identity.sign(&task)?;
                let handle = self.store_statement(
                    Prepared::Query {
                        plan: Box::new(plan),
                        envelope,
                        task_id,
                        study: study.name.clone(),
                        user: user.name.clone(),
                        min_sites,
                        statement_hash: sha256_hex(sql.as_bytes()),
                        bound: std::sync::OnceLock::new(),
                    },
                    user,
                )?;
                Ok((schema, handle))
            }
            Statement::ExplainPrivacy(parsed) => {
                let catalog = self.network_catalog().await?;
                let plan = confer_query::compile(&parsed, &catalog, None)
                    .await
                    .map_err(ProtocolError::from)?;
                confer_query::engine::validate(&plan, &catalog)
                    .await
                    .map_err(ProtocolError::from)?;
                let batch = explain(&plan, catalog.sites().len())?;
                let schema = batch.schema();
                let handle = self.store_statement(Prepared::Ready(batch), user)?;
                self.audit(&user.name, study, "explain", "ok", String::new());
                Ok((schema, handle))
            }
            Statement::ShowPrivacyBudget { study: named } => {
                let name = match named.as_deref() {
                    Some(n) => n,
                    None => need_study("SHOW PRIVACY BUDGET")?,
                };
                let study = self.auth.study(user, name)?;
                let mut task = Task::budget(&study.name, &user.name, self.task_ttl())
                    .for_nodes(self.node_names());
                task.study_info = Some(study_info(&study));
                let envelope = self.identity.sign(&task)?;
                let handle = self.store_statement(Prepared::Budget { envelope }, user)?;
                Ok((crate::budget::schema(), handle))
            }
        }
    }

    /// Asks every node to check a query task (nothing read or charged)
    /// before any node runs it. A node that refuses the query itself (cost
    /// over its per-query cap or the study's budget, a table the study may
    /// not read) stops the query everywhere, so nobody spends budget on a
    /// query that cannot be answered as asked. Nodes that do not answer, or
    /// do not take part in the study, are left out as when they miss the
    /// query itself; fewer than `min_sites` left stops it too. Returns the
    /// nodes to ask, and the names and failures of those left out.
    async fn precheck(
        &self,
        nodes: &[NodeHandle],
        envelope: &Envelope,
        min_sites: usize,
        policy: fanout::RetryPolicy,
    ) -> Result<(Vec<NodeHandle>, Vec<String>, Vec<ProtocolError>), ProtocolError> {
        let body = envelope.to_bytes()?;
        // Read before any node is asked: a node's chain only grows from here.
        let anchors: HashMap<String, (i64, String)> = nodes
            .iter()
            .filter_map(|n| {
                self.store
                    .anchor(&n.name)
                    .ok()
                    .flatten()
                    .map(|a| (n.name.clone(), a))
            })
            .collect();
        let answers = fanout::each(nodes, |n| {
            let body = body.clone();
            async move {
                let answer = n
                    .action_json_with_retries::<QueryCheck>(
                        actions::QUERY_CHECK,
                        body,
                        "query check",
                        policy,
                    )
                    .await;
                match answer {
                    // A node from before the check: it checks when it runs.
                    Err(e) if e.message.contains("unknown action") => Ok(QueryCheck {
                        node: n.name.clone(),
                        rho: 0.0,
                        epsilon: 0.0,
                        delta: 0.0,
                        refused: None,
                        audit: None,
                    }),
                    other => other,
                }
            }
        })
        .await;
        let mut ready = Vec::new();
        let mut missing = Vec::new();
        let mut failures = Vec::new();
        let mut refusals = Vec::new();
        for (node, (name, answer)) in nodes.iter().zip(answers) {
            // A chain shorter than its anchor: reset or cut back since the
            // last health check, so held now (the full check of the
            // anchored record's hash runs with every health check).
            let anchor = anchors.get(&name);
            let answer =
                answer.and_then(
                    |a| match self.chain_cut_back(node, anchor, a.audit.as_ref()) {
                        Some(why) => Err(ProtocolError::new(ErrorKind::FailedPrecondition, why)
                            .with_retryable(false)),
                        None => Ok(a),
                    },
                );
            match answer {
                Ok(QueryCheck {
                    refused: Some(why), ..
                }) => refusals.push(why),
                Ok(_) => ready.push(node.clone()),
                Err(e) => {
                    warn!(node = %name, "node left out of the query at its check: {}", e.message);
                    missing.push(name);
                    failures.push(e);
                }
            }
        }
        if !refusals.is_empty() || ready.len() < min_sites {
            // The query will not run: every node asked gives back the budget
            // it may hold for it (a node left out may have passed after the
            // deadline), so it spends nothing anywhere.
            self.release_leases(nodes, &body).await;
        } else if ready.len() < nodes.len() {
            // It runs without the nodes left out, which can then never run
            // it (it is bound to the others): what they may hold goes back.
            let left: Vec<NodeHandle> = nodes
                .iter()
                .filter(|n| !ready.iter().any(|r: &NodeHandle| r.name == n.name))
                .cloned()
                .collect();
            let timeout = self.config.node_timeout().min(Duration::from_secs(5));
            let body = body.clone();
            tokio::spawn(async move { release_leases_at(&left, &body, timeout).await });
        }
        if !refusals.is_empty() {
            let mut err = fanout::joined(refusals);
            err.message = format!(
                "refused before any node ran it, nothing spent: {}",
                err.message
            );
            return Err(err.with_retryable(false));
        }
        if ready.len() < min_sites {
            let err = fanout::joined(failures);
            return Err(ProtocolError::new(
                err.kind,
                format!(
                    "only {} of {} sites can answer and this query needs {min_sites} (min_sites); nothing was \
                     spent; missing {}: {}",
                    ready.len(),
                    self.nodes.len(),
                    missing.join(", "),
                    err.message
                ),
            )
            .with_retryable(err.retryable));
        }
        Ok((ready, missing, failures))
    }

    /// The nodes a planned query may run at: every node, except that a
    /// query grouped by `site` runs only at the sites its plan named (a
    /// node that was down when it was planned and is back now has no group
    /// in the answer, so it is not asked, charged or thrown away). Returns
    /// those nodes, and the others with why they were left out.
    fn planned_sites(
        &self,
        plan: &FederatedPlan,
    ) -> (Vec<NodeHandle>, Vec<(String, ProtocolError)>) {
        let Some(domain) = plan
            .groups
            .iter()
            .find(|g| g.is_site)
            .and_then(|g| g.domain.as_ref())
        else {
            return (self.nodes.clone(), Vec::new());
        };
        let named = |n: &NodeHandle| {
            domain.iter().any(
                |v| matches!(v, confer_protocol::catalog::DomainValue::Text(t) if *t == n.name),
            )
        };
        let (asked, left): (Vec<NodeHandle>, Vec<NodeHandle>) =
            self.nodes.iter().cloned().partition(|n| named(n));
        let left = left
            .into_iter()
            .map(|n| {
                let why = ProtocolError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "node {} was not in the network when this query was planned, so its groups by site \
                         do not include it: plan the query again to include it",
                        n.name
                    ),
                )
                .with_retryable(false);
                (n.name, why)
            })
            .collect();
        (asked, left)
    }

    /// Asks `nodes` to give back the budget they hold for a checked task
    /// that will not run (best effort: a lease also ends when its task
    /// expires, and a node that is not asked checks every budget again if
    /// the task ever runs).
    async fn release_leases(&self, nodes: &[NodeHandle], body: &[u8]) {
        let timeout = self.config.node_timeout().min(Duration::from_secs(5));
        release_leases_at(nodes, body, timeout).await;
    }

    /// Runs a planned statement and returns its result.
    #[instrument(skip_all, fields(user = %user.name))]
    pub async fn execute(
        &self,
        handle: &[u8],
        user: &User,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), ProtocolError> {
        let prepared = self.lookup(handle, user)?;
        let policy = fanout::RetryPolicy {
            timeout: self.config.node_timeout(),
            retries: self.config.coordinator.retries,
        };
        match prepared.as_ref() {
            Prepared::Ready(batch) => Ok((batch.schema(), vec![batch.clone()])),
            Prepared::Budget { envelope } => {
                let reports = fanout::all(&self.nodes, |n| async move {
                    n.run_with_retries(envelope, policy).await
                })
                .await?;
                let batch =
                    crate::budget::combine(&reports, self.config.coordinator.max_sites_per_person)?;
                self.audit(&user.name, None, "show_budget", "ok", String::new());
                Ok((batch.schema(), vec![batch]))
            }
            Prepared::Public {
                envelope,
                schema,
                study,
            } => {
                let results = fanout::each(&self.nodes, |n| async move {
                    n.run_with_retries(envelope, policy).await
                })
                .await;
                let mut batches = Vec::new();
                let mut missing = Vec::new();
                let mut failures = Vec::new();
                for (name, r) in results {
                    match r.and_then(|p| with_site(schema, &name, &p.batch)) {
                        Ok(b) => batches.push(b),
                        Err(e) => {
                            warn!(node = %name, "node left out of the public answer: {}", e.message);
                            missing.push(name);
                            failures.push(e);
                        }
                    }
                }
                if batches.is_empty() {
                    let err = fanout::joined(failures);
                    self.audit(
                        &user.name,
                        Some(study),
                        "public_query",
                        "failed",
                        err.message.clone(),
                    );
                    return Err(err);
                }
                let batch = arrow::compute::concat_batches(schema, &batches)
                    .map_err(|e| ProtocolError::internal(e.to_string()))?;
                let batch = with_missing_sites(batch, &missing)?;
                self.audit(
                    &user.name,
                    Some(study),
                    "public_query",
                    "ok",
                    format!("{} rows from {} sites", batch.num_rows(), batches.len()),
                );
                Ok((batch.schema(), vec![batch]))
            }
            Prepared::Query {
                plan,
                envelope,
                task_id,
                study,
                user: asked_by,
                min_sites,
                statement_hash,
                bound,
            } => {
                let started = Instant::now();
                if plan.public_keys_only() {
                    // The groups of public domains: nothing to ask a node,
                    // nothing spent.
                    let combined = combine(plan, &[], *task_id).map_err(ProtocolError::from)?;
                    let (schema, batches) = confer_query::engine::post_process(plan, combined)
                        .await
                        .map_err(ProtocolError::from)?;
                    self.audit(
                        asked_by,
                        Some(study),
                        "query",
                        "ok",
                        format!("task {task_id}; keys of public domains only, no node asked, nothing spent"),
                    );
                    return Ok((schema, batches));
                }
                let mut partials = Vec::new();
                let (asked, planned_without) = self.planned_sites(plan);
                let (ready, mut missing, mut failures) = match self
                    .precheck(&asked, envelope, *min_sites, policy)
                    .await
                {
                    Ok(mut checked) => {
                        checked
                            .1
                            .extend(planned_without.iter().map(|(n, _)| n.clone()));
                        checked
                            .2
                            .extend(planned_without.into_iter().map(|(_, e)| e));
                        checked
                    }
                    Err(e) => {
                        self.audit(asked_by, Some(study), "query", "refused", e.message.clone());
                        return Err(e);
                    }
                };
                let mut selected: Option<FederatedPlan> = None;
                // Bound once: a second DoGet of this statement (a client's
                // retry) sends the very same task, so a node that already
                // released it answers from its ledger at no charge, and a
                // node left out the first time stays out.
                let envelope = &match bound.get() {
                    Some(e) => e.clone(),
                    None => {
                        let e = self.bound_to(envelope, &ready)?;
                        bound.get_or_init(|| e).clone()
                    }
                };
                if plan.options.aggregation == confer_query::options::Aggregation::Secure {
                    let outcome = crate::secure::run(
                        &ready,
                        plan,
                        envelope,
                        |t| self.identity.sign(t),
                        *min_sites,
                        policy.timeout,
                    )
                    .await;
                    match outcome {
                        Ok((o, released)) => {
                            missing.extend(o.dropped.iter().map(|(n, _)| n.clone()));
                            missing.sort();
                            missing.dedup();
                            partials.extend(o.partial);
                            selected = released;
                        }
                        Err(e) => {
                            self.audit(asked_by, Some(study), "query", "failed", e.message.clone());
                            return Err(e);
                        }
                    }
                } else {
                    let results = fanout::each(&ready, |n| async move {
                        n.run_with_retries(envelope, policy).await
                    })
                    .await;
                    for (name, r) in results {
                        match r.and_then(|p| {
                            confer_query::combine::check(plan, &p).map_err(|e| {
                                ProtocolError::new(
                                    ErrorKind::Internal,
                                    format!("node {name} sent a release that does not fit the query, set aside: {e}"),
                                )
                            })?;
                            Ok(p)
                        }) {
                            Ok(p) => partials.push(p),
                            Err(e) => {
                                warn!(node = %name, "node left out of the answer: {}", e.message);
                                missing.push(name);
                                failures.push(e);
                            }
                        }
                    }
                    if partials.len() < *min_sites {
                        // Nodes that took no charge give back what they hold.
                        if let Ok(body) = envelope.to_bytes() {
                            let ready = ready.clone();
                            let timeout = policy.timeout.min(Duration::from_secs(5));
                            tokio::spawn(
                                async move { release_leases_at(&ready, &body, timeout).await },
                            );
                        }
                        let mut err = fanout::joined(failures);
                        err.message = format!(
                            "only {} of {} sites answered and this query needs {} (min_sites); missing {}: {}",
                            partials.len(),
                            self.nodes.len(),
                            min_sites,
                            missing.join(", "),
                            err.message
                        );
                        self.audit(
                            asked_by,
                            Some(study),
                            "query",
                            "failed",
                            err.message.clone(),
                        );
                        return Err(err);
                    }
                }
                // Under secure partition selection the release is the
                // query over the keys found.
                let plan = selected.as_ref().unwrap_or(plan);
                let combined = combine(plan, &partials, *task_id).map_err(ProtocolError::from)?;
                let combined = with_missing_sites(combined, &missing)?;
                let ipc = encode_ipc(&combined)?;
                let (schema, batches) = confer_query::engine::post_process(plan, combined)
                    .await
                    .map_err(ProtocolError::from)?;
                let mut sites: Vec<String> = partials.iter().map(|p| p.site.clone()).collect();
                sites.sort();
                if let Err(e) = self.store.record_result(&ResultRecord {
                    query_id: task_id.to_string(),
                    study: study.clone(),
                    user: asked_by.clone(),
                    statement_hash: statement_hash.clone(),
                    sites: sites.clone(),
                    result: ipc,
                }) {
                    warn!("cannot store the result: {e}");
                }
                self.audit(
                    asked_by,
                    Some(study),
                    "query",
                    "ok",
                    format!(
                        "task {task_id}; sites {}{}",
                        sites.join(","),
                        if missing.is_empty() {
                            String::new()
                        } else {
                            format!("; missing {}", missing.join(","))
                        }
                    ),
                );
                info!(
                    task = %task_id,
                    sites = partials.len(),
                    missing = missing.len(),
                    millis = started.elapsed().as_millis() as u64,
                    "query answered"
                );
                Ok((schema, batches))
            }
        }
    }

    /// Checks every node's health once and records it.
    pub async fn check_health(&self) {
        let timeout = Duration::from_secs(5);
        let store = &self.store;
        let results = fanout::each(&self.nodes, |n| async move {
            // An anchor that cannot be read now (the store busy) is not
            // "no anchor": the node is then not judged this time.
            let anchor = store.anchor(&n.name);
            if let Err(e) = &anchor {
                warn!(node = %n.name, "cannot read the node's audit anchor: {e}");
            }
            let started = Instant::now();
            let seq = anchor.as_ref().ok().and_then(|a| a.as_ref().map(|a| a.0));
            n.health(timeout, seq)
                .await
                .map(|h| (h, started.elapsed(), anchor.ok()))
        })
        .await;
        for (handle, (name, r)) in self.nodes.iter().zip(results) {
            let previous = self.health.read().ok().and_then(|m| m.get(&name).cloned());
            let r = r.map(|(h, rtt, anchor)| {
                let held = match anchor {
                    Some(anchor) => self.judge_anchor(handle, anchor.as_ref(), h.audit.as_ref()),
                    None => handle.held(),
                };
                (h, rtt, held)
            });
            let status = match r {
                Ok((h, rtt, Some(held))) => NodeStatus {
                    name: name.clone(),
                    url: handle.url.clone(),
                    healthy: false,
                    checked_ms: now_ms(),
                    last_seen_ms: Some(now_ms()),
                    latency_ms: Some(rtt.as_secs_f64() * 1000.0),
                    version: Some(h.version),
                    error: Some(held),
                },
                Ok((h, rtt, None)) => NodeStatus {
                    name: name.clone(),
                    url: handle.url.clone(),
                    healthy: true,
                    checked_ms: now_ms(),
                    last_seen_ms: Some(now_ms()),
                    latency_ms: Some(rtt.as_secs_f64() * 1000.0),
                    version: Some(h.version),
                    error: None,
                },
                Err(e) => NodeStatus {
                    name: name.clone(),
                    url: handle.url.clone(),
                    healthy: false,
                    checked_ms: now_ms(),
                    last_seen_ms: previous.as_ref().and_then(|p| p.last_seen_ms),
                    latency_ms: None,
                    version: previous.and_then(|p| p.version),
                    error: Some(e.message),
                },
            };
            if let Err(e) = self.store.set_node_status(&status) {
                warn!("cannot record node status: {e}");
            }
            if let Ok(mut m) = self.health.write() {
                m.insert(name, status);
            }
        }
    }

    /// Why `node` is held now, if its audit chain is shorter than `anchor`,
    /// its anchor as read before the check was sent (a health check may
    /// move it on meanwhile); the node is then held as at a health check.
    fn chain_cut_back(
        &self,
        node: &NodeHandle,
        anchor: Option<&(i64, String)>,
        head: Option<&confer_protocol::catalog::AuditHead>,
    ) -> Option<String> {
        let (head, anchor) = (head?, anchor?);
        if head.seq >= anchor.0 {
            return None;
        }
        self.judge_anchor(node, Some(anchor), Some(head))
    }

    /// Moves `node`'s anchor along its audit chain, or holds the node out
    /// of every task when its chain does not extend the anchor (see
    /// [`crate::anchor`]); changes of state are audited. Returns why the
    /// node is held, if it is.
    fn judge_anchor(
        &self,
        node: &NodeHandle,
        anchor: Option<&(i64, String)>,
        head: Option<&confer_protocol::catalog::AuditHead>,
    ) -> Option<String> {
        let was_held = node.held();
        match crate::anchor::judge(anchor, head) {
            crate::anchor::Verdict::Extend { seq, hash } => {
                if let Err(e) = self.store.set_anchor(&node.name, seq, &hash) {
                    warn!(node = %node.name, "cannot record the node's audit anchor: {e}");
                }
                if was_held.is_some() {
                    node.hold(None);
                    if let Err(e) = self.store.set_hold(&node.name, None) {
                        warn!(node = %node.name, "cannot record that the node is used again: {e}");
                    }
                    info!(node = %node.name, "the node's audit chain extends its anchor again: used again");
                    self.audit(
                        "coordinator",
                        None,
                        "node_ledger",
                        "restored",
                        format!(
                            "node {}: its audit chain extends its anchor again (record {seq})",
                            node.name
                        ),
                    );
                }
                None
            }
            crate::anchor::Verdict::Hold(why) => {
                let message = crate::anchor::held_message(&node.name, &why);
                if was_held.as_deref() != Some(message.as_str()) {
                    warn!(node = %node.name, "{message}");
                    self.audit("coordinator", None, "node_ledger", "held", message.clone());
                }
                node.hold(Some(message.clone()));
                if let Err(e) = self.store.set_hold(&node.name, Some(&message)) {
                    warn!(node = %node.name, "cannot record that the node is held: {e}");
                }
                Some(message)
            }
            crate::anchor::Verdict::Unknown => was_held,
        }
    }

    /// The node registry with the latest health checks.
    pub fn node_statuses(&self) -> Vec<NodeStatus> {
        let map = self.health.read().map(|m| m.clone()).unwrap_or_default();
        self.nodes
            .iter()
            .map(|n| {
                map.get(&n.name).cloned().unwrap_or(NodeStatus {
                    name: n.name.clone(),
                    url: n.url.clone(),
                    healthy: false,
                    checked_ms: 0,
                    last_seen_ms: None,
                    latency_ms: None,
                    version: None,
                    error: Some("not checked yet".into()),
                })
            })
            .collect()
    }
}

pub(crate) fn study_info(study: &Study) -> StudyInfo {
    StudyInfo {
        title: study.title.clone(),
        principal_investigator: study.principal_investigator.clone(),
        ethics_ref: study.ethics_ref.clone(),
        requested_epsilon: study.requested_epsilon,
        requested_delta: study.requested_delta,
    }
}

/// Asks `nodes` to give back the budget they hold for the task in `body`
/// (best effort, each under `timeout`).
async fn release_leases_at(nodes: &[NodeHandle], body: &[u8], timeout: Duration) {
    let answers = fanout::each(nodes, |n| {
        let body = body.to_vec();
        async move {
            n.action_json::<serde_json::Value>(
                actions::QUERY_RELEASE,
                body,
                "budget release",
                timeout,
            )
            .await
        }
    })
    .await;
    for (name, answer) in answers {
        if let Err(e) = answer {
            warn!(node = %name, "budget held for a query that will not run there stays held until its task expires: {}", e.message);
        }
    }
}

/// Refuses reading a table outside the study's list (an empty list allows all).
fn study_reads(study: &Study, tables: &[String]) -> Result<(), ProtocolError> {
    if !study.tables.is_empty()
        && let Some(t) = tables
            .iter()
            .find(|t| !study.tables.iter().any(|s| s.eq_ignore_ascii_case(t)))
    {
        return Err(ProtocolError::new(
            ErrorKind::PermissionDenied,
            format!(
                "study {} does not include table {t} (its tables: {}): ask an admin to extend the study",
                study.name,
                study.tables.join(", ")
            ),
        ));
    }
    Ok(())
}

/// A node's public answer with the `site` column first, cast to `schema`
/// (a node whose columns do not fit is set aside, named).
fn with_site(
    schema: &SchemaRef,
    site: &str,
    batch: &RecordBatch,
) -> Result<RecordBatch, ProtocolError> {
    let unfit = |why: String| {
        ProtocolError::new(
            ErrorKind::Internal,
            format!(
                "node {site} sent a public answer that does not fit the query, set aside: {why}"
            ),
        )
    };
    if batch.num_columns() + 1 != schema.fields().len() {
        return Err(unfit(format!(
            "{} columns where {} were expected",
            batch.num_columns(),
            schema.fields().len() - 1
        )));
    }
    let mut columns: Vec<arrow::array::ArrayRef> =
        vec![Arc::new(StringArray::from(vec![site; batch.num_rows()]))];
    for (column, field) in batch.columns().iter().zip(schema.fields().iter().skip(1)) {
        columns.push(
            arrow::compute::cast(column, field.data_type()).map_err(|e| unfit(e.to_string()))?,
        );
    }
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| unfit(e.to_string()))
}

fn with_missing_sites(
    batch: RecordBatch,
    missing: &[String],
) -> Result<RecordBatch, ProtocolError> {
    if missing.is_empty() {
        return Ok(batch);
    }
    let schema = batch.schema();
    let mut meta = schema.metadata().clone();
    meta.insert(metadata::MISSING_SITES.to_string(), missing.join(","));
    let schema = Arc::new(schema.as_ref().clone().with_metadata(meta));
    RecordBatch::try_new(schema, batch.columns().to_vec())
        .map_err(|e| ProtocolError::internal(e.to_string()))
}

fn encode_ipc(batch: &RecordBatch) -> Result<Vec<u8>, ProtocolError> {
    let mut buf = Vec::new();
    let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut buf, &batch.schema())
        .map_err(|e| ProtocolError::internal(e.to_string()))?;
    w.write(batch)
        .map_err(|e| ProtocolError::internal(e.to_string()))?;
    w.finish()
        .map_err(|e| ProtocolError::internal(e.to_string()))?;
    Ok(buf)
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
        .map(|g| match &g.domain {
            Some(d) => format!("{} (public domain of {} values)", g.name, d.len()),
            None => format!("{} (private keys: partition selection)", g.name),
        })
        .collect();
    rows.push((
        "groups".into(),
        if groups.is_empty() {
            "none (one global group)".into()
        } else {
            groups.join(", ")
        },
    ));
    if let Some(sel) = &plan.selection
        && o.aggregation == confer_query::options::Aggregation::Secure
    {
        rows.push((
            "partition selection".into(),
            format!(
                "secure, over the network's combined counts: the keys are found level by level from \
                 securely summed noisy person counts (rho {:.6} of the cost, level 1 over key classes \
                 spends {:.0}% of it); a candidate is kept when its summed noisy count reaches the \
                 threshold a trusted curator's {} selection would use at that level's noise; no delta \
                 is spent on selection",
                plan.cost.per_partial,
                confer_query::secure_select::FIRST_LEVEL_SHARE * 100.0,
                sel.mechanism.name(),
            ),
        ));
    } else if let Some(sel) = &plan.selection {
        rows.push((
            "partition selection".into(),
            format!(
                "{} noise, scale {:.4}: a group is released when its noisy person count is at least {} \
                 (delta {:e} set aside)",
                sel.mechanism.name(),
                sel.scale,
                sel.threshold,
                sel.delta
            ),
        ));
    }
    let z = confer_query::combine::interval_multiplier(o);
    let secure = o.aggregation == confer_query::options::Aggregation::Secure;
    let min_survivors = crate::secure::min_survivors(
        sites,
        o.min_sites
            .unwrap_or(crate::secure::default_min_sites(sites))
            .min(sites),
    )
    .min(sites.max(2));
    let secure_sd = if secure {
        // Under secure partition selection the spread is that of the
        // release over the keys found (it hardly depends on how many).
        let released = if plan.public_groups() {
            plan.clone()
        } else {
            confer_query::secure_select::with_selected_keys(plan, &[0])
                .map_err(ProtocolError::from)?
        };
        Some(
            confer_query::secure::summed_noise_stddev(&released, min_survivors)
                .map_err(ProtocolError::from)?,
        )
    } else {
        None
    };
    let per_site_groups = plan.groups.iter().any(|g| g.is_site);
    for agg in &plan.aggregates {
        for &p in &agg.partials {
            let spec = &plan.partials[p];
            let part = spec
                .columns
                .first()
                .map(|c| c.rsplit('_').next().unwrap_or(c))
                .unwrap_or("");
            let head = format!(
                "{} [{part}]: per-group bound {}, sensitivity L1 {} / L2 {:.4}",
                agg.expr, spec.per_group_bound, spec.l1, spec.l2
            );
            let text = if let Some(sds) = &secure_sd {
                let sd = sds[p];
                format!(
                    "{head}; distributed discrete Gaussian over a secure sum: standard deviation {sd:.4} with \
                     {min_survivors} contributing node(s), up to {:.4} if all {sites} contribute; {:.0}% interval \
                     +/- {:.4} at {min_survivors}",
                    sd * (sites as f64 / min_survivors as f64).sqrt(),
                    o.confidence * 100.0,
                    z * sd
                )
            } else {
                let noise = plan.noise(p).map_err(ProtocolError::from)?;
                let node_sd = if spec.integer {
                    noise.stddev()
                } else {
                    noise.stddev_f64()
                };
                let spread = if per_site_groups {
                    "per group from its one site".to_string()
                } else if !plan.public_groups() {
                    format!(
                        "per group summed over the sites that released it, at most {:.4} over {sites}",
                        node_sd * (sites as f64).sqrt()
                    )
                } else {
                    format!(
                        "{:.4} over {sites} node(s)",
                        node_sd * (sites as f64).sqrt()
                    )
                };
                let network_sd = if per_site_groups {
                    node_sd
                } else {
                    node_sd * (sites as f64).sqrt()
                };
                format!(
                    "{head}, noise scale {:.4} per node (standard deviation {node_sd:.4}); standard deviation \
                     {spread}; {:.0}% interval +/- {:.4}{}",
                    noise.scale,
                    o.confidence * 100.0,
                    z * network_sd,
                    if !per_site_groups && !plan.public_groups() {
                        " at most"
                    } else {
                        ""
                    }
                )
            };
            rows.push((format!("aggregate {}", agg.name), text));
        }
    }
    rows.push(("local bounded query".into(), plan.local_sql.clone()));
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

/// What a client sends to create a study.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NewStudy {
    /// Short name.
    pub name: String,
    /// Title.
    pub title: String,
    /// Principal investigator (user name).
    pub principal_investigator: String,
    /// Members.
    #[serde(default)]
    pub members: Vec<String>,
    /// Tables (empty: any).
    #[serde(default)]
    pub tables: Vec<String>,
    /// Requested epsilon per node.
    pub requested_epsilon: f64,
    /// Requested delta per node.
    pub requested_delta: f64,
    /// Ethics approval reference.
    pub ethics_ref: String,
    /// Fewest sites that must answer.
    #[serde(default)]
    pub min_sites: Option<usize>,
}

/// A change to a study ([`custom::STUDY_EDIT`]). What every node's
/// steward approved (the ethics reference, the requested budget, the
/// tables) is not editable: such a change is a new study, which the
/// stewards approve anew.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyEdit {
    /// The study.
    pub name: String,
    /// A new title.
    #[serde(default)]
    pub title: Option<String>,
    /// A new principal investigator (a user).
    #[serde(default)]
    pub principal_investigator: Option<String>,
    /// Users to add as members.
    #[serde(default)]
    pub add_members: Vec<String>,
    /// Members to remove.
    #[serde(default)]
    pub remove_members: Vec<String>,
    /// A new min_sites; `Some(None)` (JSON `null`) goes back to the
    /// default (every site).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub min_sites: Option<Option<usize>>,
}

/// A field that is present, even as `null`, is `Some`.
fn present<'de, D: serde::Deserializer<'de>, T: serde::Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    serde::Deserialize::deserialize(d).map(Some)
}

impl CoordinatorService {
    /// Applies a [`StudyEdit`]; returns the study and the changes in words.
    fn edit_study(&self, body: &[u8]) -> Result<(Study, String), ProtocolError> {
        let edit: StudyEdit = serde_json::from_slice(body).map_err(|e| {
            ProtocolError::invalid(format!(
                "the study change is not valid JSON: {e} (it takes name, title, principal_investigator, \
                 add_members, remove_members and min_sites; the ethics reference, requested budget and \
                 tables that stewards approved cannot change: create a new study for those)"
            ))
        })?;
        let store = &self.state.store;
        let mut study = store
            .study(&edit.name)
            .map_err(ProtocolError::from)?
            .ok_or_else(|| {
                ProtocolError::new(
                    ErrorKind::NotFound,
                    format!(
                        "study {} does not exist: `confer study list` shows the studies",
                        edit.name
                    ),
                )
            })?;
        let is_user = |name: &str| -> Result<bool, ProtocolError> {
            Ok(store
                .user_by_name(name)
                .map_err(ProtocolError::from)?
                .is_some_and(|u| u.revoked_ms.is_none()))
        };
        let mut changes = Vec::new();
        if let Some(title) = edit.title {
            if title.trim().is_empty() {
                return Err(ProtocolError::invalid("a study's title cannot be empty"));
            }
            changes.push(format!("title {:?} -> {:?}", study.title, title));
            study.title = title;
        }
        if let Some(pi) = edit.principal_investigator {
            if !is_user(&pi)? {
                return Err(ProtocolError::invalid(format!(
                    "{pi} is not an active user: add users before naming them in a study"
                )));
            }
            changes.push(format!(
                "principal investigator {} -> {pi}",
                study.principal_investigator
            ));
            study.principal_investigator = pi;
        }
        for member in &edit.add_members {
            if !is_user(member)? {
                return Err(ProtocolError::invalid(format!(
                    "{member} is not an active user: add users before naming them in a study"
                )));
            }
            if !study.members.contains(member) {
                study.members.push(member.clone());
                changes.push(format!("member {member} added"));
            }
        }
        for member in &edit.remove_members {
            let before = study.members.len();
            study.members.retain(|m| m != member);
            if study.members.len() == before {
                return Err(ProtocolError::invalid(format!(
                    "{member} is not a member of study {}: its members are {}",
                    study.name,
                    study.members.join(", ")
                )));
            }
            changes.push(format!("member {member} removed"));
        }
        if let Some(min_sites) = edit.min_sites {
            if min_sites == Some(0) {
                return Err(ProtocolError::invalid("min_sites must be at least 1"));
            }
            changes.push(format!(
                "min_sites {} -> {}",
                study
                    .min_sites
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "all".into()),
                min_sites
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "all".into())
            ));
            study.min_sites = min_sites;
        }
        if changes.is_empty() {
            return Err(ProtocolError::invalid(
                "nothing to change: give a title, principal investigator, members to add or remove, or min_sites",
            ));
        }
        store.update_study(&study).map_err(ProtocolError::from)?;
        Ok((study, changes.join("; ")))
    }

    fn create_study(&self, user: &User, body: &[u8]) -> Result<Study, ProtocolError> {
        let new: NewStudy = serde_json::from_slice(body).map_err(|e| {
            ProtocolError::invalid(format!("the study description is not valid JSON: {e}"))
        })?;
        if new.name.is_empty()
            || !new
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ProtocolError::invalid(format!(
                "study name {:?}: use letters, digits, '_' and '-'",
                new.name
            )));
        }
        let epsilon_ok = new.requested_epsilon > 0.0 && new.requested_epsilon.is_finite();
        if !epsilon_ok || !(0.0..1.0).contains(&new.requested_delta) {
            return Err(ProtocolError::invalid(
                "the requested budget needs epsilon > 0 and 0 <= delta < 1",
            ));
        }
        if new.ethics_ref.trim().is_empty() {
            return Err(ProtocolError::invalid(
                "a study needs its ethics approval reference (--ethics-ref)",
            ));
        }
        for person in std::iter::once(&new.principal_investigator).chain(&new.members) {
            if self
                .state
                .store
                .user_by_name(person)
                .map_err(ProtocolError::from)?
                .is_none()
            {
                return Err(ProtocolError::invalid(format!(
                    "{person} is not a user: add users before naming them in a study"
                )));
            }
        }
        let study = Study {
            name: new.name,
            title: new.title,
            principal_investigator: new.principal_investigator,
            members: new.members,
            tables: new.tables.iter().map(|t| t.to_ascii_lowercase()).collect(),
            requested_epsilon: new.requested_epsilon,
            requested_delta: new.requested_delta,
            ethics_ref: new.ethics_ref,
            min_sites: new.min_sites,
            created_ms: now_ms(),
            created_by: user.name.clone(),
        };
        self.state
            .store
            .create_study(&study)
            .map_err(ProtocolError::from)?;
        Ok(study)
    }
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
