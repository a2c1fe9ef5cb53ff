//! `duplex bench`: runs the load generators of `duplex-bench` and prints their reports.

mod attack;
mod chaos;
mod compare;
mod http;
mod soak;
mod sockets;

use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use duplex_bench::ServerProcess;

use attack::{AttackArgs, attack};
use chaos::{ChaosArgs, chaos};
use compare::{CompareArgs, compare};
use http::{BaselineArgs, HttpArgs, baseline_server, http};
use soak::{SoakArgs, soak};
use sockets::{
    ConnectionsArgs, FanoutArgs, RoundtripArgs, TransportsArgs, connections, fanout, roundtrip,
    transports,
};

/// Benchmarks. Each run is bounded and stops by itself; by default it starts its own server.
#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Fan-out: subscribers follow one channel while a publisher sends at a fixed rate.
    Fanout(FanoutArgs),
    /// Idle connections: server memory per connection and connect rate.
    Connections(ConnectionsArgs),
    /// duplex beside Node `ws` and Socket.IO: fan-out at rising rates until p99 passes a
    /// bound, and memory per idle connection (`scripts/install-peers.sh` installs the peers).
    Compare(CompareArgs),
    /// Round trips: the server asking a client, and recovery after a reconnect.
    Roundtrip(RoundtripArgs),
    /// The same updates by short polling, long polling, SSE, WebSocket and raw TCP.
    Transports(TransportsArgs),
    /// Records over HTTP: get, list, create and patch beside a bare axum route of the same
    /// size, as ratios to it, with latency at half the maximum rate.
    Http(HttpArgs),
    /// The bare axum route `bench http` compares with (started by it).
    #[command(hide = true)]
    BaselineServer(BaselineArgs),
    /// Hostile clients against a server on its default configuration: server memory
    /// throughout, and how a healthy client is answered meanwhile.
    Attack(AttackArgs),
    /// Thousands of clients on every transport that subscribe, drop without closing, resume
    /// `since` and leave, for a long time, each checking every offset; the server's memory and
    /// descriptors must not grow after the warm-up.
    Soak(SoakArgs),
    /// Several nodes on a Redis or NATS of the run's own while nodes are killed and restarted,
    /// cut off the broker, and the broker is killed, restarted and paused at random moments;
    /// every client checks every offset.
    Chaos(ChaosArgs),
}

/// Where the server under test is.
#[derive(Debug, Args)]
pub(super) struct Target {
    /// A running server's HTTP address (http://127.0.0.1:PORT or 127.0.0.1:PORT); default:
    /// start one as a child process, so its CPU and memory are measured apart from the load.
    /// A server of your own needs `[namespaces.bench]` with `publish = "anyone"` and a lifted
    /// `publish_rate`, as the child gets.
    #[arg(long)]
    server: Option<String>,
    /// Raw TCP address of that server.
    #[arg(long)]
    tcp_server: Option<String>,
    /// Process id of that server, for its CPU and memory.
    #[arg(long)]
    pid: Option<u32>,
    /// Where the server the bench starts keeps the `bench` namespace's history: `memory`, or
    /// `store` (appended to the SQLite file before each publication is acknowledged).
    #[arg(long, default_value = "memory", value_parser = ["memory", "store"])]
    history_storage: String,
}

/// Runs `work` under a progress bar that fills over `expected` (a spinner when unknown),
/// redrawn by a ticker rather than by the work itself, so it costs the measurement nothing.
pub(super) async fn with_progress<T>(
    label: String,
    expected: Option<Duration>,
    quiet: bool,
    work: impl std::future::Future<Output = T>,
) -> T {
    let bar = match expected {
        Some(expected) => {
            let bar = indicatif::ProgressBar::new(expected.as_millis() as u64);
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{prefix:>24} [{bar:40}] {elapsed}")
            {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        }
        None => indicatif::ProgressBar::new_spinner(),
    };
    if quiet {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_prefix(label);
    let started = std::time::Instant::now();
    let ticker = {
        let bar = bar.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                bar.set_position(started.elapsed().as_millis() as u64);
                bar.tick();
            }
        })
    };
    let result = work.await;
    ticker.abort();
    bar.finish_and_clear();
    result
}

pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    duplex_server::config::parse_duration(text)
        .ok_or_else(|| format!("{text:?} is not a duration such as 500ms, 10s or 2m"))
}

/// The server a run measures: a child process we started, or one the user named.
pub(super) async fn server_for(
    target: &Target,
) -> anyhow::Result<(Option<ServerProcess>, String, String, Option<u32>)> {
    match &target.server {
        Some(http) => {
            let addr = http
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_owned();
            // Say plainly when the server is not there, before any load starts.
            let health = format!("http://{addr}/healthz");
            match reqwest::get(&health).await {
                Ok(response) if response.status().is_success() => {}
                Ok(response) => anyhow::bail!("{health} answered {}", response.status()),
                Err(error) => anyhow::bail!("cannot reach the server at {addr}: {error}"),
            }
            Ok((
                None,
                addr,
                target.tcp_server.clone().unwrap_or_default(),
                target.pid,
            ))
        }
        None => {
            let exe = std::env::current_exe().context("cannot find the duplex executable")?;
            let config = duplex_bench::bench_config(&target.history_storage);
            let server = ServerProcess::start_with_config(&exe, &config).await?;
            let (http, tcp, pid) = (
                server.http_addr.clone(),
                server.tcp_addr.clone(),
                server.pid(),
            );
            Ok((Some(server), http, tcp, pid))
        }
    }
}

pub(crate) async fn run(command: BenchCommand) -> anyhow::Result<()> {
    // Load runs open many sockets; the server we start inherits the raised limit.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open file limit"),
    }
    match command {
        BenchCommand::Fanout(args) => fanout(args).await,
        BenchCommand::Connections(args) => connections(args).await,
        BenchCommand::Compare(args) => compare(args).await,
        BenchCommand::Roundtrip(args) => roundtrip(args).await,
        BenchCommand::Transports(args) => transports(args).await,
        BenchCommand::Http(args) => http(args).await,
        BenchCommand::BaselineServer(args) => baseline_server(args).await,
        BenchCommand::Attack(args) => attack(args).await,
        BenchCommand::Soak(args) => soak(args).await,
        BenchCommand::Chaos(args) => chaos(args).await,
    }
}
