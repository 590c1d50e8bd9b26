//! A simulated program with threads on every node, and its checkers.
//!
//! A launcher (an administrative connection on node 1) launches one program; each
//! other node's host asks for a worker instance, and a live process of that node (and
//! one of node 1) serves the program's threads on a connection of its own. Worker
//! instances write output, which the host streams to the launcher. Any thread of a
//! node with an instance may spawn a thread: it allocates a record block (never
//! published), asks for the thread on a random node, and once answered joins it by
//! reading the record's word until the thread's value is there. The spawned thread is
//! a job of the serving process on the target node: it writes its value into the
//! record (faulting the page over like any access).
//!
//! Checkers (under every fault):
//! - launch once: a node starts at most one worker per program;
//! - thread runs once, where asked: a record reaches a serving connection at most
//!   once, on the node the spawn named, and never after its spawn was refused;
//! - answered after delivery: `ThreadSpawned` comes only once the thread reached its
//!   node's instance;
//! - join results: a join reads the value the thread wrote (0 before; anything else is
//!   a violation, besides the coherence checker's own);
//! - output stream: what the launcher heard of a worker's output is always a prefix of
//!   what the worker wrote (no loss, repeat or reorder), and all of it once healed.

use gallocy_core::ipc::REPORT_STDOUT;
use gallocy_core::programs::{WorkerEvent, WorkerSpec};

use super::*;

/// Bytes of a thread record (the word is at its start).
pub(super) const RECORD_BYTES: u64 = 64;
/// Reads a join makes before it gives up (its thread's process may have ended).
const MAX_JOIN_READS: u32 = 64;

pub(super) struct SimProgram {
    id: u64,
    origin: usize,
    launcher: ConnId,
    /// Per node: the process and connection serving the program's threads.
    serving: BTreeMap<usize, (i32, ConnId)>,
    /// Nodes whose host asked for a worker instance.
    workers: BTreeSet<usize>,
    output_sent: BTreeMap<usize, Vec<u8>>,
    output_heard: BTreeMap<usize, Vec<u8>>,
    /// Per node, the life it had at the launch: a node restarted since left the
    /// program, like one that went down.
    lives: Vec<u64>,
}

/// One spawned thread, by its record's address.
#[derive(Clone, Copy, Debug)]
pub(super) struct SimThread {
    target: usize,
    value: u64,
    runs: u32,
    /// The spawn's answer: Some(true) spawned, Some(false) refused.
    answered: Option<bool>,
}

/// The launcher's state before its program exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Launch {
    NotYet,
    Asked { conn: ConnId },
    Done,
}

impl World {
    pub(super) fn manage_program(&mut self) {
        if self.launch == Launch::NotYet && self.issuing {
            let leader = self.slots[0]
                .host
                .as_ref()
                .is_some_and(|h| h.node().leader_id().is_some());
            if leader {
                let conn = self.open_conn(0, 0, ConnKind::Launcher);
                self.send(0, conn, 1, IpcMessage::admin_hello(0));
                let spec = WorkerSpec {
                    path: b"/sim/program".to_vec(),
                    argv: vec![b"program".to_vec()],
                    ..WorkerSpec::default()
                };
                let now = self.now_ticks;
                if let Some(host) = self.slots[0].host.as_mut() {
                    host.app_launch(now, conn, 2, spec.encode());
                }
                self.pump(0);
                self.launch = Launch::Asked { conn };
            }
        }
        let Some(program) = self.program.as_ref() else {
            return;
        };
        let id = program.id;
        let wanted: Vec<usize> = (0..self.slots.len())
            .filter(|&i| i == program.origin || program.workers.contains(&i))
            .filter(|i| {
                program
                    .serving
                    .get(i)
                    .is_none_or(|&(pid, _)| !sync::is_live(&self.slots, *i, pid))
            })
            .collect();
        for index in wanted {
            self.serve_program(index, id);
        }
        if !self.issuing {
            return;
        }
        // Workers write output now and then.
        let workers: Vec<usize> = self
            .program
            .as_ref()
            .expect("present")
            .workers
            .iter()
            .copied()
            .collect();
        for index in workers {
            if self.slots[index].host.is_none() || !self.rng.gen_ratio(1, 150) {
                continue;
            }
            let program = self.program.as_mut().expect("present");
            let sent = program.output_sent.entry(index).or_default();
            let bytes = format!("{}:{};", index + 1, sent.len()).into_bytes();
            sent.extend_from_slice(&bytes);
            self.counters.output_bytes += bytes.len() as u64;
            let now = self.now_ticks;
            let event = WorkerEvent::Output { stream: 1, bytes };
            if let Some(host) = self.slots[index].host.as_mut() {
                host.worker_event(now, id, event);
            }
            self.pump(index);
        }
    }

