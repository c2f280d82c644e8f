//! The query API: rows with their as-of, consistency controls, status, export.
//!
//! ```text
//!  GET  /v1/tables/{table}/rows/{key}   ?min_lsn=0/16B3748&wait_ms=500&max_staleness_ms=2000
//!  POST /v1/tables/{table}/batch        {"keys": [42, 43], "min_lsn": ..., "wait_ms": ..., "max_staleness_ms": ...}
//!  GET  /v1/tables/{table}/export       NDJSON: every held key with its position (for verify)
//!  GET  /v1/status                      positions, lag, watermark, readiness, entries, evictions
//!  GET  /v1/invalidations               server-sent events: every key change and coverage, in apply order
//!  GET  /healthz /readyz                (no token needed)
//!  GET  /metrics                        (the token too, when the listener is not loopback)
//! ```
//!
//! Limits (tower layers): a request timeout, a body size limit, a cap on requests in flight
//! (more are shed with 503 `overloaded`, not queued) and one on `min_lsn` reads waiting.
//!
//! Every answer says as of when it is true: the row's own position (LSN, commit time) and the
//! table's (the watermark of the producer feeding it, which it is complete up to), plus
//! staleness. A key the view cannot vouch for answers `unknown` (HTTP 409), never `absent`
//! (404). A request that asks for more consistency than the view has gets 503 with the
//! reason, so the caller can fall back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value as Json, json};
use walcache_common::config::Secret;
use walcache_schemas::{Lsn, Position, micros_to_rfc3339};

use crate::read::{self, Consistency, KeyAnswer, Refusal, ViewAsOf, key_answer};
use crate::store::Held;
use crate::view::{TableView, View};
use crate::watermark::Coverage;

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct Api {
    pub view: Arc<View>,
    pub token: Option<Secret>,
    /// Required for exports when set (the read token is then not enough).
    pub export_token: Option<Secret>,
    pub max_batch: usize,
    pub max_wait: Duration,
    /// Permits for `min_lsn` reads waiting at once.
    pub waiting: Arc<tokio::sync::Semaphore>,
    /// Permits for invalidation streams open at once.
    pub streams: Arc<tokio::sync::Semaphore>,
    /// Ends the invalidation streams on shutdown (they would hold a graceful shutdown open).
    pub cancel: tokio_util::sync::CancellationToken,
    pub limits: Limits,
}

/// The HTTP limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub request_timeout: Duration,
    pub max_concurrent_requests: usize,
    pub max_body_bytes: usize,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").field("max_batch", &self.max_batch).finish_non_exhaustive()
    }
}

/// An API error: status, stable code, message for people, optional details.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Json,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), details: Json::Null }
    }

    fn with(mut self, details: Json) -> Self {
        self.details = details;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.code, "message": self.message });
        if let (Json::Object(extra), Some(map)) = (self.details, body.as_object_mut()) {
            map.extend(extra);
        }
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The `/v1` routes (token-protected when a token is configured), with the limits.
pub fn router(api: Api) -> Router {
    let limits = api.limits;
    Router::new()
        .route("/v1/tables/{table}/rows/{key}", get(get_row))
        .route("/v1/tables/{table}/batch", post(batch))
        .route("/v1/tables/{table}/export", get(export))
        .route("/v1/status", get(status))
        .route("/v1/invalidations", get(invalidations))
        .layer(middleware::from_fn_with_state(api.clone(), authenticate))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(limits.max_body_bytes))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            limits.request_timeout,
        ))
        .layer(
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(|_: tower::BoxError| async {
                    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", "too many requests in flight; retry")
                }))
                .load_shed()
                .concurrency_limit(limits.max_concurrent_requests),
        )
        .layer(middleware::from_fn_with_state(api.clone(), observe))
        .with_state(api)
}

/// Puts `/metrics` behind the read token (for listeners other hosts can reach).
pub fn protect(router: Router, api: Api) -> Router {
    router.layer(middleware::from_fn_with_state(api, authenticate))
}

async fn authenticate(State(api): State<Api>, request: Request, next: Next) -> Response {
    let is_export = request.uri().path().ends_with("/export");
    let (required, which) = match (&api.export_token, &api.token) {
        (Some(export), _) if is_export => (Some(export), "the export token"),
        (_, read) => (read.as_ref(), "the token"),
    };
    if let Some(token) = required {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let matches =
            given.is_some_and(|g| bool::from(subtle::ConstantTimeEq::ct_eq(g.as_bytes(), token.expose().as_bytes())));
        if !matches {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!("send Authorization: Bearer <{which}>"),
            )
            .into_response();
        }
    }
    next.run(request).await
}

