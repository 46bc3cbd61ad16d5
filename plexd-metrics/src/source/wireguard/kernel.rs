//! Kernel WireGuard over generic netlink.
//!
//! The messages are encoded and decoded by `netlink-packet-wireguard`; what is done here is
//! the exchange: resolve the `wireguard` family, list the interfaces of kind `wireguard`,
//! and merge each device's multi-part dump. The kernel splits a device with many peers over
//! several messages, and a peer with many allowed IPs over two or more, repeating its
//! public key at the start of the next one; the merge joins those parts back together.

use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NlasIterator, NLM_F_DUMP};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::GenlMessage;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_wireguard::{
    WireguardAllowedIpAttr, WireguardAttribute, WireguardCmd, WireguardMessage,
    WireguardPeerAttribute,
};
use netlink_sys::protocols::{NETLINK_GENERIC, NETLINK_ROUTE};
use std::time::{Duration, SystemTime};

use super::{key_to_base64, AllowedIp, Device, Implementation, Peer, WireGuardError};
use crate::source::netlink::{header, NetlinkError, NetlinkSocket, RawMessage};

/// Generic netlink's own family, which resolves the others.
const GENL_ID_CTRL: u16 = 0x10;
/// `CTRL_ATTR_FAMILY_ID` in the control family's answer.
const CTRL_ATTR_FAMILY_ID: u16 = 1;
/// Size of `struct nlmsghdr`.
const NETLINK_HEADER_LEN: usize = 16;
/// Size of `struct genlmsghdr`.
const GENL_HDRLEN: usize = 4;
/// The family name kernel WireGuard registers.
const WG_GENL_NAME: &str = "wireguard";

/// A generic netlink connection to kernel WireGuard.
pub struct KernelClient {
    socket: NetlinkSocket,
    family: u16,
}

impl KernelClient {
    /// Connects; `None` when the kernel has no WireGuard (the module is not loaded).
    pub fn connect() -> Result<Option<Self>, WireGuardError> {
        let mut socket = NetlinkSocket::open(NETLINK_GENERIC)?;
        let request = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(WG_GENL_NAME.to_owned())],
        });
        let message = NetlinkMessage::new(
            header(GENL_ID_CTRL, 0),
            NetlinkPayload::InnerMessage(request),
        );
        let replies = match socket.request(message, "the wireguard family lookup") {
            Ok(replies) => replies,
            Err(e) if e.errno() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let family = replies
            .iter()
            .find_map(|m| family_id(&m.bytes))
            .ok_or_else(|| NetlinkError::Decode {
                request: "the wireguard family lookup",
                message: "no family id in the answer".into(),
            })?;
        Ok(Some(Self { socket, family }))
    }

    /// Dumps device `name` completely.
    pub fn device(&mut self, name: &str) -> Result<Device, WireGuardError> {
        let mut request = GenlMessage::from_payload(WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(name.to_owned())],
        });
        request.set_resolved_family_id(self.family);
        let message = NetlinkMessage::new(
            header(self.family, NLM_F_DUMP),
            NetlinkPayload::InnerMessage(request),
        );
        let replies = self.socket.dump(message, "the WireGuard device dump")?;
        decode_device(name, &replies)
    }
}

/// The family id in a `CTRL_CMD_NEWFAMILY` answer. Read attribute by attribute rather than
/// through `GenlCtrl`'s parser, which rejects attributes newer than itself.
fn family_id(message: &[u8]) -> Option<u16> {
    let attrs = message.get(NETLINK_HEADER_LEN + GENL_HDRLEN..)?;
    NlasIterator::new(attrs)
        .filter_map(Result::ok)
        .find(|nla| nla.kind() == CTRL_ATTR_FAMILY_ID)
        .and_then(|nla| Some(u16::from_ne_bytes(nla.value().get(..2)?.try_into().ok()?)))
}

