//! `duplex bench attack`: the hostile clients against a server on its default configuration.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use duplex_bench::ServerProcess;

use super::{Target, parse_duration, server_for, with_progress};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ScenarioArg {
    /// Subscribers that never read, each flooded with 60 KiB publications.
    SlowReaders,
    /// Anonymous publishers filling the history of many channels.
    History,
    /// Connections making as many channels as they can.
    Channels,
}

#[derive(Debug, Args)]
pub(crate) struct AttackArgs {
    /// Which attacks (comma-separated; default all), each against a fresh server unless
    /// `--server` names one.
    #[arg(long, value_enum, value_delimiter = ',')]
    scenario: Vec<ScenarioArg>,
    /// 1 runs the counts of the hostile-clients report; less for a quick run.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// How long the pressure is held after each flood, e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    hold: Duration,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: Target,
}

pub(super) async fn attack(args: AttackArgs) -> anyhow::Result<()> {
    use duplex_bench::Scenario;
    let scenarios: Vec<Scenario> = if args.scenario.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.scenario
            .iter()
            .map(|s| match s {
                ScenarioArg::SlowReaders => Scenario::SlowReaders,
                ScenarioArg::History => Scenario::History,
                ScenarioArg::Channels => Scenario::Channels,
            })
            .collect()
    };
    let mut reports = Vec::new();
    for scenario in scenarios {
        // A fresh default server per attack (the user's own with --server).
        let (server, http_addr, tcp_addr, pid) = match &args.target.server {
            Some(_) => server_for(&args.target).await?,
            None => {
                let exe = std::env::current_exe().context("cannot find the duplex executable")?;
                let server = ServerProcess::start_with_config(&exe, "").await?;
                let (http, tcp, pid) = (
                    server.http_addr.clone(),
                    server.tcp_addr.clone(),
                    server.pid(),
                );
                (Some(server), http, tcp, pid)
            }
        };
        let options = duplex_bench::AttackOptions {
            http_addr,
            tcp_addr,
            server_pid: pid.context("--pid is needed to read a running server's memory")?,
            scenario,
            scale: args.scale,
            hold: args.hold,
        };
        let report = with_progress(
            scenario.name().to_owned(),
            None,
            args.json,
            duplex_bench::run_attack(&options),
        )
        .await?;
        reports.push(report);
        if let Some(server) = server {
            server.stop().await?;
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(());
    }
    println!(
        "{:<13} {:>9} {:>10} {:>9} {:>9} {:>8} {:>8} {:>8} {:>6}  refused",
        "attack", "sent", "RSS before", "RSS max", "RSS after", "pings", "p50 ms", "max ms", "lost"
    );
    let mib = |bytes: u64| format!("{:.0} MB", bytes as f64 / 1e6);
    for r in &reports {
        let refused: Vec<String> = r.refused.iter().map(|(c, n)| format!("{c} {n}")).collect();
        println!(
            "{:<13} {:>9} {:>10} {:>9} {:>9} {:>8} {:>8.2} {:>8.2} {:>6}  {}",
            r.scenario.name(),
            r.sent,
            mib(r.rss_before),
            mib(r.rss_max),
            mib(r.rss_after),
            r.pings,
            r.ping_p50_ms,
            r.ping_max_ms,
            r.unanswered,
            if refused.is_empty() {
                "-".to_owned()
            } else {
                refused.join(", ")
            },
        );
    }
    Ok(())
}
