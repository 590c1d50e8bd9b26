//! Properties of the peer wire format (`gallocy_core::wire`) and of the Raft entry
//! encoding (`gallocy_core::meta::Proposal`): exact round trips, canonical decoding,
//! and decoders that answer `Err` rather than panic on hostile input.

use gallocy_core::futex::FutexMessage;
use gallocy_core::meta::{Command, Proposal};
use gallocy_core::programs::{ProgramMessage, SpawnOutcome, WorkerEvent, WorkerExit, WorkerSpec};
use gallocy_core::types::{Access, PageBytes, PageId, PAGE_SIZE_BYTES};
use gallocy_core::wire::{
    decode_peer_hello, encode_peer_hello, BackupCopy, CopyReport, Envelope, FreeOutcome,
    PageDenial, PeerHello, PeerMessage, MAX_FRAME_BYTES, PEER_HELLO_BYTES,
};
use proptest::prelude::*;
use proptest::sample::Index;

// ---------------------------------------------------------------------------------
// Strategies.

fn node_id() -> impl Strategy<Value = u64> {
    // Mostly small ids like a real cluster, sometimes the extremes of the range.
    prop_oneof![4 => 1u64..=8, 1 => 1u64..=u64::MAX, 1 => Just(u64::MAX)]
}

fn page_id() -> impl Strategy<Value = PageId> {
    (any::<u32>(), any::<u64>()).prop_map(|(space, index)| PageId { space, index })
}

fn request_access() -> impl Strategy<Value = Access> {
    // `Access::None` is not a valid request or grant mode on the wire.
    prop_oneof![Just(Access::Read), Just(Access::Write)]
}

fn page_bytes() -> impl Strategy<Value = Box<PageBytes>> {
    // Either a fully random page or a mostly-zero page with a few bytes set (the
    // common case, and one that shrinks to something readable).
    let random = proptest::collection::vec(any::<u8>(), PAGE_SIZE_BYTES);
    let sparse =
        proptest::collection::vec((0..PAGE_SIZE_BYTES, any::<u8>()), 0..8).prop_map(|patches| {
            let mut page = vec![0u8; PAGE_SIZE_BYTES];
            for (offset, value) in patches {
                page[offset] = value;
            }
            page
        });
    prop_oneof![random, sparse].prop_map(|v| {
        let boxed: Box<[u8]> = v.into_boxed_slice();
        boxed.try_into().expect("exactly one page")
    })
}

fn opt_page_bytes() -> impl Strategy<Value = Option<Box<PageBytes>>> {
    prop_oneof![Just(None), page_bytes().prop_map(Some)]
}

