//! Shared by the simulator's integration tests.

use gallocy_sim::{run, FaultMode, RunParams, RunReport};

/// Runs `seeds` on 5 nodes with 1000 operations and `faults`; every checker must hold
/// in each (the failing run's summary says which did not). The reports, for the test
/// to check what happened.
pub fn clean_runs(seeds: std::ops::Range<u64>, faults: FaultMode) -> Vec<RunReport> {
    seeds
        .map(|seed| {
            let report = run(RunParams {
                seed,
                nodes: 5,
                ops: 1000,
                faults,
                mutant: None,
            });
            assert!(report.violation.is_none(), "{}", report.summary());
            report
        })
        .collect()
}
