//! The near-cache: answers kept in process, exact as of the `as_of` they are served with.
//!
//! ```text
//!  get ─► hit? ─┬─ following the consumer's invalidations, entry from this connection ─► served, as of the stream's coverage
//!               ├─ otherwise, younger than ttl ─────────────────────────────────────────► served, as of its own read
//!               └─ miss / marker ─► HTTP read ─► kept unless a change to the key arrived while it was in flight
//!
//!  GET /v1/invalidations (server-sent events, apply order)
//!     hello ─► drop all, new epoch, connected      key ─► drop the key (marker if a read is in flight)
//!     coverage ─► "entries not dropped are exact up to here"     reset / disconnect ─► drop all, new epoch
//!     hello / reset carry `applied`: changes the stream does not list reach at most that far
//! ```
//!
//! Without the stream (not configured, not connected, refused) entries live `ttl`, as before:
//! the answer keeps the `as_of` it was read with, so it is exact as of then. With the stream,
//! an entry read from a view at or past every change announced when its read started (reads
//! may reach another replica than the stream's) lives up to `hold` and is served as of the
//! newest coverage the stream announced:
//! every change up to that coverage was announced before it, and would have dropped the entry
//! (the Redis client-side caching model). Reconnecting drops everything: changes missed while
//! disconnected cannot be told apart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use walcache_schemas::Lsn;

use crate::client::WireAnswer;
use crate::metrics::ClientMetrics;

/// Table and key (as in the URL).
pub(crate) type NearKey = (String, String);

/// A held answer, or a marker: the key changed while a read of it was in flight.
#[derive(Debug)]
pub(crate) struct NearEntry {
    answer: Option<WireAnswer>,
    stored: Instant,
    epoch: u64,
}

/// What the invalidation stream has told this process.
#[derive(Debug, Default)]
struct Tracking {
    connected: AtomicBool,
    /// Bumped on every (re)connect, reset and disconnect: entries of an older epoch may have
    /// missed a change, and fall back to the TTL.
    epoch: AtomicU64,
    /// Per table: the newest coverage announced (LSN, commit time in micros).
    coverage: Mutex<HashMap<String, (Lsn, i64)>>,
    /// Keys with a read in flight, and how many.
    inflight: Mutex<HashMap<NearKey, usize>>,
    /// Per table: the highest LSN of a change announced (a key event, or the `applied` of a
    /// hello or reset: changes made before the stream began or skipped by a reset). Reads may
    /// reach another consumer replica than the stream's, one that has not applied those
    /// changes yet: an answer from a view below this may miss one, and is kept only for the TTL.
    announced: Mutex<HashMap<String, Lsn>>,
    metrics: Option<ClientMetrics>,
}

impl Tracking {
    fn dropped_all(&self, reason: &str) {
        if let Some(m) = &self.metrics {
            m.near_drops.with_label_values(&[reason]).inc();
        }
    }

    fn set_connected(&self, connected: bool) -> bool {
        if let Some(m) = &self.metrics {
            m.near_stream_connected.set(i64::from(connected));
        }
        self.connected.swap(connected, Ordering::AcqRel)
    }
}

#[derive(Debug)]
pub(crate) struct Near {
    cache: moka::future::Cache<NearKey, Arc<NearEntry>>,
    ttl: Duration,
    tracking: Option<Arc<Tracking>>,
}

/// A read being made for the near-cache: puts only what no announced change overtook.
#[derive(Debug)]
pub(crate) struct Pending {
    key: NearKey,
    started: Instant,
    epoch: u64,
    /// The table's highest announced change when the read started.
    announced: Option<Lsn>,
}

impl Near {
    /// `hold`: how long entries live while the invalidation stream is connected (None: no
    /// stream, entries live `ttl`).
    pub(crate) fn new(capacity: u64, ttl: Duration, hold: Option<Duration>, metrics: Option<ClientMetrics>) -> Near {
        let cache =
            moka::future::Cache::builder().max_capacity(capacity).time_to_live(hold.unwrap_or(ttl).max(ttl)).build();
        Near { cache, ttl, tracking: hold.map(|_| Arc::new(Tracking { metrics, ..Tracking::default() })) }
    }

