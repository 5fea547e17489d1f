//! One period's release: every measure at every node that holds org units,
//! each node's noisy per-care-site values stored as they arrive, then the
//! indicator values of every unit at every level.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Array, Float64Array, Int64Array};
use confer_protocol::supervision::SupervisionUnits;
use confer_protocol::task::{QueryTask, Task, TaskKind};
use confer_protocol::{ProtocolError, actions};
use confer_query::Statement;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::estimate::{self, Own};
use super::indicators::{Aggregate, Indicator, Kind, Measure, measure_of};
use super::period::Period;
use super::region::Holdings;
use super::{Supervision, ValueRow};
use crate::fanout::{self, NodeHandle};
use crate::state::{CoordinatorState, study_info};
use crate::store::{Study, now_ms};

/// One node's release of one measure: per care site (and category), the
/// noisy value and its noise variance; a NULL value was suppressed there
/// (small-cell rule).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeRelease {
    /// `(care_site_id, category, value, variance)`.
    pub values: Vec<(i64, Option<i64>, Option<f64>, f64)>,
    /// The run (1 = the period's first) that released it.
    pub run: u32,
}

/// How a node fared in a period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeOutcome {
    /// Node name.
    pub node: String,
    /// Org units it holds.
    pub units: Vec<String>,
    /// It released every measure.
    pub complete: bool,
    /// The run in which it completed (1 = the first).
    pub completed_in_run: Option<u32>,
    /// Why it is missing, when it is.
    pub missing: Option<String>,
}

/// What a period's release holds (stored at the coordinator).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeriodRelease {
    /// The period, as written (`2026-10`).
    pub period: String,
    /// Runs so far (the first, and retries of missing nodes).
    pub runs: u32,
    /// When the first run started and the last ended, ms since the epoch.
    pub first_run_ms: i64,
    /// When the last run ended.
    pub last_run_ms: i64,
    /// Who asked for the last run (`schedule` for the coordinator itself).
    pub last_run_by: String,
    /// Epsilon and delta of each measure's query at each node.
    pub epsilon_per_measure: f64,
    /// Delta of each measure's query.
    pub delta: f64,
    /// What a node spends on the whole period (zCDP rho).
    pub rho_per_node: f64,
    /// Confidence of the intervals.
    pub confidence: f64,
    /// The measures (key → SQL of the first run).
    pub measures: BTreeMap<String, String>,
    /// Each node that holds units.
    pub nodes: Vec<NodeOutcome>,
    /// The released values.
    pub values: Vec<ValueRow>,
}

impl PeriodRelease {
    /// Every node released everything.
    pub fn complete(&self) -> bool {
        self.nodes.iter().all(|n| n.complete)
    }
}

/// What `confer supervision run` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    /// The period.
    pub period: String,
    /// Nothing was asked of any node: the stored release was complete.
    pub stored: bool,
    /// Measures (DP queries) per node.
    pub measures: usize,
    /// Nodes asked in this run.
    pub asked: Vec<String>,
    /// The nodes and how they fared.
    pub nodes: Vec<NodeOutcome>,
    /// Epsilon of each measure at each node, and delta.
    pub epsilon_per_measure: f64,
    /// Delta of each measure.
    pub delta: f64,
    /// The period's spend at each node that released all of it (zCDP rho).
    pub rho_per_node: f64,
    /// Values released (indicator × unit × category).
    pub values: usize,
    /// Of which insufficient data.
    pub insufficient: usize,
    /// Wall time of this run, ms.
    pub millis: u64,
}

fn invalid(msg: impl Into<String>) -> ProtocolError {
    ProtocolError::invalid(msg.into()).with_retryable(false)
}

