//! The ICMP and ICMPv6 echo codec, and the table that matches answers to probes.
//!
//! A probe's payload carries a stamp (a per-pinger cookie, a serial number and the send
//! time) that the reply brings back, so that a reply is taken only by the probe that caused
//! it: the sequence number alone wraps, and on raw sockets every pinger of the host sees
//! every reply.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

/// Bytes after the 8-byte ICMP header, as `ping` and `fping` send by default.
pub const PAYLOAD_LEN: usize = 56;
/// An echo request: the ICMP header and the payload.
pub const PACKET_LEN: usize = 8 + PAYLOAD_LEN;
/// Payload bytes that identify a probe: cookie, serial, send time.
pub const STAMP_LEN: usize = 24;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PACKET_TOO_BIG: u8 = 2;
const ICMP6_TIME_EXCEEDED: u8 = 3;
const ICMP6_PARAMETER_PROBLEM: u8 = 4;
const ICMP6_ECHO_REQUEST: u8 = 128;
const ICMP6_ECHO_REPLY: u8 = 129;
/// `IPPROTO_ICMP` and `IPPROTO_ICMPV6`, as a quoted IP header names them.
const PROTOCOL_ICMP: u8 = 1;
const PROTOCOL_ICMPV6: u8 = 58;

/// IPv4 or IPv6, with what differs between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// ICMP over IPv4.
    V4,
    /// ICMPv6.
    V6,
}

impl Family {
    /// `ICMP` or `ICMPv6`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "ICMP",
            Family::V6 => "ICMPv6",
        }
    }

    /// The family of a destination.
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    fn echo_request(self) -> u8 {
        match self {
            Family::V4 => ICMP_ECHO_REQUEST,
            Family::V6 => ICMP6_ECHO_REQUEST,
        }
    }

    fn echo_reply(self) -> u8 {
        match self {
            Family::V4 => ICMP_ECHO_REPLY,
            Family::V6 => ICMP6_ECHO_REPLY,
        }
    }

    /// The receive filter of a raw socket: a set bit blocks that type. Raw sockets get a
    /// copy of every ICMP message; the kernel drops the types a pinger has no use for
    /// before they cost a wake-up. IPv4's filter is one word, IPv6's eight.
    pub fn raw_filter(self) -> [u32; 8] {
        let wanted: &[u8] = match self {
            Family::V4 => &[
                ICMP_ECHO_REPLY,
                ICMP_DEST_UNREACH,
                ICMP_TIME_EXCEEDED,
                ICMP_PARAMETER_PROBLEM,
            ],
            Family::V6 => &[
                ICMP6_DEST_UNREACH,
                ICMP6_PACKET_TOO_BIG,
                ICMP6_TIME_EXCEEDED,
                ICMP6_PARAMETER_PROBLEM,
                ICMP6_ECHO_REPLY,
            ],
        };
        let mut block = [u32::MAX; 8];
        for &t in wanted {
            block[usize::from(t) / 32] &= !(1u32 << (t % 32));
        }
        block
    }
}

/// What a probe's payload carries, and its reply brings back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// The pinger's cookie.
    pub cookie: u64,
    /// The probe's serial number.
    pub serial: u64,
    /// When it was sent (CLOCK_REALTIME, nanoseconds).
    pub sent_ns: i64,
}

impl Stamp {
    /// The stamp at the start of `payload`, if it is long enough to hold one.
    pub fn parse(payload: &[u8]) -> Option<Self> {
        let u = |i: usize| {
            payload
                .get(i..i + 8)
                .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
        };
        Some(Self {
            cookie: u(0)?,
            serial: u(8)?,
            sent_ns: u(16)? as i64,
        })
    }
}

