//! Sources touch the outside world (files, sockets, BPF maps) and return plain structs for
//! the collectors.

pub mod ebpf;
pub mod proc;
