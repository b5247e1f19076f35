//! TLS towards the tasks (`ssl_backend=true`): rustls client settings for
//! `ssl_backend_tls_verify=required` (web PKI roots, or the `SSLBackendCAFile` certificates)
//! and `none` (any certificate, as nginx's `proxy_ssl_verify off`), and one keep-alive pool per
//! backend identity, so that connections are reused only for the name and checks they passed.

use std::{
    collections::{HashMap, HashSet},
    fmt, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{pem::PemObject as _, CertificateDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::net::TcpStream;
use tokio_rustls::{client::TlsStream, TlsConnector};
use tokio_util::either::Either;
use tracing::debug;

use super::upstream::{PoolSettings, UpstreamError, UpstreamPool};
use crate::routes::{BackendTls, BackendTlsVerify};

#[derive(Debug, thiserror::Error)]
pub enum BackendTlsError {
    #[error("SSLBackendCAFile {}: {source}", path.display())]
    CaFile {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("SSLBackendCAFile {}: {message}", path.display())]
    CaCertificates { path: PathBuf, message: String },
    #[error("TLS client settings: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The two client configurations `ssl_backend_tls_verify` chooses between.
#[derive(Clone)]
pub struct BackendTlsClients {
    verified: Arc<ClientConfig>,
    unverified: Arc<ClientConfig>,
}

impl BackendTlsClients {
    /// `ca_file`: PEM certificates trusted instead of the web PKI roots.
    pub fn new(ca_file: Option<&Path>) -> Result<Self, BackendTlsError> {
        let provider = Arc::new(ring::default_provider());
        let roots = match ca_file {
            None => RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            Some(path) => ca_roots(path)?,
        };
        let verified = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let unverified = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
            .with_no_client_auth();
        Ok(Self {
            verified: Arc::new(verified),
            unverified: Arc::new(unverified),
        })
    }

    fn connector(&self, verify: BackendTlsVerify) -> TlsConnector {
        match verify {
            BackendTlsVerify::Required => TlsConnector::from(Arc::clone(&self.verified)),
            BackendTlsVerify::None => TlsConnector::from(Arc::clone(&self.unverified)),
        }
    }
}

impl Default for BackendTlsClients {
    /// `ssl_backend_tls_verify=required` trusting the web PKI roots.
    fn default() -> Self {
        // Only a custom CA file can make these settings fail: ring's default provider supports
        // its own safe protocol versions.
        Self::new(None).expect("rustls client settings with the web PKI roots")
    }
}

impl fmt::Debug for BackendTlsClients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendTlsClients").finish_non_exhaustive()
    }
}

fn ca_roots(path: &Path) -> Result<RootCertStore, BackendTlsError> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|source| BackendTlsError::CaFile {
            path: path.to_owned(),
            source,
        })?;
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        let message = format!("no usable CA certificate ({ignored} unparsable)");
        return Err(BackendTlsError::CaCertificates {
            path: path.to_owned(),
            message,
        });
    }
    Ok(roots)
}

/// How the upstream pool wraps each new connection: TLS with this server name and verifier.
#[derive(Clone)]
pub struct UpstreamTls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl UpstreamTls {
    async fn connect(&self, stream: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        self.connector
            .connect(self.server_name.clone(), stream)
            .await
    }
}

/// A connection to a task: plain TCP, or TLS for `ssl_backend` services.
pub type TaskStream = Either<TcpStream, TlsStream<TcpStream>>;

/// Connects to the task at `addr`, then wraps the connection in `tls` if given; each step
/// gets `timeout`.
pub async fn connect_task(
    addr: SocketAddr,
    tls: Option<&UpstreamTls>,
    timeout: Duration,
) -> Result<TaskStream, UpstreamError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) => return Err(UpstreamError::Connect { addr, source }),
        Err(_) => return Err(UpstreamError::ConnectTimeout { addr, timeout }),
    };
    if let Err(error) = stream.set_nodelay(true) {
        debug!(%addr, %error, "could not disable Nagle on upstream connection");
    }
    let Some(tls) = tls else {
        return Ok(Either::Left(stream));
    };
    match tokio::time::timeout(timeout, tls.connect(stream)).await {
        Ok(Ok(stream)) => Ok(Either::Right(stream)),
        Ok(Err(source)) => Err(UpstreamError::Tls { addr, source }),
        Err(_) => Err(UpstreamError::TlsTimeout { addr, timeout }),
    }
}

/// Keep-alive pools for TLS upstreams, one per (server name, verification).
pub struct BackendTlsPools {
    clients: BackendTlsClients,
    settings: PoolSettings,
    pools: Mutex<HashMap<BackendTls, UpstreamPool>>,
}

impl BackendTlsPools {
    pub fn new(clients: BackendTlsClients, settings: PoolSettings) -> Self {
        Self {
            clients,
            settings,
            pools: Mutex::default(),
        }
    }

