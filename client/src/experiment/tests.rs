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
    let at = |v: &Versioned| Some(ObservedAt { lsn: Some(Lsn(v.at)), time: None });
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
