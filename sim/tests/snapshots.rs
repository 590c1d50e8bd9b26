//! The Raft log is compacted behind metadata snapshots (the simulator keeps only 4
//! applied entries beyond a snapshot), and members cut off by a partition catch up from
//! a snapshot: the checkers hold through both.

mod common;

use gallocy_sim::FaultMode;

#[test]
fn partitioned_members_catch_up_from_snapshots_and_every_checker_holds() {
    let reports = common::clean_runs(700..724, FaultMode::Partition);
    let compactions: u64 = reports.iter().map(|r| r.log_compactions).sum();
    let installed: u64 = reports.iter().map(|r| r.snapshots_installed).sum();
    assert!(compactions > 0, "no log was compacted");
    assert!(installed > 0, "no member caught up from a snapshot");
}
