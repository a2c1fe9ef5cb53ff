//! The transport comparison: the same update stream delivered to N clients by short polling,
//! long polling, Server-Sent Events, WebSocket and raw TCP, with what each costs.
//!
//! For each transport a fresh channel is followed by every client; a publisher (the server API)
//! sends R updates a second, each stamped with its due time. Clients record publish-to-receipt
//! latency, count the bytes they receive and the HTTP requests they make, and track offsets to
//! find any update missed or seen twice. Server CPU comes from `/proc` of the server process.

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
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::fanout::Percentiles;
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
    /// Deliveries per second over the publishing time.
    pub deliveries_per_second: f64,
    /// Publish-to-receipt latency.
    pub latency_ms: Percentiles,
    /// The latency distribution: (percentile, milliseconds) pairs for charts.
    pub latency_distribution: Vec<(f64, f64)>,
    /// Server CPU seconds per 1,000 deliveries (when the server's pid is known).
    pub server_cpu_per_1000_deliveries: Option<f64>,
    /// Bytes received by clients per delivery (headers included for HTTP).
    pub bytes_per_delivery: f64,
    /// HTTP requests per delivery (0 for sockets, one per stream for SSE).
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
    started: Instant,
    bytes: AtomicU64,
    requests: AtomicU64,
    per_second: Vec<AtomicU64>,
}

