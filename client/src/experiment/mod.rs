//! Scientist-style experiments: run the old path (control) and the new one (candidates) side
//! by side, always return the control's result, compare, classify, publish.
//!
//! ```text
//!  run ─► enabled? (run_if, percent) ── no ──► control only
//!   │ yes
//!   ▼
//!  behaviors in random order, each timed; candidate errors and panics caught
//!   ▼
//!  compare(control, candidate) ─ equal ─► match
//!   │ differ: classified by positions (each side's observed_at), never by which ran first
//!   ├─ an ignore rule accepts it ─────────► ignored
//!   ├─ the candidate's value is newer than the control's read (its `since` is past the
//!   │  control's position) ────────────────► ahead        (the control is the one behind)
//!   ├─ the candidate is as of a position before the control's, and a recheck at the control's
//!   │  position caught up to the control's value ──► stale
//!   │  ... the recheck could not say (failed, or the row moved on again) ──► unverified
//!   └─ both are true at the same position ─► divergent
//!  publishers (Prometheus, periodic summary) get the cleaned observations
//! ```
//!
//! With [`Experiment::run_in_background`] the control answers the caller at once and the
//! candidates run afterwards on the runtime, bounded by a semaphore: the experiment never adds
//! latency, and when too many are in flight a run is skipped (and counted), not queued.

pub mod publish;

use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::FutureExt;
use rand::seq::SliceRandom;
use serde::Serialize;
use serde_json::Value as Json;
use tokio::sync::Semaphore;
use walcache_schemas::Lsn;

pub use publish::{PrometheusPublisher, Publisher, Summary, SummaryPublisher};

type BoxFuture<'a, R> = Pin<Box<dyn Future<Output = R> + Send + 'a>>;

enum Behavior<'a, T, E> {
    Async(Box<dyn FnOnce() -> BoxFuture<'a, Result<T, E>> + Send + 'a>),
    Sync(Box<dyn FnOnce() -> Result<T, E> + Send + 'a>),
}

/// When a value was true: a source position and/or time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ObservedAt {
    /// The position the value is true as of (a read's WAL position, a view's `view_lsn`).
    pub lsn: Option<Lsn>,
    /// The position the value has been true since, when known (a cached row's `row_lsn`): the
    /// value holds for every position in `since..=lsn`.
    pub since: Option<Lsn>,
    pub time: Option<DateTime<Utc>>,
}

impl ObservedAt {
    /// Whether the value already held at `position` (false when it was written after it).
    fn held_at(&self, position: Lsn) -> Option<bool> {
        self.since.map(|since| since <= position)
    }

    /// Whether `self` is strictly older than `other` (by LSN when both have one, else by time).
    pub fn older_than(&self, other: &ObservedAt) -> Option<bool> {
        match (self.lsn, other.lsn, self.time, other.time) {
            (Some(a), Some(b), _, _) => Some(a < b),
            (_, _, Some(a), Some(b)) => Some(a < b),
            _ => None,
        }
    }
}

/// How a candidate's observation relates to the control's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Match,
    /// Different, but an ignore rule accepts the difference.
    Ignored,
    /// Different because the candidate saw an older state; a recheck at the control's position agrees.
    Stale,
    /// Different because the candidate saw a newer state than the control read (its value was
    /// written after the control's position): the control is the one behind.
    Ahead,
    /// The candidate saw an older state, but a recheck could not confirm the difference is only lag.
    Unverified,
    /// Different, and not explained by lag.
    Divergent,
    /// The candidate failed (error or panic) where the control did not.
    CandidateError,
}

impl Class {
    pub fn label(self) -> &'static str {
        match self {
            Class::Match => "match",
            Class::Ignored => "ignored",
            Class::Stale => "stale",
            Class::Ahead => "ahead",
            Class::Unverified => "unverified",
            Class::Divergent => "divergent",
            Class::CandidateError => "candidate_error",
        }
    }
}

