//! Scenarios for the VM (placeholder while the harness comes up).

use plexd_metrics_tests::{require_privileges, NetNs};

#[test]
fn kernel_wireguard_interface() {
    if !require_privileges() {
        return;
    }
    let ns = NetNs::new("pvk").expect("namespace");
    ns.ip(&["link", "add", "wgt0", "type", "wireguard"])
        .expect("kernel wireguard");
    println!(
        "{}",
        ns.exec("wg", &["show", "wgt0", "dump"]).expect("wg show")
    );
}
