//! Wire types shared by the confer coordinator, its nodes and clients.
//!
//! Everything that crosses a process boundary is defined here, so that the
//! coordinator, the node and the command-line client agree on one vocabulary:
//!
//! ```text
//!  client ──Flight SQL──▶ coordinator ──Flight DoGet(Ticket = Envelope<Task>)──▶ node
//!                                     ◀──── Arrow batch of noisy partials ──────
//!                                     ──Flight DoAction("confer.catalog")──────▶ node
//!                                     ◀──── CatalogInfo (JSON) ────────────────
//! ```
//!
//! * [`task`]: the work a coordinator asks a node to do ([`task::Task`]), in a
//!   signable [`task::Envelope`].
//! * [`catalog`]: what a node publishes about its tables: schema, privacy
//!   unit, public group domains and value bounds, never rows or counts.
//! * [`release`]: the metadata a node attaches to the partials it releases
//!   (noise scales, cost), which the coordinator needs to combine them.
//! * [`error`]: an error type that knows its gRPC code and whether a retry
//!   can help, with the mapping to and from [`tonic::Status`].
//!
//! Control messages are JSON (so Python clients can speak them); data is
//! Arrow IPC inside Flight.

pub mod catalog;
pub mod coordinator;
pub mod error;
pub mod release;
pub mod signing;
pub mod supervision;
pub mod task;
pub mod train;

pub use error::{ErrorKind, ProtocolError, Reason};

/// One Flight action a service serves: its name, what it does, its
/// request and its answer. The service's `list_actions`, its
/// unknown-action error and its clients are made from one table of these
/// ([`NODE_ACTIONS`], [`coordinator::ACTIONS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActionSpec {
    /// Its name (`Action.type`).
    pub name: &'static str,
    /// What it does, for `list_actions`.
    pub doc: &'static str,
    /// Its body.
    pub request: &'static str,
    /// Its answer (JSON).
    pub response: &'static str,
    /// Who may call it.
    pub access: Access,
}

/// Who may call an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The coordinator, over mutual TLS, with tasks it signed (a node's
    /// actions; the node checks each task itself).
    Coordinator,
    /// Any signed-in user, about what they may see (their studies, the
    /// catalog, their jobs).
    Member,
    /// Any signed-in user: the nodes' status.
    NodeStatus,
    /// Administrators: create and edit studies.
    ManageStudies,
    /// Administrators: users.
    ManageUsers,
    /// The roles that train models: start and stop jobs.
    Train,
    /// Commission analysts and administrators: release supervision
    /// statistics (spends the supervision study's budget).
    Supervise,
}

/// The names in a table of actions, for error messages.
pub fn names_of(table: &[ActionSpec]) -> String {
    table.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
}

/// Every action a node serves, in the order its `list_actions` gives them.
pub const NODE_ACTIONS: &[ActionSpec] = &[
    ActionSpec {
        name: actions::CATALOG,
        doc: "the node's public catalog (JSON)",
        request: "empty",
        response: "CatalogInfo",
        access: Access::Coordinator,
    },
    ActionSpec {
        name: actions::HEALTH,
        doc: "liveness and basic facts (JSON)",
        request: "HealthRequest or empty",
        response: "Health",
        access: Access::Coordinator,
    },
    ActionSpec {
        name: actions::QUERY_CHECK,
        doc: "checks a signed DP query task without running or charging it, and holds its budget",
        request: "Envelope (query task)",
        response: "QueryCheck",
        access: Access::Coordinator,
    },
    ActionSpec {
        name: actions::QUERY_RELEASE,
        doc: "gives up the budget a checked query task holds",
        request: "Envelope (query task)",
        response: "{\"released\": bool}",
        access: Access::Coordinator,
    },
    ActionSpec {
        name: actions::SECAGG_IDENTITY,
        doc: "this node's secure-aggregation identity key",
        request: "empty",
        response: "SecaggIdentity",
        access: Access::Coordinator,
    },
    ActionSpec {
        name: actions::SECAGG_ROUND,
        doc: "one round of a secure-aggregation session",
        request: "SecaggRound",
        response: "SecaggRound",
        access: Access::Coordinator,
    },
    ActionSpec {
        name: actions::TRAIN_PREPARE,
        doc: "checks a signed training job, nothing charged",
        request: "Envelope (TrainTask)",
        response: "TrainReady",
        access: Access::Coordinator,
    },
    ActionSpec {
        name: actions::TRAIN_COMMIT,
        doc: "charges a prepared training job once",
        request: "Envelope (TrainTask)",
        response: "TrainCommitted",
        access: Access::Coordinator,
    },
    ActionSpec {
        name: actions::TRAIN_START,
        doc: "round 0 of a training secure sum",
        request: "SecaggRound (payload TrainRequest)",
        response: "SecaggRound",
        access: Access::Coordinator,
    },
    ActionSpec {
        name: actions::TRAIN_EVALUATE,
        doc: "a DP evaluation of a training job's model",
        request: "TrainRequest",
        response: "TrainEvaluation",
        access: Access::Coordinator,
    },
    ActionSpec {
        name: actions::SUPERVISION_UNITS,
        doc: "the org units whose records this node holds, with their care_site_ids (JSON)",
        request: "empty",
        response: "SupervisionUnits",
        access: Access::Coordinator,
    },
];

