//! The process layer on two hosts of one cluster, driven by hand: what a close, a kill,
//! a detach and a forged frame do to the pages a process holds.

use gallocy_core::host::{Credentials, Host, HostAction, HostConfig, ProcessState, SessionId};
use gallocy_core::ipc::{IpcMessage, Role, IPC_FRAME_BYTES, IPC_NAME_BYTES};
use gallocy_core::{Config, PAGE_SIZE_BYTES};

const BASE: u64 = 0x1000_0000_0000;

struct Net {
    hosts: Vec<Host>,
    now: u64,
    /// Application frames the hosts sent: (host, conn, request id, message).
    app: Vec<(usize, u64, u64, IpcMessage)>,
    probes: Vec<(usize, SessionId)>,
    kills: Vec<(usize, SessionId)>,
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
                            token, want_bytes, ..
                        } => {
                            let bytes = want_bytes.then(|| Box::new([0u8; PAGE_SIZE_BYTES]));
                            self.hosts[h].revoke_finished(self.now, token, bytes);
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
        self.hosts[h].app_frame(self.now, conn, &frame);
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
        for _ in 0..100 {
            if self.answered(h, conn, request_id) {
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
    for _ in 0..100 {
        if matches!(net.reply(0, 11), Some(IpcMessage::Revoke { .. })) {
            return;
        }
        net.step(10);
    }
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
            name: [0u8; IPC_NAME_BYTES],
        },
    );
    assert!(matches!(net.reply(0, 99), Some(IpcMessage::Error { .. })));
    net.fault(0, 12, 90, true);
    assert!(granted(net.reply(0, 12)));
}
