//! Tracing set-up: `RUST_LOG` (or `WALCACHE_LOG`) filters, `WALCACHE_LOG_FORMAT=json` for
//! log shippers. Spans carry the component, so one process's lines group by pipeline stage.

use tracing_subscriber::EnvFilter;

pub fn init(default_filter: &str) {
    let filter = std::env::var("WALCACHE_LOG")
        .ok()
        .map(EnvFilter::new)
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new(default_filter));
    let json = std::env::var("WALCACHE_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if json { builder.json().try_init() } else { builder.try_init() };
    // A second init (tests) keeps the first subscriber.
    drop(result);
}
