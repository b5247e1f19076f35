//! The L4 fast path's userspace side: what the XDP program steers, computed from the Swarm
//! snapshot and written into its maps.
//!
//! - [`service`]: the `xlb.l4.ports` label and the L4 part of the route table (pure).
//! - [`maglev`]: the consistent-hash lookup table of one service (pure).
//! - [`settings`]: limits and timeouts, with their defaults.
//! - [`maps`]: the map writer: backend ids, service slots, double-buffered rings.
//! - [`conntrack`]: the connection table's sweep and occupancy ([`batch`]: batched map reads).
//! - [`egress`]: which interfaces can take redirected XDP frames (netdev xdp-features).
//! - [`neighbours`]: next hops of backends, resolved ahead of time over rtnetlink.
//! - [`plan`]: route table + next hops → what the maps should hold (pure).
//! - [`shield`]: which ports of this node the route tables say the shield must leave open.
//! - [`steering`]: runs the above on every discovery poll.

pub mod batch;
pub mod conntrack;
pub mod egress;
pub mod maglev;
pub mod maps;
pub mod neighbours;
pub mod plan;
pub mod service;
pub mod settings;
pub mod shield;
pub mod steering;
