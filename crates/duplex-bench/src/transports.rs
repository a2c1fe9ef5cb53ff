//! The transport comparison: the same update stream delivered to N clients by short polling,
//! long polling, Server-Sent Events, WebSocket and raw TCP, with what each costs.
//!
//! For each transport a fresh channel is followed by every client; the fan-out's open-loop
//! publisher (a WebSocket client in the `bench` namespace) sends R updates a second, each
//! stamped with its due time. Clients record publish-to-receipt latency, count every byte they
//! read from their sockets ([`crate::counted`]) and the HTTP requests they make, and track
//! offsets to find any update missed or seen twice. Server CPU comes from `/proc` of the server
//! process.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio_tungstenite::tungstenite::Message;

use crate::counted::{self, HttpConnection};
use crate::fanout::Percentiles;
use crate::fanout::subscribers::DueTimes;
use crate::server::ServerUsage;

/// One way of following a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// `GET …/poll?since=` every poll interval.
    ShortPoll,
    /// `GET …/poll?since=&wait=30s` again as soon as it answers.
    LongPoll,
    /// `GET …/events`.
    Sse,
    /// `/ws`.
    Websocket,
    /// Raw TCP, line mode.
    Tcp,
}

impl Method {
    /// Every method, in the order reports list them.
    pub const ALL: [Method; 5] = [
        Method::ShortPoll,
        Method::LongPoll,
        Method::Sse,
        Method::Websocket,
        Method::Tcp,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Method::ShortPoll => "short_poll",
            Method::LongPoll => "long_poll",
            Method::Sse => "sse",
            Method::Websocket => "websocket",
            Method::Tcp => "tcp",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct TransportsOptions {
    /// `127.0.0.1:PORT` of HTTP.
    pub http_addr: String,
    /// `127.0.0.1:PORT` of raw TCP.
    pub tcp_addr: String,
    /// The server's process id, for its CPU time (none: not reported).
    pub server_pid: Option<u32>,
    /// Clients per method.
    pub clients: usize,
    /// Updates per second.
    pub rate: u32,
    /// Payload bytes.
    pub size: usize,
    /// Publishing time per method.
    pub duration: Duration,
    /// Short polling interval.
    pub poll_interval: Duration,
    /// Which methods.
    pub methods: Vec<Method>,
}

/// What one method cost.
#[derive(Debug, Clone, Serialize)]
pub struct MethodReport {
    /// The method.
    pub method: Method,
    /// Clients.
    pub clients: usize,
    /// Updates published.
    pub publications: u64,
    /// Updates received by all clients.
    pub deliveries: u64,
    /// Updates received in order over the time from the first update's due time to the last
    /// delivery, so a server that falls behind shows less than it was offered.
    pub deliveries_per_second: f64,
    /// From the last update's due time to the last delivery, in milliseconds.
    pub drain_ms: f64,
    /// Publish-to-receipt latency.
    pub latency_ms: Percentiles,
    /// The latency distribution: (percentile, milliseconds) pairs for charts.
    pub latency_distribution: Vec<(f64, f64)>,
    /// Server CPU seconds per 1,000 deliveries, from the first update to the end of the drain
    /// (when the server's pid is known).
    pub server_cpu_per_1000_deliveries: Option<f64>,
    /// Bytes the clients read from their sockets per delivery: everything from connecting on
    /// (HTTP heads, chunk sizes, WebSocket frame headers, pings, the subscription's reply).
    pub bytes_per_delivery: f64,
    /// HTTP requests per delivery, the first poll and the event stream's request included (0
    /// for sockets).
    pub requests_per_delivery: f64,
    /// Updates a client never received.
    pub missed: u64,
    /// Updates a client received twice.
    pub duplicated: u64,
    /// Deliveries in each second of the run, for charts.
    pub deliveries_per_second_series: Vec<u64>,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct TransportsReport {
    /// Updates per second.
    pub rate: u32,
    /// Payload bytes.
    pub size: usize,
    /// Publishing seconds per method.
    pub duration_seconds: f64,
    /// Short polling interval in seconds.
    pub poll_interval_seconds: f64,
    /// One entry per method.
    pub methods: Vec<MethodReport>,
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Shared counters of one method's run.
#[derive(Debug)]
struct Tally {
    /// Bytes the clients read from their sockets, connection setup included.
    bytes: Arc<AtomicU64>,
    /// HTTP requests the clients made, the first poll and the event stream's included.
    requests: AtomicU64,
    /// When the first and last updates are due, once publishing started.
    due: DueTimes,
    per_second: Vec<AtomicU64>,
}

impl Tally {
    fn new(seconds: usize) -> Self {
        Tally {
            bytes: Arc::new(AtomicU64::new(0)),
            requests: AtomicU64::new(0),
            due: DueTimes::default(),
            per_second: (0..seconds).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Counts a delivery in the second (from the first due time) it arrived in.
    fn delivered(&self, at_micros: u64) {
        let first = self.due.first();
        let second = (at_micros.saturating_sub(first) / 1_000_000) as usize;
        if let Some(slot) = self.per_second.get(second) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn requested(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
}

/// One client's view.
#[derive(Debug)]
struct Follower {
    last: u64,
    /// Updates received in order, each once.
    received: u64,
    missed: u64,
    /// Updates received again, or after a later one.
    duplicated: u64,
    /// When the latest of `received` arrived (wall-clock microseconds).
    last_at_micros: u64,
    latency_us: Histogram<u64>,
}

impl Follower {
    fn new() -> anyhow::Result<Self> {
        Ok(Follower {
            last: 0,
            received: 0,
            missed: 0,
            duplicated: 0,
            last_at_micros: 0,
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 2)?,
        })
    }

    fn record(&mut self, offset: u64, sent_micros: u64, tally: &Tally) {
        if offset <= self.last {
            self.duplicated += 1;
            return;
        }
        self.received += 1;
        self.missed += offset - self.last - 1;
        self.last = offset;
        let now = now_micros();
        self.last_at_micros = now;
        let latency = now.saturating_sub(sent_micros).max(1);
        let _ = self.latency_us.record(latency.min(600_000_000));
        tally.delivered(now);
    }

    /// Records a `message` frame (JSON text).
    fn record_frame(&mut self, frame: &Value, tally: &Tally) {
        if let (Some(offset), Some(sent)) = (frame["offset"].as_u64(), frame["data"]["t"].as_u64())
        {
            self.record(offset, sent, tally);
        }
    }
}

struct Run {
    channel: String,
    last: u64,
    stop: tokio::sync::watch::Receiver<bool>,
    tally: Arc<Tally>,
}

async fn follow_by_polling(
    addr: String,
    run: Run,
    wait: Option<Duration>,
    interval: Duration,
    ready: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<Follower> {
    let Run {
        channel,
        last,
        mut stop,
        tally,
    } = run;
    let mut follower = Follower::new()?;
    let mut connection = HttpConnection::open(&addr, tally.bytes.clone()).await?;
    let path = format!("/api/channels/{channel}/poll");
    // First request: where the channel stands.
    let body = connection.get_body(&path).await?;
    tally.requested();
    let position: Value = serde_json::from_slice(&body)?;
    let mut epoch = position["epoch"].as_str().unwrap_or_default().to_owned();
    let mut next = position["next"].as_u64().unwrap_or(0);
    ready.send(()).await.ok();
    drop(ready);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while follower.last < last {
        let query = match wait {
            Some(wait) => format!("?since={next}&epoch={epoch}&wait={}ms", wait.as_millis()),
            None => {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stop.changed() => break,
                }
                format!("?since={next}&epoch={epoch}")
            }
        };
        let url = format!("{path}{query}");
        let body = tokio::select! {
            body = connection.get_body(&url) => body?,
            _ = stop.changed() => break,
        };
        tally.requested();
        let page: Value = serde_json::from_slice(&body)?;
        if page["recovered"] == false {
            bail!("a poll was not recovered: {page}");
        }
        for publication in page["publications"].as_array().into_iter().flatten() {
            follower.record_frame(publication, &tally);
        }
        next = page["next"].as_u64().unwrap_or(next);
        // Offsets belong to an epoch: keep the one the answer is in.
        if let Some(current) = page["epoch"].as_str() {
            current.clone_into(&mut epoch);
        }
    }
    follower.missed += last.saturating_sub(follower.last);
    Ok(follower)
}

async fn follow_by_sse(
    addr: String,
    run: Run,
    ready: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<Follower> {
    use http_body_util::BodyExt as _;
    let Run {
        channel,
        last,
        mut stop,
        tally,
    } = run;
    let mut follower = Follower::new()?;
    let mut connection = HttpConnection::open(&addr, tally.bytes.clone()).await?;
    let response = connection
        .get(&format!("/api/channels/{channel}/events"))
        .await?;
    tally.requested();
    let mut body = response.into_body();
    let mut buffer: Vec<u8> = Vec::new();
    let mut ready = Some(ready);
    while follower.last < last {
        let frame = tokio::select! {
            frame = body.frame() => match frame {
                Some(frame) => frame?,
                None => break,
            },
            _ = stop.changed() => break,
        };
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buffer.drain(..end + 2).collect();
            let block = std::str::from_utf8(&block)?;
            if block.starts_with("event: subscribed") {
                if let Some(ready) = ready.take() {
                    ready.send(()).await.ok();
                }
                continue;
            }
            for line in block.lines() {
                if let Some(data) = line.strip_prefix("data: ")
                    && let Ok(frame) = serde_json::from_str::<Value>(data)
                {
                    follower.record_frame(&frame, &tally);
                }
            }
        }
    }
    follower.missed += last.saturating_sub(follower.last);
    Ok(follower)
}

async fn follow_by_websocket(
    addr: String,
    run: Run,
    ready: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<Follower> {
    let Run {
        channel,
        last,
        mut stop,
        tally,
    } = run;
    let mut follower = Follower::new()?;
    let stream = counted::connect(&addr, tally.bytes.clone()).await?;
    let (mut socket, _) =
        tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream).await?;
    let subscribe = json!({"type": "subscribe", "id": 1, "channel": channel});
    socket.send(Message::text(subscribe.to_string())).await?;
    let mut ready = Some(ready);
    while follower.last < last {
        let message = tokio::select! {
            message = socket.next() => match message {
                Some(message) => message?,
                None => break,
            },
            _ = stop.changed() => break,
        };
        if let Message::Text(text) = message {
            let frame: Value = serde_json::from_str(&text)?;
            match frame["type"].as_str() {
                Some("message") => follower.record_frame(&frame, &tally),
                Some("reply") => {
                    if let Some(ready) = ready.take() {
                        ready.send(()).await.ok();
                    }
                }
                _ => {}
            }
        }
    }
    follower.missed += last.saturating_sub(follower.last);
    Ok(follower)
}

async fn follow_by_tcp(
    addr: String,
    run: Run,
    ready: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<Follower> {
    let Run {
        channel,
        last,
        mut stop,
        tally,
    } = run;
    let mut follower = Follower::new()?;
    let stream = counted::connect(&addr, tally.bytes.clone()).await?;
    let (read, mut write) = tokio::io::split(stream);
    let mut lines = BufReader::new(read);
    let subscribe = format!("{{\"type\":\"subscribe\",\"id\":1,\"channel\":\"{channel}\"}}\n");
    write.write_all(subscribe.as_bytes()).await?;
    let mut ready = Some(ready);
    let mut line = String::new();
    while follower.last < last {
        line.clear();
        let read = tokio::select! {
            read = lines.read_line(&mut line) => read?,
            _ = stop.changed() => break,
        };
        if read == 0 {
            break;
        }
        let frame: Value = serde_json::from_str(&line)?;
        match frame["type"].as_str() {
            Some("message") => follower.record_frame(&frame, &tally),
            Some("reply") => {
                if let Some(ready) = ready.take() {
                    ready.send(()).await.ok();
                }
            }
            _ => {}
        }
    }
    follower.missed += last.saturating_sub(follower.last);
    Ok(follower)
}

/// Runs the comparison, calling `progress` with (method, seconds done, seconds total).
pub async fn run_transports(
    options: &TransportsOptions,
    progress: &(dyn Fn(Method, u64, u64) + Sync),
) -> anyhow::Result<TransportsReport> {
    let mut methods = Vec::new();
    for method in &options.methods {
        methods.push(run_method(options, *method, progress).await?);
    }
    Ok(TransportsReport {
        rate: options.rate,
        size: options.size,
        duration_seconds: options.duration.as_secs_f64(),
        poll_interval_seconds: options.poll_interval.as_secs_f64(),
        methods,
    })
}

async fn run_method(
    options: &TransportsOptions,
    method: Method,
    progress: &(dyn Fn(Method, u64, u64) + Sync),
) -> anyhow::Result<MethodReport> {
    let channel = format!("bench:transports-{}-{}", method.name(), now_micros());
    let publications = (u128::from(options.rate) * options.duration.as_millis() / 1000) as u64;
    if publications == 0 {
        bail!("rate × duration is less than one update");
    }
    let drain = options.poll_interval * 2 + Duration::from_secs(2);
    let seconds = (options.duration + drain).as_secs() as usize + 2;
    let tally = Arc::new(Tally::new(seconds));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(options.clients.max(1));
    let mut followers = Vec::with_capacity(options.clients);
    let http = options.http_addr.clone();
    for _ in 0..options.clients {
        let run = Run {
            channel: channel.clone(),
            last: publications,
            stop: stop_rx.clone(),
            tally: tally.clone(),
        };
        let ready = ready_tx.clone();
        followers.push(match method {
            Method::ShortPoll => tokio::spawn(follow_by_polling(
                http.clone(),
                run,
                None,
                options.poll_interval,
                ready,
            )),
            Method::LongPoll => tokio::spawn(follow_by_polling(
                http.clone(),
                run,
                Some(Duration::from_secs(30)),
                options.poll_interval,
                ready,
            )),
            Method::Sse => tokio::spawn(follow_by_sse(http.clone(), run, ready)),
            Method::Websocket => tokio::spawn(follow_by_websocket(http.clone(), run, ready)),
            Method::Tcp => tokio::spawn(follow_by_tcp(options.tcp_addr.clone(), run, ready)),
        });
    }
    drop(ready_tx);
    let what = format!("{} clients", method.name());
    crate::runs::wait_ready(&mut ready_rx, options.clients, &what).await?;

    let before = options.server_pid.map(ServerUsage::of).transpose()?;
    // Open-loop, as the fan-out publisher: each update leaves at its due time over a socket of
    // its own, whether or not the server answered the one before.
    let (rate, size) = (options.rate, options.size);
    let publish_channel = channel.clone();
    let publish_tally = tally.clone();
    let mut publisher = tokio::task::spawn_blocking(move || {
        crate::fanout::publish(
            &http,
            crate::Protocol::Duplex,
            &publish_channel,
            publications,
            rate,
            size,
            &publish_tally.due,
        )
    });
    let total_seconds = options.duration.as_secs().max(1);
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let published = loop {
        tokio::select! {
            published = &mut publisher => break published??,
            _ = ticker.tick() => progress(
                method,
                started.elapsed().as_secs().min(total_seconds),
                total_seconds,
            ),
        }
    };
    progress(method, total_seconds, total_seconds);
    let window = published.window;

    let all = crate::runs::collect_within(followers, drain, || {
        stop_tx.send(true).ok();
    })
    .await;
    let after = options.server_pid.map(ServerUsage::of).transpose()?;
    tokio::task::spawn_blocking(move || published.close()).await??;
    let all = all?;

    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 2)?;
    let (mut deliveries, mut missed, mut duplicated, mut last_at_micros) = (0, 0, 0, 0);
    for follower in &all {
        histogram.add(&follower.latency_us)?;
        deliveries += follower.received;
        missed += follower.missed;
        duplicated += follower.duplicated;
        last_at_micros = last_at_micros.max(follower.last_at_micros);
    }
    let ms = |micros: u64| micros as f64 / 1000.0;
    let per_delivery = |total: u64| total as f64 / deliveries.max(1) as f64;
    let mut distribution = BTreeMap::new();
    for percentile in [0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 100.0] {
        distribution.insert(
            (percentile * 10.0) as u64,
            (percentile, ms(histogram.value_at_percentile(percentile))),
        );
    }
    let span = window.span_to(last_at_micros);
    Ok(MethodReport {
        method,
        clients: options.clients,
        publications,
        deliveries,
        deliveries_per_second: deliveries as f64 / span.as_secs_f64(),
        drain_ms: ms(last_at_micros.saturating_sub(window.last_due_micros)),
        latency_ms: Percentiles::of_micros(&histogram),
        latency_distribution: distribution.into_values().collect(),
        server_cpu_per_1000_deliveries: match (before, after) {
            (Some(b), Some(a)) => {
                Some((a.cpu_seconds - b.cpu_seconds) * 1000.0 / deliveries.max(1) as f64)
            }
            _ => None,
        },
        bytes_per_delivery: per_delivery(tally.bytes.load(Ordering::Relaxed)),
        requests_per_delivery: per_delivery(tally.requests.load(Ordering::Relaxed)),
        missed,
        duplicated,
        deliveries_per_second_series: tally
            .per_second
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect(),
    })
}
