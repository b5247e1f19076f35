//! The route table: which endpoints serve which host (skeleton: types only).

use std::{collections::BTreeMap, net::SocketAddr};

use serde::Serialize;

/// Everything the proxy and the dataplane need to know, derived from one Swarm snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RouteTable {
    /// Lower-case host name (no port) → its route.
    pub routes: BTreeMap<String, Route>,
    /// Services that carry xlb/Interlock labels but cannot be routed, with the reason.
    pub rejected: Vec<RejectedService>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    /// The Swarm service's name.
    pub service: String,
    /// Node address + published port of each running task, sorted.
    pub endpoints: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RejectedService {
    pub service: String,
    pub reason: String,
}
