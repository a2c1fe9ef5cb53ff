//! The HTTP side: records, channel publish/history/presence, and asking connected clients.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

use crate::error::{Error, Problem};
use http_body_util::{BodyExt as _, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioExecutor;

type HyperClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// One HTTP request being put together.
struct Call {
    method: Method,
    url: Url,
    headers: Vec<(header::HeaderName, String)>,
    body: Option<(Bytes, &'static str)>,
    timeout: Option<Duration>,
}

impl Call {
    fn query<K: AsRef<str>, V: AsRef<str>>(mut self, pairs: &[(K, V)]) -> Self {
        if !pairs.is_empty() {
            let mut query = self.url.query_pairs_mut();
            for (key, value) in pairs {
                query.append_pair(key.as_ref(), value.as_ref());
            }
        }
        self
    }

    fn header(mut self, name: header::HeaderName, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    fn body(mut self, body: impl Into<Bytes>, content_type: &'static str) -> Self {
        self.body = Some((body.into(), content_type));
        self
    }

    fn json(self, value: &impl Serialize) -> Result<Self, Error> {
        let body = serde_json::to_vec(value)
            .map_err(|e| Error::Protocol(format!("the body is not JSON: {e}")))?;
        Ok(self.body(body, "application/json"))
    }

    fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}
use crate::socket::{ConnectOptions, Connection};

mod records;

pub use records::{ListOptions, Page, Record, Records};

/// The answer to a publish.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Published {
    /// The publication's offset in its channel.
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: String,
    /// True when this answers a retry with an idempotency key: the first publication's
    /// position; nothing was published again.
    #[serde(default)]
    pub replayed: bool,
}

/// A channel's recent publications.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct History {
    /// The channel.
    pub channel: String,
    /// The channel's last offset.
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: String,
    /// `message` frames, oldest first.
    pub publications: Vec<Value>,
    /// With `since`: whether everything after it was still there.
    #[serde(default)]
    pub recovered: Option<bool>,
    /// With `recovered: false`: why.
    #[serde(default)]
    pub reason: Option<String>,
}

/// One connection subscribed to a channel with presence.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PresenceEntry {
    /// The connection's id.
    pub client: String,
    /// The user of its token, if any.
    #[serde(default)]
    pub user: Option<String>,
    /// Its meta (from its token, or what it gave in `connect`).
    #[serde(default)]
    pub meta: Option<Value>,
}

#[derive(Deserialize)]
struct PresenceList {
    clients: Vec<PresenceEntry>,
}

/// A client of one duplex server over HTTP; [`Client::connect`] opens a socket to the same
/// server. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: HyperClient,
    timeout: Duration,
    base: Url,
    token: Option<String>,
    api_key: Option<String>,
    tls: Arc<rustls::ClientConfig>,
}

/// Settings of a [`Client`].
#[derive(Debug, Clone, Default)]
pub struct ClientBuilder {
    base: String,
    token: Option<String>,
    api_key: Option<String>,
    ca_certs: Vec<Vec<u8>>,
    timeout: Option<Duration>,
}

impl ClientBuilder {
    /// A connection token (JWT) for the records API, polls, and sockets.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// An API key for the server API (and the records API, when it has the `records` scope).
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Trusts the PEM certificates in `pem` besides the public roots (a private CA or a
    /// self-signed server certificate).
    pub fn ca_cert_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_certs.push(pem.into());
        self
    }

    /// How long one HTTP request may take (default: 30 s; server requests add their own timeout).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The client.
    pub fn build(self) -> Result<Client, Error> {
        let mut base =
            Url::parse(&self.base).map_err(|e| Error::InvalidUrl(format!("{}: {e}", self.base)))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(Error::InvalidUrl(format!(
                "{}: the server URL is http:// or https://",
                self.base
            )));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let tls = crate::tls::client_config(&self.ca_certs)?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .build();
        let http =
            hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector);
        Ok(Client {
            http,
            timeout: self.timeout.unwrap_or(Duration::from_secs(30)),
            base,
            token: self.token,
            api_key: self.api_key,
            tls,
        })
    }
}

