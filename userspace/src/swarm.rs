//! The Docker API (bollard): services, tasks and nodes read into a snapshot, and the engine's
//! events that say when to read again.
//!
//! Reading is the source of truth: Swarm raises no event when a task starts or stops on another
//! node, so [`crate::discovery`] reads everything again after each event, while tasks are
//! settling, and every `PollInterval` in any case.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use bollard::{
    models::{ContainerSummary, EventMessage, LocalNodeState, Node, Service, Task, TaskState},
    query_parameters::{
        EventsOptions, ListContainersOptions, ListNodesOptions, ListServicesOptions,
        ListTasksOptions,
    },
    Docker, API_DEFAULT_VERSION,
};
use futures_util::{stream::BoxStream, StreamExt};

/// How long one Docker API call may take.
const API_TIMEOUT_SECS: u64 = 10;

/// What Swarm looked like at one moment: the input of [`crate::routes::route_table`].
#[derive(Debug, Clone, Default)]
pub struct SwarmSnapshot {
    /// Every service: which ones carry Interlock's or xlb's labels is for the route tables to
    /// decide (a default backend need not name a host; Docker ANDs label filters anyway).
    pub services: Vec<Service>,
    /// Their tasks that Swarm wants running.
    pub tasks: Vec<Task>,
    pub nodes: Vec<Node>,
}

impl SwarmSnapshot {
    /// The tasks grouped by service, in one pass over them: the route tables look each
    /// service's tasks up here, since scanning every task for every service made a build
    /// O(services × tasks), seconds for 10 000 services with 100 000 tasks.
    pub fn tasks_by_service(&self) -> TasksByService<'_> {
        let mut by_service: HashMap<Option<&str>, Vec<&Task>> = HashMap::new();
        for task in &self.tasks {
            by_service
                .entry(task.service_id.as_deref())
                .or_default()
                .push(task);
        }
        TasksByService(by_service)
    }

    /// Whether a task Swarm wants running is not running yet: routes are still about to change.
    pub fn settling(&self) -> bool {
        self.tasks.iter().any(|task| {
            let state = task.status.as_ref().and_then(|status| status.state);
            state != Some(TaskState::RUNNING)
        })
    }
}

/// A snapshot's tasks by the id of their service, see [`SwarmSnapshot::tasks_by_service`].
#[derive(Debug)]
pub struct TasksByService<'a>(HashMap<Option<&'a str>, Vec<&'a Task>>);

impl<'a> TasksByService<'a> {
    /// The tasks of one of the snapshot's services, in snapshot order.
    pub fn of(&self, service: &'a Service) -> &[&'a Task] {
        self.0
            .get(&service.id.as_deref())
            .map_or(&[], Vec::as_slice)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error("DockerURL {0:?} is neither unix:///path nor tcp://host:port")]
    BadUrl(String),
    #[error("cannot reach the Docker API at {url}")]
    Connect {
        url: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("listing Swarm {what} failed (is this node a Swarm manager?)")]
    List {
        what: &'static str,
        #[source]
        source: bollard::errors::Error,
    },
}

/// What the engine at the Docker URL is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineMode {
    /// In Swarm mode: its services are routed (on a worker, listing them fails).
    Swarm,
    /// A plain engine, not in Swarm mode: its containers are routed (see
    /// [`crate::standalone`]).
    Standalone,
}

/// A connection to a Swarm manager's Docker API, or a plain engine's.
#[derive(Debug, Clone)]
pub struct Swarm {
    docker: Docker,
    /// Where a plain engine's published ports are reached: the host of a `tcp://` URL, this
    /// machine's loopback for a `unix://` one.
    engine_addr: IpAddr,
}

impl Swarm {
    /// Connects to `url` (`unix:///var/run/docker.sock` or `tcp://host:2375`) and agrees on an
    /// API version with the engine.
    pub async fn connect(url: &str) -> Result<Self, SwarmError> {
        let connect_error = |source| SwarmError::Connect {
            url: url.to_owned(),
            source,
        };
        let (docker, engine_addr) = if let Some(path) = url.strip_prefix("unix://") {
            let docker = Docker::connect_with_unix(path, API_TIMEOUT_SECS, API_DEFAULT_VERSION);
            (docker, IpAddr::V4(Ipv4Addr::LOCALHOST))
        } else if let Some(addr) = url.strip_prefix("tcp://") {
            let docker = Docker::connect_with_http(
                &format!("http://{addr}"),
                API_TIMEOUT_SECS,
                API_DEFAULT_VERSION,
            );
            let engine_addr = tokio::net::lookup_host(addr)
                .await
                .ok()
                .and_then(|mut addrs| addrs.next())
                .ok_or_else(|| SwarmError::BadUrl(url.to_owned()))?
                .ip();
            (docker, engine_addr)
        } else {
            return Err(SwarmError::BadUrl(url.to_owned()));
        };
        let docker = docker.map_err(connect_error)?;
        let docker = docker.negotiate_version().await.map_err(connect_error)?;
        Ok(Self {
            docker,
            engine_addr,
        })
    }