    /// Follows `GET {base}/v1/invalidations` in the background, when there is a Tokio runtime
    /// to run on and the stream is configured; reconnects with backoff until every client
    /// sharing this near-cache is gone.
    pub(crate) fn follow(&self, http: reqwest::Client, base: reqwest::Url, token: Option<String>) {
        let (Some(tracking), Ok(runtime)) = (&self.tracking, tokio::runtime::Handle::try_current()) else { return };
        let weak = Arc::downgrade(tracking);
        runtime.spawn(follow(weak, self.cache.clone(), http, base, token));
    }

    /// A held answer that is still exact, with the as-of it is exact at.
    pub(crate) async fn get(&self, key: &NearKey) -> Option<WireAnswer> {
        let entry = self.cache.get(key).await?;
        let mut answer = entry.answer.clone()?;
        let tracked = self
            .tracking
            .as_ref()
            .filter(|t| t.connected.load(Ordering::Acquire) && t.epoch.load(Ordering::Acquire) == entry.epoch);
        match tracked {
            Some(t) => {
                let announced = t.coverage.lock().ok().and_then(|c| c.get(&key.0).copied());
                if let Some((lsn, micros)) = announced
                    && answer.as_of.view_lsn.is_none_or(|held| held < lsn)
                {
                    answer.as_of.view_lsn = Some(lsn);
                    answer.as_of.view_time = DateTime::<Utc>::from_timestamp_micros(micros);
                }
            }
            None if entry.stored.elapsed() > self.ttl => return None,
            None => {}
        }
        Some(answer)
    }

    /// Registers a read about to be made.
    pub(crate) fn start(&self, key: NearKey) -> Pending {
        let (epoch, announced) = match &self.tracking {
            Some(t) => {
                if let Ok(mut inflight) = t.inflight.lock() {
                    *inflight.entry(key.clone()).or_default() += 1;
                }
                // The epoch first: a hello or reset records its `applied` before it starts a
                // new epoch, so a read of that epoch sees them.
                let epoch = t.epoch.load(Ordering::Acquire);
                let announced = t.announced.lock().ok().and_then(|a| a.get(&key.0).copied());
                (epoch, announced)
            }
            None => (0, None),
        };
        Pending { key, started: Instant::now(), epoch, announced }
    }

    /// Ends a read; keeps its answer unless a newer one is held, the key changed while it was
    /// in flight, or the stream reconnected or reset meanwhile.
    pub(crate) async fn finish(&self, pending: Pending, answer: Option<&WireAnswer>) {
        let Pending { key, started, epoch, announced } = pending;
        if let Some(t) = &self.tracking
            && let Ok(mut inflight) = t.inflight.lock()
            && let Some(n) = inflight.get_mut(&key)
        {
            *n -= 1;
            if *n == 0 {
                inflight.remove(&key);
            }
        }
        let Some(answer) = answer.filter(|a| a.state != "unknown") else { return };
        if self.tracking.as_ref().is_some_and(|t| t.epoch.load(Ordering::Acquire) != epoch) {
            return;
        }
        // A view behind a change already announced may not hold it: never vouched for past its
        // own as-of (an epoch no stream ever has), so it lives only the TTL.
        let behind = announced.is_some_and(|a| answer.as_of.view_lsn.is_none_or(|v| v < a));
        let epoch = if behind { u64::MAX } else { epoch };
        let fresh = Arc::new(NearEntry { answer: Some(answer.clone()), stored: Instant::now(), epoch });
        self.cache
            .entry(key)
            .and_compute_with(|held| async move {
                use moka::ops::compute::Op;
                match held.map(|h| h.into_value()) {
                    // The key changed after this read started: its answer may predate the change.
                    Some(h) if h.answer.is_none() && h.stored >= started => Op::Nop,
                    // Concurrent reads of one key finish in any order: keep the newest view.
                    Some(h) if h.answer.as_ref().is_some_and(|a| a.as_of.view_lsn > answer_view(&fresh)) => Op::Nop,
                    _ => Op::Put(fresh),
                }
            })
            .await;
    }
}

fn answer_view(entry: &NearEntry) -> Option<Lsn> {
    entry.answer.as_ref().and_then(|a| a.as_of.view_lsn)
}

#[derive(Debug, Deserialize)]
struct StreamEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    lsn: Option<Lsn>,
    #[serde(default)]
    time_micros: Option<i64>,
    /// With hello and reset: per table, the highest LSN of a change the stream's view had
    /// applied, listed or not.
    #[serde(default)]
    applied: HashMap<String, Lsn>,
}

