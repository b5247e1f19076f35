//! What crosses from discovery to the nodes that serve traffic: the route tables of one Swarm
//! snapshot, with a version. `xlb run` hands it over an in-process channel; `xlb controller`
//! serves it over HTTP to the `xlb proxy`s of the load-balancer nodes (`crate::controller`,
//! `crate::controller_feed`). Either way the node applies it with the same code
//! (`crate::node`), so one host and a cluster run the same path.

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{l4::service::L4RouteTable, routes::RouteTable};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Raised each time the tables change ([`next_version`]); 0 before discovery has read
    /// Swarm once. Versions are a controller's own: two controllers count apart.
    pub version: u64,
    pub l7: RouteTable,
    pub l4: L4RouteTable,
}

impl Snapshot {
    /// Whether `self` routes as `other` does, whatever their versions.
    pub fn same_tables(&self, other: &Snapshot) -> bool {
        self.l7 == other.l7 && self.l4 == other.l4
    }
}

/// Where a snapshot source publishes, and nodes and controllers watch: the latest snapshot,
/// never a backlog of them.
pub type SnapshotSender = watch::Sender<Arc<Snapshot>>;
pub type SnapshotReceiver = watch::Receiver<Arc<Snapshot>>;

/// A channel holding the empty snapshot (version 0) until the first tables arrive.
pub fn channel() -> (SnapshotSender, SnapshotReceiver) {
    watch::channel(Arc::new(Snapshot::default()))
}

/// Publishes `l7` and `l4` as the next version, unless they are what `sender` already holds.
/// Returns whether it published.
pub fn publish_if_changed(sender: &SnapshotSender, l7: RouteTable, l4: L4RouteTable) -> bool {
    sender.send_if_modified(|current| {
        if current.l7 == l7 && current.l4 == l4 && current.version > 0 {
            return false;
        }
        *current = Arc::new(Snapshot {
            version: next_version(current.version),
            l7,
            l4,
        });
        true
    })
}

/// The version after `previous`: the wall clock in microseconds when it is ahead, so that a
/// restarted controller does not hand out again a version it handed out before (a proxy that
/// holds it would wait for a change it already missed).
fn next_version(previous: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_micros() as u64);
    now.max(previous + 1)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::{
        l4::service::{L4Route, Listener, Protocol},
        routes::{
            BackendTls, BackendTlsVerify, Balance, CertificateSecrets, Redirect, RejectedService,
            Route, Scheme, Transport,
        },
    };

    fn endpoint(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// Every kind of field a route table can carry.
    fn tables() -> (RouteTable, L4RouteTable) {
        let route = Route {
            service: "demo".into(),
            context_root: "/app".into(),
            context_root_rewrite: true,
            endpoints: vec![endpoint("10.0.0.1:32768"), endpoint("[fd00::1]:32769")],
            balance: Balance::StickyCookie {
                cookie: "session".into(),
            },
            ssl_only: true,
            redirects: vec![Redirect {
                source_scheme: Scheme::Http,
                source_host: "old.local".into(),
                target: "https://new.local".into(),
            }],
            transport: Transport {
                certificate: Some(CertificateSecrets {
                    cert: "demo.cert".into(),
                    key: "demo.key".into(),
                }),
                ssl_passthrough: false,
                backend_tls: Some(BackendTls {
                    verify: BackendTlsVerify::Required,
                    server_name: "demo.local".into(),
                }),
                websocket_endpoints: vec!["/ws".into()],
            },
        };
        let plain = Route {
            balance: Balance::IpHash,
            transport: Transport::default(),
            redirects: vec![],
            ..route.clone()
        };
        let l7 = RouteTable {
            routes: [("demo.local".to_owned(), vec![route])].into(),
            default_backend: Some(plain),
            rejected: vec![RejectedService {
                service: "broken".into(),
                reason: "com.docker.lb.port: not a port".into(),
            }],
        };
        let l4 = L4RouteTable {
            listeners: vec![L4Route {
                service: "db".into(),
                listener: Listener {
                    port: 5432,
                    protocol: Protocol::Udp,
                },
                target_port: 5432,
                endpoints: vec![endpoint("10.0.0.2:30000")],
            }],
            rejected: vec![],
        };
        (l7, l4)
    }

    #[test]
    fn a_snapshot_crosses_json_unchanged() {
        let (l7, l4) = tables();
        let snapshot = Snapshot { version: 7, l7, l4 };
        let json = serde_json::to_string(&snapshot).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snapshot);
    }

    #[test]
    fn only_changed_tables_raise_the_version() {
        let (sender, receiver) = channel();
        let (l7, l4) = tables();
        assert!(publish_if_changed(&sender, l7.clone(), l4.clone()));
        let first = receiver.borrow().version;
        assert!(!publish_if_changed(&sender, l7.clone(), l4.clone()));
        assert_eq!(receiver.borrow().version, first);
        assert!(publish_if_changed(&sender, l7, L4RouteTable::default()));
        assert!(receiver.borrow().version > first);
    }

    #[test]
    fn versions_rise_past_the_clock_and_past_each_other() {
        let now = next_version(0);
        assert!(now > 1_700_000_000_000_000, "microseconds since 1970");
        assert_eq!(
            next_version(u64::MAX - 1),
            u64::MAX,
            "ahead of the clock: one more"
        );
    }

    #[test]
    fn the_first_tables_are_published_even_when_empty() {
        let (sender, receiver) = channel();
        assert!(publish_if_changed(
            &sender,
            RouteTable::default(),
            L4RouteTable::default()
        ));
        assert!(receiver.borrow().version > 0, "Swarm was read: no longer 0");
    }
}
