//! From a frame on an underlay interface to the WireGuard messages it carries.
//!
//! Two steps: [`parse_frame`] finds the UDP datagram to or from a WireGuard port (Ethernet
//! with up to two VLAN tags, IPv4 with options, IPv6 with extension headers), and
//! [`classify`] tells the message type by its first bytes and exact size. Neither step
//! ever changes the packet.

use plexd_metrics_common::{Direction, EndpointKey};

/// Read access to a packet's bytes, counted from the start of the link-layer header.
pub trait Packet {
    /// Length of the packet in bytes.
    fn len(&self) -> u32;

    /// Whether the packet has no bytes at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `N` bytes at `offset`, or `None` if the packet ends before.
    fn read<const N: usize>(&self, offset: u32) -> Option<[u8; N]>;
}

impl Packet for [u8] {
    fn len(&self) -> u32 {
        u32::try_from(<[u8]>::len(self)).unwrap_or(u32::MAX)
    }

    fn read<const N: usize>(&self, offset: u32) -> Option<[u8; N]> {
        let start = usize::try_from(offset).ok()?;
        self.get(start..start.checked_add(N)?)?.try_into().ok()
    }
}

const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
const UDP_HLEN: u32 = 8;
/// Extension headers followed before giving up on an IPv6 packet; real traffic has one or
/// two, and the bound keeps the verifier's walk short.
const MAX_IPV6_EXTENSIONS: usize = 6;

/// A UDP datagram to or from a WireGuard port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Datagram {
    /// The other side: the source on ingress, the destination on egress.
    pub remote: EndpointKey,
    /// Offset of the UDP payload from the start of the frame.
    pub payload_offset: u32,
    /// Length of the UDP payload as the UDP header states it (all segments of a GSO packet).
    pub payload_len: u32,
    /// Whether the datagram cannot hold a WireGuard message as it stands: the first
    /// fragment of a fragmented datagram, or a UDP length that does not fit the packet.
    pub malformed: bool,
}

/// What [`parse_frame`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Not UDP to or from a WireGuard port, or not parseable far enough to know: not ours
    /// to count.
    Other,
    /// UDP to or from a WireGuard port.
    WireGuardPort(Datagram),
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Finds the UDP datagram of an Ethernet frame and checks its ports with `is_port`.
///
/// Non-first IP fragments carry no UDP header and are [`Frame::Other`]; a first fragment on
/// a WireGuard port is malformed (WireGuard sizes its messages to avoid fragmentation, and a
/// fragment cannot be checked against the message sizes).
#[inline(always)]
pub fn parse_frame<P: Packet + ?Sized>(
    pkt: &P,
    direction: Direction,
    is_port: impl Fn(u16) -> bool,
) -> Frame {
    let Some(mut ethertype) = pkt.read::<2>(12).map(be16) else {
        return Frame::Other;
    };
    let mut l3 = ETH_HLEN;
    // Up to two VLAN tags (802.1ad outer, 802.1Q inner) when the NIC did not strip them.
    let mut tags = 0;
    while tags < 2 && (ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD) {
        let Some(inner) = pkt.read::<2>(l3 + 2).map(be16) else {
            return Frame::Other;
        };
        ethertype = inner;
        l3 += 4;
        tags += 1;
    }
    let (src, dst, l4, fragment) = match ethertype {
        ETH_P_IP => {
            let Some(ip) = pkt.read::<20>(l3) else {
                return Frame::Other;
            };
            let ihl = u32::from(ip[0] & 0x0f) * 4;
            if ip[0] >> 4 != 4 || ihl < 20 || ip[9] != IPPROTO_UDP {
                return Frame::Other;
            }
            let frag = be16([ip[6], ip[7]]);
            if frag & 0x1fff != 0 {
                return Frame::Other;
            }
            let src = EndpointKey::v4([ip[12], ip[13], ip[14], ip[15]], 0);
            let dst = EndpointKey::v4([ip[16], ip[17], ip[18], ip[19]], 0);
            (src, dst, l3 + ihl, frag & 0x2000 != 0)
        }
        ETH_P_IPV6 => {
            let Some(ip) = pkt.read::<40>(l3) else {
                return Frame::Other;
            };
            if ip[0] >> 4 != 6 {
                return Frame::Other;
            }
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&ip[8..24]);
            dst.copy_from_slice(&ip[24..40]);
            let mut next = ip[6];
            let mut l4 = l3 + 40;
            let mut fragment = false;
            let mut i = 0;
            while i < MAX_IPV6_EXTENSIONS && next != IPPROTO_UDP {
                let Some(ext) = pkt.read::<4>(l4) else {
                    return Frame::Other;
                };
                match next {
                    IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                        l4 += (u32::from(ext[1]) + 1) * 8;
                    }
                    IPPROTO_AH => l4 += (u32::from(ext[1]) + 2) * 4,
                    IPPROTO_FRAGMENT => {
                        if be16([ext[2], ext[3]]) & 0xfff8 != 0 {
                            return Frame::Other;
                        }
                        fragment = true;
                        l4 += 8;
                    }
                    _ => return Frame::Other,
                }
                next = ext[0];
                i += 1;
            }
            if next != IPPROTO_UDP {
                return Frame::Other;
            }
            (
                EndpointKey::v6(src, 0),
                EndpointKey::v6(dst, 0),
                l4,
                fragment,
            )
        }
        _ => return Frame::Other,
    };
    let Some(udp) = pkt.read::<8>(l4) else {
        return Frame::Other;
    };
    let sport = be16([udp[0], udp[1]]);
    let dport = be16([udp[2], udp[3]]);
    if !is_port(dport) && !is_port(sport) {
        return Frame::Other;
    }
    let mut remote = match direction {
        Direction::Ingress => src,
        Direction::Egress => dst,
    };
    remote.port = match direction {
        Direction::Ingress => sport,
        Direction::Egress => dport,
    };
    let udp_len = u32::from(be16([udp[4], udp[5]]));
    let payload_offset = l4 + UDP_HLEN;
    let fits = udp_len >= UDP_HLEN && l4 + udp_len <= pkt.len();
    Frame::WireGuardPort(Datagram {
        remote,
        payload_offset,
        payload_len: udp_len.saturating_sub(UDP_HLEN),
        malformed: fragment || !fits,
    })
}

