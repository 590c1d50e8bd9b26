//! The Raft log is compacted behind metadata snapshots (the simulator keeps only 4
//! applied entries beyond a snapshot), and members cut off by a partition catch up from
//! a snapshot: the checkers hold through both.

use gallocy_sim::{run, FaultMode, RunParams};

#[test]
fn partitioned_members_catch_up_from_snapshots_and_every_checker_holds() {
    let (mut compactions, mut installed) = (0, 0);
    for seed in 700..724 {
        let report = run(RunParams {
            seed,
            nodes: 5,
            ops: 1000,
            faults: FaultMode::Partition,
            mutant: None,
        });
        assert!(report.violation.is_none(), "{}", report.summary());
        compactions += report.log_compactions;
        installed += report.snapshots_installed;
    }
    assert!(compactions > 0, "no log was compacted");
    assert!(installed > 0, "no member caught up from a snapshot");
}
