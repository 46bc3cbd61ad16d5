//! The `clsact` qdisc requests aya does not offer: counting the tc filters on an interface
//! and deleting the qdisc, over the same rtnetlink stack as the route lookups.

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP};
use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::source::netlink::{NetlinkError, NetlinkSocket};

/// A route netlink socket for the qdisc and filter requests of one interface.
pub(super) struct ClsactNetlink {
    socket: NetlinkSocket,
}

impl ClsactNetlink {
    /// Opens the socket in the calling thread's network namespace.
    pub(super) fn open() -> Result<Self, NetlinkError> {
        Ok(Self {
            socket: NetlinkSocket::open(NETLINK_ROUTE)?,
        })
    }

    /// The tc filters attached to the `clsact` qdisc of `ifindex`, both directions.
    pub(super) fn filter_count(&mut self, ifindex: u32) -> Result<usize, NetlinkError> {
        let mut count = 0;
        for minor in [TcHandle::MIN_INGRESS, TcHandle::MIN_EGRESS] {
            let replies = self
                .socket
                .dump(filter_dump(ifindex, minor), "the tc filter dump")?;
            let new_filter = new_filter_type();
            count += replies
                .iter()
                .filter(|m| message_type(&m.bytes) == Some(new_filter))
                .count();
        }
        Ok(count)
    }

    /// Deletes the `clsact` qdisc of `ifindex`.
    pub(super) fn delete_clsact(&mut self, ifindex: u32) -> Result<(), NetlinkError> {
        self.socket
            .request(delete_clsact(ifindex), "deleting the clsact qdisc")
            .map(drop)
    }
}

fn tc_message(ifindex: u32, handle: TcHandle, parent: TcHandle) -> TcMessage {
    let mut message = TcMessage::with_index(ifindex as i32);
    message.header.handle = handle;
    message.header.parent = parent;
    message
}

/// `tc filter show dev IFINDEX ingress|egress`, as a request.
fn filter_dump(ifindex: u32, parent_minor: u16) -> NetlinkMessage<RouteNetlinkMessage> {
    let parent = TcHandle {
        major: u16::MAX,
        minor: parent_minor,
    };
    request(
        NLM_F_DUMP,
        RouteNetlinkMessage::GetTrafficFilter(tc_message(ifindex, TcHandle::UNSPEC, parent)),
    )
}

/// `tc qdisc del dev IFINDEX clsact`, as a request.
fn delete_clsact(ifindex: u32) -> NetlinkMessage<RouteNetlinkMessage> {
    let handle = TcHandle {
        major: u16::MAX,
        minor: 0,
    };
    let mut message = tc_message(ifindex, handle, TcHandle::CLSACT);
    message
        .attributes
        .push(TcAttribute::Kind("clsact".to_owned()));
    request(NLM_F_ACK, RouteNetlinkMessage::DelQueueDiscipline(message))
}

fn request(flags: u16, payload: RouteNetlinkMessage) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut header = NetlinkHeader::default();
    header.flags = flags | netlink_packet_core::NLM_F_REQUEST;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
    // Sets the message type from the payload, and the length.
    message.finalize();
    message
}

/// The type of the messages a filter dump answers with.
fn new_filter_type() -> u16 {
    RouteNetlinkMessage::NewTrafficFilter(TcMessage::default()).message_type()
}

fn message_type(bytes: &[u8]) -> Option<u16> {
    netlink_packet_core::NetlinkBuffer::new_checked(bytes)
        .ok()
        .map(|b| b.message_type())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(mut message: NetlinkMessage<RouteNetlinkMessage>) -> Vec<u8> {
        message.finalize();
        let mut out = vec![0; message.buffer_len()];
        message.serialize(&mut out);
        out
    }

    // The layouts below are those of <linux/rtnetlink.h> and <linux/pkt_sched.h>, written
    // out by hand: the encoder is checked against the kernel's ABI, not against itself.
    #[test]
    fn deleting_clsact_is_rtm_delqdisc_with_its_handle_parent_and_kind() {
        let msg = bytes(delete_clsact(7));
        assert_eq!(msg.len(), 16 + 20 + 4 + 8);
        let u16_at = |i: usize| u16::from_ne_bytes(msg[i..i + 2].try_into().unwrap());
        let u32_at = |i: usize| u32::from_ne_bytes(msg[i..i + 4].try_into().unwrap());
        assert_eq!(u32_at(0) as usize, msg.len());
        assert_eq!(u16_at(4), 37, "RTM_DELQDISC");
        assert_eq!(u16_at(6), 0x1 | 0x4, "NLM_F_REQUEST | NLM_F_ACK");
        assert_eq!(u32_at(20), 7, "ifindex");
        assert_eq!(u32_at(24), 0xFFFF_0000, "handle ffff:");
        assert_eq!(u32_at(28), 0xFFFF_FFF1, "parent TC_H_CLSACT");
        assert_eq!((u16_at(36), u16_at(38)), (4 + 7, 1), "TCA_KIND");
        assert_eq!(&msg[40..47], b"clsact\0");
    }

    #[test]
    fn the_filter_dump_asks_for_one_direction_of_one_interface() {
        let msg = bytes(filter_dump(3, TcHandle::MIN_EGRESS));
        let u16_at = |i: usize| u16::from_ne_bytes(msg[i..i + 2].try_into().unwrap());
        let u32_at = |i: usize| u32::from_ne_bytes(msg[i..i + 4].try_into().unwrap());
        assert_eq!(msg.len(), 16 + 20);
        assert_eq!(u16_at(4), 46, "RTM_GETTFILTER");
        assert_eq!(u16_at(6), 0x1 | 0x300, "NLM_F_REQUEST | NLM_F_DUMP");
        assert_eq!(u32_at(20), 3);
        assert_eq!(u32_at(28), 0xFFFF_FFF3, "TC_H_CLSACT egress");
        assert_eq!(new_filter_type(), 44, "RTM_NEWTFILTER");
    }
}
