//! Hostile clients, as an attacker would run them against a server on its default
//! configuration, while the server's resident memory is sampled and a healthy client keeps
//! asking to be answered. Each scenario is bounded in count and time and stops by itself.
//!
//! - `slow-readers`: subscribers (4 KiB receive buffers) that never read, each on a channel of
//!   its own, each flooded by its own anonymous publisher with binary publications of 60 KiB
//!   (raw TCP, length-prefixed, within the default publish burst).
//! - `history`: anonymous publishers fill the history of many `chat:` channels with 60 KiB
//!   publications, then close.
//! - `channels`: connections make as many channels as they can, one publication each.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::server::usage_of;

/// One kind of attack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Subscribers that never read, flooded with large publications.
    SlowReaders,
    /// Anonymous publishers filling channel history.
    History,
    /// Connections making channels without end.
    Channels,
}

impl Scenario {
    /// Every scenario, in the order they run.
    pub const ALL: [Scenario; 3] = [Scenario::SlowReaders, Scenario::History, Scenario::Channels];

    /// The scenario's name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::SlowReaders => "slow-readers",
            Scenario::History => "history",
            Scenario::Channels => "channels",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct AttackOptions {
    /// `127.0.0.1:PORT` of the server's HTTP port.
    pub http_addr: String,
    /// `127.0.0.1:PORT` of its raw TCP port.
    pub tcp_addr: String,
    /// Its process id, for its memory.
    pub server_pid: u32,
    /// Which attack.
    pub scenario: Scenario,
    /// 1.0 runs the counts of the hostile-clients report (30 readers × 1,100 × 60 KiB; 5 × 2,000
    /// × 60 KiB of history; 20,000 channels); less for a quick run.
    pub scale: f64,
    /// How long the pressure is held after the flood, memory still sampled.
    pub hold: Duration,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct AttackReport {
    /// The scenario.
    pub scenario: Scenario,
    /// Server RSS before, in bytes.
    pub rss_before: u64,
    /// The most server RSS sampled (every 50 ms) during the run, in bytes.
    pub rss_max: u64,
    /// Server RSS at the end, in bytes.
    pub rss_after: u64,
    /// Publications the attackers sent.
    pub sent: u64,
    /// Publications and subscriptions the server refused (error frames), by code.
    pub refused: Vec<(String, u64)>,
    /// Round trips of the healthy client (WebSocket ping → pong) during the run.
    pub pings: u64,
    /// Its median round trip, in milliseconds.
    pub ping_p50_ms: f64,
    /// Its slowest round trip, in milliseconds.
    pub ping_max_ms: f64,
    /// Pings that got no answer within 2 s.
    pub unanswered: u64,
    /// How long the run took.
    pub seconds: f64,
}

const PAYLOAD: usize = 60 * 1024;

/// Runs one scenario and measures.
pub async fn run_attack(options: &AttackOptions) -> anyhow::Result<AttackReport> {
    let started = Instant::now();
    let rss_before = usage_of(options.server_pid)?.rss_bytes;
    let stop = new_flag();
    let sampler = tokio::spawn(sample_rss(options.server_pid, stop.clone()));
    let healthy = tokio::spawn(healthy_client(options.http_addr.clone(), stop.clone()));
    let outcome = match options.scenario {
        Scenario::SlowReaders => slow_readers(options).await,
        Scenario::History => history(options).await,
        Scenario::Channels => channels(options).await,
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rss_max = sampler.await.context("the sampler")?;
    let (pings, unanswered) = healthy.await.context("the healthy client")??;
    let (sent, refused) = outcome?;
    let rss_after = usage_of(options.server_pid)?.rss_bytes;
    let mut sorted = pings.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(AttackReport {
        scenario: options.scenario,
        rss_before,
        rss_max: rss_max.max(rss_after),
        rss_after,
        sent,
        refused: refused.into_iter().collect(),
        pings: pings.len() as u64,
        ping_p50_ms: sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
        ping_max_ms: sorted.last().copied().unwrap_or(0.0),
        unanswered,
        seconds: started.elapsed().as_secs_f64(),
    })
}

type Flag = std::sync::Arc<std::sync::atomic::AtomicBool>;

fn new_flag() -> Flag {
    std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))
}

fn stopped(flag: &Flag) -> bool {
    flag.load(std::sync::atomic::Ordering::Relaxed)
}

/// The most resident memory seen until `stop`.
async fn sample_rss(pid: u32, stop: Flag) -> u64 {
    let mut max = 0;
    while !stopped(&stop) {
        if let Ok(usage) = usage_of(pid) {
            max = max.max(usage.rss_bytes);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    max
}

/// Pings over a WebSocket every 100 ms until `stop`: round trips in ms, and pings unanswered
/// within 2 s.
async fn healthy_client(http_addr: String, stop: Flag) -> anyhow::Result<(Vec<f64>, u64)> {
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{http_addr}/ws"))
        .await
        .context("the healthy client cannot connect")?;
    socket.next().await.context("no connected frame")??;
    let mut rtts = Vec::new();
    let mut unanswered = 0;
    let mut id = 0u64;
    while !stopped(&stop) {
        id += 1;
        let sent = Instant::now();
        socket
            .send(Message::text(format!(r#"{{"type":"ping","id":{id}}}"#)))
            .await?;
        let answer = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(message) = socket.next().await {
                if let Message::Text(text) = message?
                    && text.contains("\"pong\"")
                    && text.contains(&format!("\"id\":{id}"))
                {
                    return anyhow::Ok(true);
                }
            }
            Ok(false)
        })
        .await;
        match answer {
            Ok(Ok(true)) => rtts.push(sent.elapsed().as_secs_f64() * 1000.0),
            Ok(Ok(false)) => bail!("the healthy client's connection closed"),
            Ok(Err(error)) => return Err(error),
            Err(_) => unanswered += 1,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((rtts, unanswered))
}

/// Counts of refusals by code.
type Refusals = std::collections::BTreeMap<String, u64>;

/// Counts one server frame; true when it answered a request (a reply, or an error counted by
/// its code).
fn count_answer(frame: &[u8], refused: &mut Refusals) -> bool {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(frame) else {
        return false;
    };
    match value["type"].as_str() {
        Some("reply") => true,
        Some("error") => {
            *refused
                .entry(value["code"].as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
            true
        }
        _ => false,
    }
}

/// Waits for attackers, each answering how many it sent and what was refused, then holds the
/// pressure for `hold`.
async fn gather(
    attackers: Vec<tokio::task::JoinHandle<anyhow::Result<(u64, Refusals)>>>,
    hold: Duration,
) -> anyhow::Result<(u64, Refusals)> {
    let mut sent = 0;
    let mut refused = Refusals::new();
    for attacker in attackers {
        let (count, codes) = attacker.await??;
        sent += count;
        for (code, n) in codes {
            *refused.entry(code).or_default() += n;
        }
    }
    tokio::time::sleep(hold).await;
    Ok((sent, refused))
}

fn scaled(count: f64, scale: f64) -> usize {
    ((count * scale).round() as usize).max(1)
}

/// A raw TCP connection that has read its `connected` line.
async fn raw_tcp(addr: &str, receive_buffer: Option<u32>) -> anyhow::Result<BufReader<TcpStream>> {
    let address: std::net::SocketAddr = addr.parse()?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    if let Some(bytes) = receive_buffer {
        socket.set_recv_buffer_size(bytes)?;
    }
    let stream = socket.connect(address).await?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    if !line.contains("\"connected\"") {
        bail!("expected connected, got {line}");
    }
    Ok(reader)
}

/// Sends a line and reads lines until the answer to `id`.
async fn request_line(
    reader: &mut BufReader<TcpStream>,
    frame: serde_json::Value,
    id: u64,
) -> anyhow::Result<serde_json::Value> {
    let mut text = frame.to_string();
    text.push('\n');
    reader.get_mut().write_all(text.as_bytes()).await?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            bail!("closed before answering");
        }
        let value: serde_json::Value = serde_json::from_str(&line)?;
        if value["id"] == id {
            return Ok(value);
        }
    }
}

async fn slow_readers(options: &AttackOptions) -> anyhow::Result<(u64, Refusals)> {
    let readers = scaled(30.0, options.scale.sqrt());
    let per_reader = scaled(1100.0, options.scale.sqrt());
    let mut stalled = Vec::new();
    for i in 0..readers {
        let mut reader = raw_tcp(&options.tcp_addr, Some(4096)).await?;
        let reply = request_line(
            &mut reader,
            serde_json::json!({"id": 1, "type": "subscribe", "channel": format!("stream:attack-{i}")}),
            1,
        )
        .await?;
        if reply["type"] != "reply" {
            bail!("subscribe refused: {reply}");
        }
        // From here on it never reads.
        stalled.push(reader);
    }
    let payload = vec![0xA5u8; PAYLOAD];
    let mut floods = Vec::new();
    for i in 0..readers {
        let addr = options.tcp_addr.clone();
        let payload = payload.clone();
        floods.push(tokio::spawn(async move {
            let mut publisher = raw_tcp(&addr, None).await?;
            let reply = request_line(
                &mut publisher,
                serde_json::json!({"id": 1, "type": "framing", "mode": "length_prefixed"}),
                1,
            )
            .await?;
            if reply["type"] != "reply" {
                bail!("framing refused: {reply}");
            }
            let channel = format!("stream:attack-{i}");
            let (read, mut write) = publisher.into_inner().into_split();
            let drain = tokio::spawn(drain_answers_split(read, per_reader));
            for n in 0..per_reader {
                let frame = duplex_proto::binary::encode_publish(n as u32 + 2, &channel, &payload);
                write
                    .write_all(&duplex_proto::tcp::length_prefixed_binary(&frame))
                    .await?;
            }
            let refused = drain.await?;
            anyhow::Ok((per_reader as u64, refused))
        }));
    }
    // The pressure stays while the readers hold on (the server ends them at write_timeout).
    let outcome = gather(floods, options.hold).await;
    drop(stalled);
    outcome
}

/// Reads length-prefixed answers until `expected` came (or the connection ends), counting
/// refusals by code.
async fn drain_answers_split(read: tokio::net::tcp::OwnedReadHalf, expected: usize) -> Refusals {
    let mut refused = Refusals::new();
    let mut seen = 0;
    let mut reader = BufReader::new(read);
    let mut header = [0u8; 4];
    while seen < expected {
        let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_secs(30), reader.read_exact(&mut header)).await
        else {
            break;
        };
        let mut frame = vec![0; u32::from_be_bytes(header) as usize];
        if reader.read_exact(&mut frame).await.is_err() {
            break;
        }
        if frame.len() > 1 && count_answer(&frame[1..], &mut refused) {
            seen += 1;
        }
    }
    refused
}

/// Publishes JSON lines over raw TCP in line mode, `frames` of them, reading the answers
/// alongside; refusals by code.
async fn publish_lines(addr: String, frames: Vec<String>) -> anyhow::Result<(u64, Refusals)> {
    let reader = raw_tcp(&addr, None).await?;
    let (read, mut write) = reader.into_inner().into_split();
    let expected = frames.len();
    let answers = tokio::spawn(async move {
        let mut refused = Refusals::new();
        let mut lines = BufReader::new(read).lines();
        let mut seen = 0;
        while seen < expected {
            let Ok(Ok(Some(line))) =
                tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await
            else {
                break;
            };
            if count_answer(line.as_bytes(), &mut refused) {
                seen += 1;
            }
        }
        refused
    });
    for frame in &frames {
        write.write_all(frame.as_bytes()).await?;
    }
    let refused = answers.await?;
    Ok((expected as u64, refused))
}

async fn history(options: &AttackOptions) -> anyhow::Result<(u64, Refusals)> {
    let publishers = scaled(5.0, options.scale.sqrt());
    let per_publisher = scaled(2000.0, options.scale.sqrt());
    let pad = "x".repeat(PAYLOAD - 32);
    let mut runs = Vec::new();
    for p in 0..publishers {
        let frames: Vec<String> = (0..per_publisher)
            .map(|n| {
                format!(
                    "{{\"id\":{},\"type\":\"publish\",\"channel\":\"chat:attack-{p}-{}\",\"data\":{{\"pad\":\"{pad}\"}}}}\n",
                    n + 1,
                    n % 20
                )
            })
            .collect();
        runs.push(tokio::spawn(publish_lines(
            options.tcp_addr.clone(),
            frames,
        )));
    }
    // The publishers close; what they left is held for the history TTL.
    gather(runs, options.hold).await
}

async fn channels(options: &AttackOptions) -> anyhow::Result<(u64, Refusals)> {
    let connections = scaled(10.0, options.scale.sqrt());
    let per_connection = scaled(2000.0, options.scale.sqrt());
    let mut runs = Vec::new();
    for c in 0..connections {
        let frames: Vec<String> = (0..per_connection)
            .map(|n| {
                format!(
                    "{{\"id\":{},\"type\":\"publish\",\"channel\":\"chat:many-{c}-{n}\",\"data\":{{\"n\":{n}}}}}\n",
                    n + 1
                )
            })
            .collect();
        runs.push(tokio::spawn(publish_lines(
            options.tcp_addr.clone(),
            frames,
        )));
    }
    gather(runs, options.hold).await
}
