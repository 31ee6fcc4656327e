//! The data-plane connection pool, the session settings every connection gets, and
//! TLS to PostgreSQL.
//!
//! # TLS
//!
//! The connection string's `sslmode` means what it means to libpq:
//!
//! | sslmode | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | never | – |
//! | `prefer` (default) | when the server offers it | no |
//! | `require` | always | no; against `sslrootcert` when one is given (libpq's rule) |
//! | `verify-ca` | always | chain up to a trusted root |
//! | `verify-full` | always | chain, and the name we connected to is in the certificate |
//!
//! Trusted roots are the certificates in `sslrootcert` when it is given, else the public
//! web PKI roots (`webpki-roots`), so managed databases with public certificates verify
//! without configuration. tokio-postgres itself knows only `disable`, `prefer` and
//! `require` and nothing of `sslrootcert`: [`Endpoint::parse`] takes those out of the
//! URL and builds the rustls verifier from them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::DataPlaneError;

/// Settings applied to every data-plane session at connect time.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// How long a batch waits for a row lock before giving up (transient, retried).
    pub lock_timeout: Duration,
    /// Upper bound for one statement; a batch hitting it is shrunk and retried.
    pub statement_timeout: Duration,
    /// Shown in `pg_stat_activity`, so DBAs can tell our sessions apart.
    pub application_name: String,
    /// Connections kept in the pool.
    pub pool_size: usize,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            lock_timeout: Duration::from_secs(1),
            statement_timeout: Duration::from_secs(30),
            application_name: "backfilld".to_string(),
            pool_size: 4,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// libpq's `sslmode`: whether to encrypt and what to check (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    /// Every mode, in the order libpq documents them (allow is not supported).
    pub const ALL: [SslMode; 5] = [
        SslMode::Disable,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    /// The name as written in a connection string.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str) -> Result<SslMode, String> {
        SslMode::ALL
            .into_iter()
            .find(|mode| mode.as_str() == value)
            .ok_or_else(|| {
                let known: Vec<&str> = SslMode::ALL.iter().map(|m| m.as_str()).collect();
                format!("sslmode={value} is not one of {}", known.join(", "))
            })
    }
}

/// What the server's certificate is checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verification {
    /// Nothing: encryption against passive eavesdropping only.
    None,
    /// The chain up to a trusted root, whatever name the certificate carries.
    Chain,
    /// The chain, and the host name we connected to.
    Full,
}

