//! The work a coordinator sends to a node, and the envelope it travels in.
//!
//! A task names *what* to compute (the DP query exactly as the researcher
//! wrote it), never *how*: the node compiles the query itself with its own
//! catalog and derives sensitivity, noise and cost itself, so a dishonest
//! coordinator cannot make a node release an unbounded plan.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{ProtocolError, Result};

/// Study used when a client names none.
pub const DEFAULT_STUDY: &str = "default";

/// A unit of work for one or more nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Unique id. A node never charges the same task id twice.
    pub id: Uuid,
    /// The study the work runs under; its budget pays.
    pub study: String,
    /// The person who asked.
    pub researcher: String,
    /// When the coordinator issued the task, seconds since the Unix epoch.
    pub issued_at: u64,
    /// After this (seconds since the Unix epoch) a node refuses the task.
    pub expires_at: u64,
    /// What to do.
    pub kind: TaskKind,
    /// What the coordinator knows of the study (for the node's steward).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub study_info: Option<StudyInfo>,
    /// The nodes the task is for. A node refuses a task that does not name
    /// it, so a captured task cannot be replayed to a node the coordinator
    /// did not ask.
    #[serde(default)]
    pub nodes: Vec<String>,
}

/// A study as the coordinator describes it to nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyInfo {
    /// Title.
    pub title: String,
    /// Principal investigator.
    pub principal_investigator: String,
    /// Ethics approval reference.
    pub ethics_ref: String,
    /// Budget the study requests at each node: epsilon.
    pub requested_epsilon: f64,
    /// Budget the study requests at each node: delta.
    pub requested_delta: f64,
}

/// The kinds of task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TaskKind {
    /// Run a DP SQL query and release noisy partial aggregates.
    Query(QueryTask),
    /// Report the privacy budget of a study at the node (spends nothing).
    Budget(BudgetTask),
    /// Run a DP SQL query with `aggregation = 'secure'`: the node's noisy
    /// input joins a secure-aggregation session and only the network's sum
    /// is revealed.
    SecureQuery(SecureQueryTask),
    /// Run a plain SQL query that reads only public tables (no DP clause,
    /// nothing charged); the node checks that against its own catalog.
    PublicQuery(QueryTask),
    /// A federated training job: prepared, then committed (charged once).
    Train(crate::train::TrainTask),
    /// One round of a training job.
    TrainRound(crate::train::TrainRoundTask),
}

/// A node's answer to [`crate::actions::QUERY_CHECK`]: whether the query
/// would be admitted now, and at what cost (the binding check is repeated
/// when the query runs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryCheck {
    /// The node that checked.
    pub node: String,
    /// The query's cost at this node, zCDP rho.
    pub rho: f64,
    /// The same cost as (epsilon, delta).
    pub epsilon: f64,
    /// See `epsilon`.
    pub delta: f64,
    /// Why this node would refuse this query (its cost is over the node's
    /// per-query cap or the study's budget, it reads a table the study may
    /// not, it does not compile here), with what to change; `None` when it
    /// would run. A node that does not take part in the study at all
    /// answers the check with an error instead.
    #[serde(default)]
    pub refused: Option<ProtocolError>,
    /// The head of the node's audit chain now: a chain shorter than the
    /// one the coordinator anchored means the ledger was reset or cut back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<crate::catalog::AuditHead>,
}

/// One message of a secure-aggregation session, either way. Round 0 carries
/// the signed [`Envelope`] of a [`SecureQueryTask`] to the node and its
/// advertised keys back; rounds 1 to 4 carry the protocol messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecaggRound {
    /// The task id (sessions are keyed by it).
    pub task_id: Uuid,
    /// 0 to 4.
    pub round: u8,
    /// The round's message (JSON of the secagg message type).
    pub payload: serde_json::Value,
}

