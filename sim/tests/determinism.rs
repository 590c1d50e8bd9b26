//! Same seed and flags, same trace; different seeds, different traces.

use gallocy_sim::{run, FaultMode, RunParams};

fn params(seed: u64, faults: FaultMode) -> RunParams {
    RunParams {
        seed,
        nodes: 5,
        ops: 600,
        faults,
        mutant: None,
    }
}

#[test]
fn one_seed_twice_gives_the_same_trace_hash() {
    for faults in [FaultMode::None, FaultMode::All] {
        let first = run(params(42, faults));
        let second = run(params(42, faults));
        assert!(first.violation.is_none(), "{}", first.summary());
        assert_eq!(first.trace_hash, second.trace_hash, "{faults:?}");
        assert_eq!(
            first.counters.frames_delivered,
            second.counters.frames_delivered
        );
        assert_eq!(first.sim_ticks, second.sim_ticks);
        assert!(first.trace_hash != 0 && first.counters.frames_delivered > 100);
    }
}

#[test]
fn different_seeds_give_different_traces() {
    let hashes: Vec<u64> = (0..4)
        .map(|seed| run(params(seed, FaultMode::All)).trace_hash)
        .collect();
    for i in 0..hashes.len() {
        for j in i + 1..hashes.len() {
            assert_ne!(hashes[i], hashes[j], "seeds {i} and {j}");
        }
    }
}

#[test]
fn summary_ends_with_the_trace_hash() {
    let report = run(params(7, FaultMode::Loss));
    let summary = report.summary();
    let last = summary.lines().last().unwrap();
    assert_eq!(last, format!("trace-hash: {:016x}", report.trace_hash));
}
