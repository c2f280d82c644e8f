//! Typed reads from the cache, resilient by default.
//!
//! ```text
//!  get(key) ─► near-cache? ─► breaker permits? ─► HTTP GET (timeout) ─► retry transient errors
//!                                                                       with jittered backoff
//!  answer = state (present/deleted/absent/unknown) + value + as_of {row LSN/time, view LSN/time}
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value as Json;
use walcache_schemas::{Lsn, TableContract, wire};

use crate::breaker::{BreakerConfig, BreakerState, CircuitBreaker, Permit};
use crate::error::ClientError;
use crate::metrics::ClientMetrics;
use crate::near::Near;

/// Client settings: start from `ClientOptions::default()` and change what you need.
///
/// ```
/// use std::time::Duration;
/// use walcache_client::{BreakerConfig, ClientOptions};
/// let options = ClientOptions::default()
///     .timeout(Duration::from_millis(200))
///     .retries(1)
///     .breaker(BreakerConfig::new(5, Duration::from_secs(2)));
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientOptions {
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Extra attempts for transient errors.
    pub retries: u32,
    /// First backoff; doubles per attempt, with full jitter.
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub breaker: BreakerConfig,
    /// A small in-process cache in front of the HTTP calls.
    pub near_cache: Option<NearCacheOptions>,
    /// Bearer token for the query API.
    pub token: Option<String>,
    /// The client's own metrics ([`ClientMetrics::register`] them in your registry).
    pub metrics: Option<ClientMetrics>,
    /// How typed single-key reads travel.
    pub wire: Wire,
    /// Speak HTTP/2 without TLS (h2c, prior knowledge): every read of this client multiplexed
    /// on one connection per consumer instead of a pool of HTTP/1.1 connections.
    pub http2: bool,
}

/// The form of a typed single-key read's answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Wire {
    /// The row's Avro bytes as the cache holds them, as-of in headers, decoded here with the
    /// contract (`Accept: application/vnd.walcache.avro`): no JSON on either side.
    #[default]
    Avro,
    /// The JSON answer people and curl read.
    Json,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_millis(500),
            retries: 2,
            backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(500),
            breaker: BreakerConfig::default(),
            near_cache: None,
            token: None,
            metrics: None,
            wire: Wire::default(),
            http2: false,
        }
    }
}

impl ClientOptions {
    /// Per-attempt timeout (a `min_lsn` wait is added to it).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Extra attempts for transient errors.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// First backoff (doubling, full jitter) and its cap.
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff = first;
        self.max_backoff = max;
        self
    }

    pub fn breaker(mut self, breaker: BreakerConfig) -> Self {
        self.breaker = breaker;
        self
    }

    pub fn near_cache(mut self, near_cache: NearCacheOptions) -> Self {
        self.near_cache = Some(near_cache);
        self
    }

    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn metrics(mut self, metrics: ClientMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn wire(mut self, wire: Wire) -> Self {
        self.wire = wire;
        self
    }

    /// HTTP/2 without TLS (h2c): reads multiplexed on one connection.
    pub fn http2(mut self) -> Self {
        self.http2 = true;
        self
    }
}

/// Near-cache settings: answers kept in process for `ttl`, or up to `hold` while the
/// consumer's invalidation stream is followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct NearCacheOptions {
    pub capacity: u64,
    pub ttl: Duration,
    /// Follow `/v1/invalidations` and keep entries up to this long while connected.
    pub hold: Option<Duration>,
}

impl NearCacheOptions {
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        NearCacheOptions { capacity, ttl, hold: None }
    }

    /// Follow the consumer's invalidation stream (`GET /v1/invalidations`): while connected,
    /// an entry lives up to `hold` and is answered as of the newest coverage the stream
    /// announced; without the stream, entries live `ttl`. Create the client inside a Tokio
    /// runtime (the stream is read by a task on it).
    pub fn follow_invalidations(mut self, hold: Duration) -> Self {
        self.hold = Some(hold);
        self
    }
}

/// Per-read consistency options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReadOptions {
    /// Read your writes: the view must cover this LSN (the near-cache is bypassed).
    pub min_lsn: Option<Lsn>,
    /// How long the server may wait for `min_lsn`.
    pub wait: Option<Duration>,
    /// Refuse answers from a view older than this.
    pub max_staleness: Option<Duration>,
    /// Overrides the client's per-attempt timeout.
    pub timeout: Option<Duration>,
}

