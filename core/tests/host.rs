//! The process layer on two hosts of one cluster, driven by hand: what a close, a kill,
//! a detach and a forged frame do to the pages a process holds.

use std::collections::BTreeMap;

use gallocy_core::host::{Credentials, Host, HostAction, HostConfig, ProcessState, SessionId};
use gallocy_core::ipc::{
    ErrorCode, FutexOutcome, IpcMessage, Role, IPC_FRAME_BYTES, IPC_NAME_BYTES,
};
use gallocy_core::{Config, PageBytes, PageId, PAGE_SIZE_BYTES};

const BASE: u64 = 0x1000_0000_0000;

struct Net {
    hosts: Vec<Host>,
    now: u64,
    /// Application frames the hosts sent: (host, conn, request id, message).
    app: Vec<(usize, u64, u64, IpcMessage)>,
    probes: Vec<(usize, SessionId)>,
    kills: Vec<(usize, SessionId)>,
    /// Each node's memory (its memfd): what grants installed and tests wrote.
    memory: Vec<BTreeMap<PageId, Box<PageBytes>>>,
}

impl Net {
    fn new() -> Net {
        let hosts = (1..=2)
            .map(|id| {
                let mut config = HostConfig::new(Config::new(id, vec![1, 2]));
                config.space_base_addr = BASE;
                config.space_size_bytes = 64 << 20;
                config.space_chunk_size_bytes = 64 << 10;
                Host::new(config).unwrap()
            })
            .collect();
        let mut net = Net {
            hosts,
            now: 0,
            app: Vec::new(),
            probes: Vec::new(),
            kills: Vec::new(),
            memory: vec![BTreeMap::new(), BTreeMap::new()],
        };
        // Until a leader exists and both know it.
        for _ in 0..400 {
            net.step(5);
            if net.hosts.iter().all(|h| h.node().leader_id().is_some()) {
                return net;
            }
        }
        panic!("no leader");
    }

