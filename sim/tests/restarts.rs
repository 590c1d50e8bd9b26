//! Crashed nodes restart from their simulated disks (which lose unsynced writes and
//! may tear the last synced one), rejoin as their next life with their Raft log and
//! none of their pages, and serve again. Every checker holds through it.

mod common;

use gallocy_sim::FaultMode;

#[test]
fn crashed_nodes_restart_from_their_disks_and_rejoin() {
    let reports = common::clean_runs(1200..1240, FaultMode::Crash);
    let restarts: u64 = reports.iter().map(|r| r.faults.restarts).sum();
    let rejoins: u64 = reports.iter().map(|r| r.rejoins).sum();
    assert!(restarts > 0, "no crashed node was restarted");
    assert!(rejoins > 0, "no restarted node rejoined");
}