    /// A live attached process of node `index` serves the program's threads.
    fn serve_program(&mut self, index: usize, program: u64) {
        let candidates: Vec<(i32, SessionId)> = self.slots[index]
            .processes
            .values()
            .filter(|p| p.phase == ProcPhase::Live)
            .filter_map(|p| p.session.map(|s| (p.pid, s)))
            .collect();
        if candidates.is_empty() || self.slots[index].host.is_none() {
            return;
        }
        let (pid, session) = candidates[self.rng.gen_range(0..candidates.len())];
        let conn = self.open_conn(index, pid, ConnKind::Serve);
        let hello = IpcMessage::Hello {
            role: Role::Thread,
            session,
            pid: pid as u32,
            create: false,
            persistent: false,
            replicas: self.params.replicas,
            name: [0u8; IPC_NAME_BYTES],
        };
        self.send(index, conn, 1, hello);
        self.send(index, conn, 2, IpcMessage::ServeThreads { program });
        if let Some(p) = self.program.as_mut() {
            p.serving.insert(index, (pid, conn));
        }
    }

    /// Frames to the launcher and to serving connections (not process threads).
    pub(super) fn on_program_frame(
        &mut self,
        index: usize,
        conn: ConnId,
        kind: ConnKind,
        message: IpcMessage,
    ) {
        match (kind, message) {
            (ConnKind::Launcher, IpcMessage::Launched { program }) => {
                self.trace.event(23, &[program]);
                self.counters.programs_launched += 1;
                self.launch = Launch::Done;
                self.program = Some(SimProgram {
                    id: program,
                    origin: index,
                    launcher: conn,
                    serving: BTreeMap::new(),
                    workers: BTreeSet::new(),
                    output_sent: BTreeMap::new(),
                    output_heard: BTreeMap::new(),
                    lives: self.slots.iter().map(|s| s.incarnation).collect(),
                });
            }
            (ConnKind::Launcher, IpcMessage::Error { .. }) => {
                // Refused for now (busy): ask again later.
                self.launch = Launch::NotYet;
            }
            (ConnKind::Serve, IpcMessage::Error { .. }) => {
                // Not an instance (yet): another process tries later.
                if let Some(p) = self.program.as_mut() {
                    if p.serving.get(&index).is_some_and(|&(_, c)| c == conn) {
                        p.serving.remove(&index);
                    }
                }
            }
            (ConnKind::Launcher, IpcMessage::Pong | IpcMessage::WorkerReport { .. })
            | (ConnKind::Serve, IpcMessage::Pong | IpcMessage::StopThreads) => {}
            (kind, message) => self.violate(
                "protocol",
                format!(
                    "node {} sent {message:?} on a {kind:?} connection",
                    index + 1
                ),
            ),
        }
    }

    /// The host asks for this node's worker instance.
    pub(super) fn on_start_worker(&mut self, index: usize, program: u64) {
        let now = self.now_ticks;
        let Some(p) = self.program.as_mut() else {
            // The launch's answer is still on its way: the host asked first.
            self.early_workers.push((index, program));
            return;
        };
        if p.id != program {
            return self.violate(
                "launch once",
                format!("node {} started unknown program {program:#x}", index + 1),
            );
        }
        if !p.workers.insert(index) {
            return self.violate(
                "launch once",
                format!(
                    "node {} started a second worker of program {program:#x}",
                    index + 1
                ),
            );
        }
        self.counters.workers_started += 1;
        if let Some(host) = self.slots[index].host.as_mut() {
            host.worker_event(now, program, WorkerEvent::Started { pid: 1 });
        }
        self.pump(index);
    }

    /// Workers whose start came before the program's id reached the launcher.
    pub(super) fn start_early_workers(&mut self) {
        if self.program.is_none() {
            return;
        }
        for (index, program) in std::mem::take(&mut self.early_workers) {
            self.on_start_worker(index, program);
        }
    }

    /// Output the launcher hears.
    pub(super) fn on_launcher_data(&mut self, frame: &Frame, data: &[u8]) {
        let Ok((_, IpcMessage::WorkerReport { node, what, .. })) = IpcMessage::decode(frame) else {
            return;
        };
        if what != REPORT_STDOUT {
            return;
        }
        let Some(program) = self.program.as_mut() else {
            return;
        };
        let index = (node as usize).wrapping_sub(1);
        let heard = program.output_heard.entry(index).or_default();
        heard.extend_from_slice(data);
        let sent = program.output_sent.get(&index).map_or(&[][..], |s| &s[..]);
        if !sent.starts_with(heard) {
            let detail = format!(
                "the launcher heard {:?} from node {node}'s worker, which wrote {:?}",
                String::from_utf8_lossy(heard),
                String::from_utf8_lossy(sent)
            );
            self.violate("output stream", detail);
        }
    }

