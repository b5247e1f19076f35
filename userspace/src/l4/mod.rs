//! The L4 fast path's userspace side: what the XDP program steers, computed from the route
//! table and written into its maps.
//!
//! - [`maglev`]: the consistent-hash lookup table of one service (pure).
pub mod maglev;
