//! Real duplex servers for integration tests: [`TestServer::start`] binds 127.0.0.1:0 with its
//! own temporary data folder and serves in-process until stopped or dropped. [`WsClient`] and
//! [`TcpClient`] are thin real clients that speak the wire protocol for socket tests.

mod certificate;
mod clients;
mod proxy;
mod receiver;

use std::collections::HashMap;
use std::net::SocketAddr;

pub use certificate::TestCertificate;
pub use clients::{EVENT_TIMEOUT, TcpClient, WsClient, WsEvent, wait_for};
pub use proxy::TcpProxy;
pub use receiver::WebhookReceiver;

use duplex_server::hub::namespace::{NamespaceConfig, Namespaces};
use duplex_server::{Config, Server, ServerError};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running server on ephemeral ports.
#[derive(Debug)]
pub struct TestServer {
    /// Where HTTP is served.
    pub http_addr: SocketAddr,
    /// Where raw TCP is served.
    pub tcp_addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), ServerError>>>,
    data: TempDir,
    /// What it was started with, to start it again.
    config: Config,
}

/// `[namespaces.X]` tables every test server has: `news` and `feed` take anonymous
/// publications (outside `chat`, `stream` and `game`, the defaults ask for a token).
pub const OPEN_NAMESPACES: &str = "[news]\npublish = \"anyone\"\n[feed]\npublish = \"anyone\"\n";

/// The built-in namespaces with [`OPEN_NAMESPACES`] and then `tables` (the body of
/// `duplex.toml`'s `[namespaces]`, such as `"[alerts]\npublish = \"server\""`) on top.
pub fn namespaces(tables: &str) -> Namespaces {
    let mut configured: HashMap<String, NamespaceConfig> =
        toml::from_str(OPEN_NAMESPACES).expect("valid test namespaces");
    let extra: HashMap<String, NamespaceConfig> =
        toml::from_str(tables).expect("valid namespace tables");
    configured.extend(extra);
    Namespaces::new(&configured).expect("valid namespaces")
}

/// An HS256 connection token signed with `secret`, with these claims (`sub`, `exp`, …).
pub fn hs256_token(secret: &str, claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("an HS256 token encodes")
}

/// A PostgreSQL store URL with a schema of its own (created by the store on open), from
/// `DUPLEX_TEST_POSTGRES`; `None` when that is unset (the caller says it skipped).
pub fn postgres_store() -> Option<String> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let base = std::env::var("DUPLEX_TEST_POSTGRES").ok()?;
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let schema = format!("duplex_test_{}_{n}_{nanos}", std::process::id());
    let separator = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{separator}options[search_path]={schema}"))
}

/// A Redis broker URL with a key prefix of its own (so tests sharing one Redis never see each
/// other's channels), from `DUPLEX_TEST_REDIS`; `None` when that is unset (the caller says it
/// skipped). Servers started with the same URL form one cluster.
pub fn redis_broker() -> Option<String> {
    broker_from("DUPLEX_TEST_REDIS")
}

/// A NATS (JetStream) broker URL with a prefix of its own, from `DUPLEX_TEST_NATS`, as
/// [`redis_broker`].
pub fn nats_broker() -> Option<String> {
    broker_from("DUPLEX_TEST_NATS")
}

fn broker_from(variable: &str) -> Option<String> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let base = std::env::var(variable).ok()?;
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let separator = if base.contains('?') { '&' } else { '?' };
    Some(format!(
        "{base}{separator}prefix=duplex_test_{}_{n}_{nanos}",
        std::process::id()
    ))
}

impl TestServer {
    /// Starts a server with the default configuration on loopback port 0, plus the
    /// [`OPEN_NAMESPACES`] that tests publish to without a token.
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after `configure` adjusts the default test configuration.
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> TestServer {
        let data = tempfile::tempdir().expect("a temporary folder for the test's data");
        let mut config = Config {
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            tcp: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data.path().to_owned(),
            namespaces: namespaces(""),
            ..Config::default()
        };
        configure(&mut config);
        Self::run_in(data, config).await
    }

    async fn run_in(data: TempDir, config: Config) -> TestServer {
        let server = Server::bind(config.clone())
            .await
            .expect("the test server binds");
        let http_addr = server.http_addr();
        let tcp_addr = server.tcp_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        TestServer {
            http_addr,
            tcp_addr,
            shutdown,
            task: Some(task),
            data,
            config,
        }
    }

    /// Stops the server gracefully and starts it again on the same data folder and
    /// configuration (on new ports, as after a restart behind a load balancer: put a
    /// [`TcpProxy`] in front and [`TcpProxy::retarget`] it).
    pub async fn restart(mut self) -> TestServer {
        self.shutdown.cancel();
        let task = self.task.take().expect("the server runs");
        task.await
            .expect("the server task does not panic")
            .expect("the server stops cleanly");
        let data = std::mem::replace(
            &mut self.data,
            tempfile::tempdir().expect("a temporary folder"),
        );
        Self::run_in(data, self.config.clone()).await
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http_addr)
    }

    /// `ws://127.0.0.1:PORT/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.http_addr)
    }

    /// Connects a WebSocket client and reads its `connected` frame.
    pub async fn ws(&self) -> WsClient {
        WsClient::connect(&self.ws_url()).await
    }

    /// Connects a raw TCP client (line mode) and reads its `connected` frame.
    pub async fn tcp(&self) -> TcpClient {
        TcpClient::connect(self.tcp_addr).await
    }

    /// The value of a counter or gauge in `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let url = self.url("/metrics");
        let text = clients::http_get(&url).await;
        text.lines()
            .find_map(|line| {
                let (key, value) = line.rsplit_once(' ')?;
                (key == name).then(|| value.parse().ok())?
            })
            .unwrap_or(0.0)
    }

    /// The server's data folder.
    pub fn data_dir(&self) -> &std::path::Path {
        self.data.path()
    }

    /// The token that shuts the server down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Shuts the server down gracefully and waits for it to finish.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        self.shutdown.cancel();
        let task = self.task.take().expect("stop runs once");
        task.await.expect("the server task does not panic")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
