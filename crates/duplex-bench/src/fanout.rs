//! Fan-out: N subscribers follow one channel while a publisher sends R messages a second of S
//! bytes; reports deliveries per second and publish-to-receipt latency.
//!
//! The publisher is open-loop: publication `i` is due at `start + i / R` and carries that due
//! time, so a server that falls behind shows as latency instead of silently slowing the
//! publisher (no coordinated omission). Subscribers parse only the two numbers they need.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// How subscribers connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// WebSocket at `/ws`.
    Websocket,
    /// Raw TCP in line mode.
    Tcp,
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

#[derive(Debug)]
struct SubscriberStats {
    received: u64,
    missed: u64,
    duplicated: u64,
    last_offset: u64,
    latency_us: Histogram<u64>,
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The unsigned integer after `key` in `text`.
fn number_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let start = text.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = text[start..].iter().take_while(|b| b.is_ascii_digit());
    let mut value: u64 = 0;
    let mut any = false;
    for digit in digits {
        value = value
            .checked_mul(10)?
            .checked_add(u64::from(digit - b'0'))?;
        any = true;
    }
    any.then_some(value)
}

impl SubscriberStats {
    fn new() -> anyhow::Result<Self> {
        Ok(SubscriberStats {
            received: 0,
            missed: 0,
            duplicated: 0,
            last_offset: 0,
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 2)?,
        })
    }

    /// Counts publications after the last one received as missed.
    fn count_missing_tail(&mut self, last: u64) {
        if self.last_offset < last {
            self.missed += last - self.last_offset;
        }
    }

    /// Records one `message` frame.
    fn record(&mut self, frame: &[u8]) {
        let (Some(offset), Some(sent)) = (
            number_after(frame, b"\"offset\":"),
            number_after(frame, b"\"t\":"),
        ) else {
            return;
        };
        self.received += 1;
        if offset <= self.last_offset {
            self.duplicated += 1;
            return;
        }
        self.missed += offset - self.last_offset - 1;
        self.last_offset = offset;
        let latency = now_micros().saturating_sub(sent).max(1);
        let _ = self.latency_us.record(latency.min(600_000_000));
    }
}

async fn ws_subscriber(
    url: String,
    channel: String,
    ready: tokio::sync::mpsc::Sender<()>,
    last: u64,
    stop: tokio::sync::watch::Receiver<u64>,
) -> anyhow::Result<SubscriberStats> {
    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await?;
    let subscribe = format!(r#"{{"type":"subscribe","id":1,"channel":"{channel}"}}"#);
    socket.send(Message::text(subscribe)).await?;
    loop {
        match socket.next().await.context("closed before the reply")?? {
            Message::Text(text) if text.contains("\"reply\"") => break,
            Message::Text(text) if text.contains("\"error\"") => bail!("subscribe failed: {text}"),
            _ => {}
        }
    }
    ready.send(()).await.ok();
    drop(ready);
    let mut stats = SubscriberStats::new()?;
    let mut stop = stop;
    while stats.last_offset < last {
        tokio::select! {
            message = socket.next() => match message {
                Some(Ok(Message::Text(text))) => stats.record(text.as_bytes()),
                Some(Ok(_)) => {}
                _ => break,
            },
            _ = stop.changed() => break,
        }
    }
    stats.count_missing_tail(last);
    Ok(stats)
}

async fn tcp_subscriber(
    addr: String,
    channel: String,
    ready: tokio::sync::mpsc::Sender<()>,
    last: u64,
    stop: tokio::sync::watch::Receiver<u64>,
) -> anyhow::Result<SubscriberStats> {
    let stream = TcpStream::connect(&addr).await?;
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::with_capacity(16 * 1024, read);
    let subscribe = format!("{{\"type\":\"subscribe\",\"id\":1,\"channel\":\"{channel}\"}}\n");
    write.write_all(subscribe.as_bytes()).await?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if lines.read_until(b'\n', &mut line).await? == 0 {
            bail!("closed before the reply");
        }
        if line.windows(7).any(|w| w == b"\"reply\"") {
            break;
        }
    }
    ready.send(()).await.ok();
    drop(ready);
    let mut stats = SubscriberStats::new()?;
    let mut stop = stop;
    while stats.last_offset < last {
        line.clear();
        tokio::select! {
            read = lines.read_until(b'\n', &mut line) => match read {
                Ok(n) if n > 0 => {
                    if line.starts_with(b"{\"type\":\"message\"") {
                        stats.record(&line);
                    }
                }
                _ => break,
            },
            _ = stop.changed() => break,
        }
    }
    stats.count_missing_tail(last);
    drop(write);
    Ok(stats)
}