/// An echo request with identifier `ident` (datagram sockets put their own), sequence
/// number `seq` and the stamp's cookie and serial; the send time and, for raw IPv4, the
/// checksum are filled in by [`set_send_time`] right before sending.
pub fn echo_request(
    family: Family,
    ident: u16,
    seq: u16,
    cookie: u64,
    serial: u64,
) -> [u8; PACKET_LEN] {
    let mut p = [0u8; PACKET_LEN];
    p[0] = family.echo_request();
    p[4..6].copy_from_slice(&ident.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(&cookie.to_be_bytes());
    p[16..24].copy_from_slice(&serial.to_be_bytes());
    for (i, b) in p[8 + STAMP_LEN..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

/// Writes the send time into the stamp, and the checksum when the sender must (raw IPv4
/// sockets; the kernel fills it in for datagram sockets and for ICMPv6).
pub fn set_send_time(packet: &mut [u8; PACKET_LEN], sent_ns: i64, with_checksum: bool) {
    packet[24..32].copy_from_slice(&sent_ns.to_be_bytes());
    if with_checksum {
        packet[2..4].fill(0);
        let sum = checksum(packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
    }
}

/// The Internet checksum (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The ICMP message in what a raw IPv4 socket received, which starts with the IP header;
/// `None` when the header is malformed.
pub fn strip_ipv4_header(datagram: &[u8]) -> Option<&[u8]> {
    let header = usize::from(datagram.first()? & 0x0f) * 4;
    (header >= 20 && datagram.len() > header).then(|| &datagram[header..])
}

/// The echo request an ICMP error quotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotedRequest<'a> {
    /// Its destination.
    pub to: IpAddr,
    /// Its identifier.
    pub ident: u16,
    /// Its sequence number.
    pub seq: u16,
    /// As much of its payload as was quoted.
    pub payload: &'a [u8],
}

/// What an ICMP message is to a pinger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// An echo reply.
    Reply {
        /// Its identifier.
        ident: u16,
        /// Its sequence number.
        seq: u16,
        /// Its payload, which should start with a [`Stamp`].
        payload: &'a [u8],
    },
    /// An error about one of this family's echo requests.
    Error {
        /// ICMP(v6) type.
        icmp_type: u8,
        /// ICMP(v6) code.
        code: u8,
        /// The request it is about.
        request: QuotedRequest<'a>,
    },
    /// Anything else: too short, or an error about another kind of packet.
    Other,
}

/// Reads an ICMP message of `family` (the ICMP header first).
pub fn parse_message(family: Family, icmp: &[u8]) -> Message<'_> {
    if icmp.len() < 8 {
        return Message::Other;
    }
    let (ty, code) = (icmp[0], icmp[1]);
    if ty == family.echo_reply() {
        return Message::Reply {
            ident: u16::from_be_bytes([icmp[4], icmp[5]]),
            seq: u16::from_be_bytes([icmp[6], icmp[7]]),
            payload: &icmp[8..],
        };
    }
    match quoted_request(family, &icmp[8..]) {
        Some(request) => Message::Error {
            icmp_type: ty,
            code,
            request,
        },
        None => Message::Other,
    }
}

/// Finds an echo request inside the quoted packet of an ICMP error.
pub fn quoted_request(family: Family, quoted: &[u8]) -> Option<QuotedRequest<'_>> {
    let (to, inner) = match family {
        Family::V4 => {
            let header = usize::from(*quoted.first()? & 0x0f) * 4;
            if header < 20 || quoted.len() < header + 8 || quoted[9] != PROTOCOL_ICMP {
                return None;
            }
            let to: [u8; 4] = quoted[16..20].try_into().ok()?;
            (IpAddr::V4(Ipv4Addr::from(to)), &quoted[header..])
        }
        Family::V6 => {
            // Extension headers never precede the pinger's ICMPv6 requests.
            if quoted.len() < 48 || quoted[6] != PROTOCOL_ICMPV6 {
                return None;
            }
            let to: [u8; 16] = quoted[24..40].try_into().ok()?;
            (IpAddr::V6(Ipv6Addr::from(to)), &quoted[40..])
        }
    };
    if inner[0] != family.echo_request() {
        return None;
    }
    Some(QuotedRequest {
        to,
        ident: u16::from_be_bytes([inner[4], inner[5]]),
        seq: u16::from_be_bytes([inner[6], inner[7]]),
        payload: &inner[8..],
    })
}

/// An ICMP error's type and code in words.
pub fn describe_error(family: Family, ty: u8, code: u8) -> &'static str {
    match (family, ty, code) {
        (Family::V4, ICMP_DEST_UNREACH, 0) => "network unreachable",
        (Family::V4, ICMP_DEST_UNREACH, 1) => "host unreachable",
        (Family::V4, ICMP_DEST_UNREACH, 2) => "protocol unreachable",
        (Family::V4, ICMP_DEST_UNREACH, 3) => "port unreachable",
        (Family::V4, ICMP_DEST_UNREACH, 4) => "fragmentation needed",
        (Family::V4, ICMP_DEST_UNREACH, 9 | 10 | 13) => "administratively prohibited",
        (Family::V4, ICMP_DEST_UNREACH, _) => "destination unreachable",
        (Family::V4, ICMP_TIME_EXCEEDED, _) => "time to live exceeded",
        (Family::V4, ICMP_PARAMETER_PROBLEM, _) => "parameter problem",
        (Family::V6, ICMP6_DEST_UNREACH, 0) => "no route to destination",
        (Family::V6, ICMP6_DEST_UNREACH, 1) => "administratively prohibited",
        (Family::V6, ICMP6_DEST_UNREACH, 3) => "address unreachable",
        (Family::V6, ICMP6_DEST_UNREACH, 4) => "port unreachable",
        (Family::V6, ICMP6_DEST_UNREACH, 5 | 6) => "rejected by policy",
        (Family::V6, ICMP6_DEST_UNREACH, _) => "destination unreachable",
        (Family::V6, ICMP6_PACKET_TOO_BIG, _) => "packet too big",
        (Family::V6, ICMP6_TIME_EXCEEDED, _) => "hop limit exceeded",
        (Family::V6, ICMP6_PARAMETER_PROBLEM, _) => "parameter problem",
        _ => "ICMP error",
    }
}

