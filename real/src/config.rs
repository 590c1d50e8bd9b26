//! Daemon configuration: a TOML file, overridable by flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use gallocy_core::host::HostConfig;
use gallocy_core::Config;
use serde::{Deserialize, Serialize};

use crate::tls::TlsFiles;

/// Where a daemon listens for, or reaches, its peers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerAddr {
    /// A Unix socket path: daemons on one host (the local cluster).
    Unix(PathBuf),
    /// A TCP address: daemons on different hosts.
    Tcp(SocketAddr),
}

impl PeerAddr {
    /// `unix:/path` or `tcp:host:port` (a bare path is a Unix socket).
    pub fn parse(text: &str) -> Result<PeerAddr, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            return Ok(PeerAddr::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = text.strip_prefix("tcp:") {
            return addr
                .parse()
                .map(PeerAddr::Tcp)
                .map_err(|e| format!("bad TCP address {addr:?}: {e}"));
        }
        if text.starts_with('/') || text.starts_with('.') {
            return Ok(PeerAddr::Unix(PathBuf::from(text)));
        }
        Err(format!(
            "peer address {text:?} is neither unix:PATH nor tcp:HOST:PORT"
        ))
    }

    /// A relative Unix path taken from `dir`; a TCP address as it is.
    pub fn resolved(&self, dir: &Path) -> PeerAddr {
        match self {
            PeerAddr::Unix(path) => PeerAddr::Unix(dir.join(path)),
            PeerAddr::Tcp(addr) => PeerAddr::Tcp(*addr),
        }
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            PeerAddr::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerConfig {
    pub id: u64,
    pub addr: PeerAddr,
}

/// Layout of spaces created by `gallocy_attach` when they do not exist yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpaceDefaults {
    #[serde(default = "default_space_base")]
    pub base_addr: u64,
    #[serde(default = "default_space_size")]
    pub size_bytes: u64,
    #[serde(default = "default_chunk_size")]
    pub chunk_size_bytes: u64,
    /// k, the nodes each page's contents are kept on (docs/protocol.md "Replication"),
    /// for a space whose creating process did not set `GALLOCY_REPLICAS`: 1 to 4.
    #[serde(default = "default_replicas")]
    pub replicas: u8,
}

impl Default for SpaceDefaults {
    fn default() -> Self {
        SpaceDefaults {
            base_addr: default_space_base(),
            size_bytes: default_space_size(),
            chunk_size_bytes: default_chunk_size(),
            replicas: default_replicas(),
        }
    }
}

/// 32 TiB: far from PIE executables (0x55..), the heap, and shared libraries (0x7f..).
fn default_space_base() -> u64 {
    0x2000_0000_0000
}
fn default_replicas() -> u8 {
    gallocy_core::types::DEFAULT_REPLICAS
}
fn default_space_size() -> u64 {
    4 << 30
}
fn default_chunk_size() -> u64 {
    1 << 20
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    pub node_id: u64,
    /// Where this daemon accepts peer connections.
    pub listen: PeerAddr,
    /// Every member, this node included (its own entry's address is ignored).
    pub peers: Vec<PeerConfig>,
    /// The socket applications connect to.
    pub app_socket: PathBuf,
    /// Runtime directory (pid file, logs).
    pub runtime_dir: PathBuf,
    /// Where the Raft log, hard state and the node's life are kept (raft-engine's
    /// files): `runtime_dir/raft` unless set. A daemon started again on the same
    /// directory restarts as the next life of the same member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// This node is not in the cluster's first configuration: at its first start it
    /// waits to be added (`gallocy cluster add`) instead of starting a new cluster.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub join: bool,
    /// Group allowed to connect besides the daemon's own user (by gid), if any.
    #[serde(default)]
    pub app_group: Option<u32>,
    #[serde(default)]
    pub space: SpaceDefaults,
    /// Log filter (tracing's syntax), unless RUST_LOG is set.
    #[serde(default = "default_log")]
    pub log: String,
    /// A process that has not applied a revocation after this long is killed.
    #[serde(default = "default_revoke_timeout_ms")]
    pub revoke_timeout_ms: u64,
    /// The leader declares a member down after hearing nothing from it this long.
    /// Must exceed the fence delay, two election timeouts and `revoke_timeout_ms`.
    #[serde(default = "default_down_after_ms")]
    pub down_after_ms: u64,
    /// Credentials of the peer links: required when any peer is on TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
    /// TCP peers without TLS: anyone who reaches the port is a member. Only for a
    /// network nothing else is on, and for measuring what TLS costs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plaintext_tcp: bool,
}

/// Default of `DaemonConfig::revoke_timeout_ms`.
pub const DEFAULT_REVOKE_TIMEOUT_MS: u64 = 2000;
/// Default of `DaemonConfig::down_after_ms`.
pub const DEFAULT_DOWN_AFTER_MS: u64 = 6000;

fn default_revoke_timeout_ms() -> u64 {
    DEFAULT_REVOKE_TIMEOUT_MS
}

fn default_down_after_ms() -> u64 {
    DEFAULT_DOWN_AFTER_MS
}

fn default_log() -> String {
    "info".into()
}

impl DaemonConfig {
    /// A configuration with every optional setting at its default (no credentials, the
    /// default space layout, timeouts and log filter).
    pub fn new(
        node_id: u64,
        listen: PeerAddr,
        peers: Vec<PeerConfig>,
        app_socket: PathBuf,
        runtime_dir: PathBuf,
    ) -> DaemonConfig {
        DaemonConfig {
            node_id,
            listen,
            peers,
            app_socket,
            runtime_dir,
            data_dir: None,
            join: false,
            app_group: None,
            space: SpaceDefaults::default(),
            log: default_log(),
            revoke_timeout_ms: DEFAULT_REVOKE_TIMEOUT_MS,
            down_after_ms: DEFAULT_DOWN_AFTER_MS,
            tls: None,
            plaintext_tcp: false,
        }
    }

