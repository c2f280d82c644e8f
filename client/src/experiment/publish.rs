//! Where experiment results go. Teams watch an experiment for days before deciding, so the
//! built-ins are a Prometheus publisher (rates over time) and a summary publisher (counts,
//! match rate, latency percentiles, a sample of mismatches) that can export itself
//! periodically as JSON.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde::Serialize;
use serde_json::Value as Json;

use super::{Class, ExperimentResult};

pub const RUNS_TOTAL: &str = "walcache_experiment_runs_total";
pub const OBSERVATIONS_TOTAL: &str = "walcache_experiment_observations_total";
pub const SKIPPED_TOTAL: &str = "walcache_experiment_skipped_total";
pub const DURATION_SECONDS: &str = "walcache_experiment_duration_seconds";

/// Receives every experiment result.
pub trait Publisher: Send + Sync {
    fn publish(&self, result: &ExperimentResult);

    /// A run that did not happen (`disabled` by run_if/percent, `busy` in the background).
    fn skipped(&self, _experiment: &str, _reason: &str) {}
}

/// Prometheus counters and latency histograms, labelled by experiment, behavior and class.
#[derive(Debug, Clone)]
pub struct PrometheusPublisher {
    runs: IntCounterVec,
    observations: IntCounterVec,
    skipped: IntCounterVec,
    duration: HistogramVec,
}

impl PrometheusPublisher {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let p = PrometheusPublisher {
            runs: IntCounterVec::new(
                Opts::new(RUNS_TOTAL, "Experiment runs that compared candidates"),
                &["experiment"],
            )?,
            observations: IntCounterVec::new(
                Opts::new(OBSERVATIONS_TOTAL, "Candidate observations by class (match, stale, divergent...)"),
                &["experiment", "candidate", "class"],
            )?,
            skipped: IntCounterVec::new(
                Opts::new(SKIPPED_TOTAL, "Runs that ran the control only"),
                &["experiment", "reason"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(DURATION_SECONDS, "Behavior latency")
                    .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
                &["experiment", "behavior"],
            )?,
        };
        registry.register(Box::new(p.runs.clone()))?;
        registry.register(Box::new(p.observations.clone()))?;
        registry.register(Box::new(p.skipped.clone()))?;
        registry.register(Box::new(p.duration.clone()))?;
        Ok(p)
    }
}

impl Publisher for PrometheusPublisher {
    fn publish(&self, r: &ExperimentResult) {
        self.runs.with_label_values(&[&r.experiment]).inc();
        self.duration.with_label_values(&[&r.experiment, "control"]).observe(r.control.duration.as_secs_f64());
        for c in &r.candidates {
            self.observations.with_label_values(&[&r.experiment, &c.observation.name, c.class.label()]).inc();
            self.duration
                .with_label_values(&[&r.experiment, &c.observation.name])
                .observe(c.observation.duration.as_secs_f64());
        }
    }

    fn skipped(&self, experiment: &str, reason: &str) {
        self.skipped.with_label_values(&[experiment, reason]).inc();
    }
}

/// Latency figures of one behavior.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// One candidate's record.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CandidateSummary {
    pub classes: BTreeMap<String, u64>,
    /// matches / (observations - candidate errors).
    pub match_rate: f64,
    pub latency: Latency,
}

/// A mismatch kept as an example.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MismatchSample {
    pub candidate: String,
    pub class: String,
    pub context: BTreeMap<String, Json>,
    /// Present only when the publisher was built with values enabled.
    pub control: Option<Json>,
    pub candidate_value: Option<Json>,
    pub candidate_error: Option<String>,
}

/// What an experiment has shown so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub experiment: String,
    pub runs: u64,
    pub skipped: BTreeMap<String, u64>,
    pub control_latency: Latency,
    pub candidates: BTreeMap<String, CandidateSummary>,
    pub mismatch_samples: Vec<MismatchSample>,
}

#[derive(Debug, Default)]
struct State {
    runs: u64,
    skipped: BTreeMap<String, u64>,
    control: Reservoir,
    candidates: BTreeMap<String, (BTreeMap<Class, u64>, Reservoir)>,
    samples: VecDeque<MismatchSample>,
}

/// A bounded random sample of durations (reservoir sampling) plus the exact max.
#[derive(Debug, Default)]
struct Reservoir {
    seen: u64,
    values: Vec<f64>,
    max: f64,
}

const RESERVOIR: usize = 10_000;

