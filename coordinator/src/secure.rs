//! The coordinator's side of `aggregation = 'secure'`: one secure-aggregation
//! session over the nodes, one Flight action per round, each round under the
//! node deadline. A node that misses a round (error, refusal or deadline)
//! is a dropout; the protocol recovers as long as enough nodes remain, and
//! the coordinator learns only the sum.

use std::collections::BTreeMap;
use std::time::Duration;

use confer_privacy::secagg::{Aggregate, Config, Server, VerifyingKey};
use confer_protocol::task::{
    Envelope, SecaggIdentity, SecaggRound, SecureQueryTask, SecureStep, Task, TaskKind,
};
use confer_protocol::{ErrorKind, ProtocolError, actions};
use confer_query::FederatedPlan;
use confer_query::combine::SitePartial;
use confer_query::secure_select::Selector;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::fanout::NodeHandle;

/// The outcome: one release standing for the contributors, and who dropped.
pub struct SecureOutcome {
    /// The decoded sum as a release (`None` when there was nothing to
    /// release beyond the keys secure partition selection found).
    pub partial: Option<SitePartial>,
    /// Nodes that contributed.
    pub contributors: Vec<String>,
    /// Nodes that did not (with the reason).
    pub dropped: Vec<(String, String)>,
}

pub use confer_query::secure::{default_min_sites, min_survivors};

fn err(message: String) -> ProtocolError {
    ProtocolError::new(ErrorKind::FailedPrecondition, message).with_retryable(false)
}

/// Runs a secure query across `nodes`: one session when every group key
/// has a public domain; otherwise secure partition selection, level by
/// level, then the release over the keys found (see
/// [`confer_query::secure_select`]). Returns the outcome and, under secure
/// partition selection, the plan the release was made for (the query over
/// the keys found).
pub async fn run(
    nodes: &[NodeHandle],
    plan: &FederatedPlan,
    envelope: &Envelope,
    sign: impl Fn(&Task) -> Result<Envelope, ProtocolError>,
    min_sites: usize,
    timeout: Duration,
) -> Result<(SecureOutcome, Option<FederatedPlan>), ProtocolError> {
    let task: Task = serde_json::from_str(&envelope.payload)
        .map_err(|e| ProtocolError::internal(format!("stored task unreadable: {e}")))?;
    if plan.public_groups() {
        let session = session(nodes, &task, None, plan, &sign, min_sites, timeout).await?;
        let partial = release(plan, &session, task.id)?;
        return Ok((partial, None));
    }
    let mut selector = Selector::new(plan).map_err(ProtocolError::from)?;
    let mut dropped: Vec<(String, String)> = Vec::new();
    while let Some(step) = selector.next_step() {
        let mut level_task = task.clone();
        level_task.id = uuid::Uuid::new_v4();
        let s = session(
            nodes,
            &level_task,
            Some(SecureStep::Select(step.clone())),
            plan,
            &sign,
            min_sites,
            timeout,
        )
        .await
        .map_err(|mut e| {
            e.message = format!(
                "secure partition selection, level {}: {}",
                step.level, e.message
            );
            e
        })?;
        dropped.extend(s.dropped.iter().cloned());
        let sigma = confer_query::secure_select::level_sum_sigma(plan, &step, &s.honest)
            .map_err(ProtocolError::from)?;
        let sum: Vec<i64> = s.sum.iter().map(|&v| v as i64).collect();
        selector
            .absorb(&step, &sum, sigma)
            .map_err(ProtocolError::from)?;
        info!(task = %task.id, level = step.level, "secure partition selection level done");
    }
    let keys = selector.keys();
    if selector.dropped_keys() > 0 || selector.truncated > 0 {
        warn!(task = %task.id, keys = selector.dropped_keys(), prefixes = selector.truncated, "secure partition selection left out keys or prefixes past its caps; those with the largest counts were kept");
    }
    let selected = confer_query::secure_select::with_selected_keys(plan, &keys)
        .map_err(ProtocolError::from)?;
    if keys.is_empty() || selected.partials.is_empty() {
        // Nothing to release beyond the keys themselves.
        dropped.sort();
        dropped.dedup();
        return Ok((
            SecureOutcome {
                partial: None,
                contributors: Vec::new(),
                dropped,
            },
            Some(selected),
        ));
    }
    let s = session(
        nodes,
        &task,
        Some(SecureStep::Release { keys }),
        &selected,
        &sign,
        min_sites,
        timeout,
    )
    .await?;
    let mut outcome = release(&selected, &s, task.id)?;
    dropped.extend(outcome.dropped);
    dropped.sort();
    dropped.dedup();
    outcome.dropped = dropped;
    Ok((outcome, Some(selected)))
}

