//! A consumer reading a test pipeline's topics, run in this process.

use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;
use walcache_consumer::{ConsumerConfig, Metrics, Running};

use crate::Pipeline;

/// A running consumer and a way to talk to it.
#[derive(Debug)]
pub struct TestConsumer {
    pub running: Running,
    pub base: String,
    pub metrics: Metrics,
    pub http: reqwest::Client,
    pub token: Option<String>,
    /// The broker and table topic it follows (for tests that explain a difference).
    pub kafka: String,
    pub topic: String,
}

impl Pipeline {
    /// The consumer configuration for this pipeline's topics; `extra` is appended TOML.
    pub fn consumer_toml(&self, extra: &str) -> String {
        format!(
            r#"
[kafka]
bootstrap_servers = "{kafka}"

[[tables]]
contract = "courier_performance"
topic = "{topic}"

[watermarks]
topic = "{watermarks}"

[dead_letter]
topic = "{dead_letter}"

[http]
listen = "127.0.0.1:0"
max_batch = 100
max_wait = "60s"
instance = "test-consumer"
{extra}
"#,
            kafka = self.kafka,
            topic = self.topic,
            watermarks = self.watermarks,
            dead_letter = self.dead_letter,
        )
    }

    /// Starts a consumer on this pipeline's topics.
    pub async fn start_consumer(&self, extra: &str) -> TestConsumer {
        self.start_consumer_on(0, extra).await
    }

    /// Starts an embedded view (walcache-client's, in this process) of this pipeline's topics;
    /// `extra` is appended TOML, as for a consumer. It does not publish dead letters (the
    /// test's consumers do).
    pub fn start_embedded(&self, extra: &str) -> std::sync::Arc<walcache_client::EmbeddedView> {
        let mut config: ConsumerConfig = toml::from_str(&self.consumer_toml(extra)).expect("consumer config parses");
        config.dead_letter.publish = false;
        walcache_client::EmbeddedView::start(config).expect("embedded view starts")
    }

    /// Starts a consumer listening on `port` (0: any).
    pub async fn start_consumer_on(&self, port: u16, extra: &str) -> TestConsumer {
        let toml = self.consumer_toml(extra).replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
        let config: ConsumerConfig = toml::from_str(&toml).expect("consumer config parses");
        let token = config.auth_token().expect("token").map(|t| t.expose().to_string());
        let metrics = Metrics::new().expect("metrics");
        let running =
            walcache_consumer::start(config, metrics.clone(), CancellationToken::new()).await.expect("consumer starts");
        TestConsumer {
            base: format!("http://{}", running.addr),
            running,
            metrics,
            http: reqwest::Client::new(),
            token,
            kafka: self.kafka.clone(),
            topic: self.topic.clone(),
        }
    }
}

impl TestConsumer {
    /// A request to a path, with the token when the consumer has one.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// GET a path: (status, JSON body).
    pub async fn get(&self, path: &str) -> (u16, Json) {
        let r = self.request(reqwest::Method::GET, path).send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Json::Null))
    }

    pub async fn post(&self, path: &str, body: &Json) -> (u16, Json) {
        let r = self.request(reqwest::Method::POST, path).json(body).send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Json::Null))
    }

    /// One row's answer.
    pub async fn row(&self, key: i64) -> (u16, Json) {
        self.get(&format!("/v1/tables/courier_performance/rows/{key}")).await
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.running.view.is_ready() {
            assert!(Instant::now() < deadline, "consumer not ready after {timeout:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The export as (key -> (state, position, value)), sorted.
    pub async fn export(&self) -> std::collections::BTreeMap<i64, (String, Json, Json)> {
        let text = self
            .request(reqwest::Method::GET, "/v1/tables/courier_performance/export")
            .send()
            .await
            .expect("export")
            .text()
            .await
            .expect("body");
        text.lines()
            .skip(1)
            .map(|l| {
                let v: Json = serde_json::from_str(l).expect("ndjson line");
                (
                    v["key"].as_i64().expect("key"),
                    (v["state"].as_str().unwrap_or_default().to_string(), v["position"].clone(), v["value"].clone()),
                )
            })
            .collect()
    }

    /// The present rows, as the contract view of a table would list them.
    pub async fn present_rows(&self) -> std::collections::BTreeMap<i64, serde_json::Map<String, Json>> {
        self.export()
            .await
            .into_iter()
            .filter(|(_, (state, _, _))| state == "present")
            .filter_map(|(k, (_, _, v))| v.as_object().cloned().map(|o| (k, o)))
            .collect()
    }

    pub async fn stop(self) {
        self.running.stop().await.expect("consumer stops cleanly");
    }
}