impl Reservoir {
    fn add(&mut self, d: Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        self.seen += 1;
        self.max = self.max.max(ms);
        if self.values.len() < RESERVOIR {
            self.values.push(ms);
        } else {
            let i = (rand::random::<u64>() % self.seen) as usize;
            if i < RESERVOIR {
                self.values[i] = ms;
            }
        }
    }

    fn latency(&self) -> Latency {
        let mut v = self.values.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| if v.is_empty() { 0.0 } else { v[((v.len() - 1) as f64 * p).round() as usize] };
        Latency { samples: self.seen, p50_ms: q(0.5), p90_ms: q(0.9), p99_ms: q(0.99), max_ms: self.max }
    }
}

/// Accumulates results in memory for one experiment; [`SummaryPublisher::summary`] reads
/// them, [`SummaryPublisher::export_every`] writes them to a JSON file and the log.
#[derive(Debug)]
pub struct SummaryPublisher {
    experiment: String,
    include_values: bool,
    sample_size: usize,
    state: Mutex<State>,
}

impl SummaryPublisher {
    /// `include_values`: keep control/candidate values in mismatch samples (off by default in
    /// production: they may be personal data).
    pub fn new(experiment: impl Into<String>, include_values: bool, sample_size: usize) -> Self {
        SummaryPublisher {
            experiment: experiment.into(),
            include_values,
            sample_size,
            state: Mutex::new(State::default()),
        }
    }

    pub fn summary(&self) -> Summary {
        let Ok(s) = self.state.lock() else {
            return Summary::default();
        };
        Summary {
            experiment: self.experiment.clone(),
            runs: s.runs,
            skipped: s.skipped.clone(),
            control_latency: s.control.latency(),
            candidates: s
                .candidates
                .iter()
                .map(|(name, (classes, reservoir))| {
                    // Candidate errors count: a candidate that fails half the time does not
                    // match half the time.
                    let total: u64 = classes.values().sum();
                    let matches = classes.get(&Class::Match).copied().unwrap_or(0);
                    let compared = total;
                    (
                        name.clone(),
                        CandidateSummary {
                            classes: classes.iter().map(|(c, n)| (c.label().to_string(), *n)).collect(),
                            match_rate: if compared > 0 { matches as f64 / compared as f64 } else { 0.0 },
                            latency: reservoir.latency(),
                        },
                    )
                })
                .collect(),
            mismatch_samples: s.samples.iter().cloned().collect(),
        }
    }

    /// Writes the summary to `path` (atomically) and logs a line every `interval`, until the
    /// returned task is aborted or the runtime stops.
    pub fn export_every(self: &Arc<Self>, path: PathBuf, interval: Duration) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                let summary = me.summary();
                for (name, c) in &summary.candidates {
                    tracing::info!(
                        experiment = %summary.experiment,
                        candidate = %name,
                        runs = summary.runs,
                        match_rate = c.match_rate,
                        classes = ?c.classes,
                        "experiment summary"
                    );
                }
                match serde_json::to_vec_pretty(&summary) {
                    Ok(bytes) => {
                        let tmp = path.with_extension("tmp");
                        if let Err(e) = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path)) {
                            tracing::warn!(error = %e, path = %path.display(), "cannot write the experiment summary");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot serialize the experiment summary"),
                }
            }
        })
    }
}

impl Publisher for SummaryPublisher {
    fn publish(&self, r: &ExperimentResult) {
        let Ok(mut s) = self.state.lock() else { return };
        s.runs += 1;
        s.control.add(r.control.duration);
        for c in &r.candidates {
            let entry = s.candidates.entry(c.observation.name.clone()).or_default();
            *entry.0.entry(c.class).or_default() += 1;
            entry.1.add(c.observation.duration);
            if c.class != Class::Match && c.class != Class::Ignored && self.sample_size > 0 {
                let sample = MismatchSample {
                    candidate: c.observation.name.clone(),
                    class: c.class.label().into(),
                    context: r.context.clone(),
                    control: if self.include_values { r.control.value.clone() } else { None },
                    candidate_value: if self.include_values { c.observation.value.clone() } else { None },
                    candidate_error: c.observation.error.clone(),
                };
                s.samples.push_back(sample);
                while s.samples.len() > self.sample_size {
                    s.samples.pop_front();
                }
            }
        }
    }

    fn skipped(&self, _experiment: &str, reason: &str) {
        if let Ok(mut s) = self.state.lock() {
            *s.skipped.entry(reason.to_string()).or_default() += 1;
        }
    }
}