    pub fn load(path: &Path) -> Result<DaemonConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        let mut config: DaemonConfig =
            toml::from_str(&text).map_err(|e| format!("bad config {}: {e}", path.display()))?;
        // Relative paths are the configuration directory's, so a directory written by
        // `gallocy cluster init` works wherever it is copied.
        let dir = path.parent().unwrap_or(Path::new("."));
        config.app_socket = dir.join(&config.app_socket);
        config.runtime_dir = dir.join(&config.runtime_dir);
        config.data_dir = config.data_dir.map(|data| dir.join(data));
        config.listen = config.listen.resolved(dir);
        for peer in &mut config.peers {
            peer.addr = peer.addr.resolved(dir);
        }
        config.tls = config.tls.map(|tls| tls.resolved(dir));
        config
            .validate()
            .map_err(|e| format!("bad config {}: {e}", path.display()))?;
        Ok(config)
    }

    /// The directory of the node's Raft state (`data_dir`).
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| self.runtime_dir.join("raft"))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serializes")
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.node_id == 0 {
            return Err("node_id must be non-zero".into());
        }
        if !self.peers.iter().any(|p| p.id == self.node_id) {
            return Err(format!(
                "node {} is not in its own peers list",
                self.node_id
            ));
        }
        let mut ids: Vec<u64> = self.peers.iter().map(|p| p.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.peers.len() {
            return Err("peer ids must be unique".into());
        }
        let tcp = std::iter::once(&self.listen)
            .chain(self.peers.iter().map(|p| &p.addr))
            .any(|a| matches!(a, PeerAddr::Tcp(_)));
        if tcp && self.tls.is_none() && !self.plaintext_tcp {
            return Err(
                "TCP peers need credentials: a [tls] section (gallocy cluster init writes one), \
                 or plaintext_tcp = true on a network nothing else can reach"
                    .into(),
            );
        }
        // The rest, with the node's timing inequalities, as the daemon will run it.
        self.host_config(0).validate()
    }

    /// The core's configuration of this daemon (one tick is one millisecond).
    pub fn host_config(&self, owner_uid: u32) -> HostConfig {
        let mut node = Config::new(self.node_id, self.members());
        node.retry_base_ticks = 20;
        // Raft ticks every 50 ms: heartbeats every 100 ms and elections after 500 ms
        // and more (etcd's defaults are 100 ms and 1 s). An idle daemon then wakes a few
        // dozen times a second, not hundreds. Leases are renewed every 200 ms and a node
        // that has not had one renewed for 1 s fences itself.
        node.raft_tick_interval_ticks = 50;
        node.heartbeat_raft_ticks = 2;
        node.election_raft_ticks = 10;
        node.lease_interval_ticks = 200;
        node.fence_after_ticks = 1000;
        node.revoke_timeout_ticks = self.revoke_timeout_ms;
        node.down_after_ticks = self.down_after_ms;
        let mut host = HostConfig::new(node);
        host.owner_uid = owner_uid;
        host.app_group = self.app_group;
        host.space_base_addr = self.space.base_addr;
        host.space_size_bytes = self.space.size_bytes;
        host.space_chunk_size_bytes = self.space.chunk_size_bytes;
        host.space_replicas = self.space.replicas;
        host
    }

    pub fn members(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.peers.iter().map(|p| p.id).collect();
        ids.sort_unstable();
        ids
    }
}
