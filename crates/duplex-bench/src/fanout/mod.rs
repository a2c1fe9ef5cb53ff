//! Fan-out: N subscribers follow one channel while a publisher sends R messages a second of S
//! bytes; reports deliveries per second and publish-to-receipt latency.
//!
//! The publisher is open-loop: publication `i` is due at `start + i / R` and carries that due
//! time, so a server that falls behind shows as latency instead of silently slowing the
//! publisher (no coordinated omission). It runs on a thread of its own and sleeps with the
//! operating system's timer, so a publication leaves within tens of microseconds of its due
//! time instead of tokio's 1 ms timer grain.
//!
//! The client must cost less than the server it measures, or it measures itself: WebSocket
//! subscribers speak the little of RFC 6455 they need ([`crate::lean_ws`]), read whatever the
//! socket holds in one call and look at each frame in place for the only two numbers they need
//! (offset and due time); they run on a runtime of their own (`client_threads` workers;
//! `duplex bench fanout --client-threads`, 2 by default).
//! [`Transport::Floor`] measures the same subscribers against no server at all: the kernel's
//! share of every figure.

mod floor;
mod subscribers;

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::lean_ws;
use floor::run_floor;
use subscribers::{SubscriberStats, now_micros, tcp_subscriber, ws_subscriber};

/// How subscribers connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// WebSocket at `/ws`.
    Websocket,
    /// Raw TCP in line mode.
    Tcp,
    /// No server: plain threads write each publication to loopback sockets with one `write`
    /// per socket, read by the same subscribers — what the kernel alone costs ([`run_floor`]).
    Floor,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct FanoutOptions {
    /// `127.0.0.1:PORT` of the server's HTTP port.
    pub http_addr: String,
    /// `127.0.0.1:PORT` of the server's raw TCP port.
    pub tcp_addr: String,
    /// How many subscribers.
    pub subscribers: usize,
    /// Publications per second.
    pub rate: u32,
    /// Payload size in bytes (approximate: the JSON data object is padded to it).
    pub size: usize,
    /// How long the publisher publishes.
    pub duration: Duration,
    /// Subscriber transport.
    pub transport: Transport,
    /// Threads the subscribers run on.
    pub client_threads: usize,
    /// `127.0.0.1:PORT` of the HTTP port the publisher uses, when it is another node of the
    /// same cluster (cross-node delivery); `None`: the subscribers' server.
    pub publish_addr: Option<String>,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    /// Subscriber transport.
    pub transport: Transport,
    /// Subscribers.
    pub subscribers: usize,
    /// Publications per second asked for.
    pub rate: u32,
    /// Payload bytes.
    pub size: usize,
    /// Publications sent.
    pub publications: u64,
    /// Messages received by all subscribers.
    pub deliveries: u64,
    /// Deliveries per second over the publishing time.
    pub deliveries_per_second: f64,
    /// Latency percentiles in milliseconds.
    pub latency_ms: Percentiles,
    /// Publications a subscriber never received (gaps and a missing tail).
    pub missed: u64,
    /// Publications a subscriber received twice or out of order.
    pub duplicated: u64,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    /// The percentiles of a histogram of microseconds.
    pub fn of_micros(histogram: &Histogram<u64>) -> Percentiles {
        let ms = |micros: u64| micros as f64 / 1000.0;
        Percentiles {
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
        }
    }
}

/// The publisher, on a thread of its own with a blocking socket: it sleeps to each due time with
/// the operating system's timer (tokio's has a 1 ms grain, which would add up to a millisecond
/// to every latency) and writes the frame. A second thread reads and drops the replies.
fn publish(
    addr: &str,
    channel: &str,
    publications: u64,
    rate: u32,
    size: usize,
) -> anyhow::Result<Published> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    stream.write_all(lean_ws::upgrade_request(addr, "/ws").as_bytes())?;
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    while lean_ws::upgrade_response(&head)?.is_none() {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("the publisher's connection closed during the upgrade");
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let mut replies = stream.try_clone()?;
    let drain =
        std::thread::spawn(move || while matches!(replies.read(&mut chunk), Ok(n) if n > 0) {});

    let padding = "x".repeat(size.saturating_sub(24));
    let mut text = String::with_capacity(size + 128);
    let mut frame = Vec::with_capacity(size + 256);
    let timing = Timing::new(rate);
    for i in 0..publications {
        timing.sleep_until_due(i);
        let due_micros = timing.start_micros + timing.due(i).as_micros() as u64;
        text.clear();
        use std::fmt::Write as _;
        let _ = write!(
            text,
            r#"{{"type":"publish","id":{i},"channel":"{channel}","data":{{"t":{due_micros},"p":"{padding}"}}}}"#
        );
        frame.clear();
        lean_ws::client_frame(&mut frame, lean_ws::OP_TEXT, text.as_bytes());
        // Sent at once: each publication leaves at its due time.
        stream.write_all(&frame)?;
    }
    Ok(Published {
        publishing: timing.start.elapsed(),
        stream,
        drain,
    })
}