async fn observe(State(api): State<Api>, request: Request, next: Next) -> Response {
    let route =
        request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    let m = &api.view.metrics;
    m.request_seconds.with_label_values(&[&route]).observe(started.elapsed().as_secs_f64());
    m.requests.with_label_values(&[&route, response.status().as_str()]).inc();
    response
}

/// Consistency options of a read.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadOptions {
    /// Wait until the view covers this LSN (`16/B374D848` or a decimal number).
    pub min_lsn: Option<String>,
    /// How long to wait for `min_lsn` (capped by the server's `http.max_wait`; default 1000).
    pub wait_ms: Option<u64>,
    /// Refuse (503) if the view is older than this.
    pub max_staleness_ms: Option<u64>,
}

fn view_json(view: &ViewAsOf) -> Json {
    json!({
        "view_lsn": view.coverage.map(|c| c.lsn),
        "view_time": view.coverage.map(|c| micros_to_rfc3339(c.commit_ts_micros)),
        "staleness_ms": view.staleness_ms,
    })
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        let details = match &refusal {
            Refusal::MinLsnNotReached { min_lsn, view_lsn, waited } => json!({
                "min_lsn": min_lsn,
                "view_lsn": view_lsn,
                "waited_ms": waited.as_millis() as u64,
            }),
            Refusal::TooStale { staleness_ms, max_staleness_ms } => {
                json!({ "staleness_ms": staleness_ms, "max_staleness_ms": max_staleness_ms })
            }
            _ => Json::Null,
        };
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, refusal.code(), refusal.to_string()).with(details)
    }
}

async fn consistent_view(api: &Api, table: &TableView, options: &ReadOptions) -> Result<ViewAsOf, ApiError> {
    let min_lsn = match &options.min_lsn {
        Some(text) => Some(text.parse::<Lsn>().map_err(|e: walcache_schemas::position::ParseLsnError| {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_min_lsn", e.to_string())
        })?),
        None => None,
    };
    let demand = Consistency {
        min_lsn,
        wait: Duration::from_millis(options.wait_ms.unwrap_or(1000)).min(api.max_wait),
        max_staleness: options.max_staleness_ms.map(Duration::from_millis),
    };
    Ok(read::consistent_view(&api.view, table, &demand, Some(&api.waiting)).await?)
}

fn table<'a>(api: &'a Api, name: &str) -> Result<&'a TableView, ApiError> {
    api.view.table(name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_table",
            format!("no table {name:?}; this view serves {}", api.view.table_names().join(", ")),
        )
    })
}

fn position_json(p: &Position) -> Json {
    json!({
        "lsn": p.lsn,
        "commit_time": micros_to_rfc3339(p.commit_ts_micros),
        "txid": p.txid,
        "index": p.index,
        "snapshot": p.snapshot,
    })
}

/// One key's answer, as JSON, and its state name.
fn answer(
    t: &TableView,
    key_body: &[u8],
    key_json: Json,
    view: &ViewAsOf,
    metrics: &crate::metrics::Metrics,
) -> (Json, &'static str) {
    let KeyAnswer { state, row, position: row_pos, reason } = key_answer(t, key_body, view, metrics);
    let state = state.as_str();
    let (state, value, reason) = match row.map(|r| t.spec.reader.row.row_to_json(&r)) {
        Some(Ok(v)) => (state, Json::Object(v), reason),
        Some(Err(_)) => ("unknown", Json::Null, Some("undecodable_row".to_string())),
        None => (state, Json::Null, reason),
    };
    let body = json!({
        "key": key_json,
        "state": state,
        "value": value,
        "reason": reason,
        "as_of": {
            "row_lsn": row_pos.map(|p| p.lsn),
            "row_commit_time": row_pos.map(|p| micros_to_rfc3339(p.commit_ts_micros)),
            "row_txid": row_pos.map(|p| p.txid),
            "view_lsn": view.coverage.map(|c| c.lsn),
            "view_time": view.coverage.map(|c| micros_to_rfc3339(c.commit_ts_micros)),
        },
        "staleness_ms": view.staleness_ms,
    });
    (body, state)
}