impl Tally {
    fn new(seconds: usize) -> Self {
        Tally {
            started: Instant::now(),
            bytes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            per_second: (0..seconds).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn delivered(&self) {
        let second = self.started.elapsed().as_secs() as usize;
        if let Some(slot) = self.per_second.get(second) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One client's view.
#[derive(Debug)]
struct Follower {
    last: u64,
    received: u64,
    missed: u64,
    duplicated: u64,
    latency_us: Histogram<u64>,
}

impl Follower {
    fn new() -> anyhow::Result<Self> {
        Ok(Follower {
            last: 0,
            received: 0,
            missed: 0,
            duplicated: 0,
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 2)?,
        })
    }

    fn record(&mut self, offset: u64, sent_micros: u64, tally: &Tally) {
        self.received += 1;
        if offset <= self.last {
            self.duplicated += 1;
            return;
        }
        self.missed += offset - self.last - 1;
        self.last = offset;
        let latency = now_micros().saturating_sub(sent_micros).max(1);
        let _ = self.latency_us.record(latency.min(600_000_000));
        tally.delivered();
    }

    /// Records a `message` frame (JSON text).
    fn record_frame(&mut self, frame: &Value, tally: &Tally) {
        if let (Some(offset), Some(sent)) = (frame["offset"].as_u64(), frame["data"]["t"].as_u64())
        {
            self.record(offset, sent, tally);
        }
    }
}

fn response_bytes(response: &reqwest::Response) -> u64 {
    let headers: usize = response
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    // Status line and the blank line after the headers.
    (headers + 17 + 2) as u64
}

struct Run {
    channel: String,
    last: u64,
    stop: tokio::sync::watch::Receiver<bool>,
    tally: Arc<Tally>,
}

async fn follow_by_polling(
    http: reqwest::Client,
    base: String,
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
    let url = format!("{base}/api/channels/{channel}/poll");
    // First request: where the channel stands.
    let response = http.get(&url).send().await?;
    tally.requests.fetch_add(1, Ordering::Relaxed);
    tally
        .bytes
        .fetch_add(response_bytes(&response), Ordering::Relaxed);
    let body = response.bytes().await?;
    tally.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
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
        let response = tokio::select! {
            response = http.get(format!("{url}{query}")).send() => response?,
            _ = stop.changed() => break,
        };
        tally.requests.fetch_add(1, Ordering::Relaxed);
        tally
            .bytes
            .fetch_add(response_bytes(&response), Ordering::Relaxed);
        let body = response.bytes().await?;
        tally.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
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
    http: reqwest::Client,
    base: String,
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
    let response = http
        .get(format!("{base}/api/channels/{channel}/events"))
        .send()
        .await?;
    tally.requests.fetch_add(1, Ordering::Relaxed);
    tally
        .bytes
        .fetch_add(response_bytes(&response), Ordering::Relaxed);
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let mut ready = Some(ready);
    while follower.last < last {
        let chunk = tokio::select! {
            chunk = stream.next() => match chunk {
                Some(chunk) => chunk?,
                None => break,
            },
            _ = stop.changed() => break,
        };
        tally.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        buffer.push_str(std::str::from_utf8(&chunk)?);
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
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
    base: String,
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
    let url = format!("{}/ws", base.replacen("http://", "ws://", 1));
    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await?;
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
            // Two bytes of frame header for these sizes.
            tally
                .bytes
                .fetch_add(text.len() as u64 + 2, Ordering::Relaxed);
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
    let stream = TcpStream::connect(&addr).await?;
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
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
        tally.bytes.fetch_add(read as u64, Ordering::Relaxed);
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
    let base = format!("http://{}", options.http_addr);
    let channel = format!("bench:transports-{}-{}", method.name(), now_micros());
    let publications = (u128::from(options.rate) * options.duration.as_millis() / 1000) as u64;
    if publications == 0 {
        bail!("rate × duration is less than one update");
    }
    let drain = options.poll_interval * 2 + Duration::from_secs(2);
    let seconds = (options.duration + drain).as_secs() as usize + 2;
    let tally = Arc::new(Tally::new(seconds));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(options.clients.max(1))
        .build()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(options.clients.max(1));
    let mut followers = Vec::with_capacity(options.clients);
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
                base.clone(),
                run,
                None,
                options.poll_interval,
                ready,
            )),
            Method::LongPoll => tokio::spawn(follow_by_polling(
                http.clone(),
                base.clone(),
                run,
                Some(Duration::from_secs(30)),
                options.poll_interval,
                ready,
            )),
            Method::Sse => tokio::spawn(follow_by_sse(http.clone(), base.clone(), run, ready)),
            Method::Websocket => tokio::spawn(follow_by_websocket(base.clone(), run, ready)),
            Method::Tcp => tokio::spawn(follow_by_tcp(options.tcp_addr.clone(), run, ready)),
        });
    }
    drop(ready_tx);
    let what = format!("{} clients", method.name());
    crate::runs::wait_ready(&mut ready_rx, options.clients, &what).await?;

    let before = options.server_pid.map(ServerUsage::of).transpose()?;
    let requests_before = tally.requests.load(Ordering::Relaxed);
    let bytes_before = tally.bytes.load(Ordering::Relaxed);
    let publish_url = format!("{base}/api/channels/{channel}/publish");
    let padding = "x".repeat(options.size.saturating_sub(24));
    let interval = Duration::from_secs(1) / options.rate.max(1);
    let start = Instant::now();
    let start_micros = now_micros();
    let total_seconds = options.duration.as_secs().max(1);
    for i in 0..publications {
        let offset = interval * u32::try_from(i).unwrap_or(u32::MAX);
        tokio::time::sleep_until((start + offset).into()).await;
        let due = start_micros + offset.as_micros() as u64;
        http.post(&publish_url)
            .json(&json!({"t": due, "p": padding}))
            .send()
            .await?
            .error_for_status()?;
        progress(
            method,
            start.elapsed().as_secs().min(total_seconds),
            total_seconds,
        );
    }
    let publishing = start.elapsed();

    let all = crate::runs::collect_within(followers, drain, || {
        stop_tx.send(true).ok();
    })
    .await?;
    let after = options.server_pid.map(ServerUsage::of).transpose()?;

    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 2)?;
    let (mut deliveries, mut missed, mut duplicated) = (0, 0, 0);
    for follower in &all {
        histogram.add(&follower.latency_us)?;
        deliveries += follower.received - follower.duplicated;
        missed += follower.missed;
        duplicated += follower.duplicated;
    }
    let ms = |micros: u64| micros as f64 / 1000.0;
    let per_delivery = |total: u64| total as f64 / deliveries.max(1) as f64;
    let requests = tally.requests.load(Ordering::Relaxed) - requests_before;
    let bytes = tally.bytes.load(Ordering::Relaxed) - bytes_before;
    let mut distribution = BTreeMap::new();
    for percentile in [0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 100.0] {
        distribution.insert(
            (percentile * 10.0) as u64,
            (percentile, ms(histogram.value_at_percentile(percentile))),
        );
    }
    Ok(MethodReport {
        method,
        clients: options.clients,
        publications,
        deliveries,
        deliveries_per_second: deliveries as f64 / publishing.as_secs_f64().max(1e-9),
        latency_ms: Percentiles::of_micros(&histogram),
        latency_distribution: distribution.into_values().collect(),
        server_cpu_per_1000_deliveries: match (before, after) {
            (Some(b), Some(a)) => {
                Some((a.cpu_seconds - b.cpu_seconds) * 1000.0 / deliveries.max(1) as f64)
            }
            _ => None,
        },
        bytes_per_delivery: per_delivery(bytes),
        requests_per_delivery: per_delivery(requests),
        missed,
        duplicated,
        deliveries_per_second_series: tally
            .per_second
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect(),
    })
}