/// One behavior's run, as publishers see it (values cleaned).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Observation {
    pub name: String,
    pub duration: Duration,
    /// The cleaned value (see [`Experiment::clean`]).
    pub value: Option<Json>,
    pub error: Option<String>,
    pub panicked: bool,
    pub observed_at: Option<ObservedAt>,
}

/// A candidate's observation and its class.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CandidateReport {
    pub observation: Observation,
    pub class: Class,
    /// Whether a recheck ran (and what it found, cleaned).
    pub recheck: Option<Json>,
}

/// Everything one run found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExperimentResult {
    pub experiment: String,
    pub context: BTreeMap<String, Json>,
    pub control: Observation,
    pub candidates: Vec<CandidateReport>,
    /// The order the behaviors ran in.
    pub order: Vec<String>,
}

type Compare<T> = Arc<dyn Fn(&T, &T) -> bool + Send + Sync>;
type Clean<T> = Arc<dyn Fn(&T) -> Json + Send + Sync>;
type ObservedAtFn<T> = Arc<dyn Fn(&T) -> Option<ObservedAt> + Send + Sync>;
type Recheck<T, E> = Arc<dyn Fn(ObservedAt) -> BoxFuture<'static, Result<T, E>> + Send + Sync>;

/// The comparing and publishing half of an experiment, shared with background runs.
struct Judge<T, E> {
    name: String,
    compare: Compare<T>,
    ignores: Vec<Compare<T>>,
    clean: Clean<T>,
    observed_at: Option<ObservedAtFn<T>>,
    recheck: Option<Recheck<T, E>>,
    context: BTreeMap<String, Json>,
    publishers: Vec<Arc<dyn Publisher>>,
    /// How long a candidate may run before it counts as failed.
    candidate_timeout: Duration,
}

/// The default [`Experiment::candidate_timeout`].
pub const DEFAULT_CANDIDATE_TIMEOUT: Duration = Duration::from_secs(5);

/// An experiment; build it, then `run`.
///
/// ```
/// use walcache_client::experiment::Experiment;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let value: Result<u32, String> = Experiment::new("double")
///     .control(|| async { Ok::<_, String>(2 * 21) })
///     .candidate("shift", || async { Ok(21 << 1) })
///     .run()
///     .await;
/// assert_eq!(value, Ok(42)); // always the control's result
/// # }
/// ```
pub struct Experiment<'a, T, E> {
    control: Option<Behavior<'a, T, E>>,
    candidates: Vec<(String, Behavior<'a, T, E>)>,
    judge: Judge<T, E>,
    run_if: Option<Box<dyn FnOnce() -> bool + Send + 'a>>,
    percent: f64,
}

impl<'a, T, E> std::fmt::Debug for Experiment<'a, T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Experiment").field("name", &self.judge.name).finish_non_exhaustive()
    }
}

