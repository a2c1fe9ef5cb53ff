//! duplex beside its peers in one run: the same fan-out at rising rates against duplex over
//! WebSocket and raw TCP, Node `ws` and Socket.IO, each until its p99 passes the bound or it
//! misses a delivery, then each one's memory per idle connection.
//!
//! Every server runs as a child process on this machine, started fresh for its rates and again
//! for its idle connections, and is measured by the same load client ([`crate::run_fanout`],
//! [`crate::run_connections`]) speaking its protocol ([`Protocol`]).

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::{
    ConnectionsOptions, ConnectionsReport, FanoutOptions, FanoutReport, Protocol, ServerProcess,
    Transport, run_connections, run_fanout,
};

/// How many runs a rate gets before it counts as failed.
const ATTEMPTS: u32 = 2;

/// One server and transport in the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Contender {
    /// duplex, subscribers on WebSocket.
    DuplexWebsocket,
    /// duplex, subscribers on raw TCP (line mode).
    DuplexTcp,
    /// Node `ws` (`bench/peers/ws.mjs`).
    Ws,
    /// Socket.IO (`bench/peers/socketio.mjs`).
    SocketIo,
}

impl Contender {
    /// All of them, in the order of the report.
    pub const ALL: [Contender; 4] = [
        Contender::DuplexWebsocket,
        Contender::DuplexTcp,
        Contender::Ws,
        Contender::SocketIo,
    ];

    /// The name in tables and charts.
    pub fn name(self) -> &'static str {
        match self {
            Contender::DuplexWebsocket => "duplex WebSocket",
            Contender::DuplexTcp => "duplex raw TCP",
            Contender::Ws => "Node ws",
            Contender::SocketIo => "Socket.IO",
        }
    }

    fn protocol(self) -> Protocol {
        match self {
            Contender::DuplexWebsocket | Contender::DuplexTcp => Protocol::Duplex,
            Contender::Ws => Protocol::Ws,
            Contender::SocketIo => Protocol::SocketIo,
        }
    }

    fn transport(self) -> Transport {
        match self {
            Contender::DuplexTcp => Transport::Tcp,
            _ => Transport::Websocket,
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// The `duplex` executable, for the duplex server.
    pub exe: PathBuf,
    /// Where the peer servers are ([`crate::peers_dir`]).
    pub peers_dir: PathBuf,
    /// Which servers, in order.
    pub contenders: Vec<Contender>,
    /// Subscribers per fan-out run.
    pub subscribers: usize,
    /// Publications per second, rising: each server runs them in turn until one fails.
    pub rates: Vec<u32>,
    /// Payload bytes.
    pub size: usize,
    /// Publishing time per run.
    pub duration: Duration,
    /// A run at the lowest rate before the measured ones, not reported: Node compiles its hot
    /// paths as it runs them and grows its heap, and a first run would measure that.
    pub warmup: Duration,
    /// A run is sustained when its p99 is at most this and nothing was missed or repeated.
    pub p99_bound: Duration,
    /// Idle connections per server for its memory (0: not measured).
    pub connections: usize,
    /// Threads the subscribers run on.
    pub client_threads: usize,
}

/// What one server did.
#[derive(Debug, Clone, Serialize)]
pub struct ContenderReport {
    /// Which.
    pub contender: Contender,
    /// Its name.
    pub name: &'static str,
    /// Every rate run, in order (a rate that failed once and was run again appears twice), the
    /// failing one last.
    pub runs: Vec<FanoutReport>,
    /// The highest rate sustained (`None`: not even the first).
    pub sustained: Option<Sustained>,
    /// Why the rates stopped rising.
    pub stopped: String,
    /// Idle connections and the memory they took (`None`: not measured, or not a WebSocket
    /// server).
    pub idle: Option<ConnectionsReport>,
}

/// The highest rate a server sustained, with what it cost.
#[derive(Debug, Clone, Serialize)]
pub struct Sustained {
    /// Publications per second.
    pub rate: u32,
    /// Deliveries per second counted in that run.
    pub deliveries_per_second: f64,
    /// Its latency.
    pub p50_ms: f64,
    /// Its latency.
    pub p99_ms: f64,
    /// Server CPU seconds per 1,000 deliveries.
    pub server_cpu_per_1000: Option<f64>,
    /// Server resident memory at the end of that run.
    pub server_rss_bytes: Option<u64>,
    /// The load client's CPU over that run, in cores (1.0: one core busy throughout).
    pub client_cores: f64,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    /// Subscribers per run.
    pub subscribers: usize,
    /// Payload bytes.
    pub size: usize,
    /// Publishing time per run.
    pub duration_seconds: f64,
    /// The p99 bound.
    pub p99_bound_ms: f64,
    /// Subscriber threads of the load client.
    pub client_threads: usize,
    /// Cores of this machine, which the servers and the client share.
    pub cores: usize,
    /// Each server's results.
    pub contenders: Vec<ContenderReport>,
}

impl Sustained {
    fn of(report: &FanoutReport) -> Sustained {
        let seconds = report.publications as f64 / f64::from(report.rate.max(1));
        Sustained {
            rate: report.rate,
            deliveries_per_second: report.deliveries_per_second,
            p50_ms: report.latency_ms.p50,
            p99_ms: report.latency_ms.p99,
            server_cpu_per_1000: report
                .server_cpu_seconds
                .map(|cpu| cpu / report.deliveries.max(1) as f64 * 1000.0),
            server_rss_bytes: report.server_rss_bytes,
            client_cores: report.client_cpu_seconds / seconds.max(1e-9),
        }
    }
}

/// Whether `report` stayed within the bound, and if not, why.
fn verdict(report: &FanoutReport, bound: Duration) -> Result<(), String> {
    let bound_ms = bound.as_secs_f64() * 1000.0;
    if report.missed + report.duplicated > 0 {
        Err(format!(
            "{} missed and {} repeated at {}/s",
            report.missed, report.duplicated, report.rate
        ))
    } else if report.latency_ms.p99 > bound_ms {
        Err(format!(
            "p99 {:.1} ms over {bound_ms:.0} ms at {}/s",
            report.latency_ms.p99, report.rate
        ))
    } else {
        Ok(())
    }
}

/// The server a contender runs against, started fresh.
async fn start(options: &CompareOptions, contender: Contender) -> anyhow::Result<ServerProcess> {
    match contender.protocol() {
        Protocol::Duplex => ServerProcess::start(&options.exe).await,
        peer => ServerProcess::start_peer(peer, &options.peers_dir, &[]).await,
    }
}

/// Runs `rates` in turn with `run` until one fails twice in a row ([`ATTEMPTS`]) or cannot be
/// run at all, keeping every run, the highest rate sustained and why the climb stopped.
async fn climb(
    report: &mut ContenderReport,
    rates: &[u32],
    bound: Duration,
    mut run: impl AsyncFnMut(u32) -> anyhow::Result<FanoutReport>,
) {
    'rates: for &rate in rates {
        // One noisy run (a collection pause, the other core busy) does not end a server's
        // climb: a rate fails when it fails twice in a row.
        for attempt in 1..=ATTEMPTS {
            let done = match run(rate).await {
                Ok(done) => done,
                // A server that could not take the run at all (subscribers not connected in
                // time, the publisher cut off) has found its limit: say so, and go on.
                Err(error) => {
                    report.stopped = format!("failed at {rate}/s: {error:#}");
                    break 'rates;
                }
            };
            let verdict = verdict(&done, bound);
            if verdict.is_ok() {
                report.sustained = Some(Sustained::of(&done));
            }
            report.runs.push(done);
            match verdict {
                Ok(()) => continue 'rates,
                Err(why) if attempt == ATTEMPTS => {
                    report.stopped = format!("{why}, twice");
                    break 'rates;
                }
                Err(_) => {}
            }
        }
    }
}

