//! Membership changes in the middle of a workload: a node outside the first
//! configuration is added (a Raft configuration change; it gets the metadata as a
//! snapshot and serves), and crashed nodes that never come back are removed. Every
//! checker holds through it.

mod common;

use gallocy_sim::FaultMode;

#[test]
fn nodes_are_added_and_removed_during_the_workload() {
    let reports = common::clean_runs(1300..1340, FaultMode::Crash);
    let added: u64 = reports.iter().map(|r| r.counters.members_added).sum();
    let removed: u64 = reports.iter().map(|r| r.counters.members_removed).sum();
    assert!(added > 0, "no node was added");
    assert!(removed > 0, "no crashed node was removed");
}
