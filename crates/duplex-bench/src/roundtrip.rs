//! Round trips: the server asking a client (`POST /api/connections/{id}/request` → `request`
//! frame → client `reply` → HTTP response), and a client recovering missed publications after
//! a reconnect (connect, `subscribe` with `since`, last missed publication received).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::fanout::Percentiles;

/// What a round-trip run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RoundtripReport {
    /// What was measured.
    pub what: String,
    /// How many round trips.
    pub samples: u64,
    /// Latency percentiles in milliseconds.
    pub latency_ms: Percentiles,
}

fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let micros = u64::try_from(elapsed.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    let _ = histogram.record(micros.min(600_000_000));
}

/// `count` sequential server → client requests through the HTTP API, answered by a WebSocket
/// client at once.
pub async fn run_requests(http_addr: &str, count: u64) -> anyhow::Result<RoundtripReport> {
    let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{http_addr}/ws")).await?;
    let (mut sink, mut stream) = socket.split();
    let connected: Value = match stream.next().await.context("closed")?? {
        Message::Text(text) => serde_json::from_str(&text)?,
        other => bail!("expected connected, got {other:?}"),
    };
    let client = connected["client"]
        .as_str()
        .context("no client id")?
        .to_owned();
    let responder = tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            if let Message::Text(text) = message
                && let Ok(frame) = serde_json::from_str::<Value>(&text)
                && frame["type"] == "request"
            {
                let reply = json!({"type": "reply", "id": frame["id"], "result": {"ok": true}});
                if sink.send(Message::text(reply.to_string())).await.is_err() {
                    break;
                }
            }
        }
    });
    let http = reqwest::Client::new();
    let url = format!("http://{http_addr}/api/connections/{client}/request");
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 2)?;
    for i in 0..count {
        let started = Instant::now();
        let response = http.post(&url).json(&json!({"n": i})).send().await?;
        if !response.status().is_success() {
            bail!("request {i} failed: {}", response.status());
        }
        response.bytes().await?;
        record(&mut histogram, started.elapsed());
    }
    responder.abort();
    Ok(RoundtripReport {
        what: "server → client request over HTTP API and WebSocket".into(),
        samples: count,
        latency_ms: Percentiles::of_micros(&histogram),
    })
}

/// `rounds` reconnects, each after `missed` publications were made while away: time from
/// opening the new connection to receiving the last missed publication.
pub async fn run_recovery(
    http_addr: &str,
    missed: u64,
    rounds: u64,
) -> anyhow::Result<RoundtripReport> {
    let channel = format!(
        "records:bench-recovery-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0)
    );
    let ws_url = format!("ws://{http_addr}/ws");
    let http = reqwest::Client::new();
    let publish_url = format!("http://{http_addr}/api/channels/{channel}/publish");
    let subscribe = |id: u64, since: Option<(u64, &str)>| {
        let mut frame = json!({"type": "subscribe", "id": id, "channel": channel});
        if let Some((offset, epoch)) = since {
            frame["since"] = json!({"offset": offset, "epoch": epoch});
        }
        Message::text(frame.to_string())
    };
    async fn reply_of(
        stream: &mut (
                 impl futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
                 + Unpin
             ),
    ) -> anyhow::Result<Value> {
        loop {
            if let Message::Text(text) = stream.next().await.context("closed")?? {
                let frame: Value = serde_json::from_str(&text)?;
                if frame["type"] == "reply" || frame["type"] == "error" {
                    return Ok(frame);
                }
            }
        }
    }

    // One publication first, so the channel has history (and so an epoch) while nobody is
    // subscribed; a channel with neither is dropped, and its epoch with it.
    http.post(&publish_url)
        .json(&json!("start"))
        .send()
        .await?
        .error_for_status()?;
    let (mut socket, _) = tokio_tungstenite::connect_async(&ws_url).await?;
    socket.send(subscribe(1, None)).await?;
    let reply = reply_of(&mut socket).await?;
    let epoch = reply["result"]["epoch"]
        .as_str()
        .context("no epoch")?
        .to_owned();
    let mut offset = reply["result"]["offset"].as_u64().context("no offset")?;
    drop(socket);

    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 2)?;
    for _ in 0..rounds {
        for i in 0..missed {
            let response = http
                .post(&publish_url)
                .json(&json!({"i": i}))
                .send()
                .await?;
            if !response.status().is_success() {
                bail!("publish failed: {}", response.status());
            }
        }
        let target = offset + missed;
        let started = Instant::now();
        let (mut socket, _) = tokio_tungstenite::connect_async(&ws_url).await?;
        socket.send(subscribe(2, Some((offset, &epoch)))).await?;
        let reply = reply_of(&mut socket).await?;
        if reply["result"]["recovered"] != true {
            bail!("not recovered: {reply}");
        }
        let mut last = offset;
        while last < target {
            if let Message::Text(text) = socket.next().await.context("closed")?? {
                let frame: Value = serde_json::from_str(&text)?;
                if frame["type"] == "message" {
                    let got = frame["offset"].as_u64().context("no offset")?;
                    if got != last + 1 {
                        bail!("gap: expected {}, got {got}", last + 1);
                    }
                    last = got;
                }
            }
        }
        record(&mut histogram, started.elapsed());
        offset = target;
    }
    Ok(RoundtripReport {
        what: format!("reconnect and recover {missed} missed publications"),
        samples: rounds,
        latency_ms: Percentiles::of_micros(&histogram),
    })
}