    /// Moves time and delivers every frame in flight until none is.
    fn step(&mut self, ticks: u64) {
        self.now += ticks;
        for h in 0..2 {
            self.hosts[h].tick(self.now);
        }
        self.settle();
    }

    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut moved = false;
            for h in 0..2 {
                let mut actions = Vec::new();
                self.hosts[h].drain_actions(&mut actions);
                for action in actions {
                    moved = true;
                    match action {
                        HostAction::SendPeer(envelope) => {
                            let to = envelope.to as usize - 1;
                            let bytes = envelope.encode();
                            self.hosts[to]
                                .peer_frame(self.now, envelope.from, &bytes)
                                .unwrap();
                        }
                        HostAction::SendApp { conn, frame }
                        | HostAction::Welcome { conn, frame, .. } => {
                            let (id, message) = IpcMessage::decode(&frame).unwrap();
                            self.app.push((h, conn, id, message));
                        }
                        HostAction::FinishRevoke {
                            token,
                            want_bytes,
                            page,
                        } => {
                            let bytes = want_bytes.then(|| {
                                self.memory[h]
                                    .get(&page)
                                    .cloned()
                                    .unwrap_or_else(|| Box::new([0u8; PAGE_SIZE_BYTES]))
                            });
                            self.hosts[h].revoke_finished(self.now, token, bytes);
                        }
                        HostAction::WritePage { page, bytes } => {
                            self.memory[h].insert(page, bytes);
                        }
                        HostAction::Probe { session, .. } => self.probes.push((h, session)),
                        HostAction::Kill { session, .. } => self.kills.push((h, session)),
                        _ => {}
                    }
                }
            }
            if !moved {
                return;
            }
        }
        panic!("does not settle");
    }

    fn send(&mut self, h: usize, conn: u64, request_id: u64, message: IpcMessage) {
        let mut frame = [0u8; IPC_FRAME_BYTES];
        message.encode(request_id, &mut frame);
        self.hosts[h].app_frame(self.now, conn, &frame, &self.memory[h]);
        self.settle();
    }

    /// The last message sent on `conn` of host `h`.
    fn reply(&self, h: usize, conn: u64) -> Option<IpcMessage> {
        self.app
            .iter()
            .rev()
            .find(|(host, c, _, _)| *host == h && *c == conn)
            .map(|m| m.3)
    }

    /// Attaches a process with Main `conn`, Service `conn + 1`, Thread `conn + 2`.
    fn attach(&mut self, h: usize, conn: u64, pid: i32) -> SessionId {
        let creds = Credentials {
            pid,
            uid: 0,
            gid: 0,
        };
        for c in conn..conn + 3 {
            self.hosts[h].app_connected(self.now, c, creds);
        }
        let mut name = [0u8; IPC_NAME_BYTES];
        name[..4].copy_from_slice(b"test");
        let hello = |role, session| IpcMessage::Hello {
            role,
            session,
            pid: pid as u32,
            create: true,
            persistent: false,
            replicas: 0,
            name,
        };
        self.send(h, conn, 1, hello(Role::Main, 0));
        for _ in 0..200 {
            if let Some(IpcMessage::Welcome { .. }) = self.reply(h, conn) {
                break;
            }
            self.step(5);
        }
        let Some(IpcMessage::Welcome { session, .. }) = self.reply(h, conn) else {
            panic!("no welcome on host {h}: {:?}", self.reply(h, conn));
        };
        self.send(h, conn + 1, 2, hello(Role::Service, session));
        self.send(h, conn + 2, 3, hello(Role::Thread, session));
        assert_eq!(self.reply(h, conn + 2), Some(IpcMessage::Pong));
        session
    }

    /// Faults the root page on `conn`; waits (bounded) for an answer.
    fn fault(&mut self, h: usize, conn: u64, request_id: u64, write: bool) {
        self.send(
            h,
            conn,
            request_id,
            IpcMessage::Fault {
                addr: BASE,
                write,
                pages: 1,
            },
        );
        self.step_until(|net| net.answered(h, conn, request_id));
    }

    /// Steps (10 ticks at a time, at most 100 times) until `done` holds.
    fn step_until(&mut self, done: impl Fn(&Net) -> bool) {
        for _ in 0..100 {
            if done(self) {
                return;
            }
            self.step(10);
        }
    }

    /// The thread of `conn` reports the root page's grant applied.
    fn grant_applied(&mut self, h: usize, conn: u64) {
        self.send(
            h,
            conn,
            0,
            IpcMessage::GrantApplied {
                page_addr: BASE,
                pages: 1,
            },
        );
    }

    fn answered(&self, h: usize, conn: u64, request_id: u64) -> bool {
        self.app
            .iter()
            .any(|&(host, c, id, _)| host == h && c == conn && id == request_id)
    }
}

/// Node 2's process asks to read the root page; steps until node 1 asked its writer.
fn read_fault(net: &mut Net) {
    net.send(
        1,
        22,
        60,
        IpcMessage::Fault {
            addr: BASE,
            write: false,
            pages: 1,
        },
    );
    net.step_until(|net| matches!(net.reply(0, 11), Some(IpcMessage::Revoke { .. })));
}

fn granted(message: Option<IpcMessage>) -> bool {
    matches!(message, Some(IpcMessage::Granted { .. }))
}

/// Node 1's process writes the root page, node 2's process wants to read it, and node
/// 1's process closes its Main connection before it answered the revocation.
fn writer_closes_while_revoked(state: ProcessState) -> (Net, SessionId) {
    let mut net = Net::new();
    let writer = net.attach(0, 10, 100);
    net.fault(0, 12, 50, true);
    assert!(granted(net.reply(0, 12)), "{:?}", net.reply(0, 12));
    net.grant_applied(0, 12);
    net.attach(1, 20, 200);
    read_fault(&mut net);
    // The writer's service thread was asked to give the page up; it does not answer.
    assert!(matches!(net.reply(0, 11), Some(IpcMessage::Revoke { .. })));
    assert!(!granted(net.reply(1, 22)));
    net.hosts[0].app_closed(net.now, 10);
    net.settle();
    assert_eq!(net.probes, vec![(0, writer)]);
    net.hosts[0].process_state(net.now, writer, state);
    net.settle();
    (net, writer)
}

