//! Experiment semantics.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::*;

#[derive(Default)]
struct Collect(Mutex<Vec<ExperimentResult>>, Mutex<Vec<String>>);

impl Publisher for Collect {
    fn publish(&self, result: &ExperimentResult) {
        if let Ok(mut v) = self.0.lock() {
            v.push(result.clone());
        }
    }

    fn skipped(&self, _: &str, reason: &str) {
        if let Ok(mut v) = self.1.lock() {
            v.push(reason.into());
        }
    }
}

impl Collect {
    fn results(&self) -> Vec<ExperimentResult> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    fn classes(&self) -> Vec<Class> {
        self.results().iter().flat_map(|r| r.candidates.iter().map(|c| c.class)).collect()
    }
}

#[tokio::test]
async fn the_control_is_always_returned_and_candidate_failures_are_isolated() {
    let p = Arc::new(Collect::default());
    let out: Result<i32, String> = Experiment::new("e")
        .control(|| async { Ok(1) })
        .candidate("err", || async { Err("boom".to_string()) })
        .candidate("panic", || async { panic!("candidate exploded") })
        .candidate("diff", || async { Ok(2) })
        .candidate("same", || async { Ok(1) })
        .publisher(p.clone())
        .run()
        .await;
    assert_eq!(out, Ok(1));
    let r = &p.results()[0];
    let by_name: BTreeMap<&str, &CandidateReport> =
        r.candidates.iter().map(|c| (c.observation.name.as_str(), c)).collect();
    assert_eq!(by_name["err"].class, Class::CandidateError);
    assert_eq!(by_name["err"].observation.error.as_deref(), Some("boom"));
    assert_eq!(by_name["panic"].class, Class::CandidateError);
    assert!(by_name["panic"].observation.panicked);
    assert!(by_name["panic"].observation.error.as_deref().is_some_and(|e| e.contains("candidate exploded")));
    assert_eq!(by_name["diff"].class, Class::Divergent);
    assert_eq!(by_name["same"].class, Class::Match);

    // The control's error is the caller's; a candidate that fails the same way matches.
    let p = Arc::new(Collect::default());
    let out: Result<i32, String> = Experiment::new("e")
        .control(|| async { Err("db down".to_string()) })
        .candidate("c", || async { Err("db down".to_string()) })
        .publisher(p.clone())
        .run()
        .await;
    assert_eq!(out, Err("db down".to_string()));
    assert_eq!(p.classes(), vec![Class::Match]);
}

#[tokio::test]
async fn order_is_random_and_every_behavior_is_timed() {
    let p = Arc::new(Collect::default());
    for _ in 0..60 {
        let _: Result<i32, String> = Experiment::new("e")
            .control(|| async { Ok(1) })
            .candidate("a", || async { Ok(1) })
            .candidate("b", || async {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                Ok(1)
            })
            .publisher(p.clone())
            .run()
            .await;
    }
    let orders: std::collections::HashSet<Vec<String>> = p.results().iter().map(|r| r.order.clone()).collect();
    assert!(orders.len() >= 4, "60 runs of 3 behaviors should show several orders: {orders:?}");
    assert!(
        p.results()
            .iter()
            .all(|r| r.candidates.iter().any(|c| c.observation.duration >= std::time::Duration::from_millis(1)))
    );
}

#[tokio::test]
async fn comparator_ignore_clean_and_context() {
    let p = Arc::new(Collect::default());
    let _: Result<(i32, String), String> = Experiment::new("e")
        .control(|| async { Ok((1, "a".to_string())) })
        .candidate("case", || async { Ok((1, "A".to_string())) })
        .compare(|a, b| a.0 == b.0 && a.1.eq_ignore_ascii_case(&b.1))
        .publisher(p.clone())
        .run()
        .await;
    let _: Result<i32, String> = Experiment::new("e")
        .control(|| async { Ok(10) })
        .candidate("off_by_one", || async { Ok(11) })
        .ignore(|a: &i32, b: &i32| (a - b).abs() <= 1)
        .clean(|v| serde_json::json!({ "bucket": v / 10 }))
        .context("courier_id", 42)
        .publisher(p.clone())
        .run()
        .await;
    assert_eq!(p.classes(), vec![Class::Match, Class::Ignored]);
    let r = &p.results()[1];
    assert_eq!(r.context["courier_id"], 42);
    assert_eq!(r.control.value, Some(serde_json::json!({ "bucket": 1 })));
}