/// A node's answer to the secure-aggregation identity action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecaggIdentity {
    /// The node's secure-aggregation identity key (Ed25519, hex).
    pub key: String,
    /// The node's small-cell threshold (`policy.min_group_size`). A node
    /// cannot see the secure sum, so the coordinator suppresses summed
    /// groups whose noisy count is below the largest threshold among the
    /// contributors.
    pub min_group_size: u64,
    /// Proof that `key` is this node's: its certificate from the network CA
    /// and a signature over the key by the certificate's key (nodes without
    /// TLS have none; their peers must pin their keys).
    #[serde(default)]
    pub proof: Option<IdentityProof>,
    /// How many of a session's other members this node assumes may collude
    /// with the coordinator (`policy.secure.max_corrupt_peers`): it adds
    /// noise for `min_survivors - max_corrupt_peers` honest survivors, and
    /// the coordinator needs the figure to report the sum's spread.
    #[serde(default)]
    pub max_corrupt_peers: usize,
}

/// A node's proof that a secure-aggregation identity key is its own (see
/// `confer_transport::identity`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityProof {
    /// The node's certificate (PEM), issued by the network CA.
    pub cert_pem: String,
    /// ECDSA P-256 / SHA-256 signature (hex) by the certificate's key.
    pub signature: String,
}

/// A query whose partials are securely aggregated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecureQueryTask {
    /// The statement, as the researcher wrote it.
    pub sql: String,
    /// The session's public parameters (`confer_privacy::secagg::Config`, JSON).
    pub session: serde_json::Value,
    /// Member node names; a node's index here is its id in the session.
    pub members: Vec<String>,
    /// The members' secure-aggregation identity keys (Ed25519, hex), by id.
    pub identities: Vec<String>,
    /// Each member's proof of its key, by id (none where it has no TLS).
    #[serde(default)]
    pub proofs: Vec<Option<IdentityProof>>,
    /// Each member's `max_corrupt_peers`, by id (how much noise it adds).
    #[serde(default)]
    pub corrupt_peers: Vec<usize>,
    /// For a query whose group key is private: which step of secure
    /// partition selection this session is (`None` for a query whose keys
    /// all have public domains).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<SecureStep>,
}

/// One secure-aggregation session of a query with a private group key:
/// first the key values are found level by level from securely summed,
/// noisy person counts (each level a public list of candidates, so each
/// level is a plain Gaussian release), then the aggregates are released
/// over the keys found, which are public by then.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum SecureStep {
    /// Count persons per candidate prefix of the private key.
    Select(SelectStep),
    /// Release the query's aggregates over these keys.
    Release {
        /// The selected key values, ascending.
        keys: Vec<i64>,
    },
}

/// One level of secure partition selection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelectStep {
    /// 1 for the first level.
    pub level: u32,
    /// zCDP rho this level spends at each node.
    pub rho: f64,
    /// The prefixes whose children are counted; empty at the first level,
    /// whose candidates are the key classes (sign and bit length).
    pub parents: Vec<KeyPrefix>,
    /// Bits each parent is extended by (at most to its full length).
    pub width: u32,
}

/// The leading bits of whole-number keys: a key's class is its sign and
/// bit length (`class` = bit length, negated for negative keys; 0 for the
/// key 0), and `value` holds the first `depth` bits after the leading one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyPrefix {
    /// Sign and bit length of the keys.
    pub class: i8,
    /// Bits of `value`.
    pub depth: u8,
    /// The bits.
    pub value: u64,
}

/// A request for a study's budget figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetTask {
    /// The study to report.
    pub study: String,
}

/// A DP SQL query to release partials for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryTask {
    /// The statement, in the confer DP dialect, as the researcher wrote it.
    pub sql: String,
}

impl Task {
    /// A new query task with a fresh id, valid for `ttl`.
    pub fn query(study: &str, researcher: &str, sql: &str, ttl: Duration) -> Self {
        let kind = TaskKind::Query(QueryTask {
            sql: sql.to_string(),
        });
        Self::new(study, researcher, kind, ttl)
    }