/// WireGuard message type of a handshake initiation.
pub const MESSAGE_INITIATION: u32 = 1;
/// WireGuard message type of a handshake response.
pub const MESSAGE_RESPONSE: u32 = 2;
/// WireGuard message type of a cookie reply.
pub const MESSAGE_COOKIE_REPLY: u32 = 3;
/// WireGuard message type of a transport data message.
pub const MESSAGE_TRANSPORT: u32 = 4;
/// Size of a handshake initiation.
pub const INITIATION_LEN: u32 = 148;
/// Size of a handshake response.
pub const RESPONSE_LEN: u32 = 92;
/// Size of a cookie reply.
pub const COOKIE_REPLY_LEN: u32 = 64;
/// Size of a transport message without payload: header (16) and authentication tag (16).
pub const KEEPALIVE_LEN: u32 = 32;
/// Bytes of a message [`classify`] needs.
pub const HEADER_LEN: u32 = 16;

/// A WireGuard message, as far as its header and size tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    /// Handshake initiation; `sender` is the index the initiator will receive with.
    Initiation {
        /// The initiator's sender index.
        sender: u32,
    },
    /// Handshake response; `sender` is the index the responder will receive with.
    Response {
        /// The responder's sender index.
        sender: u32,
    },
    /// Cookie reply (the receiver was under load).
    CookieReply,
    /// Transport data; a keepalive when it carries no payload.
    Transport {
        /// The receiver's session index.
        receiver: u32,
        /// The sender's per-session counter (nonce).
        counter: u64,
        /// Whether the payload is empty.
        keepalive: bool,
    },
    /// Anything else: wrong type, wrong size, non-zero reserved bytes.
    Malformed,
}