#[tokio::test]
async fn run_if_and_percentage_gate_the_candidates() {
    let calls = Arc::new(AtomicUsize::new(0));
    let p = Arc::new(Collect::default());
    let c = calls.clone();
    let out: Result<i32, String> = Experiment::new("e")
        .control(|| async { Ok(1) })
        .candidate("c", move || async move {
            c.fetch_add(1, Ordering::SeqCst);
            Ok(1)
        })
        .run_if(|| false)
        .publisher(p.clone())
        .run()
        .await;
    assert_eq!(out, Ok(1));
    assert_eq!(calls.load(Ordering::SeqCst), 0, "run_if false: candidates do not run");
    for _ in 0..400 {
        let c = calls.clone();
        let _: Result<i32, String> = Experiment::new("e")
            .control(|| async { Ok(1) })
            .candidate("c", move || async move {
                c.fetch_add(1, Ordering::SeqCst);
                Ok(1)
            })
            .percent(25.0)
            .publisher(p.clone())
            .run()
            .await;
    }
    let ran = calls.load(Ordering::SeqCst);
    assert!((50..=150).contains(&ran), "about a quarter of 400 runs: {ran}");
    assert_eq!(p.1.lock().map(|v| v.len()).unwrap_or(0), 1 + 400 - ran);
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct Versioned {
    value: i32,
    #[serde(skip)]
    at: u64,
}

#[tokio::test]
async fn lag_aware_classification_proves_staleness_with_a_recheck() {
    let at = |v: &Versioned| Some(ObservedAt { lsn: Some(Lsn(v.at)), since: None, time: None });
    let p = Arc::new(Collect::default());
    let same_value = |a: &Versioned, b: &Versioned| a.value == b.value;
    // Older candidate; the recheck at the control's position agrees with the control: stale.
    let _: Result<Versioned, String> = Experiment::new("e")
        .control(|| async { Ok(Versioned { value: 2, at: 100 }) })
        .candidate("cache", || async { Ok(Versioned { value: 1, at: 90 }) })
        .compare(same_value)
        .observed_at(at)
        .recheck(|pos| async move { Ok(Versioned { value: 2, at: pos.lsn.map_or(0, |l| l.0) }) })
        .publisher(p.clone())
        .run()
        .await;
    // Older candidate, but the recheck still differs: divergent.
    let _: Result<Versioned, String> = Experiment::new("e")
        .control(|| async { Ok(Versioned { value: 2, at: 100 }) })
        .candidate("cache", || async { Ok(Versioned { value: 1, at: 90 }) })
        .compare(same_value)
        .observed_at(at)
        .recheck(|_| async move { Ok(Versioned { value: 7, at: 100 }) })
        .publisher(p.clone())
        .run()
        .await;
    // Older candidate, recheck fails: unverified. Not older: divergent without a recheck.
    let _: Result<Versioned, String> = Experiment::new("e")
        .control(|| async { Ok(Versioned { value: 2, at: 100 }) })
        .candidate("cache", || async { Ok(Versioned { value: 1, at: 90 }) })
        .compare(same_value)
        .observed_at(at)
        .recheck(|_| async move { Err::<Versioned, _>("cache behind".to_string()) })
        .publisher(p.clone())
        .run()
        .await;
    let _: Result<Versioned, String> = Experiment::new("e")
        .control(|| async { Ok(Versioned { value: 2, at: 100 }) })
        .candidate("cache", || async { Ok(Versioned { value: 1, at: 120 }) })
        .compare(same_value)
        .observed_at(at)
        .publisher(p.clone())
        .run()
        .await;
    assert_eq!(p.classes(), vec![Class::Stale, Class::Divergent, Class::Unverified, Class::Divergent]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_candidates_add_no_latency_and_are_bounded() {
    // The candidates cannot finish until every caller has its answer: a caller that waited
    // for a candidate would never return, so the property holds whatever the machine's speed.
    let p = Arc::new(SummaryPublisher::new("bg", false, 5));
    let limit = Arc::new(Semaphore::new(2));
    let gate = Arc::new(Semaphore::new(0));
    let callers = async {
        for _ in 0..10 {
            let gate = gate.clone();
            let out: Result<i32, String> = Experiment::new("bg")
                .control(|| async { Ok(1) })
                .candidate("slow", || async move {
                    let _open = gate.acquire().await;
                    Ok(2)
                })
                .publisher(p.clone())
                .run_in_background(&limit)
                .await;
            assert_eq!(out, Ok(1));
        }
    };
    tokio::time::timeout(Duration::from_secs(30), callers).await.expect("a caller waited for a background candidate");
    assert_eq!(p.summary().runs, 0, "no candidate can have finished while the gate is closed");
    assert_eq!(limit.available_permits(), 0, "two candidates hold the two permits");
    gate.add_permits(10);
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.summary().runs < 2 {
        assert!(Instant::now() < deadline, "the released candidates never reported: {:?}", p.summary());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = p.summary();
    assert_eq!(s.runs, 2, "two permits: two runs compared");
    assert_eq!(s.skipped.get("busy"), Some(&8));
    assert_eq!(s.candidates["slow"].classes.get("divergent"), Some(&2));
    assert_eq!(s.mismatch_samples.len(), 2);
    assert!(s.mismatch_samples.iter().all(|m| m.control.is_none()), "no values unless enabled");
    let deadline = Instant::now() + Duration::from_secs(30);
    while limit.available_permits() < 2 {
        assert!(Instant::now() < deadline, "a finished candidate kept its permit");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn sync_experiments_work_without_a_runtime() {
    let p = Arc::new(Collect::default());
    let out: Result<i32, String> = Experiment::new("sync")
        .control_sync(|| Ok(5))
        .candidate_sync("c", || Ok(5))
        .candidate_sync("p", || panic!("sync panic"))
        .publisher(p.clone())
        .run_sync();
    assert_eq!(out, Ok(5));
    let mut classes = p.classes();
    classes.sort();
    assert_eq!(classes, vec![Class::Match, Class::CandidateError]);
}

/// A value true from `since` up to `at`.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Ranged {
    value: i32,
    #[serde(skip)]
    since: Option<u64>,
    #[serde(skip)]
    at: u64,
}

fn ranged(value: i32, since: Option<u64>, at: u64) -> Ranged {
    Ranged { value, since, at }
}

async fn classify_pair(control: Ranged, candidate: Ranged, recheck: Option<Ranged>) -> Class {
    let p = Arc::new(Collect::default());
    let mut e = Experiment::new("positions")
        .control(move || async move { Ok::<_, String>(control) })
        .candidate("cache", move || async move { Ok(candidate) })
        .compare(|a: &Ranged, b: &Ranged| a.value == b.value)
        .observed_at(|v: &Ranged| Some(ObservedAt { lsn: Some(Lsn(v.at)), since: v.since.map(Lsn), time: None }))
        .publisher(p.clone());
    if let Some(again) = recheck {
        e = e.recheck(move |_| {
            let again = again.clone();
            async move { Ok(again) }
        });
    }
    let _ = e.run().await;
    p.classes()[0]
}

#[tokio::test]
async fn differences_are_classified_by_position_not_by_which_ran_first() {
    // The control read at 100; the cache's row was written at 105 (a background run where the
    // control ran first): the control is behind, nothing diverges.
    assert_eq!(classify_pair(ranged(1, None, 100), ranged(2, Some(105), 110), None).await, Class::Ahead);
    // Both true at 100 (the cache's row since 80, its view at 110) and different: divergent.
    assert_eq!(classify_pair(ranged(1, None, 100), ranged(2, Some(80), 110), None).await, Class::Divergent);
    // The cache as of 90, behind the control; caught up to the control's value: stale.
    let behind = ranged(0, Some(50), 90);
    assert_eq!(classify_pair(ranged(1, None, 100), behind.clone(), Some(ranged(1, Some(95), 120))).await, Class::Stale);
    // Caught up, but the row changed again after the control's read: cannot be compared.
    assert_eq!(
        classify_pair(ranged(1, None, 100), behind.clone(), Some(ranged(7, Some(115), 120))).await,
        Class::Unverified
    );
    // Caught up, the row unchanged since before the control's read, and still different: divergent.
    assert_eq!(classify_pair(ranged(1, None, 100), behind, Some(ranged(7, Some(60), 120))).await, Class::Divergent);
}

#[tokio::test]
async fn a_hung_candidate_times_out_as_a_candidate_error_and_counts_against_the_match_rate() {
    let summary = Arc::new(SummaryPublisher::new("hung", false, 5));
    for hang in [true, false] {
        let out: Result<i32, String> = Experiment::new("hung")
            .control(|| async { Ok(1) })
            .candidate("c", move || async move {
                if hang {
                    futures::future::pending::<()>().await;
                }
                Ok(1)
            })
            .candidate_timeout(Duration::from_millis(50))
            .publisher(summary.clone())
            .run()
            .await;
        assert_eq!(out, Ok(1));
    }
    let s = summary.summary();
    assert_eq!(s.candidates["c"].classes.get("candidate_error"), Some(&1));
    assert_eq!(s.candidates["c"].match_rate, 0.5, "one match in two runs: errors are in the denominator");
}

#[tokio::test(flavor = "current_thread")]
async fn run_sync_inside_a_current_thread_runtime_does_not_hang_it() {
    let out: Result<i32, String> =
        Experiment::new("sync").control_sync(|| Ok(5)).candidate_sync("c", || Ok(5)).run_sync();
    assert_eq!(out, Ok(5));
    // The runtime still runs its own tasks afterwards.
    assert_eq!(tokio::spawn(async { 7 }).await.ok(), Some(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn run_sync_on_a_worker_lets_the_runtime_go_on() {
    let ticks = Arc::new(AtomicUsize::new(0));
    let ticker = tokio::spawn({
        let ticks = ticks.clone();
        async move {
            loop {
                ticks.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    let seen = ticks.clone();
    // The control waits until the runtime's other task has ticked: a blocked worker (the only
    // one) would never let it.
    let out: Result<usize, String> = Experiment::new("sync")
        .control_sync(move || {
            let start = seen.load(Ordering::SeqCst);
            while seen.load(Ordering::SeqCst) < start + 3 {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(1)
        })
        .candidate_sync("c", || Ok(1))
        .run_sync();
    assert_eq!(out, Ok(1));
    ticker.abort();
}
