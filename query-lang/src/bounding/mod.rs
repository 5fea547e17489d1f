//! Contribution bounding at the speed of a scan: what a session needs to
//! run the local bounded query fast.
//!
//! * [`hash`]: `confer_hash(salt, ...)`, a keyed integer hash of a row's
//!   values, by which each person's groups (and, for the sensitivity
//!   auditor, rows) are ordered; it replaces `md5` over concatenated text.
//! * [`rank`]: `row_number`, `rank` and `dense_rank` over small partitions
//!   computed by hashing rows into their partition instead of sorting the
//!   whole input.
//!
//! Every session that plans or runs a local bounded query is made by
//! [`context`] (or [`context_with_config`]): the compiler's catalog-only
//! session, the node's, the tests'.

pub mod hash;
pub mod rank;

use std::sync::Arc;

use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};

/// A session with confer's bounding functions and operator.
pub fn context() -> SessionContext {
    context_with_config(SessionConfig::new())
}

/// [`context`] with a configuration (partitions, batch size).
pub fn context_with_config(config: SessionConfig) -> SessionContext {
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_default_features()
        .with_query_planner(Arc::new(rank::Planner))
        .build();
    let ctx = SessionContext::new_with_state(state);
    ctx.register_udf(hash::udf());
    ctx
}