/// Names of the kernel WireGuard interfaces in this network namespace; none when the
/// kernel has no WireGuard.
pub fn device_names() -> Result<Vec<String>, WireGuardError> {
    let mut socket = NetlinkSocket::open(NETLINK_ROUTE)?;
    let message = NetlinkMessage::new(
        header(0, NLM_F_DUMP),
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetLink(LinkMessage::default())),
    );
    let replies = socket.dump(message, "the interface list")?;
    let mut names = Vec::new();
    for raw in &replies {
        let parsed =
            NetlinkMessage::<RouteNetlinkMessage>::deserialize(&raw.bytes).map_err(|e| {
                NetlinkError::Decode {
                    request: "the interface list",
                    message: e.to_string(),
                }
            })?;
        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) = parsed.payload {
            if let Some(name) = wireguard_link_name(&link) {
                names.push(name);
            }
        }
    }
    Ok(names)
}

fn wireguard_link_name(link: &LinkMessage) -> Option<String> {
    let is_wireguard = link.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(infos)
            if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Wireguard))))
    });
    if !is_wireguard {
        return None;
    }
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })
}

/// Merges the messages of one device dump into a [`Device`].
pub(crate) fn decode_device(name: &str, replies: &[RawMessage]) -> Result<Device, WireGuardError> {
    let decode_error = |message: String| WireGuardError::Decode {
        device: name.to_owned(),
        message,
    };
    let mut device = Device {
        name: name.to_owned(),
        implementation: Implementation::Kernel,
        listen_port: 0,
        fwmark: 0,
        peers: Vec::new(),
    };
    if replies.is_empty() {
        return Err(decode_error("the dump was empty".into()));
    }
    for raw in replies {
        let parsed = NetlinkMessage::<GenlMessage<WireguardMessage>>::deserialize(&raw.bytes)
            .map_err(|e| decode_error(e.to_string()))?;
        let NetlinkPayload::InnerMessage(genl) = parsed.payload else {
            continue;
        };
        for attribute in genl.payload.attributes {
            match attribute {
                WireguardAttribute::IfName(n) => device.name = n,
                WireguardAttribute::ListenPort(p) => device.listen_port = p,
                WireguardAttribute::Fwmark(m) => device.fwmark = m,
                WireguardAttribute::Peers(peers) => {
                    for peer in peers {
                        merge_peer(&mut device.peers, peer.0).map_err(decode_error)?;
                    }
                }
                _ => {}
            }
        }
    }
    Ok(device)
}

