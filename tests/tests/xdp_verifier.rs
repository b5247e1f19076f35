//! The kernel's verifier walks every path of every program (up to a million instructions
//! each), and a change can make that walk grow steeply: the SNAT walk's paths once multiplied
//! with each attempt (`dataplane-ebpf/src/snat.rs`). This keeps each program inside 60% of the
//! limit here, so that growth is seen while there is room, not as a load failure on another
//! kernel (where the IPv6 programs, the most complex, would be left out: see
//! `Dataplane::steers_ipv6`). Here `xlb_ipv6_new_flow` takes about 530 000, the others under
//! 110 000 each.

use xlb::dataplane::Dataplane;

/// The verifier's limit per program (`BPF_COMPLEXITY_LIMIT_INSNS`).
const VERIFIER_LIMIT: u32 = 1_000_000;

/// The most a program may take of it.
const BUDGET: u32 = VERIFIER_LIMIT / 10 * 6;

#[test]
fn every_program_verifies_within_sixty_percent_of_the_verifiers_limit() {
    xlb_testbed::require_root().unwrap();
    let dataplane = Dataplane::load().expect("load the XDP programs");
    assert!(dataplane.steers_ipv6(), "the IPv6 programs did not load");
    let counts = dataplane.verified_instructions().unwrap();
    eprintln!("verified instructions: {counts:?}");
    assert_eq!(counts.len(), 6, "{counts:?}");
    for (program, count) in counts {
        assert!(count > 0, "{program}: the kernel reported no count");
        assert!(
            count <= BUDGET,
            "{program}: the verifier walked {count} instructions, more than {BUDGET}"
        );
    }
}
