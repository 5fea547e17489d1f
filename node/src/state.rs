//! What every request at a node shares: its name, tables, catalog,
//! ledger, the policy in force (reloaded when its file changes) and the
//! coordinator's key.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime};

use confer_protocol::catalog::CatalogInfo;
use confer_protocol::signing::{PublicKey, sha256_hex};
use confer_query::{Catalog, FederatedPlan};
use datafusion::prelude::SessionContext;
use tracing::{info, warn};
use uuid::Uuid;

use crate::config::NodeConfig;
use crate::error::{NodeError, Result};
use crate::ledger::{AuditEntry, Ledger};
use crate::policy::Policy;

/// The policy in force and the config file it came from.
pub(crate) struct PolicyState {
    policy: Policy,
    modified: Option<SystemTime>,
}

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
    /// The org units whose records this node holds (`[supervision]`).
    pub supervision: confer_protocol::supervision::SupervisionUnits,
    /// Plans compiled at a query's check, kept for its run.
    pub plans: CheckedPlans,
    /// The files of each table checked at start to hold one row per
    /// person, as they were then (see [`NodeState::verified_one_row`]).
    pub one_row_files: std::collections::BTreeMap<String, crate::catalog::FileStamps>,
    /// The privacy ledger and audit log.
    pub ledger: Arc<Ledger>,
    /// When the node started.
    pub started: Instant,
    /// Secure-aggregation identity and sessions.
    pub secure: crate::secure::SecureSessions,
    /// Training jobs prepared here.
    pub train: crate::train::TrainJobs,
    /// Tasks running now (see [`crate::gate::Slot`]).
    pub(crate) running: Arc<std::sync::atomic::AtomicUsize>,
    /// Refusals of requests without a verified task, audited in summary.
    pub unverified: crate::gate::Unverified,
    /// This node's TLS files: its certificate and key prove its
    /// secure-aggregation identity to peers, and the CA checks theirs.
    pub(crate) tls: Option<confer_transport::TlsFiles>,
    coordinator: PublicKey,
    policy: RwLock<PolicyState>,
    config_path: Option<PathBuf>,
    /// The tables as configured (for [`NodeState::verified_one_row`]).
    config_tables: std::collections::BTreeMap<String, crate::config::TableConfig>,
}

impl NodeState {
    /// Loads the config's tables (validating them) and opens its ledger.
    pub async fn open(config: &NodeConfig) -> Result<Self> {
        let ctx = confer_query::bounding::context();
        // The files as they are before the start-up checks read them: a
        // table is trusted to hold one row per person only if its files
        // are the same after the checks (not rewritten while they ran).
        let before = crate::catalog::config_stamps(config);
        let catalog = crate::catalog::load(config, &ctx).await?;
        let unique = crate::catalog::unique_public_columns(&ctx, &catalog).await?;
        if let Some(section) = &config.supervision {
            crate::catalog::check_supervision(&ctx, &catalog, section).await?;
        }
        let ledger = Arc::new(Ledger::open(&config.node.state_dir)?);
        ledger.bind_node(&config.node.name)?;
        // A node never serves on a ledger that fails its own check: an
        // edited, truncated or replaced ledger could refund budget.
        let check = ledger.verify()?;
        if let Some(problem) = check.problem {
            return Err(NodeError::Config(format!(
                "the ledger in {} fails its check after {} good audit records: {problem}. The node \
                 does not start on a ledger that may have been reset or edited: restore node.state_dir \
                 from a backup (`confer audit verify --config ...` checks it)",
                config.node.state_dir.display(),
                check.records
            )));
        }
        let one_row_files = crate::catalog::one_row_stamps(config, &catalog)
            .into_iter()
            .filter(|(name, stamps)| before.get(name) == Some(stamps))
            .collect();
        let mut state = Self::new(config, ctx, catalog, ledger)?;
        state.one_row_files = one_row_files;
        for (table, column) in unique {
            state.query_catalog.set_unique(&table, &column);
        }
        Ok(state)
    }

    /// The tables whose one row per person the node checked at start on
    /// files that are still the same (see [`crate::catalog::FileStamps`]):
    /// a query reading only these need not enforce it again. A table whose
    /// files changed is left out (the query enforces it) until the node
    /// restarts and checks them again.
    pub fn verified_one_row(&self) -> std::collections::BTreeSet<String> {
        self.one_row_files
            .keys()
            .filter(|t| self.files_unchanged(t))
            .cloned()
            .collect()
    }

    /// Whether a plan that trusted one row per person may still do so:
    /// every table it reads has its files as checked at start. Asked
    /// before a plan runs and again after (the files could change while
    /// it read them).
    pub fn one_row_still_verified(&self, plan: &FederatedPlan) -> bool {
        !plan.one_row_trusted || plan.tables.iter().all(|t| self.files_unchanged(t))
    }