impl<'a, T, E> Experiment<'a, T, E>
where
    T: PartialEq + Serialize + Send + 'static,
    E: Display + Send + 'static,
{
    pub fn new(name: impl Into<String>) -> Self {
        Experiment {
            control: None,
            candidates: Vec::new(),
            judge: Judge {
                name: name.into(),
                compare: Arc::new(|a: &T, b: &T| a == b),
                ignores: Vec::new(),
                clean: Arc::new(|v: &T| serde_json::to_value(v).unwrap_or(Json::Null)),
                observed_at: None,
                recheck: None,
                context: BTreeMap::new(),
                publishers: Vec::new(),
                candidate_timeout: DEFAULT_CANDIDATE_TIMEOUT,
            },
            run_if: None,
            percent: 100.0,
        }
    }

    /// The old path; its result is what the caller gets.
    pub fn control<F, Fut>(mut self, f: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'a,
        Fut: Future<Output = Result<T, E>> + Send + 'a,
    {
        self.control = Some(Behavior::Async(Box::new(move || Box::pin(f()))));
        self
    }

    pub fn control_sync(mut self, f: impl FnOnce() -> Result<T, E> + Send + 'a) -> Self {
        self.control = Some(Behavior::Sync(Box::new(f)));
        self
    }

    /// A new path to compare with the control.
    pub fn candidate<F, Fut>(mut self, name: impl Into<String>, f: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'a,
        Fut: Future<Output = Result<T, E>> + Send + 'a,
    {
        self.candidates.push((name.into(), Behavior::Async(Box::new(move || Box::pin(f())))));
        self
    }

    pub fn candidate_sync(mut self, name: impl Into<String>, f: impl FnOnce() -> Result<T, E> + Send + 'a) -> Self {
        self.candidates.push((name.into(), Behavior::Sync(Box::new(f))));
        self
    }

    /// Custom equality (default: `==`).
    pub fn compare(mut self, f: impl Fn(&T, &T) -> bool + Send + Sync + 'static) -> Self {
        self.judge.compare = Arc::new(f);
        self
    }

    /// A known, acceptable difference: `f(control, candidate)` true means "ignore this mismatch".
    pub fn ignore(mut self, f: impl Fn(&T, &T) -> bool + Send + Sync + 'static) -> Self {
        self.judge.ignores.push(Arc::new(f));
        self
    }

    /// Reduces a value for publishing (default: its serde JSON).
    pub fn clean(mut self, f: impl Fn(&T) -> Json + Send + Sync + 'static) -> Self {
        self.judge.clean = Arc::new(f);
        self
    }

    /// When a value was true (for lag-aware classification).
    pub fn observed_at(mut self, f: impl Fn(&T) -> Option<ObservedAt> + Send + Sync + 'static) -> Self {
        self.judge.observed_at = Some(Arc::new(f));
        self
    }

    /// Re-reads the candidate as of the control's position; used to prove that a mismatch of
    /// an older candidate is only lag.
    pub fn recheck<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(ObservedAt) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        self.judge.recheck = Some(Arc::new(move |at| Box::pin(f(at))));
        self
    }

    /// How long an (async) candidate may run before it is dropped and counted as a candidate
    /// error, so a hung candidate cannot hold a background slot (default 5 s).
    pub fn candidate_timeout(mut self, timeout: Duration) -> Self {
        self.judge.candidate_timeout = timeout;
        self
    }

    /// Run the experiment only when `f` says so.
    pub fn run_if(mut self, f: impl FnOnce() -> bool + Send + 'a) -> Self {
        self.run_if = Some(Box::new(f));
        self
    }

    /// Run the experiment in this share of calls (0 to 100), for ramping up.
    pub fn percent(mut self, percent: f64) -> Self {
        self.percent = percent.clamp(0.0, 100.0);
        self
    }

    /// Context published with the result (ids, never secrets).
    pub fn context(mut self, key: impl Into<String>, value: impl Serialize) -> Self {
        self.judge.context.insert(key.into(), serde_json::to_value(value).unwrap_or(Json::Null));
        self
    }

    pub fn publisher(mut self, publisher: Arc<dyn Publisher>) -> Self {
        self.judge.publishers.push(publisher);
        self
    }

    fn enabled(&mut self) -> bool {
        if let Some(f) = self.run_if.take()
            && !f()
        {
            return false;
        }
        self.percent >= 100.0 || rand::random::<f64>() * 100.0 < self.percent
    }

    /// Runs control and candidates in random order and returns the control's result.
    ///
    /// # Panics
    /// Panics if no control was given, or with the control's own panic.
    pub async fn run(mut self) -> Result<T, E> {
        let control = self.control.take().expect("an experiment needs a control");
        if self.candidates.is_empty() || !self.enabled() {
            self.judge.skipped("disabled");
            return run_control(control).await;
        }
        let mut order: Vec<Option<String>> =
            std::iter::once(None).chain(self.candidates.iter().map(|(n, _)| Some(n.clone()))).collect();
        order.shuffle(&mut rand::rng());
        let mut candidates: BTreeMap<String, Behavior<'a, T, E>> = self.candidates.drain(..).collect();
        let mut control = Some(control);
        let mut control_out: Option<(Result<T, E>, Duration)> = None;
        let mut observed = Vec::new();
        for slot in &order {
            match slot {
                None => {
                    let started = Instant::now();
                    let behavior = control.take().expect("control runs once");
                    control_out = Some((run_control(behavior).await, started.elapsed()));
                }
                Some(name) => {
                    let behavior = candidates.remove(name).expect("candidate runs once");
                    observed.push((name.clone(), observe(behavior, self.judge.candidate_timeout).await));
                }
            }
        }
        let (result, control_time) = control_out.expect("control ran");
        let error_text;
        let control_view = match &result {
            Ok(v) => Ok(v),
            Err(e) => {
                error_text = e.to_string();
                Err(error_text.as_str())
            }
        };
        let order_names = order.iter().map(|o| o.clone().unwrap_or_else(|| "control".into())).collect();
        self.judge.judge(control_view, control_time, observed, order_names).await;
        result
    }

    /// Synchronous `run`: for sync behaviors (async ones are driven to completion here).
    ///
    /// Never blocks a tokio worker: on a multi-threaded runtime the worker hands its other
    /// tasks off first (`block_in_place`); on a current-thread runtime the run happens on a
    /// helper thread (async behaviors that need that runtime's I/O cannot progress there: use
    /// `run` from async code). Without a runtime it simply blocks.
    pub fn run_sync(self) -> Result<T, E> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| handle.block_on(self.run()))
            }
            Ok(handle) => std::thread::scope(|scope| {
                let run = scope.spawn(move || {
                    let _entered = handle.enter();
                    futures::executor::block_on(self.run())
                });
                match run.join() {
                    Ok(result) => result,
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }),
            Err(_) => futures::executor::block_on(self.run()),
        }
    }
}

