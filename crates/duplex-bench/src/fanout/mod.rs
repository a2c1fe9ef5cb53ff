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
pub(crate) mod subscribers;

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::lean_ws;
use crate::peers::Protocol;
use floor::run_floor;
use subscribers::{DueTimes, SubscriberStats, now_micros, tcp_subscriber, ws_subscriber};

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
    /// The server measured: duplex, or a peer server speaking its own protocol over
    /// WebSocket (with [`Transport::Websocket`] only).
    pub protocol: Protocol,
    /// Threads the subscribers run on.
    pub client_threads: usize,
    /// `127.0.0.1:PORT` of the HTTP port the publisher uses, when it is another node of the
    /// same cluster (cross-node delivery); `None`: the subscribers' server.
    pub publish_addr: Option<String>,
    /// The server's process id, to measure its CPU from the first publication to the last
    /// delivery (connecting the subscribers left out); `None`: not measured.
    pub server_pid: Option<u32>,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    /// Subscriber transport.
    pub transport: Transport,
    /// The server measured.
    pub protocol: Protocol,
    /// Subscribers.
    pub subscribers: usize,
    /// Publications per second asked for.
    pub rate: u32,
    /// Payload bytes.
    pub size: usize,
    /// Publications sent.
    pub publications: u64,
    /// Publications received by all subscribers, each counted once and only in order.
    pub deliveries: u64,
    /// `deliveries` over the time from the first publication's due time to the last delivery,
    /// so a server that falls behind shows a lower figure than the rate offered.
    pub deliveries_per_second: f64,
    /// Of `deliveries`, those that arrived after the last publication was due: a server that
    /// keeps up has only the last few here.
    pub after_publishing: u64,
    /// From the last publication's due time to the last delivery, in milliseconds.
    pub drain_ms: f64,
    /// Server CPU seconds from the first publication to the end of the run (`None`: no pid).
    pub server_cpu_seconds: Option<f64>,
    /// Server resident memory at the end of the run, in bytes (`None`: no pid).
    pub server_rss_bytes: Option<u64>,
    /// The load client's own CPU seconds (subscribers and publisher) over the same time: a
    /// client near its threads' worth of cores would be measuring itself.
    pub client_cpu_seconds: f64,
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
/// to every latency) and writes the frame. A second thread reads the replies, answers a peer's
/// pings and keeps the errors among the replies, so that a run the server refused fails at
/// [`Published::close`].
pub(crate) fn publish(
    addr: &str,
    protocol: Protocol,
    channel: &str,
    publications: u64,
    rate: u32,
    size: usize,
    due: &DueTimes,
) -> anyhow::Result<Published> {
    use std::io::Write as _;
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    stream.write_all(lean_ws::upgrade_request(addr, protocol.path()).as_bytes())?;
    let mut unread = Vec::new();
    let head = loop {
        if let Some(head) = lean_ws::upgrade_response(&unread)? {
            break head;
        }
        if !read_more(&mut stream, &mut unread)? {
            bail!("the publisher's connection closed during the upgrade");
        }
    };
    unread.drain(..head);
    if protocol == Protocol::SocketIo {
        // The Engine.IO open packet, then the main namespace.
        text_where(&mut stream, &mut unread, |text| text.starts_with(b"0"))?;
        let mut frame = Vec::new();
        lean_ws::client_frame(&mut frame, lean_ws::OP_TEXT, b"40");
        stream.write_all(&frame)?;
        let connect = text_where(&mut stream, &mut unread, |text| text.starts_with(b"4"))?;
        if !connect.starts_with(b"40") {
            bail!(
                "Socket.IO refused the publisher: {}",
                String::from_utf8_lossy(&connect)
            );
        }
    }
    let writer = std::sync::Arc::new(std::sync::Mutex::new(stream.try_clone()?));
    let replies = Replies {
        stream: stream.try_clone()?,
        unread,
        writer: writer.clone(),
        protocol,
    };
    let drain = std::thread::spawn(move || replies.read());

    let padding = "x".repeat(size.saturating_sub(24));
    let mut text = String::with_capacity(size + 128);
    let mut frame = Vec::with_capacity(size + 256);
    let timing = Timing::new(rate);
    let window = timing.window(publications);
    due.set(window.first_due_micros, window.last_due_micros);
    for i in 0..publications {
        timing.sleep_until_due(i);
        let due_micros = timing.start_micros + timing.due(i).as_micros() as u64;
        text.clear();
        protocol.publication(&mut text, channel, i + 1, due_micros, &padding);
        frame.clear();
        lean_ws::client_frame(&mut frame, lean_ws::OP_TEXT, text.as_bytes());
        // Sent at once: each publication leaves at its due time.
        writer
            .lock()
            .map_err(|_| anyhow::anyhow!("the publisher's reader panicked"))?
            .write_all(&frame)?;
    }
    Ok(Published {
        window,
        stream,
        drain,
    })
}

