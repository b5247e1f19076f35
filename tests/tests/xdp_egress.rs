//! Redirects through the `EGRESS` device map, in a namespace this test creates with a veth
//! pair: the daemon's check of an interface's XDP transmit (the kernel's netdev
//! xdp-features) follows what the veth's peer runs, and the program redirects only to the
//! interfaces in `EGRESS`, counting every other redirect as dropped, where a plain
//! `bpf_redirect` would be dropped by the kernel uncounted.

mod xdp_support;

use std::{collections::BTreeSet, time::Duration};

use xdp_support::*;
use xlb::{dataplane::Dataplane, l4::egress::EgressChecker};
use xlb_testbed::{in_netns, require_root, run_id, wait_until, Netns};

const FRONT: &str = "xlb-front";
const FRONT_PEER: &str = "xlb-front-peer";
const BACK: &str = "xlb-back";
const BACK_PEER: &str = "xlb-back-peer";

/// A namespace with two veth pairs for the LB: `FRONT` (the clients' side) and `BACK` (the
/// backend's side), whose peers stand for the segments behind them.
fn lb_namespace() -> Netns {
    require_root().unwrap();
    let netns = Netns::create(&format!("xlb-{}-egress", run_id())).unwrap();
    for (interface, peer) in [(FRONT, FRONT_PEER), (BACK, BACK_PEER)] {
        netns
            .ip(&[
                "link", "add", interface, "type", "veth", "peer", "name", peer,
            ])
            .unwrap();
    }
    for interface in [FRONT, FRONT_PEER, BACK, BACK_PEER] {
        netns.ip(&["link", "set", interface, "up"]).unwrap();
    }
    netns
}

fn ifindex(interface: &str) -> u32 {
    nix::net::if_::if_nametoindex(interface).unwrap()
}

#[test]
fn a_veth_takes_redirected_frames_only_while_its_peer_runs_xdp_or_gro() {
    let netns = lb_namespace();
    in_netns(&netns, || {
        let mut checker = EgressChecker::connect().unwrap();
        let back = ifindex(BACK);
        assert!(
            !checker.takes_xdp_frames(back).unwrap(),
            "a veth whose peer has neither XDP nor GRO cannot transmit XDP frames"
        );
        let mut peer_program = Dataplane::load().unwrap();
        peer_program.attach(BACK_PEER).unwrap();
        assert!(
            checker.takes_xdp_frames(back).unwrap(),
            "with an XDP program on its peer it can"
        );
        drop(peer_program);
        // The link goes a moment after its last handle (the kernel releases it deferred).
        wait_until(
            "the veth to lose its XDP transmit once its peer's program is gone",
            Duration::from_secs(5),
            || Ok((!checker.takes_xdp_frames(back)?).then_some(())),
        )
        .unwrap();
    })
    .unwrap();
}

#[test]
fn a_redirect_goes_only_to_an_interface_in_egress_and_is_counted_otherwise() {
    let netns = lb_namespace();
    in_netns(&netns, || {
        let back = ifindex(BACK);
        let front = ifindex(FRONT);
        let mut dataplane = dataplane(
            &settings(one_snat_port()),
            &[service(TCP_SERVICE, vec![backend(BACKEND_A, back)])],
        );
        let syn_in = tcp(TO_LB, client(), lb(5432), 64, syn as Flags, &[]);
        let syn_out = tcp(TO_BACKEND, snat(), BACKEND_A, 63, syn as Flags, &[]);
        expect_from(
            &mut dataplane,
            Some(front),
            "SYN toward an interface not in EGRESS",
            &syn_in,
            XDP_DROP,
            // Rewritten before the redirect was refused: the frame is dropped all the same.
            Some(&syn_out),
            &["class_l4_service", "l4_drop_redirect", "verdict_drop"],
        );

        dataplane.set_egress(&BTreeSet::from([back])).unwrap();
        expect_from(
            &mut dataplane,
            Some(front),
            "SYN toward an interface in EGRESS",
            &syn_in,
            XDP_REDIRECT,
            Some(&syn_out),
            &["class_l4_service", "l4_forwarded", "verdict_redirect"],
        );
        let reply = tcp(FROM_BACKEND, BACKEND_A, snat(), 64, syn_ack as Flags, &[]);
        let to_client = tcp(TO_CLIENT, lb(5432), client(), 63, syn_ack as Flags, &[]);
        expect_from(
            &mut dataplane,
            Some(back),
            "its reply, toward the client's interface, not in EGRESS",
            &reply,
            XDP_DROP,
            Some(&to_client),
            &["class_l4_reply", "l4_drop_redirect", "verdict_drop"],
        );
        dataplane
            .set_egress(&BTreeSet::from([back, front]))
            .unwrap();
        expect_from(
            &mut dataplane,
            Some(back),
            "its reply once the client's interface is in EGRESS",
            &reply,
            XDP_REDIRECT,
            Some(&to_client),
            &["class_l4_reply", "l4_replied", "verdict_redirect"],
        );
        dataplane.set_egress(&BTreeSet::new()).unwrap();
        expect_from(
            &mut dataplane,
            Some(front),
            "an interface taken out of EGRESS",
            &syn_in,
            XDP_DROP,
            Some(&syn_out),
            &["class_l4_service", "l4_drop_redirect", "verdict_drop"],
        );
    })
    .unwrap();
}
