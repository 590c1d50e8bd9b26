//! gallocy-sim: the deterministic simulator of gallocy.
//!
//! N `gallocy_core::Node`s exchange frames over a turmoil network with loss,
//! duplication, delay, reordering, partitions and crashes; simulated applications run
//! random workloads; checkers verify coherence, memory consistency, allocation safety
//! and liveness. Same seed and flags, same trace hash.

pub mod disk;
pub mod ghost;
pub mod run;
pub mod trace;
pub mod world;

pub use run::{run, FaultMode, RunParams, RunReport};

/// The planted bugs, re-exported for the CLI and tests.
pub use gallocy_core::node::Mutant;

impl RunReport {
    /// The human summary `gallocy-sim run` prints, ending with the trace hash.
    pub fn summary(&self) -> String {
        let c = &self.counters;
        let wall_s = self.wall.as_secs_f64().max(1e-9);
        let mut out = String::new();
        out.push_str(&format!("command:      {}\n", self.params.command()));
        out.push_str(&format!(
            "operations:   {} issued, {} completed ({} reads, {} writes, {} allocations, {} frees of which {} remote, {} bad frees rejected)\n",
            c.ops_issued, c.ops_completed, c.reads, c.writes, c.allocations, c.frees, c.remote_frees_ok, c.invalid_frees_rejected
        ));
        out.push_str(&format!(
            "failures:     {} page lost, {} owner down, {} evicted, {} not mapped, {} out of memory, {} busy\n",
            c.page_lost, c.node_down_errors, c.evicted_errors, c.not_mapped, c.out_of_memory, c.busy
        ));
        out.push_str(&format!(
            "processes:    {} started, {} exited, {} killed by their host, {} detached\n",
            c.processes_started, c.processes_exited, c.processes_killed, c.detaches
        ));
        out.push_str(&format!(
            "spaces:       {} drains of every process, {} space drops on nodes, {} new spaces after one was destroyed, {} persistent creations, {} unpersists; {} chunk runs released, {} free again\n",
            c.drains, c.spaces_dropped, c.new_spaces, c.persistent_creates, c.unpersists, c.runs_released, c.runs_freed
        ));
        out.push_str(&format!(
            "locks:        {} created, {} acquisitions, {} timed out, {} condvar waits, {} signals; futex: {} waits ({} woken, {} value changed, {} timed out, {} no copy), {} wakes\n",
            c.locks_created, c.locks_acquired, c.lock_gave_up, c.cond_waits, c.cond_signals, c.futex_waits, c.futex_woken,
            c.futex_value_changed, c.futex_timed_out, c.futex_no_copy, c.futex_wakes
        ));
        out.push_str(&format!(
            "threads:      {} programs, {} workers, {} spawned, {} ran, {} refused, {} joined ({} gave up); {} output bytes\n",
            c.programs_launched, c.workers_started, c.threads_spawned, c.threads_ran, c.spawns_refused, c.joins,
            c.joins_given_up, c.output_bytes
        ));
        out.push_str(&format!(
            "messages:     {} sent, {} delivered, {} retries, {} rejected, {} malformed; {} page faults to the node, {} revocations; {} log compactions, {} snapshots installed\n",
            c.frames_sent, c.frames_delivered, self.retries, self.rejected_messages, self.malformed_frames, c.faults_requested, c.revokes, self.log_compactions, self.snapshots_installed
        ));
        out.push_str(&format!(
            "faults:       {} dropped, {} duplicated (loss {:.3}, dup {:.3}, latency <= {} ms), {} partitions, {} one-way, {} crashes, {} restarts from disk, {} members added, {} removed; {} leader changes seen\n",
            c.frames_dropped, c.frames_duplicated, self.plan.loss_rate, self.plan.duplicate_rate, self.plan.max_latency_ms,
            self.faults.partitions, self.faults.one_way_partitions, self.faults.crashes, self.faults.restarts, c.members_added, c.members_removed, self.leader_changes_seen
        ));
        out.push_str(&format!(
            "recovery:     {} pages rebuilt from survivors' copies, {} served from their master after their writer went down, {} rejoins\n",
            self.pages_recovered, self.pages_reverted, self.rejoins
        ));
        out.push_str(&format!(
            "replication:  k = {}; {} syncs answered, {} flushes applied at homes, {} backups sent, {} pages backed up, {} repaired\n",
            self.plan.replicas, self.counters.syncs, self.flushes_applied, self.backups_sent, self.backups_kept, self.pages_repaired
        ));
        out.push_str(&format!(
            "time:         {:.3} s simulated, {:.3} s wall, {:.0} messages/s\n",
            self.sim_ticks as f64 / 1000.0,
            wall_s,
            c.frames_delivered as f64 / wall_s
        ));
        match &self.violation {
            None => out.push_str("checkers:     coherence, memory consistency, allocation safety, space lifetime, mutual exclusion, no lost wake-up, launch once, thread runs once, answered after delivery, join results, output stream, liveness: all hold\n"),
            Some(v) => out.push_str(&format!(
                "VIOLATION:    {} broken at step {} (tick {}), seed {}: {}\n",
                v.checker, v.step, v.tick, self.params.seed, v.detail
            )),
        }
        out.push_str(&format!("trace-hash: {:016x}\n", self.trace_hash));
        out
    }
}

/// The outcome of a sweep over many seeds.
pub struct SweepOutcome {
    pub seeds: u64,
    /// Failing seeds, with the line to print for each.
    pub failures: Vec<(u64, String)>,
    pub frames_delivered: u64,
    pub wall: std::time::Duration,
}

/// Runs `template` for every seed in `seeds` on `jobs` threads. `on_done(finished,
/// failures_so_far, failure_line)` is called after each seed.
pub fn sweep(
    seeds: std::ops::Range<u64>,
    template: &RunParams,
    jobs: usize,
    on_done: &(dyn Fn(u64, usize, Option<&str>) + Sync),
) -> SweepOutcome {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    let started = std::time::Instant::now();
    let next = AtomicU64::new(seeds.start);
    let done = AtomicU64::new(0);
    let frames = AtomicU64::new(0);
    let failures: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::SeqCst);
                if seed >= seeds.end {
                    return;
                }
                let report = run(RunParams {
                    seed,
                    ..template.clone()
                });
                frames.fetch_add(report.counters.frames_delivered, Ordering::Relaxed);
                let line = report.violation.as_ref().map(|v| {
                    format!(
                        "FAIL seed {seed}: {} at step {}: {}\n  reproduce: {}",
                        v.checker,
                        v.step,
                        v.detail,
                        report.params.command()
                    )
                });
                let count = {
                    let mut failures = failures.lock().expect("no poisoning");
                    if let Some(line) = &line {
                        failures.push((seed, line.clone()));
                    }
                    failures.len()
                };
                let finished = done.fetch_add(1, Ordering::SeqCst) + 1;
                on_done(finished, count, line.as_deref());
            });
        }
    });
    let mut failures = failures.into_inner().expect("no poisoning");
    failures.sort_by_key(|(seed, _)| *seed);
    SweepOutcome {
        seeds: seeds.end - seeds.start,
        failures,
        frames_delivered: frames.load(Ordering::Relaxed),
        wall: started.elapsed(),
    }
}