impl ReadOptions {
    pub fn min_lsn(mut self, lsn: Lsn) -> Self {
        self.min_lsn = Some(lsn);
        self
    }

    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    pub fn max_staleness(mut self, max: Duration) -> Self {
        self.max_staleness = Some(max);
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// What the view knows about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowState {
    Present,
    /// Deleted at `as_of.row_lsn`.
    Deleted,
    /// Never seen by a complete view.
    Absent,
    /// The view cannot vouch for the key (it may have been evicted).
    Unknown,
}

/// As of when an answer is true.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AsOf {
    /// Commit LSN of the change that wrote the row (or deleted it).
    pub row_lsn: Option<Lsn>,
    pub row_commit_time: Option<DateTime<Utc>>,
    pub row_txid: Option<u64>,
    /// The view is complete up to this LSN...
    pub view_lsn: Option<Lsn>,
    /// ...committed at this time.
    pub view_time: Option<DateTime<Utc>>,
}

impl AsOf {
    /// Now minus the view's time.
    pub fn staleness(&self) -> Option<Duration> {
        self.view_time.map(|t| (Utc::now() - t).to_std().unwrap_or_default())
    }
}

/// One read.
#[derive(Debug, Clone, PartialEq)]
pub struct Read<T> {
    pub state: RowState,
    pub value: Option<T>,
    pub as_of: AsOf,
    /// Served from the in-process near-cache.
    pub from_near_cache: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct WireAnswer {
    pub(crate) state: String,
    #[serde(default)]
    pub(crate) value: Json,
    pub(crate) as_of: WireAsOf,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct WireAsOf {
    pub(crate) row_lsn: Option<Lsn>,
    pub(crate) row_commit_time: Option<DateTime<Utc>>,
    pub(crate) row_txid: Option<u64>,
    pub(crate) view_lsn: Option<Lsn>,
    pub(crate) view_time: Option<DateTime<Utc>>,
}

#[derive(Debug, Deserialize)]
struct WireBatch {
    results: Vec<WireAnswer>,
}

#[derive(Debug, Deserialize)]
struct WireError {
    error: String,
    message: String,
}

impl WireAnswer {
    fn into_read<T: TableContract>(self, from_near_cache: bool) -> Result<Read<T>, ClientError> {
        let state = match self.state.as_str() {
            "present" => RowState::Present,
            "deleted" => RowState::Deleted,
            "absent" => RowState::Absent,
            "unknown" => RowState::Unknown,
            other => return Err(ClientError::Decode(format!("unknown state {other:?}"))),
        };
        let value = if state == RowState::Present {
            Some(
                serde_json::from_value(self.value)
                    .map_err(|e| ClientError::Decode(format!("row of {}: {e}", T::CONTRACT)))?,
            )
        } else {
            None
        };
        let a = self.as_of;
        Ok(Read {
            state,
            value,
            as_of: AsOf {
                row_lsn: a.row_lsn,
                row_commit_time: a.row_commit_time,
                row_txid: a.row_txid,
                view_lsn: a.view_lsn,
                view_time: a.view_time,
            },
            from_near_cache,
        })
    }
}

/// A cache client. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: reqwest::Url,
    options: ClientOptions,
    breaker: Arc<CircuitBreaker>,
    near: Option<Arc<Near>>,
    /// Answers from a view in this process instead of HTTP.
    #[cfg(feature = "embedded")]
    embedded: Option<Arc<crate::embedded::EmbeddedView>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base.as_str()).finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the consumer at `base_url` (`http://walcache-consumer:8080`).
    ///
    /// ```
    /// use walcache_client::{Client, ClientOptions};
    /// let client = Client::new("http://127.0.0.1:8080", ClientOptions::default()).expect("a valid URL");
    /// # let _ = client;
    /// ```
    pub fn new(base_url: &str, options: ClientOptions) -> Result<Client, ClientError> {
        let base = reqwest::Url::parse(base_url).map_err(|e| ClientError::Rejected {
            status: 0,
            code: "bad_url".into(),
            message: format!("{base_url:?} is not a URL: {e}"),
        })?;
        let builder = reqwest::Client::builder().pool_max_idle_per_host(64).tcp_nodelay(true);
        let builder = if options.http2 { builder.http2_prior_knowledge() } else { builder };
        let http = builder.build().map_err(|e| ClientError::Transport(e.to_string()))?;
        let near = options.near_cache.map(|n| {
            let near = Near::new(n.capacity, n.ttl, n.hold, options.metrics.clone());
            near.follow(http.clone(), base.clone(), options.token.clone());
            Arc::new(near)
        });
        Ok(Client {
            http,
            base,
            breaker: Arc::new(CircuitBreaker::new(options.breaker)),
            options,
            near,
            #[cfg(feature = "embedded")]
            embedded: None,
        })
    }

