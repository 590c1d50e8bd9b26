//! Programs across two hosts, driven by hand over a network that loses and repeats
//! program messages: a launch reaches the other node once, a worker's events reach the
//! launcher once each and in order, a spawned thread runs once, answers come back.

use std::collections::BTreeMap;

use gallocy_core::host::{Credentials, Host, HostAction, HostConfig};
use gallocy_core::ipc::{
    ErrorCode, IpcMessage, Role, IPC_FRAME_BYTES, IPC_NAME_BYTES, REPORT_EXIT_CODE, REPORT_STARTED,
    REPORT_STDOUT,
};
use gallocy_core::programs::{WorkerEvent, WorkerExit, WorkerSpec};
use gallocy_core::wire::PeerMessage;
use gallocy_core::{Config, PageBytes, PageId};

const BASE: u64 = 0x1000_0000_0000;

struct Net {
    hosts: Vec<Host>,
    now: u64,
    /// Application frames sent: (host, conn, request id, message, data after it).
    app: Vec<(usize, u64, u64, IpcMessage, Vec<u8>)>,
    started: Vec<(usize, u64, Vec<u8>)>,
    stopped: Vec<(usize, u64)>,
    memory: Vec<BTreeMap<PageId, Box<PageBytes>>>,
    /// Program messages sent so far; those whose count is odd are lost while `lossy`,
    /// and every third is delivered twice.
    program_frames: u64,
    lossy: bool,
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
            started: Vec::new(),
            stopped: Vec::new(),
            memory: vec![BTreeMap::new(), BTreeMap::new()],
            program_frames: 0,
            lossy: false,
        };
        for _ in 0..400 {
            net.step(5);
            if net.hosts.iter().all(|h| h.node().leader_id().is_some()) {
                return net;
            }
        }
        panic!("no leader");
    }

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
                            let mut copies = 1;
                            if matches!(envelope.message, PeerMessage::Program(_)) {
                                self.program_frames += 1;
                                if self.lossy && self.program_frames % 2 == 1 {
                                    copies = 0;
                                } else if self.program_frames.is_multiple_of(3) {
                                    copies = 2;
                                }
                            }
                            for _ in 0..copies {
                                self.hosts[to]
                                    .peer_frame(self.now, envelope.from, &bytes)
                                    .unwrap();
                            }
                        }
                        HostAction::SendApp { conn, frame }
                        | HostAction::Welcome { conn, frame, .. } => {
                            let (id, message) = IpcMessage::decode(&frame).unwrap();
                            self.app.push((h, conn, id, message, Vec::new()));
                        }
                        HostAction::SendAppData { conn, frame, data } => {
                            let (id, message) = IpcMessage::decode(&frame).unwrap();
                            self.app.push((h, conn, id, message, data));
                        }
                        HostAction::StartWorker { program, spec } => {
                            self.started.push((h, program, spec))
                        }
                        HostAction::StopWorker { program } => self.stopped.push((h, program)),
                        HostAction::WritePage { page, bytes } => {
                            self.memory[h].insert(page, bytes);
                        }
                        HostAction::FinishRevoke { token, .. } => {
                            self.hosts[h].revoke_finished(self.now, token, None)
                        }
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

    fn connect(&mut self, h: usize, conn: u64, pid: i32) {
        let creds = Credentials {
            pid,
            uid: 0,
            gid: 0,
        };
        self.hosts[h].app_connected(self.now, conn, creds);
    }

    /// An attached process: Main `conn`, Thread `conn + 1`.
    fn attach(&mut self, h: usize, conn: u64, pid: i32) {
        self.connect(h, conn, pid);
        self.connect(h, conn + 1, pid);
        let mut name = [0u8; IPC_NAME_BYTES];
        name[..4].copy_from_slice(b"prog");
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
        self.step_until(|net| net.last(h, conn).is_some());
        let Some(IpcMessage::Welcome { session, .. }) = self.last(h, conn) else {
            panic!("no welcome: {:?}", self.last(h, conn));
        };
        self.send(h, conn + 1, 2, hello(Role::Thread, session));
    }

    fn last(&self, h: usize, conn: u64) -> Option<IpcMessage> {
        self.app
            .iter()
            .rev()
            .find(|m| m.0 == h && m.1 == conn)
            .map(|m| m.3)
    }

    fn on(&self, h: usize, conn: u64) -> Vec<(IpcMessage, Vec<u8>)> {
        self.app
            .iter()
            .filter(|m| m.0 == h && m.1 == conn)
            .map(|m| (m.3, m.4.clone()))
            .collect()
    }

    fn step_until(&mut self, done: impl Fn(&Net) -> bool) {
        for _ in 0..400 {
            if done(self) {
                return;
            }
            self.step(10);
        }
        assert!(done(self), "condition not reached in 4000 ticks");
    }

    /// A launcher on host 1 (Admin conn 100) launches a program: its id.
    fn launch(&mut self) -> u64 {
        self.connect(0, 100, 50);
        self.send(0, 100, 1, IpcMessage::admin_hello(50));
        let spec = WorkerSpec {
            path: b"/bin/prog".to_vec(),
            argv: vec![b"prog".to_vec()],
            ..WorkerSpec::default()
        };
        self.hosts[0].app_launch(self.now, 100, 7, spec.encode());
        self.settle();
        match self.last(0, 100) {
            Some(IpcMessage::Launched { program }) => program,
            other => panic!("not launched: {other:?}"),
        }
    }
}

