//! Hosts that are really apart: a 3-node cluster over authenticated TCP, each daemon in
//! its own network namespace, joined by veth links to a bridge in a fourth. Root only
//! (skipped with a printed reason otherwise). Checks SC across the namespaces with
//! Peterson's mutual exclusion, that a rogue daemon in a fifth namespace claiming a real
//! member id without credentials is refused and changes nothing, and that a node cut
//! off by taking its link down is fenced, then rejoins and serves once the link is back.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{build_c, describe, e2e_program, finish, publish_then_consume, temp_dir, InitDir};
use gallocy_real::cluster::node_dir;
use gallocy_real::config::{DaemonConfig, PeerAddr, PeerConfig};

const LIMIT: Duration = Duration::from_secs(90);
const PEER_PORT: u16 = 7701;

fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The namespaces this test made; deleted (with their links) on drop.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// Daemons this test started (`ip netns exec` execs them: the pid is the daemon's).
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

fn address(host: usize) -> String {
    format!("10.231.0.{host}")
}

/// A hub namespace with a bridge, and `hosts` namespaces each linked to it by a veth
/// pair (`<tag>a<i>` inside host i, with address 10.231.0.i/24).
fn make_hosts(tag: &str, hosts: usize) -> Result<(Namespaces, Vec<String>), String> {
    let hub = format!("{tag}-hub");
    let mut made = Namespaces(Vec::new());
    ip(&["netns", "add", &hub])?;
    made.0.push(hub.clone());
    ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &hub, "link", "set", "br0", "up"])?;
    let mut names = Vec::new();
    for host in 1..=hosts {
        let name = format!("{tag}-h{host}");
        ip(&["netns", "add", &name])?;
        made.0.push(name.clone());
        let (inside, outside) = (format!("{tag}a{host}"), format!("{tag}b{host}"));
        ip(&[
            "link", "add", &inside, "type", "veth", "peer", "name", &outside,
        ])?;
        ip(&["link", "set", &inside, "netns", &name])?;
        ip(&["link", "set", &outside, "netns", &hub])?;
        ip(&["-n", &hub, "link", "set", &outside, "master", "br0"])?;
        ip(&["-n", &hub, "link", "set", &outside, "up"])?;
        let cidr = format!("{}/24", address(host));
        ip(&["-n", &name, "addr", "add", &cidr, "dev", &inside])?;
        ip(&["-n", &name, "link", "set", &inside, "up"])?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        names.push(name);
    }
    Ok((made, names))
}

fn start_daemon(namespace: &str, config: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new("ip")
        .args(["netns", "exec", namespace])
        .arg(env!("CARGO_BIN_EXE_gallocyd"))
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

struct Hosts {
    init: InitDir,
    namespaces: Vec<String>,
}

impl Hosts {
    /// `program args` in node `node`'s namespace, attached to its daemon.
    fn command_on(&self, node: u64, program: &Path, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespaces[node as usize - 1]])
            .arg(program)
            .args(args)
            .env("GALLOCY_SOCKET", self.socket(node))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    fn run_on(&self, node: u64, program: &Path, args: &[&str]) -> Child {
        self.command_on(node, program, args).spawn().unwrap()
    }

    /// A block published by a process on `from` is read by one on `to`.
    fn share(&self, program: &Path, from: u64, to: u64) {
        publish_then_consume(
            &mut self.command_on(from, program, &["publish"]),
            &mut self.command_on(to, program, &["consume"]),
            LIMIT,
        );
    }
}

fn peterson(hosts: &Hosts, program: &Path, a: u64, b: u64, rounds: &str) -> Output {
    let second = hosts.run_on(b, program, &["1", rounds]);
    let first = hosts.run_on(a, program, &["0", rounds]);
    let first = finish(first, LIMIT);
    let second = finish(second, LIMIT);
    assert!(second.status.success(), "{}", describe(&second));
    first
}

