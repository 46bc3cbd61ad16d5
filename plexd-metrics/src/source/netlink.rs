//! A blocking netlink request/reply exchange, shared by the WireGuard device reader (generic
//! netlink) and the underlay route lookup (rtnetlink).
//!
//! The rust-netlink crates encode and decode the messages; what they leave to their async
//! `netlink-proto` runtime (matching replies to a request, reassembling a multi-part dump,
//! noticing an interrupted dump) is done here in a few lines, so that a read is one plain
//! function call that a blocking thread can make.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkSerializable, NLMSG_DONE, NLMSG_ERROR,
    NLMSG_NOOP, NLMSG_OVERRUN, NLM_F_DUMP_INTR, NLM_F_MULTIPART,
};
use netlink_sys::{Socket, SocketAddr};

/// How long one reply may take before the read gives up; the kernel answers in microseconds,
/// so this only matters when something is badly wrong.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a dump that the kernel reports as interrupted (the object changed while it was
/// being dumped) is started again before giving up.
pub(crate) const DUMP_ATTEMPTS: u32 = 5;

/// Why a netlink exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket could not be opened or used.
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    /// The kernel answered with an error code.
    #[error("the kernel refused {request}: {source}")]
    Kernel {
        /// What was asked.
        request: &'static str,
        /// The kernel's errno.
        source: io::Error,
    },
    /// A reply could not be decoded.
    #[error("cannot decode the kernel's answer to {request}: {message}")]
    Decode {
        /// What was asked.
        request: &'static str,
        /// What was wrong with the bytes.
        message: String,
    },
    /// The answer stopped before its end (a dump without `NLMSG_DONE`).
    #[error(
        "the kernel's answer to {request} stopped before its end: nothing more within {REPLY_TIMEOUT:?}"
    )]
    CutShort {
        /// What was asked.
        request: &'static str,
    },
    /// The object kept changing while it was dumped, every time.
    #[error("the kernel's dump of {request} was interrupted {DUMP_ATTEMPTS} times in a row")]
    Interrupted {
        /// What was asked.
        request: &'static str,
    },
}

impl NetlinkError {
    /// The errno of a [`NetlinkError::Kernel`] answer.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// One reply message, undecoded: the caller knows which payload type to expect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RawMessage {
    /// The header's flags (`NLM_F_*`).
    pub flags: u16,
    /// The whole message, header included, ready for `NetlinkMessage::deserialize`.
    pub bytes: Vec<u8>,
}

/// What one datagram of a reply held.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Datagram {
    /// Payload messages, in order.
    pub messages: Vec<RawMessage>,
    /// The reply is complete: `NLMSG_DONE`, an acknowledgement, or a single-part answer.
    pub done: bool,
}

/// Splits one received datagram into messages belonging to request `seq`.
///
/// Messages of other sequence numbers (left over from an earlier, abandoned request) are
/// skipped. An error message fails the whole exchange with the kernel's errno.
pub(crate) fn split_datagram(
    datagram: &[u8],
    seq: u32,
    request: &'static str,
) -> Result<Datagram, NetlinkError> {
    let decode = |message: String| NetlinkError::Decode { request, message };
    let mut out = Datagram::default();
    let mut rest = datagram;
    while !rest.is_empty() {
        let buffer = NetlinkBuffer::new_checked(rest).map_err(|e| decode(e.to_string()))?;
        let len = buffer.length() as usize;
        let (kind, flags, msg_seq) = (
            buffer.message_type(),
            buffer.flags(),
            buffer.sequence_number(),
        );
        let message = &rest[..len];
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        if msg_seq != seq {
            continue;
        }
        match kind {
            NLMSG_NOOP => {}
            NLMSG_DONE => out.done = true,
            NLMSG_OVERRUN => return Err(decode("the kernel reported an overrun".into())),
            NLMSG_ERROR => {
                let payload = NetlinkBuffer::new(message).payload();
                let code = payload
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or_else(|| decode("short error message".into()))?;
                if code == 0 {
                    // An acknowledgement ends a request that asked for one.
                    out.done = true;
                } else {
                    return Err(NetlinkError::Kernel {
                        request,
                        source: io::Error::from_raw_os_error(code.saturating_abs()),
                    });
                }
            }
            _ => {
                // Only parts of a multi-part answer are followed by more.
                if flags & NLM_F_MULTIPART == 0 {
                    out.done = true;
                }
                out.messages.push(RawMessage {
                    flags,
                    bytes: message.to_vec(),
                });
            }
        }
    }
    Ok(out)
}

/// A netlink socket for one request at a time, in the calling thread's network namespace.
pub(crate) struct NetlinkSocket {
    socket: Socket,
    seq: u32,
}

impl NetlinkSocket {
    /// Opens and binds a socket of `protocol` (`netlink_sys::protocols::*`).
    pub(crate) fn open(protocol: isize) -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        set_receive_timeout(&socket, REPLY_TIMEOUT)?;
        Ok(Self { socket, seq: 0 })
    }

    /// Sends `message` (its sequence number is set here) and returns every reply message up
    /// to the end of the answer.
    pub(crate) fn request<I: NetlinkSerializable>(
        &mut self,
        mut message: NetlinkMessage<I>,
        request: &'static str,
    ) -> Result<Vec<RawMessage>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        message.header.sequence_number = self.seq;
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        let mut messages = Vec::new();
        loop {
            let (datagram, _) = self.socket.recv_from_full().map_err(|e| {
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    NetlinkError::CutShort { request }
                } else {
                    NetlinkError::Io(e)
                }
            })?;
            let part = split_datagram(&datagram, self.seq, request)?;
            messages.extend(part.messages);
            if part.done {
                return Ok(messages);
            }
        }
    }

    /// Like [`NetlinkSocket::request`] for a dump, started again while the kernel marks it
    /// interrupted, so that the caller gets one consistent picture.
    pub(crate) fn dump<I: NetlinkSerializable + Clone>(
        &mut self,
        message: NetlinkMessage<I>,
        request: &'static str,
    ) -> Result<Vec<RawMessage>, NetlinkError> {
        for _ in 0..DUMP_ATTEMPTS {
            let messages = self.request(message.clone(), request)?;
            if messages.iter().all(|m| m.flags & NLM_F_DUMP_INTR == 0) {
                return Ok(messages);
            }
        }
        Err(NetlinkError::Interrupted { request })
    }
}