/// A publisher done publishing; its connection stays open until [`Published::close`] so that
/// the server does not count a closing publisher against the tail of the run.
struct Published {
    /// From the first due time to the last write.
    publishing: Duration,
    stream: std::net::TcpStream,
    drain: std::thread::JoinHandle<()>,
}

impl Published {
    fn close(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let _ = self.drain.join();
    }
}

/// Runs one fan-out measurement.
///
/// The subscribers run on a runtime of their own (`client_threads` workers) and the publisher
/// on a thread of its own, so the publisher's timing does not depend on how busy the
/// subscribers are.
pub async fn run_fanout(options: &FanoutOptions) -> anyhow::Result<FanoutReport> {
    if options.transport == Transport::Floor {
        return run_floor(options).await;
    }
    let channel = format!("bench:fanout-{}", now_micros());
    let publications = publications_of(options)?;
    let runtime = subscribers_runtime(options.client_threads)?;
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(options.subscribers.max(1));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(0u64);
    let mut subscribers = Vec::with_capacity(options.subscribers);
    for _ in 0..options.subscribers {
        let ready = ready_tx.clone();
        let stop = stop_rx.clone();
        let channel = channel.clone();
        subscribers.push(match options.transport {
            Transport::Websocket => runtime.spawn(ws_subscriber(
                options.http_addr.clone(),
                channel,
                ready,
                publications,
                stop,
            )),
            // (The floor returned above; it reads as raw TCP does.)
            Transport::Tcp | Transport::Floor => runtime.spawn(tcp_subscriber(
                options.tcp_addr.clone(),
                channel,
                ready,
                publications,
                stop,
            )),
        });
    }
    drop(ready_tx);
    let driven = Driven::start(runtime)?;
    let measured = async {
        crate::runs::wait_ready(&mut ready_rx, options.subscribers, "subscribers").await?;
        // The publisher: open-loop, each publication stamped with its due time.
        let publish_addr = options
            .publish_addr
            .clone()
            .unwrap_or_else(|| options.http_addr.clone());
        let (rate, size) = (options.rate, options.size);
        let channel = channel.clone();
        let published = tokio::task::spawn_blocking(move || {
            publish(&publish_addr, &channel, publications, rate, size)
        })
        .await??;
        // Let the tail arrive, but not forever.
        let all = crate::runs::collect_within(subscribers, Duration::from_secs(5), || {
            stop_tx.send(1).ok();
        })
        .await;
        let publishing = published.publishing;
        tokio::task::spawn_blocking(move || published.close()).await?;
        anyhow::Ok((all?, publishing))
    }
    .await;
    driven.finish();
    let (all, publishing) = measured?;
    report_of(options, publications, publishing, &all)
}

/// How many publications a run sends.
fn publications_of(options: &FanoutOptions) -> anyhow::Result<u64> {
    let publications = (u128::from(options.rate) * options.duration.as_millis() / 1000) as u64;
    if publications == 0 {
        bail!("rate × duration is less than one publication");
    }
    Ok(publications)
}

/// The subscribers' runtime: `threads` workers of its own.
fn subscribers_runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("bench-subscriber")
        .enable_all()
        .build()
        .context("cannot start the subscribers' runtime")
}

/// A runtime driven by a thread of its own until [`Driven::finish`], which drops it (and any
/// task still on it).
struct Driven {
    done: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Driven {
    fn start(runtime: tokio::runtime::Runtime) -> anyhow::Result<Driven> {
        let (done, stop) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-subscribers".into())
            .spawn(move || {
                let _ = runtime.block_on(stop);
            })?;
        Ok(Driven { done, thread })
    }

    fn finish(self) {
        let _ = self.done.send(());
        let _ = self.thread.join();
    }
}

/// Sums what every subscriber recorded.
fn report_of(
    options: &FanoutOptions,
    publications: u64,
    publishing: Duration,
    all: &[SubscriberStats],
) -> anyhow::Result<FanoutReport> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 2)?;
    let (mut deliveries, mut missed, mut duplicated) = (0, 0, 0);
    for stats in all {
        histogram.add(&stats.latency_us)?;
        deliveries += stats.received;
        missed += stats.missed;
        duplicated += stats.duplicated;
    }
    Ok(FanoutReport {
        transport: options.transport,
        subscribers: options.subscribers,
        rate: options.rate,
        size: options.size,
        publications,
        deliveries,
        deliveries_per_second: deliveries as f64 / publishing.as_secs_f64().max(1e-9),
        latency_ms: Percentiles::of_micros(&histogram),
        missed,
        duplicated,
    })
}

/// When publication `i` is due: `start + i × interval`.
struct Timing {
    start: Instant,
    start_micros: u64,
    interval: Duration,
}

impl Timing {
    /// Publication 0 is due now.
    fn new(rate: u32) -> Timing {
        Timing {
            start: Instant::now(),
            start_micros: now_micros(),
            interval: Duration::from_secs(1) / rate.max(1),
        }
    }

    /// How long after the start publication `i` is due.
    fn due(&self, i: u64) -> Duration {
        self.interval * u32::try_from(i).unwrap_or(u32::MAX)
    }

    /// Sleeps (on the OS timer) until publication `i` is due.
    fn sleep_until_due(&self, i: u64) {
        let wait = (self.start + self.due(i)).saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}
