//! Chaos across nodes: the soak's clients and checker over several nodes sharing a broker of
//! the run's own (Redis or NATS, on a private port), while the run kills a node with SIGKILL
//! and restarts it, cuts a node's link to the broker for a while, makes a node's connections to
//! the broker go dark (no reset, no close: a NAT or a firewall forgot them), restarts the
//! broker with SIGKILL, and pauses it with SIGSTOP, at random moments. Every client checks what it
//! receives as in the soak: every acknowledged publication reaches every client that stayed
//! subscribed or resumed, unless the server said `recovered: false`; never a silent gap, never
//! a repeat; at the end (everything healed, publishers stopped) every connected client has
//! what was acknowledged last in its channel.
//!
//! With a shared PostgreSQL store (`store`), writers also update a few records through random
//! nodes with `If-Match`, and each record's history of versions is checked: no two writes
//! succeeded from the same version (no lost update), each success moved the version by one,
//! and the final version is what the successes (and the writes whose answer was lost to a
//! fault) account for.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::server::{BENCH_CONFIG, first_line_address};
use crate::soak::{Load, LoadCounts, Node, SoakOptions};

/// The broker a chaos run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChaosBroker {
    /// `redis-server`, without persistence: a restart loses everything (new epochs).
    Redis,
    /// `nats-server` with JetStream on disk: a restart keeps the streams.
    Nats,
}

/// What a chaos run does.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// The `duplex` executable for the nodes.
    pub exe: PathBuf,
    /// The broker.
    pub broker: ChaosBroker,
    /// Nodes.
    pub nodes: usize,
    /// How long faults are injected (the run heals and checks after).
    pub duration: Duration,
    /// Clients at once.
    pub clients: usize,
    /// Channels.
    pub channels: usize,
    /// Publications per second over all channels, each to the next node.
    pub rate: u32,
    /// The longest client session.
    pub max_session: Duration,
    /// The longest calm between two faults (each calm a random part of it, at least 1 s).
    pub max_calm: Duration,
    /// The random seed: the same seed, the same faults at the same moments.
    pub seed: u64,
    /// How long after the last fault healed and the publishers stopped every connected client
    /// must have caught up.
    pub settle: Duration,
    /// A PostgreSQL URL the nodes share as their store, for the records check; `None`: each
    /// node keeps its own SQLite file and records are not checked.
    pub store: Option<String>,
}

/// One fault.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosEvent {
    /// Seconds since the start.
    pub at_seconds: f64,
    /// What was done.
    pub what: String,
}

/// What a chaos run found.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    /// The broker.
    pub broker: ChaosBroker,
    /// Nodes.
    pub nodes: usize,
    /// Seconds it ran, healing included.
    pub seconds: f64,
    /// The faults, in order.
    pub events: Vec<ChaosEvent>,
    /// What the clients and publisher counted.
    pub counts: LoadCounts,
    /// The records check, with a shared store.
    pub records: Option<RecordsCheck>,
    /// Why the run failed; empty when it passed.
    pub failures: Vec<String>,
}

