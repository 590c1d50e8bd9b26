//! One simulation run: the world on a turmoil network, a fault plan drawn from the seed,
//! a workload phase with faults, then a healed phase that checks liveness.

use std::cell::RefCell;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use gallocy_core::node::Mutant;
use gallocy_core::wire::MAX_FRAME_BYTES;
use gallocy_core::{Config, NodeId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::world::{Counters, Violation, World, WorldParams};

const PEER_PORT: u16 = 7000;
/// Simulated milliseconds per step; one node tick each.
/// Simulated time per turmoil step. Node time is in milliseconds (1 tick = 1 ms);
/// a step advances it by this much (nodes tick once per step, `now` jumping by 2). Two milliseconds halves turmoil's per-step cost,
/// which dominates the simulator's wall time, while latencies stay finer than any
/// protocol timeout.
const STEP_MS: u64 = 2;
const TICK: Duration = Duration::from_millis(STEP_MS);
/// The workload phase ends after this long even if operations are still to be issued.
const WORKLOAD_LIMIT_TICKS: u64 = 300_000;
/// After the final heal, every pending operation of a live node must complete within this.
pub const LIVENESS_BOUND_TICKS: u64 = 30_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultMode {
    None,
    Loss,
    Partition,
    Crash,
    All,
}

impl FaultMode {
    pub fn name(self) -> &'static str {
        match self {
            FaultMode::None => "none",
            FaultMode::Loss => "loss",
            FaultMode::Partition => "partition",
            FaultMode::Crash => "crash",
            FaultMode::All => "all",
        }
    }
    fn network(self) -> bool {
        matches!(self, FaultMode::Loss | FaultMode::All)
    }
    fn partitions(self) -> bool {
        matches!(self, FaultMode::Partition | FaultMode::All)
    }
    fn crashes(self) -> bool {
        matches!(self, FaultMode::Crash | FaultMode::All)
    }
}

#[derive(Clone, Debug)]
pub struct RunParams {
    pub seed: u64,
    pub nodes: usize,
    pub ops: u64,
    pub faults: FaultMode,
    pub mutant: Option<Mutant>,
}

impl RunParams {
    /// The command line that reproduces this run.
    pub fn command(&self) -> String {
        let mut command = format!(
            "gallocy-sim run --seed {} --nodes {} --ops {} --faults {}",
            self.seed,
            self.nodes,
            self.ops,
            self.faults.name()
        );
        if let Some(mutant) = self.mutant {
            command.push_str(&format!(" --mutant {}", mutant.name()));
        }
        command
    }
}

/// The intensities drawn for one seed (swarm testing: each seed its own mix).
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    pub loss_rate: f64,
    pub duplicate_rate: f64,
    pub max_latency_ms: u64,
    pub max_revoke_delay_ticks: u64,
    /// Mean ticks between partitions (0: none).
    pub partition_every_ticks: u64,
    pub crash_ticks: Vec<u64>,
    /// Per crash (same order): restarted from its disk this long after, or never.
    pub restart_after_ticks: Vec<Option<u64>>,
    /// Per crash never restarted (same order): removed from the cluster this long
    /// after, or never.
    pub remove_after_ticks: Vec<Option<u64>>,
    /// The last node starts outside the first configuration and is added at this tick.
    pub join_tick: Option<u64>,
    /// Crashes come right after a sync is answered, on the node that synced (its
    /// synced writes must already be on the other copies), instead of at their ticks.
    pub crash_after_sync: bool,
    /// k of the workload's spaces: every page on this many nodes before another
    /// node's process sees it, and synced writes survive k - 1 crashes.
    pub replicas: u8,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct FaultCounters {
    pub partitions: u64,
    pub one_way_partitions: u64,
    pub crashes: u64,
    pub restarts: u64,
}

#[derive(Clone, Debug)]
pub struct RunReport {
    pub params: RunParams,
    pub plan: FaultPlan,
    pub counters: Counters,
    pub faults: FaultCounters,
    pub sim_ticks: u64,
    pub wall: Duration,
    pub trace_hash: u64,
    pub violation: Option<Violation>,
    pub malformed_frames: u64,
    pub rejected_messages: u64,
    pub retries: u64,
    /// Of the nodes up at the end: log compactions and snapshots installed.
    pub log_compactions: u64,
    pub snapshots_installed: u64,
    /// Of the nodes up at the end: pages rebuilt from survivors' copies after their
    /// home went down, and pages served from the master again after their writer did.
    pub pages_recovered: u64,
    pub pages_reverted: u64,
    /// Of the nodes up at the end: flushes that replaced a master, backups sent by
    /// homes and pages backed up on nodes.
    pub flushes_applied: u64,
    pub backups_sent: u64,
    pub backups_kept: u64,
    /// Of the nodes up at the end: pages whose lost copies their home made again.
    pub pages_repaired: u64,
    /// Of the nodes up at the end: restarted nodes applied back up.
    pub rejoins: u64,
    pub leader_changes_seen: u64,
}

