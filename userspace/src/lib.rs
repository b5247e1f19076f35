//! xlb: an eBPF/XDP-accelerated L4+L7 load balancer for Docker Swarm in host-mode networking.
//!
//! Data flows one way: the Swarm API is polled into a [`swarm::SwarmSnapshot`], a pure function
//! turns it into a [`routes::RouteTable`], and the table is handed to the L7 [`proxy`] and the
//! XDP [`dataplane`].
//!
//! - [`config`]: Interlock's `config.toml`, accepted as it is.
//! - [`swarm`]: discovery through the Docker API (bollard).
//! - [`routes`]: Swarm snapshot → route table, pure and tested without Docker.
//! - [`proxy`]: the L7 HTTP proxy (hyper): routing by host and path, balancing, redirects, TLS,
//!   HTTP/2, WebSockets and Interlock's response headers.
//! - [`tls_policy`]: `SSLProtocols`/`SSLCiphers` mapped to rustls versions and suites.
//! - [`l4`]: the L4 fast path's userspace side: Maglev tables, service labels, map writing.
//! - [`dataplane`]: loads and attaches the XDP program, fills its maps, reads its counters.
//! - [`admin`]: the small admin HTTP endpoint on `ListenAddr` (`/health`, `/routes`, `/stats`).
//! - [`daemon`]: `xlb run`, wiring the above together.
//! - [`logging`]: xlb's own log, and `ErrorLogPath`.
//! - [`build_info`]: version strings.

pub mod admin;
pub mod build_info;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod l4;
pub mod logging;
pub mod proxy;
pub mod routes;
pub mod swarm;
pub mod tls_policy;