impl ChaosReport {
    /// Whether every check held.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// A free loopback port (bound and released: good enough for a run of our own).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until something listens on `port`.
async fn listening(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            bail!("{what} does not listen on {port}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The run's broker process.
struct BrokerProcess {
    kind: ChaosBroker,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl BrokerProcess {
    async fn start(kind: ChaosBroker) -> anyhow::Result<BrokerProcess> {
        let mut broker = BrokerProcess {
            kind,
            port: free_port()?,
            dir: tempfile::tempdir()?,
            child: None,
        };
        broker.spawn().await?;
        Ok(broker)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let port = self.port.to_string();
        let mut command = match self.kind {
            ChaosBroker::Redis => {
                let mut command = Command::new("redis-server");
                command
                    .args(["--port", &port, "--bind", "127.0.0.1"])
                    .args(["--save", "", "--appendonly", "no"]);
                command
            }
            ChaosBroker::Nats => {
                let mut command = Command::new("nats-server");
                command
                    .args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
                    .arg(self.dir.path());
                command
            }
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start the {:?} broker", self.kind))?;
        self.child = Some(child);
        listening(self.port, "the broker").await
    }

    fn url(&self, port: u16) -> String {
        match self.kind {
            ChaosBroker::Redis => format!("redis://127.0.0.1:{port}?prefix=chaos"),
            ChaosBroker::Nats => format!("nats://127.0.0.1:{port}?prefix=chaos"),
        }
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.ok();
        }
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .context("the broker is not running")?;
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill {signal} {pid} failed");
        }
        Ok(())
    }
}

/// A proxy between a node and the broker, to cut that node's link.
struct LinkProxy {
    port: u16,
    down: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    dark: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl LinkProxy {
    async fn start(target: u16) -> anyhow::Result<LinkProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let down = Arc::new(AtomicBool::new(false));
        let (cut, _) = watch::channel(0u64);
        let (dark, _) = watch::channel(0u64);
        let task = tokio::spawn({
            let (down, cut, dark) = (down.clone(), cut.clone(), dark.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if down.load(Ordering::SeqCst) {
                        continue;
                    }
                    let mut cut = cut.subscribe();
                    let mut dark = dark.subscribe();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await
                        else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
                            _ = cut.changed() => return,
                            _ = dark.changed() => {}
                        }
                        // Dark: the broker's side closes, the node's stays open and hears
                        // nothing; what the node sends is swallowed.
                        drop(outbound);
                        let swallow = async {
                            use tokio::io::AsyncReadExt as _;
                            let mut buffer = vec![0u8; 16 * 1024];
                            while matches!(inbound.read(&mut buffer).await, Ok(n) if n > 0) {}
                            std::future::pending::<()>().await;
                        };
                        tokio::select! {
                            () = swallow => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            }
        });
        Ok(LinkProxy {
            port,
            down,
            cut,
            dark,
            task,
        })
    }

    /// Cuts every connection and refuses new ones until [`LinkProxy::heal`].
    fn sever(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.cut.send_modify(|generation| *generation += 1);
    }

    fn heal(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    /// The open connections go dark for good (new ones are forwarded as usual): only the
    /// node's own liveness checks can tell.
    fn darken(&self) {
        self.dark.send_modify(|generation| *generation += 1);
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.sever();
        self.task.abort();
    }
}

/// A node: a `duplex serve` on fixed ports (so that it comes back where clients look for it),
/// with its data folder kept across restarts.
struct NodeProcess {
    id: String,
    node: Node,
    data: tempfile::TempDir,
    broker_url: String,
    store: Option<String>,
    child: Option<Child>,
}

impl NodeProcess {
    async fn start(
        exe: &PathBuf,
        id: String,
        broker_url: String,
        store: Option<String>,
    ) -> anyhow::Result<NodeProcess> {
        let data = tempfile::tempdir()?;
        std::fs::write(data.path().join("duplex.toml"), BENCH_CONFIG)?;
        let mut node = NodeProcess {
            id,
            node: Node {
                http_addr: format!("127.0.0.1:{}", free_port()?),
                tcp_addr: format!("127.0.0.1:{}", free_port()?),
            },
            data,
            broker_url,
            store,
            child: None,
        };
        node.spawn(exe).await?;
        Ok(node)
    }

    async fn spawn(&mut self, exe: &PathBuf) -> anyhow::Result<()> {
        let mut command = Command::new(exe);
        command.args([
            "serve",
            "--http",
            &self.node.http_addr,
            "--tcp",
            &self.node.tcp_addr,
        ]);
        if let Some(store) = &self.store {
            command.args(["--store", store]);
        }
        let mut child = command
            .arg("--config")
            .arg(self.data.path().join("duplex.toml"))
            .arg("--data")
            .arg(self.data.path())
            .args(["--broker", &self.broker_url, "--node-id", &self.id])
            .env("DUPLEX_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start node {}", self.id))?;
        first_line_address(&mut child, &format!("node {}", self.id)).await?;
        self.child = Some(child);
        Ok(())
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.ok();
        }
    }

    async fn ready(&self, http: &reqwest::Client) -> bool {
        let url = format!("http://{}/readyz", self.node.http_addr);
        matches!(http.get(&url).send().await, Ok(r) if r.status().is_success())
    }
}

/// Runs a chaos run, calling `progress` with each fault as it happens.
pub async fn run_chaos(
    options: &ChaosOptions,
    progress: impl Fn(&ChaosEvent),
) -> anyhow::Result<ChaosReport> {
    if options.nodes < 2 {
        bail!("chaos across nodes needs at least two nodes");
    }
    let started = Instant::now();
    let mut broker = BrokerProcess::start(options.broker).await?;
    let mut proxies = Vec::new();
    let mut nodes = Vec::new();
    for index in 0..options.nodes {
        let proxy = LinkProxy::start(broker.port).await?;
        let url = broker.url(proxy.port);
        let id = format!("chaos-{index}");
        nodes.push(NodeProcess::start(&options.exe, id, url, options.store.clone()).await?);
        proxies.push(proxy);
    }
    let probe = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let load = Load::start(&SoakOptions {
        nodes: nodes.iter().map(|n| n.node.clone()).collect(),
        pid: 0,
        duration: options.duration,
        clients: options.clients,
        channels: options.channels,
        rate: options.rate,
        sample_every: options.duration,
        warmup: Duration::ZERO,
        max_session: options.max_session,
        settle: options.settle,
    })
    .await?;
    let (stop_writers, writers_stop) = watch::channel(false);
    let writers = options.store.as_ref().map(|_| {
        RecordWriters::start(
            nodes.iter().map(|n| n.node.http_addr.clone()).collect(),
            options.seed,
            writers_stop,
        )
    });

    let mut rng = fastrand::Rng::with_seed(options.seed);
    let mut events = Vec::new();
    let end = started + options.duration;
    let between = |rng: &mut fastrand::Rng, low: u64, high: u64| {
        Duration::from_millis(rng.u64(low..=high.max(low)))
    };
    loop {
        let calm = between(&mut rng, 1000, options.max_calm.as_millis() as u64);
        if Instant::now() + calm >= end {
            break;
        }
        tokio::time::sleep(calm).await;
        let outage = between(&mut rng, 500, 3000);
        let index = rng.usize(..options.nodes);
        let what = match rng.u8(..5) {
            0 => {
                nodes[index].kill().await;
                tokio::time::sleep(outage).await;
                nodes[index].spawn(&options.exe).await?;
                format!("node {index} killed (SIGKILL), restarted after {outage:?}")
            }
            1 => {
                proxies[index].sever();
                tokio::time::sleep(outage).await;
                proxies[index].heal();
                format!("node {index} cut off the broker for {outage:?}")
            }
            2 => {
                broker.kill().await;
                tokio::time::sleep(outage).await;
                broker.spawn().await?;
                format!("broker killed (SIGKILL), restarted after {outage:?}")
            }
            4 => {
                proxies[index].darken();
                format!("node {index}'s connections to the broker went dark")
            }
            _ => {
                broker.signal("-STOP")?;
                tokio::time::sleep(outage).await;
                broker.signal("-CONT")?;
                format!("broker paused (SIGSTOP) for {outage:?}")
            }
        };
        let event = ChaosEvent {
            at_seconds: started.elapsed().as_secs_f64(),
            what,
        };
        progress(&event);
        events.push(event);
    }

    // Heal: every node up and linked before the last check.
    let mut failures = Vec::new();
    let healed_by = Instant::now() + Duration::from_secs(30);
    for node in &nodes {
        while !node.ready(&probe).await {
            if Instant::now() > healed_by {
                failures.push(format!(
                    "node {} not ready 30 s after the last fault",
                    node.id
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let counts = load.finish().await?.counts();
    stop_writers.send_replace(true);
    let records = match writers {
        Some(writers) => {
            let check = writers.finish(&nodes[0].node.http_addr).await?;
            failures.extend(check.failures.iter().cloned());
            Some(check)
        }
        None => None,
    };
    for node in &mut nodes {
        node.kill().await;
    }
    broker.kill().await;
    if counts.violations > 0 {
        failures.push(format!("{} failed checks", counts.violations));
    }
    if counts.published == 0 || counts.delivered == 0 {
        failures.push("nothing was published or delivered".into());
    }
    Ok(ChaosReport {
        broker: options.broker,
        nodes: options.nodes,
        seconds: started.elapsed().as_secs_f64(),
        events,
        counts,
        records,
        failures,
    })
}

/// The records check's findings.
#[derive(Debug, Clone, Serialize)]
pub struct RecordsCheck {
    /// The collection written.
    pub collection: String,
    /// Writes answered 200.
    pub succeeded: u64,
    /// Writes refused with 412 (another write came first).
    pub refused: u64,
    /// Writes whose outcome is unknown (a fault took the answer).
    pub unknown: u64,
    /// What did not hold.
    pub failures: Vec<String>,
}

/// Records the writers share (few, so that their writes race).
const RECORDS: usize = 4;

/// One write's outcome.
#[derive(Debug, Clone)]
enum Outcome {
    /// 200: the record moved from version `from` to `to`, holding `mark`.
    Succeeded { from: u64, to: u64, mark: u64 },
    /// 412: another write came first.
    Refused,
    /// No answer, or a 5xx: it may or may not have been applied.
    Unknown,
}

/// Writers updating a few records through random nodes with `If-Match`.
struct RecordWriters {
    collection: String,
    ids: Vec<String>,
    tasks: Vec<tokio::task::JoinHandle<Vec<(usize, Outcome)>>>,
    http: reqwest::Client,
}

impl RecordWriters {
    fn start(nodes: Vec<String>, seed: u64, stop: watch::Receiver<bool>) -> RecordWriters {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        let collection = format!("chaos_{seed}_{}", fastrand::u32(..));
        let ids: Vec<String> = (0..RECORDS).map(|i| format!("r{i}")).collect();
        let nodes = Arc::new(nodes);
        let tasks = (0..4u64)
            .map(|writer| {
                let (http, nodes, collection, ids, mut stop) = (
                    http.clone(),
                    nodes.clone(),
                    collection.clone(),
                    ids.clone(),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    let mut rng = fastrand::Rng::with_seed(seed ^ (writer << 32));
                    let mut outcomes = Vec::new();
                    // Marks are unique over all writers: the writer's number in the high bits.
                    let mut mark = (writer + 1) << 40;
                    while !*stop.borrow() {
                        let record = rng.usize(..RECORDS);
                        let node = &nodes[rng.usize(..nodes.len())];
                        mark += 1;
                        if let Some(outcome) =
                            write_once(&http, node, &collection, &ids[record], mark).await
                        {
                            outcomes.push((record, outcome));
                        }
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(rng.u64(5..50))) => {}
                            _ = stop.changed() => {}
                        }
                    }
                    outcomes
                })
            })
            .collect();
        RecordWriters {
            collection,
            ids,
            tasks,
            http,
        }
    }

    /// Collects every write and checks each record's history against its final state.
    async fn finish(self, node: &str) -> anyhow::Result<RecordsCheck> {
        let mut outcomes: Vec<Vec<Outcome>> = vec![Vec::new(); RECORDS];
        for task in self.tasks {
            for (record, outcome) in task.await.context("a writer")? {
                outcomes[record].push(outcome);
            }
        }
        let mut check = RecordsCheck {
            collection: self.collection.clone(),
            succeeded: 0,
            refused: 0,
            unknown: 0,
            failures: Vec::new(),
        };
        for (record, outcomes) in outcomes.iter().enumerate() {
            let id = &self.ids[record];
            for outcome in outcomes {
                match outcome {
                    Outcome::Succeeded { .. } => check.succeeded += 1,
                    Outcome::Refused => check.refused += 1,
                    Outcome::Unknown => check.unknown += 1,
                }
            }
            let url = format!(
                "http://{node}/api/collections/{}/records/{id}",
                self.collection
            );
            let response = self.http.get(&url).send().await?;
            let last = if response.status() == reqwest::StatusCode::NOT_FOUND {
                None
            } else {
                let last: serde_json::Value = response.error_for_status()?.json().await?;
                Some((last["version"].as_u64().unwrap_or(0), last["mark"].as_u64()))
            };
            check.failures.extend(check_record(id, outcomes, last));
        }
        Ok(check)
    }
}

/// Checks one record's writes against its final state (`version`, `mark`; `None` when it
/// does not exist): each success moved the version by one, no two succeeded from the same
/// version, the final version is what the successes and the unknown outcomes account for and
/// no lower than any acknowledged, and it holds the mark of the write that made it when that
/// write is known.
fn check_record(id: &str, outcomes: &[Outcome], last: Option<(u64, Option<u64>)>) -> Vec<String> {
    let mut failures = Vec::new();
    let mut froms = std::collections::HashSet::new();
    let (mut succeeded, mut unknown) = (0u64, 0u64);
    let mut newest: Option<(u64, u64)> = None;
    for outcome in outcomes {
        match outcome {
            Outcome::Succeeded { from, to, mark } => {
                succeeded += 1;
                if *to != from + 1 {
                    failures.push(format!("{id}: a write from version {from} made {to}"));
                }
                if !froms.insert(*from) {
                    failures.push(format!("{id}: two writes succeeded from version {from}"));
                }
                if newest.is_none_or(|(version, _)| *to > version) {
                    newest = Some((*to, *mark));
                }
            }
            Outcome::Refused => {}
            Outcome::Unknown => unknown += 1,
        }
    }
    let Some((version, mark)) = last else {
        if succeeded > 0 {
            failures.push(format!("{id}: gone after {succeeded} acknowledged writes"));
        }
        return failures;
    };
    // Created at version 1; each applied write adds one.
    let applied = version.saturating_sub(1);
    if applied < succeeded || applied > succeeded + unknown {
        failures.push(format!(
            "{id}: at version {version} after {succeeded} acknowledged writes and {unknown} unknown"
        ));
    }
    if let Some((to, _)) = newest
        && version < to
    {
        failures.push(format!(
            "{id}: at version {version} after a write was acknowledged making {to}"
        ));
    }
    if let Some((to, expected)) = newest
        && to == version
        && mark != Some(expected)
    {
        failures.push(format!(
            "{id}: version {version} holds mark {mark:?} but the write that made it set {expected}"
        ));
    }
    failures
}

/// Reads a record and writes it with `If-Match` its version; creates it (version 1) when it is
/// missing. `None` when nothing was written (a failed read, or the create).
async fn write_once(
    http: &reqwest::Client,
    node: &str,
    collection: &str,
    id: &str,
    mark: u64,
) -> Option<Outcome> {
    let url = format!("http://{node}/api/collections/{collection}/records/{id}");
    let read = http.get(&url).send().await.ok()?;
    let from = match read.status().as_u16() {
        200 => read.json::<serde_json::Value>().await.ok()?["version"].as_u64()?,
        404 => {
            // `If-None-Match: *`: of racing creates, one makes it and the others get 412.
            let _ = http
                .put(&url)
                .header("If-None-Match", "*")
                .json(&serde_json::json!({"mark": 0}))
                .send()
                .await;
            return None;
        }
        _ => return None,
    };
    let written = http
        .patch(&url)
        .header("If-Match", format!("\"{from}\""))
        .json(&serde_json::json!({"mark": mark}))
        .send()
        .await;
    Some(match written {
        Ok(response) if response.status().is_success() => {
            match response.json::<serde_json::Value>().await {
                Ok(record) => Outcome::Succeeded {
                    from,
                    to: record["version"].as_u64().unwrap_or(0),
                    mark,
                },
                Err(_) => Outcome::Unknown,
            }
        }
        Ok(response) if response.status() == reqwest::StatusCode::PRECONDITION_FAILED => {
            Outcome::Refused
        }
        Ok(response) if response.status().is_client_error() => Outcome::Refused,
        _ => Outcome::Unknown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(from: u64, mark: u64) -> Outcome {
        Outcome::Succeeded {
            from,
            to: from + 1,
            mark,
        }
    }

    #[test]
    fn a_consistent_history_passes() {
        let history = [
            ok(1, 10),
            Outcome::Refused,
            ok(2, 11),
            Outcome::Unknown,
            ok(4, 12),
        ];
        // The unknown write was applied (version 3 → 4), then the last success made 5.
        assert!(check_record("r", &history, Some((5, Some(12)))).is_empty());
        // A final version below one a write was acknowledged making: that write was lost.
        assert!(!check_record("r", &history, Some((4, Some(12)))).is_empty());
    }

    #[test]
    fn lost_updates_and_wrong_states_are_found() {
        // Two writes acknowledged from the same version: one was lost.
        let lost = check_record("r", &[ok(1, 10), ok(1, 11)], Some((2, Some(11))));
        assert!(lost.iter().any(|f| f.contains("two writes")), "{lost:?}");
        // The final state says one write where two were acknowledged.
        let short = check_record("r", &[ok(1, 10), ok(2, 11)], Some((2, Some(10))));
        assert!(
            short.iter().any(|f| f.contains("acknowledged")),
            "{short:?}"
        );
        // The version the last write made holds someone else's data.
        let wrong = check_record("r", &[ok(1, 10), ok(2, 11)], Some((3, Some(10))));
        assert!(wrong.iter().any(|f| f.contains("holds mark")), "{wrong:?}");
        // A jump of two versions in one write.
        let jump = check_record(
            "r",
            &[Outcome::Succeeded {
                from: 1,
                to: 3,
                mark: 1,
            }],
            Some((3, Some(1))),
        );
        assert!(jump.iter().any(|f| f.contains("made 3")), "{jump:?}");
        assert!(!check_record("r", &[ok(1, 10)], None).is_empty());
    }
}