/// A probe's round trip: the kernel's receive time less the send time in the stamp (both
/// CLOCK_REALTIME). Should the clock have stepped in between, `elapsed`, the monotonic time
/// since the probe was registered (an upper bound), is used instead.
pub fn round_trip(received_ns: i64, sent_ns: i64, elapsed: Duration) -> Duration {
    match u64::try_from(received_ns.saturating_sub(sent_ns)) {
        Ok(n) if Duration::from_nanos(n) <= elapsed + Duration::from_millis(1) => {
            Duration::from_nanos(n)
        }
        _ => elapsed,
    }
}

/// A probe waiting for its answer.
#[derive(Debug)]
pub struct WaitingProbe<T> {
    /// Its serial number, which its stamp carries.
    pub serial: u64,
    /// Its destination.
    pub addr: IpAddr,
    /// When it was registered.
    pub registered: Instant,
    /// Where its outcome goes.
    pub reply_to: T,
}

/// What became of an answer.
#[derive(Debug)]
pub enum Matched<T> {
    /// It answers this probe, which is no longer waiting.
    Probe(WaitingProbe<T>),
    /// It answers a probe of this pinger that no longer waits: a duplicate, or a reply
    /// that came after its probe timed out.
    LateOrDuplicate,
    /// It is not an answer to this pinger: another pinger's, forged, or unrelated.
    Stray,
}

/// The probes of one socket waiting for an answer, by sequence number.
#[derive(Debug)]
pub struct ProbeTable<T> {
    cookie: u64,
    next_seq: u16,
    next_serial: u64,
    waiting: HashMap<u16, WaitingProbe<T>>,
}

impl<T> ProbeTable<T> {
    /// An empty table of a pinger with `cookie`, whose first sequence number is `first_seq`
    /// (random, so that two pingers on one host do not start in step).
    pub fn new(cookie: u64, first_seq: u16) -> Self {
        Self {
            cookie,
            next_seq: first_seq,
            next_serial: 1,
            waiting: HashMap::new(),
        }
    }