fn peer_message() -> impl Strategy<Value = PeerMessage> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..600).prop_map(PeerMessage::Raft),
        (
            page_id(),
            any::<u64>(),
            request_access(),
            any::<Option<u64>>()
        )
            .prop_map(
                |(page, request_id, mode, have_version)| PeerMessage::PageRequest {
                    page,
                    request_id,
                    mode,
                    have_version,
                }
            ),
        (
            page_id(),
            any::<u64>(),
            any::<u64>(),
            request_access(),
            any::<u64>(),
            any::<u64>(),
            opt_page_bytes(),
        )
            .prop_map(
                |(page, request_id, seq, mode, version, base_version, bytes)| {
                    PeerMessage::PageGrant {
                        page,
                        request_id,
                        seq,
                        mode,
                        version,
                        base_version,
                        bytes,
                    }
                }
            ),
        (
            page_id(),
            any::<u64>(),
            prop_oneof![Just(PageDenial::Lost), Just(PageDenial::NotMapped)]
        )
            .prop_map(|(page, request_id, reason)| PeerMessage::PageDenied {
                page,
                request_id,
                reason,
            }),
        (page_id(), any::<u64>()).prop_map(|(page, seq)| PeerMessage::Invalidate { page, seq }),
        (page_id(), any::<u64>()).prop_map(|(page, seq)| PeerMessage::InvalidateAck { page, seq }),
        (page_id(), any::<u64>(), any::<bool>()).prop_map(|(page, seq, downgrade)| {
            PeerMessage::Recall {
                page,
                seq,
                downgrade,
            }
        }),
        (page_id(), any::<u64>(), any::<u64>(), opt_page_bytes()).prop_map(
            |(page, seq, version, bytes)| PeerMessage::RecallAck {
                page,
                seq,
                version,
                bytes,
            }
        ),
        (page_id(), any::<u64>()).prop_map(|(page, seq)| PeerMessage::Collect { page, seq }),
        (
            page_id(),
            any::<u64>(),
            prop_oneof![Just(Access::None), Just(Access::Read), Just(Access::Write)],
            proptest::option::of(any::<u64>()),
            any::<u64>(),
            opt_page_bytes(),
            proptest::option::of(backup_copy())
        )
            .prop_map(|(page, seq, held, version, seq_seen, bytes, backup)| {
                PeerMessage::CollectAck {
                    page,
                    seq,
                    report: CopyReport {
                        held,
                        version,
                        seq_seen,
                        bytes,
                        backup,
                    },
                }
            }),
        (page_id(), any::<u64>(), any::<u64>(), opt_page_bytes()).prop_map(
            |(page, request_id, version, bytes)| PeerMessage::Flush {
                page,
                request_id,
                version,
                bytes,
            }
        ),
        (page_id(), any::<u64>())
            .prop_map(|(page, request_id)| PeerMessage::FlushAck { page, request_id }),
        (page_id(), any::<u64>(), backup_copy())
            .prop_map(|(page, seq, copy)| PeerMessage::Backup { page, seq, copy }),
        (page_id(), any::<u64>()).prop_map(|(page, seq)| PeerMessage::BackupAck { page, seq }),
        page_id().prop_map(|page| PeerMessage::RepairHint { page }),
        (any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(space, addr, request_id, oldest_in_flight)| PeerMessage::FreeRequest {
                space,
                addr,
                request_id,
                oldest_in_flight,
            }
        ),
        (
            any::<u64>(),
            prop_oneof![
                Just(FreeOutcome::Freed),
                Just(FreeOutcome::InvalidFree),
                Just(FreeOutcome::NotLessee)
            ]
        )
            .prop_map(|(request_id, outcome)| PeerMessage::FreeReply {
                request_id,
                outcome,
            }),
        any::<u64>().prop_map(|sent_tick| PeerMessage::LeaseRequest { sent_tick }),
        any::<u64>().prop_map(|sent_tick| PeerMessage::LeaseGrant { sent_tick }),
        program_message().prop_map(PeerMessage::Program),
        (
            any::<u64>(),
            any::<u64>(),
            any::<(u32, u64)>(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(
                |(wake_id, oldest_in_flight, (space, index), offset_bytes, count)| {
                    PeerMessage::Futex(FutexMessage::Wake {
                        wake_id,
                        oldest_in_flight,
                        page: PageId { space, index },
                        offset_bytes,
                        count,
                    })
                }
            ),
        (any::<u64>(), any::<u32>()).prop_map(|(wake_id, woken)| PeerMessage::Futex(
            FutexMessage::WakeAck { wake_id, woken }
        )),
    ]
}

fn worker_event() -> impl Strategy<Value = WorkerEvent> {
    prop_oneof![
        any::<u32>().prop_map(|pid| WorkerEvent::Started { pid }),
        proptest::collection::vec(any::<u8>(), 0..64)
            .prop_map(|reason| WorkerEvent::Refused { reason }),
        (1u8..=2, proptest::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(stream, bytes)| WorkerEvent::Output { stream, bytes }),
        any::<i32>().prop_map(|code| WorkerEvent::Exited(WorkerExit::Code(code))),
        any::<i32>().prop_map(|signal| WorkerEvent::Exited(WorkerExit::Signal(signal))),
    ]
}