impl FaultPlan {
    fn draw(params: &RunParams) -> FaultPlan {
        let mut rng =
            ChaCha8Rng::seed_from_u64(params.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0xfa17);
        let mut plan = FaultPlan {
            max_latency_ms: 1,
            max_revoke_delay_ticks: 0,
            replicas: 2,
            ..FaultPlan::default()
        };
        if params.faults.network() {
            plan.loss_rate = rng.gen_range(0.0..0.08);
            plan.duplicate_rate = rng.gen_range(0.0..0.05);
            plan.max_latency_ms = rng.gen_range(2..40);
            plan.max_revoke_delay_ticks = rng.gen_range(0..8);
        } else {
            plan.max_revoke_delay_ticks = rng.gen_range(0..3);
        }
        if params.faults.partitions() {
            plan.partition_every_ticks = rng.gen_range(200..1500);
        }
        // k: 1 (no copies promised beyond the protocol's), 2 (the default) or 3.
        plan.replicas = match rng.gen_range(0..5) {
            0 => 1,
            1 | 2 => 2,
            _ => 3,
        };
        if params.faults.crashes() && params.nodes >= 3 {
            // Membership changes ride with crashes: a node joins in half the runs (the
            // first configuration is one smaller, and fewer crashes keep its majority).
            if params.nodes >= 4 && rng.gen_bool(0.5) {
                plan.join_tick = Some(rng.gen_range(200..3000));
            }
            let first_members = params.nodes - plan.join_tick.is_some() as usize;
            let max_crashes = ((first_members - 1) / 2).max(1);
            let crashes = rng.gen_range(1..=max_crashes);
            for _ in 0..crashes {
                plan.crash_ticks.push(rng.gen_range(300..4000));
            }
            plan.crash_ticks.sort_unstable();
            plan.crash_after_sync = rng.gen_bool(0.5);
            for _ in 0..crashes {
                let restart = rng.gen_bool(0.6).then(|| rng.gen_range(100..3000));
                plan.restart_after_ticks.push(restart);
                let remove =
                    (restart.is_none() && rng.gen_bool(0.5)).then(|| rng.gen_range(200..2000));
                plan.remove_after_ticks.push(remove);
            }
        }
        plan
    }
}

fn host_name(index: usize) -> String {
    format!("n{}", index + 1)
}

/// The daemon's defaults, with failure detection tightened to the simulator's time
/// scale (the same ratios the validation in `Config` demands).
fn node_config(id: NodeId, members: Vec<NodeId>) -> Config {
    let mut config = Config::new(id, members);
    config.retry_max_ticks = 400;
    config.fence_after_ticks = 300;
    config.down_after_ticks = 1500;
    config.revoke_timeout_ticks = 400;
    // Every empty region goes back at once: the release protocol runs as often as it can.
    config.retain_empty_chunks = 0;
    // Snapshots and compaction happen many times a run, and members cut off by a
    // partition catch up from a snapshot.
    config.raft_log_max_entries = 4;
    config
}

struct Partition {
    one_way: Option<(usize, usize)>,
    side_a: Vec<usize>,
    side_b: Vec<usize>,
    heal_tick: u64,
}

/// Runs one seed. A panic anywhere (a core assertion, the simulator) becomes a
/// violation of the "panic" checker instead of ending a sweep.
pub fn run(params: RunParams) -> RunReport {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_unguarded(params.clone())
    }));
    match outcome {
        Ok(report) => report,
        Err(panic) => {
            let detail = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            RunReport {
                plan: FaultPlan::draw(&params),
                params,
                counters: Counters::default(),
                faults: FaultCounters::default(),
                sim_ticks: 0,
                wall: Duration::ZERO,
                trace_hash: 0,
                violation: Some(Violation {
                    checker: "panic",
                    detail,
                    step: 0,
                    tick: 0,
                }),
                rejoins: 0,
                malformed_frames: 0,
                rejected_messages: 0,
                retries: 0,
                log_compactions: 0,
                snapshots_installed: 0,
                pages_recovered: 0,
                pages_reverted: 0,
                flushes_applied: 0,
                backups_sent: 0,
                backups_kept: 0,
                pages_repaired: 0,
                leader_changes_seen: 0,
            }
        }
    }
}

