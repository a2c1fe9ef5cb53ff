//! `duplex bench`: runs the load generators of `duplex-bench` and prints their reports.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use duplex_bench::{
    ConnectionsOptions, FanoutOptions, ServerProcess, Transport, run_connections, run_fanout,
};

/// Benchmarks. Each run is bounded and stops by itself; by default it starts its own server.
#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Fan-out: subscribers follow one channel while a publisher sends at a fixed rate.
    Fanout(FanoutArgs),
    /// Idle connections: server memory per connection and connect rate.
    Connections(ConnectionsArgs),
    /// Round trips: the server asking a client, and recovery after a reconnect.
    Roundtrip(RoundtripArgs),
    /// The same updates by short polling, long polling, SSE, WebSocket and raw TCP.
    Transports(TransportsArgs),
    /// Records over HTTP: create, get and list throughput and latency.
    Http(HttpArgs),
    /// Hostile clients against a server on its default configuration: server memory
    /// throughout, and how a healthy client is answered meanwhile.
    Attack(AttackArgs),
}

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

#[derive(Debug, Clone, Copy, ValueEnum)]
enum MethodArg {
    ShortPoll,
    LongPoll,
    Sse,
    Websocket,
    Tcp,
}

#[derive(Debug, Args)]
pub(crate) struct TransportsArgs {
    /// Clients per transport.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Updates per second.
    #[arg(long, default_value_t = 10)]
    rate: u32,
    /// Payload bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Publishing time per transport, e.g. 20s.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    duration: Duration,
    /// Short polling interval.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    poll_interval: Duration,
    /// Which transports (comma-separated; default all).
    #[arg(long, value_enum, value_delimiter = ',')]
    transports: Vec<MethodArg>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Write a self-contained HTML report with charts.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    /// Write the latency chart alone as SVG.
    #[arg(long)]
    svg: Option<std::path::PathBuf>,
    #[command(flatten)]
    target: Target,
}

#[derive(Debug, Args)]
pub(crate) struct RoundtripArgs {
    /// Server → client requests to time.
    #[arg(long, default_value_t = 2000)]
    requests: u64,
    /// Missed publications per recovery (comma-separated for several runs).
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    missed: Vec<u64>,
    /// Reconnects per recovery run.
    #[arg(long, default_value_t = 20)]
    rounds: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: Target,
}