/// What one secure session gave.
struct Session {
    sum: Vec<u64>,
    contributors: Vec<String>,
    dropped: Vec<(String, String)>,
    /// Per contributor, the honest survivors its noise share counts on.
    honest: Vec<usize>,
    /// The strictest small-cell rule among the contributors.
    min_group_size: u64,
}

/// Decodes a release session into the outcome.
fn release(
    plan: &FederatedPlan,
    s: &Session,
    task_id: uuid::Uuid,
) -> Result<SecureOutcome, ProtocolError> {
    let label = format!("secure sum of {}", s.contributors.join("+"));
    let batch =
        confer_query::secure::decode(plan, &s.sum, &s.honest, s.min_group_size, &label, task_id)
            .map_err(ProtocolError::from)?;
    info!(task = %task_id, contributors = s.contributors.len(), dropped = s.dropped.len(), "secure sum decoded");
    Ok(SecureOutcome {
        partial: Some(SitePartial { site: label, batch }),
        contributors: s.contributors.clone(),
        dropped: s.dropped.clone(),
    })
}

/// One secure-aggregation session of `task` (a query task) at `step`.
async fn session(
    nodes: &[NodeHandle],
    task: &Task,
    step: Option<SecureStep>,
    plan: &FederatedPlan,
    sign: &impl Fn(&Task) -> Result<Envelope, ProtocolError>,
    min_sites: usize,
    timeout: Duration,
) -> Result<Session, ProtocolError> {
    let mut task = task.clone();
    let sql = match &task.kind {
        TaskKind::Query(q) => q.sql.clone(),
        _ => return Err(ProtocolError::internal("a secure query needs a query task")),
    };
    let len = match &step {
        Some(SecureStep::Select(level)) => confer_query::secure_select::level_len(level),
        _ => confer_query::secure::vector_len(plan),
    }
    .map_err(ProtocolError::from)?;
    let mut dropped: Vec<(String, String)> = Vec::new();

    // Identities of the nodes that answer now.
    let answers = futures::future::join_all(nodes.iter().map(|n| async move {
        let r = n
            .action_json::<SecaggIdentity>(
                actions::SECAGG_IDENTITY,
                Vec::new(),
                "secure-aggregation identity key",
                timeout,
            )
            .await;
        (n, r)
    }))
    .await;
    let mut members: Vec<&NodeHandle> = Vec::new();
    let mut identities = Vec::new();
    let mut thresholds = Vec::new();
    let mut proofs = Vec::new();
    let mut corrupt_peers = Vec::new();
    for (n, r) in answers {
        match r {
            Ok(id) => {
                members.push(n);
                identities.push(id.key);
                thresholds.push(id.min_group_size);
                proofs.push(id.proof);
                corrupt_peers.push(id.max_corrupt_peers);
            }
            Err(e) => dropped.push((n.name.clone(), e.message)),
        }
    }
    let need = min_sites.max(2);
    if members.len() < need {
        return Err(err(format!(
            "secure aggregation needs at least {need} nodes and only {} answered (missing: {})",
            members.len(),
            names(&dropped)
        )));
    }
    let keys = parse_keys(&identities)?;
    let session = session_id()?;
    let config = Config::new(members.len(), confer_query::secure::BITS, len, session)
        .and_then(|c| c.min_survivors(min_survivors(members.len(), min_sites)))
        .map_err(|e| err(format!("secure aggregation: {e}")))?;
    task.nodes = members.iter().map(|n| n.name.clone()).collect();
    task.kind = TaskKind::SecureQuery(SecureQueryTask {
        sql,
        session: serde_json::to_value(&config)
            .map_err(|e| ProtocolError::internal(e.to_string()))?,
        members: members.iter().map(|n| n.name.clone()).collect(),
        identities,
        proofs,
        corrupt_peers: corrupt_peers.clone(),
        step,
    });
    let signed = sign(&task)?;
    let task_id = task.id;
    let outcome = secure_sum(
        &members,
        keys,
        &config,
        task_id,
        actions::SECAGG_ROUND,
        &serde_json::to_value(&signed).map_err(|e| ProtocolError::internal(e.to_string()))?,
        timeout,
    )
    .await;
    let aggregate = match outcome {
        Ok(o) => {
            dropped.extend(o.dropped);
            o.aggregate
        }
        Err((e, more)) => {
            dropped.extend(more);
            return Err(err(format!("{}; dropped: {}", e.message, names(&dropped))));
        }
    };
    let contributors: Vec<String> = aggregate
        .contributors
        .iter()
        .map(|&id| members[id as usize].name.clone())
        .collect();
    if contributors.len() < min_sites {
        return Err(err(format!(
            "only {} nodes contributed to the secure sum and this query needs {min_sites} (min_sites); missing: {}",
            contributors.len(),
            names(&dropped)
        )));
    }
    // The strictest small-cell rule among the contributors applies to the sum.
    let min_group_size = aggregate
        .contributors
        .iter()
        .map(|&id| thresholds[id as usize])
        .max()
        .unwrap_or(0);
    // Each contributor sized its noise share for the honest survivors it
    // counts on: the threshold less the peers it assumes corrupt.
    let honest: Vec<usize> = aggregate
        .contributors
        .iter()
        .map(|&id| {
            config
                .min_survivors
                .saturating_sub(corrupt_peers[id as usize])
                .max(1)
        })
        .collect();
    Ok(Session {
        sum: aggregate.sum,
        contributors,
        dropped,
        honest,
        min_group_size,
    })
}