fn run_unguarded(params: RunParams) -> RunReport {
    let wall_start = Instant::now();
    let plan = FaultPlan::draw(&params);
    let world = Rc::new(RefCell::new(World::new(
        WorldParams {
            seed: params.seed,
            nodes: params.nodes,
            ops: params.ops,
            threads_per_process: 4,
            max_revoke_delay_ticks: plan.max_revoke_delay_ticks,
            mutant: params.mutant,
            joiner: plan.join_tick.map(|_| params.nodes - 1),
            replicas: plan.replicas,
        },
        node_config,
    )));
    let network = Rc::new(RefCell::new((plan.loss_rate, plan.duplicate_rate)));

    let mut sim = turmoil::Builder::new()
        .rng_seed(params.seed)
        .tick_duration(TICK)
        .min_message_latency(TICK)
        .max_message_latency(Duration::from_millis(plan.max_latency_ms.max(STEP_MS)))
        .udp_capacity(1 << 16)
        .simulation_duration(Duration::from_secs(24 * 3600))
        .build();

    for index in 0..params.nodes {
        let world = world.clone();
        let network = network.clone();
        let nodes = params.nodes;
        sim.host(host_name(index), move || {
            let world = world.clone();
            let network = network.clone();
            async move { host_loop(index, nodes, world, network).await }
        });
    }

    let mut rng = ChaCha8Rng::seed_from_u64(params.seed ^ 0x5eed_fa17);
    let mut faults = FaultCounters::default();
    let mut partition: Option<Partition> = None;
    let mut next_partition_tick = if plan.partition_every_ticks > 0 {
        300 + rng.gen_range(0..plan.partition_every_ticks)
    } else {
        u64::MAX
    };
    let mut crash_ticks = plan.crash_ticks.clone();
    let mut restart_after_ticks = plan.restart_after_ticks.clone();
    let mut remove_after_ticks = plan.remove_after_ticks.clone();
    // (tick, node index) of restarts and removals due.
    let mut restarts_due: Vec<(u64, usize)> = Vec::new();
    let mut removals_due: Vec<(u64, usize)> = Vec::new();
    let mut join_due = plan.join_tick;
    let mut crashed = vec![false; params.nodes];
    let mut heal_tick: Option<u64> = None;
    let mut leader_changes = 0u64;
    let mut last_leader = 0;
    let mut now: u64 = 0;

    loop {
        now += STEP_MS;
        {
            let mut w = world.borrow_mut();
            w.step = now / STEP_MS;
            w.tick(now);
            w.check_coherence();
            w.check_space_lifetime();
            if now.is_multiple_of(128) {
                w.check_allocators();
            }
            let leader = (0..params.nodes)
                .filter_map(|i| w.node(i))
                .find(|n| n.is_leader())
                .map_or(0, |n| n.id());
            if leader != 0 && leader != last_leader {
                leader_changes += 1;
                last_leader = leader;
                w.trace.event(8, &[leader, now]);
            }
        }

        // Restarts go on after the final heal too: a node down for good is a fault,
        // one coming back is part of the cluster's life.
        while let Some(position) = restarts_due.iter().position(|&(t, _)| t <= now) {
            let (_, victim) = restarts_due.remove(position);
            crashed[victim] = false;
            faults.restarts += 1;
            sim.bounce(host_name(victim));
            world.borrow_mut().restart(victim);
        }

        // Membership changes, asked during the workload and carried on until applied.
        if join_due.is_some_and(|t| t <= now) {
            join_due = None;
            world
                .borrow_mut()
                .request_membership(params.nodes - 1, true);
        }
        while let Some(position) = removals_due.iter().position(|&(t, _)| t <= now) {
            let (_, victim) = removals_due.remove(position);
            world.borrow_mut().request_membership(victim, false);
        }

        // Fault injection during the workload phase.
        if heal_tick.is_none() {
            // A sync just answered: in runs that do so, the next crash is now, there.
            let synced = world.borrow_mut().take_synced_node();
            if let Some(node) = synced.filter(|&i| plan.crash_after_sync && !crashed[i]) {
                if let Some(first) = crash_ticks.first_mut() {
                    *first = now;
                }
                world.borrow_mut().crash_next = Some(node);
            }
            while crash_ticks.first().is_some_and(|&t| t <= now) {
                crash_ticks.remove(0);
                let restart = restart_after_ticks.remove(0);
                let remove = remove_after_ticks.remove(0);
                let alive: Vec<usize> = (0..params.nodes).filter(|&i| !crashed[i]).collect();
                let chosen = world.borrow_mut().crash_next.take();
                let victim = chosen
                    .filter(|i| alive.contains(i))
                    .unwrap_or_else(|| alive[rng.gen_range(0..alive.len())]);
                crashed[victim] = true;
                faults.crashes += 1;
                sim.crash(host_name(victim));
                world.borrow_mut().crash(victim);
                if let Some(after) = restart {
                    restarts_due.push((now + after, victim));
                }
                if let Some(after) = remove {
                    removals_due.push((now + after, victim));
                }
            }
            if let Some(active) = &partition {
                if active.heal_tick <= now {
                    repair(&sim, active);
                    partition = None;
                    next_partition_tick =
                        now + rng.gen_range(1..=plan.partition_every_ticks.max(1));
                }
            } else if now >= next_partition_tick {
                let active = draw_partition(&mut rng, params.nodes, now);
                if active.one_way.is_some() {
                    faults.one_way_partitions += 1;
                } else {
                    faults.partitions += 1;
                }
                apply_partition(&sim, &active);
                world
                    .borrow_mut()
                    .trace
                    .event(9, &[active.side_a.len() as u64, active.heal_tick]);
                partition = Some(active);
            }
            let done = {
                let w = world.borrow();
                (w.counters.ops_issued >= params.ops && w.all_joined())
                    || now >= WORKLOAD_LIMIT_TICKS
            };
            if done {
                // The final heal: every fault stops, the workload stops issuing.
                if let Some(active) = partition.take() {
                    repair(&sim, &active);
                }
                *network.borrow_mut() = (0.0, 0.0);
                let mut w = world.borrow_mut();
                w.issuing = false;
                w.trace.event(10, &[now]);
                heal_tick = Some(now);
            }
        } else if let Some(healed) = heal_tick {
            let pending = world.borrow().pending_ops();
            let output_settled = world.borrow().output_settled();
            let repairs_unsettled = world.borrow().repairs_unsettled();
            if pending.is_empty() && output_settled && repairs_unsettled.is_empty() {
                break;
            }
            if now - healed > LIVENESS_BOUND_TICKS {
                let detail = if pending.is_empty() && output_settled {
                    format!(
                        "repairs (copies lost with a node made again) still due or running {LIVENESS_BOUND_TICKS} ms after the final heal on nodes {repairs_unsettled:?}"
                    )
                } else if pending.is_empty() {
                    format!(
                        "worker output still not all at the launcher {LIVENESS_BOUND_TICKS} ms after the final heal"
                    )
                } else {
                    format!(
                        "{} operations still pending {} ms after the final heal (node, issued at): {:?}",
                        pending.len(),
                        LIVENESS_BOUND_TICKS,
                        &pending[..pending.len().min(8)]
                    )
                };
                let mut w = world.borrow_mut();
                if w.violation.is_none() {
                    w.violation = Some(Violation {
                        checker: "liveness",
                        detail,
                        step: now / STEP_MS,
                        tick: now,
                    });
                }
                break;
            }
        }

        if world.borrow().violation.is_some() {
            break;
        }
        // Nothing to send and nothing in flight: turmoil has no work this step, so only
        // the nodes' time moves (hosts sleep until a frame or an outbox wakes them, and
        // message latencies are relative to turmoil's own clock, which pauses too).
        let idle = !world.borrow().has_outbox() && {
            let mut in_flight = false;
            sim.links(|links| {
                for link in links {
                    if link.count() > 0 {
                        in_flight = true;
                        break;
                    }
                }
            });
            !in_flight
        };
        if idle {
            continue;
        }
        if let Err(error) = sim.step() {
            let mut w = world.borrow_mut();
            w.violation = Some(Violation {
                checker: "simulator",
                detail: format!("host failed: {error}"),
                step: now / STEP_MS,
                tick: now,
            });
            break;
        }
        if world.borrow().violation.is_some() {
            break;
        }
    }

    let mut w = world.borrow_mut();
    if w.violation.is_none() {
        w.check_coherence();
        w.check_space_lifetime();
        w.check_allocators();
        w.check_copies();
    }
    let (mut malformed, mut rejected, mut retries) = (0, 0, 0);
    let (mut compactions, mut snapshots) = (0, 0);
    let (mut recovered, mut reverted, mut rejoins) = (0, 0, 0);
    let (mut flushes, mut backups_sent, mut backups_kept, mut repaired) = (0, 0, 0, 0);
    for index in 0..params.nodes {
        if let Some(node) = w.node(index) {
            let stats = node.stats();
            malformed += stats.frames_malformed;
            rejected += stats.messages_rejected;
            retries += stats.retries;
            compactions += stats.log_compactions;
            snapshots += stats.snapshots_installed;
            recovered += stats.pages_recovered;
            reverted += stats.pages_reverted;
            flushes += stats.flushes_applied;
            backups_sent += stats.backups_sent;
            backups_kept += stats.backups_kept;
            repaired += stats.pages_repaired;
            rejoins += stats.rejoins;
        }
    }
    RunReport {
        params,
        plan,
        counters: w.counters,
        faults,
        sim_ticks: now,
        wall: wall_start.elapsed(),
        trace_hash: w.trace.finish(),
        violation: w.violation.clone(),
        malformed_frames: malformed,
        rejected_messages: rejected,
        retries,
        log_compactions: compactions,
        snapshots_installed: snapshots,
        pages_recovered: recovered,
        pages_reverted: reverted,
        flushes_applied: flushes,
        backups_sent,
        backups_kept,
        pages_repaired: repaired,
        rejoins,
        leader_changes_seen: leader_changes,
    }
}