/// Adds one peer entry of a dump message, or continues the previous peer when the entry
/// repeats its key (its allowed IPs went on in this message).
fn merge_peer(
    peers: &mut Vec<Peer>,
    attributes: Vec<WireguardPeerAttribute>,
) -> Result<(), String> {
    let key = attributes
        .iter()
        .find_map(|a| match a {
            WireguardPeerAttribute::PublicKey(k) => Some(key_to_base64(k)),
            _ => None,
        })
        .ok_or("a peer without a public key")?;
    if peers.last().is_none_or(|p| p.public_key != key) {
        peers.push(Peer {
            public_key: key,
            endpoint: None,
            allowed_ips: Vec::new(),
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            persistent_keepalive: None,
        });
    }
    let peer = peers.last_mut().expect("pushed above");
    for attribute in attributes {
        match attribute {
            WireguardPeerAttribute::Endpoint(addr) => peer.endpoint = Some(addr),
            WireguardPeerAttribute::RxBytes(n) => peer.rx_bytes = n,
            WireguardPeerAttribute::TxBytes(n) => peer.tx_bytes = n,
            WireguardPeerAttribute::PersistentKeepalive(secs) => {
                peer.persistent_keepalive = (secs != 0).then_some(secs);
            }
            WireguardPeerAttribute::LastHandshake(ts) => {
                peer.last_handshake =
                    match (u64::try_from(ts.seconds), u32::try_from(ts.nano_seconds)) {
                        (Ok(0), Ok(0)) => None,
                        (Ok(secs), Ok(nanos)) if nanos < 1_000_000_000 => {
                            Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
                        }
                        _ => return Err(format!("invalid handshake time {ts:?}")),
                    };
            }
            WireguardPeerAttribute::AllowedIps(ips) => {
                for ip in ips {
                    let (mut addr, mut prefix_len) = (None, None);
                    for a in ip.0 {
                        match a {
                            WireguardAllowedIpAttr::IpAddr(x) => addr = Some(x),
                            WireguardAllowedIpAttr::Cidr(c) => prefix_len = Some(c),
                            _ => {}
                        }
                    }
                    match (addr, prefix_len) {
                        (Some(addr), Some(prefix_len)) => {
                            peer.allowed_ips.push(AllowedIp { addr, prefix_len });
                        }
                        _ => return Err("an allowed IP without address or prefix".into()),
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::netlink::tests::message;
    use netlink_packet_core::{NLMSG_DONE, NLM_F_MULTIPART};

    /// A netlink attribute: length, type, value, padded to 4 bytes.
    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let len = 4 + value.len();
        let mut a = Vec::with_capacity(len.next_multiple_of(4));
        a.extend_from_slice(&(len as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize(len.next_multiple_of(4), 0);
        a
    }

    const NESTED: u16 = 0x8000;

    // Attribute numbers of <linux/wireguard.h>.
    const WGDEVICE_A_IFINDEX: u16 = 1;
    const WGDEVICE_A_IFNAME: u16 = 2;
    const WGDEVICE_A_PUBLIC_KEY: u16 = 4;
    const WGDEVICE_A_LISTEN_PORT: u16 = 6;
    const WGDEVICE_A_FWMARK: u16 = 7;
    const WGDEVICE_A_PEERS: u16 = 8;
    const WGPEER_A_PUBLIC_KEY: u16 = 1;
    const WGPEER_A_ENDPOINT: u16 = 4;
    const WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL: u16 = 5;
    const WGPEER_A_LAST_HANDSHAKE_TIME: u16 = 6;
    const WGPEER_A_RX_BYTES: u16 = 7;
    const WGPEER_A_TX_BYTES: u16 = 8;
    const WGPEER_A_ALLOWEDIPS: u16 = 9;
    const WGALLOWEDIP_A_FAMILY: u16 = 1;
    const WGALLOWEDIP_A_IPADDR: u16 = 2;
    const WGALLOWEDIP_A_CIDR_MASK: u16 = 3;

    fn allowed_ip(addr: [u8; 4], cidr: u8) -> Vec<u8> {
        let mut v = nla(WGALLOWEDIP_A_FAMILY, &(libc::AF_INET as u16).to_ne_bytes());
        v.extend(nla(WGALLOWEDIP_A_IPADDR, &addr));
        v.extend(nla(WGALLOWEDIP_A_CIDR_MASK, &[cidr]));
        nla(NESTED, &v)
    }

    /// struct sockaddr_in as the kernel puts it in WGPEER_A_ENDPOINT.
    fn sockaddr_in(addr: [u8; 4], port: u16) -> Vec<u8> {
        let mut s = (libc::AF_INET as u16).to_ne_bytes().to_vec();
        s.extend_from_slice(&port.to_be_bytes());
        s.extend_from_slice(&addr);
        s.extend_from_slice(&[0; 8]);
        s
    }

    /// struct sockaddr_in6.
    fn sockaddr_in6(addr: [u8; 16], port: u16) -> Vec<u8> {
        let mut s = (libc::AF_INET6 as u16).to_ne_bytes().to_vec();
        s.extend_from_slice(&port.to_be_bytes());
        s.extend_from_slice(&0u32.to_ne_bytes());
        s.extend_from_slice(&addr);
        s.extend_from_slice(&0u32.to_ne_bytes());
        s
    }

    fn timespec(secs: i64, nanos: i64) -> Vec<u8> {
        let mut t = secs.to_ne_bytes().to_vec();
        t.extend_from_slice(&nanos.to_ne_bytes());
        t
    }

    /// One WG_CMD_GET_DEVICE answer message of a dump with `attrs`.
    fn dump_part(family: u16, attrs: &[Vec<u8>]) -> RawMessage {
        let mut payload = vec![0u8, 1, 0, 0]; // genlmsghdr: cmd GET_DEVICE, version 1
        for a in attrs {
            payload.extend_from_slice(a);
        }
        RawMessage {
            flags: NLM_F_MULTIPART,
            bytes: message(family, NLM_F_MULTIPART, 5, &payload),
        }
    }

    /// Two messages of one dump, laid out as drivers/net/wireguard/netlink.c writes them: the
    /// first carries the device and the first peer with part of its allowed IPs; the second
    /// repeats that peer's key with the rest of them, then carries a second peer.
    fn two_part_dump() -> Vec<RawMessage> {
        let family = 0x1c;
        let device_attrs = |with_device: bool| {
            let mut a = vec![
                nla(WGDEVICE_A_IFINDEX, &7u32.to_ne_bytes()),
                nla(WGDEVICE_A_IFNAME, b"wg0\0"),
            ];
            if with_device {
                a.push(nla(WGDEVICE_A_PUBLIC_KEY, &[9; 32]));
                a.push(nla(WGDEVICE_A_LISTEN_PORT, &51820u16.to_ne_bytes()));
                a.push(nla(WGDEVICE_A_FWMARK, &0xca6cu32.to_ne_bytes()));
            }
            a
        };
        let first_peer = {
            let mut p = nla(WGPEER_A_PUBLIC_KEY, &[1; 32]);
            p.extend(nla(WGPEER_A_ENDPOINT, &sockaddr_in([192, 0, 2, 7], 51821)));
            p.extend(nla(
                WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL,
                &25u16.to_ne_bytes(),
            ));
            p.extend(nla(
                WGPEER_A_LAST_HANDSHAKE_TIME,
                &timespec(1_770_892_195, 5),
            ));
            p.extend(nla(WGPEER_A_RX_BYTES, &104_857_600u64.to_ne_bytes()));
            p.extend(nla(WGPEER_A_TX_BYTES, &52_428_800u64.to_ne_bytes()));
            let mut ips = allowed_ip([10, 100, 0, 2], 32);
            ips.extend(allowed_ip([10, 101, 0, 0], 16));
            p.extend(nla(WGPEER_A_ALLOWEDIPS | NESTED, &ips));
            nla(NESTED, &p)
        };
        let continued = {
            let mut p = nla(WGPEER_A_PUBLIC_KEY, &[1; 32]);
            p.extend(nla(
                WGPEER_A_ALLOWEDIPS | NESTED,
                &allowed_ip([10, 102, 0, 0], 16),
            ));
            nla(NESTED, &p)
        };
        let second_peer = {
            let mut ip6 = [0u8; 16];
            ip6[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
            ip6[15] = 1;
            let mut p = nla(WGPEER_A_PUBLIC_KEY, &[2; 32]);
            p.extend(nla(WGPEER_A_ENDPOINT, &sockaddr_in6(ip6, 51822)));
            p.extend(nla(WGPEER_A_LAST_HANDSHAKE_TIME, &timespec(0, 0)));
            nla(NESTED, &p)
        };
        let mut first = device_attrs(true);
        first.push(nla(WGDEVICE_A_PEERS | NESTED, &first_peer));
        let mut second = device_attrs(false);
        let mut peers = continued;
        peers.extend(second_peer);
        second.push(nla(WGDEVICE_A_PEERS | NESTED, &peers));
        vec![dump_part(family, &first), dump_part(family, &second)]
    }

    #[test]
    fn a_multi_part_dump_is_merged_into_one_device() {
        let d = decode_device("wg0", &two_part_dump()).unwrap();
        assert_eq!(d.name, "wg0");
        assert_eq!(d.implementation, Implementation::Kernel);
        assert_eq!(d.listen_port, 51820);
        assert_eq!(d.fwmark, 0xca6c);
        assert_eq!(d.peers.len(), 2, "{d:#?}");
        let a = &d.peers[0];
        assert_eq!(a.public_key, key_to_base64(&[1; 32]));
        assert_eq!(a.endpoint, Some("192.0.2.7:51821".parse().unwrap()));
        assert_eq!(a.persistent_keepalive, Some(25));
        assert_eq!(
            a.last_handshake,
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_770_892_195, 5))
        );
        assert_eq!((a.rx_bytes, a.tx_bytes), (104_857_600, 52_428_800));
        let ips: Vec<String> = a.allowed_ips.iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["10.100.0.2/32", "10.101.0.0/16", "10.102.0.0/16"]);
        let b = &d.peers[1];
        assert_eq!(b.public_key, key_to_base64(&[2; 32]));
        assert_eq!(b.endpoint, Some("[2001:db8::1]:51822".parse().unwrap()));
        assert_eq!(b.last_handshake, None, "a zero timespec means never");
    }

    #[test]
    fn datagrams_with_done_split_into_the_dump() {
        // The same dump as it arrives: both parts in one datagram, NLMSG_DONE in the next.
        let parts = two_part_dump();
        let mut datagram = parts[0].bytes.clone();
        datagram.extend_from_slice(&parts[1].bytes);
        let first = crate::source::netlink::split_datagram(&datagram, 5, "dump").unwrap();
        assert!(!first.done);
        let done = message(NLMSG_DONE, NLM_F_MULTIPART, 5, &0i32.to_ne_bytes());
        assert!(
            crate::source::netlink::split_datagram(&done, 5, "dump")
                .unwrap()
                .done
        );
        let d = decode_device("wg0", &first.messages).unwrap();
        assert_eq!(d.peers.len(), 2);
    }

    #[test]
    fn an_empty_or_broken_dump_is_an_error() {
        assert!(decode_device("wg0", &[]).is_err());
        let mut parts = two_part_dump();
        let len = parts[0].bytes.len();
        // Cut into the peers attribute but keep the netlink length consistent.
        parts[0].bytes.truncate(len - 8);
        let new_len = (len - 8) as u32;
        parts[0].bytes[..4].copy_from_slice(&new_len.to_ne_bytes());
        let err = decode_device("wg0", &parts).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot decode the kernel's dump of WireGuard device wg0: "),
            "{err}"
        );
    }

    #[test]
    fn the_family_id_is_read_from_the_control_answer() {
        let mut payload = vec![1u8, 2, 0, 0]; // CTRL_CMD_NEWFAMILY, version 2
        payload.extend(nla(2, b"wireguard\0"));
        payload.extend(nla(CTRL_ATTR_FAMILY_ID, &0x1cu16.to_ne_bytes()));
        payload.extend(nla(99, &[0; 8])); // an attribute from a newer kernel
        assert_eq!(
            family_id(&message(GENL_ID_CTRL, 0, 1, &payload)),
            Some(0x1c)
        );
        assert_eq!(family_id(&message(GENL_ID_CTRL, 0, 1, &[1, 2, 0, 0])), None);
    }

    #[test]
    fn link_kind_selects_wireguard_interfaces() {
        let mut link = LinkMessage::default();
        link.attributes.push(LinkAttribute::IfName("wg0".into()));
        assert_eq!(wireguard_link_name(&link), None);
        link.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Wireguard,
            )]));
        assert_eq!(wireguard_link_name(&link).as_deref(), Some("wg0"));
        let mut tun = LinkMessage::default();
        tun.attributes.push(LinkAttribute::IfName("wgo".into()));
        tun.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Tun)]));
        assert_eq!(
            wireguard_link_name(&tun),
            None,
            "wireguard-go's TUN is not kernel WireGuard"
        );
    }
}
