//! xlb-testbed: disposable network topologies and a private Docker Swarm for
//! xlb's end-to-end tests and demo command.
//!
//! Everything lives in network namespaces this crate creates (never the
//! host's interfaces, routes or iptables), every name is unique per run, and
//! every resource is released on Drop, also when a test panics:
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use xlb_testbed::{build_docker_demo_binary, require_root, Dockerd, Swarm, Topology};
//!
//! require_root()?;
//! let topology = Topology::create()?;
//! let swarm = Swarm::init(Dockerd::start(&topology.node)?, topology.node_addr())?;
//! swarm.build_image("docker-demo:test", &build_docker_demo_binary()?)?;
//! swarm.service_create(&["--name", "demo", "--publish", "mode=host,target=8080", "docker-demo:test"])?;
//! let backends = swarm.wait_for_task_endpoints("demo", 8080, 1, Duration::from_secs(30))?;
//! # Ok(())
//! # }
//! ```

mod cgroup_mounts;
pub mod cluster;
mod command;
mod dockerd;
mod image;
mod netns;
mod privileges;
mod process;
pub mod seed;
mod segment;
mod swarm;
mod topology;
mod unique;
mod veth;
mod wait;

pub use command::{command_line, run, run_program};
pub use dockerd::Dockerd;
pub use image::{build_docker_demo_binary, build_scratch_image};
pub use netns::{list_netns, Netns};
pub use privileges::require_root;
pub use process::Process;
pub use segment::{in_netns, Host, Segment};
pub use swarm::{NodeRole, RunningTask, Swarm};
pub use topology::Topology;
pub use unique::{run_id, RunId, ScratchDir};
pub use veth::{create_veth_pair, disable_tx_checksum_offload, VethEnd};
pub use wait::wait_until;
