//! The WireGuard devices of this network namespace, as their implementations report them.
//!
//! Kernel WireGuard answers over generic netlink ([`kernel`]); userspace implementations
//! (wireguard-go, boringtun) over their UAPI socket in `/var/run/wireguard` ([`uapi`]). Both
//! yield the same plain [`Device`] structs, and [`DeviceSource`] hides which one was asked, so
//! the tunnel join is tested with fakes.

pub mod kernel;
pub mod uapi;

use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use crate::source::netlink::NetlinkError;

pub use crate::accounting::device::{
    endpoint_key, is_base64_key, key_to_base64, listen_ports, AllowedIp, Device, Implementation,
    Peer,
};

/// Where wireguard-go and boringtun put their UAPI sockets by default.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/wireguard";

/// Why WireGuard device state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireGuardError {
    /// The UAPI socket directory could not be listed.
    #[error(
        "cannot list the WireGuard UAPI sockets in {}: {source}; \
         set metrics.wireguard.socket_dir",
        dir.display()
    )]
    SocketDir {
        /// The directory.
        dir: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A userspace device's UAPI socket could not be used.
    #[error("cannot read WireGuard device {device} over {}: {source}", socket.display())]
    Uapi {
        /// The interface.
        device: String,
        /// The socket.
        socket: PathBuf,
        /// What went wrong.
        source: uapi::UapiError,
    },
    /// The kernel's WireGuard devices could not be read.
    #[error("cannot read kernel WireGuard devices: {0}")]
    Kernel(#[from] NetlinkError),
    /// A kernel device dump could not be decoded.
    #[error("cannot decode the kernel's dump of WireGuard device {device}: {message}")]
    Decode {
        /// The interface.
        device: String,
        /// What was wrong.
        message: String,
    },
    /// A configured interface is neither a kernel device nor has a UAPI socket.
    #[error(
        "WireGuard interface {device} not found: no kernel WireGuard device of that name in this \
         network namespace and no UAPI socket {}; check metrics.wireguard.interfaces",
        socket.display()
    )]
    NotFound {
        /// The configured name.
        device: String,
        /// Where its UAPI socket was looked for.
        socket: PathBuf,
    },
    /// Every configured or found device failed to read.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    All(Vec<WireGuardError>),
}

/// Reads the state of WireGuard devices: the seam between the real implementations and the
/// tunnel join.
pub trait DeviceSource: Send + Sync {
    /// Every device's current state. Blocking: call it from a blocking-capable thread.
    fn read_devices(&self) -> Result<Vec<Device>, WireGuardError>;
}

/// The devices of the calling thread's network namespace: kernel ones over netlink and
/// userspace ones over their UAPI sockets, all of them or only the configured ones.
#[derive(Clone, Debug)]
pub struct SystemDevices {
    interfaces: Vec<String>,
    socket_dir: PathBuf,
}

impl SystemDevices {
    /// Reads `interfaces`, or every device found when it is empty; UAPI sockets are looked
    /// for in `socket_dir`.
    pub fn new(interfaces: Vec<String>, socket_dir: impl Into<PathBuf>) -> Self {
        Self {
            interfaces,
            socket_dir: socket_dir.into(),
        }
    }

    fn read_userspace(&self, name: &str) -> Result<Device, WireGuardError> {
        let socket = uapi::socket_path(&self.socket_dir, name);
        uapi::read_device(name, &socket).map_err(|source| {
            if source.is_stale_socket() && !socket.exists() {
                WireGuardError::NotFound {
                    device: name.to_owned(),
                    socket,
                }
            } else {
                WireGuardError::Uapi {
                    device: name.to_owned(),
                    socket,
                    source,
                }
            }
        })
    }
}

impl DeviceSource for SystemDevices {
    fn read_devices(&self) -> Result<Vec<Device>, WireGuardError> {
        let mut devices = Vec::new();
        let mut problems = Vec::new();
        // Without kernel WireGuard (or without a usable netlink socket) the userspace
        // devices are still read.
        let (mut kernel, kernel_names) = match kernel::KernelClient::connect().and_then(|client| {
            let names = match client {
                Some(_) => kernel::device_names()?,
                None => Vec::new(),
            };
            Ok((client, names))
        }) {
            Ok(found) => found,
            Err(e) => {
                problems.push(e);
                (None, Vec::new())
            }
        };
        let wanted: Vec<String> = if self.interfaces.is_empty() {
            let mut all = kernel_names.clone();
            for name in uapi::socket_names(&self.socket_dir)? {
                if !kernel_names.contains(&name) && interface_exists(&name) {
                    all.push(name);
                }
            }
            all
        } else {
            self.interfaces.clone()
        };
        for name in &wanted {
            let read = match kernel.as_mut() {
                Some(client) if kernel_names.contains(name) => client.device(name),
                _ => self.read_userspace(name),
            };
            match read {
                Ok(d) => devices.push(d),
                // A socket nobody listens on is what a killed wireguard-go leaves behind
                // for a moment, until its interface is gone too.
                Err(WireGuardError::Uapi { ref source, .. })
                    if self.interfaces.is_empty() && source.is_stale_socket() =>
                {
                    debug!(component = "metrics", device = %name, "skipping stale WireGuard UAPI socket");
                }
                Err(e) => problems.push(e),
            }
        }
        if devices.is_empty() && !problems.is_empty() {
            return Err(if problems.len() == 1 {
                problems.remove(0)
            } else {
                WireGuardError::All(problems)
            });
        }
        // The devices that could be read are still worth reporting.
        for problem in problems {
            warn!(component = "metrics", error = %problem, "WireGuard device skipped this cycle");
        }
        Ok(devices)
    }
}

/// Whether `name` is an interface of the calling thread's network namespace.
fn interface_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// The default UAPI socket directory as a path.
pub fn default_socket_dir() -> &'static Path {
    Path::new(DEFAULT_SOCKET_DIR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_device_that_is_nowhere_is_named_with_the_setting() {
        let dir = std::env::temp_dir().join(format!("plexd-wg-none-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = SystemDevices::new(vec!["wgnope0".into()], &dir)
            .read_devices()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "WireGuard interface wgnope0 not found: no kernel WireGuard device of that name in \
                 this network namespace and no UAPI socket {}/wgnope0.sock; check \
                 metrics.wireguard.interfaces",
                dir.display()
            )
        );
        // Without configured names, no device is no error; an empty socket directory adds
        // no userspace device (a machine with kernel WireGuard may still list its own).
        let found = SystemDevices::new(vec![], &dir).read_devices().unwrap();
        assert!(found
            .iter()
            .all(|d| d.implementation == Implementation::Kernel));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
