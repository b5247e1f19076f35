//! A node that serves traffic: it applies each [`Snapshot`] it receives to the L7 proxy's router,
//! the certificates, the admin endpoint's view and the XDP L4 path, whether the snapshot comes
//! from discovery in the same process (`xlb run`) or from a controller (`xlb proxy`).

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    admin::AdminState,
    l4::{shield::local_endpoint_ports, steering::Steering},
    proxy::{CertificateStore, Router},
    snapshot::{Snapshot, SnapshotReceiver},
};

pub struct Node {
    pub router: Arc<Router>,
    pub certificates: Option<Arc<CertificateStore>>,
    pub state: Arc<AdminState>,
    /// The XDP L4 fast path, unless proxy-only.
    pub steering: Option<Steering>,
    /// How often the L4 path is refreshed without a new snapshot: backends' next hops resolve
    /// and change on their own (the config's `PollInterval`).
    pub refresh: Duration,
    /// The version of the last snapshot applied (0: none yet).
    pub applied: tokio::sync::watch::Sender<u64>,
}

impl Node {
    /// Applies every snapshot `snapshots` publishes until `shutdown`, and refreshes the L4 path
    /// every `refresh` in between.
    pub async fn run(mut self, mut snapshots: SnapshotReceiver, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(self.refresh);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        // The source stopped (shutdown): keep serving what was applied.
                        shutdown.cancelled().await;
                        return;
                    }
                }
                _ = ticks.tick() => {}
            }
            let snapshot = snapshots.borrow_and_update().clone();
            // Version 0: nothing read from Swarm yet; the empty tables would only unroute.
            if snapshot.version > 0 {
                self.apply(&snapshot).await;
                self.applied.send_replace(snapshot.version);
            }
        }
    }

    /// Hands one snapshot's route tables to the proxy, the certificates and the XDP L4 path.
    async fn apply(&mut self, snapshot: &Snapshot) {
        let current = self.state.routes.load_full();
        if snapshot.l7 != *current {
            self.router.update(&snapshot.l7);
            if let Some(certificates) = &self.certificates {
                certificates.update(&snapshot.l7);
            }
            self.state.routes.store(Arc::new(snapshot.l7.clone()));
        }
        if snapshot.l4 != **self.state.l4_routes.load() {
            self.state.l4_routes.store(Arc::new(snapshot.l4.clone()));
        }
        self.state.record_snapshot(snapshot.version);
        // Every time, not only on change: next hops resolve and need refreshing.
        if let Some(steering) = self.steering.as_mut() {
            if let Err(error) = steering.update(&self.state.l4_routes.load()).await {
                let error = format!("{:#}", anyhow::Error::from(error));
                tracing::warn!(error, "L4 maps not updated");
            }
            let local = local_endpoint_ports(
                &self.state.routes.load(),
                &self.state.l4_routes.load(),
                steering.addresses(),
            );
            if let Some(dataplane) = &self.state.dataplane {
                let mut dataplane = dataplane
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if let Err(error) = dataplane.open_endpoint_ports(&local) {
                    let error = format!("{:#}", anyhow::Error::from(error));
                    tracing::warn!(error, "shield: the ports of tasks on this node not opened");
                }
            }
        }
    }
}