    /// A client that answers `get` and `get_many` from `view`, in this process: no HTTP, no
    /// near-cache (the view is already local), no breaker or retries (nothing to time out).
    /// The answers, `as_of` and refusals are the remote API's. `status`, `export` and
    /// `get_json` need a consumer's HTTP API and are refused.
    #[cfg(feature = "embedded")]
    pub fn embedded(view: Arc<crate::embedded::EmbeddedView>, options: ClientOptions) -> Result<Client, ClientError> {
        let mut client =
            Client::new("http://embedded.walcache.invalid/", ClientOptions { near_cache: None, ..options })?;
        client.embedded = Some(view);
        Ok(client)
    }

    /// Refuses what only a consumer's HTTP API can do, on an embedded client.
    fn remote_only(&self, what: &str) -> Result<(), ClientError> {
        #[cfg(feature = "embedded")]
        if self.embedded.is_some() {
            return Err(ClientError::Rejected {
                status: 0,
                code: "embedded".into(),
                message: format!("{what} needs a walcache-consumer's HTTP API; this client reads an embedded view"),
            });
        }
        let _ = what;
        Ok(())
    }

    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// Counts an answer of a [`Fallback`](crate::Fallback) read by the path that gave it.
    pub(crate) fn count_answer(&self, source: &str, reason: &str) {
        if let Some(m) = &self.options.metrics {
            m.answers.with_label_values(&[source, reason]).inc();
        }
    }

    #[cfg(feature = "embedded")]
    fn count_read(&self, state: RowState) {
        if let Some(m) = &self.options.metrics {
            m.reads
                .with_label_values(&[match state {
                    RowState::Present => "present",
                    RowState::Deleted => "deleted",
                    RowState::Absent => "absent",
                    RowState::Unknown => "unknown",
                }])
                .inc();
        }
    }

    /// Reads one row.
    pub async fn get<T: TableContract>(&self, key: &T::Key, options: &ReadOptions) -> Result<Read<T>, ClientError> {
        let key_json = serde_json::to_value(key).map_err(|e| ClientError::Decode(format!("key: {e}")))?;
        let segment = match &key_json {
            Json::String(s) => s.clone(),
            Json::Number(n) => n.to_string(),
            other => {
                return Err(ClientError::Rejected {
                    status: 0,
                    code: "composite_key".into(),
                    message: format!("key {other} is composite: use get_many"),
                });
            }
        };
        #[cfg(feature = "embedded")]
        if let Some(view) = &self.embedded {
            let read = view.read::<T>(std::slice::from_ref(&key_json), options).await?.pop();
            let read = read.ok_or_else(|| ClientError::Decode("no answer for the key".into()))?;
            self.count_read(read.state);
            return Ok(read);
        }
        let near_key = (T::CONTRACT.to_string(), segment.clone());
        if options.min_lsn.is_none()
            && let Some(near) = &self.near
            && let Some(hit) = near.get(&near_key).await
        {
            let read = hit.into_read::<T>(true)?;
            if options.max_staleness.is_none_or(|max| read.as_of.staleness().is_some_and(|s| s <= max)) {
                return Ok(read);
            }
        }
        let pending = self.near.as_ref().map(|n| n.start(near_key));
        let mut url = self.base.clone();
        url.path_segments_mut().map_err(|_| ClientError::Decode("base URL cannot have a path".into()))?.extend([
            "v1",
            "tables",
            T::CONTRACT,
            "rows",
            &segment,
        ]);
        append_options(&mut url, options);
        let answer: Result<WireAnswer, ClientError> = match self.options.wire {
            Wire::Json => self.call(options, || self.http.get(url.clone())).await,
            Wire::Avro => {
                let request = || self.http.get(url.clone()).header(reqwest::header::ACCEPT, wire::AVRO_ROW_MEDIA_TYPE);
                self.call_with(options, request, read_avro_answer::<T>).await
            }
        };
        if let (Some(near), Some(pending)) = (&self.near, pending) {
            near.finish(pending, answer.as_ref().ok()).await;
        }
        let answer = answer?;
        if let Some(m) = &self.options.metrics {
            m.reads.with_label_values(&[answer.state.as_str()]).inc();
        }
        answer.into_read(false)
    }

