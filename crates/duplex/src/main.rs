//! The `duplex` command: `duplex serve` runs the server, `duplex bench` measures one, and the
//! client commands (`records`, `pub`, `sub`, `request`, `presence`, `chat`) talk to one.

mod bench;
mod cli;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use duplex_server::config::ByteSize;
use duplex_server::{Config, ConfigLayer, Server};
use tokio_util::sync::CancellationToken;

/// jemalloc rather than glibc's malloc. With glibc, a task's memory freed on another worker
/// thread than the one that allocated it takes that arena's lock: two threads serving records
/// met on it on every listing (a `futex` in `malloc` and `realloc`, seen with `perf`). jemalloc
/// gave records 10–35% more requests per second at the same idle memory per connection;
/// mimalloc gave the same speed but 0.4 KiB more per idle connection and 10 MiB more at start
/// (docs/benchmarks.md, "The allocator; one layer for the middleware").
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// One server for HTTP and sockets.
#[derive(Debug, Parser)]
#[command(name = "duplex", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (HTTP and WebSocket, raw TCP) on the embedded defaults or as configured.
    Serve(ServeArgs),
    /// Measure a server: fan-out throughput and latency, connection memory.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Records over HTTP: create, get, list, update, delete.
    Records {
        #[command(flatten)]
        remote: cli::Remote,
        #[command(subcommand)]
        command: cli::RecordsCommand,
    },
    /// Publish on a channel: DATA is JSON (or text, sent as a JSON string).
    Pub {
        #[command(flatten)]
        remote: cli::Remote,
        /// The channel, namespace:name.
        channel: String,
        /// The data.
        data: String,
        /// Name the publication with this key (a UUID, say): running the same command again
        /// within 2 minutes prints the first publication's position (`replayed`) instead of
        /// publishing twice. For scripts that retry.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Follow a channel: one JSON line per event; reconnects and resumes by itself.
    Sub {
        #[command(flatten)]
        remote: cli::Remote,
        /// The channel, namespace:name.
        channel: String,
        /// Replay what was published after this offset first (with --epoch).
        #[arg(long)]
        since: Option<u64>,
        /// The epoch of --since.
        #[arg(long)]
        epoch: Option<String>,
    },
    /// Ask a connected client (by connection id) and print its reply.
    Request {
        #[command(flatten)]
        remote: cli::Remote,
        /// The connection id (from `GET /api/connections` or the client itself).
        connection: String,
        /// The request's data: JSON, or text sent as a JSON string.
        data: String,
        /// How long to wait for the answer, e.g. 5s.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// Who is in a channel (namespaces with presence).
    Presence {
        #[command(flatten)]
        remote: cli::Remote,
        /// The channel, namespace:name.
        channel: String,
    },
    /// Chat in a room from the terminal: recent history, live messages, who is there.
    Chat {
        #[command(flatten)]
        remote: cli::Remote,
        /// The room (`lobby` means `chat:lobby`; a full channel name works too).
        room: String,
        /// Your name in the room.
        #[arg(long)]
        name: String,
    },
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    duplex_server::config::parse_duration(text)
        .ok_or_else(|| format!("{text:?} is not a duration such as 500ms, 5s or 2m"))
}

/// Flags override `DUPLEX_*` variables, which override the config file, which overrides the
/// defaults; every field is optional so a missing one falls through to the next layer.
#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// A TOML config file (default: ./duplex.toml when it exists).
    #[arg(long, env = "DUPLEX_CONFIG")]
    config: Option<PathBuf>,
    /// HTTP and WebSocket address [default: 127.0.0.1:8080].
    #[arg(long, env = "DUPLEX_HTTP")]
    http: Option<std::net::SocketAddr>,
    /// Raw TCP address [default: 127.0.0.1:7070].
    #[arg(long, env = "DUPLEX_TCP")]
    tcp: Option<std::net::SocketAddr>,
    /// Folder for local data [default: ./duplex-data].
    #[arg(long, env = "DUPLEX_DATA")]
    data: Option<PathBuf>,
    /// Store URL [default: sqlite://DATA/duplex.db].
    #[arg(long, env = "DUPLEX_STORE")]
    store: Option<String>,
    /// Broker between nodes: memory (one node) or redis://host:port[?prefix=NAME]
    /// [default: memory].
    #[arg(long, env = "DUPLEX_BROKER")]
    broker: Option<String>,
    /// This node's id in the registry [default: random].
    #[arg(long, env = "DUPLEX_NODE_ID")]
    node_id: Option<String>,
    /// How long presence entries and node registrations live without a heartbeat, e.g. 30s
    /// [default: 30s].
    #[arg(long, env = "DUPLEX_PRESENCE_TTL")]
    presence_ttl: Option<String>,
    /// Largest request body, e.g. 1MiB [default: 1MiB].
    #[arg(long, env = "DUPLEX_MAX_BODY")]
    max_body: Option<ByteSize>,
    /// How long shutdown waits for in-flight requests, e.g. 10s [default: 10s].
    #[arg(long, env = "DUPLEX_SHUTDOWN_GRACE")]
    shutdown_grace: Option<String>,
    /// Key the server API requires as `Authorization: Bearer KEY` [default: none].
    #[arg(long, env = "DUPLEX_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// HS256 secret of connection tokens (JWT), at least 16 characters [default: none].
    #[arg(long, env = "DUPLEX_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Browser origins allowed for WebSockets, event streams and CORS (comma-separated; `*`
    /// for any) [default: same-origin only].
    #[arg(
        long = "allowed-origins",
        env = "DUPLEX_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    allowed_origins: Vec<String>,
    /// PEM public key (EC P-256 → ES256, RSA → RS256) tokens are checked against, instead of a
    /// secret.
    #[arg(long, env = "DUPLEX_JWT_PUBLIC_KEY")]
    jwt_public_key: Option<PathBuf>,
    /// PEM certificate chain: with --tls-key, HTTPS/wss:// and TLS on the raw TCP port.
    #[arg(long, env = "DUPLEX_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "DUPLEX_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Serve the web console at / (/console/) [default: on].
    #[arg(long, env = "DUPLEX_CONSOLE", value_enum)]
    console: Option<Switch>,
    /// Serve the example applications at /examples/ [default: on].
    #[arg(long, env = "DUPLEX_EXAMPLES", value_enum)]
    examples: Option<Switch>,
    /// Log format.
    #[arg(long, env = "DUPLEX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
}