/// Where the server under test is.
#[derive(Debug, Args)]
pub(crate) struct Target {
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
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TransportArg {
    Websocket,
    Tcp,
    /// No server: plain threads write to loopback sockets (what the kernel alone costs).
    Floor,
}

#[derive(Debug, Args)]
pub(crate) struct FanoutArgs {
    /// Subscribers (comma-separated for a matrix).
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    subscribers: Vec<usize>,
    /// Publications per second (comma-separated for a matrix).
    #[arg(long, value_delimiter = ',', default_value = "100")]
    rate: Vec<u32>,
    /// Payload bytes (comma-separated for a matrix).
    #[arg(long, value_delimiter = ',', default_value = "95")]
    size: Vec<usize>,
    /// Report, per subscribers × size, the highest rate whose p99 stayed under this, e.g. 20ms.
    #[arg(long, value_parser = parse_duration)]
    p99_under: Option<Duration>,
    /// Write a self-contained HTML report with charts.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    /// Publishing time per run, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Publish through another node of the same cluster (its HTTP address), to measure
    /// delivery across nodes through the broker.
    #[arg(long)]
    publish_to: Option<String>,
    /// Subscriber transport; `floor` measures the same subscribers against no server at all
    /// (one `write` per socket per turn from plain threads): the kernel's share of a figure.
    #[arg(long, value_enum, default_value_t = TransportArg::Websocket)]
    transport: TransportArg,
    /// Threads the subscribers run on (the publisher has one more of its own).
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: Target,
}

#[derive(Debug, Args)]
pub(crate) struct ConnectionsArgs {
    /// Connections to open (the fd limit here is 20,000 per process).
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Connections opened at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Source addresses to connect from (127.0.0.1 … 127.0.0.N), past one address's
    /// ephemeral ports.
    #[arg(long, default_value_t = 4)]
    sources: u8,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: Target,
}

/// Runs `work` under a progress bar that fills over `expected` (a spinner when unknown),
/// redrawn by a ticker rather than by the work itself, so it costs the measurement nothing.
async fn with_progress<T>(
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

fn parse_duration(text: &str) -> Result<Duration, String> {
    duplex_server::config::parse_duration(text)
        .ok_or_else(|| format!("{text:?} is not a duration such as 500ms, 10s or 2m"))
}

/// The server a run measures: a child process we started, or one the user named.
async fn server_for(
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
            let server = ServerProcess::start(&exe).await?;
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
        BenchCommand::Roundtrip(args) => roundtrip(args).await,
        BenchCommand::Transports(args) => transports(args).await,
        BenchCommand::Http(args) => http(args).await,
        BenchCommand::Attack(args) => attack(args).await,
    }
}

async fn attack(args: AttackArgs) -> anyhow::Result<()> {
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

async fn http(args: HttpArgs) -> anyhow::Result<()> {
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

async fn transports(args: TransportsArgs) -> anyhow::Result<()> {
    use duplex_bench::Method;
    let (server, http_addr, tcp_addr, pid) = server_for(&args.target).await?;
    let methods: Vec<Method> = if args.transports.is_empty() {
        Method::ALL.to_vec()
    } else {
        args.transports
            .iter()
            .map(|m| match m {
                MethodArg::ShortPoll => Method::ShortPoll,
                MethodArg::LongPoll => Method::LongPoll,
                MethodArg::Sse => Method::Sse,
                MethodArg::Websocket => Method::Websocket,
                MethodArg::Tcp => Method::Tcp,
            })
            .collect()
    };
    let bar = indicatif::ProgressBar::new(args.duration.as_secs().max(1));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} s")
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .progress_chars("=> "),
    );
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let progress = |method: Method, done: u64, _total: u64| {
        bar.set_prefix(method.name());
        bar.set_position(done);
    };
    let report = duplex_bench::run_transports(
        &duplex_bench::TransportsOptions {
            http_addr,
            tcp_addr,
            server_pid: pid,
            clients: args.clients,
            rate: args.rate,
            size: args.size,
            duration: args.duration,
            poll_interval: args.poll_interval,
            methods,
        },
        &progress,
    )
    .await?;
    bar.finish_and_clear();
    if let Some(path) = &args.report {
        std::fs::write(path, duplex_bench::report::html(&report))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, duplex_bench::report::latency_svg(&report))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} clients per transport, {} updates/s of {} B for {:?}, short polls every {:?}",
            args.clients, args.rate, args.size, args.duration, args.poll_interval
        );
        println!(
            "{:<11} {:>12} {:>8} {:>8} {:>8} {:>8} {:>14} {:>10} {:>10} {:>7}",
            "transport",
            "deliveries/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "cpu s/1k deliv",
            "bytes/deliv",
            "reqs/deliv",
            "missed"
        );
        for m in &report.methods {
            println!(
                "{:<11} {:>12.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>14} {:>10.0} {:>10.3} {:>7}",
                m.method.name(),
                m.deliveries_per_second,
                m.latency_ms.p50,
                m.latency_ms.p90,
                m.latency_ms.p99,
                m.latency_ms.max,
                m.server_cpu_per_1000_deliveries
                    .map_or("-".to_owned(), |c| format!("{c:.4}")),
                m.bytes_per_delivery,
                m.requests_per_delivery,
                m.missed + m.duplicated,
            );
        }
        if let Some(path) = &args.report {
            println!("report: {}", path.display());
        }
    }
    if let Some(server) = server {
        server.stop().await?;
    }
    Ok(())
}

