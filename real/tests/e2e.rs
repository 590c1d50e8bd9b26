//! End-to-end: real daemons on Unix sockets, C programs using libgallocy.so.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::{
    describe, e2e_program, finish, publish_then_consume, run_pair, stop, temp_dir, Cluster,
};
use gallocy_core::ipc::{
    ErrorCode, IpcMessage, Role, IPC_FRAME_BYTES, IPC_NAME_BYTES, IPC_VERSION,
};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn processes_on_two_nodes_share_blocks_and_free_each_others() {
    let cluster = Cluster::start("share", 3);
    let program = e2e_program(&cluster.dir);
    let (_, consumed) = publish_then_consume(
        &mut cluster.command(1, &program, &["publish"]),
        &mut cluster.command(2, &program, &["consume"]),
        LIMIT,
    );
    let out = String::from_utf8_lossy(&consumed.stdout);
    assert!(out.contains("consumer read the pattern"), "{out}");
    // The daemons saw it: node 2 served remote faults, node 1 leased chunks.
    let status = gallocy_real::admin::status(&cluster.socket(2)).unwrap();
    assert!(
        status["counters"]["faults_remote"].as_u64().unwrap() > 0,
        "{status}"
    );
    assert!(
        status["counters"]["remote_frees"].as_u64().unwrap() >= 16,
        "{status}"
    );
    // Both processes have gone: the space is destroyed on every node, its memory
    // given back.
    for node in 1..=3 {
        cluster.wait_for_status(node, LIMIT, "space reclaimed", |status| {
            status["spaces"].as_array().is_some_and(|s| s.is_empty())
                && status["backed_spaces"] == 0
        });
    }
}

/// A space goes when its last process has gone, on every node with its memory, unless
/// its creator asked for it to stay (`GALLOCY_PERSISTENT=1`).
#[test]
fn a_space_ends_with_its_last_process_unless_persistent() {
    let cluster = Cluster::start("reclaim", 3);
    let program = e2e_program(&cluster.dir);
    let no_spaces = |status: &serde_json::Value| {
        status["spaces"].as_array().is_some_and(|s| s.is_empty()) && status["backed_spaces"] == 0
    };
    // Twenty programs in a row, each leaving 8 MiB of heap: the cluster holds nothing
    // after each one.
    for round in 0..20u64 {
        let node = 1 + round % 3;
        let value = (100 + round).to_string();
        let output = cluster.run(node, &program, &["leave", "e2e-gone", &value, "8"], LIMIT);
        assert!(output.status.success(), "{}", describe(&output));
        for node in 1..=3 {
            cluster.wait_for_status(node, LIMIT, "space reclaimed", no_spaces);
        }
    }
    let output = cluster.run(2, &program, &["find", "e2e-gone"], LIMIT);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("unknown space"), "{}", describe(&output));

    // A persistent space keeps its contents for the next process, on any node.
    let output = finish(
        cluster
            .command(1, &program, &["leave", "e2e-kept", "42", "2"])
            .env("GALLOCY_PERSISTENT", "1")
            .spawn()
            .unwrap(),
        LIMIT,
    );
    assert!(output.status.success(), "{}", describe(&output));
    let status = cluster.wait_for_status(1, LIMIT, "node 1 detached", |status| {
        status["spaces"][0]["attached_nodes"]
            .as_array()
            .is_some_and(|a| a.is_empty())
    });
    assert_eq!(status["spaces"][0]["persistent"], true, "{status}");
    let output = cluster.run(3, &program, &["find", "e2e-kept"], LIMIT);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("found 42"), "{}", describe(&output));
}

/// `gallocy space unpersist`: a persistent space in use ends with its last process, one
/// nobody uses ends at once, and an unknown name is a clear error.
#[test]
fn an_unpersisted_space_ends_with_its_last_process() {
    use std::io::{BufRead, BufReader};
    let cluster = Cluster::start("unpersist", 3);
    let program = e2e_program(&cluster.dir);
    let space_named = |status: &serde_json::Value, name: &str| {
        status["spaces"]
            .as_array()
            .and_then(|spaces| spaces.iter().find(|s| s["name"] == name).cloned())
    };
    // In use: kept no longer, but it stays while its process runs.
    let mut holder = cluster
        .command(2, &program, &["churn", "2"])
        .env("GALLOCY_PERSISTENT", "1")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "allocated\n");
    let unpersist = Command::new(env!("CARGO_BIN_EXE_gallocy"))
        .args(["space", "unpersist", "e2e-churn", "--dir"])
        .arg(&cluster.dir)
        .output()
        .unwrap();
    assert!(unpersist.status.success(), "{}", describe(&unpersist));
    assert!(
        String::from_utf8_lossy(&unpersist.stdout).contains("ends with its last process"),
        "{}",
        describe(&unpersist)
    );
    for node in 1..=3 {
        let status = cluster.wait_for_status(node, LIMIT, "no longer persistent", |s| {
            space_named(s, "e2e-churn").is_some_and(|space| space["persistent"] == false)
        });
        assert!(space_named(&status, "e2e-churn").is_some(), "{status}");
    }
    // Its process goes (stdin closed): so does the space, on every node.
    drop(holder.stdin.take());
    let _ = finish(holder, LIMIT);
    for node in 1..=3 {
        cluster.wait_for_status(node, LIMIT, "the space gone", |s| {
            space_named(s, "e2e-churn").is_none()
        });
    }
    // Nobody attached: it ends at once.
    let output = cluster.run_with_env(
        1,
        &program,
        &["leave", "e2e-idle", "7", "1"],
        ("GALLOCY_PERSISTENT", "1"),
        LIMIT,
    );
    assert!(output.status.success(), "{}", describe(&output));
    cluster.wait_for_status(3, LIMIT, "the idle space kept", |s| {
        space_named(s, "e2e-idle").is_some_and(|space| {
            space["attached_nodes"]
                .as_array()
                .is_some_and(|a| a.is_empty())
        })
    });
    assert_eq!(
        gallocy_real::admin::unpersist(&cluster.socket(3), "e2e-idle"),
        Ok(true)
    );
    for node in 1..=3 {
        cluster.wait_for_status(node, LIMIT, "the idle space gone", |s| {
            space_named(s, "e2e-idle").is_none() && s["backed_spaces"] == 0
        });
    }
    // A name no space has.
    let error = gallocy_real::admin::unpersist(&cluster.socket(1), "e2e-never").unwrap_err();
    assert!(error.contains("unknown space"), "{error}");
}

