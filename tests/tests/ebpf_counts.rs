//! The TC programs count exactly the packets that cross an interface, and leave nothing
//! behind when the probe goes.
//!
//! Two namespaces joined by a veth pair, with IPv6 off and permanent neighbour entries, carry
//! no traffic but the test's own UDP datagrams, so the counts can be compared exactly.

use aya::programs::tc::{NlOptions, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType};
use plexd_metrics::collector::KernelCounters as _;
use plexd_metrics::source::ebpf::{embedded_object, AttachMode, UnderlayProbe};
use plexd_metrics_common::PROG_COUNT_ONLY;
use plexd_metrics_tests::{
    ours, quiet_namespaces, require_privileges, tc_state, tc_state_after_detach, UdpFlow, VethPair,
};

const PACKETS: u64 = 37;
const PAYLOAD: usize = 100;
/// What TC sees of each datagram: Ethernet (14) + IPv4 (20) + UDP (8) + payload.
const FRAME: u64 = 14 + 20 + 8 + PAYLOAD as u64;
const PORT: u16 = 40_000;

fn counts_exactly_what_crosses_the_veth(mode: AttachMode) {
    let (sender_ns, receiver_ns) = quiet_namespaces();
    let veth = VethPair::new(&sender_ns, &receiver_ns).expect("create veth pair");

    let flow = UdpFlow::new(&sender_ns, &receiver_ns, &veth, PORT);

    // Attached last, so that nothing from setting up the link is counted.
    let sender_probe = sender_ns
        .run(|| UnderlayProbe::attach_with(embedded_object(), &[&veth.a.name], mode))
        .expect("enter sender namespace")
        .expect("attach probe to sender veth");
    let receiver_probe = receiver_ns
        .run(|| UnderlayProbe::attach_with(embedded_object(), &[&veth.b.name], mode))
        .expect("enter receiver namespace")
        .expect("attach probe to receiver veth");
    assert_eq!(sender_probe.programs_attached(), 2);
    assert_eq!(receiver_probe.programs_attached(), 2);

    flow.send_and_receive(PACKETS, PAYLOAD);

    let sent = sender_probe.read().expect("read sender counters");
    let received = receiver_probe.read().expect("read receiver counters");
    assert_eq!(
        (sent.egress_packets, sent.egress_bytes),
        (PACKETS, PACKETS * FRAME),
        "sender egress"
    );
    assert_eq!(
        (received.ingress_packets, received.ingress_bytes),
        (PACKETS, PACKETS * FRAME),
        "receiver ingress"
    );
    // Nothing flows back: no ARP (permanent neighbours), no ICMP (the port is bound), no
    // IPv6 chatter. Anything here means the programs count what they should not.
    assert_eq!(
        (sent.ingress_packets, sent.ingress_bytes),
        (0, 0),
        "sender ingress"
    );
    assert_eq!(
        (received.egress_packets, received.egress_bytes),
        (0, 0),
        "receiver egress"
    );
    assert_eq!(sent.programs_attached, 2);

    // Netlink attachments are looked up in the current namespace when detached.
    sender_ns
        .run(|| sender_probe.detach())
        .expect("enter sender namespace")
        .expect("detach sender probe");
    receiver_ns
        .run(|| receiver_probe.detach())
        .expect("enter receiver namespace")
        .expect("detach receiver probe");
}

#[test]
fn counts_exact_packets_and_bytes_with_default_attachment() {
    if !require_privileges() {
        return;
    }
    counts_exactly_what_crosses_the_veth(AttachMode::Auto);
}

#[test]
fn counts_exact_packets_and_bytes_with_netlink_attachment() {
    if !require_privileges() {
        return;
    }
    counts_exactly_what_crosses_the_veth(AttachMode::Netlink);
}

