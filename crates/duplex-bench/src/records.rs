//! Records over HTTP beside the HTTP stack itself: GET by id, a list of 20 (the first page,
//! which a SQLite server answers from memory until the collection is written, and the second,
//! read from SQLite every time), POST and PATCH with `If-Match`, each first as fast as C keep-alive clients go, then open-loop at half that rate
//! for its latency; and the same for a bare axum route serving a typed JSON body of the
//! record's size ([`crate::baseline`]), so every operation reads as a ratio to the stack.
//!
//! The half-rate pass is open-loop: each client's requests are due at fixed times and latency
//! runs from the due time, so a server that falls behind shows as latency, not as a slower
//! client (no coordinated omission).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};

use crate::fanout::Percentiles;
use crate::lean_http;
use crate::server::usage_of;

/// What `duplex bench http` measures.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Concurrent keep-alive clients.
    pub concurrency: usize,
    /// Time per pass of each operation.
    pub duration: Duration,
    /// The duplex server's process, for its CPU per request.
    pub server_pid: Option<u32>,
    /// The bare axum baseline's address and process, when measured.
    pub baseline: Option<(String, Option<u32>)>,
}

/// One operation's figures.
#[derive(Debug, Clone, Serialize)]
pub struct HttpPhase {
    /// `baseline`, `get`, `list`, `list-next`, `create` or `patch`.
    pub operation: &'static str,
    /// Requests answered with success at full speed.
    pub requests: u64,
    /// Requests that failed at full speed.
    pub errors: u64,
    /// Successful requests per second at full speed.
    pub requests_per_second: f64,
    /// Latency at full speed.
    pub latency_ms: Percentiles,
    /// The server's CPU time per request at full speed, in microseconds.
    pub cpu_us_per_request: Option<f64>,
    /// Requests per second divided by the baseline's.
    pub ratio: Option<f64>,
    /// The open-loop pass at half the full-speed rate.
    pub half_rate: Option<HalfRate>,
}

