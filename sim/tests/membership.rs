//! Membership changes in the middle of a workload: a node outside the first
//! configuration is added (a Raft configuration change; it gets the metadata as a
//! snapshot and serves), and crashed nodes that never come back are removed. Every
//! checker holds through it.

use gallocy_sim::{run, FaultMode, RunParams};

#[test]
fn nodes_are_added_and_removed_during_the_workload() {
    let (mut added, mut removed) = (0, 0);
    for seed in 1300..1340 {
        let report = run(RunParams {
            seed,
            nodes: 5,
            ops: 1000,
            faults: FaultMode::Crash,
            mutant: None,
        });
        assert!(report.violation.is_none(), "{}", report.summary());
        added += report.counters.members_added;
        removed += report.counters.members_removed;
    }
    assert!(added > 0, "no node was added");
    assert!(removed > 0, "no crashed node was removed");
}