async fn roundtrip(args: RoundtripArgs) -> anyhow::Result<()> {
    let (server, http_addr, _, _) = server_for(&args.target).await?;
    let mut reports = vec![
        with_progress(
            format!("{} requests", args.requests),
            None,
            args.json,
            duplex_bench::run_requests(&http_addr, args.requests),
        )
        .await?,
    ];
    for missed in &args.missed {
        reports.push(
            with_progress(
                format!("recover {missed}"),
                None,
                args.json,
                duplex_bench::run_recovery(&http_addr, *missed, args.rounds),
            )
            .await?,
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        println!(
            "{:<56} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "round trip", "samples", "p50 ms", "p90 ms", "p99 ms", "max ms"
        );
        for report in &reports {
            println!(
                "{:<56} {:>8} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
                report.what,
                report.samples,
                report.latency_ms.p50,
                report.latency_ms.p90,
                report.latency_ms.p99,
                report.latency_ms.max
            );
        }
    }
    if let Some(server) = server {
        server.stop().await?;
    }
    Ok(())
}

async fn fanout(args: FanoutArgs) -> anyhow::Result<()> {
    let transport = match args.transport {
        TransportArg::Websocket => Transport::Websocket,
        TransportArg::Tcp => Transport::Tcp,
        TransportArg::Floor => Transport::Floor,
    };
    // The floor runs without a server.
    let (server, http_addr, tcp_addr, pid) = match transport {
        Transport::Floor => (None, String::new(), String::new(), None),
        _ => server_for(&args.target).await?,
    };
    if !args.json {
        println!("fan-out over {transport:?}, {:?} per run", args.duration);
        println!(
            "{:>6} {:>6} {:>8} {:>12} {:>14} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8}",
            "subs",
            "bytes",
            "rate/s",
            "deliveries",
            "deliveries/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "missed",
            "cpu s"
        );
    }
    let mut reports = Vec::new();
    let mut runs = Vec::new();
    let mut best: Vec<serde_json::Value> = Vec::new();
    for subscribers in &args.subscribers {
        for size in &args.size {
            let mut highest: Option<u32> = None;
            for rate in &args.rate {
                let before = pid.map(duplex_bench::ServerUsage::of).transpose()?;
                let options = FanoutOptions {
                    http_addr: http_addr.clone(),
                    tcp_addr: tcp_addr.clone(),
                    subscribers: *subscribers,
                    rate: *rate,
                    size: *size,
                    duration: args.duration,
                    transport,
                    client_threads: args.client_threads,
                    publish_addr: args.publish_to.as_deref().map(|addr| {
                        addr.trim_start_matches("http://")
                            .trim_end_matches('/')
                            .to_owned()
                    }),
                };
                let report = with_progress(
                    format!("{subscribers} × {rate}/s × {size} B"),
                    Some(args.duration),
                    args.json,
                    run_fanout(&options),
                )
                .await?;
                runs.push(report.clone());
                let after = pid.map(duplex_bench::ServerUsage::of).transpose()?;
                let cpu = match (before, after) {
                    (Some(b), Some(a)) => Some(a.cpu_seconds - b.cpu_seconds),
                    _ => None,
                };
                let within_bound = args.p99_under.is_some_and(|bound| {
                    report.latency_ms.p99 <= bound.as_secs_f64() * 1000.0
                        && report.missed + report.duplicated == 0
                });
                if within_bound {
                    highest = Some(highest.map_or(*rate, |h| h.max(*rate)));
                }
                if !args.json {
                    println!(
                        "{:>6} {:>6} {:>8} {:>12} {:>14.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>8}",
                        subscribers,
                        size,
                        rate,
                        report.deliveries,
                        report.deliveries_per_second,
                        report.latency_ms.p50,
                        report.latency_ms.p90,
                        report.latency_ms.p99,
                        report.latency_ms.max,
                        report.missed + report.duplicated,
                        cpu.map_or("-".to_owned(), |c| format!("{c:.2}")),
                    );
                }
                let mut value = serde_json::to_value(&report)?;
                value["server_cpu_seconds"] = cpu.into();
                reports.push(value);
            }
            if let Some(bound) = args.p99_under {
                best.push(serde_json::json!({
                    "subscribers": subscribers,
                    "size": size,
                    "p99_under_ms": bound.as_secs_f64() * 1000.0,
                    "highest_rate": highest,
                }));
                if !args.json {
                    match highest {
                        Some(rate) => println!(
                            "  {subscribers} subscribers, {size} B: highest rate with p99 under {bound:?}: {rate}/s ({} deliveries/s)",
                            u64::from(rate) * *subscribers as u64
                        ),
                        None => println!(
                            "  {subscribers} subscribers, {size} B: no rate tried kept p99 under {bound:?}"
                        ),
                    }
                }
            }
        }
    }
    if let Some(path) = &args.report {
        std::fs::write(path, duplex_bench::report::fanout_html(&runs))
            .with_context(|| format!("cannot write {}", path.display()))?;
        if !args.json {
            println!("report: {}", path.display());
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"runs": reports, "highest_rates": best})
            )?
        );
    }
    if let Some(server) = server {
        server.stop().await?;
    }
    Ok(())
}

async fn connections(args: ConnectionsArgs) -> anyhow::Result<()> {
    let (server, http_addr, _, pid) = server_for(&args.target).await?;
    let pid = pid.context("--pid is needed to read a running server's memory")?;
    let options = ConnectionsOptions {
        http_addr,
        server_pid: pid,
        connections: args.connections,
        concurrency: args.concurrency,
        sources: args.sources,
    };
    let report = with_progress(
        format!("{} connections", args.connections),
        None,
        args.json,
        run_connections(&options),
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} idle WebSocket connections: {:.0} connects/s; server RSS {:.1} MiB → {:.1} MiB, {:.2} KiB per connection",
            report.connections,
            report.connect_rate,
            report.rss_before as f64 / 1048576.0,
            report.rss_after as f64 / 1048576.0,
            report.rss_per_connection / 1024.0
        );
    }
    if let Some(server) = server {
        server.stop().await?;
    }
    Ok(())
}