fn program_message() -> impl Strategy<Value = ProgramMessage> {
    prop_oneof![
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..200))
            .prop_map(|(program, spec)| ProgramMessage::Launch { program, spec }),
        any::<u64>().prop_map(|program| ProgramMessage::LaunchAck { program }),
        (any::<u64>(), any::<u64>(), worker_event()).prop_map(|(program, seq, event)| {
            ProgramMessage::Event {
                program,
                seq,
                event,
            }
        }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(program, seq)| ProgramMessage::EventAck { program, seq }),
        any::<u64>().prop_map(|program| ProgramMessage::Stop { program }),
        any::<u64>().prop_map(|program| ProgramMessage::StopAck { program }),
        any::<[u64; 3]>().prop_map(|w| ProgramMessage::Spawn {
            program: w[0],
            thread: w[1],
            record_addr: w[2],
        }),
        (
            any::<u64>(),
            prop_oneof![
                Just(SpawnOutcome::Delivered),
                Just(SpawnOutcome::Refused),
                Just(SpawnOutcome::Ended)
            ]
        )
            .prop_map(|(thread, outcome)| ProgramMessage::SpawnAck { thread, outcome }),
    ]
}

fn worker_spec() -> impl Strategy<Value = WorkerSpec> {
    let bytes = || proptest::collection::vec(any::<u8>(), 0..40);
    (
        proptest::collection::vec(any::<u8>(), 1..40),
        proptest::collection::vec(bytes(), 1..6),
        proptest::collection::vec(bytes(), 0..6),
        bytes(),
        any::<[u8; 32]>(),
    )
        .prop_map(|(path, argv, env, cwd, exe_sha256)| WorkerSpec {
            path,
            argv,
            env,
            cwd,
            exe_sha256,
        })
}

proptest! {
    #[test]
    fn worker_specs_round_trip_and_hostile_specs_are_refused(
        spec in worker_spec(),
        cut in any::<Index>(),
        noise in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let bytes = spec.encode();
        prop_assert_eq!(WorkerSpec::decode(&bytes), Ok(spec));
        // A truncated spec, or noise, is an error, never a panic.
        let at = cut.index(bytes.len());
        prop_assert!(WorkerSpec::decode(&bytes[..at]).is_err());
        let _ = WorkerSpec::decode(&noise);
    }
}

fn backup_copy() -> impl Strategy<Value = BackupCopy> {
    (any::<u64>(), any::<u64>(), any::<u8>()).prop_map(|(version, sub, fill)| BackupCopy {
        version,
        sub,
        bytes: Box::new([fill; PAGE_SIZE_BYTES]),
    })
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (
        node_id(),
        any::<u64>(),
        node_id(),
        any::<u64>(),
        peer_message(),
    )
        .prop_map(
            |(from, from_incarnation, to, to_incarnation, message)| Envelope {
                from,
                from_incarnation,
                to,
                to_incarnation,
                message,
            },
        )
}

fn space_name() -> impl Strategy<Value = String> {
    // At most 16 chars of at most 4 bytes each: never over the 64-byte limit.
    prop_oneof![Just(String::new()), "[a-z0-9-]{1,16}", ".{1,16}"]
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (
            space_name(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(
                    name,
                    base_addr,
                    size_bytes,
                    chunk_size_bytes,
                    root_size_bytes,
                    flexible_base,
                    persistent,
                )| {
                    Command::CreateSpace {
                        name,
                        base_addr,
                        size_bytes,
                        chunk_size_bytes,
                        root_size_bytes,
                        flexible_base,
                        persistent,
                        replicas: (root_size_bytes % 251) as u8,
                    }
                }
            ),
        space_name().prop_map(|name| Command::Attach { name }),
        any::<u32>().prop_map(|space| Command::Detach { space }),
        (any::<u32>(), any::<u64>(), any::<u32>())
            .prop_map(|(space, node, count)| Command::LeaseChunks { space, node, count }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(node, incarnation)| Command::MarkDown { node, incarnation }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(node, incarnation)| Command::Rejoin { node, incarnation }),
        space_name().prop_map(|name| Command::Unpersist { name }),
    ]
}

