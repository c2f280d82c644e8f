//! What deploy/ ships, checked against the daemons themselves:
//! - every `walcache_*` metric the Grafana dashboard and the Prometheus alerts use is one the
//!   running producer (the binary), consumer and client export, read from their `/metrics`;
//! - every daemon configuration under deploy/ loads and validates as the daemon would load it;
//! - the probes the manifests and images use (`probe`, `/readyz?standby=ok`) answer as the
//!   manifests assume: a standby producer is ready for the orchestrator, not for plain `/readyz`.
//!
//! The files' syntax is checked by real validators in `make lint` (deploy/check.sh).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use walcache_client::experiment::{Experiment, PrometheusPublisher, Publisher};
use walcache_client::{Client, ClientMetrics, ClientOptions, CourierPerformance, Fallback, ReadOptions};
use walcache_tests::pipeline::http_get;
use walcache_tests::{Env, Pipeline, TestDb, binary, repo_root, wait_for};

/// Files whose metric names must exist.
const OBSERVABILITY_FILES: [&str; 2] =
    ["deploy/observability/grafana/walcache.json", "deploy/observability/prometheus/walcache-alerts.yml"];

/// Metric families in Prometheus text exposition: name -> type.
fn families(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.trim().to_string()))
        .collect()
}

/// Every series name a family of `kind` puts on the wire.
fn series_names(name: &str, kind: &str) -> Vec<String> {
    match kind {
        "histogram" => ["_bucket", "_sum", "_count"].iter().map(|s| format!("{name}{s}")).collect(),
        "summary" => vec![name.to_string(), format!("{name}_sum"), format!("{name}_count")],
        _ => vec![name.to_string()],
    }
}