/// What is hooked into TC on `dev`, as seen from inside its namespace: program names attached
/// through TCX, legacy tc filter lines, and qdisc kinds.
fn leaves_nothing_behind(mode: AttachMode, preexisting_clsact: bool) {
    let (ns_a, ns_b) = quiet_namespaces();
    let veth = VethPair::new(&ns_a, &ns_b).expect("create veth pair");
    let dev = veth.a.name.as_str();
    if preexisting_clsact {
        ns_a.exec("tc", &["qdisc", "add", "dev", dev, "clsact"])
            .expect("add clsact");
    }
    let before = tc_state(&ns_a, dev);
    assert_eq!(ours(&before), 0, "{before:?}");

    let probe = ns_a
        .run(|| UnderlayProbe::attach_with(embedded_object(), &[dev], mode))
        .expect("enter namespace")
        .expect("attach probe");
    let during = tc_state(&ns_a, dev);
    // Proves the inspection sees our programs, so that the check after the drop means
    // something.
    assert_eq!(ours(&during), 2, "both programs attached: {during:?}");

    ns_a.run(move || drop(probe)).expect("enter namespace");
    let after = tc_state_after_detach(&ns_a, dev);
    assert_eq!(ours(&after), 0, "programs left attached: {after:?}");
    assert_eq!(after, before, "TC state differs from before the probe");
}

#[test]
fn dropping_the_probe_leaves_nothing_attached_with_default_attachment() {
    if !require_privileges() {
        return;
    }
    leaves_nothing_behind(AttachMode::Auto, false);
}

#[test]
fn dropping_the_probe_removes_the_clsact_qdisc_it_added() {
    if !require_privileges() {
        return;
    }
    leaves_nothing_behind(AttachMode::Netlink, false);
}

#[test]
fn dropping_the_probe_keeps_a_clsact_qdisc_it_did_not_add() {
    if !require_privileges() {
        return;
    }
    leaves_nothing_behind(AttachMode::Netlink, true);
}

#[test]
fn a_missing_interface_is_named_and_nothing_stays_attached() {
    if !require_privileges() {
        return;
    }
    let (ns_a, ns_b) = quiet_namespaces();
    let veth = VethPair::new(&ns_a, &ns_b).expect("create veth pair");
    let before = tc_state(&ns_a, &veth.a.name);
    let err = ns_a
        .run(|| UnderlayProbe::attach(&[veth.a.name.as_str(), "nope0"]))
        .expect("enter namespace")
        .expect_err("attaching to a missing interface must fail");
    assert_eq!(
        err.to_string(),
        "cannot attach to nope0: interface not found; set metrics.ebpf.interfaces"
    );
    assert_eq!(tc_state_after_detach(&ns_a, &veth.a.name), before);
}

#[test]
fn a_clsact_qdisc_that_others_still_use_is_kept() {
    if !require_privileges() {
        return;
    }
    let (ns_a, ns_b) = quiet_namespaces();
    let veth = VethPair::new(&ns_a, &ns_b).expect("create veth pair");
    let dev = veth.a.name.as_str();
    // The probe creates the qdisc.
    let probe = ns_a
        .run(|| UnderlayProbe::attach_with(embedded_object(), &[dev], AttachMode::Netlink))
        .expect("enter namespace")
        .expect("attach probe");
    assert!(tc_state(&ns_a, dev).clsact);
    // Someone else's filter joins it: a program under another name, attached as tc would.
    let mut other = aya::Ebpf::load(embedded_object()).expect("load the object again");
    let other_link = ns_a
        .run(|| {
            let prog: &mut SchedClassifier = other
                .program_mut(PROG_COUNT_ONLY)
                .expect("count-only program")
                .try_into()
                .expect("a classifier");
            prog.load().expect("load");
            let id = prog
                .attach_with_options(
                    dev,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(NlOptions::default()),
                )
                .expect("attach with netlink");
            prog.take_link(id).expect("take link")
        })
        .expect("enter namespace");
    assert_eq!(ours(&tc_state(&ns_a, dev)), 2);

    ns_a.run(move || drop(probe)).expect("enter namespace");
    let after = tc_state(&ns_a, dev);
    assert!(
        after.clsact,
        "qdisc removed under another filter: {after:?}"
    );
    assert_eq!(ours(&after), 0, "{after:?}");
    assert_eq!(
        after
            .filters
            .iter()
            .filter(|l| l.contains(PROG_COUNT_ONLY))
            .count(),
        1,
        "the other filter must survive: {after:?}"
    );
    ns_a.run(move || drop(other_link)).expect("enter namespace");
}