#[test]
fn a_process_that_closes_while_mapping_the_space_is_killed_before_its_pages_move() {
    let (mut net, writer) = writer_closes_while_revoked(ProcessState::Mapped);
    assert_eq!(net.kills, vec![(0, writer)]);
    for _ in 0..20 {
        net.step(50);
        assert!(
            !granted(net.reply(1, 22)),
            "the page moved while its writer could still write it"
        );
    }
    net.hosts[0].process_state(net.now, writer, ProcessState::Exited);
    net.settle();
    for _ in 0..50 {
        net.step(10);
    }
    assert!(granted(net.reply(1, 22)), "{:?}", net.reply(1, 22));
    assert_eq!(net.hosts[0].session_count(), 0);
}

#[test]
fn a_process_that_exec_d_is_not_killed_and_gives_its_pages_back() {
    let (mut net, _) = writer_closes_while_revoked(ProcessState::Unmapped);
    assert!(net.kills.is_empty());
    for _ in 0..50 {
        net.step(10);
    }
    assert!(granted(net.reply(1, 22)), "{:?}", net.reply(1, 22));
}

#[test]
fn a_process_that_does_not_answer_in_time_is_killed() {
    let mut net = Net::new();
    let writer = net.attach(0, 10, 100);
    net.fault(0, 12, 50, true);
    net.grant_applied(0, 12);
    net.attach(1, 20, 200);
    read_fault(&mut net);
    let timeout = net.hosts[0].config().node.revoke_timeout_ticks;
    net.step(timeout / 2);
    assert!(net.kills.is_empty());
    net.step(timeout);
    assert_eq!(net.kills, vec![(0, writer)]);
    assert!(!granted(net.reply(1, 22)));
    net.hosts[0].process_state(net.now, writer, ProcessState::Exited);
    net.settle();
    for _ in 0..50 {
        net.step(10);
    }
    assert!(granted(net.reply(1, 22)));
}

#[test]
fn a_detach_takes_every_page_back_before_it_is_answered() {
    let mut net = Net::new();
    net.attach(0, 10, 100);
    net.fault(0, 12, 50, true);
    net.grant_applied(0, 12);
    net.send(0, 10, 70, IpcMessage::Detach);
    let Some(IpcMessage::Revoke {
        addr,
        access,
        token,
        ..
    }) = net.reply(0, 11)
    else {
        panic!("no revocation: {:?}", net.reply(0, 11));
    };
    assert_eq!((addr, access), (BASE, 0));
    assert_ne!(net.reply(0, 10), Some(IpcMessage::Pong));
    net.send(0, 11, 0, IpcMessage::RevokeDone { token });
    assert_eq!(net.reply(0, 10), Some(IpcMessage::Pong));
    assert_eq!(net.hosts[0].session_count(), 0);
}

#[test]
fn forged_grant_reports_and_faults_are_refused_without_harm() {
    let mut net = Net::new();
    let session = net.attach(0, 10, 100);
    for (page_addr, pages) in [(u64::MAX - 4095, 4), (BASE, u32::MAX), (0, 1), (BASE, 0)] {
        net.send(0, 12, 0, IpcMessage::GrantApplied { page_addr, pages });
    }
    for (addr, pages) in [
        (u64::MAX - 4095, 4),
        (BASE, u32::MAX),
        (BASE + (64 << 20) - 4096, 2),
    ] {
        net.send(
            0,
            12,
            80,
            IpcMessage::Fault {
                addr,
                write: true,
                pages,
            },
        );
        assert!(matches!(net.reply(0, 12), Some(IpcMessage::Error { .. })));
    }
    // Another process's session is not this one's to join.
    net.hosts[0].app_connected(
        net.now,
        99,
        Credentials {
            pid: 999,
            uid: 0,
            gid: 0,
        },
    );
    net.send(
        0,
        99,
        5,
        IpcMessage::Hello {
            role: Role::Service,
            session,
            pid: 999,
            create: false,
            persistent: false,
            replicas: 0,
            name: [0u8; IPC_NAME_BYTES],
        },
    );
    assert!(matches!(net.reply(0, 99), Some(IpcMessage::Error { .. })));
    net.fault(0, 12, 90, true);
    assert!(granted(net.reply(0, 12)));
}

// -----------------------------------------------------------------------------
// Futexes.

