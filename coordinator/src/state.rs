//! The coordinator's shared state: configuration, signing key, nodes, the
//! network catalog cache, planned statements, the store and the audit log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow_flight::sql::SqlInfo;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use confer_protocol::catalog::CatalogInfo;
use confer_protocol::signing::Identity;
use confer_protocol::task::{Envelope, StudyInfo, Task};
use confer_protocol::{ErrorKind, ProtocolError};
use confer_query::{Catalog, FederatedPlan};
use tracing::warn;
use uuid::Uuid;

use crate::auth::Authenticator;
use crate::config::CoordinatorConfig;
use crate::fanout::{self, NodeHandle};
use crate::store::{CoordinatorAudit, NodeStatus, Store, Study, User, now_ms};

/// How long a fetched network catalog is reused.
pub(crate) const CATALOG_TTL: Duration = Duration::from_secs(30);
/// How long a planned statement waits for its DoGet.
pub(crate) const STATEMENT_TTL: Duration = Duration::from_secs(3600);

/// Most statements one user may have planned and not yet fetched; past it
/// the oldest is forgotten.
pub const MAX_STATEMENTS_PER_USER: usize = 64;

/// A statement planned by GetFlightInfo, waiting for DoGet.
pub(crate) enum Prepared {
    /// A DP query: the plan, the signed task, and who asked.
    Query {
        plan: Box<FederatedPlan>,
        envelope: Envelope,
        task_id: Uuid,
        study: String,
        user: String,
        min_sites: usize,
        statement_hash: String,
        /// The statement itself, kept with the result for its author's
        /// query history.
        statement: String,
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
pub(crate) struct CatalogCache {
    pub(crate) merged: Option<(Instant, Arc<Catalog>)>,
    pub(crate) nodes: HashMap<String, CatalogInfo>,
}

pub(crate) struct Entry {
    pub(crate) prepared: Arc<Prepared>,
    pub(crate) created: Instant,
    /// A statement that carries a signed task lives as long as the task.
    pub(crate) ttl: Duration,
    pub(crate) user: String,
}

/// Shared state of the coordinator.
pub struct CoordinatorState {
    pub(crate) config: CoordinatorConfig,
    pub(crate) identity: Identity,
    pub(crate) nodes: Vec<NodeHandle>,
    pub(crate) catalog: Mutex<CatalogCache>,
    pub(crate) statements: Mutex<HashMap<Uuid, Entry>>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) auth: Authenticator,
    pub(crate) health: RwLock<HashMap<String, NodeStatus>>,
    pub(crate) sql_info: SqlInfoData,
    pub(crate) training: crate::train::Training,
    /// Supervision statistics, when `[supervision]` is configured.
    pub(crate) supervision: Option<Arc<crate::supervision::Supervision>>,
}

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
        let supervision = config
            .supervision
            .clone()
            .map(crate::supervision::Supervision::load)
            .transpose()?
            .map(Arc::new);
        Ok(Self {
            supervision,
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

    /// The studies `user` may work under (an admin: all), by name.
    pub(crate) fn studies_of(&self, user: &User) -> Result<Vec<Study>, ProtocolError> {
        Ok(self
            .store
            .studies()
            .map_err(ProtocolError::from)?
            .into_iter()
            .filter(|s| s.admits(user))
            .collect())
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
    pub(crate) fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// `envelope`'s task, signed again for `nodes` only: the nodes a query
    /// runs at, so that a captured task cannot be replayed to another.
    pub(crate) fn bound_to(
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
        let gathered = fanout::gather(&self.nodes, "the catalog", |n| async move {
            n.catalog(timeout).await
        })
        .await;
        let mut cache = lock()?;
        let mut infos = Vec::new();
        let mut failures = Vec::new();
        for (name, info) in gathered.ok {
            cache.nodes.insert(name, info.clone());
            infos.push(info);
        }
        for (name, e) in gathered.missing.into_iter().zip(gathered.failures) {
            // A node that does not answer now keeps its last catalog.
            match cache.nodes.get(&name) {
                Some(last) => infos.push(last.clone()),
                None => failures.push(e),
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

    pub(crate) fn store_statement(
        &self,
        prepared: Prepared,
        user: &User,
    ) -> Result<Uuid, ProtocolError> {
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

    pub(crate) fn lookup(
        &self,
        handle: &[u8],
        user: &User,
    ) -> Result<Arc<Prepared>, ProtocolError> {
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

    pub(crate) fn task_ttl(&self) -> Duration {
        Duration::from_secs(self.config.coordinator.task_ttl_secs)
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