    /// Whether every byte each live worker wrote has reached a live launcher.
    pub fn output_settled(&self) -> bool {
        let Some(program) = self.program.as_ref() else {
            return true;
        };
        // A node some node declared down has left the program (the origin's workers
        // end with it; a worker declared down ends its stream).
        let gone = |index: usize| {
            self.slots[index].host.is_none()
                || self.slots[index].incarnation != program.lives[index]
                || self.slots.iter().filter_map(|s| s.host.as_ref()).any(|h| {
                    matches!(
                        h.node().meta().nodes.get(&(index as NodeId + 1)),
                        Some(gallocy_core::meta::NodeStatus::Down)
                    )
                })
        };
        if gone(program.origin) {
            return true;
        }
        program.output_sent.iter().all(|(index, sent)| {
            gone(*index) || program.output_heard.get(index).map_or(0, |h| h.len()) == sent.len()
        })
    }

    pub(super) fn is_launcher(&self, index: usize, conn: ConnId) -> bool {
        self.program
            .as_ref()
            .is_some_and(|p| p.origin == index && p.launcher == conn)
    }

    // -----------------------------------------------------------------------------
    // Spawns and joins.

    /// Starts a spawn from this thread (allocating its record); false if the program
    /// has no instance on this node.
    pub(super) fn start_spawn(&mut self, index: usize, pid: i32, thread: usize) -> bool {
        let Some(program) = self.program.as_ref() else {
            return false;
        };
        let hosted = self.slots[index]
            .host
            .as_ref()
            .is_some_and(|h| h.hosts_program(program.id));
        if !hosted {
            return false;
        }
        let op = self.new_op(index, pid, thread, OpKind::AllocateRecord);
        let conn = self.slots[index].processes[&pid].threads[thread].conn;
        let allocate = IpcMessage::Allocate {
            size_bytes: RECORD_BYTES,
            align_bytes: 16,
        };
        self.send(index, conn, op.id, allocate);
        true
    }

    /// The record is allocated: the spawner clears its word (a new block holds what
    /// its memory held before), then sends the spawn as its next operation.
    pub(super) fn init_record(&mut self, index: usize, pid: i32, thread: usize, record: u64) {
        // The workload may still write the block that was here before (an access
        // issued before its free), and a late spawn of an old space's record may still
        // arrive: such a block is not used as a record.
        let end = record + RECORD_BYTES;
        let touched = self.slots.iter().any(|slot| {
            slot.processes.values().any(|p| {
                p.threads.iter().any(|t| {
                    matches!(t.pending.map(|op| op.kind),
                        Some(OpKind::Read { addr } | OpKind::Write { addr, .. } | OpKind::JoinRead { addr })
                            if (record..end).contains(&addr))
                })
            })
        });
        if touched || self.stale_records.contains(&record) {
            self.counters.records_unused += 1;
            return self.finish_op(index, pid, thread);
        }
        self.counters.ops_completed += 1;
        if let Some(p) = self.slots[index].processes.get_mut(&pid) {
            p.threads[thread].spawn_next = Some(record);
        }
        let clear = OpKind::Write {
            addr: record,
            value: 0,
        };
        let op = self.new_op(index, pid, thread, clear);
        self.access(index, pid, thread, op, false);
    }

    /// The record is ready: ask for the thread on a random member (of the cluster as
    /// the spawner's node knows it: a node not yet added, or removed, is no target).
    pub(super) fn spawn_with_record(&mut self, index: usize, pid: i32, thread: usize, record: u64) {
        let Some(program) = self.program.as_ref().map(|p| p.id) else {
            return;
        };
        let Some(members) = self.slots[index].host.as_ref().map(|h| {
            h.node()
                .meta()
                .nodes
                .keys()
                .map(|&id| id as usize - 1)
                .collect::<Vec<usize>>()
        }) else {
            return;
        };
        if members.is_empty() {
            return;
        }
        let target = members[self.rng.gen_range(0..members.len())];
        let value = (self.next_op_id << 8) | 0x5a;
        self.sim_threads.insert(
            record,
            SimThread {
                target,
                value,
                runs: 0,
                answered: None,
            },
        );
        let op = self.new_op(index, pid, thread, OpKind::Spawn { record });
        let conn = self.slots[index].processes[&pid].threads[thread].conn;
        let spawn = IpcMessage::SpawnThread {
            program,
            node: target as NodeId + 1,
            record_addr: record,
        };
        self.send(index, conn, op.id, spawn);
    }

