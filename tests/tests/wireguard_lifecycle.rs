//! The kernel accepts the WireGuard programs, and no attachment outlives the agent: not after
//! a clean exit, and not after a run that was killed before it could detach.

use std::path::PathBuf;

use aya::programs::SchedClassifier;
use plexd_metrics::source::ebpf::{embedded_object, AttachMode, UnderlayProbe};
use plexd_metrics_common::{PROG_COUNT_ONLY, PROG_EGRESS, PROG_INGRESS};
use plexd_metrics_tests::agent::RunningAgent;
use plexd_metrics_tests::{ours, quiet_namespaces, require_privileges, tc_state, VethPair};

/// The verifier's budget per program (BPF_COMPLEXITY_LIMIT_INSNS).
const VERIFIER_LIMIT: u32 = 1_000_000;

#[test]
fn the_verifier_accepts_every_program() {
    if !require_privileges() {
        return;
    }
    let mut ebpf = aya::Ebpf::load(embedded_object()).expect("load the object");
    for name in [PROG_INGRESS, PROG_EGRESS, PROG_COUNT_ONLY] {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .unwrap_or_else(|| panic!("no program {name}"))
            .try_into()
            .expect("a TC classifier");
        program
            .load()
            .unwrap_or_else(|e| panic!("the verifier rejected {name}: {e:?}"));
        let verified = program
            .info()
            .expect("program info")
            .verified_instruction_count()
            .expect("the kernel reports verified instructions");
        eprintln!("{name}: {verified} instructions verified");
        // Headroom matters: a newer compiler or kernel may need more.
        assert!(
            verified < VERIFIER_LIMIT / 4,
            "{name} needs {verified} of the verifier's {VERIFIER_LIMIT}"
        );
    }
}

#[test]
fn a_leaked_netlink_attachment_is_replaced_at_the_next_start() {
    if !require_privileges() {
        return;
    }
    let (ns_a, ns_b) = quiet_namespaces();
    let veth = VethPair::new(&ns_a, &ns_b).expect("create veth pair");
    let dev = veth.a.name.as_str();
    let before = tc_state(&ns_a, dev);
    let attach = || {
        ns_a.run(|| UnderlayProbe::attach_with(embedded_object(), &[dev], AttachMode::Netlink))
            .expect("enter namespace")
            .expect("attach probe")
    };
    // A run that never detaches: its filters and its clsact qdisc stay, as after a SIGKILL.
    std::mem::forget(attach());
    let stale = tc_state(&ns_a, dev);
    assert_eq!(ours(&stale), 2, "{stale:?}");

    let probe = attach();
    let during = tc_state(&ns_a, dev);
    assert_eq!(
        ours(&during),
        2,
        "stale filters replaced, not doubled: {during:?}"
    );
    ns_a.run(move || drop(probe)).expect("enter namespace");
    let after = tc_state(&ns_a, dev);
    assert_eq!(after, before, "the orphaned qdisc goes too");
}

#[test]
fn a_leaked_netlink_attachment_is_removed_when_the_next_run_uses_tcx() {
    if !require_privileges() {
        return;
    }
    let (ns_a, ns_b) = quiet_namespaces();
    let veth = VethPair::new(&ns_a, &ns_b).expect("create veth pair");
    let dev = veth.a.name.as_str();
    let before = tc_state(&ns_a, dev);
    let leaked = ns_a
        .run(|| UnderlayProbe::attach_with(embedded_object(), &[dev], AttachMode::Netlink))
        .expect("enter namespace")
        .expect("attach probe");
    std::mem::forget(leaked);
    let probe = ns_a
        .run(|| UnderlayProbe::attach_with(embedded_object(), &[dev], AttachMode::Auto))
        .expect("enter namespace")
        .expect("attach probe");
    let during = tc_state(&ns_a, dev);
    assert_eq!(during.tcx_programs.len(), 2, "{during:?}");
    assert!(during.filters.is_empty() && !during.clsact, "{during:?}");
    drop(probe);
    assert_eq!(tc_state(&ns_a, dev), before);
}

fn config_file(dev: &str, mode: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "plexd-metrics-lifecycle-{}-{dev}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "metrics:\n  collect_interval: 5s\n  report_interval: 10s\n  ebpf:\n    \
             interfaces: [{dev}]\n    attach_mode: {mode}\n    listen_ports: [51820]\n"
        ),
    )
    .expect("write config");
    (dir, config)
}

#[test]
fn a_sigkilled_agents_netlink_attachment_is_replaced_by_the_next_run() {
    if !require_privileges() {
        return;
    }
    let (ns_a, ns_b) = quiet_namespaces();
    let veth = VethPair::new(&ns_a, &ns_b).expect("create veth pair");
    let dev = veth.a.name.clone();
    let before = tc_state(&ns_a, &dev);
    let (dir, config) = config_file(&dev, "netlink");

    let mut first = RunningAgent::start(&ns_a, &config);
    first.wait_for("kernel programs attached");
    first.child.kill().expect("SIGKILL the agent");
    first.child.wait().expect("wait for the killed agent");
    let stale = tc_state(&ns_a, &dev);
    assert_eq!(ours(&stale), 2, "a killed agent cannot detach: {stale:?}");

    let second = RunningAgent::start(&ns_a, &config);
    let removed = second.wait_for("removed a stale attachment left by an earlier run");
    assert_eq!(removed["interface"], dev.as_str(), "{removed}");
    second.wait_for("kernel programs attached");
    let during = tc_state(&ns_a, &dev);
    assert_eq!(ours(&during), 2, "replaced, not doubled: {during:?}");

    let (code, _) = second.stop();
    assert_eq!(code, Some(0));
    assert_eq!(tc_state(&ns_a, &dev), before, "nothing left behind");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_sigkilled_agents_tcx_links_go_with_it() {
    if !require_privileges() {
        return;
    }
    let (ns_a, ns_b) = quiet_namespaces();
    let veth = VethPair::new(&ns_a, &ns_b).expect("create veth pair");
    let dev = veth.a.name.clone();
    let before = tc_state(&ns_a, &dev);
    let (dir, config) = config_file(&dev, "auto");
    let mut agent = RunningAgent::start(&ns_a, &config);
    agent.wait_for("kernel programs attached");
    assert_eq!(tc_state(&ns_a, &dev).tcx_programs.len(), 2);
    agent.child.kill().expect("SIGKILL the agent");
    agent.child.wait().expect("wait for the killed agent");
    // TCX links live as long as a file descriptor refers to them: the kernel detaches them
    // when the killed process's descriptors close.
    assert_eq!(tc_state(&ns_a, &dev), before);
    let _ = std::fs::remove_dir_all(dir);
}