/// Tells the message type from its first [`HEADER_LEN`] bytes and its exact length.
///
/// The type is a little-endian 32-bit word whose upper three bytes are reserved zeros, as
/// WireGuard itself checks. Transport messages are a 16-byte header and a ciphertext of a
/// multiple of 16 bytes (the padded plaintext) plus a 16-byte tag.
#[inline(always)]
pub fn classify(header: &[u8; 16], len: u32) -> Message {
    let le32 =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    match le32(0) {
        MESSAGE_INITIATION if len == INITIATION_LEN => Message::Initiation { sender: le32(4) },
        MESSAGE_RESPONSE if len == RESPONSE_LEN => Message::Response { sender: le32(4) },
        MESSAGE_COOKIE_REPLY if len == COOKIE_REPLY_LEN => Message::CookieReply,
        MESSAGE_TRANSPORT if len >= KEEPALIVE_LEN && len.is_multiple_of(16) => Message::Transport {
            receiver: le32(4),
            counter: u64::from_le_bytes([
                header[8], header[9], header[10], header[11], header[12], header[13], header[14],
                header[15],
            ]),
            keepalive: len == KEEPALIVE_LEN,
        },
        _ => Message::Malformed,
    }
}

/// Reads and classifies the message of `len` bytes at `offset`.
#[inline(always)]
pub fn read_message<P: Packet + ?Sized>(pkt: &P, offset: u32, len: u32) -> Message {
    if len < HEADER_LEN {
        return Message::Malformed;
    }
    match pkt.read::<16>(offset) {
        Some(header) => classify(&header, len),
        None => Message::Malformed,
    }
}

/// Where the messages of a datagram lie: one, or one per segment of a GSO/GRO packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segments {
    /// Number of messages.
    pub count: u32,
    /// Length of each message but the last.
    pub size: u32,
    /// Length of the last message.
    pub last: u32,
}

