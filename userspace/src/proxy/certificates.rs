//! Server certificates for TLS termination: each host's `ssl_cert`/`ssl_key` Docker secrets,
//! read from the secrets directory, chosen by SNI, and read again when their files change.
//!
//! Files are polled (modification time, size, inode) rather than watched: Docker secrets are
//! bind mounts, and atomic replacement by rename is then seen like an in-place rewrite. A pair
//! that fails to load keeps serving its previous certificate, and the failure is logged once.

use std::{
    collections::{BTreeMap, HashMap},
    fmt, fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{
    crypto::CryptoProvider,
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::routes::{CertificateSecrets, RouteTable};

/// Docker's mount point for a service's secrets.
pub const DEFAULT_SECRETS_DIR: &str = "/run/secrets";

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{} and {}: {source}", cert.display(), key.display())]
    Key {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// The certificates served on the SSL port, by host; cheap to read on every handshake.
pub struct CertificateStore {
    secrets_dir: PathBuf,
    provider: Arc<CryptoProvider>,
    /// Host (lower case, as in the route table, `*.` wildcards included) → its certificate.
    by_host: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
    state: Mutex<StoreState>,
}

#[derive(Default)]
struct StoreState {
    /// Host → the secrets it is served with, as of the last route table.
    wanted: BTreeMap<String, SecretPaths>,
    /// The pairs read so far, with the file stamps they were read at.
    loaded: HashMap<SecretPaths, LoadedPair>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct SecretPaths {
    cert: PathBuf,
    key: PathBuf,
}

struct LoadedPair {
    /// The certificate's and the key's stamps when last read; `None` before the first read.
    stamps: Option<(Option<FileStamp>, Option<FileStamp>)>,
    /// The last pair that loaded; kept while a newer version of the files fails to.
    certified: Option<Arc<CertifiedKey>>,
}

/// What changes when a file is rewritten or replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    device: u64,
    inode: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        let metadata = fs::metadata(path).ok()?;
        Some(Self {
            modified: metadata.modified().ok(),
            len: metadata.len(),
            device: metadata.dev(),
            inode: metadata.ino(),
        })
    }
}

impl CertificateStore {
    /// An empty store reading secrets from `secrets_dir`; keys are loaded with `provider`.
    pub fn new(secrets_dir: impl Into<PathBuf>, provider: Arc<CryptoProvider>) -> Arc<Self> {
        Arc::new(Self {
            secrets_dir: secrets_dir.into(),
            provider,
            by_host: ArcSwap::default(),
            state: Mutex::default(),
        })
    }

    /// Serves the certificates the route table names (passthrough hosts are not terminated, so
    /// they need none), reading any pair not read yet.
    pub fn update(&self, table: &RouteTable) {
        let wanted = table
            .routes
            .iter()
            .filter_map(|(host, routes)| {
                // Services sharing a host under different context roots share its handshake:
                // the first of them (longest context root first) naming a certificate gives it.
                let secrets = routes
                    .iter()
                    .filter(|route| !route.transport.ssl_passthrough)
                    .find_map(|route| route.transport.certificate.as_ref())?;
                Some((host.clone(), self.paths(secrets)))
            })
            .collect();
        self.lock_state().wanted = wanted;
        self.refresh();
    }

    /// Reads again every pair whose files changed since they were last read.
    pub fn refresh(&self) {
        let mut state = self.lock_state();
        let StoreState { wanted, loaded } = &mut *state;
        loaded.retain(|paths, _| wanted.values().any(|wanted| wanted == paths));
        for paths in wanted.values() {
            let stamps = (FileStamp::of(&paths.cert), FileStamp::of(&paths.key));
            let pair = loaded.entry(paths.clone()).or_insert(LoadedPair {
                stamps: None,
                certified: None,
            });
            if pair.stamps == Some(stamps) {
                continue;
            }
            pair.stamps = Some(stamps);
            match self.load(paths) {
                Ok(certified) => {
                    info!(cert = %paths.cert.display(), "TLS certificate loaded");
                    pair.certified = Some(Arc::new(certified));
                }
                Err(error) if pair.certified.is_some() => {
                    warn!(%error, "TLS certificate not reloaded: serving the previous one");
                }
                Err(error) => warn!(%error, "TLS certificate cannot be loaded"),
            }
        }
        let by_host = wanted
            .iter()
            .filter_map(|(host, paths)| {
                let certified = loaded.get(paths)?.certified.clone()?;
                Some((host.clone(), certified))
            })
            .collect();
        self.by_host.store(Arc::new(by_host));
    }

    /// Calls [`Self::refresh`] every `period` until `shutdown`.
    pub async fn watch(self: Arc<Self>, period: Duration, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while shutdown.run_until_cancelled(ticks.tick()).await.is_some() {
            let store = Arc::clone(&self);
            // File reads block; keep them off the proxy's worker threads.
            if let Err(error) = tokio::task::spawn_blocking(move || store.refresh()).await {
                warn!(%error, "certificate refresh failed");
            }
        }
    }

    /// The certificate for an SNI host name: the exact host, else its `*.parent` wildcard.
    pub fn certificate_for(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        let name = server_name.trim_end_matches('.').to_ascii_lowercase();
        let by_host = self.by_host.load();
        if let Some(certified) = by_host.get(&name) {
            return Some(Arc::clone(certified));
        }
        let (_, parent) = name.split_once('.')?;
        by_host.get(&format!("*.{parent}")).cloned()
    }

    fn paths(&self, secrets: &CertificateSecrets) -> SecretPaths {
        SecretPaths {
            cert: self.secrets_dir.join(&secrets.cert),
            key: self.secrets_dir.join(&secrets.key),
        }
    }

    fn load(&self, paths: &SecretPaths) -> Result<CertifiedKey, CertificateError> {
        let read = |path: &Path| {
            fs::read(path).map_err(|source| CertificateError::Read {
                path: path.to_owned(),
                source,
            })
        };
        let cert_pem = read(&paths.cert)?;
        let key_pem = read(&paths.key)?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| CertificateError::Pem {
                path: paths.cert.clone(),
                source,
            })?;
        if chain.is_empty() {
            return Err(CertificateError::NoCertificate {
                path: paths.cert.clone(),
            });
        }
        let key =
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| CertificateError::Pem {
                path: paths.key.clone(),
                source,
            })?;
        CertifiedKey::from_der(chain, key, &self.provider).map_err(|source| CertificateError::Key {
            cert: paths.cert.clone(),
            key: paths.key.clone(),
            source,
        })
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, StoreState> {
        // Every update leaves the maps consistent, so a panicked holder leaves nothing half-done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for CertificateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateStore")
            .field("secrets_dir", &self.secrets_dir)
            .field("hosts", &self.by_host.load().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertificateStore {
    /// Without SNI there is no host to choose by, so the handshake is refused.
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certificate_for(client_hello.server_name()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        proxy::tls_test_support::{route, TempDir, TestCa},
        routes::Transport,
    };

    fn table(hosts: &[(&str, &str)]) -> RouteTable {
        let routes = hosts
            .iter()
            .map(|(host, secret)| {
                let transport = Transport {
                    certificate: Some(CertificateSecrets {
                        cert: format!("{secret}.crt"),
                        key: format!("{secret}.key"),
                    }),
                    ..Transport::default()
                };
                (host.to_string(), vec![route(secret, &[], transport)])
            })
            .collect();
        RouteTable {
            routes,
            ..RouteTable::default()
        }
    }

    fn store(secrets: &TempDir) -> Arc<CertificateStore> {
        CertificateStore::new(
            secrets.path(),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
    }

    fn served_der(store: &CertificateStore, name: &str) -> Option<CertificateDer<'static>> {
        store
            .certificate_for(name)
            .map(|certified| certified.cert[0].clone())
    }

    #[test]
    fn the_exact_host_wins_over_a_wildcard_which_covers_one_label() {
        let ca = TestCa::new();
        let secrets = TempDir::create("secrets");
        let (wildcard, exact) = (ca.issue(&["*.example.org"]), ca.issue(&["api.example.org"]));
        secrets.write_pair("wildcard", &wildcard);
        secrets.write_pair("exact", &exact);
        let store = store(&secrets);
        store.update(&table(&[
            ("*.example.org", "wildcard"),
            ("api.example.org", "exact"),
        ]));
        assert_eq!(served_der(&store, "API.example.org."), Some(exact.der));
        assert_eq!(served_der(&store, "www.example.org"), Some(wildcard.der));
        assert_eq!(served_der(&store, "a.b.example.org"), None);
        assert_eq!(served_der(&store, "example.org"), None);
    }

    #[test]
    fn missing_or_mismatched_secrets_serve_nothing() {
        let ca = TestCa::new();
        let secrets = TempDir::create("secrets");
        let (one, other) = (ca.issue(&["a.example.org"]), ca.issue(&["a.example.org"]));
        secrets.write("mixed.crt", &one.cert_pem);
        secrets.write("mixed.key", &other.key_pem);
        let store = store(&secrets);
        store.update(&table(&[
            ("a.example.org", "missing"),
            ("b.example.org", "mixed"),
        ]));
        assert_eq!(served_der(&store, "a.example.org"), None);
        assert_eq!(served_der(&store, "b.example.org"), None);

        // Once the key matches, the next refresh serves the pair.
        secrets.write("mixed.key", &one.key_pem);
        store.refresh();
        assert_eq!(served_der(&store, "b.example.org"), Some(one.der));
    }

    #[test]
    fn passthrough_hosts_and_hosts_without_labels_need_no_certificate() {
        let secrets = TempDir::create("secrets");
        let store = store(&secrets);
        let mut table = table(&[("pt.example.org", "pt")]);
        table.routes.get_mut("pt.example.org").unwrap()[0]
            .transport
            .ssl_passthrough = true;
        table.routes.insert(
            "plain.example.org".into(),
            vec![route("plain", &[], Transport::default())],
        );
        store.update(&table);
        assert!(store.lock_state().wanted.is_empty());
    }
}
