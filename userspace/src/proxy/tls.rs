//! The SSL port (`PublishedSSLPort`). Each connection's ClientHello is read first: a host
//! labelled `ssl_passthrough=true` gets the TLS stream relayed untouched (`passthrough`), any
//! other connection is terminated with rustls (certificate chosen by SNI, ALPN `h2` and
//! `http/1.1`) and then served exactly like the plain port.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::{
    certificates::CertificateStore, client_hello, parking::Parking, passthrough,
    replayed::Replayed, ConnectionContext,
};
use crate::tls_policy::TlsPolicy;

/// How long a client may take to complete its TLS handshake, ClientHello included.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// ALPN protocols offered, HTTP/2 preferred.
const ALPN_PROTOCOLS: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The SSL port's listener and the TLS settings its connections are terminated with.
pub struct HttpsListener {
    pub listener: TcpListener,
    pub termination: TlsTermination,
}

/// rustls' server side: the `SSLProtocols`/`SSLCiphers` policy and the certificate store, and
/// what became of the handshakes on the SSL port (every worker's).
#[derive(Clone)]
pub struct TlsTermination {
    acceptor: TlsAcceptor,
    handshakes: Arc<TlsHandshakes>,
}

/// Connections of the SSL port by what became of their handshake, for `/metrics`.
#[derive(Debug, Default)]
pub struct TlsHandshakes {
    terminated: AtomicU64,
    /// No ClientHello could be read, or rustls refused the handshake.
    failed: AtomicU64,
    timed_out: AtomicU64,
    /// Relayed untouched to an `ssl_passthrough` service.
    passthrough: AtomicU64,
}

impl TlsHandshakes {
    /// Each outcome's label value and count.
    pub fn counts(&self) -> [(&'static str, u64); 4] {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        [
            ("ok", read(&self.terminated)),
            ("failed", read(&self.failed)),
            ("timeout", read(&self.timed_out)),
            ("passthrough", read(&self.passthrough)),
        ]
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl TlsTermination {
    pub fn new(
        policy: &TlsPolicy,
        certificates: Arc<CertificateStore>,
    ) -> Result<Self, rustls::Error> {
        let mut config = ServerConfig::builder_with_provider(policy.crypto_provider())
            .with_protocol_versions(&policy.protocol_versions())?
            .with_no_client_auth()
            .with_cert_resolver(certificates);
        config.alpn_protocols = ALPN_PROTOCOLS.iter().map(|p| p.to_vec()).collect();
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            handshakes: Arc::default(),
        })
    }

    /// What became of the handshakes so far.
    pub fn handshakes(&self) -> Arc<TlsHandshakes> {
        Arc::clone(&self.handshakes)
    }
}

/// A terminated client connection of the SSL port.
pub type TlsClient = tokio_rustls::server::TlsStream<Replayed<TcpStream>>;