/// Blocks freed give their chunks back to the cluster while the program runs, and a
/// chunk leased again starts zeroed.
#[test]
fn freed_blocks_give_their_chunks_back() {
    use std::io::{BufRead, BufReader, Write};
    let cluster = Cluster::start("release", 3);
    let program = e2e_program(&cluster.dir);
    let mut child = cluster
        .command(2, &program, &["churn", "64"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let chunks_of_node_2 = |status: &serde_json::Value| {
        status["spaces"][0]["chunks_per_node"]["2"]
            .as_u64()
            .unwrap_or(0)
    };
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "allocated\n");
    // 64 blocks of 1 MiB and a header each (adjacent leases coalesce, so blocks
    // straddle chunks): at least 64 chunks besides the root's, as every node sees it.
    for node in 1..=3 {
        cluster.wait_for_status(node, LIMIT, "the leases", |s| chunks_of_node_2(s) > 64);
    }
    writeln!(stdin, "free").unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "freed\n");
    // The root block's chunk stays, and at most the 4 chunks of empty regions a node
    // keeps for its next allocations (`Config::retain_empty_chunks`).
    for node in 1..=3 {
        cluster.wait_for_status(node, LIMIT, "chunks given back", |s| {
            chunks_of_node_2(s) <= 1 + 4
        });
    }
    let status = gallocy_real::admin::status(&cluster.socket(2)).unwrap();
    assert!(
        status["counters"]["chunks_released"].as_u64().unwrap() >= 60,
        "{status}"
    );
    // Node 3 leases chunks (the lowest free ones: those node 2 gave back) and
    // publishes a block it never wrote; node 2 reads it.
    let lender = cluster
        .command(3, &program, &["lend", "8"])
        .spawn()
        .unwrap();
    writeln!(stdin, "again").unwrap();
    drop(stdin);
    line.clear();
    stdout.read_line(&mut line).unwrap();
    let lent = finish(lender, LIMIT);
    assert!(lent.status.success(), "{}", describe(&lent));
    let output = finish(child, LIMIT);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(line, "reused zeroed\n", "{}", describe(&output));
}

#[test]
fn write_pingpong_with_busy_and_blocked_threads() {
    let cluster = Cluster::start("pingpong", 2);
    let program = e2e_program(&cluster.dir);
    run_pair(
        &mut cluster.command(1, &program, &["pingpong", "0", "300"]),
        &mut cluster.command(2, &program, &["pingpong", "1", "300"]),
        LIMIT,
    );
}

