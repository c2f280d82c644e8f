//! TLS to Postgres with libpq's `sslmode` semantics, for every tokio-postgres connection
//! walcache opens: the producer's control and snapshot connections (its replication connection
//! maps the same policy onto pgwire-replication) and the `walcache verify` CLI.
//!
//! ```text
//!  URL ?sslmode=..&sslrootcert=..  (or configuration keys)
//!        └─► PgTls ──► tokio-postgres: ssl_mode + MakeRustls (rustls, verifier per mode)
//! ```
//!
//! | sslmode       | encrypted            | server certificate checked |
//! |---------------|----------------------|----------------------------|
//! | `disable`     | never                | no                         |
//! | `prefer`      | if the server offers | no (libpq's default)       |
//! | `require`     | always               | no                         |
//! | `verify-ca`   | always               | chain to `sslrootcert`     |
//! | `verify-full` | always               | chain and host name        |

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, WebPkiServerVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// A TLS setting that cannot work; the message says which and what to change.
#[derive(Debug, thiserror::Error)]
#[error("TLS to Postgres: {0}")]
pub struct TlsError(String);

/// libpq's `sslmode` values that walcache supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(value: &str) -> Result<Self, TlsError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(TlsError(
                    "sslmode=allow is not supported; use prefer (TLS when the server offers it) or require".into(),
                ));
            }
            other => {
                return Err(TlsError(format!(
                    "sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                )));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// How the producer's connections to Postgres use TLS; checked when built, so a missing or
/// unreadable CA file stops the start instead of the first connection.
#[derive(Clone)]
pub struct PgTls {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
    /// `None` for `disable`.
    client: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTls").field("mode", &self.mode).field("root_cert", &self.root_cert).finish()
    }
}

impl PgTls {
    pub fn new(mode: SslMode, root_cert: Option<PathBuf>) -> Result<Self, TlsError> {
        if mode.verifies() && root_cert.is_none() {
            return Err(TlsError(format!(
                "sslmode={} needs the CA that signed the server's certificate: set sslrootcert in postgres.url \
                 or postgres.sslrootcert to its PEM file",
                mode.as_str()
            )));
        }
        let client = match mode {
            SslMode::Disable => None,
            _ => Some(Arc::new(client_config(mode, root_cert.as_deref())?)),
        };
        Ok(PgTls { mode, root_cert, client })
    }

    /// The mode tokio-postgres negotiates with; verification is the connector's business.
    pub fn tokio_ssl_mode(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        }
    }

    /// The connector for tokio-postgres connections.
    pub fn connector(&self) -> MakeRustls {
        MakeRustls { config: self.client.clone() }
    }
}

fn tls_error(what: impl std::fmt::Display) -> TlsError {
    TlsError(what.to_string())
}

fn client_config(mode: SslMode, root_cert: Option<&std::path::Path>) -> Result<ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?;
    let algorithms = provider.signature_verification_algorithms;
    let chain = match (mode.verifies(), root_cert) {
        (true, Some(path)) => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(load_roots(path)?), Arc::clone(&provider))
                .build()
                .map_err(tls_error)?,
        ),
        _ => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match chain {
        Some(full) if mode == SslMode::VerifyFull => full,
        chain => Arc::new(Lenient { chain, algorithms }),
    };
    Ok(builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth())
}

fn load_roots(path: &std::path::Path) -> Result<RootCertStore, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| tls_error(format!("cannot read sslrootcert {}: {e}", path.display())))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(tls_error(format!("sslrootcert {} holds no usable CA certificate", path.display())));
    }
    Ok(roots)
}

/// `prefer` and `require` (no `chain`): encrypted, the certificate taken as it comes, as
/// libpq does. `verify-ca` (a `chain`): the chain must lead to a trusted CA, and the name in
/// the certificate is not compared with the host. Handshake signatures are checked either way,
/// so the session key belongs to whoever sent the certificate.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// tokio-postgres's TLS hook, backed by rustls.
#[derive(Debug, Clone)]
pub struct MakeRustls {
    config: Option<Arc<ClientConfig>>,
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = std::io::Error;

    // Called for every connection, sslmode=disable included (tokio-postgres then never asks
    // for the handshake), so it must not fail for want of a TLS configuration.
    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, std::io::Error> {
        let name = ServerName::try_from(domain.to_string())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        Ok(RustlsConnect { config: self.config.clone(), name })
    }
}

#[derive(Debug)]
pub struct RustlsConnect {
    /// `None` under sslmode=disable.
    config: Option<Arc<ClientConfig>>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, std::io::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let config = self.config.ok_or_else(|| std::io::Error::other("TLS requested under sslmode=disable"))?;
            let connector = tokio_rustls::TlsConnector::from(config);
            connector.connect(self.name, stream).await.map(|s| RustlsStream(Box::new(s)))
        })
    }
}

/// A TLS session over a connection to Postgres.
#[derive(Debug)]
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// When connecting failed because of TLS (the server refused it, or its certificate did not
/// verify), the whole cause chain, for a message: retrying cannot fix a certificate. `None`
/// for any other failure.
pub fn tls_failure(e: &tokio_postgres::Error) -> Option<String> {
    let mut chain = vec![e.to_string()];
    let mut is_tls = e.to_string().contains("TLS");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        is_tls |= s.downcast_ref::<rustls::Error>().is_some()
            || s.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.is::<rustls::Error>());
        chain.push(s.to_string());
        source = s.source();
    }
    is_tls.then(|| chain.join(": "))
}

/// What to check when TLS to Postgres fails.
pub const TLS_FIX: &str = "check the server's ssl settings and sslmode / sslrootcert: verify-ca and verify-full \
                           need the PEM of the CA that signed the server's certificate, and verify-full a host \
                           name (or address) that the certificate names";

/// Splits libpq's TLS parameters (`sslmode`, `sslrootcert`) off a `postgres://` URL, which
/// tokio-postgres would otherwise reject (`verify-ca`, `verify-full`, `sslrootcert`).
/// Returns the URL without them and their values.
pub fn split_tls_params(url: &str) -> (String, Option<String>, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None, None);
    };
    let (mut mode, mut root) = (None, None);
    let rest: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "sslmode" => mode = Some(percent_decode(value)),
                "sslrootcert" => root = Some(percent_decode(value)),
                _ => return true,
            }
            false
        })
        .collect();
    let url = if rest.is_empty() { base.to_string() } else { format!("{base}?{}", rest.join("&")) };
    (url, mode, root)
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_come_off_the_url() {
        let (url, mode, root) = split_tls_params(
            "postgres://u@db:5432/app?sslmode=verify-full&connect_timeout=5&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(url, "postgres://u@db:5432/app?connect_timeout=5");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(split_tls_params("postgres://u@db/app"), ("postgres://u@db/app".into(), None, None));
        assert_eq!(split_tls_params("postgres://u@db/app?sslmode=require").0, "postgres://u@db/app");
    }

    #[test]
    fn verification_needs_a_ca_and_a_readable_one() {
        let err = PgTls::new(SslMode::VerifyFull, None).expect_err("no CA");
        assert!(err.to_string().contains("sslrootcert"), "{err}");
        let err = PgTls::new(SslMode::VerifyCa, Some("/nonexistent/ca.pem".into())).expect_err("missing CA");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        assert!(PgTls::new(SslMode::Require, None).is_ok());
        assert!(SslMode::parse("allow").is_err() && SslMode::parse("verify-full").is_ok());
    }
}