/// The futex word of these tests: 64 bytes into the root page.
const WORD: u64 = BASE + 64;

impl Net {
    /// The root page of the space the process of Main `conn` on host `h` joined.
    fn root_page(&self, h: usize, conn: u64) -> PageId {
        let space = self
            .app
            .iter()
            .find_map(|&(host, c, _, m)| match m {
                IpcMessage::Welcome { space, .. } if host == h && c == conn => Some(space),
                _ => None,
            })
            .expect("welcomed");
        PageId { space, index: 0 }
    }

    /// A process of host `h` writes the futex word (in the node's memory).
    fn write_word(&mut self, h: usize, page: PageId, value: u32) {
        let bytes = self.memory[h]
            .entry(page)
            .or_insert_with(|| Box::new([0u8; PAGE_SIZE_BYTES]));
        bytes[64..68].copy_from_slice(&value.to_le_bytes());
    }

    fn wait(&mut self, h: usize, conn: u64, request_id: u64, expected: u32, timeout_ticks: u32) {
        let message = IpcMessage::FutexWait {
            addr: WORD,
            expected,
            timeout_ticks,
        };
        self.send(h, conn, request_id, message);
    }

    /// The answer to `request_id` on `conn`, if any.
    fn answer(&self, h: usize, conn: u64, request_id: u64) -> Option<IpcMessage> {
        self.app
            .iter()
            .rev()
            .find(|&&(host, c, id, _)| host == h && c == conn && id == request_id)
            .map(|m| m.3)
    }

    /// Answers the last revocation sent to the service connection `conn`.
    fn revoke_done(&mut self, h: usize, conn: u64) {
        let Some(IpcMessage::Revoke { token, .. }) = self.reply(h, conn) else {
            panic!("no revocation on {conn}: {:?}", self.reply(h, conn));
        };
        self.send(h, conn, 0, IpcMessage::RevokeDone { token });
    }
}

fn wait_done(outcome: FutexOutcome) -> Option<IpcMessage> {
    Some(IpcMessage::FutexWaitDone { outcome })
}

#[test]
fn a_futex_wait_sleeps_only_on_a_current_copy_that_holds_the_expected_word() {
    let mut net = Net::new();
    net.attach(0, 10, 100);
    let page = net.root_page(0, 10);
    // No copy of the page on this node: the word cannot be compared.
    net.wait(0, 12, 70, 0, 0);
    assert_eq!(net.answer(0, 12, 70), wait_done(FutexOutcome::NoCopy));
    net.fault(0, 12, 50, true);
    net.grant_applied(0, 12);
    net.write_word(0, page, 5);
    net.wait(0, 12, 71, 4, 0);
    assert_eq!(net.answer(0, 12, 71), wait_done(FutexOutcome::ValueChanged));
    net.wait(0, 12, 72, 5, 0);
    net.step(100);
    assert_eq!(net.answer(0, 12, 72), None, "sleeps");
    // A second wait on the same connection is a broken client.
    net.wait(0, 12, 73, 5, 0);
    assert!(matches!(
        net.answer(0, 12, 73),
        Some(IpcMessage::Error {
            code: ErrorCode::BadFrame,
            ..
        })
    ));
    // Another process of the node wakes it; a misaligned word is refused.
    net.attach(0, 30, 300);
    let wake = |addr| IpcMessage::FutexWake { addr, count: 1 };
    net.send(0, 32, 80, wake(WORD + 1));
    assert!(matches!(
        net.answer(0, 32, 80),
        Some(IpcMessage::Error {
            code: ErrorCode::InvalidArgument,
            ..
        })
    ));
    net.send(0, 32, 81, wake(WORD));
    assert_eq!(
        net.answer(0, 32, 81),
        Some(IpcMessage::FutexWoken { woken: 1 })
    );
    assert_eq!(net.answer(0, 12, 72), wait_done(FutexOutcome::Woken));
    net.send(0, 32, 82, wake(WORD));
    assert_eq!(
        net.answer(0, 32, 82),
        Some(IpcMessage::FutexWoken { woken: 0 })
    );
}

