//! The coordinator's web console: the commission's dashboard, the
//! researcher's studies, queries and training jobs, and operations, over a
//! versioned JSON API (`/api/v1/...`, docs/console.md) that scripts may use
//! too. Every figure a page shows comes from that API.
//!
//! The same users, roles and tokens as Flight SQL: a browser signs in with
//! a token (`POST /api/v1/session`) and holds a session cookie; a script
//! sends `Authorization: Bearer <token>`. Each area of the console needs a
//! role: the commission's (supervision statistics) `analyst` or `admin`,
//! research `researcher`, `data_scientist` or `admin`, operations `admin`.
//! Nothing but the sign-in page and its static assets is served without
//! authentication.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use confer_console::reply::{self, ApiError};
use confer_console::{Sessions, json};
use confer_protocol::{ErrorKind, ProtocolError};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::state::CoordinatorState;
use crate::store::{Role, User};

/// What the console serves from.
pub(crate) struct Console {
    state: Arc<CoordinatorState>,
    sessions: Sessions,
    started: Instant,
    started_ms: i64,
}

type Shared = Arc<Console>;

/// Most history entries one request returns.
const MAX_HISTORY: usize = 200;

/// The console's areas, each for some roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Area {
    /// Supervision statistics: the health commission.
    Commission,
    /// Studies, budgets, queries, training jobs.
    Research,
    /// Nodes and the coordinator.
    Operations,
}

impl Area {
    const ALL: [Area; 3] = [Area::Commission, Area::Research, Area::Operations];

    fn allowed(self, role: Role) -> bool {
        match self {
            Area::Commission => matches!(role, Role::Analyst | Role::Admin),
            Area::Research => matches!(role, Role::Researcher | Role::DataScientist | Role::Admin),
            Area::Operations => role == Role::Admin,
        }
    }

    fn id(self) -> &'static str {
        match self {
            Area::Commission => "commission",
            Area::Research => "researcher",
            Area::Operations => "ops",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Area::Commission => "the commission's dashboard",
            Area::Research => "the research pages",
            Area::Operations => "the operations page",
        }
    }

    fn needs(self) -> &'static str {
        match self {
            Area::Commission => "the analyst or admin role",
            Area::Research => "the researcher, data_scientist or admin role",
            Area::Operations => "the admin role",
        }
    }

    fn page(self) -> &'static str {
        match self {
            Area::Commission => "commission.html",
            Area::Research => "researcher.html",
            Area::Operations => "ops.html",
        }
    }
}

fn home(role: Role) -> &'static str {
    match role {
        Role::Analyst => "/commission",
        Role::Researcher | Role::DataScientist => "/researcher",
        Role::Admin => "/ops",
    }
}

impl Console {
    pub(crate) fn new(
        state: Arc<CoordinatorState>,
        ttl: std::time::Duration,
        port: u16,
        secure: bool,
    ) -> Self {
        Self {
            state,
            sessions: Sessions::new(ttl, port, secure),
            started: Instant::now(),
            started_ms: crate::store::now_ms(),
        }
    }

    /// The token a request carries: a bearer header, else a live session.
    fn token(&self, headers: &HeaderMap) -> Option<String> {
        if let Some(v) = headers.get(header::AUTHORIZATION) {
            return v
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(|t| t.trim().to_string());
        }
        let cookies = headers.get(header::COOKIE)?.to_str().ok()?;
        self.sessions.secret_in(cookies)
    }

    /// The user a request is from, checked against the store now (a
    /// revoked or rotated token no longer signs in).
    fn user(&self, headers: &HeaderMap) -> Result<User, ProtocolError> {
        let token = self.token(headers).ok_or_else(|| {
            ProtocolError::new(
                ErrorKind::Unauthenticated,
                "not signed in (or the session expired): sign in at /login with your token, \
                 or send `Authorization: Bearer <token>`",
            )
        })?;
        self.user_of(&token)
    }

    fn user_of(&self, token: &str) -> Result<User, ProtocolError> {
        let mut request = tonic::Request::new(());
        let value = format!("Bearer {token}").parse().map_err(|_| {
            ProtocolError::new(ErrorKind::Unauthenticated, "the token is not valid text")
        })?;
        request.metadata_mut().insert("authorization", value);
        self.state.auth.user(&request)
    }

