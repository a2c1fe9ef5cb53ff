//! `duplex bench http`: records over HTTP.

use std::time::Duration;

use clap::Args;

use super::{Target, parse_duration, server_for, with_progress};

#[derive(Debug, Args)]
pub(crate) struct HttpArgs {
    /// Concurrent keep-alive clients.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Time per operation, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: Target,
}

pub(super) async fn http(args: HttpArgs) -> anyhow::Result<()> {
    let (server, http_addr, _, _) = server_for(&args.target).await?;
    let phases = with_progress(
        "create, get, list".into(),
        Some(args.duration * 3),
        args.json,
        duplex_bench::run_records(&http_addr, args.concurrency, args.duration),
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&phases)?);
    } else {
        println!(
            "records over HTTP, {} clients, {:?} per operation",
            args.concurrency, args.duration
        );
        println!(
            "{:<8} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7}",
            "op", "requests", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors"
        );
        for phase in &phases {
            println!(
                "{:<8} {:>10} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7}",
                phase.operation,
                phase.requests,
                phase.requests_per_second,
                phase.latency_ms.p50,
                phase.latency_ms.p90,
                phase.latency_ms.p99,
                phase.latency_ms.max,
                phase.errors
            );
        }
    }
    if let Some(server) = server {
        server.stop().await?;
    }
    Ok(())
}
