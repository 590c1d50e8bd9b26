//! Simulator throughput: protocol messages per second of wall time, and the time of a
//! 1000-seed sweep (5 nodes, 2000 operations, all faults). The baseline, measured in
//! the same run, is turmoil alone: the same hosts stepping the same simulated time
//! with nothing to do, so the ratio shows what the gallocy core and checkers add.
//!
//! `cargo bench -p gallocy-sim --bench throughput` (GALLOCY_BENCH_SEEDS=N to change the
//! sweep size).

use std::time::{Duration, Instant};

use gallocy_sim::{run, sweep, FaultMode, RunParams};

fn single_thread(faults: FaultMode, seeds: u64) -> (u64, u64, Duration) {
    let started = Instant::now();
    let (mut frames, mut ticks) = (0, 0);
    for seed in 0..seeds {
        let report = run(RunParams {
            seed,
            nodes: 5,
            ops: 2000,
            faults,
            mutant: None,
        });
        assert!(report.violation.is_none(), "{}", report.summary());
        frames += report.counters.frames_delivered;
        ticks += report.sim_ticks;
    }
    (frames, ticks, started.elapsed())
}

/// turmoil with 5 idle hosts stepping `sim_ms` of simulated time in 2 ms steps.
fn turmoil_floor(sim_ms: u64) -> Duration {
    let started = Instant::now();
    let mut sim = turmoil::Builder::new()
        .rng_seed(1)
        .tick_duration(Duration::from_millis(2))
        .simulation_duration(Duration::from_secs(24 * 3600))
        .build();
    for index in 0..5 {
        sim.host(format!("n{index}"), || async {
            let _socket = turmoil::net::UdpSocket::bind(("0.0.0.0", 7000)).await?;
            loop {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
    }
    for _ in 0..sim_ms / 2 {
        sim.step().expect("idle hosts do not fail");
    }
    started.elapsed()
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("gallocy-sim throughput ({cores} cores)");
    println!(
        "{:<34} {:>10} {:>12} {:>10} {:>14}",
        "workload", "messages", "sim seconds", "wall s", "messages/s"
    );
    let mut total_ticks = 0;
    let mut total_wall = Duration::ZERO;
    for faults in [FaultMode::None, FaultMode::Loss, FaultMode::All] {
        let (frames, ticks, wall) = single_thread(faults, 50);
        total_ticks += ticks;
        total_wall += wall;
        println!(
            "{:<34} {:>10} {:>12.1} {:>10.2} {:>14.0}",
            format!("1 thread, 50 seeds, faults {}", faults.name()),
            frames,
            ticks as f64 / 1000.0,
            wall.as_secs_f64(),
            frames as f64 / wall.as_secs_f64()
        );
    }
    let floor = turmoil_floor(total_ticks);
    println!(
        "baseline: turmoil alone, 5 idle hosts, the same {:.1} simulated s: {:.2} s wall; gallocy runs take {:.2}x that",
        total_ticks as f64 / 1000.0,
        floor.as_secs_f64(),
        total_wall.as_secs_f64() / floor.as_secs_f64()
    );
    let seeds: u64 = std::env::var("GALLOCY_BENCH_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let template = RunParams {
        seed: 0,
        nodes: 5,
        ops: 2000,
        faults: FaultMode::All,
        mutant: None,
    };
    let outcome = sweep(10_000..10_000 + seeds, &template, cores, &|_, _, _| {});
    println!(
        "sweep: {seeds} seeds, 5 nodes, 2000 ops, faults all, {cores} threads: {:.1} s wall, {} failed, {:.0} messages/s",
        outcome.wall.as_secs_f64(),
        outcome.failures.len(),
        outcome.frames_delivered as f64 / outcome.wall.as_secs_f64()
    );
}
