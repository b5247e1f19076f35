//! A one-node Swarm behind a load-balancer namespace, on one segment: the setup of the tests
//! that run `xlb run` with XDP against a real Swarm (`l4_swarm`, `hitless_restart`): hosts
//! `client`, `lb-00` and `node`; the [`super::peer_program`] on lb-00's switch port; lb-00
//! forwarding nothing (`ip_forward=0`, `FORWARD` policy `DROP`), so that L4 traffic can only
//! pass through XDP; a dockerd on the node, in Swarm mode, with the docker-demo image built.

use xlb::dataplane::Dataplane;
use xlb_testbed::{build_docker_demo_binary, Dockerd, Host, Segment, Swarm};

use super::{peer_program, set_sysctl};

/// Fields drop in order: the Swarm's engine before the namespaces it runs in.
pub struct SwarmLb {
    pub swarm: Swarm,
    _peer_program: Dataplane,
    pub node: Host,
    pub lb: Host,
    pub client: Host,
    pub segment: Segment,
}

impl SwarmLb {
    /// The setup, with the docker-demo image built as `image`.
    pub fn start(image: &str) -> Self {
        let docker_demo = build_docker_demo_binary().unwrap();
        let segment = Segment::create().unwrap();
        let client = segment.add_host("client", 2).unwrap();
        let lb = segment.add_host("lb-00", 10).unwrap();
        let node = segment.add_host("node", 30).unwrap();
        let peer_program = peer_program(&segment, &[&lb]);
        set_sysctl(&lb.netns, "net.ipv4.ip_forward", "0");
        lb.netns
            .run("iptables", &["-P", "FORWARD", "DROP"])
            .unwrap();
        let swarm = Swarm::init(Dockerd::start(&node.netns).unwrap(), node.addr).unwrap();
        swarm.build_image(image, &docker_demo).unwrap();
        Self {
            swarm,
            _peer_program: peer_program,
            node,
            lb,
            client,
            segment,
        }
    }
}