async fn follow(
    tracking: Weak<Tracking>,
    cache: moka::future::Cache<NearKey, Arc<NearEntry>>,
    http: reqwest::Client,
    base: reqwest::Url,
    token: Option<String>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut url = base.clone();
        url.set_path("/v1/invalidations");
        let request = match &token {
            Some(t) => http.get(url).bearer_auth(t),
            None => http.get(url),
        };
        let ended = match request.send().await {
            Ok(response) if response.status().is_success() => {
                backoff = Duration::from_millis(200);
                read_stream(&tracking, &cache, response).await
            }
            Ok(response) => format!("the consumer refused the invalidation stream ({})", response.status()),
            Err(e) => format!("cannot open the invalidation stream: {e}"),
        };
        let Some(t) = tracking.upgrade() else { return };
        if t.set_connected(false) {
            t.dropped_all("lost");
            tracing::warn!(reason = %ended, "near-cache invalidations lost; entries fall back to the TTL until reconnected");
        }
        t.epoch.fetch_add(1, Ordering::AcqRel);
        drop(t);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Applies the stream's events until it ends; returns why it ended.
async fn read_stream(
    tracking: &Weak<Tracking>,
    cache: &moka::future::Cache<NearKey, Arc<NearEntry>>,
    response: reqwest::Response,
) -> String {
    use futures::StreamExt;
    let mut body = response.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return format!("the invalidation stream broke: {e}"),
        };
        pending.extend_from_slice(&chunk);
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            // (Keep-alives arrive every few seconds: a dropped client's task ends soon.)
            let Some(t) = tracking.upgrade() else { return "the client is gone".into() };
            let Some(data) = line.strip_prefix(b"data:") else { continue };
            match serde_json::from_slice::<StreamEvent>(data.trim_ascii()) {
                Ok(event) => apply(&t, cache, event).await,
                Err(e) => return format!("unreadable invalidation event: {e}"),
            }
        }
    }
    "the consumer closed the invalidation stream".into()
}

async fn apply(t: &Tracking, cache: &moka::future::Cache<NearKey, Arc<NearEntry>>, event: StreamEvent) {
    match event.kind.as_str() {
        "hello" | "reset" => {
            let hello = event.kind == "hello";
            // Changes made before the stream began, or skipped by a reset, are not listed: a
            // read from a view below them (another replica) may not hold them. Recorded
            // before the new epoch begins, so that every read of the new epoch sees them.
            if let Ok(mut a) = t.announced.lock() {
                if hello {
                    a.clear();
                }
                for (table, lsn) in event.applied {
                    let held = a.entry(table).or_insert(lsn);
                    *held = (*held).max(lsn);
                }
            }
            if hello && let Ok(mut c) = t.coverage.lock() {
                c.clear();
            }
            // Anything held may have missed a change: start over, in a new epoch.
            t.epoch.fetch_add(1, Ordering::AcqRel);
            cache.invalidate_all();
            t.dropped_all(&event.kind);
            if hello {
                t.set_connected(true);
            }
        }
        "key" => {
            let (Some(table), Some(key)) = (event.table, event.key) else { return };
            // A key made unknown has no LSN: it lies past the table's announced coverage.
            let covered = t.coverage.lock().ok().and_then(|c| c.get(&table).map(|(lsn, _)| Lsn(lsn.0 + 1)));
            if let Some(lsn) = event.lsn.or(covered)
                && let Ok(mut a) = t.announced.lock()
            {
                let held = a.entry(table.clone()).or_insert(lsn);
                *held = (*held).max(lsn);
            }
            let key = (table, key);
            cache.invalidate(&key).await;
            let in_flight = t.inflight.lock().is_ok_and(|m| m.contains_key(&key));
            if in_flight {
                let epoch = t.epoch.load(Ordering::Acquire);
                cache.insert(key, Arc::new(NearEntry { answer: None, stored: Instant::now(), epoch })).await;
            }
        }
        "coverage" => {
            if let (Some(table), Some(lsn), Some(micros)) = (event.table, event.lsn, event.time_micros)
                && let Ok(mut c) = t.coverage.lock()
            {
                c.insert(table, (lsn, micros));
            }
        }
        _ => {}
    }
}