    /// Reads one row of any table as JSON (for tools that do not know the table's type):
    /// the whole answer (state, value, as_of, staleness).
    pub async fn get_json(&self, table: &str, key: &str, options: &ReadOptions) -> Result<Json, ClientError> {
        self.remote_only("get_json")?;
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|_| ClientError::Decode("base URL cannot have a path".into()))?
            .extend(["v1", "tables", table, "rows", key]);
        append_options(&mut url, options);
        self.call(options, || self.http.get(url.clone())).await
    }

    /// Reads many rows in one request (keys in order).
    pub async fn get_many<T: TableContract>(
        &self,
        keys: &[T::Key],
        options: &ReadOptions,
    ) -> Result<Vec<Read<T>>, ClientError> {
        #[cfg(feature = "embedded")]
        if let Some(view) = &self.embedded {
            let keys = keys
                .iter()
                .map(serde_json::to_value)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ClientError::Decode(format!("key: {e}")))?;
            let reads = view.read::<T>(&keys, options).await?;
            reads.iter().for_each(|r| self.count_read(r.state));
            return Ok(reads);
        }
        let mut url = self.base.clone();
        url.path_segments_mut().map_err(|_| ClientError::Decode("base URL cannot have a path".into()))?.extend([
            "v1",
            "tables",
            T::CONTRACT,
            "batch",
        ]);
        let body = serde_json::json!({
            "keys": keys,
            "min_lsn": options.min_lsn,
            "wait_ms": options.wait.map(|w| w.as_millis() as u64),
            "max_staleness_ms": options.max_staleness.map(|m| m.as_millis() as u64),
        });
        let batch: WireBatch = self.call(options, || self.http.post(url.clone()).json(&body)).await?;
        batch.results.into_iter().map(|a| a.into_read(false)).collect()
    }

    /// The consumer's `/v1/status`.
    pub async fn status(&self) -> Result<Json, ClientError> {
        self.remote_only("status")?;
        let mut url = self.base.clone();
        url.set_path("/v1/status");
        self.call(&ReadOptions::default(), || self.http.get(url.clone())).await
    }

    /// Streams a table's export (one JSON object per held key) into `visit`; returns the
    /// header line (view LSN and time, whether anything was evicted).
    pub async fn export(&self, table: &str, mut visit: impl FnMut(Json)) -> Result<Json, ClientError> {
        self.remote_only("export")?;
        use futures::StreamExt;
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|_| ClientError::Decode("base URL cannot have a path".into()))?
            .extend(["v1", "tables", table, "export"]);
        let response = self.authorized(self.http.get(url)).send().await.map_err(transport)?;
        if !response.status().is_success() {
            let status = response.status().as_u16();
            let body = response.bytes().await.map_err(transport)?;
            return Err(error_of(status, &body));
        }
        let mut stream = response.bytes_stream();
        let mut pending = Vec::new();
        let mut header = None;
        while let Some(chunk) = stream.next().await {
            pending.extend_from_slice(&chunk.map_err(transport)?);
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                let value: Json = serde_json::from_slice(&line).map_err(|e| ClientError::Decode(e.to_string()))?;
                if header.is_none() {
                    header = Some(value);
                } else {
                    visit(value);
                }
            }
        }
        header.ok_or_else(|| ClientError::Decode("empty export".into()))
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.options.token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
    }

    /// One logical call with a JSON answer.
    async fn call<R: serde::de::DeserializeOwned>(
        &self,
        options: &ReadOptions,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<R, ClientError> {
        self.call_with(options, request, read_body).await
    }

    /// One logical call: breaker, timeout, retries with jittered backoff; `decode` reads the
    /// response.
    async fn call_with<R, Fut>(
        &self,
        options: &ReadOptions,
        request: impl Fn() -> reqwest::RequestBuilder,
        decode: impl Fn(reqwest::Response) -> Fut,
    ) -> Result<R, ClientError>
    where
        Fut: std::future::Future<Output = Result<R, ClientError>>,
    {
        // The attempt's budget covers the server's `min_lsn` wait: a lagging view answers
        // `min_lsn_not_reached` in time, and is never mistaken for a failing cache.
        let timeout = options.timeout.unwrap_or(self.options.timeout) + effective_wait(options);
        let mut attempt = 0;
        loop {
            let mut probe = match self.breaker.acquire() {
                Permit::Rejected(retry_in) => return Err(ClientError::CircuitOpen(retry_in)),
                Permit::Allowed => ProbeGuard { breaker: &self.breaker, armed: false },
                Permit::Probe => ProbeGuard { breaker: &self.breaker, armed: true },
            };
            let started = Instant::now();
            let result = match tokio::time::timeout(timeout, self.authorized(request()).send()).await {
                Err(_) => Err(ClientError::Timeout(timeout)),
                Ok(Err(e)) if e.is_timeout() => Err(ClientError::Timeout(timeout)),
                Ok(Err(e)) => Err(transport(e)),
                Ok(Ok(response)) => {
                    match tokio::time::timeout(timeout.saturating_sub(started.elapsed()), decode(response)).await {
                        Err(_) => Err(ClientError::Timeout(timeout)),
                        Ok(r) => r,
                    }
                }
            };
            self.breaker.record(result.as_ref().err().is_none_or(|e| !e.is_failure()));
            probe.armed = false;
            if let Some(m) = &self.options.metrics {
                m.requests.with_label_values(&[result.as_ref().err().map_or("ok", ClientError::label)]).inc();
                m.request_seconds.observe(started.elapsed().as_secs_f64());
                m.breaker_state.set(match self.breaker.state() {
                    BreakerState::Closed => 0,
                    BreakerState::HalfOpen => 1,
                    BreakerState::Open => 2,
                });
            }
            match result {
                Err(e) if e.is_transient() && attempt < self.options.retries => {
                    let cap = self.options.backoff.saturating_mul(1 << attempt.min(16)).min(self.options.max_backoff);
                    let jitter = Duration::from_micros(rand::random::<u64>() % (cap.as_micros() as u64 + 1));
                    tokio::time::sleep(jitter).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// The server's wait for `min_lsn` when the caller gives none (`wait_ms` defaults to 1000).
const SERVER_DEFAULT_WAIT: Duration = Duration::from_millis(1000);

fn effective_wait(options: &ReadOptions) -> Duration {
    match (options.wait, options.min_lsn) {
        (Some(w), _) => w,
        (None, Some(_)) => SERVER_DEFAULT_WAIT,
        (None, None) => Duration::ZERO,
    }
}

/// Gives a half-open breaker's probe back when its call is dropped (cancelled) before it
/// reports, so one abandoned probe cannot keep the breaker rejecting every call.
struct ProbeGuard<'a> {
    breaker: &'a CircuitBreaker,
    armed: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.breaker.release_probe();
        }
    }
}

fn transport(e: reqwest::Error) -> ClientError {
    ClientError::Transport(e.to_string())
}

/// Reads a response body: success, a 404 that is an answer (absent, deleted) or a 409 that is
/// one (unknown), parses as `R`; anything else becomes the error the body names.
async fn read_body<R: serde::de::DeserializeOwned>(response: reqwest::Response) -> Result<R, ClientError> {
    let status = response.status().as_u16();
    let bytes = response.bytes().await.map_err(transport)?;
    if (200..300).contains(&status) {
        return serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()));
    }
    if (status == 404 || status == 409)
        && let Ok(body) = serde_json::from_slice::<Json>(&bytes)
        && body.get("state").is_some()
    {
        return serde_json::from_value(body).map_err(|e| ClientError::Decode(e.to_string()));
    }
    Err(error_of(status, &bytes))
}