impl Supervision {
    /// Runs (or completes) `period`'s release. A period already complete
    /// is answered from the store and nothing is asked or charged; nodes
    /// that were missing are asked again for what they have not released.
    pub async fn run(
        &self,
        state: &CoordinatorState,
        period: Period,
        by: &str,
    ) -> Result<RunReport, ProtocolError> {
        let started = Instant::now();
        let today = chrono::Local::now().date_naive();
        if !period.is_over(today) {
            return Err(invalid(format!(
                "period {period} has not ended (today is {today}): a period is released once it is over; \
                 ask for an earlier one (the last month is {})",
                Period::month_before(today)
            )));
        }
        let _one_at_a_time = self.running.lock().await;
        let key = period.to_string();
        let stored: Option<PeriodRelease> = state
            .store
            .supervision_release(&key)
            .map_err(ProtocolError::from)?
            .map(|b| serde_json::from_str(&b))
            .transpose()
            .map_err(|e| ProtocolError::internal(format!("stored release unreadable: {e}")))?;
        if let Some(s) = &stored
            && s.complete()
        {
            return Ok(report(s, true, Vec::new(), started));
        }
        let holdings = self.holdings(state).await?;
        let measures = self.catalogue.measures(period.kind);
        if measures.is_empty() {
            return Err(invalid(format!(
                "no indicator is released for {} periods",
                period.kind.as_str()
            )));
        }
        let (epsilon, rho) = self.epsilon_per_measure(period.kind, measures.len())?;
        let study = self.ensure_study(state)?;
        // Everything is compiled, and the concepts checked, before any node
        // is asked: a bad entry stops the run with nothing spent.
        let catalog = state.network_catalog().await?;
        let mut plans = Vec::with_capacity(measures.len());
        for m in &measures {
            let sql = m.sql(&period, epsilon, self.config.delta, self.config.confidence);
            let plan = self.compile(&sql, &catalog, m).await?;
            plans.push((m.clone(), sql, plan));
        }
        self.check_concepts(state, &study).await?;

        let run_number = stored.as_ref().map_or(1, |s| s.runs + 1);
        let partials = state
            .store
            .supervision_partials(&key)
            .map_err(ProtocolError::from)?;
        let mut have: BTreeSet<(String, String)> = BTreeSet::new();
        for (measure, node, _) in &partials {
            have.insert((measure.clone(), node.clone()));
        }
        let holders: Vec<NodeHandle> = state
            .nodes()
            .iter()
            .filter(|n| holdings.nodes.contains_key(&n.name))
            .cloned()
            .collect();
        let to_ask: Vec<NodeHandle> = holders
            .iter()
            .filter(|n| {
                plans
                    .iter()
                    .any(|(m, _, _)| !have.contains(&(m.key(), n.name.clone())))
            })
            .cloned()
            .collect();
        let mut why_missing: HashMap<String, String> = holdings.unreachable.clone();
        if !to_ask.is_empty() {
            self.ask(
                state,
                &study,
                &key,
                &plans,
                &to_ask,
                &have,
                run_number,
                &mut why_missing,
            )
            .await?;
        }
        let release = self.assemble(
            state,
            period,
            &holdings,
            &plans,
            run_number,
            by,
            stored.as_ref(),
            &why_missing,
            epsilon,
            rho,
        )?;
        let body =
            serde_json::to_string(&release).map_err(|e| ProtocolError::internal(e.to_string()))?;
        state
            .store
            .save_supervision_release(&key, &body)
            .map_err(ProtocolError::from)?;
        let asked = to_ask.iter().map(|n| n.name.clone()).collect();
        let out = report(&release, false, asked, started);
        state.audit(
            by,
            Some(&study.name),
            "supervision_run",
            if release.complete() { "ok" } else { "partial" },
            format!(
                "period {key}; run {run_number}; {} measures; missing {}",
                out.measures,
                release
                    .nodes
                    .iter()
                    .filter(|n| !n.complete)
                    .map(|n| n.node.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        );
        info!(period = %key, run = run_number, millis = out.millis, "supervision release");
        Ok(out)
    }

    /// The org units each node declares, checked against the tree (a node
    /// that does not answer is recorded, and its units are missing).
    pub async fn holdings(&self, state: &CoordinatorState) -> Result<Holdings, ProtocolError> {
        let timeout = state
            .config
            .node_timeout()
            .min(std::time::Duration::from_secs(15));
        let gathered = fanout::gather(state.nodes(), "the supervision units", |n| async move {
            n.action_json::<SupervisionUnits>(
                actions::SUPERVISION_UNITS,
                Vec::new(),
                "supervision units",
                timeout,
            )
            .await
        })
        .await;
        let mut holdings = Holdings::default();
        for (name, units) in gathered.ok {
            if !units.units.is_empty() {
                holdings.nodes.insert(name, units.units);
            }
        }
        // A node that does not answer now keeps the units it declared last.
        let last = self
            .last_holdings
            .lock()
            .map_err(|_| ProtocolError::internal("lock poisoned"))?
            .clone();
        for (name, e) in gathered.missing.iter().zip(&gathered.failures) {
            if let Some(units) = last.nodes.get(name) {
                holdings.nodes.insert(name.clone(), units.clone());
            }
            holdings.unreachable.insert(name.clone(), e.message.clone());
        }
        holdings
            .check(&self.region)
            .map_err(|e| invalid(e.to_string()))?;
        *self
            .last_holdings
            .lock()
            .map_err(|_| ProtocolError::internal("lock poisoned"))? = holdings.clone();
        Ok(holdings)
    }

    /// Epsilon of each of `measures` queries so that a period of `kind`
    /// spends its share of the yearly budget, and that share as rho.
    pub fn epsilon_per_measure(
        &self,
        kind: super::period::PeriodType,
        measures: usize,
    ) -> Result<(f64, f64), ProtocolError> {
        let c = &self.config;
        let rho_year =
            confer_privacy::accounting::rho_for_epsilon_delta(c.epsilon_per_year, c.delta)
                .map_err(|e| invalid(format!("supervision.epsilon_per_year: {e}")))?;
        let share = c.shares.of(kind);
        let rho_period = rho_year * share / kind.per_year() as f64;
        let rho = rho_period / measures as f64;
        let epsilon = confer_privacy::accounting::epsilon_for_rho(rho, c.delta)
            .map_err(|e| ProtocolError::internal(e.to_string()))?;
        // The node charges the rho of (epsilon, delta), which rounds here
        // and there: the period spends at most this.
        let charged = confer_privacy::accounting::rho_for_epsilon_delta(epsilon, c.delta)
            .map_err(|e| ProtocolError::internal(e.to_string()))?;
        Ok((epsilon, charged * measures as f64))
    }

    fn ensure_study(&self, state: &CoordinatorState) -> Result<Study, ProtocolError> {
        let name = &self.config.study;
        if let Some(s) = state.store.study(name).map_err(ProtocolError::from)? {
            return Ok(s);
        }
        let study = Study {
            name: name.clone(),
            title: "Supervision statistics of the health commission".into(),
            principal_investigator: self.config.user.clone(),
            members: vec![self.config.user.clone()],
            tables: Vec::new(),
            requested_epsilon: self.config.epsilon_per_year,
            requested_delta: self.config.delta,
            ethics_ref: "routine health-service supervision".into(),
            min_sites: Some(1),
            created_ms: now_ms(),
            created_by: "confer supervision".into(),
        };
        state
            .store
            .create_study(&study)
            .map_err(ProtocolError::from)?;
        Ok(study)
    }

    async fn compile(
        &self,
        sql: &str,
        catalog: &confer_query::Catalog,
        m: &Measure,
    ) -> Result<confer_query::FederatedPlan, ProtocolError> {
        let named = || self.indicators_using(m).join(", ");
        let parsed = match confer_query::parse(sql) {
            Ok(Statement::Query(q)) => q,
            Ok(_) => return Err(invalid(format!("indicator {}: not a DP query", named()))),
            Err(e) => return Err(invalid(format!("indicator {}: {e}", named()))),
        };
        let plan = confer_query::compile(&parsed, catalog, None)
            .await
            .map_err(|e| invalid(format!("indicator {}: {e}", named())))?;
        confer_query::engine::validate(&plan, catalog)
            .await
            .map_err(|e| invalid(format!("indicator {}: {e}", named())))?;
        if let Some(why) = &plan.amplification {
            // Answered at the nodes' padded time (policy.limits.padded_secs).
            info!(indicators = %named(), "a supervision measure runs padded: {why}");
        }
        Ok(plan)
    }

    /// The ids of the indicators that use measure `m`.
    pub fn indicators_using(&self, m: &Measure) -> Vec<String> {
        self.catalogue
            .indicators
            .iter()
            .filter(|i| {
                [&i.numerator, &i.denominator]
                    .into_iter()
                    .flatten()
                    .any(|a| measure_of(a, None).aggregate == m.aggregate)
            })
            .map(|i| i.id.clone())
            .collect()
    }

    /// Every concept an indicator lists is in some node's `concept` table
    /// (a public table: asked without DP, nothing spent).
    async fn check_concepts(
        &self,
        state: &CoordinatorState,
        study: &Study,
    ) -> Result<(), ProtocolError> {
        let wanted: BTreeSet<i64> = self
            .catalogue
            .indicators
            .iter()
            .flat_map(|i| [&i.numerator, &i.denominator])
            .flatten()
            .flat_map(|a| a.concepts.iter().copied())
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let catalog = state.network_catalog().await?;
        if catalog.table("concept").is_none() {
            warn!("no node publishes a concept table: the indicators' concepts are not checked");
            return Ok(());
        }
        let list = wanted
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT DISTINCT CAST(concept_id AS BIGINT) AS concept_id FROM concept WHERE concept_id IN ({list})"
        );
        let mut task = Task::query(&study.name, &self.config.user, &sql, state.task_ttl())
            .for_nodes(state.node_names());
        task.kind = TaskKind::PublicQuery(QueryTask { sql: sql.clone() });
        task.study_info = Some(study_info(study));
        let envelope = state.sign(&task)?;
        let policy = self.retry_policy(state);
        let envelope = &envelope;
        let gathered = fanout::gather(state.nodes(), "the concept check", |n| async move {
            n.run_with_retries(envelope, policy).await
        })
        .await;
        if gathered.ok.is_empty() {
            warn!("no node answered the concept check: the indicators' concepts are not checked");
            return Ok(());
        }
        let mut found = BTreeSet::new();
        for (_, part) in &gathered.ok {
            if let Some(a) = part.batch.column(0).as_any().downcast_ref::<Int64Array>() {
                found.extend(a.iter().flatten());
            }
        }
        for i in &self.catalogue.indicators {
            for a in [&i.numerator, &i.denominator].into_iter().flatten() {
                if let Some(c) = a.concepts.iter().find(|c| !found.contains(c)) {
                    return Err(invalid(format!(
                        "indicator {}: concept {c} is in no node's concept table: fix the concept id, or load \
                         the vocabulary that holds it",
                        i.id
                    )));
                }
            }
        }
        Ok(())
    }

    fn retry_policy(&self, state: &CoordinatorState) -> fanout::RetryPolicy {
        fanout::RetryPolicy {
            timeout: state.config.node_timeout(),
            retries: state.config.coordinator.retries,
        }
    }

    /// Checks every measure at each node in `nodes` (holding its budget
    /// there), leaves out a node that refuses any (giving back what it
    /// holds, so it spends nothing on a period it cannot finish), then runs
    /// each measure at the others and stores each release as it arrives.
    #[allow(clippy::too_many_arguments)]
    async fn ask(
        &self,
        state: &CoordinatorState,
        study: &Study,
        period: &str,
        plans: &[(Measure, String, confer_query::FederatedPlan)],
        nodes: &[NodeHandle],
        have: &BTreeSet<(String, String)>,
        run: u32,
        why_missing: &mut HashMap<String, String>,
    ) -> Result<(), ProtocolError> {
        let policy = self.retry_policy(state);
        // A task per measure for the nodes that still need it; its lifetime
        // covers checking and running every measure.
        let ttl = state.task_ttl() + std::time::Duration::from_secs(10 * plans.len() as u64);
        let mut tasks = Vec::new();
        for (m, sql, _) in plans {
            let needing: Vec<&NodeHandle> = nodes
                .iter()
                .filter(|n| !have.contains(&(m.key(), n.name.clone())))
                .collect();
            let mut task = Task::query(&study.name, &self.config.user, sql, ttl)
                .for_nodes(needing.iter().map(|n| &n.name));
            task.study_info = Some(study_info(study));
            tasks.push((task.id, state.sign(&task)?, needing));
        }
        // Check everything first.
        let mut refused: BTreeMap<String, String> = BTreeMap::new();
        for (_, envelope, needing) in &tasks {
            let asked: Vec<NodeHandle> = needing
                .iter()
                .filter(|n| !refused.contains_key(&n.name))
                .map(|n| (*n).clone())
                .collect();
            let checks = futures::future::join_all(asked.iter().map(|n| {
                let one = std::slice::from_ref(n);
                async move {
                    (
                        n.name.clone(),
                        state.precheck(one, envelope, 1, policy).await,
                    )
                }
            }))
            .await;
            for (name, outcome) in checks {
                if let Err(e) = outcome {
                    refused.insert(name, e.message);
                }
            }
        }
        if !refused.is_empty() {
            // What a refusing node holds for the measures it passed goes back.
            for (_, envelope, needing) in &tasks {
                let left: Vec<NodeHandle> = needing
                    .iter()
                    .filter(|n| refused.contains_key(&n.name))
                    .map(|n| (*n).clone())
                    .collect();
                if let Ok(body) = envelope.to_bytes() {
                    state.release_leases(&left, &body).await;
                }
            }
        }
        for (name, why) in &refused {
            why_missing.insert(name.clone(), why.clone());
        }
        for ((task_id, envelope, needing), (m, _, plan)) in tasks.iter().zip(plans) {
            let ready: Vec<NodeHandle> = needing
                .iter()
                .filter(|n| !refused.contains_key(&n.name) && !why_missing.contains_key(&n.name))
                .map(|n| (*n).clone())
                .collect();
            if ready.is_empty() {
                continue;
            }
            let bound = state.bound_to(envelope, &ready)?;
            let bound = &bound;
            let gathered = fanout::gather(&ready, "the measure", |n| async move {
                crate::query::run_checked(&n, bound, policy, plan).await
            })
            .await;
            for (name, part) in gathered.ok {
                let release = decode(plan, m, &part, *task_id, run)?;
                let body = serde_json::to_string(&release)
                    .map_err(|e| ProtocolError::internal(e.to_string()))?;
                state
                    .store
                    .save_supervision_partial(period, &m.key(), &name, &body)
                    .map_err(ProtocolError::from)?;
            }
            for (name, e) in gathered.missing.into_iter().zip(gathered.failures) {
                why_missing.insert(name, e.message);
            }
        }
        Ok(())
    }

    /// Builds the period's values from every stored node release.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        &self,
        state: &CoordinatorState,
        period: Period,
        holdings: &Holdings,
        plans: &[(Measure, String, confer_query::FederatedPlan)],
        run: u32,
        by: &str,
        stored: Option<&PeriodRelease>,
        why_missing: &HashMap<String, String>,
        epsilon: f64,
        rho: f64,
    ) -> Result<PeriodRelease, ProtocolError> {
        let key = period.to_string();
        let partials = state
            .store
            .supervision_partials(&key)
            .map_err(ProtocolError::from)?;
        let mut by_measure: HashMap<(String, String), NodeRelease> = HashMap::new();
        for (measure, node, body) in partials {
            let r: NodeRelease = serde_json::from_str(&body).map_err(|e| {
                ProtocolError::internal(format!("stored node release unreadable: {e}"))
            })?;
            by_measure.insert((measure, node), r);
        }
        // How each node fared.
        let mut nodes = Vec::new();
        let mut complete_nodes = BTreeSet::new();
        let mut timely_nodes = BTreeSet::new();
        for (node, units) in &holdings.nodes {
            let runs: Vec<Option<u32>> = plans
                .iter()
                .map(|(m, _, _)| by_measure.get(&(m.key(), node.clone())).map(|r| r.run))
                .collect();
            let complete = runs.iter().all(Option::is_some);
            let completed_in_run =
                complete.then(|| runs.iter().flatten().copied().max().unwrap_or(1));
            if complete {
                complete_nodes.insert(node.clone());
                if completed_in_run == Some(1) {
                    timely_nodes.insert(node.clone());
                }
            }
            let missing = (!complete).then(|| {
                why_missing
                    .get(node)
                    .cloned()
                    .unwrap_or_else(|| "did not release every measure".into())
            });
            nodes.push(NodeOutcome {
                node: node.clone(),
                units: units.keys().cloned().collect(),
                complete,
                completed_in_run,
                missing,
            });
        }
        let region = &self.region;
        let n = region.units.len();
        // Which unit each care site belongs to, and through which node.
        let mut unit_of: HashMap<(String, i64), usize> = HashMap::new();
        for (node, units) in &holdings.nodes {
            for (code, sites) in units {
                if let Some(i) = region.position(code) {
                    for s in sites {
                        unit_of.insert((node.clone(), *s), i);
                    }
                }
            }
        }
        // Per measure and category: each unit's own release, consistent.
        let mut consistent: HashMap<(String, Option<i64>), estimate::Consistent> = HashMap::new();
        let mut incomplete_unit = vec![false; n];
        for (m, _, plan) in plans {
            let grain = if plan.aggregates.iter().all(|a| a.kind.is_count()) {
                1.0
            } else {
                0.01
            };
            let mut own: HashMap<Option<i64>, Vec<Option<Own>>> = HashMap::new();
            let categories = category_domain(m.by.as_deref());
            for c in &categories {
                own.insert(*c, vec![None; n]);
            }
            for node in holdings.nodes.keys() {
                let Some(r) = by_measure.get(&(m.key(), node.clone())) else {
                    continue;
                };
                for (site, cat, value, var) in &r.values {
                    let Some(&u) = unit_of.get(&(node.clone(), *site)) else {
                        continue;
                    };
                    let Some(slot) = own.get_mut(cat) else {
                        continue;
                    };
                    match value {
                        Some(v) => {
                            let o = slot[u].get_or_insert(Own {
                                value: 0.0,
                                variance: 0.0,
                            });
                            o.value += v;
                            o.variance += var;
                        }
                        None => incomplete_unit[u] = true,
                    }
                }
            }
            for (cat, releases) in own {
                consistent.insert(
                    (m.key(), cat),
                    estimate::consistent(region, &releases, grain),
                );
            }
        }
        // A unit whose node did not release everything is incomplete, and
        // so is every unit above it.
        for (node, units) in &holdings.nodes {
            if !complete_nodes.contains(node) {
                for code in units.keys() {
                    if let Some(i) = region.position(code) {
                        incomplete_unit[i] = true;
                    }
                }
            }
        }
        // A node that did not answer and whose units are not known (it has
        // not answered since the coordinator started) may hold any unit:
        // every value is incomplete, and the period is not complete.
        let unknown: Vec<&String> = holdings
            .unreachable
            .keys()
            .filter(|n| !holdings.nodes.contains_key(*n))
            .collect();
        if !unknown.is_empty() {
            incomplete_unit.iter_mut().for_each(|u| *u = true);
        }
        for node in unknown {
            nodes.push(NodeOutcome {
                node: node.clone(),
                units: Vec::new(),
                complete: false,
                completed_in_run: None,
                missing: Some(format!(
                    "did not answer, and its org units are not known yet: {}",
                    holdings.unreachable[node]
                )),
            });
        }
        for i in (0..n).rev() {
            if region.children(i).iter().any(|&c| incomplete_unit[c]) {
                incomplete_unit[i] = true;
            }
        }
        let z = confer_privacy::stats::z_for_confidence(self.config.confidence);
        let mut values = Vec::new();
        for ind in self.catalogue.for_period(period.kind) {
            let categories: Vec<Option<i64>> = std::iter::once(None)
                .chain(
                    ind.disaggregations
                        .iter()
                        .flat_map(|d| category_domain(Some(d))),
                )
                .collect();
            for cat in categories {
                let by = ind
                    .disaggregations
                    .first()
                    .filter(|_| cat.is_some())
                    .cloned();
                for (u, &incomplete) in incomplete_unit.iter().enumerate() {
                    let e = self.estimate_at(
                        ind,
                        u,
                        cat,
                        by.as_deref(),
                        &consistent,
                        holdings,
                        &complete_nodes,
                        &timely_nodes,
                        z,
                    );
                    let Some((e, num, den)) = e else { continue };
                    let mut flags = Vec::new();
                    if e.insufficient {
                        flags.push("insufficient data".to_string());
                    }
                    if incomplete && !matches!(ind.kind, Kind::Completeness | Kind::Timeliness) {
                        flags.push("incomplete".to_string());
                    }
                    let breach = match (e.value, ind.red_line, ind.better) {
                        (Some(v), Some(line), super::indicators::Better::Lower) => v > line,
                        (Some(v), Some(line), super::indicators::Better::Higher) => v < line,
                        _ => false,
                    };
                    if breach {
                        flags.push("red line".to_string());
                    }
                    values.push(ValueRow {
                        period: key.clone(),
                        unit: region.units[u].code.clone(),
                        level: region.units[u].level.clone(),
                        indicator: ind.id.clone(),
                        category: match (&by, cat) {
                            (Some(b), Some(c)) => format!("{b}={c}"),
                            _ => String::new(),
                        },
                        value: e.value,
                        ci_low: e.ci.map(|c| c.0),
                        ci_high: e.ci.map(|c| c.1),
                        numerator: num,
                        denominator: den,
                        flags: flags.join(", "),
                    });
                }
            }
        }
        let now = now_ms();
        Ok(PeriodRelease {
            period: key,
            runs: run,
            first_run_ms: stored.map_or(now, |s| s.first_run_ms),
            last_run_ms: now,
            last_run_by: by.to_string(),
            epsilon_per_measure: epsilon,
            delta: self.config.delta,
            rho_per_node: rho,
            confidence: self.config.confidence,
            measures: plans
                .iter()
                .map(|(m, sql, _)| (m.key(), sql.clone()))
                .collect(),
            nodes,
            values,
        })
    }

