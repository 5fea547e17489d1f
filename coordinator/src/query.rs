//! The query path: plan a statement against the network catalog, check it
//! at every node (holding its budget there), run it and combine the releases.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use confer_protocol::signing::sha256_hex;
use confer_protocol::task::{Envelope, QueryCheck, QueryTask, Task, TaskKind};
use confer_protocol::{ErrorKind, ProtocolError, Reason, actions, metadata};
use confer_query::combine::combine;
use confer_query::{FederatedPlan, Statement};
use tracing::{info, instrument, warn};
use uuid::Uuid;

use crate::explain::explain;
use crate::fanout::{self, NodeHandle};
use crate::service::STUDY_HEADER;
use crate::state::{CoordinatorState, Prepared, study_info};
use crate::store::{ResultRecord, Study, User};

impl CoordinatorState {
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

    pub(crate) async fn plan_inner(
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
        if crate::supervision::tables::reads_supervision(sql) {
            let batch = crate::supervision::tables::query(self, sql).await?;
            let schema = batch.schema();
            let handle = self.store_statement(Prepared::Ready(batch), user)?;
            self.audit(&user.name, study, "supervision_sql", "ok", String::new());
            return Ok((schema, handle));
        }
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
                        statement: sql.to_string(),
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
    pub(crate) async fn precheck(
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
                    Err(e) if e.is(Reason::UnknownAction) => Ok(QueryCheck {
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
        let checked: Vec<(String, Result<QueryCheck, ProtocolError>)> = nodes
            .iter()
            .zip(answers)
            .map(|(node, (name, answer))| {
                // A chain shorter than its anchor: reset or cut back since
                // the last health check, so held now (the full check of the
                // anchored record's hash runs with every health check).
                let anchor = anchors.get(&name);
                let answer = answer.and_then(|a| {
                    match self.chain_cut_back(node, anchor, a.audit.as_ref()) {
                        Some(why) => Err(ProtocolError::new(ErrorKind::FailedPrecondition, why)
                            .with_retryable(false)),
                        None => Ok(a),
                    }
                });
                (name, answer)
            })
            .collect();
        let gathered = fanout::Gathered::of(checked, "the query at its check");
        let (refused, fine): (Vec<_>, Vec<_>) = gathered
            .ok
            .into_iter()
            .partition(|(_, a)| a.refused.is_some());
        let refusals: Vec<ProtocolError> =
            refused.into_iter().filter_map(|(_, a)| a.refused).collect();
        let ready: Vec<NodeHandle> = nodes
            .iter()
            .filter(|n| fine.iter().any(|(name, _)| *name == n.name))
            .cloned()
            .collect();
        let gathered = fanout::Gathered {
            ok: fine,
            missing: gathered.missing,
            failures: gathered.failures,
        };
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
            let timeout = self.release_timeout();
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
        let gathered = gathered.require(min_sites, "can answer (nothing was spent)")?;
        Ok((ready, gathered.missing, gathered.failures))
    }

    /// The nodes a planned query may run at: every node, except that a
    /// query grouped by `site` runs only at the sites its plan named (a
    /// node that was down when it was planned and is back now has no group
    /// in the answer, so it is not asked, charged or thrown away). Returns
    /// those nodes, and the others with why they were left out.
    pub(crate) fn planned_sites(
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

    /// The deadline of one node's budget release (best effort: a hold
    /// also ends with its task).
    pub(crate) fn release_timeout(&self) -> Duration {
        self.config.node_timeout().min(Duration::from_secs(5))
    }

    /// Asks `nodes` to give back the budget they hold for a checked task
    /// that will not run (best effort: a lease also ends when its task
    /// expires, and a node that is not asked checks every budget again if
    /// the task ever runs).
    pub(crate) async fn release_leases(&self, nodes: &[NodeHandle], body: &[u8]) {
        let timeout = self.release_timeout();
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
                let gathered = fanout::gather(&self.nodes, "the public answer", |n| async move {
                    let part = n.run_with_retries(envelope, policy).await?;
                    with_site(schema, &n.name, &part.batch)
                })
                .await;
                let gathered = match gathered.require(1, "answered") {
                    Ok(g) => g,
                    Err(err) => {
                        self.audit(
                            &user.name,
                            Some(study),
                            "public_query",
                            "failed",
                            err.message.clone(),
                        );
                        return Err(err);
                    }
                };
                let missing = gathered.missing.clone();
                let batches = gathered.values();
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
                statement,
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
                let (ready, mut missing, failures) = match self
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
                    let mut gathered = fanout::gather(&ready, "the answer", |n| async move {
                        run_checked(&n, envelope, policy, plan).await
                    })
                    .await;
                    // Those left out at the check count as missing too.
                    gathered.missing.splice(0..0, missing.iter().cloned());
                    gathered.failures.splice(0..0, failures);
                    missing = gathered.missing.clone();
                    match gathered.require(*min_sites, "answered") {
                        Ok(g) => partials.extend(g.values()),
                        Err(err) => {
                            // Nodes that took no charge give back what they hold.
                            if let Ok(body) = envelope.to_bytes() {
                                let ready = ready.clone();
                                let timeout = self.release_timeout();
                                tokio::spawn(async move {
                                    release_leases_at(&ready, &body, timeout).await
                                });
                            }
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
                }
                // Under secure partition selection the release is the
                // query over the keys found.
                let plan = selected.as_ref().unwrap_or(plan);
                let combined = combine(plan, &partials, *task_id).map_err(ProtocolError::from)?;
                let combined = with_missing_sites(combined, &missing)?;
                let (schema, batches) = confer_query::engine::post_process(plan, combined)
                    .await
                    .map_err(ProtocolError::from)?;
                // Kept as the caller received it (after HAVING, ORDER BY, LIMIT).
                let answer = arrow::compute::concat_batches(&schema, &batches)
                    .map_err(|e| ProtocolError::internal(e.to_string()))?;
                let ipc = encode_ipc(&answer)?;
                let mut sites: Vec<String> = partials.iter().map(|p| p.site.clone()).collect();
                sites.sort();
                if let Err(e) = self.store.record_result(&ResultRecord {
                    query_id: task_id.to_string(),
                    study: study.clone(),
                    user: asked_by.clone(),
                    statement_hash: statement_hash.clone(),
                    sites: sites.clone(),
                    result: ipc,
                    statement: Some(statement.clone()),
                    cost: Some((plan.cost.epsilon, plan.cost.delta, plan.cost.rho)),
                    created_ms: crate::store::now_ms(),
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
}

/// Runs a query task at `n` (with retries) and checks that its release
/// fits `plan`; one that does not is that node's failure.
pub(crate) async fn run_checked(
    n: &NodeHandle,
    envelope: &Envelope,
    policy: fanout::RetryPolicy,
    plan: &FederatedPlan,
) -> Result<confer_query::combine::SitePartial, ProtocolError> {
    let p = n.run_with_retries(envelope, policy).await?;
    confer_query::combine::check(plan, &p).map_err(|e| {
        ProtocolError::new(
            ErrorKind::Internal,
            format!(
                "node {} sent a release that does not fit the query, set aside: {e}",
                n.name
            ),
        )
    })?;
    Ok(p)
}

/// Asks `nodes` to give back the budget they hold for the task in `body`
/// (best effort, each under `timeout`).
pub(crate) async fn release_leases_at(nodes: &[NodeHandle], body: &[u8], timeout: Duration) {
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
pub(crate) fn study_reads(study: &Study, tables: &[String]) -> Result<(), ProtocolError> {
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
pub(crate) fn with_site(
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

pub(crate) fn with_missing_sites(
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

pub(crate) fn encode_ipc(batch: &RecordBatch) -> Result<Vec<u8>, ProtocolError> {
    let mut buf = Vec::new();
    let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut buf, &batch.schema())
        .map_err(|e| ProtocolError::internal(e.to_string()))?;
    w.write(batch)
        .map_err(|e| ProtocolError::internal(e.to_string()))?;
    w.finish()
        .map_err(|e| ProtocolError::internal(e.to_string()))?;
    Ok(buf)
}
