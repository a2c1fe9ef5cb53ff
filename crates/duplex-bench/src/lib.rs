//! Load generators for a duplex server, used by `duplex bench`.
//!
//! Each run is bounded in time and count and stops by itself. By default a run starts its own
//! server as a child process (`duplex serve` on loopback port 0, with a temporary data folder),
//! so the server's CPU and memory can be read from `/proc` apart from the load generator's.

mod attack;
mod baseline;
mod chaos;
mod compare;
mod connections;
mod counted;
mod fanout;
mod lean_http;
mod lean_ws;
mod peers;
mod records;
pub mod report;
mod roundtrip;
mod runs;
mod server;
mod soak;
mod transports;

pub use attack::{AttackOptions, AttackReport, Scenario, run_attack};
pub use baseline::{serve_baseline, serve_baseline_on};
pub use chaos::{ChaosBroker, ChaosEvent, ChaosOptions, ChaosReport, RecordsCheck, run_chaos};
pub use compare::{
    CompareOptions, CompareReport, Contender, ContenderReport, Sustained, run_compare,
};
pub use connections::{ConnectionsOptions, ConnectionsReport, run_connections};
pub use fanout::{FanoutOptions, FanoutReport, Percentiles, Transport, run_fanout};
pub use peers::{Protocol, peers_dir};
pub use records::{
    HalfRate, HttpOptions, HttpPhase, HttpReport, bench_record, record_size, run_http,
};
pub use roundtrip::{RoundtripReport, run_recovery, run_requests};
pub use server::{ServerProcess, ServerUsage, bench_config};
pub use soak::{LoadCounts, Node, Sample, SoakOptions, SoakReport, run_soak};
pub use transports::{Method, MethodReport, TransportsOptions, TransportsReport, run_transports};