    /// One indicator at unit `u` (category `cat`): the estimate, with its
    /// numerator and denominator.
    #[allow(clippy::too_many_arguments)]
    fn estimate_at(
        &self,
        ind: &Indicator,
        u: usize,
        cat: Option<i64>,
        by: Option<&str>,
        consistent: &HashMap<(String, Option<i64>), estimate::Consistent>,
        holdings: &Holdings,
        complete: &BTreeSet<String>,
        timely: &BTreeSet<String>,
        z: f64,
    ) -> Option<(estimate::Estimate, Option<f64>, Option<f64>)> {
        let region = &self.region;
        let part = |a: &Aggregate| -> Option<(f64, f64)> {
            let c = consistent.get(&(measure_of(a, by).key(), cat))?;
            if a.units.is_empty() {
                return Some((c.value(u), c.variance[u]));
            }
            let keep = |i: usize| {
                a.units.iter().all(|(set, options)| {
                    region.units[i]
                        .groups
                        .get(set)
                        .is_some_and(|o| options.contains(o))
                })
            };
            Some(c.filtered(region, u, &keep))
        };
        match ind.kind {
            Kind::Completeness | Kind::Timeliness => {
                let set = if ind.kind == Kind::Completeness {
                    complete
                } else {
                    timely
                };
                let mut institutions = 0usize;
                let mut reported = 0usize;
                let mut stack = vec![u];
                while let Some(i) = stack.pop() {
                    if let Some(node) = holdings.holder(&region.units[i].code) {
                        institutions += 1;
                        if set.contains(node) {
                            reported += 1;
                        }
                    }
                    stack.extend(region.children(i));
                }
                if institutions == 0 {
                    return None;
                }
                let value = ind.factor * reported as f64 / institutions as f64;
                Some((
                    estimate::Estimate {
                        value: Some(value),
                        ci: None,
                        insufficient: false,
                    },
                    Some(reported as f64),
                    Some(institutions as f64),
                ))
            }
            Kind::Count => {
                let (n, var) = part(ind.numerator.as_ref()?)?;
                Some((
                    estimate::count(n, var, ind.factor, z, ind.max_half_width),
                    Some(n),
                    None,
                ))
            }
            Kind::Proportion | Kind::Ratio => {
                let (n, var_n) = part(ind.numerator.as_ref()?)?;
                let (d, var_d) = part(ind.denominator.as_ref()?)?;
                let e = estimate::ratio(
                    n,
                    var_n,
                    d,
                    var_d,
                    ind.factor,
                    ind.kind == Kind::Proportion,
                    z,
                    ind.max_half_width,
                );
                Some((e, Some(n), Some(d)))
            }
        }
    }
}

