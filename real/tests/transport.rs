//! Peer transport: TCP between daemons, and a peer that sends garbage.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{describe, e2e_program, finish, temp_dir, Cluster};

/// Two distinct free ports (both bound at once, then released).
fn free_ports() -> [u16; 2] {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    [
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    ]
}

struct Daemons(Vec<Child>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for child in &mut self.0 {
            // SAFETY: signalling a daemon this test started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}

/// Starts two daemons on TCP; None if a daemon could not bind its port (another
/// process took it between our probe and the daemon's bind).
fn start_tcp_pair(dir: &std::path::Path) -> Option<Daemons> {
    let ports = free_ports();
    let peers: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| format!("{}=tcp:127.0.0.1:{port}", i + 1))
        .collect();
    let mut daemons = Daemons(Vec::new());
    for (i, port) in ports.iter().enumerate() {
        let home = dir.join(format!("node{}", i + 1));
        std::fs::create_dir_all(&home).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_gallocyd"))
            .arg("--node-id")
            .arg((i + 1).to_string())
            .arg("--listen")
            .arg(format!("tcp:127.0.0.1:{port}"))
            .args(peers.iter().flat_map(|p| ["--peer", p.as_str()]))
            .arg("--runtime-dir")
            .arg(&home)
            .arg("--log")
            .arg("warn")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(home.join("gallocyd.log")).unwrap())
            .spawn()
            .unwrap();
        daemons.0.push(child);
    }
    let sockets: Vec<_> = (1..=2)
        .map(|i| dir.join(format!("node{i}/app.sock")))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if daemons
            .0
            .iter_mut()
            .any(|c| c.try_wait().ok().flatten().is_some())
        {
            return None;
        }
        let leaders: Vec<_> = sockets
            .iter()
            .map(|s| {
                gallocy_real::admin::status(s)
                    .ok()
                    .and_then(|d| d["leader"].as_u64())
            })
            .collect();
        if leaders[0].is_some() && leaders[0] == leaders[1] {
            return Some(daemons);
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = (1..=2)
                .map(|i| {
                    std::fs::read_to_string(dir.join(format!("node{i}/gallocyd.log")))
                        .unwrap_or_default()
                })
                .collect();
            panic!(
                "no leader over TCP (ports {ports:?}):\n{}",
                logs.join("\n---\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_daemons_over_tcp_share_a_block() {
    let dir = temp_dir("tcp");
    let daemons = (0..5)
        .find_map(|_| start_tcp_pair(&dir))
        .expect("could not bind two TCP ports in five attempts");
    let sockets: Vec<_> = (1..=2)
        .map(|i| dir.join(format!("node{i}/app.sock")))
        .collect();
    let program = e2e_program(&dir);
    let consumer = Command::new(&program)
        .arg("consume")
        .env("GALLOCY_SOCKET", &sockets[1])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let publisher = Command::new(&program)
        .arg("publish")
        .env("GALLOCY_SOCKET", &sockets[0])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let published = finish(publisher, Duration::from_secs(60));
    let consumed = finish(consumer, Duration::from_secs(60));
    assert!(published.status.success(), "{}", describe(&published));
    assert!(consumed.status.success(), "{}", describe(&consumed));
    drop(daemons);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_peer_sending_garbage_is_disconnected_and_the_daemon_keeps_serving() {
    let cluster = Cluster::start("garbage", 2);
    let peer_socket = gallocy_real::cluster::node_dir(&cluster.dir, 1).join("peer.sock");
    // A valid hello from member 2 (with node 2's real incarnation: peers are not
    // authenticated yet), then a frame that does not decode.
    let incarnation = gallocy_real::admin::status(&cluster.socket(2)).unwrap()["incarnation"]
        .as_u64()
        .unwrap();
    let mut stream = UnixStream::connect(&peer_socket).unwrap();
    stream
        .write_all(&gallocy_core::wire::encode_peer_hello(
            gallocy_core::wire::PeerHello {
                node: 2,
                incarnation,
            },
        ))
        .unwrap();
    stream.write_all(&8u32.to_le_bytes()).unwrap();
    stream.write_all(b"garbage!").unwrap();
    // A hello from a stranger and an oversized frame on other connections.
    let mut stranger = UnixStream::connect(&peer_socket).unwrap();
    stranger
        .write_all(&gallocy_core::wire::encode_peer_hello(
            gallocy_core::wire::PeerHello {
                node: 99,
                incarnation: 1,
            },
        ))
        .unwrap();
    let mut huge = UnixStream::connect(&peer_socket).unwrap();
    huge.write_all(&gallocy_core::wire::encode_peer_hello(
        gallocy_core::wire::PeerHello {
            node: 2,
            incarnation,
        },
    ))
    .unwrap();
    huge.write_all(&u32::MAX.to_le_bytes()).unwrap();
    // Wait (bounded) until the daemon has seen the garbage.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = gallocy_real::admin::status(&cluster.socket(1)).unwrap();
        if status["counters"]["frames_malformed"].as_u64().unwrap() >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = cluster.log(1);
    assert!(log.contains("disconnecting peer"), "{log}");
    // Still serving: processes on both nodes share memory.
    let program = e2e_program(&cluster.dir);
    let consumer = cluster.command(2, &program, &["consume"]).spawn().unwrap();
    let publisher = cluster.command(1, &program, &["publish"]).spawn().unwrap();
    let published = finish(publisher, Duration::from_secs(60));
    let consumed = finish(consumer, Duration::from_secs(60));
    assert!(published.status.success(), "{}", describe(&published));
    assert!(consumed.status.success(), "{}", describe(&consumed));
}

/// Thousands of well-formed but forged peer frames (page messages, frees, leases, Raft
/// messages with arbitrary fields), sent by a connection that says hello as a real
/// member, to every daemon of a 3-node cluster: every daemon keeps running and serving.
#[test]
fn forged_peer_frames_do_not_crash_a_daemon() {
    let cluster = Cluster::start("forged", 3);
    let mut next = common::xorshift(0x2545_f491_4f6c_dd1d);
    for target in 1..=3u64 {
        let claimed = if target == 1 { 2 } else { 1 };
        let incarnation = gallocy_real::admin::status(&cluster.socket(claimed)).unwrap()
            ["incarnation"]
            .as_u64()
            .unwrap();
        let peer_socket = gallocy_real::cluster::node_dir(&cluster.dir, target).join("peer.sock");
        let mut stream = UnixStream::connect(&peer_socket).unwrap();
        stream
            .write_all(&gallocy_core::wire::encode_peer_hello(
                gallocy_core::wire::PeerHello {
                    node: claimed,
                    incarnation,
                },
            ))
            .unwrap();
        for _ in 0..3000 {
            let data: Vec<u8> = (0..96).map(|_| next() as u8).collect();
            let frame = gallocy_core::fuzzing::forged_peer_frame(&data, claimed, target);
            let mut bytes = (frame.len() as u32).to_le_bytes().to_vec();
            bytes.extend_from_slice(&frame);
            if stream.write_all(&bytes).is_err() {
                // Refused and disconnected (a frame it would not take): say hello again.
                stream = UnixStream::connect(&peer_socket).unwrap();
                let _ = stream.write_all(&gallocy_core::wire::encode_peer_hello(
                    gallocy_core::wire::PeerHello {
                        node: claimed,
                        incarnation,
                    },
                ));
            }
        }
    }
    // Every daemon is still running and answering. (Frames forged under an identity
    // the cluster accepts can mislead Raft and the coherence protocol: authenticating
    // peers is its own issue. None may crash a daemon.)
    for node in 1..=3 {
        let status = gallocy_real::admin::status(&cluster.socket(node))
            .unwrap_or_else(|e| panic!("node {node} stopped serving: {e}\n{}", cluster.log(node)));
        assert_eq!(status["node"].as_u64(), Some(node));
        assert!(cluster.daemon_alive(node), "{}", cluster.log(node));
        assert!(
            !cluster.log(node).contains("panicked"),
            "{}",
            cluster.log(node)
        );
    }
}