/// Which credential a request carries.
#[derive(Clone, Copy)]
enum Auth {
    /// The API key, else the token: the records API takes either.
    KeyOrToken,
    /// The API key: the server API.
    Key,
}

impl Client {
    /// A client of the server at `base` (`http://127.0.0.1:8080`), without credentials.
    pub fn new(base: &str) -> Result<Client, Error> {
        Client::builder(base).build()
    }

    /// Settings for a client of the server at `base`.
    pub fn builder(base: &str) -> ClientBuilder {
        ClientBuilder {
            base: base.to_owned(),
            ..ClientBuilder::default()
        }
    }

    /// The server's base URL.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// Opens a WebSocket to this server's `/ws` with this client's token and TLS settings.
    pub async fn connect(&self) -> Result<Connection, Error> {
        let mut ws = self
            .base
            .join("ws")
            .map_err(|e| Error::InvalidUrl(e.to_string()))?;
        let scheme = if self.base.scheme() == "https" {
            "wss"
        } else {
            "ws"
        };
        ws.set_scheme(scheme)
            .map_err(|()| Error::InvalidUrl("cannot make a WebSocket URL".into()))?;
        let mut options = ConnectOptions::new(ws.as_str()).tls(self.tls.clone());
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        Connection::connect(options).await
    }