    /// Whether `table` was checked at start to hold one row per person and
    /// its files are unchanged since.
    fn files_unchanged(&self, table: &str) -> bool {
        let Some(stamps) = self.one_row_files.get(table) else {
            return false;
        };
        let now = self
            .config_tables
            .get(table)
            .and_then(crate::catalog::FileStamps::of);
        if now.as_ref() == Some(stamps) {
            return true;
        }
        tracing::warn!(
            table = %table,
            "the table's files changed since the node started: each query enforces one row per \
             person again (restart the node to check the new files)"
        );
        false
    }

    /// State for a loaded config.
    pub fn new(
        config: &NodeConfig,
        ctx: SessionContext,
        catalog: CatalogInfo,
        ledger: Arc<Ledger>,
    ) -> Result<Self> {
        let coordinator = config.coordinator_key()?;
        let policy = Policy::from_config(&config.policy)?;
        let modified = config
            .source
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .and_then(|m| m.modified().ok());
        Ok(Self {
            name: config.node.name.clone(),
            query_catalog: Catalog::for_node(&catalog),
            supervision: confer_protocol::supervision::SupervisionUnits {
                node: config.node.name.clone(),
                units: config
                    .supervision
                    .as_ref()
                    .map(|s| s.units.clone())
                    .unwrap_or_default(),
            },
            catalog,
            ctx,
            ledger,
            started: Instant::now(),
            secure: crate::secure::SecureSessions::open(&config.node.state_dir)?,
            train: crate::train::TrainJobs::default(),
            plans: CheckedPlans::default(),
            one_row_files: Default::default(),
            running: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            unverified: crate::gate::Unverified::default(),
            tls: config.tls.clone(),
            coordinator,
            policy: RwLock::new(PolicyState { policy, modified }),
            config_path: config.source.clone(),
            config_tables: config.tables.clone(),
        })
    }

    /// This node's proof of its secure-aggregation identity key: its
    /// certificate and a signature by its TLS key (none without TLS).
    pub fn identity_proof(&self) -> Option<confer_protocol::task::IdentityProof> {
        let files = self.tls.as_ref()?;
        match confer_transport::identity::bind(files, &self.name, &self.secure.identity()) {
            Ok(p) => Some(p),
            Err(e) => {
                warn!("cannot prove this node's secure-aggregation identity: {e}");
                None
            }
        }
    }

    /// The coordinator's public key, which signs every task.
    pub fn coordinator(&self) -> &PublicKey {
        &self.coordinator
    }

    /// The policy in force, re-read from node.toml if the file changed. A
    /// file that no longer parses keeps the previous policy (and says so in
    /// the log and the audit log).
    pub fn policy(&self) -> Result<Policy> {
        let modified = self
            .config_path
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .and_then(|m| m.modified().ok());
        {
            let state = self
                .policy
                .read()
                .map_err(|_| NodeError::Internal("policy lock poisoned".into()))?;
            if modified.is_none() || modified == state.modified {
                return Ok(state.policy.clone());
            }
        }
        let mut state = self
            .policy
            .write()
            .map_err(|_| NodeError::Internal("policy lock poisoned".into()))?;
        if modified != state.modified {
            state.modified = modified;
            let path = self
                .config_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let reloaded = self
                .config_path
                .as_ref()
                .ok_or_else(|| NodeError::Config("no config file".into()))
                .and_then(|p| NodeConfig::load(p))
                .and_then(|c| Policy::from_config(&c.policy));
            let (decision, reason) = match reloaded {
                Ok(policy) if policy == state.policy => return Ok(state.policy.clone()),
                Ok(policy) => {
                    info!(file = %path, "policy reloaded");
                    state.policy = policy;
                    ("recorded", format!("policy reloaded from {path}"))
                }
                Err(e) => {
                    warn!(file = %path, "policy reload failed, keeping the previous policy: {e}");
                    (
                        "refused",
                        format!("policy reload failed, previous policy kept: {e}"),
                    )
                }
            };
            self.ledger.audit(&AuditEntry {
                actor: Some("steward".into()),
                kind: "policy".into(),
                decision: decision.into(),
                reason: Some(reason),
                ..Default::default()
            })?;
        }
        Ok(state.policy.clone())
    }
}

/// Plans a node compiled when it checked a query task, kept until the task
/// runs, is released, or expires (at most [`CheckedPlans::KEEP_SECS`]), so
/// that each task is compiled once. Keyed by the signed task's id and the
/// hash of its SQL. A kept plan skips compilation and the check of the
/// local query against this node's tables: both depend only on the SQL,
/// the node's catalog and its DataFusion session, which are fixed when the
/// node starts (`NodeState::open`; a catalog reload must clear this
/// cache). Every rule of the policy is applied again when the task runs.
#[derive(Default)]
pub struct CheckedPlans(std::sync::Mutex<HashMap<Uuid, CheckedPlan>>);