/// Names of the Flight actions a node serves.
pub mod actions {
    /// Returns the node's [`crate::catalog::CatalogInfo`] as JSON.
    pub const CATALOG: &str = "confer.catalog";
    /// Returns the node's [`crate::catalog::Health`] as JSON.
    pub const HEALTH: &str = "confer.health";
    /// Returns the node's secure-aggregation identity key (Ed25519, hex).
    pub const SECAGG_IDENTITY: &str = "confer.secagg.identity";
    /// One round of a secure-aggregation session: body and answer are JSON
    /// [`crate::task::SecaggRound`]s.
    pub const SECAGG_ROUND: &str = "confer.secagg.round";
    /// Checks a DP query without running it or charging: body a signed
    /// [`crate::task::Envelope`] of a query task, answer
    /// [`crate::task::QueryCheck`]. The coordinator asks every node before
    /// any node runs the query, so a refusal of the query itself (per-query
    /// cap, budget, a table the study may not read) anywhere stops it before
    /// anyone spends budget; a node that does not take part (study not
    /// approved, table not published there) answers with an error and is
    /// left out.
    pub const QUERY_CHECK: &str = "confer.query.check";
    /// Gives up the budget a query task holds since it passed its check at
    /// this node (the query will not run: it was refused elsewhere). Body:
    /// the same signed [`crate::task::Envelope`]; answer `{"released": bool}`.
    /// A lease also ends when the task runs or expires.
    pub const QUERY_RELEASE: &str = "confer.query.release";
    /// Checks a training job without charging: body a signed
    /// [`crate::task::Envelope`] of a [`crate::train::TrainTask`], answer
    /// [`crate::train::TrainReady`].
    pub const TRAIN_PREPARE: &str = "confer.train.prepare";
    /// Charges a prepared job's whole cost: same body, answer
    /// [`crate::train::TrainCommitted`].
    pub const TRAIN_COMMIT: &str = "confer.train.commit";
    /// Round 0 of a training secure sum: a [`crate::task::SecaggRound`]
    /// whose payload is a [`crate::train::TrainRequest`].
    pub const TRAIN_START: &str = "confer.train.start";
    /// An evaluation release: body [`crate::train::TrainRequest`], answer
    /// [`crate::train::TrainEvaluation`].
    pub const TRAIN_EVALUATE: &str = "confer.train.evaluate";
    /// Returns the node's [`crate::supervision::SupervisionUnits`] as JSON:
    /// the org units of the region's tree whose records it holds.
    pub const SUPERVISION_UNITS: &str = "confer.supervision.units";
}

/// Arrow schema-metadata keys used on released results.
pub mod metadata {
    /// On a node's partial batch: the [`crate::release::ReleaseInfo`] as JSON.
    pub const RELEASE: &str = "confer.release";
    /// On a coordinator result: the [`crate::release::ResultInfo`] as JSON.
    pub const RESULT: &str = "confer.result";
    /// On a DP value column: the standard deviation of its noise.
    pub const NOISE_STDDEV: &str = "confer.noise_stddev";
    /// On a DP value column: the mechanism that produced it.
    pub const MECHANISM: &str = "confer.mechanism";
    /// On a DP value column: the confidence level of its interval columns.
    pub const CONFIDENCE: &str = "confer.confidence";
    /// On a DP value column: the names of its interval columns.
    pub const INTERVAL: &str = "confer.interval";
    /// On a post-processed DP value whose interval is not derived: why
    /// (its interval columns are then NULL).
    pub const INTERVAL_NOTE: &str = "confer.interval_note";
    /// On a coordinator result: sites that did not answer (comma-separated).
    pub const MISSING_SITES: &str = "confer.missing_sites";
    /// On an `EXPLAIN PRIVACY` answer (item, value rows): `"true"`.
    pub const EXPLAIN: &str = "confer.explain";
}
