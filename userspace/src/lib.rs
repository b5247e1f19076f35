//! xlb: an eBPF/XDP-accelerated L4+L7 load balancer for Docker Swarm in host-mode networking.
//!
//! Data flows one way: the Swarm API is polled into a [`swarm::SwarmSnapshot`], a pure function
//! turns it into a [`routes::RouteTable`], published as a versioned [`snapshot::Snapshot`], and
//! a [`node`] hands it to the L7 [`proxy`] and the XDP [`dataplane`]: in one process (`xlb
//! run`), or from a [`controller`] on a manager to the proxies (`xlb proxy`) over HTTP.
//!
//! - [`config`]: Interlock's `config.toml`, accepted as it is.
//! - [`extension`]: the `[Extensions.<name>]` served, and what its keys become.
//! - [`swarm`]: the Docker API (bollard), read into a snapshot of Swarm; [`standalone`]: a
//!   plain engine's containers read as one-task services.
//! - [`discovery`]: polls Swarm and publishes the route tables when they change.
//! - [`routes`]: Swarm snapshot → route table, pure and tested without Docker.
//! - [`snapshot`]: the versioned route tables that cross from discovery to the nodes.
//! - [`controller`]: `xlb controller`, serving snapshots to proxies (long poll, bearer token).
//! - [`controller_feed`]: a proxy's side of it, failing over between controllers.
//! - [`node`]: applies each snapshot to the proxy's router, certificates and the XDP L4 path.
//! - [`privileges`]: `User`, applied by `xlb proxy` once it holds what needs root.
//! - [`proxy`]: the L7 HTTP proxy (hyper): routing by host and path, balancing, redirects, TLS,
//!   HTTP/2, WebSockets and Interlock's response headers.
//! - [`tls_policy`]: `SSLProtocols`/`SSLCiphers` mapped to rustls versions and suites.
//! - [`l4`]: the L4 fast path's userspace side: Maglev tables, service labels, map writing.
//! - [`dataplane`]: loads and attaches the XDP program, fills its maps, reads its counters;
//!   [`dataplane_error`]: what can go wrong with it and its maps.
//! - [`port_bitmap`]: the program's port bitmaps (L4 service ports, the L7 proxy's ports).
//! - [`admin`]: the small admin HTTP endpoint on `ListenAddr` (`/health`, `/routes`, `/stats`,
//!   `/metrics`, a dashboard at `/`); [`admin_client`]: `xlb status` and `xlb routes`, asking it,
//!   and [`admin_report`], their answers as tables.
//! - [`metrics`]: `/metrics` in the Prometheus text format, read at scrape time.
//! - [`endpoint`]: what the admin endpoint and the controller's share (accept, answers).
//! - [`daemon`]: `xlb run` and `xlb proxy`, wiring the above together.
//! - [`handover`]: hitless restart, a second process of the same instance taking over.
//! - [`pins`]: what a restart keeps on the BPF filesystem (connection tables, XDP links).
//! - [`logging`]: xlb's own log, and `ErrorLogPath`.
//! - [`build_info`]: version strings.
//! - [`check_config`]: `xlb check-config`, a config read and reported without running.

pub mod admin;
pub mod admin_client;
pub mod admin_report;
pub mod build_info;
pub mod check_config;
pub mod cli;
pub mod config;
pub mod controller;
pub mod controller_feed;
pub mod daemon;
pub mod dataplane;
pub mod dataplane_error;
pub mod discovery;
pub mod endpoint;
pub mod extension;
pub mod handover;
pub mod l4;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod pins;
pub mod port_bitmap;
pub mod privileges;
pub mod proxy;
pub mod routes;
pub mod snapshot;
pub mod standalone;
pub mod swarm;
pub mod tls_policy;