fn draw_partition(rng: &mut ChaCha8Rng, nodes: usize, now: u64) -> Partition {
    let heal_tick = now + rng.gen_range(30..1500);
    if nodes >= 2 && rng.gen_bool(0.3) {
        let from = rng.gen_range(0..nodes);
        let mut to = rng.gen_range(0..nodes - 1);
        if to >= from {
            to += 1;
        }
        return Partition {
            one_way: Some((from, to)),
            side_a: vec![from],
            side_b: vec![to],
            heal_tick,
        };
    }
    let mut side_a = Vec::new();
    let mut side_b = Vec::new();
    for index in 0..nodes {
        if rng.gen_bool(0.4) {
            side_a.push(index);
        } else {
            side_b.push(index);
        }
    }
    if side_a.is_empty() {
        side_a.push(side_b.pop().expect("nodes > 0"));
    }
    Partition {
        one_way: None,
        side_a,
        side_b,
        heal_tick,
    }
}

fn apply_partition(sim: &turmoil::Sim<'_>, partition: &Partition) {
    if let Some((from, to)) = partition.one_way {
        sim.partition_oneway(host_name(from), host_name(to));
        return;
    }
    for &a in &partition.side_a {
        for &b in &partition.side_b {
            sim.partition(host_name(a), host_name(b));
        }
    }
}