/// Runs the comparison; `on_run` is told of each run as it ends (for progress).
pub async fn run_compare(
    options: &CompareOptions,
    on_run: &dyn Fn(Contender, &FanoutReport),
) -> anyhow::Result<CompareReport> {
    let mut contenders = Vec::with_capacity(options.contenders.len());
    for &contender in &options.contenders {
        let server = start(options, contender).await?;
        let mut report = ContenderReport {
            contender,
            name: contender.name(),
            runs: Vec::new(),
            sustained: None,
            stopped: "the highest rate asked for".to_owned(),
            idle: None,
        };
        let fanout = |rate: u32, duration: Duration| FanoutOptions {
            http_addr: server.http_addr.clone(),
            tcp_addr: server.tcp_addr.clone(),
            subscribers: options.subscribers,
            rate,
            size: options.size,
            duration,
            transport: contender.transport(),
            protocol: contender.protocol(),
            client_threads: options.client_threads,
            publish_addr: None,
            server_pid: server.pid(),
        };
        let lowest = options.rates.first().copied().unwrap_or(1);
        let warmed = options.warmup.is_zero()
            || match run_fanout(&fanout(lowest, options.warmup)).await {
                Ok(_) => true,
                Err(error) => {
                    report.stopped = format!("failed warming up at {lowest}/s: {error:#}");
                    false
                }
            };
        let rates = if warmed { &options.rates[..] } else { &[] };
        climb(&mut report, rates, options.p99_bound, async |rate| {
            let run = run_fanout(&fanout(rate, options.duration)).await;
            if let Ok(run) = &run {
                on_run(contender, run);
            }
            run
        })
        .await;
        server.stop().await?;
        if options.connections > 0 && contender.transport() == Transport::Websocket {
            let server = start(options, contender).await?;
            let pid = server
                .pid()
                .ok_or_else(|| anyhow::anyhow!("{} exited", contender.name()))?;
            report.idle = Some(
                run_connections(&ConnectionsOptions {
                    http_addr: server.http_addr.clone(),
                    protocol: contender.protocol(),
                    server_pid: pid,
                    connections: options.connections,
                    concurrency: 200,
                    sources: 4,
                })
                .await?,
            );
            server.stop().await?;
        }
        contenders.push(report);
    }
    Ok(CompareReport {
        subscribers: options.subscribers,
        size: options.size,
        duration_seconds: options.duration.as_secs_f64(),
        p99_bound_ms: options.p99_bound.as_secs_f64() * 1000.0,
        client_threads: options.client_threads,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        contenders,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Percentiles;

    fn run(rate: u32, p99: f64, missed: u64) -> FanoutReport {
        FanoutReport {
            transport: Transport::Websocket,
            protocol: Protocol::Ws,
            subscribers: 1000,
            rate,
            size: 100,
            publications: u64::from(rate) * 5,
            deliveries: u64::from(rate) * 5000 - missed,
            deliveries_per_second: f64::from(rate) * 1000.0,
            after_publishing: 0,
            drain_ms: 1.0,
            server_cpu_seconds: Some(2.5),
            server_rss_bytes: Some(50 << 20),
            client_cpu_seconds: 4.0,
            latency_ms: Percentiles {
                p50: p99 / 3.0,
                p90: p99 / 2.0,
                p99,
                max: p99 * 2.0,
            },
            missed,
            duplicated: 0,
        }
    }

    #[test]
    fn a_run_is_sustained_only_within_the_bound_and_with_nothing_missed() {
        let bound = Duration::from_millis(20);
        assert_eq!(verdict(&run(100, 19.9, 0), bound), Ok(()));
        assert_eq!(
            verdict(&run(200, 20.5, 0), bound),
            Err("p99 20.5 ms over 20 ms at 200/s".to_owned())
        );
        assert_eq!(
            verdict(&run(300, 3.0, 7), bound),
            Err("7 missed and 0 repeated at 300/s".to_owned())
        );
    }

    #[tokio::test]
    async fn a_rate_fails_when_it_fails_twice_and_the_climb_stops_there() {
        let mut report = ContenderReport {
            contender: Contender::Ws,
            name: "Node ws",
            runs: Vec::new(),
            sustained: None,
            stopped: "the highest rate asked for".to_owned(),
            idle: None,
        };
        // p99 per run, in the order asked: 100 passes; 200 fails once then passes; 300 fails
        // twice; 400 is never run.
        let mut p99s = vec![5.0, 25.0, 12.0, 30.0, 31.0].into_iter();
        let mut asked = Vec::new();
        climb(
            &mut report,
            &[100, 200, 300, 400],
            Duration::from_millis(20),
            async |rate| {
                asked.push(rate);
                Ok(run(
                    rate,
                    p99s.next().expect("no more runs than planned"),
                    0,
                ))
            },
        )
        .await;
        assert_eq!(asked, [100, 200, 200, 300, 300]);
        assert_eq!(report.runs.len(), 5);
        assert_eq!(report.sustained.as_ref().map(|s| s.rate), Some(200));
        assert_eq!(report.stopped, "p99 31.0 ms over 20 ms at 300/s, twice");
        // A run that cannot happen at all ends the climb at once.
        let mut report = ContenderReport {
            runs: Vec::new(),
            sustained: None,
            ..report
        };
        climb(
            &mut report,
            &[100, 200],
            Duration::from_millis(20),
            async |_| anyhow::bail!("subscribers did not start within 60 s"),
        )
        .await;
        assert!(report.runs.is_empty() && report.sustained.is_none());
        assert_eq!(
            report.stopped,
            "failed at 100/s: subscribers did not start within 60 s"
        );
    }

    #[test]
    fn the_cost_of_a_sustained_rate_is_per_delivery_and_per_second() {
        // 500,000 deliveries over 5 s, with 2.5 server CPU seconds and 4 client CPU seconds.
        let sustained = Sustained::of(&run(100, 10.0, 0));
        assert_eq!(sustained.rate, 100);
        assert!((sustained.server_cpu_per_1000.expect("measured") - 0.005).abs() < 1e-12);
        assert!((sustained.client_cores - 0.8).abs() < 1e-12);
    }
}