/// Parses nodes' identity keys (hex).
pub fn parse_keys(identities: &[String]) -> Result<Vec<VerifyingKey>, ProtocolError> {
    identities
        .iter()
        .map(|h| {
            hex::decode(h)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .and_then(|b| VerifyingKey::from_bytes(&b).ok())
                .ok_or_else(|| {
                    ProtocolError::internal(format!("a node sent a bad identity key {h}"))
                })
        })
        .collect()
}

/// A fresh session id from the operating system.
pub fn session_id() -> Result<[u8; 32], ProtocolError> {
    let mut session = [0u8; 32];
    getrandom::fill(&mut session)
        .map_err(|e| ProtocolError::internal(format!("the OS random source failed: {e}")))?;
    Ok(session)
}

/// What a secure sum gave: the sum, who dropped out, and how long the
/// rounds took.
pub struct SumOutcome {
    /// The sum and its contributors (session ids).
    pub aggregate: Aggregate,
    /// Members that dropped out, with the reason.
    pub dropped: Vec<(String, String)>,
    /// Seconds of round 0 (the nodes compute their inputs then).
    pub round0_secs: f64,
    /// Seconds of rounds 1 to 4 and unmasking.
    pub rest_secs: f64,
}

/// Runs one secure-aggregation session over `members` (session id = index)
/// with their identity `keys`: round 0 sends `round0` to each through
/// `start_action`, rounds 1 to 4 go through the secure-aggregation action.
/// On failure returns the error and the dropouts so far.
pub async fn secure_sum(
    members: &[&NodeHandle],
    keys: Vec<VerifyingKey>,
    config: &Config,
    task_id: uuid::Uuid,
    start_action: &str,
    round0: &serde_json::Value,
    timeout: Duration,
) -> Result<SumOutcome, (ProtocolError, Vec<(String, String)>)> {
    let mut dropped: Vec<(String, String)> = Vec::new();
    let started = std::time::Instant::now();
    let mut server = match Server::new(config.clone(), keys.into()) {
        Ok(s) => s,
        Err(e) => return Err((err(format!("secure aggregation: {e}")), dropped)),
    };
    let fail = |round: u8, e: confer_privacy::secagg::SecAggError| {
        err(format!("secure aggregation failed in round {round}: {e}"))
    };
    let internal = |e: ProtocolError, dropped: Vec<(String, String)>| (e, dropped);

    // Round 0: the task; nodes check it, compute their input and advertise keys.
    let everyone: Vec<u32> = (0..members.len() as u32).collect();
    let round0 = match to_each(&everyone, round0) {
        Ok(m) => m,
        Err(e) => return Err(internal(e, dropped)),
    };
    for (id, msg) in exchange(
        members,
        start_action,
        task_id,
        0,
        round0,
        timeout,
        &mut dropped,
    )
    .await
    {
        if let Err(e) = server.receive_advertise(msg) {
            dropped.push((members[id as usize].name.clone(), e.to_string()));
        }
    }
    let round0_secs = started.elapsed().as_secs_f64();
    let dirs = match server.key_directories() {
        Ok(d) => d,
        Err(e) => return Err((fail(1, e), dropped)),
    };
    let dirs = match to_values(dirs) {
        Ok(d) => d,
        Err(e) => return Err(internal(e, dropped)),
    };
    let round = actions::SECAGG_ROUND;
    for (id, msg) in exchange(members, round, task_id, 1, dirs, timeout, &mut dropped).await {
        if let Err(e) = server.receive_shares(msg) {
            dropped.push((members[id as usize].name.clone(), e.to_string()));
        }
    }
    let shares = match server
        .forward_shares()
        .map_err(|e| fail(2, e))
        .and_then(to_values)
    {
        Ok(s) => s,
        Err(e) => return Err((e, dropped)),
    };
    for (id, msg) in exchange(members, round, task_id, 2, shares, timeout, &mut dropped).await {
        if let Err(e) = server.receive_masked_input(msg) {
            dropped.push((members[id as usize].name.clone(), e.to_string()));
        }
    }
    let survivors = match server.survivor_set() {
        Ok(s) => s,
        Err(e) => return Err((fail(3, e), dropped)),
    };
    let round3 = match to_each(&survivors.survivors, &survivors) {
        Ok(m) => m,
        Err(e) => return Err(internal(e, dropped)),
    };
    for (id, msg) in exchange(members, round, task_id, 3, round3, timeout, &mut dropped).await {
        if let Err(e) = server.receive_consistency(msg) {
            dropped.push((members[id as usize].name.clone(), e.to_string()));
        }
    }
    let request = match server.unmask_request() {
        Ok(r) => r,
        Err(e) => return Err((fail(4, e), dropped)),
    };
    let round4 = match to_each(&survivors.survivors, &request) {
        Ok(m) => m,
        Err(e) => return Err(internal(e, dropped)),
    };
    for (id, msg) in exchange(members, round, task_id, 4, round4, timeout, &mut dropped).await {
        if let Err(e) = server.receive_unmask(msg) {
            dropped.push((members[id as usize].name.clone(), e.to_string()));
        }
    }
    match server.finish() {
        Ok(aggregate) => Ok(SumOutcome {
            aggregate,
            dropped,
            round0_secs,
            rest_secs: started.elapsed().as_secs_f64() - round0_secs,
        }),
        Err(e) => Err((fail(4, e), dropped)),
    }
}

