//! Crashed nodes' pages are recovered: a down home's chunks move to survivors, which
//! rebuild them from the copies that survived, and a down writer's pages go back to
//! their master. Every checker holds through it, "no lost observed write" included.

mod common;

use gallocy_sim::FaultMode;

#[test]
fn crashed_homes_and_writers_lose_no_page_a_survivor_saw() {
    let reports = common::clean_runs(900..940, FaultMode::Crash);
    let recovered: u64 = reports.iter().map(|r| r.pages_recovered).sum();
    let reverted: u64 = reports.iter().map(|r| r.pages_reverted).sum();
    assert!(recovered > 0, "no page was rebuilt from survivors' copies");
    assert!(
        reverted > 0,
        "no page went back to its master after its writer crashed"
    );
}
