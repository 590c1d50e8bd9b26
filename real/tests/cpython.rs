//! CPython's own regression tests under `gallocy run`, as in a plain run. A test binary
//! of its own, so cargo runs it alone (the suites are timing-sensitive and take a
//! minute). Skipped, with the reason printed, where Python's `test` package is missing.

mod common;

use std::process::{Command, Output};

use common::{describe, libgallocy_preload, temp_dir};

const SUITES: [&str; 6] = [
    "test_dict",
    "test_json",
    "test_thread",
    "test_subprocess",
    "test_mmap",
    "test_os",
];

/// The summary lines of a `python3 -m test` run: totals and the result.
fn summary(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with("Total tests:") || l.starts_with("Result:"))
        .map(str::to_string)
        .collect()
}

#[test]
fn cpython_regression_tests_pass_under_gallocy_as_in_a_plain_run() {
    let probe = Command::new("python3")
        .args(["-c", "import test.support, test.libregrtest"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("python3 or its `test` package is missing; skipped");
        return;
    }
    let dir = temp_dir("cpython");
    let plain = Command::new("python3")
        .args(["-m", "test"])
        .args(SUITES)
        .current_dir(&dir)
        .output()
        .unwrap();
    let got = Command::new(env!("CARGO_BIN_EXE_gallocy"))
        .args(["run", "--", "python3", "-m", "test"])
        .args(SUITES)
        .current_dir(&dir)
        .env("GALLOCY_PRELOAD", libgallocy_preload())
        .env("GALLOCYD", env!("CARGO_BIN_EXE_gallocyd"))
        .env_remove("GALLOCY_SOCKET")
        .output()
        .unwrap();
    assert!(
        plain.status.success(),
        "plain run failed: {}",
        describe(&plain)
    );
    assert!(got.status.success(), "{}", describe(&got));
    assert_eq!(summary(&got), summary(&plain), "{}", describe(&got));
    assert!(
        summary(&got).iter().any(|l| l == "Result: SUCCESS"),
        "{}",
        describe(&got)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