/// One key's answer in the binary form of [`walcache_schemas::wire`]: the row's Avro bytes as
/// they are held, the rest in headers.
fn avro_answer(t: &TableView, key_body: &[u8], view: &ViewAsOf, metrics: &crate::metrics::Metrics) -> Response {
    use walcache_schemas::wire;
    let KeyAnswer { state, row, position, reason } = key_answer(t, key_body, view, metrics);
    let state = state.as_str();
    let mut headers = axum::http::HeaderMap::new();
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = header::HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    put(header::CONTENT_TYPE.as_str(), wire::AVRO_ROW_MEDIA_TYPE.to_string());
    put(wire::STATE_HEADER, state.to_string());
    if let Some(reason) = reason {
        put(wire::REASON_HEADER, reason);
    }
    let reader = t.spec.reader;
    put(wire::ROW_VERSION_HEADER, wire::row_version_header(reader.version, reader.doc.fingerprint));
    if let Some(p) = position {
        put(wire::ROW_POSITION_HEADER, wire::position_header(&p));
    }
    if let Some(c) = view.coverage {
        put(wire::VIEW_HEADER, wire::view_header(c.lsn, c.commit_ts_micros));
    }
    (status_of(state), headers, row.unwrap_or_default()).into_response()
}

fn key_json_of(t: &TableView, body: &[u8]) -> Json {
    match t.spec.contract.key_plan.row_to_json(body) {
        Ok(map) if map.len() == 1 => map.into_iter().next().map(|(_, v)| v).unwrap_or(Json::Null),
        Ok(map) => Json::Object(map),
        Err(_) => Json::Null,
    }
}

/// Whether the caller asked for the binary answer (`Accept: application/vnd.walcache.avro`).
fn wants_avro(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().starts_with(walcache_schemas::wire::AVRO_ROW_MEDIA_TYPE)))
}

async fn get_row(
    State(api): State<Api>,
    request_headers: axum::http::HeaderMap,
    Path((table_name, key)): Path<(String, String)>,
    options: Result<Query<ReadOptions>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(options) = options.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?;
    let t = table(&api, &table_name)?;
    let body = t.spec.contract.key_from_text(&[key.as_str()]).map_err(|v| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_key",
            if t.spec.contract.key_plan.fields.len() > 1 {
                "this table has a composite key: use POST .../batch with {\"keys\": [{...}]}".to_string()
            } else {
                v.to_string()
            },
        )
    })?;
    let view = consistent_view(&api, t, &options).await?;
    if wants_avro(&request_headers) {
        return Ok(avro_answer(t, &body, &view, &api.view.metrics));
    }
    let (answer, state) = answer(t, &body, key_json_of(t, &body), &view, &api.view.metrics);
    let status = status_of(state);
    Ok((status, axum::Json(answer_with_table(&t.spec.name, answer))).into_response())
}

/// The HTTP status of a single-key answer. `unknown` is not a 404: the row may well exist,
/// and a generic client must not conclude it does not. Nor is it a 5xx: the consumer is
/// healthy, and a load balancer must not eject it for keys it cannot vouch for.
fn status_of(state: &str) -> StatusCode {
    match state {
        "present" => StatusCode::OK,
        "unknown" => StatusCode::CONFLICT,
        _ => StatusCode::NOT_FOUND,
    }
}

fn answer_with_table(table: &str, mut answer: Json) -> Json {
    if let Some(map) = answer.as_object_mut() {
        map.insert("table".into(), Json::String(table.to_string()));
    }
    answer
}

/// A batch request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub keys: Vec<Json>,
    #[serde(flatten)]
    pub options: ReadOptionsBody,
}

/// Read options in a JSON body (`min_lsn` may be text or a number).
#[derive(Debug, Default, Deserialize)]
pub struct ReadOptionsBody {
    pub min_lsn: Option<Lsn>,
    pub wait_ms: Option<u64>,
    pub max_staleness_ms: Option<u64>,
}

async fn batch(
    State(api): State<Api>,
    Path(table_name): Path<String>,
    request: Result<axum::Json<BatchRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let axum::Json(request) =
        request.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    let t = table(&api, &table_name)?;
    if request.keys.len() > api.max_batch {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("{} keys; at most {} per request", request.keys.len(), api.max_batch),
        ));
    }
    let mut bodies = Vec::with_capacity(request.keys.len());
    for (i, k) in request.keys.iter().enumerate() {
        let body = t.spec.contract.key_from_json(k).map_err(|v| {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_key", format!("keys[{i}]: {v}")).with(json!({ "index": i }))
        })?;
        bodies.push(body);
    }
    let options = ReadOptions {
        min_lsn: request.options.min_lsn.map(|l| l.to_string()),
        wait_ms: request.options.wait_ms,
        max_staleness_ms: request.options.max_staleness_ms,
    };
    let view = consistent_view(&api, t, &options).await?;
    let results: Vec<Json> =
        bodies.iter().zip(request.keys).map(|(body, key)| answer(t, body, key, &view, &api.view.metrics).0).collect();
    Ok(axum::Json(json!({
        "table": t.spec.name,
        "view": view_json(&view),
        "results": results,
    }))
    .into_response())
}