/// A database URL taken apart into what tokio-postgres understands and the TLS setup
/// it does not, ready to open connections. Errors never repeat the URL (it may hold a
/// password).
#[derive(Clone)]
pub struct Endpoint {
    config: tokio_postgres::Config,
    ssl_mode: SslMode,
    root_cert: Option<PathBuf>,
    tls: MakeRustlsConnect,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio_postgres::Config's Debug redacts the password.
        f.debug_struct("Endpoint")
            .field("config", &self.config)
            .field("ssl_mode", &self.ssl_mode)
            .field("root_cert", &self.root_cert)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Parses a `postgres://` URL, including `sslmode=verify-ca|verify-full` and
    /// `sslrootcert=FILE`, and loads the root certificates it names.
    pub fn parse(database_url: &str) -> Result<Endpoint, DataPlaneError> {
        let config_error = |message: String| DataPlaneError::Config(message);
        let mut url = url::Url::parse(database_url)
            .map_err(|e| config_error(format!("the database URL is not valid ({e})")))?;
        let mut ssl_mode = SslMode::Prefer;
        let mut root_cert = None;
        let mut rest = Vec::new();
        for (key, value) in url.query_pairs() {
            match &*key {
                "sslmode" => ssl_mode = SslMode::parse(&value).map_err(config_error)?,
                "sslrootcert" => root_cert = Some(PathBuf::from(&*value)),
                _ => {
                    check_parameter(&key, &value).map_err(config_error)?;
                    rest.push((key.into_owned(), value.into_owned()));
                }
            }
        }
        url.set_query(None);
        if !rest.is_empty() {
            url.query_pairs_mut().extend_pairs(rest);
        }
        let mut config: tokio_postgres::Config =
            url.as_str().parse().map_err(|e: tokio_postgres::Error| {
                config_error(format!("the database URL is not usable: {e}"))
            })?;
        let verification = match ssl_mode {
            SslMode::Disable | SslMode::Prefer => Verification::None,
            // libpq: "if a root CA file exists, require behaves like verify-ca".
            SslMode::Require if root_cert.is_some() => Verification::Chain,
            SslMode::Require => Verification::None,
            SslMode::VerifyCa => Verification::Chain,
            SslMode::VerifyFull => Verification::Full,
        };
        config.ssl_mode(match ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        let roots = match (&root_cert, verification) {
            (_, Verification::None) => RootCertStore::empty(),
            (Some(path), _) => load_root_certs(path).map_err(config_error)?,
            (None, _) => RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        };
        let tls = MakeRustlsConnect::new(client_config(verification, roots).map_err(config_error)?);
        Ok(Endpoint {
            config,
            ssl_mode,
            root_cert,
            tls,
        })
    }

    /// The URL's `sslmode` (`prefer` when it has none).
    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// The URL's `sslrootcert`, if any.
    pub fn root_cert(&self) -> Option<&Path> {
        self.root_cert.as_deref()
    }

    /// The TLS connector, for cancel requests: they open a connection of their own,
    /// which must be set up like the pool's.
    pub fn tls(&self) -> MakeRustlsConnect {
        self.tls.clone()
    }

    /// A pool of connections to this endpoint with `settings` on every session, for jobs'
    /// SQL: a connection is reset as it goes back (see [`RecyclingMethod::Clean`] below).
    pub fn pool(&self, settings: &SessionSettings) -> Result<Pool, DataPlaneError> {
        self.pool_recycled(settings, RecyclingMethod::Clean)
    }

    /// A pool like [`Endpoint::pool`] for sessions that run only backfilld's own fixed
    /// statements (the health probes and canaries): nothing a job set can be left on them,
    /// so a connection goes back without the reset, which is seven statements and a round
    /// trip on the primary each time (twenty times a second for the canary).
    pub fn probe_pool(&self, settings: &SessionSettings) -> Result<Pool, DataPlaneError> {
        self.pool_recycled(settings, RecyclingMethod::Fast)
    }

    fn pool_recycled(
        &self,
        settings: &SessionSettings,
        recycling_method: RecyclingMethod,
    ) -> Result<Pool, DataPlaneError> {
        let mut config = self.config.clone();
        // Startup options cost no round trip, outrank the role's and the database's own
        // settings (`ALTER ROLE … SET`), and are what `RESET ALL` returns to.
        config.options(format!(
            "-c lock_timeout={} -c statement_timeout={} {}",
            settings.lock_timeout.as_millis(),
            settings.statement_timeout.as_millis(),
            crate::session::startup_options()
        ));
        config.application_name(&settings.application_name);
        config.connect_timeout(settings.connect_timeout);
        let manager = Manager::from_config(
            config,
            self.tls.clone(),
            // With Clean, a connection goes back to the pool as it came: whatever one job's
            // SQL set for the session (search_path, read-only, a role, temp tables,
            // advisory locks) must not reach the next job (RESET ALL, DISCARD…).
            ManagerConfig { recycling_method },
        );
        Pool::builder(manager)
            .max_size(settings.pool_size)
            .wait_timeout(Some(settings.connect_timeout))
            .create_timeout(Some(settings.connect_timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| DataPlaneError::Config(format!("cannot build the data-plane pool: {e}")))
    }
}

/// Builds the data-plane pool for `database_url` with `settings` on every session.
pub fn connect_pool(
    database_url: &str,
    settings: &SessionSettings,
) -> Result<Pool, DataPlaneError> {
    Endpoint::parse(database_url)?.pool(settings)
}

/// `e` with the errors beneath it, on one line: tokio-postgres and deadpool say only
/// "error performing TLS handshake" where the cause ("invalid peer certificate:
/// UnknownIssuer") is one level down. A level already quoted by the one above is skipped.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Refuses a URL parameter tokio-postgres does not take (`sslcert`, a typo…) by name:
/// its parser says only "invalid connection string". The value is not repeated.
fn check_parameter(key: &str, value: &str) -> Result<(), String> {
    let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
    format!("{key}='{quoted}'")
        .parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|_| format!("the database URL's parameter {key} is not supported"))
}

/// The certificates of the PEM file at `path`.
fn load_root_certs(path: &Path) -> Result<RootCertStore, String> {
    let what = || format!("sslrootcert {}", path.display());
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| match e {
        pem::Error::Io(e) => format!("{}: cannot read it ({e})", what()),
        other => format!("{}: cannot read it ({other})", what()),
    })?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("{}: not a PEM certificate file ({e})", what()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: unusable certificate ({e})", what()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: holds no certificate", what()));
    }
    Ok(roots)
}