/// Reads once more from `stream` onto `unread`; false at end of stream.
fn read_more(stream: &mut std::net::TcpStream, unread: &mut Vec<u8>) -> anyhow::Result<bool> {
    use std::io::Read as _;
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk)?;
    unread.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

/// Reads frames (blocking) until a text frame that `wanted` accepts, which it returns.
fn text_where(
    stream: &mut std::net::TcpStream,
    unread: &mut Vec<u8>,
    wanted: impl Fn(&[u8]) -> bool,
) -> anyhow::Result<Vec<u8>> {
    loop {
        while let Some(frame) = lean_ws::server_frame(unread)? {
            let text = unread[frame.payload.clone()].to_vec();
            unread.drain(..frame.payload.end);
            if frame.opcode == lean_ws::OP_TEXT && wanted(&text) {
                return Ok(text);
            }
        }
        if !read_more(stream, unread)? {
            bail!("the publisher's connection closed during the handshake");
        }
    }
}

/// A publisher done publishing; its connection stays open until [`Published::close`] so that
/// the server does not count a closing publisher against the tail of the run.
pub(crate) struct Published {
    pub(crate) window: Window,
    stream: std::net::TcpStream,
    drain: std::thread::JoinHandle<Refusals>,
}

impl Published {
    /// Closes the publisher's connection; an error if the server refused any publication.
    pub(crate) fn close(self) -> anyhow::Result<()> {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let refusals = self
            .drain
            .join()
            .map_err(|_| anyhow::anyhow!("the publisher's reader panicked"))?;
        match refusals.first {
            Some(first) => bail!(
                "the server refused {} publications, the first with {first}",
                refusals.count
            ),
            None => Ok(()),
        }
    }
}

/// The error replies to a publisher.
#[derive(Debug, Default)]
struct Refusals {
    count: u64,
    first: Option<String>,
}

/// The publisher's incoming side: what the upgrade left unread, and the writer to answer a
/// Socket.IO ping with.
struct Replies {
    stream: std::net::TcpStream,
    unread: Vec<u8>,
    writer: std::sync::Arc<std::sync::Mutex<std::net::TcpStream>>,
    protocol: Protocol,
}