/// Every `walcache_…` identifier in `text` (metric names are `[a-z0-9_]`).
fn metric_tokens(text: &str) -> BTreeSet<String> {
    let mut tokens = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("walcache_") {
        let preceded_by_ident =
            rest[..at].chars().next_back().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        let tail = &rest[at..];
        let end =
            tail.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')).unwrap_or(tail.len());
        if !preceded_by_ident {
            tokens.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_metric_the_dashboard_and_alerts_use_is_exported_by_a_running_daemon() {
    let db = TestDb::create().await;
    db.seed(1, 20).await;
    let p = Pipeline::new(&db);
    let producer = p.spawn();
    wait_for("the producer binary streams", Duration::from_secs(120), || async {
        producer.ready().await.then_some(())
    })
    .await;
    let consumer = p.start_consumer("").await;
    consumer.wait_ready(Duration::from_secs(60)).await;

    // The client as a payments service runs it: metrics registered, one experiment run.
    let client_registry = prometheus::Registry::new();
    let client = Client::new(
        &consumer.base,
        ClientOptions::default().metrics(ClientMetrics::register(&client_registry).expect("client metrics")),
    )
    .expect("client");
    let publisher: Arc<dyn Publisher> = Arc::new(PrometheusPublisher::new(&client_registry).expect("publisher"));
    let control_db = db.clone();
    let candidate = client.clone();
    Experiment::new("deploy-metrics")
        .control(move || async move { Ok::<_, String>(control_db.courier(3).await) })
        .candidate("cache", move || async move {
            candidate
                .get::<CourierPerformance>(&3, &ReadOptions::default())
                .await
                .map(|read| read.value)
                .map_err(|e| e.to_string())
        })
        .publisher(Arc::clone(&publisher))
        .run()
        .await
        .expect("the control answers");
    // A run that is skipped is published too (walcache_experiment_skipped_total).
    let (skipped_control, skipped_candidate) = (db.clone(), db.clone());
    Experiment::new("deploy-metrics")
        .control(move || async move { Ok::<_, String>(skipped_control.courier(4).await) })
        .candidate("cache", move || async move { Ok::<_, String>(skipped_candidate.courier(4).await) })
        .run_if(|| false)
        .publisher(publisher)
        .run()
        .await
        .expect("the control answers");
    let fallback_db = db.clone();
    let reads = Fallback::<CourierPerformance, _>::new(client.clone(), move |id: i64| {
        let db = fallback_db.clone();
        async move { Ok::<_, std::convert::Infallible>(db.courier(id).await) }
    });
    reads.get(&5, &ReadOptions::default()).await.expect("a fallback read answers");

    let root = repo_root();
    let mut used = BTreeMap::new();
    for file in OBSERVABILITY_FILES {
        let text = std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        for token in metric_tokens(&text) {
            used.entry(token).or_insert_with(Vec::new).push(file);
        }
    }
    // The dashboard and alerts cover the data path end to end: each part is referred to.
    for part in ["walcache_producer_", "walcache_consumer_", "walcache_client_", "walcache_experiment_"] {
        assert!(used.keys().any(|n| n.starts_with(part)), "nothing in deploy/observability uses {part}*");
    }

    // Some gauges are refreshed by a periodic task (lag, staleness): scrape until every used
    // name is exported, or report what never was.
    let consumer_addr = consumer.base.trim_start_matches("http://").to_string();
    let scrape = || async {
        let producer_metrics = http_get(&producer.ops, "/metrics").await.expect("the producer's /metrics answers");
        let consumer_metrics = http_get(&consumer_addr, "/metrics").await.expect("the consumer's /metrics answers");
        let mut client_metrics = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &client_registry.gather(), &mut client_metrics)
            .expect("encode");
        let client_metrics = String::from_utf8(client_metrics).expect("utf-8");
        let mut exported = BTreeSet::new();
        for (daemon, text) in
            [("producer", &producer_metrics), ("consumer", &consumer_metrics), ("client", &client_metrics)]
        {
            let found = families(text);
            assert!(
                found.keys().any(|n| n.starts_with(&format!("walcache_{daemon}_"))),
                "{daemon} exports no walcache_{daemon}_* family:\n{text}"
            );
            exported.extend(found.iter().flat_map(|(name, kind)| series_names(name, kind)));
        }
        exported
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (exported, missing) = loop {
        let exported = scrape().await;
        let missing: Vec<_> = used.iter().filter(|(name, _)| !exported.contains(*name)).collect();
        if missing.is_empty() || std::time::Instant::now() > deadline {
            break (exported, missing);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        missing.is_empty(),
        "metrics used by deploy/observability that no daemon exports (renamed? a histogram without \
         _bucket/_sum/_count?): {missing:?}\nexported: {exported:?}"
    );
    eprintln!("{} metric names in deploy/observability, all exported", used.len());
    consumer.stop().await;
}

/// The daemon configurations shipped under deploy/ (not the local environment's).
fn deploy_configs(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "toml") {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    for dir in ["compose", "kubernetes", "systemd"] {
        walk(&root.join("deploy").join(dir), &mut found);
    }
    found.sort();
    found
}

/// Points every file a configuration names (secrets, CA) at a stand-in in `dir`, as the
/// mounted secrets would be.
fn with_stand_in_files(value: &mut toml::Value, dir: &Path, ca: &Path) {
    match value {
        toml::Value::Table(table) => {
            for (key, v) in table.iter_mut() {
                if let toml::Value::String(path) = v
                    && (key.ends_with("_file") || key == "sslrootcert")
                {
                    let stand_in = if key == "sslrootcert" {
                        ca.to_path_buf()
                    } else {
                        let file = dir.join(key);
                        std::fs::write(&file, "a-stand-in-secret").expect("write stand-in");
                        file
                    };
                    *path = stand_in.display().to_string();
                } else {
                    with_stand_in_files(v, dir, ca);
                }
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(|v| with_stand_in_files(v, dir, ca)),
        _ => {}
    }
}

#[test]
fn every_daemon_configuration_under_deploy_loads_and_validates() {
    let root = repo_root();
    let configs = deploy_configs(&root);
    let env = Env::get();
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut producers, mut consumers) = (0, 0);
    for path in &configs {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let text = std::fs::read_to_string(path).expect("read config");
        let mut value: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        with_stand_in_files(&mut value, dir.path(), &env.pg_ca);
        let shown = path.strip_prefix(&root).unwrap_or(path).display().to_string();
        if name.starts_with("producer") {
            let config: walcache_producer::ProducerConfig =
                value.try_into().unwrap_or_else(|e| panic!("{shown} is not a producer configuration: {e}"));
            config.validate().unwrap_or_else(|e| panic!("{shown}: {e}"));
            producers += 1;
        } else if name.starts_with("consumer") {
            let config: walcache_consumer::ConsumerConfig =
                value.try_into().unwrap_or_else(|e| panic!("{shown} is not a consumer configuration: {e}"));
            config.validate().unwrap_or_else(|e| panic!("{shown}: {e}"));
            consumers += 1;
        } else {
            panic!("{shown}: a configuration under deploy/ is named producer*.toml or consumer*.toml");
        }
    }
    // compose, the kubernetes base and overlay, systemd: each ships both daemons' files.
    assert!(
        producers >= 4 && consumers >= 4,
        "found {producers} producer and {consumers} consumer configs: {configs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_producer_passes_the_orchestrators_probe_but_not_plain_readyz() {
    let db = TestDb::create().await;
    db.seed(1, 5).await;
    let p = Pipeline::new(&db);
    let leader = p.spawn();
    wait_for("the leader streams", Duration::from_secs(120), || async { leader.ready().await.then_some(()) }).await;
    let standby = p.spawn();
    let probe = |process: &walcache_tests::ProducerProcess, path: &str| {
        let config = process.log.with_file_name("producer.toml");
        Command::new(binary("walcache-producer"))
            .args(["--config"])
            .arg(config)
            .args(["probe", "--path", path])
            .output()
            .expect("walcache-producer probe runs")
    };
    wait_for("the second producer stands by", Duration::from_secs(60), || async {
        http_get(&standby.ops, "/readyz").await.filter(|body| body.contains("standby")).map(|_| ())
    })
    .await;

    let alive = probe(&standby, "/healthz");
    assert!(alive.status.success(), "{}", String::from_utf8_lossy(&alive.stderr));
    let orchestrator = probe(&standby, "/readyz?standby=ok");
    assert!(orchestrator.status.success(), "{}", String::from_utf8_lossy(&orchestrator.stderr));
    let plain = probe(&standby, "/readyz");
    assert!(!plain.status.success(), "a standby is not ready to stream");
    assert!(String::from_utf8_lossy(&plain.stderr).contains("standby"), "{}", String::from_utf8_lossy(&plain.stderr));
    let leading = probe(&leader, "/readyz");
    assert!(leading.status.success(), "{}", String::from_utf8_lossy(&leading.stderr));
    assert_eq!(leader_gauge(&standby).await, Some(0.0), "the standby does not claim to lead");
    assert_eq!(leader_gauge(&leader).await, Some(1.0), "the leader says so");
}

async fn leader_gauge(process: &walcache_tests::ProducerProcess) -> Option<f64> {
    process.metric("walcache_producer_leader").await
}

#[test]
fn metric_tokens_reads_names_not_fragments() {
    let text = r#"rate(walcache_producer_events_total{op="insert"}[5m]) / walcache_consumer_ready, "x_walcache_y", level:walcache_z:rate"#;
    let tokens: Vec<_> = metric_tokens(text).into_iter().collect();
    assert_eq!(tokens, ["walcache_consumer_ready", "walcache_producer_events_total"]);
}
