//! `duplex bench http`: records over HTTP beside a bare axum route of the same size.

use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use duplex_bench::{HttpOptions, HttpReport, ServerProcess};

use super::{Target, parse_duration, server_for, with_progress};

#[derive(Debug, Args)]
pub(crate) struct HttpArgs {
    /// Concurrent keep-alive clients.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Time per pass (each operation runs a full-speed pass and a half-rate pass), e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Skip the bare axum baseline (no ratios).
    #[arg(long)]
    no_baseline: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: Target,
}

/// `duplex bench baseline-server`: the bare axum route `duplex bench http` starts beside the
/// server (not for people).
#[derive(Debug, Args)]
pub(crate) struct BaselineArgs {
    /// The size of the JSON body in bytes.
    #[arg(long, default_value_t = 200)]
    size: usize,
}

pub(super) async fn baseline_server(args: BaselineArgs) -> anyhow::Result<()> {
    duplex_bench::serve_baseline(args.size).await
}

pub(super) async fn http(args: HttpArgs) -> anyhow::Result<()> {
    let (server, http_addr, _, pid) = server_for(&args.target).await?;
    let baseline = if args.no_baseline {
        None
    } else {
        let size = duplex_bench::record_size(&http_addr).await?;
        let exe = std::env::current_exe().context("cannot find the duplex executable")?;
        Some(ServerProcess::start_baseline(&exe, size).await?)
    };
    let options = HttpOptions {
        concurrency: args.concurrency,
        duration: args.duration,
        server_pid: pid,
        baseline: baseline.as_ref().map(|b| (b.http_addr.clone(), b.pid())),
    };
    let passes = if baseline.is_some() { 10 } else { 8 };
    let report = with_progress(
        "baseline, get, list, create, patch".into(),
        Some(args.duration * passes),
        args.json,
        duplex_bench::run_http(&http_addr, &options),
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report, &args);
    }
    if let Some(baseline) = baseline {
        baseline.stop().await?;
    }
    if let Some(server) = server {
        server.stop().await?;
    }
    Ok(())
}

/// The table; "½ server ms" is the server's own p99 at half rate, as the upper bound of its
/// `/metrics` histogram bucket: what the server took, without the network and the waits for a
/// CPU that the client's "½ p99" also holds; "½ >5ms %" the share of the pass's requests the
/// server took longer than the 5 ms the half-rate target allows (at most 1: p99 within 5 ms).
fn print_table(report: &HttpReport, args: &HttpArgs) {
    println!(
        "records over HTTP, {} clients, {:?} per pass, a {}-byte record",
        args.concurrency, args.duration, report.record_bytes
    );
    println!(
        "{:<9} {:>9} {:>6} {:>7} {:>7} {:>8} {:>9} {:>9} {:>9} {:>11} {:>9} {:>6}",
        "op",
        "req/s",
        "ratio",
        "p50 ms",
        "p99 ms",
        "cpu µs",
        "½ rate/s",
        "½ p50 ms",
        "½ p99 ms",
        "½ server ms",
        "½ >5ms %",
        "errors"
    );
    for phase in report.baseline.iter().chain(&report.phases) {
        let half = phase.half_rate.as_ref();
        println!(
            "{:<9} {:>9.0} {:>6} {:>7.2} {:>7.2} {:>8} {:>9.0} {:>9.2} {:>9.2} {:>11} {:>9} {:>6}",
            phase.operation,
            phase.requests_per_second,
            phase
                .ratio
                .map_or_else(|| "-".into(), |r| format!("{r:.2}")),
            phase.latency_ms.p50,
            phase.latency_ms.p99,
            phase
                .cpu_us_per_request
                .map_or_else(|| "-".into(), |c| format!("{c:.0}")),
            half.map_or(0.0, |h| h.rate),
            half.map_or(0.0, |h| h.latency_ms.p50),
            half.map_or(0.0, |h| h.latency_ms.p99),
            half.and_then(|h| h.server_p99_ms_at_most)
                .map_or_else(|| "-".into(), |ms| format!("≤ {ms}")),
            half.and_then(|h| h.server_over_5ms_percent)
                .map_or_else(|| "-".into(), |p| format!("{p:.2}")),
            phase.errors + half.map_or(0, |h| h.errors),
        );
    }
}