async fn export(State(api): State<Api>, Path(table_name): Path<String>) -> Result<Response, ApiError> {
    let index = table(&api, &table_name).map(|t| t.spec.name.clone()).and_then(|name| {
        api.view
            .table_names()
            .iter()
            .position(|n| *n == name)
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown_table", name))
    })?;
    if !api.view.is_ready() {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "the view is restoring"));
    }
    let view = Arc::clone(&api.view);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(8);
    tokio::task::spawn_blocking(move || {
        let t = &view.tables[index];
        let now = ViewAsOf::of(t.coverage());
        let header = json!({ "view_lsn": now.coverage.map(|c| c.lsn), "view_time": now.coverage.map(|c| micros_to_rfc3339(c.commit_ts_micros)), "has_evicted": t.store.has_evicted() });
        let mut buf = Vec::with_capacity(1 << 16);
        buf.extend_from_slice(header.to_string().as_bytes());
        buf.push(b'\n');
        let mut open = true;
        t.store.for_each(|key, held| {
            if !open {
                return;
            }
            let line = match held {
                Held::Present { row, position } => match t.spec.reader.row.row_to_json(row) {
                    Ok(value) => json!({ "key": key_json_of(t, key), "state": "present", "position": position_json(&position), "value": value }),
                    Err(_) => json!({ "key": key_json_of(t, key), "state": "unknown", "position": position_json(&position), "reason": "undecodable_row" }),
                },
                Held::Deleted { position } => {
                    json!({ "key": key_json_of(t, key), "state": "deleted", "position": position_json(&position) })
                }
                Held::Unknown { position, reason } => json!({
                    "key": key_json_of(t, key),
                    "state": "unknown",
                    "position": position.map(|p| position_json(&p)),
                    "reason": reason,
                }),
            };
            buf.extend_from_slice(line.to_string().as_bytes());
            buf.push(b'\n');
            if buf.len() >= 1 << 16 {
                open = tx.blocking_send(Ok(bytes::Bytes::from(std::mem::take(&mut buf)))).is_ok();
            }
        });
        if open && !buf.is_empty() {
            let _ = tx.blocking_send(Ok(bytes::Bytes::from(buf)));
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response())
}

async fn status(State(api): State<Api>) -> Response {
    let view = &api.view;
    let restore = view.restore();
    let tables: Vec<Json> = view
        .tables
        .iter()
        .map(|t| {
            let s = t.store.stats();
            json!({
                "name": t.spec.name,
                "topic": t.spec.topic,
                "contract": t.spec.contract.name,
                "contract_version": t.spec.reader.version,
                "producer": t.producer(),
                "view": view_json(&ViewAsOf::of(t.coverage())),
                "entries": s.live.load(std::sync::atomic::Ordering::Relaxed),
                "tombstones": s.tombstones.load(std::sync::atomic::Ordering::Relaxed),
                "unknown": s.unknown.load(std::sync::atomic::Ordering::Relaxed),
                "bytes": t.store.weighted_bytes(),
                "evicted_rows": s.evicted_rows.load(std::sync::atomic::Ordering::Relaxed),
                "truncated_at": t.floor().map(|p| position_json(&p)),
            })
        })
        .collect();
    let partitions: Vec<Json> = view
        .partitions()
        .into_iter()
        .map(|((topic, p), s)| json!({ "topic": topic, "partition": p, "next_offset": s.next, "high_watermark": s.high, "lag": (s.high - s.next).max(0) }))
        .collect();
    axum::Json(json!({
        "ready": view.is_ready() && view.blocked().is_none(),
        "blocked": view.blocked().map(|b| json!({ "topic": b.topic, "partition": b.partition, "offset": b.offset, "reason": b.reason })),
        "restore": { "done": restore.done, "total": restore.total, "events": restore.events, "seconds": restore.seconds },
        // Every table's, when one producer feeds them all; per table under "tables" otherwise.
        "view": view_json(&ViewAsOf::of(view.shared_coverage())),
        "tables": tables,
        "partitions": partitions,
        "dead_letters": view.dead_letters.load(std::sync::atomic::Ordering::Relaxed),
    }))
    .into_response()
}

/// The invalidation stream near-caches follow (server-sent events, one JSON object per event):
///
/// ```text
///  {"type":"hello","applied":{"t":"0/16B3790"}}                  first: drop everything held
///  {"type":"coverage","table":"t","lsn":"0/16B3748","time_micros":..}   current coverage of each table, then every advance
///  {"type":"key","table":"t","key":"42","lsn":"0/16B3700"}        the key changed (lsn null: it became unknown)
///  {"type":"reset","table":"t","applied":{"t":"0/16B3800"}}       drop everything of t (null: of every table)
/// ```
///
/// In apply order: when a client reads `coverage` X, it has read every key event up to X, so
/// an entry not invalidated by then is still the view's answer as of X. A client too slow to
/// keep up gets a `reset` rather than a gap. `applied` (per table, the highest LSN of a change
/// this view had applied when the stream began or the reset was sent) covers what the stream
/// does not list: a read answered by another replica whose view is below it may lack such a
/// change, and must not be held as current.
async fn invalidations(State(api): State<Api>) -> Result<Response, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;

    use crate::view::Invalidation;
    let permit = Arc::clone(&api.streams).try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            "too many invalidation streams are open (http.max_invalidation_streams); near-caches fall back to their TTL",
        )
    })?;
    // Subscribed before the coverage is read: nothing between the two is missed.
    let rx = api.view.subscribe_invalidations();
    let view = Arc::clone(&api.view);
    let name = |i: usize| view.tables.get(i).map(|t| t.spec.name.clone());
    let coverage_event = |table: Option<String>, c: &Coverage| json!({ "type": "coverage", "table": table, "lsn": c.lsn, "time_micros": c.commit_ts_micros });
    let applied = |view: &View| -> serde_json::Map<String, Json> {
        view.tables.iter().filter_map(|t| Some((t.spec.name.clone(), json!(t.applied_lsn()?)))).collect()
    };
    let mut first = vec![json!({ "type": "hello", "applied": applied(&view) })];
    for (i, t) in view.tables.iter().enumerate() {
        if let Some(c) = t.coverage() {
            first.push(coverage_event(name(i), &c));
        }
    }
    let head = futures::stream::iter(first);
    let open = OpenStream::new(permit, view.metrics.invalidation_streams.clone());
    let state = (rx, Arc::clone(&view), open, api.cancel.clone());
    let tail = futures::stream::unfold(state, move |(mut rx, view, open, cancel)| async move {
        let name = |i: usize| view.tables.get(i).map(|t| t.spec.name.clone());
        let received = tokio::select! {
            _ = cancel.cancelled() => return None,
            received = rx.recv() => received,
        };
        let event = match received {
            Ok(Invalidation::Key { table, key, position }) => {
                let key = view.tables.get(table).map(|t| match key_json_of(t, &key) {
                    Json::String(s) => s,
                    other => other.to_string(),
                });
                json!({ "type": "key", "table": name(table), "key": key, "lsn": position.map(|p| p.lsn) })
            }
            Ok(Invalidation::Coverage { table, coverage }) => {
                json!({ "type": "coverage", "table": name(table), "lsn": coverage.lsn, "time_micros": coverage.commit_ts_micros })
            }
            Ok(Invalidation::Reset { table, lsn }) => {
                let table = name(table);
                let applied: serde_json::Map<String, Json> = table.iter().map(|n| (n.clone(), json!(lsn))).collect();
                json!({ "type": "reset", "table": table, "applied": applied })
            }
            Err(RecvError::Lagged(_)) => {
                view.metrics.invalidation_lagged.inc();
                // Read now: at or past every change this stream skipped.
                json!({ "type": "reset", "table": null, "applied": applied(&view) })
            }
            Err(RecvError::Closed) => return None,
        };
        Some((event, (rx, view, open, cancel)))
    });
    use futures::StreamExt;
    let events = head.chain(tail).map(|e| Ok::<_, std::convert::Infallible>(Event::default().data(e.to_string())));
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(5))).into_response())
}

/// An open invalidation stream: holds its permit and is counted while the response lives.
struct OpenStream {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
}

impl OpenStream {
    fn new(permit: tokio::sync::OwnedSemaphorePermit, gauge: prometheus::IntGauge) -> OpenStream {
        gauge.inc();
        OpenStream { _permit: permit, gauge }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Fallback for unknown paths: a JSON 404.
pub async fn not_found() -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint; see /v1/status").into_response()
}