#[test]
fn a_launch_starts_one_worker_and_its_events_reach_the_launcher_once_in_order() {
    let mut net = Net::new();
    net.lossy = true;
    let program = net.launch();
    net.step_until(|net| !net.started.is_empty());
    net.step(2000);
    assert_eq!(
        net.started.len(),
        1,
        "one worker, however often the launch came"
    );
    assert_eq!(net.started[0].0, 1);
    assert_eq!(net.started[0].1, program);
    let spec = WorkerSpec::decode(&net.started[0].2).unwrap();
    assert_eq!(spec.path, b"/bin/prog");

    net.hosts[1].worker_event(net.now, program, WorkerEvent::Started { pid: 4242 });
    let mut expected = Vec::new();
    for i in 0..40u32 {
        let bytes = format!("line {i}\n").into_bytes();
        expected.extend_from_slice(&bytes);
        let event = WorkerEvent::Output { stream: 1, bytes };
        net.hosts[1].worker_event(net.now, program, event);
    }
    net.hosts[1].worker_event(net.now, program, WorkerEvent::Exited(WorkerExit::Code(7)));
    net.settle();
    net.step_until(|net| {
        net.on(0, 100).iter().any(|(m, _)| {
            matches!(
                m,
                IpcMessage::WorkerReport {
                    what: REPORT_EXIT_CODE,
                    ..
                }
            )
        })
    });
    net.step(3000);
    let reports: Vec<(IpcMessage, Vec<u8>)> = net
        .on(0, 100)
        .into_iter()
        .filter(|(m, _)| matches!(m, IpcMessage::WorkerReport { .. }))
        .collect();
    assert!(matches!(
        reports[0].0,
        IpcMessage::WorkerReport {
            node: 2,
            what: REPORT_STARTED,
            value: 4242,
            ..
        }
    ));
    let mut output = Vec::new();
    for (message, data) in &reports[1..reports.len() - 1] {
        let IpcMessage::WorkerReport {
            what, len_bytes, ..
        } = *message
        else {
            unreachable!()
        };
        assert_eq!(what, REPORT_STDOUT);
        assert_eq!(len_bytes as usize, data.len());
        output.extend_from_slice(data);
    }
    assert_eq!(output, expected, "every byte once, in order");
    assert!(matches!(
        reports.last().unwrap().0,
        IpcMessage::WorkerReport {
            what: REPORT_EXIT_CODE,
            value: 7,
            ..
        }
    ));
    assert_eq!(
        net.hosts[1].worker_backlog_bytes(program),
        0,
        "all acknowledged"
    );
}