    /// The pool for a route's backend TLS, created on first use.
    pub fn pool(&self, backend: &BackendTls) -> Result<UpstreamPool, String> {
        let mut pools = self.lock_pools();
        if let Some(pool) = pools.get(backend) {
            return Ok(pool.clone());
        }
        let pool = UpstreamPool::with_tls(self.settings.clone(), self.upstream_tls(backend)?);
        pools.insert(backend.clone(), pool.clone());
        Ok(pool)
    }

    /// How to wrap a connection to a task of a route with this backend TLS.
    pub fn upstream_tls(&self, backend: &BackendTls) -> Result<UpstreamTls, String> {
        let server_name = ServerName::try_from(backend.server_name.clone())
            .map_err(|_| format!("{:?} is not a TLS server name", backend.server_name))?;
        Ok(UpstreamTls {
            connector: self.clients.connector(backend.verify),
            server_name,
        })
    }

    /// Closes expired idle connections of every pool.
    pub fn evict_expired(&self) {
        for pool in self.lock_pools().values() {
            pool.evict_expired();
        }
    }

    /// Drains, in every pool, the endpoints not in `current` (see
    /// [`UpstreamPool::retain_endpoints`]).
    pub fn retain_endpoints(&self, current: &HashSet<SocketAddr>, drain_timeout: Duration) {
        for pool in self.lock_pools().values() {
            pool.retain_endpoints(current, drain_timeout);
        }
    }

    fn lock_pools(&self) -> MutexGuard<'_, HashMap<BackendTls, UpstreamPool>> {
        self.pools.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `ssl_backend_tls_verify=none`: any certificate is accepted, but the handshake signatures are
/// still checked, so the connection is encrypted to whoever holds the presented key.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use std::net::SocketAddr;

    use super::*;
    use crate::{
        proxy::{
            test_support::TestClient,
            tls_test_support::{route, TempDir, TestCa, TlsEchoBackend, TlsProxy},
        },
        routes::Transport,
        tls_policy::TlsPolicy,
    };

    const HOST: &str = "secure.example.org";

    fn to_tls_backend(verify: BackendTlsVerify) -> Transport {
        Transport {
            backend_tls: Some(BackendTls {
                verify,
                server_name: HOST.to_owned(),
            }),
            ..Transport::default()
        }
    }

    /// A proxy trusting `ca` for backends, routing [`HOST`] to `backend` with `transport`;
    /// returns the status of a plain HTTP request for it.
    async fn status_through_proxy(
        ca: &TestCa,
        backend: SocketAddr,
        transport: Transport,
    ) -> (u16, String) {
        let dir = TempDir::create("backend-ca");
        let ca_file = dir.write("ca.pem", &ca.pem());
        let routes = BTreeMap::from([(HOST.to_owned(), route("secure", &[backend], transport))]);
        let proxy =
            TlsProxy::start_with(routes, dir.path(), &TlsPolicy::default(), Some(ca_file)).await;
        let response = TestClient::connect(proxy.http)
            .await
            .get(HOST, "/to-backend")
            .await;
        (
            response.status.as_u16(),
            String::from_utf8_lossy(&response.body).into_owned(),
        )
    }

    #[tokio::test]
    async fn ssl_backend_speaks_tls_to_the_task_and_verifies_it_when_required() {
        let ca = TestCa::new();
        let backend = TlsEchoBackend::start(&ca.issue(&[HOST])).await;
        let (status, body) = status_through_proxy(
            &ca,
            backend.addr,
            to_tls_backend(BackendTlsVerify::Required),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"path\":\"/to-backend\""), "{body}");

        // Plain HTTP to the same task fails: the label is what makes it work.
        let (status, _) = status_through_proxy(&ca, backend.addr, Transport::default()).await;
        assert_ne!(status, 200);
    }

    #[tokio::test]
    async fn required_verification_refuses_an_untrusted_or_misnamed_task() {
        let trusted = TestCa::new();
        let stranger = TestCa::new();
        let untrusted = TlsEchoBackend::start(&stranger.issue(&[HOST])).await;
        let misnamed = TlsEchoBackend::start(&trusted.issue(&["other.example.org"])).await;
        for backend in [&untrusted, &misnamed] {
            let (status, body) = status_through_proxy(
                &trusted,
                backend.addr,
                to_tls_backend(BackendTlsVerify::Required),
            )
            .await;
            assert_eq!(status, 502, "{body}");
            // Without verification the same tasks are reached.
            let (status, body) = status_through_proxy(
                &trusted,
                backend.addr,
                to_tls_backend(BackendTlsVerify::None),
            )
            .await;
            assert_eq!(status, 200, "{body}");
        }
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = TempDir::create("backend-ca");
        let empty = dir.write("empty.pem", "no PEM here\n");
        let error = BackendTlsClients::new(Some(&empty))
            .unwrap_err()
            .to_string();
        assert!(error.contains("no usable CA certificate"), "{error}");
        let missing = dir.path().join("missing.pem");
        assert!(BackendTlsClients::new(Some(&missing)).is_err());
        assert!(BackendTlsClients::new(None).is_ok());
    }
}