struct CheckedPlan {
    sql_hash: String,
    plan: Arc<FederatedPlan>,
    expires_at: u64,
}

impl CheckedPlans {
    /// Most plans kept: past it, those expiring first make room.
    pub const MAX: usize = 1024;

    /// Longest a plan is kept (seconds), whatever its task's expiry: a
    /// query runs within seconds of its check.
    pub const KEEP_SECS: u64 = 600;

    /// Keeps the plan of a checked task's `sql` until `expires_at` (unix
    /// seconds), at most [`Self::KEEP_SECS`].
    pub fn put(&self, task_id: Uuid, sql: &str, plan: Arc<FederatedPlan>, expires_at: u64) {
        let sql_hash = sha256_hex(sql.as_bytes());
        let Ok(mut plans) = self.0.lock() else { return };
        let now = confer_protocol::task::unix_now();
        let expires_at = expires_at.min(now.saturating_add(Self::KEEP_SECS));
        plans.remove(&task_id);
        plans.retain(|_, p| p.expires_at >= now);
        while plans.len() >= Self::MAX {
            let Some(first) = plans
                .iter()
                .min_by_key(|(_, p)| p.expires_at)
                .map(|(id, _)| *id)
            else {
                break;
            };
            plans.remove(&first);
        }
        plans.insert(
            task_id,
            CheckedPlan {
                sql_hash,
                plan,
                expires_at,
            },
        );
    }

    /// The plan kept for this task and SQL, if any (taken: a task runs once).
    pub fn take(&self, task_id: Uuid, sql: &str) -> Option<Arc<FederatedPlan>> {
        let mut plans = self.0.lock().ok()?;
        match plans.remove(&task_id) {
            Some(p) if p.sql_hash == sha256_hex(sql.as_bytes()) => Some(p.plan),
            _ => None,
        }
    }

    /// Drops the plan kept for a task, if any (its query will not run).
    pub fn forget(&self, task_id: Uuid) {
        if let Ok(mut plans) = self.0.lock() {
            plans.remove(&task_id);
        }
    }

    /// How many plans are kept.
    pub fn len(&self) -> usize {
        self.0.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confer_protocol::catalog::{ColumnInfo, ColumnType, TableInfo};

    async fn plan() -> Arc<FederatedPlan> {
        let catalog = Catalog::for_node(&CatalogInfo {
            node: "site-a".into(),
            tables: vec![TableInfo {
                name: "person".into(),
                privacy_unit: Some("person_id".into()),
                columns: vec![ColumnInfo {
                    name: "person_id".into(),
                    column_type: ColumnType::Int64,
                    bounds: None,
                    domain: None,
                    unique: false,
                }],
                one_row_per_unit: true,
            }],
        });
        let confer_query::Statement::Query(q) = confer_query::parse(
            "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6) COUNT(*) FROM person",
        )
        .expect("parses") else {
            panic!("a query")
        };
        Arc::new(
            confer_query::compile(&q, &catalog, Some("site-a"))
                .await
                .expect("compiles"),
        )
    }

    #[tokio::test]
    async fn a_checked_plan_is_reused_once_for_the_same_task_and_sql_only() {
        let plans = CheckedPlans::default();
        let far = confer_protocol::task::unix_now() + 600;
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        plans.put(a, "sql-1", plan().await, far);
        plans.put(b, "sql-2", plan().await, far);
        assert!(
            plans.take(a, "sql-other").is_none(),
            "another SQL under the same id"
        );
        assert!(
            plans.take(a, "sql-1").is_none(),
            "a mismatch drops the plan"
        );
        assert!(plans.take(b, "sql-2").is_some());
        assert!(plans.take(b, "sql-2").is_none(), "taken once");
        assert!(plans.is_empty());
        // Released: forgotten. Checked twice: kept once.
        plans.put(a, "sql-1", plan().await, far);
        plans.put(a, "sql-1", plan().await, far);
        assert_eq!(plans.len(), 1);
        plans.forget(a);
        assert!(plans.take(a, "sql-1").is_none());
    }

    #[tokio::test]
    async fn expired_plans_go_and_the_cache_stays_bounded() {
        let plans = CheckedPlans::default();
        let p = plan().await;
        plans.put(Uuid::new_v4(), "old", p.clone(), 1);
        let now = confer_protocol::task::unix_now();
        for i in 0..CheckedPlans::MAX + 10 {
            plans.put(Uuid::new_v4(), "sql", p.clone(), now + 600 + i as u64);
        }
        assert_eq!(plans.len(), CheckedPlans::MAX);
    }
}
