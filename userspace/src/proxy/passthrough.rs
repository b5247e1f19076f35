//! `ssl_passthrough=true`: the client's TLS stream, ClientHello included, relayed byte for byte
//! to one of the service's tasks, which terminates TLS itself.

use std::time::Duration;

use tokio::{io::AsyncWriteExt as _, net::TcpStream};
use tracing::{debug, warn};

use super::router::ServiceRoute;

/// Give up on a task that neither accepts nor refuses within this time, and try the next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Relays `client` to the first of the route's endpoints (round robin, then failover) that
/// accepts a connection, replaying `client_hello` first; returns when either side is done.
pub async fn relay(mut client: TcpStream, client_hello: &[u8], route: &ServiceRoute) {
    let Some(mut upstream) = connect(route).await else {
        warn!(
            service = route.service(),
            tried = route.endpoints().len(),
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

async fn connect(route: &ServiceRoute) -> Option<TcpStream> {
    for addr in route.failover_order() {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
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