/// Runs one fan-out measurement.
pub async fn run_fanout(options: &FanoutOptions) -> anyhow::Result<FanoutReport> {
    let channel = format!("bench:fanout-{}", now_micros());
    let publications = (u128::from(options.rate) * options.duration.as_millis() / 1000) as u64;
    if publications == 0 {
        bail!("rate × duration is less than one publication");
    }
    let ws_url = format!("ws://{}/ws", options.http_addr);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(options.subscribers.max(1));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(0u64);
    let mut subscribers = Vec::with_capacity(options.subscribers);
    for _ in 0..options.subscribers {
        let ready = ready_tx.clone();
        let stop = stop_rx.clone();
        let channel = channel.clone();
        subscribers.push(match options.transport {
            Transport::Websocket => tokio::spawn(ws_subscriber(
                ws_url.clone(),
                channel,
                ready,
                publications,
                stop,
            )),
            Transport::Tcp => tokio::spawn(tcp_subscriber(
                options.tcp_addr.clone(),
                channel,
                ready,
                publications,
                stop,
            )),
        });
    }
    drop(ready_tx);
    crate::runs::wait_ready(&mut ready_rx, options.subscribers, "subscribers").await?;

    // The publisher: open-loop, each publication stamped with its due time.
    let publish_url = match &options.publish_addr {
        Some(addr) => format!("ws://{addr}/ws"),
        None => ws_url.clone(),
    };
    let (publisher, _) = tokio_tungstenite::connect_async(&publish_url).await?;
    let (mut sink, mut replies) = publisher.split();
    let drain = tokio::spawn(async move { while let Some(Ok(_)) = replies.next().await {} });
    let padding = "x".repeat(options.size.saturating_sub(24));
    let interval = Duration::from_secs(1) / options.rate.max(1);
    let start = Instant::now();
    let start_micros = now_micros();
    for i in 0..publications {
        let due = start + interval * u32::try_from(i).unwrap_or(u32::MAX);
        tokio::time::sleep_until(due.into()).await;
        let due_micros =
            start_micros + (interval * u32::try_from(i).unwrap_or(u32::MAX)).as_micros() as u64;
        let frame = format!(
            r#"{{"type":"publish","id":{i},"channel":"{channel}","data":{{"t":{due_micros},"p":"{padding}"}}}}"#
        );
        // Sent at once: each publication leaves at its due time.
        sink.send(Message::text(frame)).await?;
    }
    let publishing = start.elapsed();

    // Let the tail arrive, but not forever.
    let all = crate::runs::collect_within(subscribers, Duration::from_secs(5), || {
        stop_tx.send(1).ok();
    })
    .await?;
    drop(sink);
    drain.abort();

    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 2)?;
    let (mut deliveries, mut missed, mut duplicated) = (0, 0, 0);
    for stats in &all {
        histogram.add(&stats.latency_us)?;
        deliveries += stats.received;
        missed += stats.missed;
        duplicated += stats.duplicated;
    }
    let ms = |micros: u64| micros as f64 / 1000.0;
    Ok(FanoutReport {
        transport: options.transport,
        subscribers: options.subscribers,
        rate: options.rate,
        size: options.size,
        publications,
        deliveries,
        deliveries_per_second: deliveries as f64 / publishing.as_secs_f64().max(1e-9),
        latency_ms: Percentiles {
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
        },
        missed,
        duplicated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_read_after_their_keys() {
        let frame = br#"{"type":"message","channel":"b:f","offset":42,"data":{"t":1700000000000001,"p":"x"}}"#;
        assert_eq!(number_after(frame, b"\"offset\":"), Some(42));
        assert_eq!(number_after(frame, b"\"t\":"), Some(1_700_000_000_000_001));
        assert_eq!(number_after(frame, b"\"missing\":"), None);
    }

    #[test]
    fn gaps_and_repeats_are_counted() {
        let mut stats = SubscriberStats::new().expect("histogram");
        for offset in [1, 2, 4, 4, 3, 5] {
            let frame = format!(r#"{{"offset":{offset},"data":{{"t":1}}}}"#);
            stats.record(frame.as_bytes());
        }
        assert_eq!(stats.received, 6);
        assert_eq!(stats.missed, 1);
        assert_eq!(stats.duplicated, 2);
        assert_eq!(stats.last_offset, 5);
    }
}