#[test]
fn a_spawned_thread_reaches_the_instance_once_even_before_it_serves_threads() {
    let mut net = Net::new();
    net.lossy = true;
    let program = net.launch();
    net.attach(0, 10, 1000);
    net.attach(1, 20, 2000);
    net.step_until(|net| !net.started.is_empty());
    // The main instance serves threads; the worker not yet.
    net.send(0, 11, 3, IpcMessage::ServeThreads { program });
    assert_eq!(net.last(0, 11), Some(IpcMessage::Pong));
    net.send(
        0,
        11,
        4,
        IpcMessage::SpawnThread {
            program,
            node: 2,
            record_addr: BASE + 512,
        },
    );
    net.step(500);
    assert!(
        !net.on(0, 11)
            .iter()
            .any(|(m, _)| matches!(m, IpcMessage::ThreadSpawned { .. })),
        "answered before the thread reached an instance"
    );
    net.send(1, 21, 5, IpcMessage::ServeThreads { program });
    net.step_until(|net| {
        net.on(0, 11)
            .iter()
            .any(|(m, _)| matches!(m, IpcMessage::ThreadSpawned { .. }))
    });
    net.step(3000);
    let runs: Vec<IpcMessage> = net
        .on(1, 21)
        .into_iter()
        .map(|(m, _)| m)
        .filter(|m| matches!(m, IpcMessage::RunThread { .. }))
        .collect();
    assert_eq!(runs.len(), 1, "the thread ran once: {runs:?}");
    let IpcMessage::RunThread {
        thread,
        record_addr,
    } = runs[0]
    else {
        unreachable!()
    };
    assert_eq!(record_addr, BASE + 512);
    assert!(net
        .on(0, 11)
        .iter()
        .any(|(m, _)| *m == IpcMessage::ThreadSpawned { thread }));

    // A local spawn goes straight to this node's serving connection.
    net.send(
        1,
        21,
        6,
        IpcMessage::SpawnThread {
            program,
            node: 2,
            record_addr: BASE + 1024,
        },
    );
    assert!(matches!(
        net.last(1, 21),
        Some(IpcMessage::ThreadSpawned { .. })
    ));
    assert_eq!(
        net.on(1, 21)
            .iter()
            .filter(|(m, _)| matches!(m, IpcMessage::RunThread { .. }))
            .count(),
        2
    );

    // Stopping the program tells both instances and ends the worker.
    net.send(0, 100, 8, IpcMessage::StopProgram { program });
    net.step_until(|net| net.last(1, 21) == Some(IpcMessage::StopThreads));
    assert!(net.stopped.contains(&(1, program)));
    assert_eq!(net.last(0, 11), Some(IpcMessage::StopThreads));
}

#[test]
fn spawns_that_cannot_run_are_refused_with_a_reason() {
    let mut net = Net::new();
    let program = net.launch();
    net.attach(0, 10, 1000);
    let refused = |net: &mut Net, program, node| {
        net.send(
            0,
            11,
            9,
            IpcMessage::SpawnThread {
                program,
                node,
                record_addr: BASE,
            },
        );
        net.step_until(|net| matches!(net.last(0, 11), Some(IpcMessage::Error { .. })));
        match net.last(0, 11) {
            Some(IpcMessage::Error { code, .. }) => code,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(refused(&mut net, program, 7), ErrorCode::InvalidArgument);
    assert_eq!(refused(&mut net, program + 99, 2), ErrorCode::NoInstance);
    // A Launch frame without its spec (the driver reads the spec) is refused.
    net.send(0, 100, 3, IpcMessage::Launch { spec_len: 10 });
    assert!(matches!(
        net.last(0, 100),
        Some(IpcMessage::Error {
            code: ErrorCode::BadFrame,
            ..
        })
    ));
}