#[test]
fn a_futex_mutex_excludes_and_wakes_across_nodes() {
    let cluster = Cluster::start("futexlock", 2);
    let program = common::build_c(&cluster.dir.join("futexlock"), &["futexlock.c"], &[]);
    let (first, second) = run_pair(
        &mut cluster.command(1, &program, &["0", "400"]),
        &mut cluster.command(2, &program, &["1", "400"]),
        LIMIT,
    );
    let out = String::from_utf8_lossy(&first.stdout);
    assert!(
        out.contains("counter 800, violations 0"),
        "{}",
        describe(&first)
    );
    // Waiters slept in futexes and were woken across nodes (a lost wake-up would
    // have hung a process).
    let slept = |output: &std::process::Output| {
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .find_map(|l| {
                l.strip_prefix("sleeps ")
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .unwrap_or(0)
    };
    let sleeps = (slept(&first), slept(&second));
    eprintln!("sleeps: {} and {}", sleeps.0, sleeps.1);
    assert!(sleeps.0 + sleeps.1 > 0, "nobody slept: {sleeps:?}");
}

#[test]
fn glibc_mutex_condvar_and_barrier_work_across_nodes() {
    let cluster = Cluster::start("condping", 2);
    // build_c compiles with -pthread.
    let program = common::build_c(&cluster.dir.join("condping"), &["condping.c"], &[]);
    let (first, _) = run_pair(
        &mut cluster.command(1, &program, &["0", "300"]),
        &mut cluster.command(2, &program, &["1", "300"]),
        LIMIT,
    );
    let out = String::from_utf8_lossy(&first.stdout);
    assert!(out.contains("turns 600, count 600"), "{}", describe(&first));
}

#[test]
fn runtime_path_never_calls_the_system_allocator() {
    let cluster = Cluster::start("noalloc", 1);
    let shim = cluster.dir.join("libcountalloc.so");
    let status = Command::new("cc")
        .args(["-O2", "-shared", "-fPIC", "-o"])
        .arg(&shim)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c/countalloc.c"))
        .status()
        .unwrap();
    assert!(status.success());
    // Linked ahead of libc, the shim's malloc interposes for the whole process.
    let program = common::build_c(
        &cluster.dir.join("noalloc"),
        &["noalloc.c"],
        &[
            &format!("-L{}", cluster.dir.display()),
            "-lcountalloc",
            &format!("-Wl,-rpath,{}", cluster.dir.display()),
        ],
    );
    let output = cluster.run(1, &program, &[], LIMIT);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("calls on the runtime path: 0"));
}

#[test]
fn errors_users_meet_are_clear() {
    let cluster = Cluster::start("errors", 1);
    let program = e2e_program(&cluster.dir);

    // No daemon: the message names the socket tried.
    let missing = cluster.dir.join("nobody.sock");
    let output = Command::new(&program)
        .args(["expect-error", "e2e", "-2"])
        .env("GALLOCY_SOCKET", &missing)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", describe(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("no gallocy daemon at") && text.contains("nobody.sock"),
        "{text}"
    );

    // Unknown space.
    let output = cluster.run(1, &program, &["expect-error", "nope", "-2"], LIMIT);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("unknown space"));

    // The space's range is taken: both ranges are named.
    let output = cluster.run(1, &program, &["clash"], LIMIT);
    assert!(output.status.success(), "{}", describe(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("cannot map space clash at [0x200000000000"),
        "{text}"
    );
    assert!(
        text.contains("overlaps an existing mapping [0x200000000000, 0x200000001000)"),
        "{text}"
    );

    // Another protocol version: the daemon says which one it speaks.
    let mut stream = UnixStream::connect(cluster.socket(1)).unwrap();
    let mut frame = [0u8; IPC_FRAME_BYTES];
    IpcMessage::admin_hello(0).encode(7, &mut frame);
    frame[2] = IPC_VERSION + 1;
    stream.write_all(&frame).unwrap();
    stream.read_exact(&mut frame).unwrap();
    assert_eq!(
        IpcMessage::decode(&frame).unwrap().1,
        IpcMessage::Error {
            code: ErrorCode::VersionMismatch,
            detail: IPC_VERSION as u64
        }
    );

    // Another user: the socket is the daemon user's only.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // The other user may not be able to read the build tree (a checkout in a 0700
        // directory): give it a copy of the library where it can.
        let lib_copy = cluster.dir.join("lib-for-others");
        std::fs::create_dir_all(&lib_copy).unwrap();
        std::fs::copy(common::libgallocy(), lib_copy.join("libgallocy.so")).unwrap();
        for dir in [&cluster.dir, &lib_copy] {
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        }
        let output = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&program)
            .args(["expect-error", "e2e", "-13"])
            .env("GALLOCY_SOCKET", cluster.socket(1))
            .env("LD_LIBRARY_PATH", &lib_copy)
            .output();
        if let Ok(output) = output {
            assert!(output.status.success(), "{}", describe(&output));
            assert!(String::from_utf8_lossy(&output.stdout).contains("errno 13"));
        }
    }
}

#[test]
fn a_killed_daemon_loses_its_processes_not_the_cluster() {
    let cluster = Cluster::start("kill", 3);
    let program = e2e_program(&cluster.dir);
    let mut orphan = cluster.command(1, &program, &["orphan"]).spawn().unwrap();
    // Wait until it is attached.
    let mut stdout = orphan.stdout.take().unwrap();
    let mut first = [0u8; 9];
    stdout.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"attached\n");
    // SIGKILL node 1's daemon (the first leader, by its election timeout).
    cluster.kill_daemon(1);
    let output = finish(orphan, LIMIT);
    assert_eq!(output.status.code(), Some(86), "{}", describe(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("is gone"),
        "{}",
        describe(&output)
    );
    // The others elect a leader and keep serving: a new allocation needs a Raft commit.
    let writer = cluster
        .command(2, &program, &["survive-writer"])
        .spawn()
        .unwrap();
    let reader = cluster
        .command(3, &program, &["survive-reader"])
        .spawn()
        .unwrap();
    let written = finish(writer, LIMIT);
    let read = finish(reader, LIMIT);
    assert!(written.status.success(), "writer: {}", describe(&written));
    assert!(
        read.status.success(),
        "reader: {}\nlog 2:\n{}",
        describe(&read),
        cluster.log(2)
    );
}

