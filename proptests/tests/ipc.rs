//! Properties of the application ⇄ daemon frames (`gallocy_core::ipc`): every message
//! round-trips through its 64-byte frame, and any 64 bytes decode to a message or an
//! error, never a panic; an `Error` frame is readable whatever the version byte says.

use gallocy_core::ipc::{
    ErrorCode, Frame, FutexOutcome, IpcDecodeError, IpcMessage, IpcStats, Role, IPC_FRAME_BYTES,
    IPC_NAME_BYTES, IPC_VERSION,
};
use proptest::prelude::*;

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![
        Just(Role::Main),
        Just(Role::Thread),
        Just(Role::Service),
        Just(Role::Admin)
    ]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    (1u32..=17).prop_map(ErrorCode::from_u32)
}

fn message() -> impl Strategy<Value = IpcMessage> {
    let a = prop_oneof![
        (
            role(),
            any::<u64>(),
            any::<u32>(),
            any::<bool>(),
            any::<bool>(),
            0u8..8,
            any::<[u8; IPC_NAME_BYTES]>()
        )
            .prop_map(|(role, session, pid, create, persistent, replicas, name)| {
                IpcMessage::Hello {
                    role,
                    session,
                    pid,
                    create,
                    persistent,
                    replicas,
                    name,
                }
            }),
        (any::<u64>(), any::<u64>()).prop_map(|(size_bytes, align_bytes)| IpcMessage::Allocate {
            size_bytes,
            align_bytes
        }),
        any::<u64>().prop_map(|addr| IpcMessage::Free { addr }),
        (any::<u64>(), any::<bool>(), any::<u32>())
            .prop_map(|(addr, write, pages)| IpcMessage::Fault { addr, write, pages }),
        any::<u32>().prop_map(|count| IpcMessage::LeaseChunks { count }),
        (any::<u64>(), any::<u32>())
            .prop_map(|(addr, count)| IpcMessage::ReleaseChunks { addr, count }),
        Just(IpcMessage::Ping),
        Just(IpcMessage::Stats),
        any::<u64>().prop_map(|token| IpcMessage::RevokeDone { token }),
        (any::<u64>(), any::<u32>())
            .prop_map(|(page_addr, pages)| IpcMessage::GrantApplied { page_addr, pages }),
        Just(IpcMessage::Status),
        Just(IpcMessage::Detach),
        any::<[u8; IPC_NAME_BYTES]>().prop_map(|name| IpcMessage::Unpersist { name }),
        (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(addr, expected, timeout_ticks)| {
            IpcMessage::FutexWait {
                addr,
                expected,
                timeout_ticks,
            }
        }),
        (any::<u64>(), any::<u32>())
            .prop_map(|(addr, count)| IpcMessage::FutexWake { addr, count }),
    ];
    let b = prop_oneof![
        (any::<[u64; 6]>(), any::<u32>(), any::<u32>()).prop_map(|(w, space, node)| {
            IpcMessage::Welcome {
                session: w[0],
                space,
                node,
                base_addr: w[1],
                size_bytes: w[2],
                chunk_size_bytes: w[3],
                root_size_bytes: w[4],
            }
        }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(addr, size_bytes)| IpcMessage::Allocated { addr, size_bytes }),
        Just(IpcMessage::Freed),
        (any::<u64>(), any::<bool>(), any::<u32>()).prop_map(|(page_addr, write, pages)| {
            IpcMessage::Granted {
                page_addr,
                write,
                pages,
            }
        }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(addr, size_bytes)| IpcMessage::Leased { addr, size_bytes }),
        Just(IpcMessage::Pong),
        (any::<[u64; 5]>(), any::<u32>(), any::<u32>()).prop_map(|(w, pages_held, node_id)| {
            IpcMessage::StatsReply(IpcStats {
                faults_local: w[0],
                faults_remote: w[1],
                frames_sent: w[2],
                frames_received: w[3],
                allocations: w[4],
                pages_held,
                node_id,
            })
        }),
        any::<u32>().prop_map(|len_bytes| IpcMessage::StatusReply { len_bytes }),
        any::<bool>().prop_map(|destroyed| IpcMessage::Unpersisted { destroyed }),
        prop_oneof![
            Just(FutexOutcome::Woken),
            Just(FutexOutcome::ValueChanged),
            Just(FutexOutcome::TimedOut),
            Just(FutexOutcome::NoCopy),
        ]
        .prop_map(|outcome| IpcMessage::FutexWaitDone { outcome }),
        any::<u32>().prop_map(|woken| IpcMessage::FutexWoken { woken }),
        (any::<u64>(), any::<u64>(), 0u8..=1, any::<u64>()).prop_map(
            |(addr, len, access, token)| IpcMessage::Revoke {
                addr,
                len,
                access,
                token
            }
        ),
        (error_code(), any::<u64>()).prop_map(|(code, detail)| IpcMessage::Error { code, detail }),
    ];
    let c = prop_oneof![
        any::<u32>().prop_map(|spec_len| IpcMessage::Launch { spec_len }),
        any::<u64>().prop_map(|program| IpcMessage::StopProgram { program }),
        any::<u64>().prop_map(|program| IpcMessage::ServeThreads { program }),
        any::<[u64; 3]>().prop_map(|w| IpcMessage::SpawnThread {
            program: w[0],
            node: w[1],
            record_addr: w[2]
        }),
        any::<u64>().prop_map(|program| IpcMessage::Launched { program }),
        (any::<u64>(), 1u8..=7, any::<u32>(), any::<u32>()).prop_map(
            |(node, what, value, len_bytes)| IpcMessage::WorkerReport {
                node,
                what,
                value,
                len_bytes
            }
        ),
        any::<[u64; 2]>().prop_map(|w| IpcMessage::RunThread {
            thread: w[0],
            record_addr: w[1]
        }),
        any::<u64>().prop_map(|thread| IpcMessage::ThreadSpawned { thread }),
        Just(IpcMessage::StopThreads),
    ];
    prop_oneof![a, b, c]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips(message in message(), request_id in any::<u64>()) {
        let mut frame: Frame = [0u8; IPC_FRAME_BYTES];
        message.encode(request_id, &mut frame);
        prop_assert_eq!(IpcMessage::decode(&frame), Ok((request_id, message)));
    }

    #[test]
    fn any_frame_decodes_or_errs(frame in any::<[u8; IPC_FRAME_BYTES]>()) {
        if let Ok((request_id, message)) = IpcMessage::decode(&frame) {
            // What decodes re-encodes to a frame that decodes the same.
            let mut again: Frame = [0u8; IPC_FRAME_BYTES];
            message.encode(request_id, &mut again);
            prop_assert_eq!(IpcMessage::decode(&again), Ok((request_id, message)));
        }
    }

    #[test]
    fn random_bodies_behind_a_valid_header_decode_or_err(
        kind in any::<u8>(),
        body in any::<[u8; IPC_FRAME_BYTES]>(),
    ) {
        let mut frame: Frame = body;
        frame[..2].copy_from_slice(&0x4741u16.to_le_bytes());
        frame[2] = IPC_VERSION;
        frame[3] = kind;
        if let Ok((request_id, message)) = IpcMessage::decode(&frame) {
            let mut again: Frame = [0u8; IPC_FRAME_BYTES];
            message.encode(request_id, &mut again);
            prop_assert_eq!(IpcMessage::decode(&again), Ok((request_id, message)));
        }
    }

    #[test]
    fn errors_are_readable_in_any_version(code in error_code(), detail in any::<u64>(), version in any::<u8>()) {
        let mut frame: Frame = [0u8; IPC_FRAME_BYTES];
        IpcMessage::Error { code, detail }.encode(9, &mut frame);
        frame[2] = version;
        prop_assert_eq!(IpcMessage::decode(&frame), Ok((9, IpcMessage::Error { code, detail })));
    }

    #[test]
    fn other_versions_are_named(message in message(), version in any::<u8>()) {
        prop_assume!(version != IPC_VERSION && !matches!(message, IpcMessage::Error { .. }));
        let mut frame: Frame = [0u8; IPC_FRAME_BYTES];
        message.encode(1, &mut frame);
        frame[2] = version;
        prop_assert_eq!(IpcMessage::decode(&frame), Err(IpcDecodeError::Version(version)));
    }
}