fn repair(sim: &turmoil::Sim<'_>, partition: &Partition) {
    if let Some((from, to)) = partition.one_way {
        sim.repair_oneway(host_name(from), host_name(to));
        return;
    }
    for &a in &partition.side_a {
        for &b in &partition.side_b {
            sim.repair(host_name(a), host_name(b));
        }
    }
}

/// The software of one simulated host: move frames between turmoil's network and the
/// node, applying loss and duplication on the way out.
async fn host_loop(
    index: usize,
    nodes: usize,
    world: Rc<RefCell<World>>,
    network: Rc<RefCell<(f64, f64)>>,
) -> turmoil::Result {
    let socket = turmoil::net::UdpSocket::bind(("0.0.0.0", PEER_PORT)).await?;
    let peers: Vec<IpAddr> = (0..nodes).map(|i| turmoil::lookup(host_name(i))).collect();
    let outbox_ready = world.borrow().outbox_ready[index].clone();
    let mut buffer = vec![0u8; MAX_FRAME_BYTES];
    loop {
        while let Ok((len, _from)) = socket.try_recv_from(&mut buffer) {
            world.borrow_mut().deliver(index, &buffer[..len]);
        }
        let outgoing = world.borrow_mut().take_outbox(index);
        if !outgoing.is_empty() {
            let (loss_rate, duplicate_rate) = *network.borrow();
            let mut w = world.borrow_mut();
            for (to, bytes) in outgoing {
                let Some(&peer) = peers.get(to as usize - 1) else {
                    continue;
                };
                if loss_rate > 0.0 && w.rng.gen_bool(loss_rate) {
                    w.counters.frames_dropped += 1;
                    continue;
                }
                let copies = if duplicate_rate > 0.0 && w.rng.gen_bool(duplicate_rate) {
                    w.counters.frames_duplicated += 1;
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    if socket.try_send_to(&bytes, (peer, PEER_PORT)).is_err() {
                        w.counters.frames_dropped += 1;
                    }
                }
            }
        }
        // Sleep until a frame arrives or the node has frames to send: idle hosts cost
        // turmoil's step nothing beyond its own bookkeeping.
        tokio::select! {
            biased;
            _ = socket.readable() => {}
            _ = outbox_ready.notified() => {}
        }
    }
}
