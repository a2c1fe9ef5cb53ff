//! One [`Config`] for the whole server, resolved from layers: command-line flags first, then
//! `DUPLEX_*` environment variables (both parsed by the binary into a [`ConfigLayer`]), then the
//! optional `duplex.toml`, then the built-in defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::collections::HashMap;

use serde::Deserialize;

pub use crate::units::{ByteSize, parse_duration, parse_size};

use crate::api_keys::{ApiKey, ApiKeys};
use crate::hub::HubLimits;
use crate::hub::namespace::{CollectionRule, NamespaceConfig, Namespaces};
use crate::socket::SocketLimits;

/// Everything a server needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where HTTP (and WebSocket) is served. Port 0 picks a free port.
    pub http: SocketAddr,
    /// Where raw TCP clients connect. Port 0 picks a free port.
    pub tcp: SocketAddr,
    /// The folder for local data (the SQLite file).
    pub data_dir: PathBuf,
    /// The store URL; `None` means `sqlite://{data_dir}/duplex.db`.
    pub store: Option<String>,
    /// The broker between nodes: `None` or `memory` for one node, `redis://host:port` (with
    /// `?prefix=NAME` to share one Redis between clusters) for several.
    pub broker: Option<String>,
    /// This node's id in the registry; `None` picks a random one.
    pub node_id: Option<String>,
    /// How long a node's presence entries and registration live without its heartbeat (a
    /// killed node's clients leave presence within this).
    pub presence_ttl: Duration,
    /// The largest request body accepted, in bytes.
    pub max_body: usize,
    /// How long shutdown waits for in-flight requests before it gives up on them.
    pub shutdown_grace: Duration,
    /// How long a client may take to send a request's head before its connection is closed.
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request's body once its head arrived (408).
    pub body_read_timeout: Duration,
    /// How long a write to a client (HTTP response, event stream, WebSocket, raw TCP) may make
    /// no progress before the connection is closed: a client that stopped reading.
    pub write_timeout: Duration,
    /// Per-connection socket limits.
    pub sockets: SocketLimits,
    /// What the hub holds in total: channels, queued bytes, history bytes.
    pub hub: HubLimits,
    /// Namespace rules, with the collections' read and write rules.
    pub namespaces: Namespaces,
    /// A key with every scope: the server API (`/api/channels`, `/api/connections`,
    /// `/api/users`) then requires `Authorization: Bearer KEY` (or a scoped key of
    /// [`Config::api_keys`]); with no key at all it is open (bind to loopback then).
    pub api_key: Option<String>,
    /// Named keys with scopes (`[[api_keys]]` in `duplex.toml`).
    pub api_keys: Vec<ApiKey>,
    /// The HS256 secret connection tokens are signed with; `None` refuses tokens.
    pub jwt_secret: Option<String>,
    /// A PEM public key (EC P-256 for ES256, or RSA for RS256) tokens are checked against,
    /// instead of a secret.
    pub jwt_public_key: Option<PathBuf>,
    /// Browser origins allowed to open WebSockets and event streams and to call the HTTP API
    /// cross-origin (CORS). Empty: same-origin only. `"*"`: any.
    pub allowed_origins: Vec<String>,
    /// PEM certificate chain and private key: with both, both ports speak TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Whether the web console is served at `/` (`/console/`).
    pub console: bool,
    /// Whether the example applications are served at `/examples/`.
    pub examples: bool,
    /// `[hooks]`: the application's backend decides (none by default).
    pub hooks: Option<crate::hooks::HookSettings>,
    /// `[webhooks]`: the application's backend is told (none by default).
    pub webhooks: Option<crate::webhooks::WebhookSettings>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tcp: SocketAddr::from(([127, 0, 0, 1], 7070)),
            data_dir: PathBuf::from("./duplex-data"),
            store: None,
            broker: None,
            node_id: None,
            presence_ttl: Duration::from_secs(30),
            max_body: 1024 * 1024,
            shutdown_grace: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            sockets: SocketLimits {
                max_frame: 64 * 1024,
                queue_size: 1024,
                queue_bytes: 1024 * 1024,
                max_subscriptions: 1024,
                ping_interval: Duration::from_secs(25),
                idle_timeout: Duration::from_secs(60),
                publish_rate: 1000,
                publish_burst: 2000,
                max_connections: 100_000,
                max_connections_per_ip: 10_000,
            },
            hub: HubLimits::default(),
            namespaces: Namespaces::default(),
            api_key: None,
            api_keys: Vec::new(),
            jwt_secret: None,
            jwt_public_key: None,
            allowed_origins: Vec::new(),
            tls: None,
            console: true,
            examples: true,
            hooks: None,
            webhooks: None,
        }
    }
}

