//! Sources touch the outside world (files, sockets, BPF maps) and return plain structs for
//! the collectors.

pub mod apps;
pub mod counters;
pub mod ebpf;
pub mod gpu;
pub mod icmp;
pub mod netlink;
pub mod peer_names;
pub mod peers;
pub mod proc;
pub mod tunnel;
pub mod underlay;
pub mod wireguard;
