//! `duplex bench soak`: clients on every transport coming and going for a long time, each
//! checking what it receives, with the server's resources sampled and judged for growth.

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use duplex_bench::{LoadCounts, Node, Sample, SoakOptions, SoakReport, run_soak};

use super::{Target, parse_duration, server_for};

#[derive(Debug, Args)]
pub(crate) struct SoakArgs {
    #[command(flatten)]
    target: Target,
    /// How long clients come and go (the long run is 10m).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Clients at once, over WebSocket (40%), raw TCP (30%), SSE (15%) and long polling (15%).
    #[arg(long, default_value_t = 2000)]
    clients: usize,
    /// Channels (`bench:soak-N`) they share.
    #[arg(long, default_value_t = 100)]
    channels: usize,
    /// Publications per second, over all channels, over HTTP.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// How often the server's resources are read.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    sample_every: Duration,
    /// Readings before this are not judged for growth (default: a fifth of the run, at least 30 s
    /// when the run is long enough).
    #[arg(long, value_parser = parse_duration)]
    warmup: Option<Duration>,
    /// The longest a client stays connected in one go (each session a random part of it).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    max_session: Duration,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub(super) async fn soak(args: SoakArgs) -> anyhow::Result<()> {
    let (server, http_addr, tcp_addr, pid) = server_for(&args.target).await?;
    let pid = pid.context("a soak reads the server's memory: give --pid with --server")?;
    if tcp_addr.is_empty() {
        bail!("a soak uses raw TCP too: give --tcp-server with --server");
    }
    let warmup = args.warmup.unwrap_or_else(|| {
        let fifth = args.duration / 5;
        if args.duration >= Duration::from_secs(150) {
            fifth.max(Duration::from_secs(30))
        } else {
            fifth
        }
    });
    let options = SoakOptions {
        nodes: vec![Node {
            http_addr,
            tcp_addr,
        }],
        pid,
        duration: args.duration,
        clients: args.clients,
        channels: args.channels,
        rate: args.rate,
        sample_every: args.sample_every,
        warmup,
        max_session: args.max_session,
        settle: Duration::from_secs(2),
    };
    let json = args.json;
    if !json {
        println!(
            "soak: {} clients on {} channels, {} publications/s, {:?}; warm-up {:?}",
            options.clients, options.channels, options.rate, options.duration, options.warmup
        );
        println!(
            "{:>7} {:>9} {:>6} {:>8} {:>11} {:>9}",
            "s", "RSS MiB", "fds", "threads", "connections", "queued B"
        );
    }
    let report = run_soak(&options, |sample| {
        if !json {
            print_sample(sample);
        }
    })
    .await?;
    if let Some(server) = server {
        server.stop().await?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    if !report.passed() {
        bail!("the soak failed: {}", report.failures.join("; "));
    }
    Ok(())
}

fn print_sample(sample: &Sample) {
    println!(
        "{:>7.0} {:>9.1} {:>6} {:>8} {:>11} {:>9}",
        sample.at_seconds,
        sample.rss_bytes as f64 / 1048576.0,
        sample.fds,
        sample.threads,
        sample.connections,
        sample.queued_bytes
    );
}

fn print_report(report: &SoakReport) {
    let counts = &report.counts;
    let [ws, tcp, sse, poll] = counts.sessions;
    println!(
        "sessions: {} (WebSocket {ws}, raw TCP {tcp}, SSE {sse}, long poll {poll}); {} resumed: {} recovered, {} told not recovered; {} dropped without closing",
        ws + tcp + sse + poll,
        counts.resumed,
        counts.recovered,
        counts.not_recovered,
        counts.dropped
    );
    println!(
        "published {} ({} failed), delivered and checked {}; {} failed checks, {} sessions that could not start",
        counts.published,
        counts.publish_errors,
        counts.delivered,
        counts.violations,
        counts.session_errors
    );
    println!(
        "after the warm-up: memory {:+.1} MiB, descriptors {:+.0} (least-squares trend over the judged span)",
        report.rss_growth_bytes / 1048576.0,
        report.fd_growth
    );
    print_ending(counts, &report.failures);
}

/// The sessions the server ended, the first problems in words, and the verdict: how a soak's
/// and a chaos run's report end.
pub(super) fn print_ending(counts: &LoadCounts, failures: &[String]) {
    let [ws, tcp, sse, poll] = counts.closed;
    println!(
        "sessions the server ended: WebSocket {ws}, raw TCP {tcp}, SSE {sse}, long poll {poll}"
    );
    for line in counts
        .examples
        .iter()
        .chain(&counts.errors)
        .chain(&counts.closes)
    {
        println!("  {line}");
    }
    if failures.is_empty() {
        println!("passed");
    } else {
        println!("FAILED: {}", failures.join("; "));
    }
}