fn proposal() -> impl Strategy<Value = Proposal> {
    (any::<u64>(), any::<u64>(), any::<u64>(), command()).prop_map(
        |(origin, proposal_id, oldest_in_flight, command)| Proposal {
            origin,
            proposal_id,
            oldest_in_flight,
            command,
        },
    )
}

/// A way to damage a valid encoding.
#[derive(Clone, Debug)]
enum Mutation {
    /// XOR one byte with a non-zero mask.
    Flip(Index, u8),
    /// Overwrite one byte.
    Set(Index, u8),
    /// Keep a strict prefix.
    Truncate(Index),
    /// Add bytes at the end.
    Append(Vec<u8>),
    /// Remove one byte from the middle.
    Delete(Index),
    /// Insert one byte somewhere.
    Insert(Index, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, v)| Mutation::Set(i, v)),
        any::<Index>().prop_map(Mutation::Truncate),
        proptest::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Append),
        any::<Index>().prop_map(Mutation::Delete),
        (any::<Index>(), any::<u8>()).prop_map(|(i, v)| Mutation::Insert(i, v)),
    ]
}

fn mutate(bytes: &[u8], mutation: &Mutation) -> Vec<u8> {
    let mut out = bytes.to_vec();
    match mutation {
        Mutation::Flip(i, mask) => {
            let i = i.index(out.len());
            out[i] ^= mask;
        }
        Mutation::Set(i, value) => {
            let i = i.index(out.len());
            out[i] = *value;
        }
        Mutation::Truncate(i) => out.truncate(i.index(out.len())),
        Mutation::Append(extra) => out.extend_from_slice(extra),
        Mutation::Delete(i) => {
            out.remove(i.index(out.len()));
        }
        Mutation::Insert(i, value) => out.insert(i.index(out.len() + 1), *value),
    }
    out
}

/// A frame header that passes the magic/version/id checks, so random bodies reach the
/// per-kind decoders instead of failing on the first two bytes.
fn plausible_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        0u8..=16,
        1u64..=4,
        1u64..=4,
        proptest::collection::vec(any::<u8>(), 0..128),
    )
        .prop_map(|(kind, from, to, body)| {
            let mut frame = Vec::with_capacity(20 + body.len());
            frame.extend_from_slice(&0x4759u16.to_le_bytes());
            frame.push(1);
            frame.push(kind);
            frame.extend_from_slice(&from.to_le_bytes());
            frame.extend_from_slice(&to.to_le_bytes());
            frame.extend_from_slice(&body);
            frame
        })
}

/// Decoding must be total, and an accepted input must be the canonical encoding of
/// what it decoded to (no two byte strings mean the same message, so a frame cannot be
/// silently reinterpreted).
fn check_envelope_decode(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(envelope) = Envelope::decode(bytes) {
        prop_assert!(envelope.from != 0 && envelope.to != 0);
        prop_assert_eq!(
            envelope.encode(),
            bytes.to_vec(),
            "accepted a non-canonical frame"
        );
    }
    Ok(())
}