impl Config {
    /// The store URL in effect.
    pub fn store_url(&self) -> String {
        match &self.store {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("duplex.db").display()),
        }
    }

    /// Resolves a configuration: `overrides` (flags and environment) win over the file at
    /// `file` (when given), which wins over the defaults.
    pub fn resolve(overrides: ConfigLayer, file: Option<&Path>) -> Result<Config, ConfigError> {
        let file_layer = match file {
            Some(path) => ConfigLayer::from_file(path)?,
            None => ConfigLayer::default(),
        };
        overrides.over(file_layer).over_defaults()
    }
}

/// One source of settings, every field optional so that a missing one falls through to the
/// next layer. `duplex.toml` is read into this type; the binary fills it from flags and env.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct ConfigLayer {
    /// See [`Config::http`].
    pub http: Option<SocketAddr>,
    /// See [`Config::tcp`].
    pub tcp: Option<SocketAddr>,
    /// See [`Config::data_dir`].
    #[serde(alias = "data_dir")]
    pub data: Option<PathBuf>,
    /// See [`Config::store`].
    pub store: Option<String>,
    /// See [`Config::broker`].
    pub broker: Option<String>,
    /// See [`Config::node_id`].
    pub node_id: Option<String>,
    /// See [`Config::presence_ttl`], as text such as `"30s"`.
    pub presence_ttl: Option<String>,
    /// See [`Config::max_body`]: bytes, or text such as `"1MiB"`.
    pub max_body: Option<ByteSize>,
    /// See [`Config::shutdown_grace`], as text such as `"10s"`.
    pub shutdown_grace: Option<String>,
    /// See [`Config::header_read_timeout`], as text such as `"10s"`.
    pub header_read_timeout: Option<String>,
    /// See [`SocketLimits::max_frame`].
    pub max_frame: Option<ByteSize>,
    /// See [`SocketLimits::queue_size`].
    pub queue_size: Option<usize>,
    /// See [`SocketLimits::queue_bytes`].
    pub queue_bytes: Option<ByteSize>,
    /// See [`HubLimits::max_queued_bytes`].
    pub max_queued_bytes: Option<ByteSize>,
    /// See [`HubLimits::max_history_bytes`].
    pub max_history_bytes: Option<ByteSize>,
    /// See [`HubLimits::max_channels`].
    pub max_channels: Option<usize>,
    /// See [`SocketLimits::max_subscriptions`].
    pub max_subscriptions: Option<usize>,
    /// See [`SocketLimits::ping_interval`], as text such as `"25s"`.
    pub ping_interval: Option<String>,
    /// See [`SocketLimits::idle_timeout`], as text such as `"60s"`.
    pub idle_timeout: Option<String>,
    /// See [`SocketLimits::publish_rate`].
    pub publish_rate: Option<u32>,
    /// See [`SocketLimits::publish_burst`].
    pub publish_burst: Option<u32>,
    /// See [`SocketLimits::max_connections`].
    pub max_connections: Option<usize>,
    /// See [`SocketLimits::max_connections_per_ip`].
    pub max_connections_per_ip: Option<usize>,
    /// See [`Config::api_key`].
    pub api_key: Option<String>,
    /// See [`Config::jwt_secret`].
    pub jwt_secret: Option<String>,
    /// See [`Config::jwt_public_key`].
    pub jwt_public_key: Option<PathBuf>,
    /// See [`Config::allowed_origins`].
    pub allowed_origins: Option<Vec<String>>,
    /// The PEM certificate chain of [`Config::tls`].
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of [`Config::tls`].
    pub tls_key: Option<PathBuf>,
    /// See [`Config::body_read_timeout`], as text such as `"30s"`.
    pub body_read_timeout: Option<String>,
    /// See [`Config::write_timeout`], as text such as `"30s"`.
    pub write_timeout: Option<String>,
    /// See [`Config::console`].
    pub console: Option<bool>,
    /// See [`Config::examples`].
    pub examples: Option<bool>,
    /// `[namespaces.NAME]` tables (file only).
    #[serde(default)]
    pub namespaces: HashMap<String, NamespaceConfig>,
    /// `[collections.NAME]` read/write rules (file only).
    #[serde(default)]
    pub collections: HashMap<String, CollectionRule>,
    /// `[[api_keys]]` tables (file only).
    #[serde(default)]
    pub api_keys: Vec<ApiKey>,
    /// `[hooks]` (file only).
    #[serde(default)]
    pub hooks: Option<crate::hooks::HooksConfig>,
    /// `[webhooks]` (file only).
    #[serde(default)]
    pub webhooks: Option<crate::webhooks::WebhooksConfig>,
}

