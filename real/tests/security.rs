//! Authenticated peers: a cluster written by `gallocy cluster init` (mutual TLS over
//! TCP on 127.0.0.1) serves, and refuses a plain-TCP hello, a certificate from another
//! CA, a member's certificate claiming another member's id, and a revoked member;
//! Unix-socket peers in a directory others can reach are refused at start.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{describe, e2e_program, publish_then_consume, temp_dir, InitDir};
use gallocy_real::cluster::node_dir;
use gallocy_real::tls::{member_name, ClusterCa, PeerTls, TlsFiles};

const LIMIT: Duration = Duration::from_secs(60);

/// Daemons started from a directory `gallocy cluster init` wrote; stopped on drop.
struct InitCluster {
    /// The test's directory (removed on drop), and the cluster's in it.
    root: PathBuf,
    init: InitDir,
    hosts: Vec<SocketAddr>,
    daemons: Vec<Child>,
}

impl Drop for InitCluster {
    fn drop(&mut self) {
        for child in &mut self.daemons {
            // SAFETY: signalling a daemon this test started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl InitCluster {
    fn credentials(&self, node: u64) -> TlsFiles {
        TlsFiles {
            ca: "ca.pem".into(),
            cert: "node.pem".into(),
            key: "node-key.pem".into(),
            crl: Some("crl.pem".into()),
        }
        .resolved(&node_dir(&self.dir, node))
    }
}

/// `cluster init` for `nodes` hosts on free 127.0.0.1 ports, and its daemons; None if a
/// daemon could not bind its port (taken between our probe and its bind).
fn start_init_cluster(tag: &str, nodes: u64) -> Option<InitCluster> {
    let dir = temp_dir(tag);
    let hosts = gallocy_real::cluster::free_local_ports(nodes).unwrap();
    let list: Vec<String> = hosts.iter().map(SocketAddr::to_string).collect();
    let out = dir.join("cluster");
    let init = Command::new(env!("CARGO_BIN_EXE_gallocy"))
        .args(["cluster", "init", "--hosts", &list.join(","), "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", describe(&init));
    let mut cluster = InitCluster {
        root: dir,
        init: InitDir { dir: out.clone() },
        hosts,
        daemons: Vec::new(),
    };
    for id in 1..=nodes {
        let home = node_dir(&out, id);
        let log = std::fs::File::create(home.join("gallocyd.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_gallocyd"))
            .arg("--config")
            .arg(home.join("gallocyd.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        cluster.daemons.push(child);
    }
    let deadline = Instant::now() + LIMIT;
    loop {
        if cluster
            .daemons
            .iter_mut()
            .any(|c| c.try_wait().ok().flatten().is_some())
        {
            let logs: Vec<String> = (1..=nodes).map(|id| cluster.log(id)).collect();
            assert!(
                logs.iter().any(|l| l.contains("bind")),
                "a daemon exited:\n{}",
                logs.join("\n---\n")
            );
            return None;
        }
        let leaders: Vec<Option<u64>> = (1..=nodes)
            .map(|id| {
                gallocy_real::admin::status(&cluster.socket(id))
                    .ok()
                    .and_then(|s| s["leader"].as_u64())
            })
            .collect();
        if leaders[0].is_some() && leaders.iter().all(|l| *l == leaders[0]) {
            return Some(cluster);
        }
        assert!(Instant::now() < deadline, "no leader over TLS");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Publishes a block on `from` and reads it on `to` (each process on its node).
fn share(cluster: &InitCluster, from: u64, to: u64) {
    let program = e2e_program(&cluster.dir);
    let attached = |node: u64, role: &str| {
        let mut command = Command::new(&program);
        command
            .arg(role)
            .env("GALLOCY_SOCKET", cluster.socket(node))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    };
    publish_then_consume(
        &mut attached(from, "publish"),
        &mut attached(to, "consume"),
        LIMIT,
    );
}

fn refused_count(cluster: &InitCluster, node: u64) -> u64 {
    cluster.status(node)["counters"]["peers_refused"]
        .as_u64()
        .unwrap_or_else(|| panic!("no peers_refused counter: {}", cluster.status(node)))
}

/// Connects to `addr` with `files`' credentials as a TLS client expecting member
/// `server`, says hello as `claimed`, and sends one forged frame; returns once the
/// daemon has closed the connection (bounded), or panics if it never does.
fn hello_over_tls(addr: SocketAddr, files: &TlsFiles, server: u64, claimed: u64) {
    let config = PeerTls::load(files).unwrap().client_config();
    let name = rustls::pki_types::ServerName::try_from(member_name(server)).unwrap();
    let conn = rustls::ClientConnection::new(Arc::clone(&config), name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(LIMIT)).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    let hello = gallocy_core::wire::encode_peer_hello(gallocy_core::wire::PeerHello {
        node: claimed,
        incarnation: 1,
    });
    // The handshake may already fail here (our side refusing the server, or the
    // server's alert): either way the connection ends.
    if stream.write_all(&hello).is_ok() && stream.flush().is_ok() {
        let _ = stream.write_all(&8u32.to_le_bytes());
        let _ = stream.write_all(b"garbage!");
        let _ = stream.flush();
    }
    let mut byte = [0u8; 1];
    let started = Instant::now();
    match stream.read(&mut byte) {
        Ok(0) | Err(_) => {}
        Ok(_) => panic!("the daemon answered a connection it should refuse"),
    }
    assert!(
        started.elapsed() < LIMIT,
        "the daemon never closed the connection"
    );
}

#[test]
fn tls_peers_serve_and_refuse_strangers_impostors_and_revoked_members() {
    let cluster = (0..5)
        .find_map(|_| start_init_cluster("tls", 3))
        .expect("could not bind three TCP ports in five attempts");
    // The configuration written is TLS, with relative paths.
    let toml = std::fs::read_to_string(node_dir(&cluster.dir, 1).join("gallocyd.toml")).unwrap();
    assert!(
        toml.contains("[tls]") && toml.contains("node-key.pem"),
        "{toml}"
    );
    share(&cluster, 1, 2);
    let node1 = cluster.hosts[0];

    // 1. A plain-TCP hello as member 2, with member 2's real incarnation.
    let before = refused_count(&cluster, 1);
    let incarnation = cluster.status(2)["incarnation"].as_u64().unwrap();
    let mut plain = TcpStream::connect(node1).unwrap();
    plain.set_read_timeout(Some(LIMIT)).unwrap();
    let _ = plain.write_all(&gallocy_core::wire::encode_peer_hello(
        gallocy_core::wire::PeerHello {
            node: 2,
            incarnation,
        },
    ));
    let _ = plain.write_all(&8u32.to_le_bytes());
    let _ = plain.write_all(b"garbage!");
    // All it gets back is a TLS alert record (content type 21), then the end.
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        answer.is_empty() || (answer[0] == 21 && answer.len() <= 16),
        "answered a plain hello with {answer:?}"
    );
    cluster.wait_for(1, LIMIT, "the plain hello refused", |s| {
        s["counters"]["peers_refused"].as_u64() > Some(before)
    });

    // 2. A certificate for "node 2" from a CA that is not the cluster's.
    let foreign = cluster.dir.join("foreign");
    let ca = ClusterCa::create(&foreign.join("ca")).unwrap();
    let files = ca.issue(2, &foreign.join("node2")).unwrap();
    // Our client trusts the real cluster CA (so the handshake gets as far as the
    // server's check of our certificate).
    let mut files = files.resolved(&foreign.join("node2"));
    files.ca = cluster.credentials(1).ca;
    let before = refused_count(&cluster, 1);
    hello_over_tls(node1, &files, 1, 2);
    cluster.wait_for(1, LIMIT, "the foreign certificate refused", |s| {
        s["counters"]["peers_refused"].as_u64() > Some(before)
    });

    // 3. Member 3's genuine credentials, claiming to be member 2.
    let before = refused_count(&cluster, 1);
    hello_over_tls(node1, &cluster.credentials(3), 1, 2);
    cluster.wait_for(1, LIMIT, "the impostor refused", |s| {
        s["counters"]["peers_refused"].as_u64() > Some(before)
    });
    let log = cluster.log(1);
    assert!(
        log.contains("claims to be node 2 but its certificate is not that member's"),
        "{log}"
    );
    assert!(log.contains("refused a peer"), "{log}");
    // Nothing changed: the members are up and the cluster serves.
    for node in 1..=3 {
        let status = cluster.status(node);
        let members = status["members"].as_array().unwrap();
        assert!(
            members.iter().all(|m| m["status"] == "up"),
            "node {node}: {status}"
        );
        assert!(
            !cluster.log(node).contains("panicked"),
            "{}",
            cluster.log(node)
        );
    }
    share(&cluster, 3, 1);

    // 4. Member 3 is revoked: the CRL goes to every member directory; nodes 1 and 2
    // close their links and refuse node 3's certificate from then on, so node 3 is
    // cut off (and marked down), while nodes 1 and 2 go on serving.
    let revoke = Command::new(env!("CARGO_BIN_EXE_gallocy"))
        .args(["cluster", "revoke", "--node", "3", "--dir"])
        .arg(&cluster.dir)
        .output()
        .unwrap();
    assert!(revoke.status.success(), "{}", describe(&revoke));
    for node in 1..=2 {
        cluster.wait_for(
            node,
            LIMIT,
            "node 3 marked down after its revocation",
            |s| {
                s["members"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m["id"] == 3 && m["status"] == "down"))
            },
        );
    }
    let before = refused_count(&cluster, 1);
    hello_over_tls(node1, &cluster.credentials(3), 1, 3);
    cluster.wait_for(1, LIMIT, "the revoked member refused", |s| {
        s["counters"]["peers_refused"].as_u64() > Some(before)
    });
    share(&cluster, 2, 1);
}

#[test]
fn unix_peers_in_a_directory_others_can_reach_are_refused_at_start() {
    let dir = temp_dir("perm");
    let open = dir.join("open");
    std::fs::create_dir_all(&open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_gallocyd"))
        .args(["--node-id", "1", "--peer"])
        .arg(format!("1=unix:{}", open.join("peer.sock").display()))
        .arg("--listen")
        .arg(format!("unix:{}", open.join("peer.sock").display()))
        .arg("--runtime-dir")
        .arg(&open)
        .output()
        .unwrap();
    assert!(!output.status.success(), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is mode 755") && stderr.contains("chmod 700"),
        "{stderr}"
    );
    assert!(!open.join("peer.sock").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `cluster init` refuses what it cannot write a working cluster from.
#[test]
fn cluster_init_refuses_bad_hosts() {
    let dir = temp_dir("init");
    let run = |hosts: &str, out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_gallocy"))
            .args(["cluster", "init", "--hosts", hosts, "--out"])
            .arg(out)
            .output()
            .unwrap()
    };
    let bad = run("a.example:7701,b:7701", &dir.join("a"));
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("is not IP:PORT"),
        "{}",
        describe(&bad)
    );
    let twice = run("10.0.0.1:7701,10.0.0.1:7701", &dir.join("b"));
    assert!(String::from_utf8_lossy(&twice.stderr).contains("listed twice"));
    let good = run("10.0.0.1:7701,10.0.0.2:7701", &dir.join("c"));
    assert!(good.status.success(), "{}", describe(&good));
    let again = run("10.0.0.1:7701,10.0.0.2:7701", &dir.join("c"));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a cluster"));
    // The CA's key and each member's key are private.
    use std::os::unix::fs::PermissionsExt;
    for key in ["ca/ca-key.pem", "node1/node-key.pem", "node2/node-key.pem"] {
        let mode = std::fs::metadata(dir.join("c").join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{key} is mode {mode:o}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

impl std::ops::Deref for InitCluster {
    type Target = InitDir;
    fn deref(&self) -> &InitDir {
        &self.init
    }
}