#[test]
fn a_waiter_sleeps_on_when_its_copy_goes_and_a_wake_from_another_node_reaches_it() {
    let mut net = Net::new();
    net.attach(0, 10, 100);
    let page = net.root_page(0, 10);
    net.fault(0, 12, 50, true);
    net.grant_applied(0, 12);
    net.write_word(0, page, 5);
    net.attach(1, 20, 200);
    // Node 2 reads the page: node 1's writer is downgraded, node 2 gets the bytes.
    read_fault(&mut net);
    net.revoke_done(0, 11);
    net.step_until(|net| granted(net.reply(1, 22)));
    assert!(granted(net.reply(1, 22)), "{:?}", net.reply(1, 22));
    net.grant_applied(1, 22);
    net.wait(1, 22, 90, 5, 0);
    net.step(50);
    assert_eq!(net.answer(1, 22, 90), None, "sleeps on its copy");
    // Node 1 takes the page for writing: node 2's copy goes, its waiter sleeps on.
    net.send(
        0,
        12,
        51,
        IpcMessage::Fault {
            addr: BASE,
            write: true,
            pages: 1,
        },
    );
    net.step_until(|net| matches!(net.reply(1, 21), Some(IpcMessage::Revoke { .. })));
    net.revoke_done(1, 21);
    net.step_until(|net| net.answered(0, 12, 51));
    assert!(
        granted(net.answer(0, 12, 51)),
        "{:?}",
        net.answer(0, 12, 51)
    );
    net.grant_applied(0, 12);
    net.write_word(0, page, 6);
    net.step(50);
    assert_eq!(net.answer(1, 22, 90), None, "sleeps without its copy");
    // The wake after the write finds no waiter on node 1 and asks node 2.
    net.send(
        0,
        12,
        91,
        IpcMessage::FutexWake {
            addr: WORD,
            count: 1,
        },
    );
    assert_eq!(net.answer(1, 22, 90), wait_done(FutexOutcome::Woken));
    assert_eq!(
        net.answer(0, 12, 91),
        Some(IpcMessage::FutexWoken { woken: 1 })
    );
    // Node 2 holds no copy now: its next wait must fetch the page first.
    net.wait(1, 22, 92, 6, 0);
    assert_eq!(net.answer(1, 22, 92), wait_done(FutexOutcome::NoCopy));
}

#[test]
fn a_detaching_process_gives_up_its_waits_so_later_wakes_reach_other_waiters() {
    let mut net = Net::new();
    net.attach(0, 10, 100);
    net.fault(0, 12, 50, true);
    net.grant_applied(0, 12);
    net.attach(0, 30, 300);
    net.fault(0, 32, 51, false);
    net.grant_applied(0, 32);
    // The older wait is the detaching process's.
    net.wait(0, 12, 60, 0, 0);
    net.wait(0, 32, 61, 0, 0);
    net.send(0, 10, 62, IpcMessage::Detach);
    assert_eq!(net.answer(0, 12, 60), wait_done(FutexOutcome::Woken));
    net.attach(1, 20, 200);
    net.send(
        1,
        22,
        63,
        IpcMessage::FutexWake {
            addr: WORD,
            count: 1,
        },
    );
    assert_eq!(net.answer(0, 32, 61), wait_done(FutexOutcome::Woken));
    assert_eq!(
        net.answer(1, 22, 63),
        Some(IpcMessage::FutexWoken { woken: 1 })
    );
}

#[test]
fn a_futex_wait_times_out_and_a_closed_connection_forgets_its_wait() {
    let mut net = Net::new();
    net.attach(0, 10, 100);
    net.fault(0, 12, 50, true);
    net.grant_applied(0, 12);
    net.wait(0, 12, 60, 0, 40);
    net.step(20);
    assert_eq!(net.answer(0, 12, 60), None);
    net.step(30);
    assert_eq!(net.answer(0, 12, 60), wait_done(FutexOutcome::TimedOut));
    net.wait(0, 12, 61, 0, 0);
    net.hosts[0].app_closed(net.now, 12);
    net.settle();
    net.send(
        0,
        10,
        62,
        IpcMessage::FutexWake {
            addr: WORD,
            count: 9,
        },
    );
    assert_eq!(
        net.answer(0, 10, 62),
        Some(IpcMessage::FutexWoken { woken: 0 })
    );
}