    /// The user, if their role may use `area`.
    fn member(&self, headers: &HeaderMap, area: Area) -> Result<User, ApiError> {
        let user = self.user(headers)?;
        if !area.allowed(user.role) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "user {} ({}) may not use {}: that needs {}",
                    user.name,
                    user.role.name(),
                    area.title(),
                    area.needs()
                ),
            ));
        }
        Ok(user)
    }
}

/// The console's routes.
pub(crate) fn router(console: Shared) -> Router {
    confer_console::guarded(
        Router::new()
            .route("/", get(root))
            .route("/login", get(|| async { reply::asset("login.html") }))
            .route("/assets/{name}", get(reply::public_asset))
            .route("/commission", get(commission_page))
            .route("/researcher", get(researcher_page))
            .route("/researcher/studies/{name}", get(study_page))
            .route("/ops", get(ops_page))
            .route("/api/v1/session", post(sign_in).delete(sign_out))
            .route("/api/v1/whoami", get(whoami))
            .route("/api/v1/supervision", get(supervision))
            .route("/api/v1/supervision/values", get(supervision_values))
            .route("/api/v1/supervision/export", get(supervision_export))
            .route("/api/v1/studies", get(studies))
            .route("/api/v1/studies/{name}", get(study))
            .route("/api/v1/queries", get(queries))
            .route("/api/v1/explain", post(explain))
            .route("/api/v1/query", post(run_query))
            .route("/api/v1/train/jobs", get(train_jobs))
            .route("/api/v1/nodes", get(nodes))
            .route("/api/v1/status", get(status)),
    )
    .with_state(console)
}

async fn root(State(c): State<Shared>, headers: HeaderMap) -> Response {
    match c.user(&headers) {
        Ok(user) => reply::redirect(home(user.role)),
        Err(_) => reply::redirect("/login"),
    }
}

/// A page of `area`: to the sign-in page without a session, a clear page
/// with 403 for a role without the area.
fn page(c: &Console, headers: &HeaderMap, area: Area, path: &str) -> Result<User, Box<Response>> {
    let user = c.user(headers).map_err(|_| {
        let next: String = path
            .chars()
            .filter(|ch| ch.is_ascii_alphanumeric() || "/_-.".contains(*ch))
            .collect();
        Box::new(reply::redirect(&format!("/login?next={next}")))
    })?;
    if !area.allowed(user.role) {
        return Err(Box::new(reply::error_page(
            StatusCode::FORBIDDEN,
            "Not for your role",
            &format!(
                "You are signed in as {} ({}). {} needs {}: ask an admin of this coordinator.",
                user.name,
                user.role.name(),
                capitalise(area.title()),
                area.needs()
            ),
        )));
    }
    Ok(user)
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

async fn commission_page(State(c): State<Shared>, headers: HeaderMap) -> Response {
    match page(&c, &headers, Area::Commission, "/commission") {
        Ok(_) => reply::asset(Area::Commission.page()),
        Err(r) => *r,
    }
}

async fn researcher_page(State(c): State<Shared>, headers: HeaderMap) -> Response {
    match page(&c, &headers, Area::Research, "/researcher") {
        Ok(_) => reply::asset(Area::Research.page()),
        Err(r) => *r,
    }
}

async fn study_page(
    State(c): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/researcher/studies/{name}");
    let user = match page(&c, &headers, Area::Research, &path) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    match member_study(&c, &user, &name) {
        Ok(_) => reply::asset(Area::Research.page()),
        Err(e) => reply::error_page(e.status, "No such study", &e.message),
    }
}

async fn ops_page(State(c): State<Shared>, headers: HeaderMap) -> Response {
    match page(&c, &headers, Area::Operations, "/ops") {
        Ok(_) => reply::asset(Area::Operations.page()),
        Err(r) => *r,
    }
}

/// A study the user works under. A study they are not in answers as if it
/// did not exist (404), so the console does not tell which studies exist.
fn member_study(c: &Console, user: &User, name: &str) -> Result<crate::store::Study, ApiError> {
    match c.state.store.study(name).map_err(ProtocolError::from)? {
        Some(s) if s.admits(user) => Ok(s),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "user {} is in no study named {name:?}: the studies you are in are listed at /researcher",
                user.name
            ),
        )),
    }
}