/// A request header with `flags` (`NLM_F_REQUEST` is added) and message type `kind`.
pub(crate) fn header(kind: u16, flags: u16) -> NetlinkHeader {
    let mut header = NetlinkHeader::default();
    header.message_type = kind;
    header.flags = flags | netlink_packet_core::NLM_F_REQUEST;
    header
}

fn set_receive_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    // SAFETY: setsockopt reads a valid, initialised timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A netlink message as the kernel writes it: header, then `payload`, padded to 4 bytes.
    pub(crate) fn message(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = 16 + payload.len();
        let mut m = Vec::with_capacity(len.next_multiple_of(4));
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&4242u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(len.next_multiple_of(4), 0);
        m
    }

    fn error(seq: u32, code: i32) -> Vec<u8> {
        // nlmsgerr: the code, then the request's header.
        let mut payload = code.to_ne_bytes().to_vec();
        payload.extend_from_slice(&[0; 16]);
        message(NLMSG_ERROR, 0, seq, &payload)
    }

    #[test]
    fn a_multipart_dump_runs_until_done() {
        let mut first = message(0x20, NLM_F_MULTIPART, 7, b"one!");
        first.extend(message(0x20, NLM_F_MULTIPART, 7, b"two!"));
        let part = split_datagram(&first, 7, "test").unwrap();
        assert_eq!(part.messages.len(), 2);
        assert!(!part.done, "a dump goes on until NLMSG_DONE");
        assert_eq!(&part.messages[1].bytes[16..], b"two!");

        let last = message(NLMSG_DONE, NLM_F_MULTIPART, 7, &0i32.to_ne_bytes());
        let part = split_datagram(&last, 7, "test").unwrap();
        assert!(part.done);
        assert!(part.messages.is_empty());
    }

    #[test]
    fn a_single_answer_and_an_ack_each_end_the_request() {
        let part = split_datagram(&message(0x20, 0, 3, b"only"), 3, "test").unwrap();
        assert!(part.done);
        assert_eq!(part.messages.len(), 1);
        let part = split_datagram(&error(3, 0), 3, "test").unwrap();
        assert!(part.done);
        assert!(part.messages.is_empty());
    }

    #[test]
    fn an_error_carries_the_errno_and_the_request() {
        let err =
            split_datagram(&error(9, -libc::EPERM), 9, "the WireGuard device dump").unwrap_err();
        assert_eq!(err.errno(), Some(libc::EPERM));
        assert!(
            err.to_string()
                .starts_with("the kernel refused the WireGuard device dump: "),
            "{err}"
        );
    }

    #[test]
    fn stale_replies_of_other_requests_are_skipped() {
        let mut datagram = error(1, -libc::ENOENT);
        datagram.extend(message(0x20, 0, 2, b"mine"));
        let part = split_datagram(&datagram, 2, "test").unwrap();
        assert_eq!(part.messages.len(), 1);
        assert!(part.done);
    }

    use proptest::prelude::*;

    /// A dump's datagram: `parts` payload messages of request `seq`, then `NLMSG_DONE`.
    fn dump(seq: u32, parts: &[Vec<u8>]) -> Vec<u8> {
        let mut datagram: Vec<u8> = parts
            .iter()
            .flat_map(|p| message(0x20, NLM_F_MULTIPART, seq, p))
            .collect();
        datagram.extend(message(
            NLMSG_DONE,
            NLM_F_MULTIPART,
            seq,
            &0i32.to_ne_bytes(),
        ));
        datagram
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4_000))]

        #[test]
        fn junk_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256), seq: u32) {
            let _ = split_datagram(&bytes, seq, "test");
        }

        #[test]
        fn a_dump_cut_anywhere_is_never_taken_as_complete(
            seq: u32,
            parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..5),
            cut in any::<proptest::sample::Index>(),
        ) {
            let whole = dump(seq, &parts);
            let complete = split_datagram(&whole, seq, "test").unwrap();
            prop_assert!(complete.done);
            prop_assert_eq!(complete.messages.len(), parts.len());
            // Anything short of the whole: an error, or a part that waits for more.
            let cut = cut.index(whole.len());
            if let Ok(part) = split_datagram(&whole[..cut], seq, "test") {
                prop_assert!(!part.done, "cut at {} of {}", cut, whole.len());
            }
        }

        #[test]
        fn a_changed_byte_never_panics(
            parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..4),
            at in any::<proptest::sample::Index>(),
            byte: u8,
        ) {
            let mut datagram = dump(1, &parts);
            let i = at.index(datagram.len());
            datagram[i] = byte;
            let _ = split_datagram(&datagram, 1, "test");
        }
    }

    #[test]
    fn truncated_messages_are_decode_errors() {
        let mut m = message(0x20, 0, 1, b"payload!");
        m.truncate(20);
        assert!(matches!(
            split_datagram(&m, 1, "test"),
            Err(NetlinkError::Decode { .. })
        ));
    }
}
