//! `duplex bench fanout`, `connections`, `roundtrip` and `transports`: the socket side.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use duplex_bench::{
    ConnectionsOptions, FanoutOptions, Protocol, ServerProcess, Transport, run_connections,
    run_fanout,
};

use super::{Target, parse_duration, server_for, with_progress};

/// A peer server to measure instead of duplex.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum PeerArg {
    /// Node `ws` (bench/peers/ws.mjs).
    Ws,
    /// Socket.IO (bench/peers/socketio.mjs).
    Socketio,
}

impl PeerArg {
    fn protocol(peer: Option<PeerArg>) -> Protocol {
        match peer {
            None => Protocol::Duplex,
            Some(PeerArg::Ws) => Protocol::Ws,
            Some(PeerArg::Socketio) => Protocol::SocketIo,
        }
    }
}

/// The server a run measures: duplex (see [`server_for`]), or a peer server started from
/// `bench/peers` (`scripts/install-peers.sh`), or one running at `--server` already.
async fn server_or_peer(
    target: &Target,
    protocol: Protocol,
) -> anyhow::Result<(Option<ServerProcess>, String, String, Option<u32>)> {
    if protocol == Protocol::Duplex {
        return server_for(target).await;
    }
    if let Some(http) = &target.server {
        // A peer has no /healthz: a server that is not there fails the first connection.
        let addr = http.trim_start_matches("http://").trim_end_matches('/');
        return Ok((None, addr.to_owned(), String::new(), target.pid));
    }
    let peer = ServerProcess::start_peer(protocol, &duplex_bench::peers_dir(), &[]).await?;
    let (http, pid) = (peer.http_addr.clone(), peer.pid());
    Ok((Some(peer), http, String::new(), pid))
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
    /// Measure a peer server instead of duplex, with the same client speaking its protocol
    /// (WebSocket only; `scripts/install-peers.sh` installs them).
    #[arg(long, value_enum)]
    peer: Option<PeerArg>,
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
    /// Measure a peer server instead of duplex (`scripts/install-peers.sh` installs them).
    #[arg(long, value_enum)]
    peer: Option<PeerArg>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: Target,
}

pub(super) async fn transports(args: TransportsArgs) -> anyhow::Result<()> {
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
            "{:<11} {:>12} {:>8} {:>8} {:>8} {:>8} {:>9} {:>14} {:>10} {:>10} {:>7}",
            "transport",
            "deliveries/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "drain ms",
            "cpu s/1k deliv",
            "bytes/deliv",
            "reqs/deliv",
            "missed"
        );
        for m in &report.methods {
            println!(
                "{:<11} {:>12.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9.1} {:>14} {:>10.0} {:>10.3} {:>7}",
                m.method.name(),
                m.deliveries_per_second,
                m.latency_ms.p50,
                m.latency_ms.p90,
                m.latency_ms.p99,
                m.latency_ms.max,
                m.drain_ms,
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

pub(super) async fn roundtrip(args: RoundtripArgs) -> anyhow::Result<()> {
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

pub(super) async fn fanout(args: FanoutArgs) -> anyhow::Result<()> {
    let transport = match args.transport {
        TransportArg::Websocket => Transport::Websocket,
        TransportArg::Tcp => Transport::Tcp,
        TransportArg::Floor => Transport::Floor,
    };
    let protocol = PeerArg::protocol(args.peer);
    if protocol != Protocol::Duplex && transport != Transport::Websocket {
        anyhow::bail!("--peer is measured over WebSocket only");
    }
    // The floor runs without a server.
    let (server, http_addr, tcp_addr, pid) = match transport {
        Transport::Floor => (None, String::new(), String::new(), None),
        _ => server_or_peer(&args.target, protocol).await?,
    };
    if !args.json {
        println!(
            "fan-out from {} over {transport:?}, {:?} per run",
            protocol.name(),
            args.duration
        );
        println!(
            "{:>6} {:>6} {:>8} {:>12} {:>14} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7} {:>5} {:>8}",
            "subs",
            "bytes",
            "rate/s",
            "deliveries",
            "deliveries/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "drain ms",
            "missed",
            "dup",
            "cpu s"
        );
        println!(
            "  deliveries/s: in-order deliveries over the time from the first publication's due time to the last delivery; drain: last delivery after the last due time; cpu: the server's, from the first publication to the end"
        );
    }
    let mut reports = Vec::new();
    let mut runs = Vec::new();
    let mut best: Vec<serde_json::Value> = Vec::new();
    for subscribers in &args.subscribers {
        for size in &args.size {
            // The highest rate within the bound, and the deliveries/s that run counted.
            let mut highest: Option<(u32, f64)> = None;
            for rate in &args.rate {
                let options = FanoutOptions {
                    http_addr: http_addr.clone(),
                    tcp_addr: tcp_addr.clone(),
                    subscribers: *subscribers,
                    rate: *rate,
                    size: *size,
                    duration: args.duration,
                    transport,
                    protocol,
                    client_threads: args.client_threads,
                    publish_addr: args.publish_to.as_deref().map(|addr| {
                        addr.trim_start_matches("http://")
                            .trim_end_matches('/')
                            .to_owned()
                    }),
                    server_pid: pid,
                };
                let report = with_progress(
                    format!("{subscribers} × {rate}/s × {size} B"),
                    Some(args.duration),
                    args.json,
                    run_fanout(&options),
                )
                .await?;
                runs.push(report.clone());
                let cpu = report.server_cpu_seconds;
                let within_bound = args.p99_under.is_some_and(|bound| {
                    report.latency_ms.p99 <= bound.as_secs_f64() * 1000.0
                        && report.missed + report.duplicated == 0
                });
                if within_bound && highest.is_none_or(|(h, _)| *rate > h) {
                    highest = Some((*rate, report.deliveries_per_second));
                }
                if !args.json {
                    println!(
                        "{:>6} {:>6} {:>8} {:>12} {:>14.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9.1} {:>7} {:>5} {:>8}",
                        subscribers,
                        size,
                        rate,
                        report.deliveries,
                        report.deliveries_per_second,
                        report.latency_ms.p50,
                        report.latency_ms.p90,
                        report.latency_ms.p99,
                        report.latency_ms.max,
                        report.drain_ms,
                        report.missed,
                        report.duplicated,
                        cpu.map_or("-".to_owned(), |c| format!("{c:.2}")),
                    );
                }
                reports.push(serde_json::to_value(&report)?);
            }
            if let Some(bound) = args.p99_under {
                best.push(serde_json::json!({
                    "subscribers": subscribers,
                    "size": size,
                    "p99_under_ms": bound.as_secs_f64() * 1000.0,
                    "highest_rate": highest.map(|(rate, _)| rate),
                    "deliveries_per_second": highest.map(|(_, counted)| counted),
                }));
                if !args.json {
                    match highest {
                        Some((rate, counted)) => println!(
                            "  {subscribers} subscribers, {size} B: highest rate with p99 under {bound:?}: {rate}/s ({counted:.0} deliveries/s counted)"
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

pub(super) async fn connections(args: ConnectionsArgs) -> anyhow::Result<()> {
    let protocol = PeerArg::protocol(args.peer);
    let (server, http_addr, _, pid) = server_or_peer(&args.target, protocol).await?;
    let pid = pid.context("--pid is needed to read a running server's memory")?;
    let options = ConnectionsOptions {
        http_addr,
        protocol,
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
            "{}: {} idle WebSocket connections: {:.0} connects/s; server RSS {:.1} MiB → {:.1} MiB, {:.2} KiB per connection",
            protocol.name(),
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