impl<T, E> Experiment<'static, T, E>
where
    T: PartialEq + Serialize + Clone + Send + Sync + 'static,
    E: Display + Send + 'static,
{
    /// Runs the control and returns its result at once; candidates run afterwards in a
    /// background task, if `limit` has a permit (otherwise the run is skipped and counted).
    pub async fn run_in_background(mut self, limit: &Arc<Semaphore>) -> Result<T, E> {
        let control = self.control.take().expect("an experiment needs a control");
        if self.candidates.is_empty() || !self.enabled() {
            self.judge.skipped("disabled");
            return run_control(control).await;
        }
        let started = Instant::now();
        let result = run_control(control).await;
        let control_time = started.elapsed();
        let Ok(permit) = Arc::clone(limit).try_acquire_owned() else {
            self.judge.skipped("busy");
            return result;
        };
        let control_view = match &result {
            Ok(v) => Ok(v.clone()),
            Err(e) => Err(e.to_string()),
        };
        let candidates = std::mem::take(&mut self.candidates);
        let judge = self.judge;
        tokio::spawn(async move {
            let mut observed = Vec::new();
            let mut order = vec!["control".to_string()];
            for (name, behavior) in candidates {
                order.push(name.clone());
                observed.push((name, observe(behavior, judge.candidate_timeout).await));
            }
            judge.judge(control_view.as_ref().map_err(String::as_str), control_time, observed, order).await;
            drop(permit);
        });
        result
    }
}

async fn run_control<T, E>(behavior: Behavior<'_, T, E>) -> Result<T, E> {
    match behavior {
        Behavior::Async(f) => f().await,
        Behavior::Sync(f) => f(),
    }
}

/// A candidate's outcome: value, or the error/panic as text.
struct Outcome<T> {
    result: Result<T, String>,
    panicked: bool,
    duration: Duration,
}

