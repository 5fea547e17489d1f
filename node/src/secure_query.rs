//! Secure queries at a node: round 0 of a session (admit, check the
//! session against the policy, charge, compute this node's noisy input),
//! and what one session computes ([`SecureWork`]).

use arrow::array::RecordBatch;
use confer_protocol::ErrorKind;
use confer_protocol::signing::sha256_hex;
use confer_protocol::task::{Envelope, SecaggRound, SecureQueryTask, Task};
use tracing::info;

use crate::error::{NodeError, Result};
use crate::gate::{Admitted, Failure};
use crate::ledger::Cost;
use crate::policy::Policy;

use crate::handler::{NodeService, blocking};
use crate::query::{cost_of, plan_cost, worker_stopped};

impl NodeService {
    /// Round 0 of a secure query: admit, check the session (members bound
    /// to the network, threshold at the policy's floor), charge durably,
    /// compute, join the session.
    pub(crate) async fn secure_start(&self, round: SecaggRound) -> Result<serde_json::Value> {
        let envelope: Envelope = serde_json::from_value(round.payload).map_err(|e| {
            self.refuse(
                None,
                ErrorKind::InvalidArgument,
                format!("round 0 needs a signed task: {e}"),
            )
        })?;
        let policy = self.state.policy()?;
        let Admitted {
            task,
            rules,
            kind: secure,
        } = self.admit_as::<SecureQueryTask>(&envelope, &policy, "round 0 of a secure query")?;
        if task.id != round.task_id {
            return Err(self.refuse(
                Some(&task),
                ErrorKind::InvalidArgument,
                "the round names another task than the signed one".into(),
            ));
        }
        let payload_hash = sha256_hex(envelope.payload.as_bytes());
        if self.state.ledger.stored(task.id)?.is_some() {
            return Err(self.refuse(
                Some(&task),
                ErrorKind::PermissionDenied,
                format!(
                    "secure task {} already ran here: a session is never replayed or resumed; ask again",
                    task.id
                ),
            ));
        }
        let config: confer_privacy::secagg::Config = serde_json::from_value(secure.session.clone())
            .map_err(|e| {
                self.refuse(
                    Some(&task),
                    ErrorKind::InvalidArgument,
                    format!("session parameters: {e}"),
                )
            })?;
        config.validate().map_err(|e| {
            self.refuse(
                Some(&task),
                ErrorKind::InvalidArgument,
                format!("session parameters: {e}"),
            )
        })?;
        let honest = self
            .check_session(
                &task,
                &policy,
                &config,
                &secure.members,
                &secure.identities,
                &secure.proofs,
                None,
            )
            .map_err(|why| self.refuse(Some(&task), ErrorKind::PermissionDenied, why))?;
        let plan = self
            .checked_plan(&task, &rules, &policy, &secure.sql)
            .await?;
        if plan.options.aggregation != confer_query::options::Aggregation::Secure {
            return Err(self.refuse(
                Some(&task),
                ErrorKind::InvalidArgument,
                "a secure session carries a query with aggregation = 'secure'".into(),
            ));
        }
        let work = SecureWork::new(std::sync::Arc::unwrap_or_clone(plan), secure.step.as_ref())
            .and_then(|w| w.check(honest, config.vector_len).map(|()| w))
            .map_err(|why| self.refuse(Some(&task), ErrorKind::InvalidArgument, why))?;
        self.check_quota(&task, &policy)?;
        let slot = self.slot(&task, &policy)?;
        let charge = self.checked_charge(&task, &payload_hash, &rules, &policy, work.cost())?;
        // Checked, charged and claimed in one ledger transaction: a second
        // round 0 for this task, even a concurrent one, finds it on record.
        if self.begin(&task, &charge)?.is_some() {
            return Err(self.refuse(
                Some(&task),
                ErrorKind::PermissionDenied,
                format!(
                    "secure task {} already ran here: a session is never replayed or resumed; ask again",
                    task.id
                ),
            ));
        }
        let this = self.clone();
        let secure = secure.clone();
        let padded = work.plan().amplification.is_some();
        let limits = policy.limits.for_task(padded);
        let started = tokio::time::Instant::now();
        let worker = tokio::spawn(async move {
            let _slot = slot;
            let task = task;
            let run = std::panic::AssertUnwindSafe(this.run_limited(work.sql(), &limits));
            let batches = futures::FutureExt::catch_unwind(run)
                .await
                .unwrap_or(Err(Failure::Other));
            // Round 0 of a query one person could slow down is answered at
            // a fixed time (see run_query).
            if padded {
                tokio::time::sleep_until(started + limits.padded).await;
            }
            let batches = match batches {
                // Files trusted to hold one row per person changed while
                // the query read them (see execute_query).
                Ok(_) if !this.state.one_row_still_verified(work.plan()) => {
                    return Err(this.charge_failure(&task, &charge, Failure::Io));
                }
                Ok(b) => b,
                Err(f) => return Err(this.charge_failure(&task, &charge, f)),
            };
            let input = blocking(move || {
                let mut rng = crate::secure::os_rng()?;
                work.input(&batches, honest, &mut rng)
            })
            .await;
            let input = match input {
                Ok(i) => i,
                Err(_) => return Err(this.charge_failure(&task, &charge, Failure::Other)),
            };
            let keys = match this.state.secure.start(
                task.id,
                &this.state.name,
                config,
                &secure.members,
                &secure.identities,
                input,
            ) {
                Ok(k) => k,
                Err(_) => return Err(this.charge_failure(&task, &charge, Failure::Other)),
            };
            // The debit is durable before any round that reveals data-derived values.
            let marker = format!("secure aggregation session {}", task.id).into_bytes();
            if let Err(e) = this.state.ledger.finish(&charge, marker) {
                this.state.secure.forget(task.id)?;
                return Err(e);
            }
            this.state.secure.confirm(task.id)?;
            info!(task = %task.id, study = %task.study, rho = charge.cost.rho, "secure session joined after durable debit");
            Ok(keys)
        });
        worker.await.map_err(|_| worker_stopped())?
    }

