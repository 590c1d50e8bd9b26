//! Peer transport: TCP needs credentials, and peers that send garbage or forged frames
//! (over Unix sockets, which are not authenticated) crash nothing.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{describe, e2e_program, publish_then_consume, temp_dir, Cluster};

/// TCP peers carry no trust of their own: a daemon with TCP peers and no credentials
/// does not start. (Daemons over TCP with TLS: tests/security.rs.)
#[test]
fn tcp_peers_without_credentials_are_refused_at_start() {
    let dir = temp_dir("tcp");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = Command::new(env!("CARGO_BIN_EXE_gallocyd"))
        .args(["--node-id", "1", "--listen"])
        .arg(format!("tcp:127.0.0.1:{port}"))
        .arg("--peer")
        .arg(format!("1=tcp:127.0.0.1:{port}"))
        .arg("--runtime-dir")
        .arg(dir.join("node1"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("TCP peers need credentials"),
        "{}",
        describe(&output)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_peer_sending_garbage_is_disconnected_and_the_daemon_keeps_serving() {
    let cluster = Cluster::start("garbage", 2);
    let peer_socket = gallocy_real::cluster::node_dir(&cluster.dir, 1).join("peer.sock");
    // A valid hello from member 2 (with node 2's real incarnation: Unix-socket peers
    // are trusted by their directory's permissions), then a frame that does not decode.
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
    publish_then_consume(
        &mut cluster.command(1, &program, &["publish"]),
        &mut cluster.command(2, &program, &["consume"]),
        Duration::from_secs(60),
    );
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
    // the cluster accepts can mislead Raft and the coherence protocol: over TCP, TLS
    // makes sure only a member can send them. None may crash a daemon.)
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