async fn observe<T, E: Display>(behavior: Behavior<'_, T, E>, timeout: Duration) -> Outcome<T> {
    let started = Instant::now();
    let caught = match behavior {
        Behavior::Async(f) => {
            let run = AssertUnwindSafe(async move { f().await }).catch_unwind();
            // Timers need a runtime; without one (run_sync outside tokio) there is none to
            // enforce, and nothing else is waiting on the slot either.
            if tokio::runtime::Handle::try_current().is_ok() {
                match tokio::time::timeout(timeout, run).await {
                    Ok(caught) => caught,
                    Err(_) => {
                        let duration = started.elapsed();
                        return Outcome {
                            result: Err(format!("candidate timed out after {timeout:?}")),
                            panicked: false,
                            duration,
                        };
                    }
                }
            } else {
                run.await
            }
        }
        Behavior::Sync(f) => std::panic::catch_unwind(AssertUnwindSafe(f)),
    };
    let duration = started.elapsed();
    match caught {
        Ok(Ok(v)) => Outcome { result: Ok(v), panicked: false, duration },
        Ok(Err(e)) => Outcome { result: Err(e.to_string()), panicked: false, duration },
        Err(panic) => Outcome { result: Err(panic_message(&panic)), panicked: true, duration },
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .map_or_else(|| "candidate panicked".into(), |m| format!("candidate panicked: {m}"))
}

impl<T, E: Display> Judge<T, E> {
    fn skipped(&self, reason: &str) {
        for p in &self.publishers {
            p.skipped(&self.name, reason);
        }
    }

    fn observation(&self, name: String, result: Result<&T, &str>, duration: Duration, panicked: bool) -> Observation {
        Observation {
            name,
            duration,
            value: result.ok().map(|v| (self.clean)(v)),
            error: result.err().map(str::to_string),
            panicked,
            observed_at: result.ok().and_then(|v| self.observed_at.as_ref().and_then(|f| f(v))),
        }
    }

    async fn classify(&self, control: Result<&T, &str>, candidate: Result<&T, &str>) -> (Class, Option<Json>) {
        match (control, candidate) {
            (Ok(a), Ok(b)) => {
                if (self.compare)(a, b) {
                    return (Class::Match, None);
                }
                if self.ignores.iter().any(|f| f(a, b)) {
                    return (Class::Ignored, None);
                }
                let at = |v: &T| self.observed_at.as_ref().and_then(|f| f(v));
                let (Some(control_at), Some(candidate_at)) = (at(a), at(b)) else {
                    return (Class::Divergent, None);
                };
                // The candidate's value was written after the control read: the control is
                // behind (typical in background runs, where the control runs first).
                if let Some(control_lsn) = control_at.lsn
                    && candidate_at.held_at(control_lsn) == Some(false)
                {
                    return (Class::Ahead, None);
                }
                if candidate_at.older_than(&control_at) != Some(true) {
                    return (Class::Divergent, None);
                }
                let Some(recheck) = &self.recheck else {
                    return (Class::Unverified, None);
                };
                match recheck(control_at).await {
                    Ok(again) if (self.compare)(a, &again) => (Class::Stale, Some((self.clean)(&again))),
                    // Caught up past the control's position, but the value changed again after
                    // it: the two cannot be compared any more.
                    Ok(again)
                        if control_at.lsn.is_some_and(|l| at(&again).and_then(|r| r.held_at(l)) == Some(false)) =>
                    {
                        (Class::Unverified, Some((self.clean)(&again)))
                    }
                    Ok(again) => (Class::Divergent, Some((self.clean)(&again))),
                    Err(e) => (Class::Unverified, Some(Json::String(e.to_string()))),
                }
            }
            (Err(x), Err(y)) if x == y => (Class::Match, None),
            (Ok(_), Err(_)) => (Class::CandidateError, None),
            (Err(_), _) => (Class::Divergent, None),
        }
    }

    async fn judge(
        &self,
        control: Result<&T, &str>,
        control_time: Duration,
        observed: Vec<(String, Outcome<T>)>,
        order: Vec<String>,
    ) {
        let mut candidates = Vec::with_capacity(observed.len());
        for (name, outcome) in observed {
            let candidate = outcome.result.as_ref().map_err(String::as_str);
            let (class, recheck) = self.classify(control, candidate).await;
            candidates.push(CandidateReport {
                observation: self.observation(name, candidate, outcome.duration, outcome.panicked),
                class,
                recheck,
            });
        }
        let result = ExperimentResult {
            experiment: self.name.clone(),
            context: self.context.clone(),
            control: self.observation("control".into(), control, control_time, false),
            candidates,
            order,
        };
        for p in &self.publishers {
            p.publish(&result);
        }
    }
}

#[cfg(test)]
mod tests;