/// A feature turned on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Switch {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Pretty,
}

impl ServeArgs {
    fn resolve(self) -> anyhow::Result<Config> {
        let file = match self.config {
            Some(path) => Some(path),
            None => Some(PathBuf::from("duplex.toml")).filter(|p| p.exists()),
        };
        let flags = ConfigLayer {
            http: self.http,
            tcp: self.tcp,
            data: self.data,
            store: self.store,
            broker: self.broker,
            node_id: self.node_id,
            presence_ttl: self.presence_ttl,
            max_body: self.max_body,
            shutdown_grace: self.shutdown_grace,
            api_key: self.api_key,
            jwt_secret: self.jwt_secret,
            jwt_public_key: self.jwt_public_key,
            allowed_origins: (!self.allowed_origins.is_empty()).then_some(self.allowed_origins),
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            console: self.console.map(|s| s == Switch::On),
            examples: self.examples.map(|s| s == Switch::On),
            ..ConfigLayer::default()
        };
        Ok(Config::resolve(flags, file.as_deref())?)
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DUPLEX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

/// Cancels `token` on the first SIGINT or SIGTERM.
fn cancel_on_signal(token: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
        }
        token.cancel();
    });
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let config = args.resolve()?;
    let server = Server::bind(config).await?;
    // One plain line on stdout with the bound address, for people and for scripts (port 0).
    let (scheme, tcp) = if server.config().tls.is_some() {
        ("https", "raw TCP with TLS")
    } else {
        ("http", "raw TCP")
    };
    println!(
        "duplex {} serving HTTP on {scheme}://{} and {tcp} on {}",
        env!("CARGO_PKG_VERSION"),
        server.http_addr(),
        server.tcp_addr()
    );
    // The broker's kind only: its URL may carry a password.
    let broker = server
        .config()
        .broker
        .as_deref()
        .and_then(|url| url.split_once("://").map(|(scheme, _)| scheme))
        .unwrap_or("memory");
    tracing::info!(
        http = %server.http_addr(),
        tcp = %server.tcp_addr(),
        store = %server.config().store_url(),
        broker,
        node = server.node_id(),
        "listening"
    );
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone())?;
    server.run(shutdown).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
        Command::Bench(command) => bench::run(command).await,
        Command::Records { remote, command } => cli::records(&remote, command).await,
        Command::Pub {
            remote,
            channel,
            data,
            idempotency_key,
        } => cli::publish(&remote, &channel, &data, idempotency_key.as_deref()).await,
        Command::Sub {
            remote,
            channel,
            since,
            epoch,
        } => cli::subscribe(&remote, &channel, since, epoch).await,
        Command::Request {
            remote,
            connection,
            data,
            timeout,
        } => cli::request(&remote, &connection, &data, timeout).await,
        Command::Presence { remote, channel } => cli::presence(&remote, &channel).await,
        Command::Chat { remote, room, name } => cli::chat(&remote, &room, &name).await,
    }
}