impl ConfigLayer {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// This layer, with `lower` filling what it leaves unset.
    pub fn over(self, lower: ConfigLayer) -> ConfigLayer {
        ConfigLayer {
            http: self.http.or(lower.http),
            tcp: self.tcp.or(lower.tcp),
            data: self.data.or(lower.data),
            store: self.store.or(lower.store),
            broker: self.broker.or(lower.broker),
            node_id: self.node_id.or(lower.node_id),
            presence_ttl: self.presence_ttl.or(lower.presence_ttl),
            max_body: self.max_body.or(lower.max_body),
            shutdown_grace: self.shutdown_grace.or(lower.shutdown_grace),
            header_read_timeout: self.header_read_timeout.or(lower.header_read_timeout),
            max_frame: self.max_frame.or(lower.max_frame),
            queue_size: self.queue_size.or(lower.queue_size),
            queue_bytes: self.queue_bytes.or(lower.queue_bytes),
            max_queued_bytes: self.max_queued_bytes.or(lower.max_queued_bytes),
            max_history_bytes: self.max_history_bytes.or(lower.max_history_bytes),
            max_channels: self.max_channels.or(lower.max_channels),
            max_subscriptions: self.max_subscriptions.or(lower.max_subscriptions),
            ping_interval: self.ping_interval.or(lower.ping_interval),
            idle_timeout: self.idle_timeout.or(lower.idle_timeout),
            publish_rate: self.publish_rate.or(lower.publish_rate),
            publish_burst: self.publish_burst.or(lower.publish_burst),
            max_connections: self.max_connections.or(lower.max_connections),
            max_connections_per_ip: self.max_connections_per_ip.or(lower.max_connections_per_ip),
            api_key: self.api_key.or(lower.api_key),
            jwt_secret: self.jwt_secret.or(lower.jwt_secret),
            jwt_public_key: self.jwt_public_key.or(lower.jwt_public_key),
            allowed_origins: self.allowed_origins.or(lower.allowed_origins),
            tls_cert: self.tls_cert.or(lower.tls_cert),
            tls_key: self.tls_key.or(lower.tls_key),
            body_read_timeout: self.body_read_timeout.or(lower.body_read_timeout),
            write_timeout: self.write_timeout.or(lower.write_timeout),
            console: self.console.or(lower.console),
            examples: self.examples.or(lower.examples),
            namespaces: if self.namespaces.is_empty() {
                lower.namespaces
            } else {
                self.namespaces
            },
            collections: if self.collections.is_empty() {
                lower.collections
            } else {
                self.collections
            },
            api_keys: if self.api_keys.is_empty() {
                lower.api_keys
            } else {
                self.api_keys
            },
            hooks: self.hooks.or(lower.hooks),
            webhooks: self.webhooks.or(lower.webhooks),
        }
    }