/// The rustls client configuration for `verification` against `roots`.
fn client_config(verification: Verification, roots: RootCertStore) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?;
    let webpki = || {
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|e| format!("cannot set up certificate verification: {e}"))
    };
    let config = match verification {
        Verification::Full => builder
            .with_webpki_verifier(webpki()?)
            .with_no_client_auth(),
        Verification::Chain => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki()?)))
            .with_no_client_auth(),
        Verification::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
            .with_no_client_auth(),
    };
    Ok(config)
}

/// `verify-ca`: the full web PKI check, except that a certificate for another name
/// passes. rustls checks the name only after the chain, so the chain was verified.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
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
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` without a root certificate: any certificate is accepted (as
/// libpq does), but the handshake itself is still verified, so the session is encrypted
/// to whoever holds the certificate's key.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_only_parameters_are_taken_out_before_tokio_postgres_parses() {
        let endpoint =
            Endpoint::parse("postgres://app:s3cret@db:5433/x?sslmode=require&application_name=a")
                .expect("valid");
        assert_eq!(endpoint.ssl_mode(), SslMode::Require);
        assert_eq!(endpoint.root_cert(), None);
        assert_eq!(
            endpoint.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(endpoint.config.get_application_name(), Some("a"));
        assert_eq!(endpoint.config.get_password(), Some(&b"s3cret"[..]));
        let prefer = Endpoint::parse("postgres://db/x").expect("valid");
        assert_eq!(prefer.ssl_mode(), SslMode::Prefer);
    }

    #[test]
    fn bad_tls_parameters_are_refused_without_echoing_the_url() {
        let error = |url: &str| Endpoint::parse(url).unwrap_err().to_string();
        assert_eq!(
            error("postgres://app:s3cret@db/x?sslmode=bogus"),
            "sslmode=bogus is not one of disable, prefer, require, verify-ca, verify-full"
        );
        assert_eq!(
            error("postgres://app:s3cret@db/x?sslmode=verify-full&sslrootcert=/nonexistent/root.crt"),
            "sslrootcert /nonexistent/root.crt: cannot read it (No such file or directory (os error 2))"
        );
        assert_eq!(
            error("postgres://app:s3cret@db/x?sslcert=/client.crt"),
            "the database URL's parameter sslcert is not supported"
        );
    }

    #[test]
    fn error_chains_name_the_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("error performing TLS handshake")]
        struct Outer(#[source] std::io::Error);
        #[derive(Debug, thiserror::Error)]
        #[error("connect failed: {0}")]
        struct Quoting(#[source] std::io::Error);
        let cause = || std::io::Error::other("invalid peer certificate: UnknownIssuer");
        assert_eq!(
            error_chain(&Outer(cause())),
            "error performing TLS handshake: invalid peer certificate: UnknownIssuer"
        );
        assert_eq!(
            error_chain(&Quoting(cause())),
            "connect failed: invalid peer certificate: UnknownIssuer"
        );
    }

    #[test]
    fn verify_modes_check_more_than_require() {
        // Without a root certificate verify-* trusts the public web PKI roots.
        for url in [
            "postgres://db/x?sslmode=verify-ca",
            "postgres://db/x?sslmode=verify-full",
            "postgres://db/x?sslmode=disable",
        ] {
            Endpoint::parse(url).expect(url);
        }
    }
}
