#![recursion_limit = "256"]
//! gallocy-real: the daemon (`gallocyd`) and the command line (`gallocy`). I/O only:
//! sockets, timers, memfd, configuration, logging. Protocol decisions live in
//! `gallocy-core`.

pub mod admin;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod launch;
pub mod memory;
pub mod raft_disk;
pub mod run;
pub mod tls;
pub mod workers;