fn check_proposal_decode(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(proposal) = Proposal::decode(bytes) {
        prop_assert_eq!(
            proposal.encode(),
            bytes.to_vec(),
            "accepted a non-canonical entry"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn envelope_round_trips(envelope in envelope()) {
        let bytes = envelope.encode();
        prop_assert!(bytes.len() <= MAX_FRAME_BYTES);
        prop_assert_eq!(&bytes[..2], &0x4759u16.to_le_bytes()[..]);
        let decoded = Envelope::decode(&bytes).map_err(|e| {
            TestCaseError::fail(format!("valid frame rejected: {e}"))
        })?;
        prop_assert_eq!(decoded, envelope);
    }

    #[test]
    fn envelope_decode_is_total_on_random_bytes(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            plausible_frame(),
        ]
    ) {
        check_envelope_decode(&bytes)?;
    }

    #[test]
    fn envelope_decode_survives_mutations(
        envelope in envelope(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let valid = envelope.encode();
        let mut bytes = valid.clone();
        for m in &mutations {
            if bytes.is_empty() {
                break;
            }
            bytes = mutate(&bytes, m);
        }
        check_envelope_decode(&bytes)?;
    }

    #[test]
    fn envelope_truncated_or_extended_is_rejected(
        envelope in envelope(),
        cut in any::<Index>(),
        extra in proptest::collection::vec(any::<u8>(), 1..16),
    ) {
        let valid = envelope.encode();
        // Every strict prefix is missing part of a field: always an error.
        let prefix = &valid[..cut.index(valid.len())];
        prop_assert!(Envelope::decode(prefix).is_err(), "accepted a {}-byte prefix", prefix.len());
        // The message is self-delimiting, so trailing garbage is detected.
        let mut longer = valid.clone();
        longer.extend_from_slice(&extra);
        prop_assert!(Envelope::decode(&longer).is_err(), "accepted trailing bytes");
    }

    #[test]
    fn proposal_round_trips(proposal in proposal()) {
        let bytes = proposal.encode();
        let decoded = Proposal::decode(&bytes).map_err(|e| {
            TestCaseError::fail(format!("valid entry rejected: {e}"))
        })?;
        prop_assert_eq!(decoded, proposal);
    }

    #[test]
    fn proposal_with_overlong_name_is_rejected(
        name in "[a-z]{65,100}",
        origin in any::<u64>(),
        proposal_id in any::<u64>(),
    ) {
        let proposal = Proposal {
            origin,
            proposal_id,
            oldest_in_flight: proposal_id,
            command: Command::CreateSpace {
                name,
                base_addr: 1 << 32,
                size_bytes: 1 << 20,
                chunk_size_bytes: 1 << 16,
                root_size_bytes: 1 << 16,
                flexible_base: false,
                persistent: false,
                replicas: 2,
            },
        };
        prop_assert!(Proposal::decode(&proposal.encode()).is_err());
    }

    #[test]
    fn proposal_decode_is_total(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..128),
            // Version 1, then origin, id and oldest-in-flight, then a command tag (0 and
            // 4 are unknown): random bodies reach the command decoders.
            (0u8..=4, any::<[u8; 24]>(), proptest::collection::vec(any::<u8>(), 0..96))
                .prop_map(|(cmd, ids, body)| {
                    let mut v = vec![1u8];
                    v.extend_from_slice(&ids);
                    v.push(cmd);
                    v.extend_from_slice(&body);
                    v
                }),
        ]
    ) {
        check_proposal_decode(&bytes)?;
    }

    #[test]
    fn proposal_decode_survives_mutations(
        proposal in proposal(),
        mutations in proptest::collection::vec(mutation(), 1..4),
        cut in any::<Index>(),
    ) {
        let valid = proposal.encode();
        let prefix = &valid[..cut.index(valid.len())];
        prop_assert!(Proposal::decode(prefix).is_err(), "accepted a {}-byte prefix", prefix.len());
        let mut bytes = valid.clone();
        for m in &mutations {
            if bytes.is_empty() {
                break;
            }
            bytes = mutate(&bytes, m);
        }
        check_proposal_decode(&bytes)?;
    }

    #[test]
    fn peer_hello_round_trips(node in 1u64..=u64::MAX, incarnation in any::<u64>()) {
        let hello = PeerHello { node, incarnation };
        prop_assert_eq!(decode_peer_hello(&encode_peer_hello(hello)), Ok(hello));
    }

    #[test]
    fn peer_hello_decode_is_total(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..32),
            (any::<u64>(), any::<u64>(), mutation()).prop_map(|(node, incarnation, m)| {
                mutate(&encode_peer_hello(PeerHello { node, incarnation }), &m)
            }),
        ]
    ) {
        // An accepted hello is exactly the encoding of a non-zero id.
        if let Ok(hello) = decode_peer_hello(&bytes) {
            prop_assert!(hello.node != 0);
            prop_assert_eq!(bytes.len(), PEER_HELLO_BYTES);
            prop_assert_eq!(&encode_peer_hello(hello)[..], &bytes[..]);
        }
    }
}
