//! Bad peer input is rejected, counted and dropped: never a panic.

use gallocy_core::codec::DecodeError;
use gallocy_core::wire::{WIRE_MAGIC, WIRE_VERSION};
use gallocy_core::{Config, Envelope, Node, PageId, PeerMessage};

fn frame(from: u64, to: u64, message: PeerMessage) -> Vec<u8> {
    Envelope {
        from,
        from_incarnation: 1,
        to,
        to_incarnation: 1,
        message,
    }
    .encode()
}

#[test]
fn wrong_version_and_magic_are_named() {
    let mut bytes = frame(2, 1, PeerMessage::LeaseRequest { sent_tick: 3 });
    bytes[2] = WIRE_VERSION + 1;
    assert_eq!(
        Envelope::decode(&bytes),
        Err(DecodeError::UnsupportedVersion(WIRE_VERSION + 1))
    );
    bytes[2] = WIRE_VERSION;
    bytes[0..2].copy_from_slice(&(WIRE_MAGIC ^ 1).to_le_bytes());
    assert_eq!(Envelope::decode(&bytes), Err(DecodeError::BadMagic));
    assert_eq!(
        DecodeError::UnsupportedVersion(9).to_string(),
        "unsupported protocol version 9"
    );
}

#[test]
fn malformed_and_out_of_protocol_frames_are_counted_not_fatal() {
    let mut node = Node::new(Config::new(1, vec![1, 2, 3])).unwrap();
    // Garbage.
    assert!(node.handle_frame(1, b"not a frame").is_err());
    // Truncated grant.
    let page = PageId { space: 1, index: 0 };
    let grant = frame(
        2,
        1,
        PeerMessage::PageGrant {
            page,
            request_id: 1,
            seq: 1,
            mode: gallocy_core::Access::Write,
            version: 1,
            base_version: 0,
            bytes: Some(Box::new([7u8; 4096])),
        },
    );
    assert!(node.handle_frame(2, &grant[..grant.len() - 1]).is_err());
    // Well-formed but nonsense: a grant nobody asked for, from a non-member, to
    // someone else, a raft message that is not protobuf.
    assert!(node.handle_frame(3, &grant).is_ok());
    assert!(node
        .handle_frame(4, &frame(9, 1, PeerMessage::LeaseGrant { sent_tick: 1 }))
        .is_ok());
    assert!(node
        .handle_frame(5, &frame(2, 3, PeerMessage::LeaseGrant { sent_tick: 1 }))
        .is_ok());
    assert!(node
        .handle_frame(6, &frame(2, 1, PeerMessage::Raft(vec![0xff; 16])))
        .is_ok());
    let stats = node.stats();
    assert_eq!(stats.frames_malformed, 3, "{stats:?}");
    assert!(stats.messages_rejected >= 3, "{stats:?}");
    // The node still works: it ticks and campaigns.
    for now in 7..400 {
        node.tick(now);
    }
    let mut actions = Vec::new();
    node.drain_actions(&mut actions);
    assert!(!actions.is_empty());
}

#[test]
fn invalid_configs_are_errors() {
    assert!(Node::new(Config::new(0, vec![0])).is_err());
    assert!(Node::new(Config::new(4, vec![1, 2, 3])).is_err());
    assert!(Node::new(Config::new(1, vec![1, 1, 2])).is_err());
    let mut config = Config::new(1, vec![1, 2, 3]);
    config.down_after_ticks = config.fence_after_ticks;
    assert!(Node::new(config).is_err());
}
