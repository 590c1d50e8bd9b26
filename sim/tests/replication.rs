//! k copies of every page: syncs answered, flushes applied at homes, backups sent
//! when a page's contents are on fewer than k nodes (copies lost with a node made
//! again by their home), and crashes right after syncs
//! (the synced node itself) lose no synced or observed write. Every checker holds.

mod common;

use gallocy_sim::FaultMode;

#[test]
fn synced_and_shared_writes_survive_crashes_of_fewer_than_k_nodes() {
    let reports = common::clean_runs(1400..1440, FaultMode::Crash);
    let syncs: u64 = reports.iter().map(|r| r.counters.syncs).sum();
    let flushes: u64 = reports.iter().map(|r| r.flushes_applied).sum();
    let backups: u64 = reports.iter().map(|r| r.backups_sent).sum();
    let repaired: u64 = reports.iter().map(|r| r.pages_repaired).sum();
    let replicas_seen: std::collections::BTreeSet<u8> =
        reports.iter().map(|r| r.plan.replicas).collect();
    assert!(syncs > 0, "no sync was answered");
    assert!(flushes > 0, "no flush replaced a master");
    assert!(backups > 0, "no backup was sent");
    assert!(repaired > 0, "no home made lost copies again");
    assert!(
        replicas_seen.contains(&3),
        "no run with k = 3: {replicas_seen:?}"
    );
}
