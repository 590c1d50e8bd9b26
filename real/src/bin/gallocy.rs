//! gallocy: the command line for users.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gallocy_real::cluster;
use gallocy_real::config::SpaceDefaults;

#[derive(Parser)]
#[command(
    name = "gallocy",
    about = "gallocy: a distributed shared memory allocator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start or stop a local cluster of daemons.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Run a program with its whole heap in a gallocy space (LD_PRELOAD), attached to
    /// the daemon at $GALLOCY_SOCKET, or to a local cluster started for the run.
    Run {
        /// Nodes of the embedded cluster (when $GALLOCY_SOCKET is not set). Above 1 the
        /// program gets an instance on every node and its threads spread over them;
        /// with $GALLOCY_SOCKET, any value above 1 uses every member of that cluster.
        #[arg(short = 'n', long, default_value_t = 1)]
        nodes: u64,
        /// The space the program's heap lives in.
        #[arg(long, default_value = "run")]
        space: String,
        /// After the program exits, print each node's status (JSON) on stderr.
        #[arg(long)]
        stats: bool,
        /// Run on the existing cluster of the daemon at this application socket, with
        /// an instance on every member (instead of $GALLOCY_SOCKET, which runs one
        /// process unless -n is above 1, or a cluster started for the run).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The program and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        program: Vec<String>,
    },
    /// Spaces: stop keeping a persistent one.
    Space {
        #[command(subcommand)]
        action: SpaceAction,
    },
    /// Show members, leader, spaces, leases, pages and counters.
    Status {
        /// A local cluster's directory (every node).
        #[arg(long, conflicts_with = "socket")]
        dir: Option<PathBuf>,
        /// One daemon's application socket.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SpaceAction {
    /// A space created with GALLOCY_PERSISTENT=1 is kept no longer: it ends when its
    /// last process has gone, at once if none is attached.
    Unpersist {
        name: String,
        /// A local cluster's directory (asks node 1).
        #[arg(long, conflicts_with = "socket", required_unless_present = "socket")]
        dir: Option<PathBuf>,
        /// One daemon's application socket.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Start N daemons; node i's application socket is DIR/node<i>/app.sock.
    Up {
        #[arg(short = 'n', long, default_value_t = 3)]
        nodes: u64,
        #[arg(long)]
        dir: PathBuf,
        /// Daemon log filter.
        #[arg(long, default_value = "info")]
        log: String,
        /// How the daemons reach each other: unix (sockets in private directories),
        /// tls (TCP on 127.0.0.1 with mutual TLS), tcp (TCP in clear, to measure).
        #[arg(long, default_value = "unix", value_parser = ["unix", "tls", "tcp"])]
        peers: String,
    },
    /// Start node N of the local cluster in DIR again after its daemon died: it
    /// rejoins as the same member with its Raft log, and gets its pages from the others.
    Restart {
        #[arg(long)]
        dir: PathBuf,
        /// The node to start again.
        node: u64,
    },
    /// Add a node to the running local cluster in DIR (the next free id): its
    /// directory and daemon, every member's configuration, and the Raft change; returns
    /// once it serves.
    Add {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Remove node N from the local cluster in DIR for good, dead or alive (its pages'
    /// surviving copies stay served by the others; its id is never reused).
    Remove {
        #[arg(long)]
        dir: PathBuf,
        /// The node to remove.
        node: u64,
    },
    /// Stop the cluster in DIR; nothing is left running.
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Write the configuration and credentials of a cluster of several hosts: OUT/node<i>
    /// for the i-th host (copy it there, run gallocyd --config OUT/node<i>/gallocyd.toml)
    /// and OUT/ca, the cluster's CA (keep it with the administrator).
    Init {
        /// The members' peer addresses, IP:PORT, comma-separated; node i is the i-th.
        #[arg(long, value_delimiter = ',', required = true)]
        hosts: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke a member's credentials: writes the CA's new CRL into every member
    /// directory under DIR (copy it to the hosts; daemons read it once a second).
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        node: u64,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Cluster { action } => match action {
            ClusterAction::Up {
                nodes,
                dir,
                log,
                peers,
            } => {
                let transport = match peers.as_str() {
                    "tls" => cluster::Transport::Tls,
                    "tcp" => cluster::Transport::PlainTcp,
                    _ => cluster::Transport::Unix,
                };
                let started = cluster::gallocyd_path().and_then(|gallocyd| {
                    cluster::up_over(
                        nodes,
                        &dir,
                        SpaceDefaults::default(),
                        &log,
                        &gallocyd,
                        transport,
                    )
                });
                match started {
                    Ok(()) => {
                        println!("cluster of {nodes} nodes is up in {}", dir.display());
                        for id in 1..=nodes {
                            println!(
                                "  node {id}: GALLOCY_SOCKET={}",
                                cluster::app_socket(&dir, id).display()
                            );
                        }
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("gallocy: {e}");
                        ExitCode::from(1)
                    }
                }
            }
            ClusterAction::Init { hosts, out } => {
                let parsed: Result<Vec<std::net::SocketAddr>, String> = hosts
                    .iter()
                    .map(|h| {
                        h.parse()
                            .map_err(|_| format!("--hosts: {h:?} is not IP:PORT"))
                    })
                    .collect();
                match parsed.and_then(|hosts| {
                    cluster::init(&hosts, &out, &SpaceDefaults::default()).map(|()| hosts)
                }) {
                    Ok(hosts) => {
                        println!("a cluster of {} hosts in {}:", hosts.len(), out.display());
                        for (i, host) in hosts.iter().enumerate() {
                            println!(
                                "  {host}: copy {} there, run gallocyd --config {}/gallocyd.toml",
                                cluster::node_dir(&out, i as u64 + 1).display(),
                                cluster::node_dir(&out, i as u64 + 1).display()
                            );
                        }
                        println!("  the CA stays in {}", out.join("ca").display());
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("gallocy: {e}");
                        ExitCode::from(1)
                    }
                }
            }
            ClusterAction::Revoke { dir, node } => match cluster::revoke(&dir, node) {
                Ok(updated) => {
                    println!("node {node} revoked; new CRL written to:");
                    for home in updated {
                        println!("  {}", home.join("crl.pem").display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("gallocy: {e}");
                    ExitCode::from(1)
                }
            },
            ClusterAction::Restart { dir, node } => {
                match cluster::gallocyd_path()
                    .and_then(|gallocyd| cluster::restart(&dir, node, &gallocyd))
                {
                    Ok(()) => {
                        println!("node {node} rejoined the cluster in {}", dir.display());
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("gallocy: {e}");
                        ExitCode::from(1)
                    }
                }
            }
            ClusterAction::Add { dir } => {
                match cluster::gallocyd_path().and_then(|gallocyd| cluster::add(&dir, &gallocyd)) {
                    Ok(id) => {
                        println!(
                            "node {id} joined the cluster in {}: GALLOCY_SOCKET={}",
                            dir.display(),
                            cluster::app_socket(&dir, id).display()
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("gallocy: {e}");
                        ExitCode::from(1)
                    }
                }
            }
            ClusterAction::Remove { dir, node } => match cluster::remove(&dir, node) {
                Ok(()) => {
                    println!("node {node} removed from the cluster in {}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("gallocy: {e}");
                    ExitCode::from(1)
                }
            },
            ClusterAction::Down { dir } => match cluster::down(&dir) {
                Ok(stopped) => {
                    println!("stopped {stopped} daemons in {}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("gallocy: {e}");
                    ExitCode::from(1)
                }
            },
        },
        Command::Status { dir, socket, json } => status(dir.as_deref(), socket.as_deref(), json),
        Command::Space {
            action: SpaceAction::Unpersist { name, dir, socket },
        } => {
            let socket = match (socket, dir) {
                (Some(socket), _) => Ok(socket),
                (None, Some(dir)) => Ok(cluster::app_socket(&dir, 1)),
                (None, None) => Err("--dir or --socket is required".to_string()),
            };
            match socket.and_then(|socket| gallocy_real::admin::unpersist(&socket, &name)) {
                Ok(true) => {
                    println!("space {name} ended (no process was attached)");
                    ExitCode::SUCCESS
                }
                Ok(false) => {
                    println!("space {name} is kept no longer: it ends with its last process");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("gallocy: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Run {
            nodes,
            space,
            stats,
            socket,
            program,
        } => {
            let options = gallocy_real::run::RunOptions {
                nodes,
                space: &space,
                program: &program,
                stats,
                socket: socket.as_deref(),
            };
            match gallocy_real::run::run(&options) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("gallocy: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn status(dir: Option<&Path>, socket: Option<&Path>, json: bool) -> ExitCode {
    let sockets: Vec<(String, PathBuf)> = match (dir, socket) {
        (_, Some(socket)) => vec![(socket.display().to_string(), socket.to_path_buf())],
        (Some(dir), None) => {
            let mut nodes: Vec<u64> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("node")?.parse().ok())
                .collect();
            nodes.sort_unstable();
            nodes
                .into_iter()
                .map(|id| (format!("node{id}"), cluster::app_socket(dir, id)))
                .collect()
        }
        (None, None) => match std::env::var_os("GALLOCY_SOCKET") {
            Some(socket) => vec![("GALLOCY_SOCKET".into(), PathBuf::from(socket))],
            None => {
                eprintln!("gallocy: give --dir DIR or --socket PATH (or set GALLOCY_SOCKET)");
                return ExitCode::from(2);
            }
        },
    };
    let mut documents = Vec::new();
    let mut failed = false;
    for (name, path) in &sockets {
        match gallocy_real::admin::status(path) {
            Ok(doc) => documents.push(doc),
            Err(e) => {
                failed = true;
                documents.push(serde_json::json!({"socket": name, "error": e}));
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&documents).expect("json")
        );
    } else {
        print_tables(&documents);
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn print_tables(documents: &[serde_json::Value]) {
    println!(
        "{:<6} {:<8} {:>6} {:<8} {:>6} {:>6} {:>7} {:>9} {:>9} {:>10} {:>10}",
        "node",
        "role",
        "term",
        "leader",
        "read",
        "write",
        "homed",
        "faults-l",
        "faults-r",
        "sent",
        "received"
    );
    for doc in documents {
        if let Some(error) = doc.get("error") {
            println!(
                "{:<6} unreachable: {}",
                doc["socket"].as_str().unwrap_or("?"),
                error.as_str().unwrap_or("?")
            );
            continue;
        }
        let role = if doc["evicted"].as_bool() == Some(true) {
            "evicted"
        } else if doc["is_leader"].as_bool() == Some(true) {
            "leader"
        } else if doc["fenced"].as_bool() == Some(true) {
            "fenced"
        } else {
            "follower"
        };
        let c = &doc["counters"];
        let text = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => "-".into(),
            other => other.to_string(),
        };
        println!(
            "{:<6} {:<8} {:>6} {:<8} {:>6} {:>6} {:>7} {:>9} {:>9} {:>10} {:>10}",
            text(&doc["node"]),
            role,
            text(&doc["term"]),
            text(&doc["leader"]),
            text(&doc["pages"]["read"]),
            text(&doc["pages"]["write"]),
            text(&doc["pages"]["homed"]),
            text(&c["faults_local"]),
            text(&c["faults_remote"]),
            text(&c["frames_sent"]),
            text(&c["frames_received"]),
        );
    }
    if let Some(doc) = documents.iter().find(|d| d.get("error").is_none()) {
        println!();
        println!("members:");
        for member in doc["members"].as_array().into_iter().flatten() {
            println!(
                "  node {:<4} {:<6} connected={}",
                member["id"],
                member["status"].as_str().unwrap_or("?"),
                member["connected"]
            );
        }
        println!("spaces:");
        for space in doc["spaces"].as_array().into_iter().flatten() {
            println!(
                "  {:<4} {:<20} base {:<18} size {:>12} chunk {:>9}  chunks per node {}",
                space["id"].to_string(),
                space["name"].as_str().unwrap_or("?"),
                space["base"].as_str().unwrap_or("?"),
                space["size_bytes"].to_string(),
                space["chunk_size_bytes"].to_string(),
                space["chunks_per_node"]
            );
        }
    }
}