    /// A new task of `kind` with a fresh id, valid for `ttl`.
    pub fn new(study: &str, researcher: &str, kind: TaskKind, ttl: Duration) -> Self {
        let now = unix_now();
        Self {
            id: Uuid::new_v4(),
            study: study.to_string(),
            researcher: researcher.to_string(),
            issued_at: now,
            expires_at: now.saturating_add(ttl.as_secs().max(1)),
            kind,
            study_info: None,
            nodes: Vec::new(),
        }
    }

    /// The same task, for `nodes` only.
    pub fn for_nodes<S: AsRef<str>>(mut self, nodes: impl IntoIterator<Item = S>) -> Self {
        self.nodes = nodes.into_iter().map(|n| n.as_ref().to_string()).collect();
        self
    }

    /// Whether the task names `node` among the nodes it is for.
    pub fn is_for(&self, node: &str) -> bool {
        self.nodes.iter().any(|n| n == node)
    }

    /// A new budget report task with a fresh id, valid for `ttl`.
    pub fn budget(study: &str, researcher: &str, ttl: Duration) -> Self {
        let kind = TaskKind::Budget(BudgetTask {
            study: study.to_string(),
        });
        Self::new(study, researcher, kind, ttl)
    }

    /// A short name of the task's kind, for audit records.
    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            TaskKind::Query(_) => "query",
            TaskKind::Budget(_) => "budget",
            TaskKind::SecureQuery(_) => "secure_query",
            TaskKind::PublicQuery(_) => "public_query",
            TaskKind::Train(_) => "train",
            TaskKind::TrainRound(r) => match r.phase {
                crate::train::TrainPhase::Moments => "train_moments",
                crate::train::TrainPhase::Update => "train_update",
                crate::train::TrainPhase::Evaluate => "train_evaluate",
            },
        }
    }

    /// Whether the task has expired at `now` (seconds since the epoch).
    pub fn is_expired_at(&self, now: u64) -> bool {
        now > self.expires_at
    }
}

/// A task as it travels: the exact JSON bytes that are (or will be) signed,
/// with the signature beside them. Keeping the payload as a string means the
/// verifier checks the bytes the signer signed, not a re-serialisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// JSON of a [`Task`].
    pub payload: String,
    /// Signature over `payload`, hex, when the sender signs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl Envelope {
    /// Wraps a task (unsigned).
    pub fn new(task: &Task) -> Result<Self> {
        let payload = serde_json::to_string(task)
            .map_err(|e| ProtocolError::internal(format!("cannot encode task: {e}")))?;
        Ok(Self {
            payload,
            signature: None,
        })
    }

    /// The envelope as the bytes of a Flight ticket.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self)
            .map_err(|e| ProtocolError::internal(format!("cannot encode envelope: {e}")))
    }

    /// Reads an envelope from ticket bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| {
            ProtocolError::invalid(format!("the ticket is not a confer task envelope: {e}"))
        })
    }

    /// The task inside (not verified).
    pub fn task(&self) -> Result<Task> {
        serde_json::from_str(&self.payload)
            .map_err(|e| ProtocolError::invalid(format!("the envelope holds no valid task: {e}")))
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips() {
        let task = Task::query("s", "r", "SELECT 1", Duration::from_secs(60));
        let env = Envelope::new(&task).expect("encode");
        let back = Envelope::from_bytes(&env.to_bytes().expect("bytes")).expect("decode");
        assert_eq!(back.task().expect("task"), task);
        assert!(!task.is_expired_at(task.issued_at + 60));
        assert!(task.is_expired_at(task.issued_at + 61));
    }

    #[test]
    fn garbage_tickets_are_refused_clearly() {
        let err = Envelope::from_bytes(b"\x00garbage").expect_err("must fail");
        assert!(err.message.contains("not a confer task envelope"));
    }
}