    /// Checks a secure-aggregation session a coordinator proposes: this node
    /// is a member once, every member is a distinct site whose identity key
    /// the node can check itself (pinned in its policy, or proven by a
    /// certificate of the network CA), the threshold is at least the
    /// policy's floor and above the number of peers assumed corrupt, and,
    /// when `allowed` is given, every member is one of those sites. Returns
    /// how many honest survivors this node sizes its noise share for.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn check_session(
        &self,
        task: &Task,
        policy: &Policy,
        config: &confer_privacy::secagg::Config,
        members: &[String],
        identities: &[String],
        proofs: &[Option<confer_protocol::task::IdentityProof>],
        allowed: Option<&[String]>,
    ) -> std::result::Result<usize, String> {
        let _ = task;
        let rules = &policy.secure;
        if members.len() != config.n || identities.len() != config.n {
            return Err(format!(
                "the session has {} members, {} identities and n = {}",
                members.len(),
                identities.len(),
                config.n
            ));
        }
        if config.min_survivors < rules.min_survivors {
            return Err(format!(
                "the session lets {} node(s) make a sum; this node's policy needs at least {} \
                 (policy.secure.min_survivors)",
                config.min_survivors, rules.min_survivors
            ));
        }
        if config.min_survivors <= rules.max_corrupt_peers {
            return Err(format!(
                "the session's threshold of {} is not above the {} peer(s) this node assumes may collude \
                 with the coordinator (policy.secure.max_corrupt_peers)",
                config.min_survivors, rules.max_corrupt_peers
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut keys = std::collections::BTreeSet::new();
        for (i, member) in members.iter().enumerate() {
            if !seen.insert(member.as_str()) {
                return Err(format!("the session lists {member} twice"));
            }
            if !keys.insert(identities[i].as_str()) {
                return Err(format!(
                    "the session gives {member} the identity key of another member"
                ));
            }
            if let Some(allowed) = allowed
                && !allowed.contains(member)
            {
                return Err(format!(
                    "the session lists {member}, which is not a site of this task"
                ));
            }
            if *member == self.state.name {
                if identities[i] != self.state.secure.identity() {
                    return Err(
                        "the session lists another identity key for this node: refused".into(),
                    );
                }
                continue;
            }
            self.verify_peer(
                member,
                &identities[i],
                proofs.get(i).and_then(Option::as_ref),
                policy,
            )?;
        }
        if !seen.contains(self.state.name.as_str()) {
            return Err(format!(
                "this node ({}) is not among the session's members",
                self.state.name
            ));
        }
        Ok(config.min_survivors - rules.max_corrupt_peers)
    }

    /// Whether `key` is `site`'s identity key, by this node's own means.
    pub(crate) fn verify_peer(
        &self,
        site: &str,
        key: &str,
        proof: Option<&confer_protocol::task::IdentityProof>,
        policy: &Policy,
    ) -> std::result::Result<(), String> {
        if let Some(pinned) = policy.secure.peers.get(site) {
            return if pinned.eq_ignore_ascii_case(key) {
                Ok(())
            } else {
                Err(format!(
                    "the session gives {site} a key other than the one pinned in policy.secure.peers: refused"
                ))
            };
        }
        match (&self.state.tls, proof) {
            (Some(files), Some(proof)) => {
                confer_transport::identity::verify(&files.ca, site, key, proof)
                    .map_err(|e| format!("the identity key of {site} cannot be trusted: {e}"))
            }
            (Some(_), None) => Err(format!(
                "{site} offered no certificate for its identity key, and it is not pinned in \
                 policy.secure.peers: refused"
            )),
            (None, _) => Err(format!(
                "this node cannot check the identity key of {site}: without mutual TLS, pin each peer's key \
                 in policy.secure.peers (the peer's `confer node identity` prints it)"
            )),
        }
    }
}

/// What one secure session of a query computes at this node: the release
/// of its aggregates (over public domains, or over the keys secure
/// partition selection found), or one level of that selection.
pub(crate) enum SecureWork {
    Release(confer_query::plan::FederatedPlan),
    Select(
        confer_query::plan::FederatedPlan,
        confer_protocol::task::SelectStep,
        confer_query::plan::PlanCost,
    ),
}

impl SecureWork {
    /// The work of `step` for the query `plan` this node compiled itself;
    /// refuses a step the query does not have, or a level that would spend
    /// more than the query's whole share for partition selection.
    pub(crate) fn new(
        plan: confer_query::plan::FederatedPlan,
        step: Option<&confer_protocol::task::SecureStep>,
    ) -> std::result::Result<Self, String> {
        use confer_protocol::task::SecureStep;
        use confer_query::secure_select;
        match (step, plan.public_groups()) {
            (None, true) => Ok(Self::Release(plan)),
            (None, false) => Err(
                "this query groups by a private key: under aggregation = 'secure' it runs as \
                 secure partition selection steps, and this session names none"
                    .into(),
            ),
            (Some(_), true) => Err(
                "this query's keys all have public domains: its secure session has no selection step"
                    .into(),
            ),
            (Some(SecureStep::Release { keys }), false) => {
                secure_select::with_selected_keys(&plan, keys)
                    .map(Self::Release)
                    .map_err(|e| e.to_string())
            }
            (Some(SecureStep::Select(level)), false) => {
                if plan.key_sql.is_none() {
                    return Err("this query has no private key to select".into());
                }
                // Never more than the query's whole selection share in one level.
                if level.rho > plan.cost.per_partial * (1.0 + 1e-9) {
                    return Err(format!(
                        "selection level {} asks for rho {} and the query's share for partition \
                         selection is {}: refused",
                        level.level, level.rho, plan.cost.per_partial
                    ));
                }
                let cost = secure_select::level_cost(&plan, level).map_err(|e| e.to_string())?;
                Ok(Self::Select(plan, level.clone(), cost))
            }
        }
    }

    /// Everything that can fail without reading a row, before the charge:
    /// the vector's length against the session's, the noise calibration.
    pub(crate) fn check(
        &self,
        honest: usize,
        session_len: usize,
    ) -> std::result::Result<(), String> {
        let len = match self {
            Self::Release(p) => confer_query::secure::check_input(p, honest),
            Self::Select(p, level, _) => confer_query::secure_select::check_level(p, level, honest),
        }
        .map_err(|e| e.to_string())?;
        if len != session_len {
            return Err(format!(
                "the session expects vectors of {session_len} elements; this step gives {len}"
            ));
        }
        Ok(())
    }

    pub(crate) fn plan(&self) -> &confer_query::plan::FederatedPlan {
        match self {
            Self::Release(p) | Self::Select(p, _, _) => p,
        }
    }

    pub(crate) fn cost(&self) -> Cost {
        match self {
            Self::Release(p) => cost_of(p),
            Self::Select(_, _, c) => plan_cost(c),
        }
    }

    pub(crate) fn sql(&self) -> &str {
        match self {
            Self::Release(p) => &p.local_sql,
            Self::Select(p, _, _) => p.key_sql.as_deref().unwrap_or_default(),
        }
    }

    pub(crate) fn input(
        &self,
        batches: &[RecordBatch],
        honest: usize,
        rng: &mut confer_privacy::secagg::ChaCha20Rng,
    ) -> Result<Vec<u64>> {
        match self {
            Self::Release(p) => confer_query::secure::node_input(p, batches, honest, rng),
            Self::Select(p, level, _) => {
                confer_query::secure_select::level_input(p, level, batches, honest, rng)
            }
        }
        .map_err(NodeError::from)
    }
}