async fn sign_in(State(c): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let outcome = (|| -> Result<Response, ApiError> {
        let token = Sessions::token_in(&headers, &body)?;
        // A refused sign-in is not audited: anyone can send one, and the
        // audit log must not grow at a stranger's will.
        let user = c.user_of(&token).map_err(|e| {
            tracing::info!("console sign-in refused: {}", e.message);
            ApiError::from(e)
        })?;
        let answer = reply::json(&json!({
            "name": user.name,
            "role": user.role.name(),
            "home": home(user.role),
        }));
        let answer = c.sessions.start(&token, answer)?;
        c.state
            .audit(&user.name, None, "console.sign_in", "ok", String::new());
        Ok(answer)
    })();
    outcome.unwrap_or_else(IntoResponse::into_response)
}

async fn sign_out(State(c): State<Shared>, headers: HeaderMap) -> Response {
    c.sessions.sign_out(&headers)
}

type ApiResult = Result<Response, ApiError>;

async fn whoami(State(c): State<Shared>, headers: HeaderMap) -> ApiResult {
    let user = c.user(&headers)?;
    let studies: Vec<String> = c
        .state
        .studies_of(&user)?
        .into_iter()
        .map(|s| s.name)
        .collect();
    let areas: Vec<&str> = Area::ALL
        .iter()
        .filter(|a| a.allowed(user.role))
        .map(|a| a.id())
        .collect();
    Ok(reply::json(&json!({
        "name": user.name,
        "role": user.role.name(),
        "home": home(user.role),
        "areas": areas,
        "studies": studies,
        "supervision": c.state.supervision.is_some(),
        "version": env!("CARGO_PKG_VERSION"),
    })))
}

/// Rows of a supervision table.
async fn supervision_rows(c: &Console, table: &str) -> Result<Vec<Map<String, Value>>, ApiError> {
    let batch =
        crate::supervision::tables::query(&c.state, &format!("SELECT * FROM supervision.{table}"))
            .await?;
    rows_of(&batch)
}

fn rows_of(batch: &RecordBatch) -> Result<Vec<Map<String, Value>>, ApiError> {
    json::records(&batch.schema(), std::slice::from_ref(batch))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))
}

fn supervision_of(c: &Console) -> Result<&crate::supervision::Supervision, ApiError> {
    c.state.supervision.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "this coordinator has no [supervision] section: no supervision statistics are released here",
        )
    })
}