    /// Probes waiting right now.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether no probe waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Reserves a sequence number and a serial for a probe to `addr`; `Err` with the number
    /// in flight when every sequence number is taken.
    pub fn register(
        &mut self,
        addr: IpAddr,
        registered: Instant,
        reply_to: T,
    ) -> Result<(u16, u64), usize> {
        let in_flight = self.waiting.len();
        if in_flight >= usize::from(u16::MAX) {
            return Err(in_flight);
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        let mut seq = self.next_seq;
        while self.waiting.contains_key(&seq) {
            seq = seq.wrapping_add(1);
        }
        self.next_seq = seq.wrapping_add(1);
        self.waiting.insert(
            seq,
            WaitingProbe {
                serial,
                addr,
                registered,
                reply_to,
            },
        );
        Ok((seq, serial))
    }

    /// Removes a probe that ended without an answer (timeout, send error, cancellation),
    /// unless its sequence number went to a later probe meanwhile.
    pub fn forget(&mut self, seq: u16, serial: u64) {
        if self.waiting.get(&seq).is_some_and(|w| w.serial == serial) {
            self.waiting.remove(&seq);
        }
    }

    /// Takes the probe an echo reply from `from` answers. `ours` says whether the reply's
    /// identifier is this socket's (always, on datagram sockets).
    pub fn take_reply(&mut self, ours: bool, from: IpAddr, seq: u16, payload: &[u8]) -> Matched<T> {
        let Some(stamp) = Stamp::parse(payload) else {
            return Matched::Stray;
        };
        if !ours || stamp.cookie != self.cookie {
            return Matched::Stray;
        }
        match self.waiting.get(&seq) {
            Some(w) if w.serial == stamp.serial && w.addr == from => {
                Matched::Probe(self.waiting.remove(&seq).expect("present"))
            }
            _ => Matched::LateOrDuplicate,
        }
    }

    /// Takes the probe an ICMP error about `request` ends. `ours` as for
    /// [`ProbeTable::take_reply`]. A quote too short to hold the stamp is matched by
    /// destination and sequence number alone.
    pub fn take_error(&mut self, ours: bool, request: &QuotedRequest<'_>) -> Matched<T> {
        if !ours {
            return Matched::Stray;
        }
        let stamp = Stamp::parse(request.payload);
        match self.waiting.get(&request.seq) {
            Some(w)
                if w.addr == request.to
                    && stamp.is_none_or(|s| s.cookie == self.cookie && s.serial == w.serial) =>
            {
                Matched::Probe(self.waiting.remove(&request.seq).expect("present"))
            }
            _ => Matched::Stray,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn checksum_matches_rfc_1071_example() {
        // RFC 1071's example words sum to 0xddf2; the checksum is its complement.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data), !0xddf2);
        // A packet with its checksum filled in sums to zero.
        let mut p = [8u8, 0, 0, 0, 0x12, 0x34, 0, 1, 0xaa, 0xbb, 0xcc];
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&p), 0);
    }

    #[test]
    fn quoted_ipv4_request_is_found() {
        let mut q = vec![0x45, 0, 0, 84, 0, 0, 0x40, 0, 64, 1, 0, 0];
        q.extend([10, 0, 0, 1, 10, 77, 0, 5]);
        q.extend([ICMP_ECHO_REQUEST, 0, 0, 0, 0xbe, 0xef, 0x01, 0x02, 9, 9]);
        let r = quoted_request(Family::V4, &q).unwrap();
        assert_eq!(r.to, "10.77.0.5".parse::<IpAddr>().unwrap());
        assert_eq!((r.ident, r.seq, r.payload), (0xbeef, 0x0102, &[9u8, 9][..]));
        // A quoted UDP datagram is not ours.
        q[9] = 17;
        assert!(quoted_request(Family::V4, &q).is_none());
    }

    #[test]
    fn quoted_ipv6_request_is_found() {
        let mut q = vec![0x60, 0, 0, 0, 0, 64, 58, 64];
        q.extend("fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        q.extend("fd78::5".parse::<Ipv6Addr>().unwrap().octets());
        q.extend([ICMP6_ECHO_REQUEST, 0, 0, 0, 0x12, 0x34, 0xff, 0xfe]);
        let r = quoted_request(Family::V6, &q).unwrap();
        assert_eq!(r.to, "fd78::5".parse::<IpAddr>().unwrap());
        assert_eq!((r.ident, r.seq), (0x1234, 0xfffe));
        assert!(r.payload.is_empty());
        q[40] = ICMP6_ECHO_REPLY;
        assert!(quoted_request(Family::V6, &q).is_none());
    }

    #[test]
    fn error_texts_say_what_happened() {
        assert_eq!(describe_error(Family::V4, 3, 1), "host unreachable");
        assert_eq!(describe_error(Family::V4, 11, 0), "time to live exceeded");
        assert_eq!(describe_error(Family::V6, 1, 0), "no route to destination");
        assert_eq!(describe_error(Family::V6, 3, 0), "hop limit exceeded");
    }

    #[test]
    fn stamp_needs_the_whole_stamp() {
        let mut p = vec![0u8; STAMP_LEN];
        p[7] = 1;
        p[15] = 2;
        p[23] = 3;
        let stamp = Stamp {
            cookie: 1,
            serial: 2,
            sent_ns: 3,
        };
        assert_eq!(Stamp::parse(&p), Some(stamp));
        assert_eq!(Stamp::parse(&p[..STAMP_LEN - 1]), None);
    }

    #[test]
    fn raw_filters_let_through_replies_and_errors_only() {
        // <linux/icmp.h>: bit N set blocks type N.
        let v4 = Family::V4.raw_filter()[0];
        for t in [0, 3, 11, 12] {
            assert_eq!(v4 & (1 << t), 0, "type {t}");
        }
        assert_ne!(v4 & (1 << 8), 0, "echo requests are blocked");
        let v6 = Family::V6.raw_filter();
        assert_eq!(v6[129 / 32] & (1 << (129 % 32)), 0, "echo reply");
        assert_ne!(v6[128 / 32] & (1 << (128 % 32)), 0, "echo request");
    }

    #[test]
    fn a_clock_step_falls_back_to_the_monotonic_time() {
        let elapsed = Duration::from_millis(50);
        assert_eq!(
            round_trip(1_020_000_000, 1_000_000_000, elapsed),
            Duration::from_millis(20)
        );
        // Receive before send, or a round trip longer than the probe waited.
        assert_eq!(round_trip(1_000, 2_000, elapsed), elapsed);
        assert_eq!(round_trip(10_000_000_000, 0, elapsed), elapsed);
    }

    fn reply_to(request: &[u8; PACKET_LEN]) -> Vec<u8> {
        let mut reply = request.to_vec();
        reply[0] = ICMP_ECHO_REPLY;
        reply
    }

    #[test]
    fn a_reply_is_taken_once_by_its_probe_only() {
        let peer: IpAddr = "10.77.0.5".parse().unwrap();
        let mut table = ProbeTable::new(0xc0ffee, 65_535);
        let (seq, serial) = table.register(peer, Instant::now(), "first").unwrap();
        assert_eq!(seq, 65_535);
        let mut request = echo_request(Family::V4, 7, seq, 0xc0ffee, serial);
        set_send_time(&mut request, 5, true);
        assert_eq!(checksum(&request), 0);
        let reply = reply_to(&request);
        let Message::Reply {
            seq: s, payload, ..
        } = parse_message(Family::V4, &reply)
        else {
            panic!("not a reply");
        };
        // From another address, or another pinger's: not this probe's.
        let other: IpAddr = "10.77.0.6".parse().unwrap();
        assert!(matches!(
            table.take_reply(true, other, s, payload),
            Matched::LateOrDuplicate
        ));
        assert!(matches!(
            table.take_reply(false, peer, s, payload),
            Matched::Stray
        ));
        match table.take_reply(true, peer, s, payload) {
            Matched::Probe(p) => assert_eq!((p.reply_to, p.serial), ("first", serial)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            table.take_reply(true, peer, s, payload),
            Matched::LateOrDuplicate
        ));
        // The sequence numbers wrap, and a forgotten probe's number is free again.
        let (next, serial2) = table.register(peer, Instant::now(), "second").unwrap();
        assert_eq!(next, 0);
        table.forget(next, serial2);
        assert!(table.is_empty());
    }

    #[test]
    fn an_error_ends_the_probe_it_quotes() {
        let peer: IpAddr = "10.77.0.5".parse().unwrap();
        let mut table = ProbeTable::new(1, 100);
        let (seq, serial) = table.register(peer, Instant::now(), ()).unwrap();
        let request = echo_request(Family::V4, 9, seq, 1, serial);
        let mut error = vec![ICMP_DEST_UNREACH, 1, 0, 0, 0, 0, 0, 0];
        error.extend([
            0x45, 0, 0, 84, 0, 0, 0x40, 0, 64, 1, 0, 0, 10, 0, 0, 1, 10, 77, 0, 5,
        ]);
        error.extend(request);
        let Message::Error {
            icmp_type,
            code,
            request: quoted,
        } = parse_message(Family::V4, &error)
        else {
            panic!("not an error");
        };
        assert_eq!((icmp_type, code, quoted.ident), (3, 1, 9));
        assert!(matches!(table.take_error(true, &quoted), Matched::Probe(_)));
        assert!(matches!(table.take_error(true, &quoted), Matched::Stray));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8_000))]
        // Whatever arrives on the socket, parsing neither panics nor reads past the end.
        #[test]
        fn any_bytes_parse_without_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            for family in [Family::V4, Family::V6] {
                let _ = parse_message(family, &data);
                let _ = quoted_request(family, &data);
                let _ = strip_ipv4_header(&data);
            }
            let _ = Stamp::parse(&data);
        }

        #[test]
        fn requests_round_trip_through_a_quote(
            ident: u16, seq: u16, cookie: u64, serial: u64, sent_ns in 0i64..i64::MAX,
            to: [u8; 16],
        ) {
            let mut request = echo_request(Family::V6, ident, seq, cookie, serial);
            set_send_time(&mut request, sent_ns, false);
            let mut quote = vec![0x60, 0, 0, 0, 0, 64, PROTOCOL_ICMPV6, 64];
            quote.extend([0u8; 16]);
            quote.extend(to);
            quote.extend(request);
            let r = quoted_request(Family::V6, &quote).unwrap();
            prop_assert_eq!((r.to, r.ident, r.seq), (IpAddr::V6(Ipv6Addr::from(to)), ident, seq));
            prop_assert_eq!(Stamp::parse(r.payload), Some(Stamp { cookie, serial, sent_ns }));
        }
    }
}
