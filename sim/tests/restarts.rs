//! Crashed nodes restart from their simulated disks (which lose unsynced writes and
//! may tear the last synced one), rejoin as their next life with their Raft log and
//! none of their pages, and serve again. Every checker holds through it.

use gallocy_sim::{run, FaultMode, RunParams};

#[test]
fn crashed_nodes_restart_from_their_disks_and_rejoin() {
    let (mut restarts, mut rejoins) = (0, 0);
    for seed in 1200..1240 {
        let report = run(RunParams {
            seed,
            nodes: 5,
            ops: 1000,
            faults: FaultMode::Crash,
            mutant: None,
        });
        assert!(report.violation.is_none(), "{}", report.summary());
        restarts += report.faults.restarts;
        rejoins += report.rejoins;
    }
    assert!(restarts > 0, "no crashed node was restarted");
    assert!(rejoins > 0, "no restarted node rejoined");
}
