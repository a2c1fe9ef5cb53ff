//! Chaos across nodes: the soak's clients and checker over several nodes sharing a broker of
//! the run's own (Redis or NATS, on a private port), while the run kills a node with SIGKILL
//! and restarts it, cuts a node's link to the broker for a while, restarts the broker with
//! SIGKILL, and pauses it with SIGSTOP, at random moments. Every client checks what it
//! receives as in the soak: every acknowledged publication reaches every client that stayed
//! subscribed or resumed, unless the server said `recovered: false`; never a silent gap, never
//! a repeat; at the end (everything healed, publishers stopped) every connected client has
//! what was acknowledged last in its channel.

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
    task: tokio::task::JoinHandle<()>,
}

impl LinkProxy {
    async fn start(target: u16) -> anyhow::Result<LinkProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let down = Arc::new(AtomicBool::new(false));
        let (cut, _) = watch::channel(0u64);
        let task = tokio::spawn({
            let (down, cut) = (down.clone(), cut.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if down.load(Ordering::SeqCst) {
                        continue;
                    }
                    let mut cut = cut.subscribe();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await
                        else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
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
    child: Option<Child>,
}

impl NodeProcess {
    async fn start(exe: &PathBuf, id: String, broker_url: String) -> anyhow::Result<NodeProcess> {
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
            child: None,
        };
        node.spawn(exe).await?;
        Ok(node)
    }

    async fn spawn(&mut self, exe: &PathBuf) -> anyhow::Result<()> {
        let mut child = Command::new(exe)
            .args([
                "serve",
                "--http",
                &self.node.http_addr,
                "--tcp",
                &self.node.tcp_addr,
            ])
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
        nodes.push(NodeProcess::start(&options.exe, format!("chaos-{index}"), url).await?);
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
    })
    .await?;

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
        let what = match rng.u8(..4) {
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
        failures,
    })
}