/// Serves one connection of the SSL port, holding `slot` (its place under `MaxConnections`)
/// until it ends: relayed when its SNI names a passthrough host, terminated otherwise.
pub(super) async fn serve_connection<Slot: Send + 'static>(
    mut stream: TcpStream,
    client: SocketAddr,
    termination: TlsTermination,
    context: ConnectionContext,
    slot: Slot,
    parking: Parking<TlsClient, Slot>,
) {
    let hello = match client_hello::read(&mut stream, HANDSHAKE_TIMEOUT).await {
        Ok(hello) => hello,
        Err(error) => {
            TlsHandshakes::count(&termination.handshakes.failed);
            debug!(%client, %error, "TLS connection dropped before its handshake");
            return;
        }
    };
    let passthrough_route = hello
        .server_name
        .as_deref()
        .and_then(|name| context.router.host_service(name))
        .filter(|route| route.transport().ssl_passthrough);
    if let Some(route) = passthrough_route {
        TlsHandshakes::count(&termination.handshakes.passthrough);
        let connect_timeout = context.handler.connect_timeout();
        let relayed = passthrough::relay(stream, client, &hello.bytes, &route, connect_timeout);
        tokio::select! {
            () = relayed => {}
            () = context.shutdown.cancelled() => debug!(%client, "passthrough cut by shutdown"),
        }
        return;
    }
    let replayed = Replayed::new(hello.bytes, stream);
    let accepted =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, termination.acceptor.accept(replayed)).await;
    let handshakes = &termination.handshakes;
    match accepted {
        Ok(Ok(tls)) => {
            TlsHandshakes::count(&handshakes.terminated);
            let scheme = super::Scheme::Https;
            super::serve_http(tls, client, scheme, context, slot, parking).await;
        }
        Ok(Err(error)) => {
            TlsHandshakes::count(&handshakes.failed);
            debug!(%client, %error, "TLS handshake failed");
        }
        Err(_) => {
            TlsHandshakes::count(&handshakes.timed_out);
            debug!(%client, "TLS handshake timed out");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        io,
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use rustls::pki_types::CertificateDer;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    use super::*;
    use crate::{
        proxy::{
            test_support::EchoBackend,
            tls_test_support::{
                https_get, peer_certificate, route, tls_connect, TempDir, TestCa, TlsEchoBackend,
                TlsProxy, CERTIFICATE_POLL,
            },
        },
        routes::{CertificateSecrets, Transport},
        tls_policy,
    };

    /// `app.example.org`, terminated with a certificate of `ca` written into `secrets`, served
    /// by `backend`.
    fn app_routes(
        ca: &TestCa,
        secrets: &TempDir,
        backend: &EchoBackend,
    ) -> BTreeMap<String, crate::routes::Route> {
        secrets.write_pair("app", &ca.issue(&["app.example.org"]));
        BTreeMap::from([(
            "app.example.org".to_owned(),
            route("app", &[backend.addr], terminated("app")),
        )])
    }

    fn terminated(name: &str) -> Transport {
        Transport {
            certificate: Some(CertificateSecrets {
                cert: format!("{name}.crt"),
                key: format!("{name}.key"),
            }),
            ..Transport::default()
        }
    }

    #[tokio::test]
    async fn sni_selects_each_hosts_certificate() {
        let ca = TestCa::new();
        let secrets = TempDir::create("secrets");
        let (a_cert, b_cert) = (ca.issue(&["a.example.org"]), ca.issue(&["b.example.org"]));
        secrets.write_pair("a", &a_cert);
        secrets.write_pair("b", &b_cert);
        let (a, b) = (EchoBackend::start().await, EchoBackend::start().await);
        let routes = BTreeMap::from([
            (
                "a.example.org".to_owned(),
                route("a", &[a.addr], terminated("a")),
            ),
            (
                "b.example.org".to_owned(),
                route("b", &[b.addr], terminated("b")),
            ),
        ]);
        let proxy = TlsProxy::start(routes, secrets.path()).await;

        for (host, cert, backend) in [
            ("a.example.org", &a_cert, &a),
            ("b.example.org", &b_cert, &b),
        ] {
            let tls = tls_connect(proxy.https, host, ca.roots(), &[b"http/1.1"])
                .await
                .unwrap();
            assert_eq!(peer_certificate(&tls), cert.der, "{host}");
            let response = https_get(tls, host, "/over-tls").await;
            assert_eq!(response.status, 200);
            assert_eq!(response.echo()["port"], backend.addr.port());
            assert_eq!(response.echo()["path"], "/over-tls");
            assert_eq!(response.header("x-proxy-id"), "lb-tls-1");
        }
        let unknown = tls_connect(proxy.https, "c.example.org", ca.roots(), &[]).await;
        assert!(
            unknown.is_err(),
            "a host without certificate got a handshake"
        );
    }

    #[tokio::test]
    async fn a_flood_on_the_plain_port_does_not_starve_tls_clients() {
        let ca = TestCa::new();
        let secrets = TempDir::create("secrets");
        let backend = EchoBackend::start().await;
        let routes = app_routes(&ca, &secrets, &backend);
        // One client at a time: the others wait in their port's backlog, ten on the plain
        // port and one on the TLS port, until the one holding the slot leaves.
        let proxy = TlsProxy::start_with_max_connections(routes, secrets.path(), 1).await;
        let holder = TcpStream::connect(proxy.http).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let served = Arc::new(AtomicUsize::new(0));
        let mut plain = Vec::new();
        for _ in 0..10 {
            let served = Arc::clone(&served);
            let mut client = TcpStream::connect(proxy.http).await.unwrap();
            plain.push(tokio::spawn(async move {
                client
                    .write_all(
                        b"GET / HTTP/1.1\r\nHost: app.example.org\r\nConnection: close\r\n\r\n",
                    )
                    .await
                    .unwrap();
                let mut answer = Vec::new();
                client.read_to_end(&mut answer).await.unwrap();
                served.fetch_add(1, Ordering::SeqCst)
            }));
        }
        let tls = {
            let (served, roots, https) = (Arc::clone(&served), ca.roots(), proxy.https);
            tokio::spawn(async move {
                let tls = tls_connect(https, "app.example.org", roots, &[])
                    .await
                    .unwrap();
                assert_eq!(https_get(tls, "app.example.org", "/").await.status, 200);
                served.fetch_add(1, Ordering::SeqCst)
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(holder);
        let place = tls.await.unwrap();
        assert!(
            place <= 1,
            "the TLS client was served after {place} plain ones"
        );
        for client in plain {
            client.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_replaced_certificate_is_served_without_restart() {
        let ca = TestCa::new();
        let secrets = TempDir::create("secrets");
        let first = ca.issue(&["app.example.org"]);
        secrets.write_pair("app", &first);
        secrets.write_pair("marker", &ca.issue(&["marker.example.org"]));
        let backend = EchoBackend::start().await;
        let routes = BTreeMap::from([
            (
                "app.example.org".to_owned(),
                route("app", &[backend.addr], terminated("app")),
            ),
            (
                "marker.example.org".to_owned(),
                route("marker", &[backend.addr], terminated("marker")),
            ),
        ]);
        let proxy = TlsProxy::start(routes, secrets.path()).await;
        assert_eq!(served(&proxy, &ca, "app.example.org").await, first.der);

        let second = ca.issue(&["app.example.org"]);
        secrets.write_pair("app", &second);
        served_eventually(&proxy, &ca, "app.example.org", &second.der).await;

        // A broken replacement keeps the last good certificate in service. That a refresh has
        // read it shows in another host's certificate, replaced twice after it: the second
        // replacement is served by a refresh begun after the first was served, so after the
        // broken file was written.
        secrets.write("app.crt", "not a certificate");
        for _ in 0..2 {
            let marker = ca.issue(&["marker.example.org"]);
            secrets.write_pair("marker", &marker);
            served_eventually(&proxy, &ca, "marker.example.org", &marker.der).await;
        }
        assert_eq!(served(&proxy, &ca, "app.example.org").await, second.der);
    }

    /// The certificate the proxy serves for `host`.
    async fn served(proxy: &TlsProxy, ca: &TestCa, host: &str) -> CertificateDer<'static> {
        let tls = tls_connect(proxy.https, host, ca.roots(), &[])
            .await
            .unwrap();
        peer_certificate(&tls)
    }

    /// Waits (at most 5 s) until the proxy serves `expected` for `host`.
    async fn served_eventually(
        proxy: &TlsProxy,
        ca: &TestCa,
        host: &str,
        expected: &CertificateDer<'static>,
    ) {
        let mut waited = Duration::ZERO;
        while served(proxy, ca, host).await != *expected {
            assert!(
                waited < Duration::from_secs(5),
                "the new certificate of {host} was never served"
            );
            tokio::time::sleep(CERTIFICATE_POLL).await;
            waited += CERTIFICATE_POLL;
        }
    }

    #[tokio::test]
    async fn passthrough_reaches_the_tls_backend_untouched() {
        let ca = TestCa::new();
        let secrets = TempDir::create("secrets");
        let backend_cert = ca.issue(&["pt.example.org"]);
        let backend = TlsEchoBackend::start(&backend_cert).await;
        let passthrough = Transport {
            ssl_passthrough: true,
            ..Transport::default()
        };
        let routes = BTreeMap::from([(
            "pt.example.org".to_owned(),
            route("pt", &[backend.addr], passthrough),
        )]);
        let proxy = TlsProxy::start(routes, secrets.path()).await;

        let tls = tls_connect(proxy.https, "pt.example.org", ca.roots(), &[])
            .await
            .unwrap();
        assert_eq!(peer_certificate(&tls), backend_cert.der);
        let response = https_get(tls, "pt.example.org", "/untouched").await;
        assert_eq!(response.status, 200);
        assert_eq!(response.echo()["path"], "/untouched");
        // The proxy never saw the HTTP inside: no header of its own, none added upstream.
        assert!(!response.headers.contains_key("x-proxy-id"));
        assert_eq!(response.echo()["request_id"], serde_json::Value::Null);
    }

    /// A passthrough task that never answers is given up on after `ConnectTimeout` (it was a
    /// fixed 3 s): the client's connection is closed, not held.
    #[tokio::test]
    async fn passthrough_gives_up_on_an_unanswering_task_after_connect_timeout() {
        let (unanswering, _listener, _queued) =
            crate::proxy::test_support::unanswering_addr().await;
        let passthrough = Transport {
            ssl_passthrough: true,
            ..Transport::default()
        };
        let routes = BTreeMap::from([(
            "pt.example.org".to_owned(),
            route("pt", &[unanswering], passthrough),
        )]);
        let secrets = TempDir::create("secrets");
        let mut settings = crate::proxy::ProxySettings::default();
        settings.upstream.connect_timeout = Duration::from_millis(100);
        let proxy = TlsProxy::start_with_settings(routes, secrets.path(), settings).await;

        let ca = TestCa::new();
        let started = std::time::Instant::now();
        let handshake = tls_connect(proxy.https, "pt.example.org", ca.roots(), &[]);
        let failed = tokio::time::timeout(Duration::from_secs(10), handshake).await;
        assert!(failed.expect("the connection is held").is_err());
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "closed after {:?}, not ConnectTimeout's 100 ms",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn ssl_protocols_and_ciphers_restrict_the_handshake() {
        let ca = TestCa::new();
        let secrets = TempDir::create("secrets");
        let backend = EchoBackend::start().await;
        let routes = app_routes(&ca, &secrets, &backend);
        let protocols = tls_policy::parse_protocols("TLSv1.2").unwrap();
        let ciphers = tls_policy::parse_ciphers("ECDHE-ECDSA-CHACHA20-POLY1305").unwrap();
        let policy = TlsPolicy::new(Some(&protocols), Some(&ciphers));
        let proxy = TlsProxy::start_with(routes, secrets.path(), &policy, None).await;

        let tls = tls_connect(proxy.https, "app.example.org", ca.roots(), &[])
            .await
            .unwrap();
        let session = tls.get_ref().1;
        assert_eq!(
            session.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        assert_eq!(
            session.negotiated_cipher_suite().map(|suite| suite.suite()),
            Some(rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256)
        );
        let unwanted =
            tls_connect_with_versions(proxy.https, "app.example.org", &ca, &rustls::version::TLS13)
                .await;
        assert!(unwanted.is_err(), "a TLS 1.3-only client was served");
    }

    /// A client offering one protocol version only.
    async fn tls_connect_with_versions(
        addr: SocketAddr,
        server_name: &str,
        ca: &TestCa,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
        let stream = TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, stream)
            .await
    }

    #[tokio::test]
    async fn garbage_on_the_ssl_port_is_dropped_and_service_goes_on() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let ca = TestCa::new();
        let secrets = TempDir::create("secrets");
        let backend = EchoBackend::start().await;
        let routes = app_routes(&ca, &secrets, &backend);
        let proxy = TlsProxy::start(routes, secrets.path()).await;
        for garbage in [
            &b"GET / HTTP/1.1\r\nHost: app.example.org\r\n\r\n"[..],
            &[22, 3, 1, 0xff, 0xff],
            &[0; 64],
        ] {
            let mut stream = TcpStream::connect(proxy.https).await.unwrap();
            stream.write_all(garbage).await.unwrap();
            let mut rest = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
            assert!(
                matches!(read, Ok(Ok(0)) | Ok(Err(_))),
                "{garbage:?}: {rest:?}"
            );
        }
        let tls = tls_connect(proxy.https, "app.example.org", ca.roots(), &[])
            .await
            .unwrap();
        assert_eq!(https_get(tls, "app.example.org", "/").await.status, 200);
        // Counted for /metrics: three refused, one terminated.
        let counts = proxy.handshakes.counts();
        assert_eq!(&counts[..2], &[("ok", 1), ("failed", 3)], "{counts:?}");
    }
}
