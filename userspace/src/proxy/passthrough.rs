//! `ssl_passthrough=true`: the client's TLS stream, ClientHello included, relayed byte for byte
//! to one of the service's tasks, which terminates TLS itself.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use http::HeaderMap;

use tokio::{io::AsyncWriteExt as _, net::TcpStream};
use tracing::{debug, warn};

use super::router::{Endpoint, ServiceRoute};

/// Relays `client` to the first of the route's endpoints (round robin, then failover) that
/// accepts a connection within `connect_timeout` (`ConnectTimeout`), replaying `client_hello`
/// first; returns when either side is done.
pub async fn relay(
    mut client: TcpStream,
    client_addr: SocketAddr,
    client_hello: &[u8],
    route: &ServiceRoute,
    connect_timeout: Duration,
) {
    let Some(mut upstream) = connect(route, client_addr.ip(), connect_timeout).await else {
        warn!(
            service = route.service(),
            tried = route.endpoint_count(),
            "passthrough: no endpoint accepted a connection"
        );
        return;
    };
    if let Err(error) = upstream.write_all(client_hello).await {
        debug!(service = route.service(), %error, "passthrough: upstream closed at once");
        return;
    }
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => debug!(
            service = route.service(),
            sent, received, "passthrough ended"
        ),
        Err(error) => debug!(service = route.service(), %error, "passthrough ended with an error"),
    }
}

/// The first endpoint, in the service's balancing order (no HTTP headers here: a sticky
/// cookie cannot apply), that accepts a connection.
async fn connect(
    route: &ServiceRoute,
    client: IpAddr,
    connect_timeout: Duration,
) -> Option<TcpStream> {
    let endpoints = route.endpoint_order(&HeaderMap::new(), client);
    for addr in endpoints.iter().map(Endpoint::addr) {
        match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Some(stream);
            }
            Ok(Err(error)) => debug!(%addr, %error, "passthrough: connect failed"),
            Err(_) => debug!(%addr, "passthrough: connect timed out"),
        }
    }
    None
}