async fn supervision(State(c): State<Shared>, headers: HeaderMap) -> ApiResult {
    c.member(&headers, Area::Commission)?;
    let sup = supervision_of(&c)?;
    let levels: Vec<Value> = sup
        .region
        .levels
        .iter()
        .map(|l| json!({"id": l.id, "name_zh": l.name_zh, "name_en": l.name_en}))
        .collect();
    let group_sets: Vec<Value> = sup
        .region
        .group_sets
        .iter()
        .map(|g| {
            json!({
                "id": g.id, "name_zh": g.name_zh, "name_en": g.name_en,
                "options": g.options.iter().map(|o| json!({"id": o.id, "name_zh": o.name_zh, "name_en": o.name_en})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut periods = supervision_rows(&c, "periods").await?;
    periods.sort_by(|a, b| a["period"].as_str().cmp(&b["period"].as_str()));
    Ok(reply::json(&json!({
        "levels": levels,
        "group_sets": group_sets,
        "org_units": supervision_rows(&c, "org_units").await?,
        "indicators": supervision_rows(&c, "indicators").await?,
        "periods": periods,
        "confidence": sup.config.confidence,
    })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ValuesFilter {
    period: Option<String>,
    indicator: Option<String>,
    unit: Option<String>,
    level: Option<String>,
    category: Option<String>,
}

impl ValuesFilter {
    fn keeps(&self, row: &Map<String, Value>) -> bool {
        let is = |field: &str, want: &Option<String>| {
            want.as_ref()
                .is_none_or(|w| row.get(field).and_then(Value::as_str) == Some(w.as_str()))
        };
        is("period", &self.period)
            && is("indicator", &self.indicator)
            && is("unit", &self.unit)
            && is("level", &self.level)
            && is("category", &self.category)
    }
}

async fn supervision_values(
    State(c): State<Shared>,
    headers: HeaderMap,
    query: Result<Query<ValuesFilter>, QueryRejection>,
) -> ApiResult {
    c.member(&headers, Area::Commission)?;
    let Query(filter) = query?;
    supervision_of(&c)?;
    let rows: Vec<Map<String, Value>> = supervision_rows(&c, "values")
        .await?
        .into_iter()
        .filter(|r| filter.keeps(r))
        .collect();
    Ok(reply::json(&json!({"values": rows})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportQuery {
    period: String,
    /// Units of this level (default: every unit).
    level: Option<String>,
    /// Only units under this one (itself included).
    under: Option<String>,
    #[serde(default)]
    lang: Option<String>,
    format: String,
}

async fn supervision_export(
    State(c): State<Shared>,
    headers: HeaderMap,
    query: Result<Query<ExportQuery>, QueryRejection>,
) -> ApiResult {
    c.member(&headers, Area::Commission)?;
    let Query(q) = query?;
    let sup = supervision_of(&c)?;
    let zh = match q.lang.as_deref() {
        None | Some("en") => false,
        Some("zh") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "lang={other}: give en or zh"
            )));
        }
    };
    let values = supervision_rows(&c, "values").await?;
    let pivot = crate::supervision::pivot::Pivot::new(
        sup,
        &values,
        &q.period,
        q.level.as_deref(),
        q.under.as_deref(),
        zh,
    )
    .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, e))?;
    let stem = format!("supervision-{}", q.period);
    let (body, content_type, ext) = match q.format.as_str() {
        "csv" => (pivot.csv().into_bytes(), "text/csv; charset=utf-8", "csv"),
        "xlsx" => (
            pivot
                .xlsx()
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?,
            "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            "xlsx",
        ),
        other => {
            return Err(ApiError::bad_request(format!(
                "format={other}: give csv or xlsx"
            )));
        }
    };
    let mut r = reply::file(body, content_type, "no-store");
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{stem}.{ext}\"")) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}

/// Runs a statement for `user` as Flight SQL does (plan, then execute):
/// its answer as JSON.
async fn statement(
    c: &Console,
    user: &User,
    study: Option<&str>,
    sql: &str,
) -> Result<Value, ApiError> {
    let (_, handle) = c.state.plan(sql, user, study).await?;
    let (schema, batches) = c.state.execute(handle.to_string().as_bytes(), user).await?;
    json::table(&schema, &batches).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))
}

async fn studies(State(c): State<Shared>, headers: HeaderMap) -> ApiResult {
    let user = c.member(&headers, Area::Research)?;
    Ok(reply::json(&json!({"studies": c.state.studies_of(&user)?})))
}

/// A study name as it may stand in a statement (letters, digits, `_`
/// and `-`, as `confer study create` allows).
fn quote_ident(name: &str) -> Result<&str, ApiError> {
    if !name.is_empty()
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
    {
        Ok(name)
    } else {
        Err(ApiError::bad_request(format!(
            "study name {name:?}: letters, digits, '_' and '-' only"
        )))
    }
}

async fn study(State(c): State<Shared>, headers: HeaderMap, Path(name): Path<String>) -> ApiResult {
    let user = c.member(&headers, Area::Research)?;
    let study = member_study(&c, &user, &name)?;
    let name = quote_ident(&study.name)?;
    // Every node's figures for the study; nothing is spent.
    let budget = statement(
        &c,
        &user,
        Some(name),
        &format!("SHOW PRIVACY BUDGET FOR STUDY '{name}'"),
    )
    .await;
    let (budget, budget_error) = match budget {
        Ok(b) => (b, Value::Null),
        Err(e) => (Value::Null, Value::String(e.message)),
    };
    Ok(reply::json(&json!({
        "study": study,
        "budget": budget,
        "budget_error": budget_error,
    })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    study: Option<String>,
    limit: Option<usize>,
}

async fn queries(
    State(c): State<Shared>,
    headers: HeaderMap,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> ApiResult {
    let user = c.member(&headers, Area::Research)?;
    let Query(q) = query?;
    if let Some(s) = &q.study {
        member_study(&c, &user, s)?;
    }
    let limit = q.limit.unwrap_or(50).clamp(1, MAX_HISTORY);
    // Admins see everyone's history; others their own.
    let who = (user.role != Role::Admin).then_some(user.name.as_str());
    let mut out = Vec::new();
    for r in c
        .state
        .store
        .results(who, q.study.as_deref(), limit)
        .map_err(ProtocolError::from)?
    {
        let result = decode_ipc(&r.result).unwrap_or_else(|e| json!({"error": e}));
        out.push(json!({
            "query_id": r.query_id,
            "study": r.study,
            "user": r.user,
            "created_ms": r.created_ms,
            "sites": r.sites,
            "statement": r.statement,
            "epsilon": r.cost.map(|c| c.0),
            "delta": r.cost.map(|c| c.1),
            "rho": r.cost.map(|c| c.2),
            "result": result,
        }));
    }
    Ok(reply::json(&json!({"queries": out})))
}

fn decode_ipc(bytes: &[u8]) -> Result<Value, String> {
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .map_err(|e| e.to_string())?;
    let schema = reader.schema();
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    json::table(&schema, &batches)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Statement {
    study: String,
    sql: String,
}

async fn explain(State(c): State<Shared>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let user = c.member(&headers, Area::Research)?;
    let Statement { study, sql } = reply::parse_json(&headers, &body)?;
    member_study(&c, &user, &study)?;
    let sql = query_box(&sql)?;
    let upper = sql.to_ascii_uppercase();
    let sql = if upper.starts_with("EXPLAIN") {
        sql.to_string()
    } else {
        format!("EXPLAIN PRIVACY {sql}")
    };
    Ok(reply::json(
        &statement(&c, &user, Some(&study), &sql).await?,
    ))
}

/// The statements the query box runs: DP queries (and EXPLAIN PRIVACY).
/// Budgets are read on the study's page, for the studies one is in.
fn query_box(sql: &str) -> Result<&str, ApiError> {
    let sql = sql.trim();
    if sql
        .split_whitespace()
        .next()
        .is_some_and(|w| w.eq_ignore_ascii_case("SHOW"))
    {
        return Err(ApiError::bad_request(
            "the console runs queries here; a study's budget is on its page (GET /api/v1/studies/<name>)",
        ));
    }
    Ok(sql)
}

async fn run_query(State(c): State<Shared>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let user = c.member(&headers, Area::Research)?;
    let Statement { study, sql } = reply::parse_json(&headers, &body)?;
    member_study(&c, &user, &study)?;
    let sql = query_box(&sql)?;
    Ok(reply::json(&statement(&c, &user, Some(&study), sql).await?))
}

async fn train_jobs(State(c): State<Shared>, headers: HeaderMap) -> ApiResult {
    let user = c.member(&headers, Area::Research)?;
    let jobs = crate::train::visible_jobs(&c.state, &user, true)?;
    Ok(reply::json(&json!({"jobs": jobs})))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NodesQuery {
    /// Check every node now rather than report the last periodic check.
    refresh: Option<bool>,
}

async fn nodes(
    State(c): State<Shared>,
    headers: HeaderMap,
    query: Result<Query<NodesQuery>, QueryRejection>,
) -> ApiResult {
    c.member(&headers, Area::Operations)?;
    let Query(q) = query?;
    if q.refresh.unwrap_or(false) {
        c.state.check_health().await;
    }
    let held: BTreeMap<String, String> = c
        .state
        .store
        .holds()
        .map_err(ProtocolError::from)?
        .into_iter()
        .collect();
    let nodes: Vec<Value> = c
        .state
        .node_statuses()
        .into_iter()
        .map(|n| {
            let mut v = serde_json::to_value(&n).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.insert(
                    "held".into(),
                    held.get(&n.name)
                        .cloned()
                        .map_or(Value::Null, Value::String),
                );
            }
            v
        })
        .collect();
    Ok(reply::json(&json!({"nodes": nodes})))
}

async fn status(State(c): State<Shared>, headers: HeaderMap) -> ApiResult {
    c.member(&headers, Area::Operations)?;
    let statuses = c.state.node_statuses();
    let (records, problem) = c.state.store.verify_audit().map_err(ProtocolError::from)?;
    let jobs = c.state.store.jobs().map_err(ProtocolError::from)?;
    let running = jobs.iter().filter(|j| !j.status.state.is_final()).count();
    Ok(reply::json(&json!({
        "version": env!("CARGO_PKG_VERSION"),
        "started_ms": c.started_ms,
        "uptime_secs": c.started.elapsed().as_secs(),
        "nodes": statuses.len(),
        "nodes_healthy": statuses.iter().filter(|n| n.healthy).count(),
        "audit": {"records": records, "intact": problem.is_none(), "problem": problem},
        "supervision": c.state.supervision.is_some(),
        "studies": c.state.store.studies().map_err(ProtocolError::from)?.len(),
        "training_jobs": jobs.len(),
        "training_jobs_running": running,
    })))
}
