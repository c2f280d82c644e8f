//! The producer's side of TLS to Postgres: the policy of [`walcache_pgtls`] mapped onto the
//! replication connection (pgwire-replication), and TLS failures as operator-facing errors.

pub use walcache_pgtls::{PgTls, SslMode, TLS_FIX, split_tls_params};

use crate::ProducerError;

/// The TLS policy for the replication connection. `host` is the server's name or address.
pub fn replication(tls: &PgTls, host: &str) -> pgwire_replication::TlsConfig {
    use pgwire_replication::config::SslMode as Mode;
    let mode = match tls.mode {
        SslMode::Disable => Mode::Disable,
        SslMode::Prefer => Mode::Prefer,
        SslMode::Require => Mode::Require,
        SslMode::VerifyCa => Mode::VerifyCa,
        SslMode::VerifyFull => Mode::VerifyFull,
    };
    pgwire_replication::TlsConfig {
        mode,
        ca_pem_path: tls.root_cert.clone(),
        // pgwire-replication refuses verify-full on an address unless told the name to check;
        // rustls checks an address against the certificate's IP entries.
        sni_hostname: host.parse::<std::net::IpAddr>().is_ok().then(|| host.to_string()),
        client_cert_pem_path: None,
        client_key_pem_path: None,
    }
}

/// A connection that failed because of TLS, as a definite prerequisite failure.
pub fn tls_failure(target: &str, mode: SslMode, e: &tokio_postgres::Error) -> Option<ProducerError> {
    walcache_pgtls::tls_failure(e).map(|chain| ProducerError::Prerequisite {
        problem: format!("TLS to {target} with sslmode={} failed: {chain}", mode.as_str()),
        fix: TLS_FIX.into(),
    })
}
