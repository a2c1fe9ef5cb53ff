//! `duplex bench chaos`: several nodes on a broker of the run's own, faults injected at random
//! moments, every client checking what it receives.

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use duplex_bench::{ChaosBroker, ChaosEvent, ChaosOptions, ChaosReport, run_chaos};

use super::parse_duration;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BrokerKind {
    /// redis-server, without persistence (a restart loses the history: new epochs).
    Redis,
    /// nats-server with JetStream on disk.
    Nats,
}

#[derive(Debug, Args)]
pub(crate) struct ChaosArgs {
    /// The broker the run starts (its own, on a private port).
    #[arg(long, value_enum)]
    broker: BrokerKind,
    /// How long faults are injected (the run then heals and checks).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Clients at once, over every transport, each session on the next node.
    #[arg(long, default_value_t = 300)]
    clients: usize,
    /// Channels.
    #[arg(long, default_value_t = 20)]
    channels: usize,
    /// Publications per second over all channels, each over HTTP to the next node.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// The longest client session.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    max_session: Duration,
    /// The longest calm between two faults.
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    max_calm: Duration,
    /// The random seed (the same seed, the same faults at the same moments).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long after the publishers stop (everything healed) every connected client must
    /// have caught up.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    settle: Duration,
    /// A PostgreSQL URL for the nodes to share as their store: writers then race `If-Match`
    /// updates of a few records through random nodes, and each record's versions are checked.
    #[arg(long)]
    store: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub(super) async fn chaos(args: ChaosArgs) -> anyhow::Result<()> {
    let options = ChaosOptions {
        exe: std::env::current_exe().context("cannot find the duplex executable")?,
        broker: match args.broker {
            BrokerKind::Redis => ChaosBroker::Redis,
            BrokerKind::Nats => ChaosBroker::Nats,
        },
        nodes: args.nodes,
        duration: args.duration,
        clients: args.clients,
        channels: args.channels,
        rate: args.rate,
        max_session: args.max_session,
        max_calm: args.max_calm,
        seed: args.seed,
        settle: args.settle,
        store: args.store,
    };
    let json = args.json;
    if !json {
        println!(
            "chaos: {} nodes on {:?}, {} clients on {} channels, {} publications/s, {:?}, seed {}",
            options.nodes,
            options.broker,
            options.clients,
            options.channels,
            options.rate,
            options.duration,
            options.seed
        );
    }
    let report = run_chaos(&options, |event: &ChaosEvent| {
        if !json {
            println!("{:>6.1}s  {}", event.at_seconds, event.what);
        }
    })
    .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    if !report.passed() {
        bail!("the chaos run failed: {}", report.failures.join("; "));
    }
    Ok(())
}

fn print_report(report: &ChaosReport) {
    let counts = &report.counts;
    let [ws, tcp, sse, poll] = counts.sessions;
    println!(
        "{} faults in {:.0} s; sessions: {} (WebSocket {ws}, raw TCP {tcp}, SSE {sse}, long poll {poll}), {} resumed: {} recovered, {} told not recovered; {} could not start or were refused",
        report.events.len(),
        report.seconds,
        ws + tcp + sse + poll,
        counts.resumed,
        counts.recovered,
        counts.not_recovered,
        counts.session_errors
    );
    println!(
        "published {} ({} refused or failed), delivered and checked {}; {} failed checks",
        counts.published, counts.publish_errors, counts.delivered, counts.violations
    );
    if let Some(records) = &report.records {
        println!(
            "records ({}): {} writes acknowledged, {} refused with 412, {} unknown; {} failed checks",
            records.collection,
            records.succeeded,
            records.refused,
            records.unknown,
            records.failures.len()
        );
    }
    super::soak::print_ending(counts, &report.failures);
}