/// The scenario: node 2 writes 64 pages (and homes the space's root block),
/// node 3 reads them, node 2's daemon is killed; node 1 then reads all 64 intact, the
/// root block included, recovered from node 3's copies (docs/protocol.md "Recovery").
#[test]
fn pages_another_node_read_survive_their_home_being_killed() {
    let cluster = Cluster::start("recover", 3);
    let program = e2e_program(&cluster.dir);
    let writer = cluster.spawn_expecting(2, &program, &["crash-writer"], "written");
    let reader = cluster.spawn_expecting(3, &program, &["crash-reader"], "read 64 pages");
    cluster.kill_daemon(2);
    let verify = cluster.run(1, &program, &["crash-verify"], LIMIT);
    stop(reader);
    stop(writer);
    assert!(
        verify.status.success(),
        "{}\nlog 1:\n{}\nlog 3:\n{}",
        describe(&verify),
        cluster.log(1),
        cluster.log(3)
    );
    assert!(String::from_utf8_lossy(&verify.stdout).contains("read 64 pages"));
    let status = gallocy_real::admin::status(&cluster.socket(1)).expect("status");
    let recovered: u64 = [1, 3]
        .iter()
        .map(|&n| {
            gallocy_real::admin::status(&cluster.socket(n)).expect("status")["counters"]
                ["pages_recovered"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    assert!(
        recovered >= 64,
        "pages recovered: {recovered}; status 1: {status}"
    );
}

/// A killed daemon started again on its directory rejoins as the same member: its
/// Raft state comes from its disk, the pages it homed come back from the copies other
/// nodes hold, and it serves applications again (a new space between it and another
/// node, both ways).
#[test]
fn a_killed_daemon_restarts_rejoins_and_serves_again() {
    let cluster = Cluster::start("restart", 3);
    let program = e2e_program(&cluster.dir);
    let writer = cluster.spawn_expecting(2, &program, &["crash-writer"], "written");
    let reader = cluster.spawn_expecting(3, &program, &["crash-reader"], "read 64 pages");
    cluster.kill_daemon(2);
    let gallocyd = std::path::PathBuf::from(env!("CARGO_BIN_EXE_gallocyd"));
    gallocy_real::cluster::restart(&cluster.dir, 2, &gallocyd)
        .unwrap_or_else(|e| panic!("restart: {e}\nlog 1:\n{}", cluster.log(1)));
    let status = gallocy_real::admin::status(&cluster.socket(2)).expect("status");
    assert_eq!(status["incarnation"].as_u64(), Some(2), "{status}");
    assert_eq!(status["rejoining"], false, "{status}");
    assert!(
        status["counters"]["rejoins"].as_u64() == Some(1),
        "{status}"
    );
    // The pages node 2 homed and wrote, read on node 2 again: from node 3's copies.
    let verify = cluster.run(2, &program, &["crash-verify"], LIMIT);
    stop(writer);
    assert!(
        verify.status.success(),
        "{}\nlog 2:\n{}\nlog 3:\n{}",
        describe(&verify),
        cluster.log(2),
        cluster.log(3)
    );
    assert!(String::from_utf8_lossy(&verify.stdout).contains("read 64 pages"));
    stop(reader);
    // It serves new work both ways: node 2 publishes to node 1, then node 1 to node 2.
    publish_then_consume(
        &mut cluster.command(2, &program, &["publish"]),
        &mut cluster.command(1, &program, &["consume"]),
        LIMIT,
    );
    publish_then_consume(
        &mut cluster.command(1, &program, &["publish"]),
        &mut cluster.command(2, &program, &["consume"]),
        LIMIT,
    );
    for node in 1..=3 {
        let status = gallocy_real::admin::status(&cluster.socket(node)).expect("status");
        assert_eq!(
            status["leader"],
            gallocy_real::admin::status(&cluster.socket(1)).expect("status")["leader"]
        );
        assert!(status["raft_disk"]["syncs"].as_u64() > Some(0), "{status}");
    }
}

/// Membership at run time: a fourth node added to a running 3-node cluster serves
/// (a space shared with node 1 both ways); then node 2 is killed and removed, and the
/// three members left go on allocating and faulting pages between them.
#[test]
fn a_node_is_added_to_a_running_cluster_and_a_dead_one_removed() {
    let cluster = Cluster::start("members", 3);
    let program = e2e_program(&cluster.dir);
    let gallocyd = std::path::PathBuf::from(env!("CARGO_BIN_EXE_gallocyd"));
    let id = gallocy_real::cluster::add(&cluster.dir, &gallocyd)
        .unwrap_or_else(|e| panic!("add: {e}\nlog 1:\n{}", cluster.log(1)));
    assert_eq!(id, 4);
    let status = gallocy_real::admin::status(&cluster.socket(4)).expect("status");
    assert_eq!(
        status["members"].as_array().map(|m| m.len()),
        Some(4),
        "{status}"
    );
    publish_then_consume(
        &mut cluster.command(4, &program, &["publish"]),
        &mut cluster.command(1, &program, &["consume"]),
        LIMIT,
    );
    publish_then_consume(
        &mut cluster.command(1, &program, &["publish"]),
        &mut cluster.command(4, &program, &["consume"]),
        LIMIT,
    );
    cluster.kill_daemon(2);
    gallocy_real::cluster::remove(&cluster.dir, 2)
        .unwrap_or_else(|e| panic!("remove: {e}\nlog 1:\n{}", cluster.log(1)));
    for node in [1, 3, 4] {
        let status = cluster.wait_for_status(node, LIMIT, "three members", |s| {
            s["members"].as_array().is_some_and(|m| m.len() == 3)
        });
        assert!(
            status["counters"]["membership_changes"].as_u64() >= Some(1),
            "{status}"
        );
    }
    publish_then_consume(
        &mut cluster.command(3, &program, &["publish"]),
        &mut cluster.command(4, &program, &["consume"]),
        LIMIT,
    );
    // Re-adding the removed id is refused: ids are never reused.
    let refused = gallocy_real::admin::change_membership(&cluster.socket(1), 2, true);
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("removed member")),
        "{refused:?}"
    );
}

/// gallocy_sync: 64 pages written on node 2 (which homes them and the root block) and
/// read by no other node survive node 2's daemon being killed once synced.
#[test]
fn synced_writes_survive_their_writers_node() {
    let cluster = Cluster::start("synced", 3);
    let program = e2e_program(&cluster.dir);
    let writer = cluster.spawn_expecting(2, &program, &["sync-writer"], "synced");
    cluster.kill_daemon(2);
    let verify = cluster.run(1, &program, &["sync-verify"], LIMIT);
    stop(writer);
    assert!(
        verify.status.success(),
        "{}\nlog 1:\n{}\nlog 3:\n{}",
        describe(&verify),
        cluster.log(1),
        cluster.log(3)
    );
    let backups: u64 = [1, 3]
        .iter()
        .map(|&n| {
            gallocy_real::admin::status(&cluster.socket(n)).expect("status")["counters"]
                ["backups_kept"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    assert!(backups >= 64, "backups kept: {backups}");
}

/// Copies lost with one node are made again before the next loss (k = 2): node 1 homes
/// and syncs 64 pages (its backups go to node 2); node 2 is killed, and node 1 makes
/// the copies again on node 3; node 2 restarts (empty), then node 1 is killed: node 3's
/// copies bring every page back. Without the repair both copies would be gone.
#[test]
fn copies_lost_with_a_node_are_made_again_before_the_next_crash() {
    let cluster = Cluster::start("repair", 3);
    let program = e2e_program(&cluster.dir);
    let writer = cluster.spawn_expecting(1, &program, &["sync-writer"], "synced");
    let counter =
        |status: &serde_json::Value, name: &str| status["counters"][name].as_u64().unwrap_or(0);
    let kept_on_2 = counter(
        &cluster.wait_for_status(2, LIMIT, "status", |_| true),
        "backups_kept",
    );
    assert!(kept_on_2 >= 64, "backups kept on node 2: {kept_on_2}");
    cluster.kill_daemon(2);
    let status = cluster.wait_for_status(1, LIMIT, "the copies made again", |status| {
        counter(status, "pages_repaired") >= 64
            && status["pages"]["repairs_pending"].as_u64() == Some(0)
    });
    let kept_on_3 = counter(
        &cluster.wait_for_status(3, LIMIT, "status", |_| true),
        "backups_kept",
    );
    assert!(
        kept_on_3 >= 64,
        "backups kept on node 3: {kept_on_3}; node 1: {status}"
    );
    let gallocyd = std::path::PathBuf::from(env!("CARGO_BIN_EXE_gallocyd"));
    gallocy_real::cluster::restart(&cluster.dir, 2, &gallocyd)
        .unwrap_or_else(|e| panic!("restart: {e}\nlog 1:\n{}", cluster.log(1)));
    cluster.kill_daemon(1);
    let verify = cluster.run(3, &program, &["sync-verify"], LIMIT);
    stop(writer);
    assert!(
        verify.status.success(),
        "{}\nlog 2:\n{}\nlog 3:\n{}",
        describe(&verify),
        cluster.log(2),
        cluster.log(3)
    );
}

/// The same for pages whose home was lost: node 2 homes and writes 64 pages, node 3
/// reads them; node 2 is killed, and node 3 tells the pages' new home, which rebuilds
/// them and makes their copies again at once (no request needed); node 2 restarts
/// (empty), then node 3 is killed: node 1 reads every page. Without the repair, node 3
/// held the only copies.
#[test]
fn recovered_pages_get_their_copies_again_before_the_next_crash() {
    let cluster = Cluster::start("rehint", 3);
    let program = e2e_program(&cluster.dir);
    let writer = cluster.spawn_expecting(2, &program, &["crash-writer"], "written");
    let reader = cluster.spawn_expecting(3, &program, &["crash-reader"], "read 64 pages");
    cluster.kill_daemon(2);
    let repaired = |node: u64| {
        let status = cluster.wait_for_status(node, LIMIT, "no repair pending", |status| {
            status["pages"]["repairs_pending"].as_u64() == Some(0)
        });
        status["counters"]["pages_repaired"].as_u64().unwrap_or(0)
    };
    // The hints reach the new home once node 3's copies of node 2 are void; the repairs
    // follow once the home's own are.
    let deadline = std::time::Instant::now() + LIMIT;
    while repaired(1) + repaired(3) < 64 {
        assert!(
            std::time::Instant::now() < deadline,
            "repairs: {} on node 1, {} on node 3\nlog 1:\n{}\nlog 3:\n{}",
            repaired(1),
            repaired(3),
            cluster.log(1),
            cluster.log(3)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let gallocyd = std::path::PathBuf::from(env!("CARGO_BIN_EXE_gallocyd"));
    gallocy_real::cluster::restart(&cluster.dir, 2, &gallocyd)
        .unwrap_or_else(|e| panic!("restart: {e}\nlog 1:\n{}", cluster.log(1)));
    cluster.kill_daemon(3);
    let verify = cluster.run(1, &program, &["crash-verify"], LIMIT);
    for child in [writer, reader] {
        stop(child);
    }
    assert!(
        verify.status.success(),
        "{}\nlog 1:\n{}\nlog 2:\n{}",
        describe(&verify),
        cluster.log(1),
        cluster.log(2)
    );
    assert!(String::from_utf8_lossy(&verify.stdout).contains("read 64 pages"));
}

/// Blocks carved by a node that went down stay live and can be freed elsewhere (their
/// headers, recovered with their pages, vouch for them); a second free is refused.
#[test]
fn blocks_of_a_dead_node_are_freed_on_another() {
    let cluster = Cluster::start("orphans", 3);
    let program = e2e_program(&cluster.dir);
    let writer = cluster.spawn_expecting(2, &program, &["orphan-writer"], "written");
    cluster.kill_daemon(2);
    let freed = cluster.run(1, &program, &["orphan-free"], LIMIT);
    stop(writer);
    assert!(
        freed.status.success(),
        "{}\nlog 1:\n{}",
        describe(&freed),
        cluster.log(1)
    );
    assert!(String::from_utf8_lossy(&freed.stdout).contains("freed 16"));
    let stderr = String::from_utf8_lossy(&freed.stderr);
    assert_eq!(
        stderr.matches("gallocy: free(").count(),
        1,
        "only the double free is refused: {stderr}"
    );
}

/// The history of a workload across a daemon killed at a random moment: what every
/// surviving process saw of each word (its own writes included) is still there, or a
/// later value.
fn history_across_a_kill(cluster: &Cluster, program: &std::path::Path, victim: u64, seed: u64) {
    const PROCS: usize = 6;
    const SECONDS: &str = "9";
    let mut random = common::xorshift(seed);
    let nodes: Vec<u64> = (1..=cluster.nodes).collect();
    // The pages' home (and the root block's) is the node of process 0: the victim's
    // too, at times, and then they come back from the other nodes' copies.
    let setup_node = nodes[(random() % cluster.nodes) as usize];
    let verify_node = *nodes.iter().find(|&&n| n != victim).expect("a survivor");
    let mut children = Vec::new();
    for id in 0..PROCS {
        // Process 0 allocates the pages, on a node that survives; the others anywhere.
        let node = if id == 0 {
            setup_node
        } else {
            nodes[id % nodes.len()]
        };
        let args = ["history", &id.to_string(), &PROCS.to_string(), SECONDS];
        // Kept when they all have ended, for the verifier.
        let child = cluster
            .command(node, program, &args)
            .env("GALLOCY_PERSISTENT", "1")
            .spawn()
            .unwrap();
        children.push((node, child));
    }
    std::thread::sleep(Duration::from_millis(800 + random() % 2500));
    cluster.kill_daemon(victim);
    let mut seen: std::collections::BTreeMap<(u64, u64), u64> = Default::default();
    for (node, child) in children {
        let output = finish(child, LIMIT);
        if node == victim {
            // Its daemon is gone: it ended without a history (status 86).
            continue;
        }
        assert!(
            output.status.success(),
            "node {node}: {}\nlog {node}:\n{}",
            describe(&output),
            cluster.log(node)
        );
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["saw", p, j, v] = words[..] {
                let key = (p.parse().unwrap(), j.parse().unwrap());
                let value: u64 = v.parse().unwrap();
                let entry = seen.entry(key).or_insert(0);
                *entry = (*entry).max(value);
            }
        }
    }
    assert!(!seen.is_empty(), "no surviving process saw anything");
    let verify = cluster.run(
        verify_node,
        program,
        &["history-verify", &PROCS.to_string()],
        LIMIT,
    );
    assert!(verify.status.success(), "{}", describe(&verify));
    let mut now: std::collections::BTreeMap<(u64, u64), u64> = Default::default();
    for line in String::from_utf8_lossy(&verify.stdout).lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["now", p, j, v] = words[..] {
            now.insert((p.parse().unwrap(), j.parse().unwrap()), v.parse().unwrap());
        }
    }
    for (&(p, j), &saw) in &seen {
        let value = now.get(&(p, j)).copied().unwrap_or(0);
        assert!(
            value >= saw,
            "word of process {p} in page {j}: a surviving process saw {saw}, it now holds {value} (node {victim} was killed)"
        );
    }
}

/// A multi-process workload across 3 nodes, one daemon SIGKILLed at a random moment
/// (the seed picks which and when): no write a surviving process observed is lost.
#[test]
fn a_random_daemon_kill_loses_no_observed_write() {
    // GALLOCY_TEST_SEED replays a run (the seed is printed).
    let seed = std::env::var("GALLOCY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
        | 1;
    let cluster = Cluster::start("history", 3);
    let program = e2e_program(&cluster.dir);
    let victim = 1 + seed % 3;
    eprintln!("seed {seed}: killing node {victim}");
    history_across_a_kill(&cluster, &program, victim, seed);
}

/// The leader killed in the middle of a workload: once a new leader exists, faults go
/// on (the workload's processes finish, nothing they saw lost) and allocation too (a
/// new space between the two survivors).
#[test]
fn the_leader_killed_mid_workload_allocation_and_faults_go_on() {
    let cluster = Cluster::start("leader", 3);
    let program = e2e_program(&cluster.dir);
    let leader = gallocy_real::admin::status(&cluster.socket(1)).expect("status")["leader"]
        .as_u64()
        .expect("a leader");
    history_across_a_kill(&cluster, &program, leader, 7);
    let survivors: Vec<u64> = (1..=3).filter(|&n| n != leader).collect();
    let status = cluster.wait_for_status(survivors[0], LIMIT, "a new leader", |s| {
        s["leader"].as_u64().is_some_and(|l| l != 0 && l != leader)
    });
    publish_then_consume(
        &mut cluster.command(survivors[0], &program, &["publish"]),
        &mut cluster.command(survivors[1], &program, &["consume"]),
        LIMIT,
    );
    assert_ne!(status["leader"].as_u64(), Some(leader));
}

#[test]
fn cluster_down_leaves_nothing_running() {
    let dir = temp_dir("down");
    let gallocyd = std::path::PathBuf::from(env!("CARGO_BIN_EXE_gallocyd"));
    gallocy_real::cluster::up(3, &dir, Default::default(), "info", &gallocyd).unwrap();
    let pids: Vec<i32> = (1..=3)
        .map(|n| {
            std::fs::read_to_string(dir.join(format!("node{n}/gallocyd.pid")))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    // The CLI's status over the whole cluster.
    let output = Command::new(env!("CARGO_BIN_EXE_gallocy"))
        .args(["status", "--json", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", describe(&output));
    let documents: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let leaders: Vec<_> = documents
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["leader"].clone())
        .collect();
    assert!(
        leaders.iter().all(|l| *l == leaders[0] && !l.is_null()),
        "{leaders:?}"
    );
    assert_eq!(gallocy_real::cluster::down(&dir).unwrap(), 3);
    for pid in pids {
        // SAFETY: reaping and probing the daemons this test started.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        assert!(
            unsafe { libc::kill(pid, 0) } != 0,
            "daemon {pid} still running"
        );
    }
    for n in 1..=3 {
        assert!(!dir.join(format!("node{n}/app.sock")).exists());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_real_crash_outside_the_space_still_crashes() {
    use std::os::unix::process::ExitStatusExt;
    let cluster = Cluster::start("crash", 1);
    let program = e2e_program(&cluster.dir);
    let output = cluster.run(1, &program, &["crash"], LIMIT);
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("attached"),
        "{}",
        describe(&output)
    );
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGSEGV),
        "{}",
        describe(&output)
    );
}

#[test]
fn daemon_and_cli_errors_are_clear() {
    let dir = temp_dir("cli");
    // A config file that is not TOML, and one that misses fields.
    std::fs::write(dir.join("bad.toml"), "node_id = [").unwrap();
    std::fs::write(dir.join("short.toml"), "node_id = 1\n").unwrap();
    // A revocation bound longer than failure detection allows: both values named.
    let unsafe_timing = format!(
        "node_id = 1\nlisten = {{ unix = \"{0}/p.sock\" }}\napp_socket = \"{0}/a.sock\"\n\
         runtime_dir = \"{0}\"\nrevoke_timeout_ms = 9000\ndown_after_ms = 6000\n\
         [[peers]]\nid = 1\naddr = {{ unix = \"{0}/p.sock\" }}\n",
        dir.display()
    );
    std::fs::write(dir.join("timing.toml"), unsafe_timing).unwrap();
    // The default k of new spaces: 1 to 4.
    let replicas = |k: u8| {
        format!(
            "node_id = 1\nlisten = {{ unix = \"{0}/p.sock\" }}\napp_socket = \"{0}/a.sock\"\n\
             runtime_dir = \"{0}\"\n[space]\nreplicas = {k}\n\
             [[peers]]\nid = 1\naddr = {{ unix = \"{0}/p.sock\" }}\n",
            dir.display()
        )
    };
    std::fs::write(dir.join("replicas.toml"), replicas(9)).unwrap();
    std::fs::write(dir.join("replicas3.toml"), replicas(3)).unwrap();
    let config = gallocy_real::config::DaemonConfig::load(&dir.join("replicas3.toml")).unwrap();
    assert_eq!(config.host_config(0).space_replicas, 3);
    for (file, expected) in [
        ("bad.toml", "bad config"),
        ("short.toml", "missing field"),
        ("timing.toml", "down_after_ticks (6000) must exceed"),
        ("timing.toml", "revoke_timeout_ticks (9000)"),
        ("replicas.toml", "space replicas (k) must be 1 to 4, not 9"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_gallocyd"))
            .arg("--config")
            .arg(dir.join(file))
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(expected),
            "{}",
            describe(&output)
        );
    }
    // A peer address that is neither unix: nor tcp:.
    let output = Command::new(env!("CARGO_BIN_EXE_gallocyd"))
        .args(["--node-id", "1", "--peer", "1=nowhere"])
        .arg("--runtime-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    assert!(String::from_utf8_lossy(&output.stderr).contains("neither unix:PATH nor tcp:HOST:PORT"));
    // Status of a daemon that is not there names the socket.
    let output = Command::new(env!("CARGO_BIN_EXE_gallocy"))
        .args(["status", "--socket"])
        .arg(dir.join("nobody.sock"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("nobody.sock"),
        "{}",
        describe(&output)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_process_that_stops_answering_is_killed_and_its_pages_taken_back() {
    use std::os::unix::process::ExitStatusExt;
    let cluster = Cluster::start("stopped", 2);
    let program = e2e_program(&cluster.dir);
    let mut stopper = cluster.command(1, &program, &["stopper"]).spawn().unwrap();
    let mut line = [0u8; 9];
    stopper
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut line)
        .unwrap();
    assert_eq!(&line, b"stopping\n");
    let started = std::time::Instant::now();
    let taker = cluster.run(2, &program, &["taker"], LIMIT);
    assert!(
        taker.status.success(),
        "{}\nlog 1:\n{}",
        describe(&taker),
        cluster.log(1)
    );
    assert_eq!(String::from_utf8_lossy(&taker.stdout).trim(), "read 4242");
    // It waited for the revocation timeout, not forever.
    assert!(
        started.elapsed()
            >= Duration::from_millis(gallocy_real::config::DEFAULT_REVOKE_TIMEOUT_MS * 4 / 5),
        "{:?}",
        started.elapsed()
    );
    let stopped = finish(stopper, LIMIT);
    assert_eq!(
        stopped.status.signal(),
        Some(libc::SIGKILL),
        "{}",
        describe(&stopped)
    );
    assert!(
        cluster.log(1).contains("did not give pages back"),
        "{}",
        cluster.log(1)
    );
}

/// Reads frames from `stream` until one answers `request_id` (bounded).
fn answer_to(stream: &mut UnixStream, request_id: u64) -> Option<IpcMessage> {
    let mut frame = [0u8; IPC_FRAME_BYTES];
    for _ in 0..1024 {
        stream.read_exact(&mut frame).ok()?;
        if let Ok((id, message)) = IpcMessage::decode(&frame) {
            if id == request_id {
                return Some(message);
            }
        }
    }
    None
}

fn hello_frame(role: Role, session: u64, name: &[u8]) -> [u8; IPC_FRAME_BYTES] {
    let mut field = [0u8; IPC_NAME_BYTES];
    field[..name.len()].copy_from_slice(name);
    let mut frame = [0u8; IPC_FRAME_BYTES];
    IpcMessage::Hello {
        role,
        session,
        pid: std::process::id(),
        create: true,
        persistent: false,
        replicas: 0,
        name: field,
    }
    .encode(1, &mut frame);
    frame
}

/// Random and extreme application frames after a valid hello, on the three nodes of a
/// cluster: every daemon keeps running and serving.
#[test]
fn hostile_application_frames_do_not_crash_a_daemon() {
    let cluster = Cluster::start("hostile", 3);
    let mut next = common::xorshift(0x9e37_79b9_7f4a_7c15);
    let extremes = [
        0u64,
        1,
        4095,
        4096,
        u32::MAX as u64,
        u64::MAX,
        u64::MAX - 4095,
        1 << 47,
    ];
    for node in 1..=3 {
        for batch in 0..20 {
            let mut main = UnixStream::connect(cluster.socket(node)).unwrap();
            main.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            main.write_all(&hello_frame(Role::Main, 0, b"hostile"))
                .unwrap();
            let Some(IpcMessage::Welcome { session, .. }) = answer_to(&mut main, 1) else {
                panic!("node {node} did not welcome a process");
            };
            let mut service = UnixStream::connect(cluster.socket(node)).unwrap();
            service
                .write_all(&hello_frame(Role::Service, session, b""))
                .unwrap();
            for i in 0..50u64 {
                let a = extremes[(next() % extremes.len() as u64) as usize];
                let b = extremes[(next() % extremes.len() as u64) as usize];
                let message = match next() % 8 {
                    0 => IpcMessage::GrantApplied {
                        page_addr: a,
                        pages: b as u32,
                    },
                    1 => IpcMessage::Fault {
                        addr: a,
                        write: b & 1 == 1,
                        pages: (b as u32) % 8192,
                    },
                    2 => IpcMessage::Free { addr: a },
                    3 => IpcMessage::Allocate {
                        size_bytes: a,
                        align_bytes: b,
                    },
                    4 => IpcMessage::RevokeDone { token: a },
                    5 => IpcMessage::LeaseChunks { count: b as u32 },
                    6 => IpcMessage::Hello {
                        role: Role::Thread,
                        session: a,
                        pid: b as u32,
                        create: false,
                        persistent: false,
                        replicas: 0,
                        name: [0u8; IPC_NAME_BYTES],
                    },
                    _ => IpcMessage::Stats,
                };
                let mut frame = [0u8; IPC_FRAME_BYTES];
                message.encode(100 + i, &mut frame);
                if next().is_multiple_of(4) {
                    // And some bytes that are no frame at all.
                    let at = (next() % IPC_FRAME_BYTES as u64) as usize;
                    frame[at] = next() as u8;
                }
                let target = if next().is_multiple_of(2) {
                    &mut main
                } else {
                    &mut service
                };
                if target.write_all(&frame).is_err() {
                    break;
                }
            }
            if batch % 2 == 0 {
                // Half the processes vanish without a word.
                drop(service);
                drop(main);
            }
        }
        // The daemon still answers, and a real program still runs on it.
        let status = gallocy_real::admin::status(&cluster.socket(node))
            .unwrap_or_else(|e| panic!("node {node} stopped serving: {e}\n{}", cluster.log(node)));
        assert_eq!(status["node"].as_u64(), Some(node));
    }
    let program = e2e_program(&cluster.dir);
    publish_then_consume(
        &mut cluster.command(1, &program, &["publish"]),
        &mut cluster.command(2, &program, &["consume"]),
        LIMIT,
    );
    for node in 1..=3 {
        assert!(
            cluster.daemon_alive(node),
            "node {node} died:\n{}",
            cluster.log(node)
        );
    }
}