impl Segments {
    /// The segments of a datagram whose UDP payload is `payload_len` bytes, given the
    /// kernel's `gso_segs` and `gso_size` for the packet. `None` if they do not add up.
    ///
    /// UDP GSO (sending) and GRO (receiving) carry many datagrams in one packet with one
    /// UDP header; each segment is one WireGuard message.
    #[inline(always)]
    pub fn of(payload_len: u32, gso_segs: u32, gso_size: u32) -> Option<Self> {
        if gso_segs <= 1 || gso_size == 0 {
            return Some(Self {
                count: 1,
                size: payload_len,
                last: payload_len,
            });
        }
        let before_last = (gso_segs - 1).checked_mul(gso_size)?;
        let last = payload_len.checked_sub(before_last)?;
        if last == 0 || last > gso_size {
            return None;
        }
        Some(Self {
            count: gso_segs,
            size: gso_size,
            last,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const SRC4: [u8; 4] = [10, 0, 0, 1];
    pub const DST4: [u8; 4] = [10, 0, 0, 2];
    pub const SRC6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    pub const DST6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const PORT: u16 = 51820;
    const PEER_PORT: u16 = 40000;

    fn is_wg(p: u16) -> bool {
        p == PORT
    }

    fn eth(ethertype: u16) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = Vec::new();
        u.extend_from_slice(&sport.to_be_bytes());
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&((payload.len() + 8) as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(payload);
        u
    }

    fn ipv4_with(options: &[u8], frag: u16, l4: &[u8]) -> Vec<u8> {
        let ihl = (20 + options.len()) / 4;
        let mut ip = vec![0x40 | ihl as u8, 0];
        ip.extend_from_slice(&((20 + options.len() + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 1]);
        ip.extend_from_slice(&frag.to_be_bytes());
        ip.extend_from_slice(&[64, IPPROTO_UDP, 0, 0]);
        ip.extend_from_slice(&SRC4);
        ip.extend_from_slice(&DST4);
        ip.extend_from_slice(options);
        ip.extend_from_slice(l4);
        ip
    }

    pub fn ipv4_frame(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = eth(ETH_P_IP);
        f.extend(ipv4_with(&[], 0, &udp(sport, dport, payload)));
        f
    }

    /// IPv6 with the given extension headers, each `(type, bytes)` with `bytes` the whole
    /// header after the next-header byte is filled in.
    fn ipv6_frame(exts: &[(u8, Vec<u8>)], l4: &[u8]) -> Vec<u8> {
        let mut f = eth(ETH_P_IPV6);
        let body_len: usize = exts.iter().map(|(_, b)| b.len()).sum::<usize>() + l4.len();
        let first = exts.first().map_or(IPPROTO_UDP, |(t, _)| *t);
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(body_len as u16).to_be_bytes());
        f.extend_from_slice(&[first, 64]);
        f.extend_from_slice(&SRC6);
        f.extend_from_slice(&DST6);
        for (i, (_, bytes)) in exts.iter().enumerate() {
            let next = exts.get(i + 1).map_or(IPPROTO_UDP, |(t, _)| *t);
            let mut b = bytes.clone();
            b[0] = next;
            f.extend(b);
        }
        f.extend_from_slice(l4);
        f
    }

    pub fn transport(receiver: u32, counter: u64, payload: usize) -> Vec<u8> {
        let mut m = MESSAGE_TRANSPORT.to_le_bytes().to_vec();
        m.extend_from_slice(&receiver.to_le_bytes());
        m.extend_from_slice(&counter.to_le_bytes());
        m.resize(16 + payload + 16, 0xab);
        m
    }

    fn handshake(kind: u32, len: usize, sender: u32) -> Vec<u8> {
        let mut m = kind.to_le_bytes().to_vec();
        m.extend_from_slice(&sender.to_le_bytes());
        m.resize(len, 0x11);
        m
    }

    fn parse(frame: &[u8], direction: Direction) -> Frame {
        parse_frame(frame, direction, is_wg)
    }

    fn datagram(frame: &[u8], direction: Direction) -> Datagram {
        match parse(frame, direction) {
            Frame::WireGuardPort(d) => d,
            Frame::Other => panic!("not recognised as WireGuard UDP: {frame:02x?}"),
        }
    }

    #[test]
    fn ipv4_ingress_remote_is_the_source() {
        let f = ipv4_frame(PEER_PORT, PORT, &transport(7, 1, 0));
        let d = datagram(&f, Direction::Ingress);
        assert_eq!(d.remote, EndpointKey::v4(SRC4, PEER_PORT));
        assert_eq!(d.payload_offset, 14 + 20 + 8);
        assert_eq!(d.payload_len, 32);
        assert!(!d.malformed);
        assert_eq!(
            read_message(&f[..], d.payload_offset, d.payload_len),
            Message::Transport {
                receiver: 7,
                counter: 1,
                keepalive: true
            }
        );
    }

    #[test]
    fn egress_remote_is_the_destination_and_either_port_matches() {
        let f = ipv4_frame(PORT, PEER_PORT, &transport(7, 1, 16));
        assert_eq!(
            datagram(&f, Direction::Egress).remote,
            EndpointKey::v4(DST4, PEER_PORT)
        );
        // A packet from a WireGuard port to elsewhere is WireGuard's too.
        assert_eq!(
            datagram(&f, Direction::Ingress).remote,
            EndpointKey::v4(SRC4, PORT)
        );
    }

    #[test]
    fn other_ports_and_protocols_are_not_ours() {
        assert_eq!(
            parse(
                &ipv4_frame(1234, 5678, &transport(1, 1, 0)),
                Direction::Ingress
            ),
            Frame::Other
        );
        let mut tcp = ipv4_frame(PEER_PORT, PORT, &transport(1, 1, 0));
        tcp[14 + 9] = 6;
        assert_eq!(parse(&tcp, Direction::Ingress), Frame::Other);
        let mut arp = ipv4_frame(PEER_PORT, PORT, &[]);
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(parse(&arp, Direction::Ingress), Frame::Other);
    }

    #[test]
    fn ipv4_options_move_the_udp_header() {
        let mut f = eth(ETH_P_IP);
        f.extend(ipv4_with(
            &[1, 1, 1, 0, 1, 1, 1, 0],
            0,
            &udp(PEER_PORT, PORT, &transport(3, 9, 0)),
        ));
        let d = datagram(&f, Direction::Ingress);
        assert_eq!(d.payload_offset, 14 + 28 + 8);
        assert!(matches!(
            read_message(&f[..], d.payload_offset, d.payload_len),
            Message::Transport {
                receiver: 3,
                counter: 9,
                ..
            }
        ));
    }

    #[test]
    fn vlan_tags_are_skipped() {
        let inner = ipv4_frame(PEER_PORT, PORT, &transport(3, 9, 0));
        let mut f = inner[..12].to_vec();
        f.extend_from_slice(&[0x88, 0xa8, 0, 10, 0x81, 0x00, 0, 20]);
        f.extend_from_slice(&inner[12..]);
        let d = datagram(&f, Direction::Ingress);
        assert_eq!(d.payload_offset, 14 + 8 + 20 + 8);
        assert!(!d.malformed);
    }

    #[test]
    fn ipv4_fragments_first_is_malformed_rest_are_not_ours() {
        let l4 = udp(PEER_PORT, PORT, &transport(3, 9, 0));
        let mut first = eth(ETH_P_IP);
        first.extend(ipv4_with(&[], 0x2000, &l4));
        assert!(datagram(&first, Direction::Ingress).malformed);
        let mut later = eth(ETH_P_IP);
        later.extend(ipv4_with(&[], 0x0003, &l4));
        assert_eq!(parse(&later, Direction::Ingress), Frame::Other);
    }

    #[test]
    fn ipv6_plain_and_with_extension_headers() {
        let l4 = udp(PEER_PORT, PORT, &transport(5, 77, 32));
        let plain = ipv6_frame(&[], &l4);
        let d = datagram(&plain, Direction::Ingress);
        assert_eq!(d.remote, EndpointKey::v6(SRC6, PEER_PORT));
        assert_eq!(d.payload_offset, 14 + 40 + 8);
        assert!(!d.malformed);

        let hbh = (IPPROTO_HOPOPTS, vec![0, 0, 1, 4, 0, 0, 0, 0]);
        let dst = (IPPROTO_DSTOPTS, {
            let mut b = vec![0, 1];
            b.resize(16, 0);
            b
        });
        let routing = (IPPROTO_ROUTING, vec![0, 0, 0, 0, 0, 0, 0, 0]);
        let ah = (IPPROTO_AH, {
            let mut b = vec![0, 4];
            b.resize(24, 0);
            b
        });
        let f = ipv6_frame(&[hbh, dst, routing, ah], &l4);
        let d = datagram(&f, Direction::Ingress);
        assert_eq!(d.payload_offset, 14 + 40 + 8 + 16 + 8 + 24 + 8);
        assert!(!d.malformed);
        assert_eq!(
            read_message(&f[..], d.payload_offset, d.payload_len),
            Message::Transport {
                receiver: 5,
                counter: 77,
                keepalive: false
            }
        );
    }

    #[test]
    fn ipv6_fragments_first_is_malformed_rest_are_not_ours() {
        let l4 = udp(PEER_PORT, PORT, &transport(5, 77, 32));
        let first = ipv6_frame(&[(IPPROTO_FRAGMENT, vec![0, 0, 0, 1, 0, 0, 0, 9])], &l4);
        assert!(datagram(&first, Direction::Ingress).malformed);
        let later = ipv6_frame(&[(IPPROTO_FRAGMENT, vec![0, 0, 0, 0x10, 0, 0, 0, 9])], &l4);
        assert_eq!(parse(&later, Direction::Ingress), Frame::Other);
    }

    #[test]
    fn too_many_or_unknown_extension_headers_are_not_ours() {
        let l4 = udp(PEER_PORT, PORT, &transport(5, 77, 32));
        let many: Vec<_> = (0..7)
            .map(|_| (IPPROTO_DSTOPTS, vec![0, 0, 0, 0, 0, 0, 0, 0]))
            .collect();
        assert_eq!(
            parse(&ipv6_frame(&many, &l4), Direction::Ingress),
            Frame::Other
        );
        // ESP: the rest is encrypted.
        assert_eq!(
            parse(&ipv6_frame(&[(50, vec![0; 8])], &l4), Direction::Ingress),
            Frame::Other
        );
    }

    #[test]
    fn truncated_headers_are_not_ours_or_malformed() {
        let f = ipv4_frame(PEER_PORT, PORT, &transport(1, 1, 0));
        // Cut inside the IP or UDP header: the ports cannot be known.
        for cut in [10, 13, 20, 33, 40] {
            assert_eq!(
                parse(&f[..cut], Direction::Ingress),
                Frame::Other,
                "cut {cut}"
            );
        }
        // Cut inside the payload: the UDP length no longer fits.
        assert!(datagram(&f[..f.len() - 1], Direction::Ingress).malformed);
        // A UDP length below the header's own size.
        let mut bad = f.clone();
        bad[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&4u16.to_be_bytes());
        assert!(datagram(&bad, Direction::Ingress).malformed);
    }

    #[test]
    fn classify_by_type_and_exact_size() {
        let h = |kind: u32, len: usize| {
            let m = handshake(kind, len.max(16), 0x0102_0304);
            classify(m[..16].try_into().unwrap(), len as u32)
        };
        assert_eq!(
            h(1, 148),
            Message::Initiation {
                sender: 0x0102_0304
            }
        );
        assert_eq!(
            h(2, 92),
            Message::Response {
                sender: 0x0102_0304
            }
        );
        assert_eq!(h(3, 64), Message::CookieReply);
        for (kind, len) in [
            (1, 147),
            (1, 149),
            (2, 91),
            (2, 148),
            (3, 63),
            (3, 80),
            (5, 148),
            (0, 148),
        ] {
            assert_eq!(h(kind, len), Message::Malformed, "type {kind} len {len}");
        }
        let t = |len: u32| classify(transport(9, 3, 0)[..16].try_into().unwrap(), len);
        assert_eq!(
            t(32),
            Message::Transport {
                receiver: 9,
                counter: 3,
                keepalive: true
            }
        );
        assert!(matches!(
            t(48),
            Message::Transport {
                keepalive: false,
                ..
            }
        ));
        assert!(matches!(t(1440), Message::Transport { .. }));
        for len in [16, 31, 33, 40, 47] {
            assert_eq!(t(len), Message::Malformed, "len {len}");
        }
        // Reserved bytes must be zero.
        let mut m = transport(9, 3, 0);
        m[2] = 1;
        assert_eq!(
            classify(m[..16].try_into().unwrap(), 32),
            Message::Malformed
        );
    }

    #[test]
    fn short_messages_are_malformed() {
        let f = ipv4_frame(PEER_PORT, PORT, &[4, 0, 0, 0, 1, 0]);
        let d = datagram(&f, Direction::Ingress);
        assert_eq!(
            read_message(&f[..], d.payload_offset, d.payload_len),
            Message::Malformed
        );
    }

    #[test]
    fn counters_use_all_64_bits() {
        let m = transport(0xdead_beef, u64::MAX - 1, 0);
        assert_eq!(
            classify(m[..16].try_into().unwrap(), 32),
            Message::Transport {
                receiver: 0xdead_beef,
                counter: u64::MAX - 1,
                keepalive: true
            }
        );
    }

    #[test]
    fn segments_of_gso_packets() {
        assert_eq!(
            Segments::of(48, 0, 0),
            Some(Segments {
                count: 1,
                size: 48,
                last: 48
            })
        );
        assert_eq!(
            Segments::of(48 * 3 + 32, 4, 48),
            Some(Segments {
                count: 4,
                size: 48,
                last: 32
            })
        );
        assert_eq!(
            Segments::of(48 * 4, 4, 48),
            Some(Segments {
                count: 4,
                size: 48,
                last: 48
            })
        );
        assert_eq!(Segments::of(48 * 3, 4, 48), None);
        assert_eq!(Segments::of(48 * 4 + 1, 4, 48), None);
        assert_eq!(Segments::of(10, u32::MAX, u32::MAX), None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A WireGuard transport message inside a frame built from parts chosen at random:
        /// up to two VLAN tags, IPv4 with options or IPv6 with extension headers, and which
        /// side the WireGuard port is on.
        #[derive(Clone, Debug)]
        struct Built {
            frame: Vec<u8>,
            remote: EndpointKey,
            direction: Direction,
            receiver: u32,
            counter: u64,
            message_len: u32,
        }

        fn extension() -> impl Strategy<Value = (u8, Vec<u8>)> {
            prop_oneof![
                (0u8..3).prop_map(|n| (IPPROTO_HOPOPTS, n)),
                (0u8..3).prop_map(|n| (IPPROTO_DSTOPTS, n)),
                (0u8..3).prop_map(|n| (IPPROTO_ROUTING, n)),
                (1u8..4).prop_map(|n| (IPPROTO_AH, n)),
            ]
            .prop_map(|(kind, n)| {
                // Hop-by-hop, destination and routing headers count 8-byte units beyond the
                // first; AH counts 4-byte units beyond the first two.
                let (len_field, bytes) = if kind == IPPROTO_AH {
                    (n * 2, (usize::from(n) * 2 + 2) * 4)
                } else {
                    (n, (usize::from(n) + 1) * 8)
                };
                let mut b = vec![0, len_field];
                b.resize(bytes, 0);
                (kind, b)
            })
        }

        fn built() -> impl Strategy<Value = Built> {
            (
                0usize..=2,
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 0..=10).prop_map(|mut o| {
                    o.resize(o.len() / 4 * 4, 1);
                    o
                }),
                proptest::collection::vec(extension(), 0..=5),
                any::<bool>(),
                any::<u32>(),
                any::<u64>(),
                0usize..8,
            )
                .prop_map(
                    |(tags, v6, options, exts, egress, receiver, counter, blocks)| {
                        let payload = transport(receiver, counter, blocks * 16);
                        let message_len = payload.len() as u32;
                        let direction = if egress {
                            Direction::Egress
                        } else {
                            Direction::Ingress
                        };
                        let (sport, dport) = if egress {
                            (PORT, PEER_PORT)
                        } else {
                            (PEER_PORT, PORT)
                        };
                        let l4 = udp(sport, dport, &payload);
                        let (mut frame, remote) = if v6 {
                            let addr = if egress { DST6 } else { SRC6 };
                            (ipv6_frame(&exts, &l4), EndpointKey::v6(addr, PEER_PORT))
                        } else {
                            let mut f = eth(ETH_P_IP);
                            f.extend(ipv4_with(&options, 0, &l4));
                            let addr = if egress { DST4 } else { SRC4 };
                            (f, EndpointKey::v4(addr, PEER_PORT))
                        };
                        let vlan: &[u8] = match tags {
                            0 => &[],
                            1 => &[0x81, 0x00, 0, 20],
                            _ => &[0x88, 0xa8, 0, 10, 0x81, 0x00, 0, 20],
                        };
                        frame.splice(12..12, vlan.iter().copied());
                        Built {
                            frame,
                            remote,
                            direction,
                            receiver,
                            counter,
                            message_len,
                        }
                    },
                )
        }

        /// What every frame must satisfy: no panic, and a datagram said well formed lies
        /// inside the packet.
        fn sound(frame: &[u8], direction: Direction) -> Result<(), TestCaseError> {
            if let Frame::WireGuardPort(d) = parse(frame, direction) {
                let _ = read_message(frame, d.payload_offset, d.payload_len);
                if !d.malformed {
                    let end = u64::from(d.payload_offset) + u64::from(d.payload_len);
                    prop_assert!(
                        end <= frame.len() as u64,
                        "{:?} in {} bytes",
                        d,
                        frame.len()
                    );
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(10_000))]

            #[test]
            fn any_bytes_are_sound(
                frame in proptest::collection::vec(any::<u8>(), 0..160),
                egress: bool,
            ) {
                let direction = if egress { Direction::Egress } else { Direction::Ingress };
                sound(&frame, direction)?;
            }

            #[test]
            fn every_built_frame_yields_its_message(b in built()) {
                let d = match parse(&b.frame, b.direction) {
                    Frame::WireGuardPort(d) => d,
                    Frame::Other => return Err(TestCaseError::fail(format!("not found: {b:?}"))),
                };
                prop_assert!(!d.malformed);
                prop_assert_eq!(d.remote, b.remote);
                prop_assert_eq!(d.payload_len, b.message_len);
                prop_assert_eq!(
                    read_message(&b.frame[..], d.payload_offset, d.payload_len),
                    Message::Transport {
                        receiver: b.receiver,
                        counter: b.counter,
                        keepalive: b.message_len == KEEPALIVE_LEN,
                    }
                );
            }

            #[test]
            fn a_built_frame_with_any_byte_changed_or_cut_is_sound(
                b in built(),
                at in any::<proptest::sample::Index>(),
                byte: u8,
                cut in any::<proptest::sample::Index>(),
            ) {
                let mut frame = b.frame.clone();
                let i = at.index(frame.len());
                frame[i] = byte;
                sound(&frame, b.direction)?;
                sound(&b.frame[..cut.index(b.frame.len())], b.direction)?;
            }

            #[test]
            fn segments_add_up_to_the_datagram(len: u32, segs in 0u32..80, size in 0u32..2000) {
                if let Some(s) = Segments::of(len, segs, size) {
                    prop_assert!(s.count >= 1 && s.last <= s.size.max(s.last));
                    let total = u64::from(s.count - 1) * u64::from(s.size) + u64::from(s.last);
                    prop_assert_eq!(total, u64::from(len));
                    if s.count > 1 {
                        prop_assert!(s.last >= 1 && s.last <= s.size);
                    }
                }
            }
        }
    }
}
