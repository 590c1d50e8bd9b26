//! Crashed nodes' pages are recovered: a down home's chunks move to survivors, which
//! rebuild them from the copies that survived, and a down writer's pages go back to
//! their master. Every checker holds through it, "no lost observed write" included.

use gallocy_sim::{run, FaultMode, RunParams};

#[test]
fn crashed_homes_and_writers_lose_no_page_a_survivor_saw() {
    let (mut recovered, mut reverted) = (0, 0);
    for seed in 900..940 {
        let report = run(RunParams {
            seed,
            nodes: 5,
            ops: 1000,
            faults: FaultMode::Crash,
            mutant: None,
        });
        assert!(report.violation.is_none(), "{}", report.summary());
        recovered += report.pages_recovered;
        reverted += report.pages_reverted;
    }
    assert!(recovered > 0, "no page was rebuilt from survivors' copies");
    assert!(
        reverted > 0,
        "no page went back to its master after its writer crashed"
    );
}
