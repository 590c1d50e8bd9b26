//! k copies of every page: syncs answered, flushes applied at homes, backups sent
//! when a page's contents are on fewer than k nodes, and crashes right after syncs
//! (the synced node itself) lose no synced or observed write. Every checker holds.

use gallocy_sim::{run, FaultMode, RunParams};

#[test]
fn synced_and_shared_writes_survive_crashes_of_fewer_than_k_nodes() {
    let (mut syncs, mut flushes, mut backups) = (0, 0, 0);
    let mut replicas_seen = std::collections::BTreeSet::new();
    for seed in 1400..1440 {
        let report = run(RunParams {
            seed,
            nodes: 5,
            ops: 1000,
            faults: FaultMode::Crash,
            mutant: None,
        });
        assert!(report.violation.is_none(), "{}", report.summary());
        syncs += report.counters.syncs;
        flushes += report.flushes_applied;
        backups += report.backups_sent;
        replicas_seen.insert(report.plan.replicas);
    }
    assert!(syncs > 0, "no sync was answered");
    assert!(flushes > 0, "no flush replaced a master");
    assert!(backups > 0, "no backup was sent");
    assert!(
        replicas_seen.contains(&3),
        "no run with k = 3: {replicas_seen:?}"
    );
}
