//! Embeds the kernel programs into the agent so the binary is self-contained.
//!
//! `cargo xtask build-ebpf` writes the object to `target/ebpf/plexd-metrics-ebpf.o`
//! (or wherever `PLEXD_METRICS_EBPF_OBJECT` points). Without it the agent still builds, so
//! that plain `cargo build`/`cargo test` work, but it refuses to attach and says why.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=PLEXD_METRICS_EBPF_OBJECT");
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let object = env::var_os("PLEXD_METRICS_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir.join("../target/ebpf/plexd-metrics-ebpf.o"));
    println!("cargo:rerun-if-changed={}", object.display());

    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("plexd-metrics-ebpf.o");
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).expect("write embedded eBPF object"),
        Err(_) => {
            println!(
                "cargo:warning=no eBPF object at {}: this agent cannot attach its kernel programs; run `cargo xtask build-ebpf` first",
                object.display()
            );
            fs::write(&out, []).expect("write empty eBPF placeholder");
        }
    }
}