    /// `docker info`: the engine's Swarm state among the rest.
    async fn info(&self) -> Result<bollard::models::SystemInfo, SwarmError> {
        self.docker.info().await.map_err(|source| SwarmError::List {
            what: "the engine's state",
            source,
        })
    }

    /// Whether the engine is in Swarm mode, asked each time: an engine may join or leave.
    pub async fn mode(&self) -> Result<EngineMode, SwarmError> {
        let info = self.info().await?;
        let state = info.swarm.and_then(|swarm| swarm.local_node_state);
        Ok(match state {
            Some(LocalNodeState::INACTIVE) => EngineMode::Standalone,
            _ => EngineMode::Swarm,
        })
    }

    /// The addresses of the Swarm's managers, as this node's engine knows them.
    pub async fn manager_addresses(&self) -> Result<Vec<IpAddr>, SwarmError> {
        let info = self.info().await?;
        let managers = info
            .swarm
            .and_then(|swarm| swarm.remote_managers)
            .unwrap_or_default();
        let mut addresses: Vec<IpAddr> = managers
            .iter()
            .filter_map(|manager| manager.addr.as_deref()?.parse::<SocketAddr>().ok())
            .map(|addr| addr.ip())
            .collect();
        addresses.sort();
        addresses.dedup();
        Ok(addresses)
    }

    /// The containers running on a plain engine.
    pub async fn running_containers(&self) -> Result<Vec<ContainerSummary>, SwarmError> {
        self.docker
            .list_containers(None::<ListContainersOptions>)
            .await
            .map_err(|source| SwarmError::List {
                what: "containers",
                source,
            })
    }

    /// Where a plain engine's published ports are reached.
    pub fn engine_addr(&self) -> IpAddr {
        self.engine_addr
    }

    /// Reads the services, the tasks that should be running, and the nodes.
    pub async fn snapshot(&self) -> Result<SwarmSnapshot, SwarmError> {
        let list_error = |what| move |source| SwarmError::List { what, source };
        let services = self
            .docker
            .list_services(None::<ListServicesOptions>)
            .await
            .map_err(list_error("services"))?;
        let tasks = self
            .docker
            .list_tasks(Some(ListTasksOptions {
                filters: Some(filter("desired-state", "running")),
            }))
            .await
            .map_err(list_error("tasks"))?;
        let nodes = self
            .docker
            .list_nodes(None::<ListNodesOptions>)
            .await
            .map_err(list_error("nodes"))?;
        Ok(SwarmSnapshot {
            services,
            tasks,
            nodes,
        })
    }
}

impl Swarm {
    /// The engine's events that can change the route tables: services, nodes, secrets and
    /// configs being created, updated or removed (cluster-wide, on a manager), and this node's
    /// containers starting and dying (the only sign of a task here starting or stopping).
    pub fn events(&self) -> BoxStream<'static, Result<EventMessage, bollard::errors::Error>> {
        let filters = HashMap::from([
            (
                "type".to_owned(),
                ["service", "node", "secret", "config", "container"]
                    .map(str::to_owned)
                    .to_vec(),
            ),
            (
                "event".to_owned(),
                ["create", "update", "remove", "start", "die"]
                    .map(str::to_owned)
                    .to_vec(),
            ),
        ]);
        self.docker
            .events(Some(EventsOptions {
                filters: Some(filters),
                ..EventsOptions::default()
            }))
            .boxed()
    }
}

fn filter(key: &str, value: &str) -> HashMap<String, Vec<String>> {
    HashMap::from([(key.to_owned(), vec![value.to_owned()])])
}

/// Swarm objects shaped as the Docker API returns them, for the route-table tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use bollard::models::{Node, NodeStatus, Service, ServiceSpec};

    /// A service named `id`, created at `created` (ordering contested claims), with `labels`.
    pub fn service(id: &str, created: &str, labels: &[(&str, &str)]) -> Service {
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Service {
            id: Some(id.to_owned()),
            created_at: Some(created.to_owned()),
            spec: Some(ServiceSpec {
                name: Some(id.to_owned()),
                labels: Some(labels.collect()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A node whose tasks are reached on `addr` (`Status.Addr`).
    pub fn node(id: &str, addr: &str) -> Node {
        Node {
            id: Some(id.to_owned()),
            status: Some(NodeStatus {
                addr: Some(addr.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}
