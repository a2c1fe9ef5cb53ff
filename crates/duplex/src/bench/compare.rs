//! `duplex bench compare`: duplex beside Node `ws` and Socket.IO, in one run.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use duplex_bench::{CompareOptions, CompareReport, Contender, run_compare};

use super::parse_duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ContenderArg {
    /// duplex, subscribers on WebSocket.
    DuplexWs,
    /// duplex, subscribers on raw TCP.
    DuplexTcp,
    /// Node `ws`.
    Ws,
    /// Socket.IO.
    Socketio,
}

#[derive(Debug, Args)]
pub(crate) struct CompareArgs {
    /// Servers to compare (comma-separated; default all four).
    #[arg(long, value_enum, value_delimiter = ',')]
    servers: Vec<ContenderArg>,
    /// Subscribers per run.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Publications per second, rising: each server runs them in turn until its p99 passes
    /// --p99-under or it misses a delivery (twice in a row at the same rate). Up to 3,000/s (3
    /// million deliveries/s to 1,000 subscribers), so that a server still within the bound at
    /// the top does not hide how far it goes: on a faster machine duplex passed 1,000/s.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "25,50,75,100,150,200,300,400,500,600,800,1000,1250,1500,2000,2500,3000"
    )]
    rates: Vec<u32>,
    /// Payload bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Publishing time per rate, e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// A run at the lowest rate before the measured ones, not reported (Node compiles its hot
    /// paths and grows its heap as it runs; 0s: none).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// The latency bound a rate must keep at p99.
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    p99_under: Duration,
    /// Idle WebSocket connections per server for memory per connection (0: skip).
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Threads the subscribers run on (the publisher has one more of its own).
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Where the peer servers are (default: DUPLEX_PEERS_DIR, else bench/peers of the source
    /// tree; `scripts/install-peers.sh` installs them).
    #[arg(long)]
    peers_dir: Option<std::path::PathBuf>,
    /// Write a self-contained HTML report with charts.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub(super) async fn compare(args: CompareArgs) -> anyhow::Result<()> {
    let contenders = if args.servers.is_empty() {
        Contender::ALL.to_vec()
    } else {
        args.servers
            .iter()
            .map(|server| match server {
                ContenderArg::DuplexWs => Contender::DuplexWebsocket,
                ContenderArg::DuplexTcp => Contender::DuplexTcp,
                ContenderArg::Ws => Contender::Ws,
                ContenderArg::Socketio => Contender::SocketIo,
            })
            .collect()
    };
    let mut rates = args.rates.clone();
    rates.sort_unstable();
    rates.dedup();
    let options = CompareOptions {
        exe: std::env::current_exe().context("cannot find the duplex executable")?,
        peers_dir: args.peers_dir.unwrap_or_else(duplex_bench::peers_dir),
        contenders,
        subscribers: args.subscribers,
        rates,
        size: args.size,
        duration: args.duration,
        warmup: args.warmup,
        p99_bound: args.p99_under,
        connections: args.connections,
        client_threads: args.client_threads,
    };
    if !args.json {
        println!(
            "{} subscribers, {} B messages, {:?} per rate, until p99 > {:?} or a miss, twice at one rate",
            args.subscribers, args.size, args.duration, args.p99_under
        );
        println!(
            "{:<17} {:>7} {:>13} {:>8} {:>8} {:>7} {:>9} {:>9} {:>9}",
            "server",
            "rate/s",
            "deliveries/s",
            "p50 ms",
            "p99 ms",
            "missed",
            "cpu s",
            "RSS MiB",
            "client s"
        );
    }
    let quiet = args.json;
    let on_run = move |contender: Contender, run: &duplex_bench::FanoutReport| {
        if !quiet {
            println!(
                "{:<17} {:>7} {:>13.0} {:>8.2} {:>8.2} {:>7} {:>9} {:>9} {:>9.2}",
                contender.name(),
                run.rate,
                run.deliveries_per_second,
                run.latency_ms.p50,
                run.latency_ms.p99,
                run.missed + run.duplicated,
                run.server_cpu_seconds
                    .map_or("-".to_owned(), |cpu| format!("{cpu:.2}")),
                run.server_rss_bytes.map_or("-".to_owned(), |rss| format!(
                    "{:.0}",
                    rss as f64 / 1048576.0
                )),
                run.client_cpu_seconds,
            );
        }
    };
    let report = run_compare(&options, &on_run).await?;
    if let Some(path) = &args.report {
        std::fs::write(path, duplex_bench::report::compare_html(&report))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_summary(&report);
        if let Some(path) = &args.report {
            println!("report: {}", path.display());
        }
    }
    Ok(())
}

/// The table README and docs/benchmarks.md quote.
fn print_summary(report: &CompareReport) {
    println!();
    println!(
        "| server | deliveries/s sustained (p99 ≤ {:.0} ms) | p50 / p99 ms there | server CPU ms / 1,000 deliveries | server RSS there | client cores | bytes per idle connection ({}) | stopped rising |",
        report.p99_bound_ms,
        report
            .contenders
            .iter()
            .find_map(|c| c.idle.as_ref().map(|i| i.connections))
            .unwrap_or(0)
    );
    println!("|---|---|---|---|---|---|---|---|");
    for c in &report.contenders {
        let s = c.sustained.as_ref();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            c.name,
            s.map_or("none".to_owned(), |s| format!(
                "{:.0} ({}/s)",
                s.deliveries_per_second, s.rate
            )),
            s.map_or("—".to_owned(), |s| format!(
                "{:.1} / {:.1}",
                s.p50_ms, s.p99_ms
            )),
            s.and_then(|s| s.server_cpu_per_1000)
                .map_or("—".to_owned(), |cpu| format!("{:.1}", cpu * 1000.0)),
            s.and_then(|s| s.server_rss_bytes)
                .map_or("—".to_owned(), |rss| format!(
                    "{:.0} MiB",
                    rss as f64 / 1048576.0
                )),
            s.map_or("—".to_owned(), |s| format!("{:.2}", s.client_cores)),
            c.idle.as_ref().map_or("—".to_owned(), |i| format!(
                "{:.0} B",
                i.rss_per_connection
            )),
            c.stopped,
        );
    }
}