#[test]
fn three_hosts_in_network_namespaces_over_tls() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("skipping the network-namespace test: it needs root (ip netns, veth)");
        return;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        eprintln!("skipping the network-namespace test: no `ip` command (iproute2)");
        return;
    }
    let tag = format!("gy{}", std::process::id() % 100_000);
    let (_namespaces, names) = match make_hosts(&tag, 4) {
        Ok(made) => made,
        Err(why) => {
            eprintln!("skipping the network-namespace test: cannot make namespaces: {why}");
            return;
        }
    };
    let root = temp_dir("netns");
    let dir = root.join("cluster");
    let hosts: Vec<String> = (1..=3)
        .map(|h| format!("{}:{PEER_PORT}", address(h)))
        .collect();
    let init = Command::new(env!("CARGO_BIN_EXE_gallocy"))
        .args(["cluster", "init", "--hosts", &hosts.join(","), "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", describe(&init));
    // Down-detection long enough that a node cut off for a few seconds on a loaded
    // machine is fenced, not declared down (which would be for good).
    for node in 1..=3 {
        let path = node_dir(&dir, node).join("gallocyd.toml");
        let mut config = DaemonConfig::load(&path).unwrap();
        config.down_after_ms = 30_000;
        std::fs::write(&path, config.to_toml()).unwrap();
    }
    let mut daemons = Daemons(Vec::new());
    for node in 1..=3u64 {
        let home = node_dir(&dir, node);
        daemons.0.push(start_daemon(
            &names[node as usize - 1],
            &home.join("gallocyd.toml"),
            &home.join("gallocyd.log"),
        ));
    }
    let cluster = Hosts {
        init: InitDir { dir: dir.clone() },
        namespaces: names.clone(),
    };
    for node in 1..=3 {
        cluster.wait_for(node, LIMIT, "a leader", |s| s["leader"].as_u64().is_some());
    }
    let started = Instant::now();
    let step = |what: &str| eprintln!("netns: {what} at {:.1} s", started.elapsed().as_secs_f64());
    step("leader elected over TLS in three namespaces");
    let e2e = e2e_program(&root);
    let peterson_program = build_c(&root.join("peterson"), &["peterson.c"], &[]);

    // 1. Sequential consistency across namespaces: Peterson's lock between processes
    // on nodes 1 and 2.
    let out = peterson(&cluster, &peterson_program, 1, 2, "300");
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "counter 600, violations 0\n"
    );

    step("Peterson across nodes 1 and 2: 600 entries, no violation");
    // 2. A rogue daemon in the fourth namespace, configured as member 2 with the
    // members' addresses but no credentials (so, on TCP, in clear), is refused by
    // every member and changes nothing.
    let term_before = cluster.status(1)["term"].as_u64().unwrap();
    let refused_before: Vec<u64> = (1..=3)
        .map(|n| {
            cluster.status(n)["counters"]["peers_refused"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let rogue_home = root.join("rogue");
    let rogue_addr: std::net::SocketAddr = format!("{}:{PEER_PORT}", address(4)).parse().unwrap();
    let mut rogue = DaemonConfig::load(&node_dir(&dir, 2).join("gallocyd.toml")).unwrap();
    rogue.listen = PeerAddr::Tcp(rogue_addr);
    rogue.peers = (1..=3)
        .map(|id| PeerConfig {
            id,
            addr: PeerAddr::Tcp(if id == 2 {
                rogue_addr
            } else {
                format!("{}:{PEER_PORT}", address(id as usize))
                    .parse()
                    .unwrap()
            }),
        })
        .collect();
    rogue.tls = None;
    rogue.plaintext_tcp = true;
    rogue.app_socket = rogue_home.join("app.sock");
    rogue.runtime_dir = rogue_home.clone();
    std::fs::create_dir_all(&rogue_home).unwrap();
    std::fs::write(rogue_home.join("gallocyd.toml"), rogue.to_toml()).unwrap();
    daemons.0.push(start_daemon(
        &names[3],
        &rogue_home.join("gallocyd.toml"),
        &rogue_home.join("gallocyd.log"),
    ));
    for node in [1u64, 3] {
        cluster.wait_for(node, LIMIT, "the rogue refused", |s| {
            s["counters"]["peers_refused"].as_u64() >= Some(refused_before[node as usize - 1] + 2)
        });
        let log = cluster.log(node);
        assert!(
            log.contains("refused a peer") && log.contains(&address(4)),
            "node {node}:\n{log}"
        );
    }
    let rogue_status = gallocy_real::admin::status(&rogue_home.join("app.sock")).unwrap();
    assert!(
        rogue_status["leader"].is_null(),
        "the rogue found a leader: {rogue_status}"
    );
    for node in 1..=3 {
        let status = cluster.status(node);
        assert_eq!(status["term"].as_u64(), Some(term_before), "{status}");
        let members = status["members"].as_array().unwrap();
        assert!(
            members.iter().all(|m| m["status"] == "up"),
            "node {node}: {status}"
        );
    }
    cluster.share(&e2e, 2, 3);
    step("rogue member 2 refused by nodes 1 and 3, nothing changed");

    // 3. Node 3's link goes down: it is fenced (it cannot renew its lease), while nodes
    // 1 and 2 go on serving; once the link is back it rejoins and serves.
    let link = format!("{tag}a3");
    ip(&["-n", &names[2], "link", "set", &link, "down"]).unwrap();
    cluster.wait_for(3, LIMIT, "fenced while cut off", |s| s["fenced"] == true);
    step("node 3 cut off and fenced");
    cluster.share(&e2e, 1, 2);
    step("nodes 1 and 2 served while node 3 was cut off");
    ip(&["-n", &names[2], "link", "set", &link, "up"]).unwrap();
    cluster.wait_for(3, LIMIT, "in contact again", |s| s["fenced"] == false);
    step("node 3's link back: no longer fenced");
    cluster.share(&e2e, 3, 1);
    let out = peterson(&cluster, &peterson_program, 3, 2, "100");
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "counter 200, violations 0\n"
    );
    step("node 3 served again (a share with node 1, Peterson with node 2)");
    for node in 1..=3 {
        assert!(
            !cluster.log(node).contains("panicked"),
            "{}",
            cluster.log(node)
        );
    }
    drop(daemons);
    let _ = std::fs::remove_dir_all(&root);
}

impl std::ops::Deref for Hosts {
    type Target = InitDir;
    fn deref(&self) -> &InitDir {
        &self.init
    }
}