/// An open-loop pass at a fixed rate.
#[derive(Debug, Clone, Serialize)]
pub struct HalfRate {
    /// Requests a second asked for.
    pub rate: f64,
    /// Latency from each request's due time.
    pub latency_ms: Percentiles,
    /// Requests that failed.
    pub errors: u64,
    /// The server's own p99 over the pass, from its `/metrics` histogram: the upper bound of
    /// the bucket it falls in (0.1 ms to 5 s in steps of 1, 2 and 5), so "at most". It times a
    /// request from when the server has read it to its answer; what the client sees beyond it
    /// is the network and both sides waiting for a CPU. `None` for the baseline, or when the
    /// server's `/metrics` could not be read (an API key guards it).
    pub server_p99_ms_at_most: Option<f64>,
    /// The share, in percent, of the pass's requests the server took longer than 5 ms (the
    /// half-rate target's bound), from the same histogram; exact, since 5 ms is a bucket's
    /// bound: at most 1 means the server's own p99 is within 5 ms. `None` as above.
    pub server_over_5ms_percent: Option<f64>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct HttpReport {
    /// The size of the benchmark record's document (and of the baseline's body).
    pub record_bytes: usize,
    /// The bare axum route, when measured.
    pub baseline: Option<HttpPhase>,
    /// duplex's operations.
    pub phases: Vec<HttpPhase>,
}

/// The fields of the benchmark record.
pub fn bench_record() -> Value {
    json!({"title": "a benchmark record", "author": "ana", "stars": 5})
}

/// How big the benchmark record's document is, measured on the server.
pub async fn record_size(http_addr: &str) -> anyhow::Result<usize> {
    let http = reqwest::Client::new();
    let base = format!("http://{http_addr}/api/collections/bench_records/records");
    let response = http
        .post(&base)
        .json(&bench_record())
        .send()
        .await?
        .error_for_status()?;
    Ok(response.bytes().await?.len())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Operation {
    Baseline,
    Get,
    List,
    /// The page after the first: a cursor's page, never kept in memory.
    ListNext,
    Create,
    Patch,
}

impl Operation {
    fn name(self) -> &'static str {
        match self {
            Operation::Baseline => "baseline",
            Operation::Get => "get",
            Operation::List => "list",
            Operation::ListNext => "list-next",
            Operation::Create => "create",
            Operation::Patch => "patch",
        }
    }
}

/// What one pass of one operation targets.
struct Pass {
    operation: Operation,
    /// The server's `host:port`.
    addr: Arc<str>,
    /// The path requested (for PATCH, the collection's records; the record's id follows).
    path: Arc<str>,
    /// For PATCH: the records each client edits, one each (an `If-Match` race is not the
    /// point here; the concurrency tests cover it), with the version the last pass left.
    records: Arc<Vec<Mutex<(String, u64)>>>,
    pid: Option<u32>,
    /// For the server's `/metrics`.
    http: reqwest::Client,
}

/// Runs the baseline (when given) and duplex's four operations.
pub async fn run_http(http_addr: &str, options: &HttpOptions) -> anyhow::Result<HttpReport> {
    let concurrency = options.concurrency.max(1);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let base = format!("http://{http_addr}/api/collections/bench_records/records");
    let records_path = "/api/collections/bench_records/records";
    // Enough records that a list of 20 is a full page.
    let mut seeded = Vec::new();
    for _ in 0..40 {
        seeded.push(create(&http, &base).await?);
    }
    let record_bytes = record_size(http_addr).await?;
    let (id, _) = seeded[0].clone();
    let mut records = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        records.push(Mutex::new(create(&http, &base).await?));
    }
    let records = Arc::new(records);
    let first_page: Value = http
        .get(format!("{base}?limit=20"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    // base64url: nothing to escape in a query.
    let cursor = first_page["next"]
        .as_str()
        .context("a page of 20 of the 40 records seeded has a next one")?
        .to_owned();

    let baseline = match &options.baseline {
        Some((addr, pid)) => {
            let pass = Pass {
                operation: Operation::Baseline,
                addr: addr.as_str().into(),
                path: "/record".into(),
                records: records.clone(),
                pid: *pid,
                http: http.clone(),
            };
            Some(measure(&pass, concurrency, options.duration).await?)
        }
        None => None,
    };
    let mut phases = Vec::new();
    for operation in [
        Operation::Get,
        Operation::List,
        Operation::ListNext,
        Operation::Create,
        Operation::Patch,
    ] {
        let path: Arc<str> = match operation {
            Operation::Get => format!("{records_path}/{id}").into(),
            Operation::List => format!("{records_path}?limit=20").into(),
            Operation::ListNext => format!("{records_path}?limit=20&cursor={cursor}").into(),
            _ => records_path.into(),
        };
        let pass = Pass {
            operation,
            addr: http_addr.into(),
            path,
            records: records.clone(),
            pid: options.server_pid,
            http: http.clone(),
        };
        let mut phase = measure(&pass, concurrency, options.duration).await?;
        phase.ratio = baseline
            .as_ref()
            .map(|b| phase.requests_per_second / b.requests_per_second);
        phases.push(phase);
    }
    Ok(HttpReport {
        record_bytes,
        baseline,
        phases,
    })
}

async fn create(http: &reqwest::Client, base: &str) -> anyhow::Result<(String, u64)> {
    let record: Value = http
        .post(base)
        .json(&bench_record())
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = record["id"].as_str().context("no id")?.to_owned();
    let version = record["version"].as_u64().context("no version")?;
    Ok((id, version))
}

/// Full speed, then half of it open-loop.
async fn measure(pass: &Pass, concurrency: usize, duration: Duration) -> anyhow::Result<HttpPhase> {
    let before = pass.pid.and_then(|pid| usage_of(pid).ok());
    let full = run_pass(pass, concurrency, duration, None).await?;
    let after = pass.pid.and_then(|pid| usage_of(pid).ok());
    if full.ok == 0 {
        bail!("no {} request succeeded", pass.operation.name());
    }
    let requests_per_second = full.ok as f64 / full.elapsed.as_secs_f64();
    let cpu_us_per_request = match (before, after) {
        (Some(before), Some(after)) => {
            Some((after.cpu_seconds - before.cpu_seconds) * 1e6 / full.ok as f64)
        }
        _ => None,
    };
    let rate = requests_per_second / 2.0;
    let timed_before = server_timings(pass).await;
    let half = run_pass(pass, concurrency, duration, Some(rate)).await?;
    let timed_after = server_timings(pass).await;
    let (server_p99_ms_at_most, server_over_5ms_percent) = match (timed_before, timed_after) {
        (Some(before), Some(after)) => (
            p99_bound_ms(&before, &after),
            over_percent(&before, &after, 0.005),
        ),
        _ => (None, None),
    };
    Ok(HttpPhase {
        operation: pass.operation.name(),
        requests: full.ok,
        errors: full.errors,
        requests_per_second,
        latency_ms: Percentiles::of_micros(&full.histogram),
        cpu_us_per_request,
        ratio: None,
        half_rate: Some(HalfRate {
            rate,
            latency_ms: Percentiles::of_micros(&half.histogram),
            errors: half.errors,
            server_p99_ms_at_most,
            server_over_5ms_percent,
        }),
    })
}

/// The method and route template the server files an operation's requests under.
fn timed_as(operation: Operation) -> Option<(&'static str, &'static str)> {
    const ONE: &str = "/api/collections/{collection}/records/{id}";
    const ALL: &str = "/api/collections/{collection}/records";
    match operation {
        Operation::Baseline => None,
        Operation::Get => Some(("GET", ONE)),
        Operation::List | Operation::ListNext => Some(("GET", ALL)),
        Operation::Create => Some(("POST", ALL)),
        Operation::Patch => Some(("PATCH", ONE)),
    }
}

/// The server's request-duration histogram for the pass's operation, every status together:
/// each bucket's upper bound in seconds with its cumulative count, `+Inf` last.
async fn server_timings(pass: &Pass) -> Option<Vec<(f64, u64)>> {
    let (method, route) = timed_as(pass.operation)?;
    let text = pass
        .http
        .get(format!("http://{}/metrics", pass.addr))
        .send()
        .await
        .ok()?
        .error_for_status()
        .ok()?
        .text()
        .await
        .ok()?;
    let buckets = duration_buckets(&text, method, route);
    (!buckets.is_empty()).then_some(buckets)
}

/// `duplex_http_request_duration_seconds_bucket` lines of `method` and `route` in a Prometheus
/// text exposition, summed over statuses by bucket, in the order of their bounds.
fn duration_buckets(text: &str, method: &str, route: &str) -> Vec<(f64, u64)> {
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("duplex_http_request_duration_seconds_bucket{") else {
            continue;
        };
        let Some((labels, count)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels.split("\",").find_map(|pair| {
                let (key, value) = pair.split_once("=\"")?;
                (key == name).then(|| value.trim_end_matches('"'))
            })
        };
        if label("method") != Some(method) || label("route") != Some(route) {
            continue;
        }
        let (Some(le), Ok(count)) = (label("le"), count.trim().parse::<u64>()) else {
            continue;
        };
        let Ok(le) = le.replace("+Inf", "inf").parse::<f64>() else {
            continue;
        };
        match buckets.iter_mut().find(|(bound, _)| *bound == le) {
            Some((_, total)) => *total += count,
            None => buckets.push((le, count)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The requests a histogram counted between two readings, in bucket `bound` (cumulative).
fn counted_between(before: &[(f64, u64)], bound: f64, cumulative: u64) -> u64 {
    let earlier = before
        .iter()
        .find(|(b, _)| *b == bound)
        .map_or(0, |(_, c)| *c);
    cumulative.saturating_sub(earlier)
}

/// The share, in percent, of the requests counted between two readings of a histogram that
/// took longer than `bound` seconds, which must be one of its bucket bounds; `None` if it is
/// not or nothing was counted.
fn over_percent(before: &[(f64, u64)], after: &[(f64, u64)], bound: f64) -> Option<f64> {
    let total = after.last().map(|&(b, c)| counted_between(before, b, c))?;
    let within = after
        .iter()
        .find(|(b, _)| *b == bound)
        .map(|&(b, c)| counted_between(before, b, c))?;
    (total > 0).then(|| (total - within.min(total)) as f64 * 100.0 / total as f64)
}

/// The upper bound, in ms, of the bucket holding the 99th percentile of the requests counted
/// between two readings of the same histogram; infinite past the last bound, `None` if none.
fn p99_bound_ms(before: &[(f64, u64)], after: &[(f64, u64)]) -> Option<f64> {
    let counted = |bound: f64, cumulative: u64| counted_between(before, bound, cumulative);
    let total = after.last().map(|&(bound, c)| counted(bound, c))?;
    if total == 0 {
        return None;
    }
    let wanted = (total * 99).div_ceil(100);
    after
        .iter()
        .find(|&&(bound, c)| counted(bound, c) >= wanted)
        .map(|&(bound, _)| bound * 1000.0)
}

struct Tally {
    histogram: Histogram<u64>,
    ok: u64,
    errors: u64,
    elapsed: Duration,
}

/// `concurrency` clients for `duration`: as fast as they go, or each at `rate / concurrency`
/// a second on a fixed schedule.
///
/// At a fixed rate a request's latency runs from its due time when the server still held the
/// connection then (the previous answer came after it: the server's delay, counted), and from
/// when it was written otherwise, so that the client's own timer (tokio's has a 1 ms grain)
/// and scheduling on a shared machine are not counted as the server's.
async fn run_pass(
    pass: &Pass,
    concurrency: usize,
    duration: Duration,
    rate: Option<f64>,
) -> anyhow::Result<Tally> {
    let interval = rate.map(|rate| Duration::from_secs_f64(concurrency as f64 / rate.max(1.0)));
    let mut connections = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        connections.push(lean_http::Connection::open(&pass.addr).await?);
    }
    let started = Instant::now();
    let mut workers = Vec::with_capacity(concurrency);
    for (worker, mut connection) in connections.into_iter().enumerate() {
        let (operation, addr, path) = (pass.operation, pass.addr.clone(), pass.path.clone());
        let records = pass.records.clone();
        workers.push(tokio::spawn(async move {
            let mut record = records.get(worker).map(|r| lock(r).clone());
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 2)?;
            let (mut ok, mut errors) = (0u64, 0u64);
            let fixed = prepared(operation, &addr, &path);
            // Spread the clients' schedules over one interval.
            let mut due = interval.map(|i| started + i.mul_f64(worker as f64 / concurrency as f64));
            let mut free_since = started;
            loop {
                let scheduled = match (&mut due, interval) {
                    (Some(at), Some(interval)) => {
                        tokio::time::sleep_until((*at).into()).await;
                        let this = *at;
                        *at += interval;
                        Some(this)
                    }
                    _ => None,
                };
                let written = Instant::now();
                if scheduled.unwrap_or(written).duration_since(started) >= duration {
                    break;
                }
                let from = match scheduled {
                    Some(due) if free_since > due => due,
                    _ => written,
                };
                let result = send(
                    operation,
                    &mut connection,
                    &fixed,
                    &addr,
                    &path,
                    record.as_mut(),
                )
                .await;
                free_since = Instant::now();
                match result {
                    Ok(()) => {
                        ok += 1;
                        let micros = free_since.duration_since(from).as_micros() as u64;
                        let _ = histogram.record(micros.clamp(1, 600_000_000));
                    }
                    Err(_) => {
                        errors += 1;
                        // The connection may be out of step with its answers: start again.
                        connection = lean_http::Connection::open(&addr).await?;
                    }
                }
            }
            if let (Some(kept), Some(record)) = (records.get(worker), record) {
                *lock(kept) = record;
            }
            anyhow::Ok((histogram, ok, errors))
        }));
    }
    let mut tally = Tally {
        histogram: Histogram::<u64>::new_with_bounds(1, 600_000_000, 2)?,
        ok: 0,
        errors: 0,
        elapsed: Duration::ZERO,
    };
    for worker in workers {
        let (histogram, ok, errors) = worker.await??;
        tally.histogram.add(&histogram)?;
        tally.ok += ok;
        tally.errors += errors;
    }
    tally.elapsed = started.elapsed();
    Ok(tally)
}

/// The request an operation sends every time (all but PATCH, whose `If-Match` moves on).
fn prepared(operation: Operation, addr: &str, path: &str) -> Vec<u8> {
    match operation {
        Operation::Baseline | Operation::Get | Operation::List | Operation::ListNext => {
            lean_http::get(addr, path)
        }
        Operation::Create => lean_http::with_body(
            "POST",
            addr,
            path,
            &["content-type: application/json"],
            bench_record().to_string().as_bytes(),
        ),
        Operation::Patch => Vec::new(),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One request; a PATCH moves its record's version on.
async fn send(
    operation: Operation,
    connection: &mut lean_http::Connection,
    prepared: &[u8],
    addr: &str,
    path: &str,
    record: Option<&mut (String, u64)>,
) -> anyhow::Result<()> {
    let answer = match operation {
        Operation::Baseline
        | Operation::Get
        | Operation::List
        | Operation::ListNext
        | Operation::Create => connection.exchange(prepared).await?,
        Operation::Patch => {
            let (id, version) = record.context("no record to patch")?;
            let request = lean_http::with_body(
                "PATCH",
                addr,
                &format!("{path}/{id}"),
                &[
                    &format!("if-match: \"{version}\""),
                    "content-type: application/merge-patch+json",
                ],
                br#"{"stars":4}"#,
            );
            let answer = connection.exchange(&request).await?;
            if let Some(moved) = answer.version {
                *version = moved;
            } else if answer.status == 412 {
                // Out of step (an earlier request failed on the way): read where it is.
                let current = connection
                    .exchange(&lean_http::get(addr, &format!("{path}/{id}")))
                    .await?;
                if let Some(current) = current.version {
                    *version = current;
                }
            }
            answer
        }
    };
    if !(200..300).contains(&answer.status) {
        bail!("{}", answer.status);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = "/api/collections/{collection}/records/{id}";

    fn exposition(fast: u64, slow: u64, other_route: u64) -> String {
        let mut text = String::from("# TYPE duplex_http_request_duration_seconds histogram\n");
        for (le, ok, missing) in [
            ("0.0001", 0, 0),
            ("0.005", fast, 1),
            ("0.01", fast + slow, 1),
            ("+Inf", fast + slow, 1),
        ] {
            for (status, count) in [("200", ok), ("404", missing)] {
                text += &format!(
                    "duplex_http_request_duration_seconds_bucket{{le=\"{le}\",method=\"GET\",route=\"{ONE}\",status=\"{status}\"}} {count}\n"
                );
            }
            text += &format!(
                "duplex_http_request_duration_seconds_bucket{{le=\"{le}\",method=\"POST\",route=\"{ONE}\",status=\"201\"}} {other_route}\n"
            );
        }
        text
    }

    #[test]
    fn the_servers_p99_is_read_from_the_requests_between_two_readings() {
        let before = duration_buckets(&exposition(1000, 0, 7), "GET", ONE);
        assert_eq!(
            before,
            vec![
                (0.0001, 0),
                (0.005, 1001),
                (0.01, 1001),
                (f64::INFINITY, 1001)
            ],
            "summed over statuses, other methods left out"
        );
        // 990 more under 5 ms and 10 between 5 and 10: the 99th percentile is in the first
        // bucket; one more slow request puts it in the second.
        let after = duration_buckets(&exposition(1990, 10, 900), "GET", ONE);
        assert_eq!(p99_bound_ms(&before, &after), Some(5.0));
        let after = duration_buckets(&exposition(1989, 11, 900), "GET", ONE);
        assert_eq!(p99_bound_ms(&before, &after), Some(10.0));
        // 11 of the 1,000 counted between the readings took over 5 ms.
        let over = over_percent(&before, &after, 0.005).expect("a share");
        assert!((over - 1.1).abs() < 1e-9, "{over}");
        assert_eq!(over_percent(&before, &after, 0.002), None, "not a bound");
        assert_eq!(over_percent(&before, &before, 0.005), None);
        // Nothing between the readings, or no such series: no figure.
        assert_eq!(p99_bound_ms(&before, &before), None);
        assert!(duration_buckets(&exposition(1, 1, 1), "PATCH", ONE).is_empty());
    }
}
