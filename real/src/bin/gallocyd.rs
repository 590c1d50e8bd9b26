//! gallocyd: the gallocy daemon, one per node.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use gallocy_real::config::{DaemonConfig, PeerAddr, PeerConfig};
use gallocy_real::daemon::{install_signal_handlers, Daemon};

#[derive(Parser)]
#[command(name = "gallocyd", about = "The gallocy daemon: one per node")]
struct Args {
    /// TOML configuration file; flags override its fields.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    node_id: Option<u64>,
    /// Where peers connect: unix:PATH or tcp:HOST:PORT.
    #[arg(long)]
    listen: Option<String>,
    /// A member: ID=unix:PATH or ID=tcp:HOST:PORT (repeat; include this node).
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// The socket applications connect to.
    #[arg(long)]
    app_socket: Option<PathBuf>,
    /// Runtime directory.
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    /// Log filter (e.g. info, debug); RUST_LOG wins if set.
    #[arg(long)]
    log: Option<String>,
}

fn config_from(args: Args) -> Result<DaemonConfig, String> {
    let mut config = match &args.config {
        Some(path) => DaemonConfig::load(path)?,
        None => {
            let node_id = args.node_id.ok_or("--node-id (or --config) is required")?;
            let runtime_dir = args
                .runtime_dir
                .clone()
                .ok_or("--runtime-dir (or --config) is required")?;
            DaemonConfig::new(
                node_id,
                PeerAddr::Unix(runtime_dir.join("peer.sock")),
                Vec::new(),
                runtime_dir.join("app.sock"),
                runtime_dir,
            )
        }
    };
    if let Some(id) = args.node_id {
        config.node_id = id;
    }
    if let Some(listen) = &args.listen {
        config.listen = PeerAddr::parse(listen)?;
    }
    if !args.peers.is_empty() {
        config.peers.clear();
        for peer in &args.peers {
            let (id, addr) = peer
                .split_once('=')
                .ok_or_else(|| format!("--peer {peer:?} is not ID=ADDRESS"))?;
            let id: u64 = id.parse().map_err(|_| format!("bad peer id in {peer:?}"))?;
            config.peers.push(PeerConfig {
                id,
                addr: PeerAddr::parse(addr)?,
            });
        }
    }
    if config.peers.is_empty() {
        // A one-node cluster.
        config.peers.push(PeerConfig {
            id: config.node_id,
            addr: config.listen.clone(),
        });
    }
    if let Some(path) = args.app_socket {
        config.app_socket = path;
    }
    if let Some(dir) = args.runtime_dir {
        config.runtime_dir = dir;
    }
    if let Some(log) = args.log {
        config.log = log;
    }
    config.validate()?;
    Ok(config)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config_path = args.config.clone();
    let config = match config_from(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("gallocyd: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    install_signal_handlers();
    let mut daemon = match Daemon::new(config) {
        Ok(daemon) => daemon,
        Err(e) => {
            eprintln!("gallocyd: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(path) = config_path {
        // Peers added to (or removed from) the file reach the daemon within a second.
        daemon.watch_config(path);
    }
    match daemon.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gallocyd: {e}");
            ExitCode::from(1)
        }
    }
}