    /// The records of one collection.
    pub fn records(&self, collection: &str) -> Records<'_> {
        Records::new(self, collection)
    }

    /// Publishes JSON on a channel (server API).
    pub async fn publish(&self, channel: &str, data: &impl Serialize) -> Result<Published, Error> {
        let request = self
            .request(
                Method::POST,
                &format!("api/channels/{channel}/publish"),
                Auth::Key,
            )?
            .json(data)?;
        self.send_json(request).await
    }

    /// [`publish`](Self::publish) with an idempotency key (1 to 128 visible ASCII characters,
    /// a UUID say): retrying with the same key and data within 2 minutes, on this node or
    /// another, gets the first publication's answer (`replayed`) instead of publishing again.
    /// Retry with it when a publish failed without a clear answer (a lost connection, a 503).
    pub async fn publish_once(
        &self,
        channel: &str,
        data: &impl Serialize,
        key: &str,
    ) -> Result<Published, Error> {
        let request = self
            .request(
                Method::POST,
                &format!("api/channels/{channel}/publish"),
                Auth::Key,
            )?
            .header(
                header::HeaderName::from_static("idempotency-key"),
                key.to_owned(),
            )
            .json(data)?;
        self.send_json(request).await
    }

    /// Publishes bytes on a channel of a namespace with `binary` on (server API).
    pub async fn publish_bytes(&self, channel: &str, data: Bytes) -> Result<Published, Error> {
        let request = self
            .request(
                Method::POST,
                &format!("api/channels/{channel}/publish"),
                Auth::Key,
            )?
            .body(data, "application/octet-stream");
        self.send_json(request).await
    }

    /// A channel's recent publications: the last `limit`, or with `since` (an offset and its
    /// epoch) the ones after it.
    pub async fn history(
        &self,
        channel: &str,
        since: Option<(u64, &str)>,
        limit: Option<u32>,
    ) -> Result<History, Error> {
        let mut query = Vec::new();
        if let Some((offset, epoch)) = since {
            query.push(("since", offset.to_string()));
            query.push(("epoch", epoch.to_owned()));
        }
        if let Some(limit) = limit {
            query.push(("limit", limit.to_string()));
        }
        let request = self
            .request(
                Method::GET,
                &format!("api/channels/{channel}/history"),
                Auth::Key,
            )?
            .query(&query);
        self.send_json(request).await
    }

    /// Who is subscribed to a channel with presence.
    pub async fn presence(&self, channel: &str) -> Result<Vec<PresenceEntry>, Error> {
        let request = self.request(
            Method::GET,
            &format!("api/channels/{channel}/presence"),
            Auth::Key,
        )?;
        let list: PresenceList = self.send_json(request).await?;
        Ok(list.clients)
    }

    /// Active channels (`GET /api/channels`), as the server lists them.
    pub async fn channels(&self) -> Result<Value, Error> {
        let request = self.request(Method::GET, "api/channels", Auth::Key)?;
        self.send_json(request).await
    }

    /// Asks a connected client and returns its reply; a client's `error` answer is
    /// [`Error::Api`] with code `client_error`, no answer in `timeout` is code `timeout`.
    pub async fn request_connection(
        &self,
        connection: &str,
        data: &impl Serialize,
        timeout: Duration,
    ) -> Result<Value, Error> {
        self.ask(
            &format!("api/connections/{connection}/request"),
            data,
            timeout,
        )
        .await
    }

    /// Asks every connection of a user; `{"replies": [...]}` as the server answers.
    pub async fn request_user(
        &self,
        user: &str,
        data: &impl Serialize,
        timeout: Duration,
    ) -> Result<Value, Error> {
        self.ask(&format!("api/users/{user}/request"), data, timeout)
            .await
    }

    /// A server request: the server waits up to `timeout` for the client, we a little longer.
    async fn ask(
        &self,
        path: &str,
        data: &impl Serialize,
        timeout: Duration,
    ) -> Result<Value, Error> {
        let request = self
            .request(Method::POST, path, Auth::Key)?
            .query(&[("timeout", format!("{}ms", timeout.as_millis()))])
            .timeout(timeout + Duration::from_secs(5))
            .json(data)?;
        self.send_json(request).await
    }

    fn request(&self, method: Method, path: &str, auth: Auth) -> Result<Call, Error> {
        let url = self
            .base
            .join(path)
            .map_err(|e| Error::InvalidUrl(format!("{path}: {e}")))?;
        let bearer = match auth {
            Auth::Key => self.api_key.as_ref(),
            Auth::KeyOrToken => self.api_key.as_ref().or(self.token.as_ref()),
        };
        let mut call = Call {
            method,
            url,
            headers: Vec::new(),
            body: None,
            timeout: None,
        };
        if let Some(bearer) = bearer {
            call = call.header(header::AUTHORIZATION, format!("Bearer {bearer}"));
        }
        Ok(call)
    }

    /// Sends a call; a non-2xx answer becomes [`Error::Api`] with the server's problem.
    async fn send(&self, call: Call) -> Result<(StatusCode, Bytes), Error> {
        let mut request = hyper::Request::builder()
            .method(call.method)
            .uri(call.url.as_str());
        for (name, value) in call.headers {
            let value = HeaderValue::from_str(&value)
                .map_err(|e| Error::Protocol(format!("header {name}: {e}")))?;
            request = request.header(name, value);
        }
        let body = match call.body {
            Some((bytes, content_type)) => {
                request = request.header(header::CONTENT_TYPE, content_type);
                Full::new(bytes)
            }
            None => Full::new(Bytes::new()),
        };
        let request = request
            .body(body)
            .map_err(|e| Error::InvalidUrl(e.to_string()))?;
        let timeout = call.timeout.unwrap_or(self.timeout);
        let exchange = async {
            let response = self.http.request(request).await.map_err(|e| {
                let message = error_chain(&e);
                if e.is_connect() {
                    Error::Unreachable(message)
                } else {
                    Error::Http(message)
                }
            })?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| Error::Http(error_chain(&e)))?
                .to_bytes();
            Ok::<_, Error>((status, body))
        };
        let (status, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| Error::Timeout(timeout))??;
        if status.is_success() || status == StatusCode::NOT_MODIFIED {
            return Ok((status, body));
        }
        let mut problem: Problem = serde_json::from_slice(&body).unwrap_or_else(|_| Problem {
            status: status.as_u16(),
            code: "http_error".into(),
            title: String::new(),
            detail: String::from_utf8_lossy(&body).into_owned(),
        });
        problem.status = status.as_u16();
        Err(Error::Api(problem))
    }

    async fn send_json<T: DeserializeOwned>(&self, call: Call) -> Result<T, Error> {
        let (_, body) = self.send(call).await?;
        serde_json::from_slice(&body)
            .map_err(|e| Error::Protocol(format!("unexpected answer from the server: {e}")))
    }
}

/// An error and its causes, on one line (hyper's own message hides the cause).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    message
}