impl Replies {
    /// Reads until the connection ends, keeping the errors among the replies.
    fn read(mut self) -> Refusals {
        use std::io::Write as _;
        let mut refusals = Refusals::default();
        let mut pong = Vec::new();
        lean_ws::client_frame(&mut pong, lean_ws::OP_TEXT, b"3");
        loop {
            let mut at = 0;
            while let Ok(Some(frame)) = lean_ws::server_frame(&self.unread[at..]) {
                let payload = &self.unread[at + frame.payload.start..at + frame.payload.end];
                if frame.opcode == lean_ws::OP_TEXT && self.protocol.is_ping(payload) {
                    if let Ok(mut writer) = self.writer.lock() {
                        let _ = writer.write_all(&pong);
                    }
                } else if frame.opcode == lean_ws::OP_TEXT
                    && payload.starts_with(br#"{"type":"error""#)
                {
                    refusals.count += 1;
                    if refusals.first.is_none() {
                        refusals.first = Some(String::from_utf8_lossy(payload).into_owned());
                    }
                }
                at += frame.payload.end;
            }
            self.unread.drain(..at);
            if !matches!(read_more(&mut self.stream, &mut self.unread), Ok(true)) {
                return refusals;
            }
        }
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
    if options.protocol != Protocol::Duplex && options.transport != Transport::Websocket {
        bail!(
            "{} is measured over WebSocket only",
            options.protocol.name()
        );
    }
    let channel = format!("bench:fanout-{}", now_micros());
    let publications = publications_of(options)?;
    let runtime = subscribers_runtime(options.client_threads)?;
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(options.subscribers.max(1));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(0u64);
    let due = DueTimes::default();
    let mut subscribers = Vec::with_capacity(options.subscribers);
    for _ in 0..options.subscribers {
        let ready = ready_tx.clone();
        let stop = stop_rx.clone();
        let channel = channel.clone();
        let due = due.clone();
        subscribers.push(match options.transport {
            Transport::Websocket => runtime.spawn(ws_subscriber(
                options.http_addr.clone(),
                options.protocol,
                channel,
                ready,
                publications,
                stop,
                due,
            )),
            // (The floor returned above; it reads as raw TCP does.)
            Transport::Tcp | Transport::Floor => runtime.spawn(tcp_subscriber(
                options.tcp_addr.clone(),
                channel,
                ready,
                publications,
                stop,
                due,
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
        let (rate, size, protocol) = (options.rate, options.size, options.protocol);
        let channel = channel.clone();
        let cpu_before = cpu_seconds(options.server_pid)?;
        let client_cpu_before = crate::ServerUsage::of(std::process::id())?.cpu_seconds;
        let published = tokio::task::spawn_blocking(move || {
            publish(
                &publish_addr,
                protocol,
                &channel,
                publications,
                rate,
                size,
                &due,
            )
        })
        .await??;
        // Let the tail arrive, but not forever.
        let all = crate::runs::collect_within(subscribers, Duration::from_secs(5), || {
            stop_tx.send(1).ok();
        })
        .await;
        let cpu = cpu_seconds(options.server_pid)?
            .zip(cpu_before)
            .map(|(a, b)| a - b);
        let client_cpu =
            crate::ServerUsage::of(std::process::id())?.cpu_seconds - client_cpu_before;
        let rss = options
            .server_pid
            .map(|pid| crate::ServerUsage::of(pid).map(|usage| usage.rss_bytes))
            .transpose()?;
        let window = published.window;
        tokio::task::spawn_blocking(move || published.close()).await??;
        anyhow::Ok((all?, window, cpu, client_cpu, rss))
    }
    .await;
    driven.finish();
    let (all, window, cpu, client_cpu, rss) = measured?;
    let mut report = report_of(options, publications, window, &all)?;
    report.server_cpu_seconds = cpu;
    report.client_cpu_seconds = client_cpu;
    report.server_rss_bytes = rss;
    Ok(report)
}

/// The CPU seconds process `pid` used so far.
fn cpu_seconds(pid: Option<u32>) -> anyhow::Result<Option<f64>> {
    pid.map(|pid| crate::ServerUsage::of(pid).map(|usage| usage.cpu_seconds))
        .transpose()
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
    window: Window,
    all: &[SubscriberStats],
) -> anyhow::Result<FanoutReport> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 2)?;
    let (mut deliveries, mut missed, mut duplicated, mut after_publishing) = (0, 0, 0, 0);
    let mut last_at_micros = 0;
    for stats in all {
        histogram.add(&stats.latency_us)?;
        deliveries += stats.received;
        missed += stats.missed;
        duplicated += stats.duplicated;
        after_publishing += stats.after_publishing;
        last_at_micros = last_at_micros.max(stats.last_at_micros);
    }
    let span = window.span_to(last_at_micros);
    Ok(FanoutReport {
        transport: options.transport,
        protocol: options.protocol,
        subscribers: options.subscribers,
        rate: options.rate,
        size: options.size,
        publications,
        deliveries,
        deliveries_per_second: deliveries as f64 / span.as_secs_f64(),
        after_publishing,
        drain_ms: last_at_micros.saturating_sub(window.last_due_micros) as f64 / 1000.0,
        server_cpu_seconds: None,
        server_rss_bytes: None,
        client_cpu_seconds: 0.0,
        latency_ms: Percentiles::of_micros(&histogram),
        missed,
        duplicated,
    })
}

/// When a run's first and last publications were due (wall-clock microseconds).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub(crate) first_due_micros: u64,
    pub(crate) last_due_micros: u64,
    /// One interval after the last due time: `publications` at `rate` take this long.
    pub(crate) end_micros: u64,
}

impl Window {
    /// From the first due time to the last delivery, never shorter than the publishing window
    /// itself (so a server that keeps up shows the rate offered, one that falls behind less).
    pub(crate) fn span_to(&self, last_delivery_micros: u64) -> Duration {
        Duration::from_micros(
            last_delivery_micros
                .max(self.end_micros)
                .saturating_sub(self.first_due_micros)
                .max(1),
        )
    }
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

    /// When the first and the last of `publications` are due.
    fn window(&self, publications: u64) -> Window {
        Window {
            first_due_micros: self.start_micros,
            last_due_micros: self.start_micros
                + self.due(publications.saturating_sub(1)).as_micros() as u64,
            end_micros: self.start_micros + self.due(publications).as_micros() as u64,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> FanoutOptions {
        FanoutOptions {
            http_addr: String::new(),
            tcp_addr: String::new(),
            subscribers: 2,
            rate: 1000,
            size: 100,
            duration: Duration::from_secs(1),
            transport: Transport::Websocket,
            protocol: Protocol::Duplex,
            client_threads: 1,
            publish_addr: None,
            server_pid: None,
        }
    }

    /// A subscriber that received publications 1..=n, the last at `last_at` (microseconds).
    fn received(n: u64, last_at: u64, after_publishing: u64) -> SubscriberStats {
        let mut stats = SubscriberStats::new(DueTimes::default()).expect("histogram");
        stats.received = n;
        stats.last_offset = n;
        stats.last_at_micros = last_at;
        stats.after_publishing = after_publishing;
        stats
    }

    #[test]
    fn a_server_that_falls_behind_shows_a_lower_rate_than_offered() {
        // 1,000 publications due over one second, to two subscribers.
        let window = Window {
            first_due_micros: 10_000_000,
            last_due_micros: 10_999_000,
            end_micros: 11_000_000,
        };
        // Kept up: the last delivery 1 ms after the last due time (the end of the window).
        let kept_up = [received(1000, 11_000_000, 2), received(1000, 10_999_500, 1)];
        let report = report_of(&options(), 1000, window, &kept_up).expect("report");
        assert_eq!(report.deliveries, 2000);
        assert!((report.deliveries_per_second - 2000.0).abs() < 1.0);
        assert_eq!(report.after_publishing, 3);
        assert!((report.drain_ms - 1.0).abs() < 1e-9);
        // Fell behind: everything arrived, but over three seconds, not one. The publishing
        // time alone (one second) would have said 2,000/s.
        let behind = [
            received(1000, 13_000_000, 700),
            received(1000, 12_000_000, 500),
        ];
        let report = report_of(&options(), 1000, window, &behind).expect("report");
        assert!((report.deliveries_per_second - 666.67).abs() < 0.1);
        assert_eq!(report.after_publishing, 1200);
        assert!((report.drain_ms - 2001.0).abs() < 1e-9);
        assert_eq!(report.missed, 0);
    }
}