/// Reads a binary answer ([`walcache_schemas::wire`]); a response without its state header is
/// an error, in JSON like every error.
async fn read_avro_answer<T: TableContract>(response: reqwest::Response) -> Result<WireAnswer, ClientError> {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.map_err(transport)?;
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let Some(state) = text(wire::STATE_HEADER) else {
        return Err(error_of(status, &bytes));
    };
    let value = if state == "present" {
        let (version, fingerprint) = text(wire::ROW_VERSION_HEADER)
            .and_then(wire::parse_row_version_header)
            .ok_or_else(|| ClientError::Decode("a present row without its schema version".into()))?;
        let registry = walcache_schemas::Registry::builtin().map_err(|e| ClientError::Decode(e.to_string()))?;
        let contract = registry.contract(T::CONTRACT).map_err(|e| ClientError::Decode(e.to_string()))?;
        let schema = contract.version(version).filter(|v| v.doc.fingerprint == fingerprint).ok_or_else(|| {
            ClientError::Decode(format!(
                "the cache answers with {} version {version} (fingerprint {fingerprint:016x}), which this \
                 client's walcache-schemas does not have: upgrade the client, or read with Wire::Json",
                T::CONTRACT
            ))
        })?;
        let row =
            schema.row.row_to_json(&bytes).map_err(|e| ClientError::Decode(format!("row of {}: {e}", T::CONTRACT)))?;
        Json::Object(row)
    } else {
        Json::Null
    };
    let position = text(wire::ROW_POSITION_HEADER).and_then(wire::parse_position_header);
    let view = text(wire::VIEW_HEADER).and_then(wire::parse_view_header);
    let time = |micros: i64| DateTime::<Utc>::from_timestamp_micros(micros);
    Ok(WireAnswer {
        state: state.to_string(),
        value,
        as_of: WireAsOf {
            row_lsn: position.map(|p| p.lsn),
            row_commit_time: position.and_then(|p| time(p.commit_ts_micros)),
            row_txid: position.map(|p| p.txid),
            view_lsn: view.map(|(lsn, _)| lsn),
            view_time: view.and_then(|(_, micros)| time(micros)),
        },
    })
}

