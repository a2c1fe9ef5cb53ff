//! Records over HTTP: create, get by id and list throughput and latency, each phase with C
//! concurrent keep-alive clients for a fixed time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};

use crate::fanout::Percentiles;

/// One phase's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RecordsPhase {
    /// `create`, `get` or `list`.
    pub operation: &'static str,
    /// Requests answered with success.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Successful requests per second.
    pub requests_per_second: f64,
    /// Latency percentiles.
    pub latency_ms: Percentiles,
}

#[derive(Clone, Copy)]
enum Operation {
    Create,
    Get,
    List,
}

impl Operation {
    fn name(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Get => "get",
            Operation::List => "list",
        }
    }
}

/// Runs create, get and list for `duration` each with `concurrency` clients.
pub async fn run_records(
    http_addr: &str,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Vec<RecordsPhase>> {
    let base = format!("http://{http_addr}/api/collections/bench_records/records");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency.max(1))
        .build()?;
    let seed: Value = http
        .post(&base)
        .json(&json!({"title": "seed", "author": "ana", "stars": 5}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = seed["id"].as_str().context("no id")?.to_owned();
    let mut phases = Vec::new();
    for operation in [Operation::Create, Operation::Get, Operation::List] {
        let url: Arc<str> = match operation {
            Operation::Create => base.clone().into(),
            Operation::Get => format!("{base}/{id}").into(),
            Operation::List => format!("{base}?limit=50").into(),
        };
        let started = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..concurrency.max(1) {
            let http = http.clone();
            let url = url.clone();
            workers.push(tokio::spawn(async move {
                let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 2)?;
                let (mut ok, mut errors) = (0u64, 0u64);
                while started.elapsed() < duration {
                    let sent = Instant::now();
                    let request = match operation {
                        Operation::Create => http.post(&*url).json(
                            &json!({"title": "a benchmark record", "author": "ana", "stars": 5}),
                        ),
                        Operation::Get | Operation::List => http.get(&*url),
                    };
                    match request.send().await {
                        Ok(response) if response.status().is_success() => {
                            response.bytes().await?;
                            ok += 1;
                            let micros = sent.elapsed().as_micros() as u64;
                            let _ = histogram.record(micros.clamp(1, 600_000_000));
                        }
                        _ => errors += 1,
                    }
                }
                anyhow::Ok((histogram, ok, errors))
            }));
        }
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 2)?;
        let (mut requests, mut errors) = (0, 0);
        for worker in workers {
            let (h, ok, failed) = worker.await??;
            histogram.add(&h)?;
            requests += ok;
            errors += failed;
        }
        if requests == 0 {
            bail!("no {} request succeeded", operation.name());
        }
        let elapsed = started.elapsed().as_secs_f64();
        let ms = |micros: u64| micros as f64 / 1000.0;
        phases.push(RecordsPhase {
            operation: operation.name(),
            requests,
            errors,
            requests_per_second: requests as f64 / elapsed,
            latency_ms: Percentiles {
                p50: ms(histogram.value_at_quantile(0.50)),
                p90: ms(histogram.value_at_quantile(0.90)),
                p99: ms(histogram.value_at_quantile(0.99)),
                max: ms(histogram.max()),
            },
        });
    }
    Ok(phases)
}
