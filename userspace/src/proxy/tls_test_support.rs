//! TLS test fixtures on real sockets: a certificate authority (rcgen), a secrets directory,
//! a TLS client, a TLS echo backend, and a proxy serving both ports.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::{
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer, ServerName},
    ClientConfig, RootCertStore, ServerConfig,
};
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tokio_rustls::{client::TlsStream, TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use super::{
    backend_tls::BackendTlsClients, certificates::CertificateStore, serve,
    test_support::TestResponse, tls::TlsHandshakes, HttpsListener, Listeners, ProxySettings,
    Router, TlsTermination,
};
use crate::{
    routes::{Route, RouteTable, Transport},
    tls_policy::TlsPolicy,
};

/// How often the test proxy looks for changed certificate files.
pub const CERTIFICATE_POLL: Duration = Duration::from_millis(50);

/// A certificate authority issuing certificates for host names.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM and DER.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl TestCa {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "xlb test CA");
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn issue(&self, hosts: &[&str]) -> Issued {
        let names: Vec<String> = hosts.iter().map(|host| host.to_string()).collect();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        roots
    }
}

/// A directory removed with everything in it when dropped.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn create(what: &str) -> Self {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let path = std::env::temp_dir().join(format!("xlb-{what}-{unique}"));
        std::fs::create_dir_all(&path).unwrap();
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `name` by rename, as Docker and configuration tools replace files.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let staged = self.path.join(format!(".{name}.new"));
        let path = self.path.join(name);
        std::fs::write(&staged, contents).unwrap();
        std::fs::rename(&staged, &path).unwrap();
        path
    }

    /// Writes a certificate and its key as the secrets `NAME.crt` and `NAME.key`.
    pub fn write_pair(&self, name: &str, issued: &Issued) {
        self.write(&format!("{name}.crt"), &issued.cert_pem);
        self.write(&format!("{name}.key"), &issued.key_pem);
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A TLS client connection to `addr`, with `server_name` as SNI, trusting `roots`.
pub async fn tls_connect(
    addr: SocketAddr,
    server_name: &str,
    roots: RootCertStore,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    let stream = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
}

/// The certificate the server presented.
pub fn peer_certificate(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// One HTTP/1.1 GET on an established TLS connection.
pub async fn https_get(tls: TlsStream<TcpStream>, host: &str, path: &str) -> TestResponse {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::get(path)
        .header("host", host)
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    TestResponse {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// The plain echo backend's answers, over TLS with its own certificate.
pub struct TlsEchoBackend {
    pub addr: SocketAddr,
    accept_loop: JoinHandle<()>,
}

impl TlsEchoBackend {
    pub async fn start(issued: &Issued) -> Self {
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![issued.der.clone()], key)
                .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept_loop = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = service_fn(move |request| {
                        super::test_support::echo(addr.port(), StatusCode::OK, request)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self { addr, accept_loop }
    }
}

impl Drop for TlsEchoBackend {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

/// A route of `service` to `endpoints` with the given transport labels.
pub fn route(service: &str, endpoints: &[SocketAddr], transport: Transport) -> Route {
    Route {
        transport,
        ..super::test_support::route(service, endpoints)
    }
}

/// The proxy on both ports, its certificates read from `secrets` and polled for changes.
pub struct TlsProxy {
    pub http: SocketAddr,
    pub https: SocketAddr,
    /// What became of the SSL port's handshakes.
    pub handshakes: Arc<TlsHandshakes>,
    shutdown: CancellationToken,
}

impl TlsProxy {
    pub async fn start(routes: BTreeMap<String, Route>, secrets: &Path) -> Self {
        Self::start_with(routes, secrets, &TlsPolicy::default(), None).await
    }

    /// `backend_ca_file`: what `ssl_backend_tls_verify=required` trusts.
    pub async fn start_with(
        routes: BTreeMap<String, Route>,
        secrets: &Path,
        policy: &TlsPolicy,
        backend_ca_file: Option<PathBuf>,
    ) -> Self {
        let settings = ProxySettings {
            max_connections: 64,
            ..ProxySettings::default()
        };
        Self::launch(routes, secrets, policy, backend_ca_file, settings).await
    }

    /// With `settings`, but the test proxy id.
    pub async fn start_with_settings(
        routes: BTreeMap<String, Route>,
        secrets: &Path,
        settings: ProxySettings,
    ) -> Self {
        Self::launch(routes, secrets, &TlsPolicy::default(), None, settings).await
    }

    /// With room for `max_connections` clients at once (`MaxConnections`).
    pub async fn start_with_max_connections(
        routes: BTreeMap<String, Route>,
        secrets: &Path,
        max_connections: usize,
    ) -> Self {
        let settings = ProxySettings {
            max_connections,
            ..ProxySettings::default()
        };
        Self::launch(routes, secrets, &TlsPolicy::default(), None, settings).await
    }

    async fn launch(
        routes: BTreeMap<String, Route>,
        secrets: &Path,
        policy: &TlsPolicy,
        backend_ca_file: Option<PathBuf>,
        settings: ProxySettings,
    ) -> Self {
        let table = RouteTable {
            routes: routes
                .into_iter()
                .map(|(host, route)| (host, vec![route]))
                .collect(),
            ..RouteTable::default()
        };
        let router = Router::new();
        router.update(&table);
        let certificates = CertificateStore::new(secrets, policy.crypto_provider());
        certificates.update(&table);
        let shutdown = CancellationToken::new();
        tokio::spawn(Arc::clone(&certificates).watch(CERTIFICATE_POLL, shutdown.clone()));
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let https = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addrs = (http.local_addr().unwrap(), https.local_addr().unwrap());
        let termination = TlsTermination::new(policy, Arc::clone(&certificates)).unwrap();
        let handshakes = termination.handshakes();
        let listeners = Listeners {
            http,
            https: Some(HttpsListener {
                listener: https,
                termination,
            }),
        };
        let settings = ProxySettings {
            proxy_id: "lb-tls-1".into(),
            backend_tls: BackendTlsClients::new(backend_ca_file.as_deref()).unwrap(),
            ..settings
        };
        tokio::spawn(serve(listeners, router, settings, shutdown.clone()));
        Self {
            http: addrs.0,
            https: addrs.1,
            handshakes,
            shutdown,
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