    fn over_defaults(self) -> Result<Config, ConfigError> {
        let defaults = Config::default();
        let duration = |key: &'static str, text: Option<String>, default: Duration| match text {
            Some(text) => parse_duration(&text).ok_or(ConfigError::Invalid {
                key,
                message: format!("{text:?} is not a duration such as 500ms, 10s or 2m"),
            }),
            None => Ok(default),
        };
        let presence_ttl = duration("presence_ttl", self.presence_ttl, defaults.presence_ttl)?;
        if presence_ttl < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                key: "presence_ttl",
                message: "at least 1s".into(),
            });
        }
        let shutdown_grace = duration(
            "shutdown_grace",
            self.shutdown_grace,
            defaults.shutdown_grace,
        )?;
        let header_read_timeout = duration(
            "header_read_timeout",
            self.header_read_timeout,
            defaults.header_read_timeout,
        )?;
        let body_read_timeout = duration(
            "body_read_timeout",
            self.body_read_timeout,
            defaults.body_read_timeout,
        )?;
        let write_timeout = duration("write_timeout", self.write_timeout, defaults.write_timeout)?;
        // Shorter, a client whose socket is merely full for a moment would be cut off.
        if write_timeout < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                key: "write_timeout",
                message: "at least 1s".into(),
            });
        }
        let sockets = SocketLimits {
            max_frame: self.max_frame.map_or(defaults.sockets.max_frame, |b| b.0),
            queue_size: self.queue_size.unwrap_or(defaults.sockets.queue_size),
            queue_bytes: self
                .queue_bytes
                .map_or(defaults.sockets.queue_bytes, |b| b.0),
            max_subscriptions: self
                .max_subscriptions
                .unwrap_or(defaults.sockets.max_subscriptions),
            ping_interval: duration(
                "ping_interval",
                self.ping_interval,
                defaults.sockets.ping_interval,
            )?,
            idle_timeout: duration(
                "idle_timeout",
                self.idle_timeout,
                defaults.sockets.idle_timeout,
            )?,
            publish_rate: self.publish_rate.unwrap_or(defaults.sockets.publish_rate),
            publish_burst: self.publish_burst.unwrap_or(defaults.sockets.publish_burst),
            max_connections: self
                .max_connections
                .unwrap_or(defaults.sockets.max_connections),
            max_connections_per_ip: self
                .max_connections_per_ip
                .unwrap_or(defaults.sockets.max_connections_per_ip),
        };
        let hub = HubLimits {
            max_channels: self.max_channels.unwrap_or(defaults.hub.max_channels),
            max_queued_bytes: self
                .max_queued_bytes
                .map_or(defaults.hub.max_queued_bytes, |b| b.0),
            max_history_bytes: self
                .max_history_bytes
                .map_or(defaults.hub.max_history_bytes, |b| b.0),
        };
        for (key, value) in [
            ("queue_size", sockets.queue_size),
            ("queue_bytes", sockets.queue_bytes),
            ("max_channels", hub.max_channels),
            ("max_queued_bytes", hub.max_queued_bytes),
            ("max_history_bytes", hub.max_history_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    key,
                    message: "must be at least 1".into(),
                });
            }
        }
        if sockets.publish_rate == 0 {
            return Err(ConfigError::Invalid {
                key: "publish_rate",
                message: "must be at least 1 publication a second".into(),
            });
        }
        let namespaces =
            Namespaces::new(&self.namespaces).map_err(|message| ConfigError::Invalid {
                key: "namespaces",
                message,
            })?;
        let namespaces = namespaces
            .with_collections(&self.collections)
            .map_err(|message| ConfigError::Invalid {
                key: "collections",
                message,
            })?;
        ApiKeys::new(None, &self.api_keys).map_err(|message| ConfigError::Invalid {
            key: "api_keys",
            message,
        })?;
        if self.api_key.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::Invalid {
                key: "api_key",
                message: "an empty API key would let anyone in; leave it unset instead".into(),
            });
        }
        if self.jwt_secret.as_deref().is_some_and(|s| s.len() < 16) {
            return Err(ConfigError::Invalid {
                key: "jwt_secret",
                message: "use at least 16 characters; a short HS256 secret can be guessed offline"
                    .into(),
            });
        }
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid {
                    key: "tls_cert",
                    message: "tls_cert and tls_key go together".into(),
                });
            }
        };
        if self.jwt_secret.is_some() && self.jwt_public_key.is_some() {
            return Err(ConfigError::Invalid {
                key: "jwt_public_key",
                message: "use a JWT secret or a public key, not both".into(),
            });
        }
        let hooks = self
            .hooks
            .map(crate::hooks::HooksConfig::settings)
            .transpose()
            .map_err(|message| ConfigError::Invalid {
                key: "hooks",
                message,
            })?;
        let webhooks = self
            .webhooks
            .map(crate::webhooks::WebhooksConfig::settings)
            .transpose()
            .map_err(|message| ConfigError::Invalid {
                key: "webhooks",
                message,
            })?;
        Ok(Config {
            webhooks,
            hooks,
            console: self.console.unwrap_or(defaults.console),
            examples: self.examples.unwrap_or(defaults.examples),
            tls,
            jwt_public_key: self.jwt_public_key,
            api_key: self.api_key,
            api_keys: self.api_keys,
            jwt_secret: self.jwt_secret,
            allowed_origins: self.allowed_origins.unwrap_or_default(),
            sockets,
            hub,
            namespaces,
            http: self.http.unwrap_or(defaults.http),
            tcp: self.tcp.unwrap_or(defaults.tcp),
            data_dir: self.data.unwrap_or(defaults.data_dir),
            store: self.store.or(defaults.store),
            broker: self.broker.or(defaults.broker),
            node_id: self.node_id.or(defaults.node_id),
            presence_ttl,
            max_body: self.max_body.map_or(defaults.max_body, |b| b.0),
            shutdown_grace,
            header_read_timeout,
            body_read_timeout,
            write_timeout,
        })
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("invalid configuration in {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A value is out of range or malformed.
    #[error("invalid {key}: {message}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

#[cfg(test)]
mod tests;