/// The categories of a measure: none for a total, else the values of the
/// disaggregation's domain.
fn category_domain(by: Option<&str>) -> Vec<Option<i64>> {
    match by.and_then(super::indicators::disaggregation) {
        None => vec![None],
        Some(d) => d.categories.iter().map(|c| Some(*c)).collect(),
    }
}

/// Decodes one node's release of a measure into per-care-site values and
/// variances (combining it alone, raw: `nonnegative = 'false'`).
fn decode(
    plan: &confer_query::FederatedPlan,
    measure: &Measure,
    part: &confer_query::combine::SitePartial,
    task_id: uuid::Uuid,
    run: u32,
) -> Result<NodeRelease, ProtocolError> {
    let batch = confer_query::combine::combine(plan, std::slice::from_ref(part), task_id)
        .map_err(ProtocolError::from)?;
    let bad = |what: &str| ProtocolError::internal(format!("node {}: {what}", part.site));
    let site = batch
        .column_by_name("care_site_id")
        .and_then(|c| arrow::compute::cast(c, &arrow::datatypes::DataType::Int64).ok())
        .ok_or_else(|| bad("no care_site_id column"))?;
    let site = site
        .as_any()
        .downcast_ref::<Int64Array>()
        .ok_or_else(|| bad("care_site_id"))?;
    let category = measure
        .by
        .as_deref()
        .and_then(super::indicators::disaggregation)
        .and_then(|d| batch.column_by_name(d.column))
        .and_then(|c| arrow::compute::cast(c, &arrow::datatypes::DataType::Int64).ok());
    let category = category
        .as_ref()
        .and_then(|c| c.as_any().downcast_ref::<Int64Array>().cloned());
    let schema = batch.schema();
    let field = schema
        .field_with_name("value")
        .map_err(|_| bad("no value column"))?;
    let sd: f64 = field
        .metadata()
        .get(confer_protocol::metadata::NOISE_STDDEV)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no noise standard deviation on the value"))?;
    let value = batch
        .column_by_name("value")
        .and_then(|c| arrow::compute::cast(c, &arrow::datatypes::DataType::Float64).ok())
        .ok_or_else(|| bad("value"))?;
    let value = value
        .as_any()
        .downcast_ref::<Float64Array>()
        .ok_or_else(|| bad("value"))?;
    let mut values = Vec::with_capacity(batch.num_rows());
    for r in 0..batch.num_rows() {
        if site.is_null(r) {
            continue;
        }
        let cat = category
            .as_ref()
            .and_then(|c| (!c.is_null(r)).then(|| c.value(r)));
        let v = (!value.is_null(r)).then(|| value.value(r));
        values.push((site.value(r), cat, v, sd * sd));
    }
    Ok(NodeRelease { values, run })
}

fn report(r: &PeriodRelease, stored: bool, asked: Vec<String>, started: Instant) -> RunReport {
    RunReport {
        period: r.period.clone(),
        stored,
        measures: r.measures.len(),
        asked,
        nodes: r.nodes.clone(),
        epsilon_per_measure: r.epsilon_per_measure,
        delta: r.delta,
        rho_per_node: r.rho_per_node,
        values: r.values.len(),
        insufficient: r
            .values
            .iter()
            .filter(|v| v.flags.contains("insufficient"))
            .count(),
        millis: started.elapsed().as_millis() as u64,
    }
}

/// Shared handle.
pub type Shared = Arc<Supervision>;