    /// A spawn answered `ThreadSpawned`: the thread joins it next.
    pub(super) fn on_spawned(&mut self, index: usize, pid: i32, thread: usize, record: u64) {
        if let Some(st) = self.sim_threads.get_mut(&record) {
            st.answered = Some(true);
            let (runs, target) = (st.runs, st.target);
            self.trace.event(24, &[record, 1]);
            self.counters.threads_spawned += 1;
            if runs == 0 {
                self.violate(
                    "answered after delivery",
                    format!(
                        "a spawn to node {} was answered before its thread reached that node's instance",
                        target + 1
                    ),
                );
            }
            if let Some(p) = self.slots[index].processes.get_mut(&pid) {
                p.threads[thread].join = Some((record, 0));
            }
        }
        self.finish_op(index, pid, thread);
    }

    /// A spawn failed; `never_runs`: refused (no instance there), so its thread must
    /// never run (after a node-down answer it may have).
    pub(super) fn spawn_refused(&mut self, record: u64, never_runs: bool) {
        let Some(st) = self.sim_threads.get_mut(&record) else {
            return;
        };
        if !never_runs {
            st.answered = Some(true);
            self.counters.spawns_refused += 1;
            return;
        }
        st.answered = Some(false);
        let (runs, target) = (st.runs, st.target);
        self.trace.event(24, &[record, 0]);
        self.counters.spawns_refused += 1;
        if runs > 0 {
            self.violate(
                "thread runs once",
                format!(
                    "a thread ran on node {} though its spawn was refused",
                    target + 1
                ),
            );
        }
    }

    /// The host hands a thread to a serving connection.
    pub(super) fn on_run_thread(&mut self, index: usize, conn: ConnId, record: u64) {
        let Some(&(pid, ConnKind::Serve)) = self.slots[index].conns.get(&conn) else {
            return self.violate(
                "protocol",
                format!(
                    "node {} sent a thread to a connection that does not serve threads",
                    index + 1
                ),
            );
        };
        self.trace.event(25, &[index as u64, record]);
        if !self.sim_threads.contains_key(&record) && self.stale_records.contains(&record) {
            // Its space is gone; so is the block it would write.
            return;
        }
        let Some(st) = self.sim_threads.get_mut(&record) else {
            return self.violate(
                "thread runs once",
                format!(
                    "node {} ran a thread nobody spawned (record {record:#x})",
                    index + 1
                ),
            );
        };
        st.runs += 1;
        let st = *st;
        self.counters.threads_ran += 1;
        if st.runs > 1 {
            return self.violate(
                "thread runs once",
                format!(
                    "the thread with record {record:#x} ran {} times on node {}",
                    st.runs,
                    index + 1
                ),
            );
        }
        if st.target != index {
            return self.violate(
                "thread runs once",
                format!(
                    "a thread spawned to node {} ran on node {}",
                    st.target + 1,
                    index + 1
                ),
            );
        }
        if st.answered == Some(false) {
            return self.violate(
                "thread runs once",
                format!(
                    "a thread ran on node {} though its spawn was refused",
                    index + 1
                ),
            );
        }
        self.thread_jobs
            .entry((index, pid))
            .or_default()
            .push_back((record, st.value));
    }

    /// A serving process's thread runs a job if it has one: the thread writes its value.
    pub(super) fn take_job(&mut self, index: usize, pid: i32) -> Option<(u64, u64)> {
        let jobs = self.thread_jobs.get_mut(&(index, pid))?;
        let job = jobs.pop_front();
        if jobs.is_empty() {
            self.thread_jobs.remove(&(index, pid));
        }
        job
    }

    /// A join's read of its record returned `value`.
    pub(super) fn on_join_read(
        &mut self,
        index: usize,
        pid: i32,
        thread: usize,
        record: u64,
        value: u64,
    ) {
        let expected = self.sim_threads.get(&record).map(|t| t.value);
        let Some(process) = self.slots[index].processes.get_mut(&pid) else {
            return;
        };
        let Some((_, reads)) = process.threads[thread].join else {
            return;
        };
        if Some(value) == expected {
            process.threads[thread].join = None;
            self.counters.joins += 1;
            self.trace.event(26, &[record, value]);
        } else if value != 0 {
            process.threads[thread].join = None;
            self.violate(
                "join results",
                format!(
                    "a join read {value:#x} from its record, the thread's value is {expected:?}"
                ),
            );
        } else if reads + 1 >= MAX_JOIN_READS {
            process.threads[thread].join = None;
            self.counters.joins_given_up += 1;
        } else {
            process.threads[thread].join = Some((record, reads + 1));
        }
    }
}