fn error_of(status: u16, body: &[u8]) -> ClientError {
    let err: WireError = serde_json::from_slice(body)
        .unwrap_or(WireError { error: "unknown".into(), message: String::from_utf8_lossy(body).into_owned() });
    match (status, err.error.as_str()) {
        (503, "not_ready" | "blocked") => ClientError::NotReady(err.message),
        (503, "too_stale") => ClientError::TooStale(err.message),
        (503, "min_lsn_not_reached") => ClientError::MinLsnNotReached(err.message),
        (500..=599, _) => ClientError::Server { status, message: err.message },
        _ => ClientError::Rejected { status, code: err.error, message: err.message },
    }
}

fn append_options(url: &mut reqwest::Url, options: &ReadOptions) {
    let mut q = url.query_pairs_mut();
    if let Some(lsn) = options.min_lsn {
        q.append_pair("min_lsn", &lsn.to_string());
    }
    if let Some(w) = options.wait {
        q.append_pair("wait_ms", &w.as_millis().to_string());
    }
    if let Some(m) = options.max_staleness {
        q.append_pair("max_staleness_ms", &m.as_millis().to_string());
    }
    drop(q);
    if url.query() == Some("") {
        url.set_query(None);
    }
}

#[cfg(feature = "postgres")]
/// The LSN to pass as `min_lsn` after your own write, taken on the connection that committed.
///
/// `pg_current_wal_insert_lsn()` is at or past your commit record even under
/// `synchronous_commit = off`, where `pg_current_wal_lsn()` (the write position) can still be
/// behind it. An unreadable answer is an error, never LSN 0 (which would silently turn
/// read-your-writes off).
pub async fn current_lsn(client: &tokio_postgres::Client) -> Result<Lsn, ClientError> {
    let row = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(|e| ClientError::Postgres(e.to_string()))?;
    let text: String = row.try_get(0).map_err(|e| ClientError::Postgres(e.to_string()))?;
    text.parse().map_err(|e| ClientError::Postgres(format!("unreadable WAL position {text:?}: {e}")))
}
