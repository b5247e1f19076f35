//! The SSL port (`PublishedSSLPort`). Each connection's ClientHello is read first: a host
//! labelled `ssl_passthrough=true` gets the TLS stream relayed untouched (`passthrough`), any
//! other connection is terminated with rustls (certificate chosen by SNI, ALPN `h2` and
//! `http/1.1`) and then served exactly like the plain port.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rustls::ServerConfig;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::{certificates::CertificateStore, client_hello, passthrough, ConnectionContext};
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

/// rustls' server side: the `SSLProtocols`/`SSLCiphers` policy and the certificate store.
#[derive(Clone)]
pub struct TlsTermination {
    acceptor: TlsAcceptor,
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
        })
    }
}

/// Serves one connection of the SSL port: relayed when its SNI names a passthrough host,
/// terminated otherwise.
pub(super) async fn serve_connection(
    mut stream: TcpStream,
    client: SocketAddr,
    termination: TlsTermination,
    context: ConnectionContext,
) {
    let hello = match client_hello::read(&mut stream, HANDSHAKE_TIMEOUT).await {
        Ok(hello) => hello,
        Err(error) => {
            debug!(%client, %error, "TLS connection dropped before its handshake");
            return;
        }
    };
    let passthrough_route = hello
        .server_name
        .as_deref()
        .and_then(|name| context.router.route(name))
        .filter(|route| route.transport().ssl_passthrough);
    if let Some(route) = passthrough_route {
        let relayed = passthrough::relay(stream, &hello.bytes, &route);
        tokio::select! {
            () = relayed => {}
            () = context.shutdown.cancelled() => debug!(%client, "passthrough cut by shutdown"),
        }
        return;
    }
    let replayed = Replayed::new(hello.bytes, stream);
    let accepted =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, termination.acceptor.accept(replayed)).await;
    match accepted {
        Ok(Ok(tls)) => super::serve_http(tls, client, super::Scheme::Https, context).await,
        Ok(Err(error)) => debug!(%client, %error, "TLS handshake failed"),
        Err(_) => debug!(%client, "TLS handshake timed out"),
    }
}

/// A stream whose first bytes were already read: they are read again before the rest.
struct Replayed<S> {
    prefix: Vec<u8>,
    consumed: usize,
    inner: S,
}

impl<S> Replayed<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            consumed: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replayed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.consumed < this.prefix.len() {
            let remaining = &this.prefix[this.consumed..];
            let count = remaining.len().min(buf.remaining());
            buf.put_slice(&remaining[..count]);
            this.consumed += count;
            if this.consumed == this.prefix.len() {
                this.prefix = Vec::new();
                this.consumed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replayed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