/// The dropouts, for messages.
pub fn names(dropped: &[(String, String)]) -> String {
    if dropped.is_empty() {
        return "none".into();
    }
    dropped
        .iter()
        .map(|(n, why)| format!("{n} ({why})"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn to_values<T: Serialize>(
    messages: BTreeMap<u32, T>,
) -> Result<BTreeMap<u32, serde_json::Value>, ProtocolError> {
    messages
        .into_iter()
        .map(|(id, m)| Ok((id, serde_json::to_value(&m)?)))
        .collect::<Result<_, serde_json::Error>>()
        .map_err(|e| ProtocolError::internal(e.to_string()))
}

/// The same message for each of `ids`.
fn to_each<T: Serialize>(
    ids: &[u32],
    message: &T,
) -> Result<BTreeMap<u32, serde_json::Value>, ProtocolError> {
    let value =
        serde_json::to_value(message).map_err(|e| ProtocolError::internal(e.to_string()))?;
    Ok(ids.iter().map(|&id| (id, value.clone())).collect())
}

/// Sends each member its message of round `number` concurrently and returns
/// the answers that came back in time; the rest are recorded as dropped.
async fn exchange<R: DeserializeOwned>(
    members: &[&NodeHandle],
    action: &str,
    task_id: uuid::Uuid,
    number: u8,
    messages: BTreeMap<u32, serde_json::Value>,
    timeout: Duration,
    dropped: &mut Vec<(String, String)>,
) -> Vec<(u32, R)> {
    let calls = messages.into_iter().map(|(id, payload)| {
        let node = members[id as usize];
        async move {
            let body = serde_json::to_vec(&SecaggRound {
                task_id,
                round: number,
                payload,
            });
            let result = match body {
                Ok(body) => node
                    .action_json::<SecaggRound>(action, body, "secure-aggregation answer", timeout)
                    .await
                    .and_then(|a| {
                        serde_json::from_value::<R>(a.payload).map_err(|e| {
                            ProtocolError::internal(format!(
                                "unreadable round {number} answer: {e}"
                            ))
                        })
                    }),
                Err(e) => Err(ProtocolError::internal(e.to_string())),
            };
            (id, node, result)
        }
    });
    let mut out = Vec::new();
    for (id, node, result) in futures::future::join_all(calls).await {
        match result {
            Ok(r) => out.push((id, r)),
            Err(e) => {
                warn!(node = %node.name, round = number, "dropped out of secure aggregation: {}", e.message);
                dropped.push((node.name.clone(), format!("round {number}: {}", e.message)));
            }
        }
    }
    out
}
