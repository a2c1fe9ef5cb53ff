//! Synchronous hooks: the application's backend decides who may connect, subscribe and publish,
//! may rewrite what is published, and answers clients' `rpc` calls.
//!
//! duplex POSTs one JSON object per hook to `[hooks] url` (signed with `Duplex-Signature:
//! sha256=HEX` when a secret is set) and waits up to `timeout` for `{"allow": true, …}` or
//! `{"allow": false, "code", "message"}`. A hook that fails (no answer, a status other than 2xx,
//! a body that is not such an object, the timeout) means what `on_error` says: `deny` refuses
//! with `unavailable`, `allow` goes on as if no hook were configured (an `rpc` has no such
//! fallback: it fails with `unavailable`). Every hook is an HTTP request of its own, awaited by
//! the one connection that asked, so a slow backend slows that connection's requests only.
//! docs/hooks.md has the JSON of each hook.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::metrics::{HookLabels, HookResultLabels, Metrics};

/// A hook duplex may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    /// A client connects (the `connect` frame, or a WebSocket opened with `?token=`).
    Connect,
    /// A client subscribes to a channel.
    Subscribe,
    /// A client publishes to a channel.
    Publish,
    /// A client renews its connection (`refresh`).
    Refresh,
    /// A client calls the backend (`rpc`).
    Rpc,
}

impl Hook {
    /// The name in configuration and in the hook's body.
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Connect => "connect",
            Hook::Subscribe => "subscribe",
            Hook::Publish => "publish",
            Hook::Refresh => "refresh",
            Hook::Rpc => "rpc",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HookSet(u8);

impl HookSet {
    /// Every hook.
    pub const ALL: HookSet = HookSet(0b1_1111);

    /// The set of `hooks`.
    pub fn of(hooks: &[Hook]) -> HookSet {
        HookSet(hooks.iter().fold(0, |set, hook| set | hook.bit()))
    }

    /// Whether `hook` is in the set.
    pub fn has(self, hook: Hook) -> bool {
        self.0 & hook.bit() != 0
    }
}

/// What a failed or timed-out hook means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Refuse with `unavailable`.
    #[default]
    Deny,
    /// Go on as if the hook were not configured.
    Allow,
}

/// `[hooks]` in `duplex.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksConfig {
    /// Where duplex POSTs each hook (`http://`).
    pub url: String,
    /// Which hooks are on.
    pub events: Vec<Hook>,
    /// How long a hook may take, as text such as `"2s"` (2 s by default).
    #[serde(default)]
    pub timeout: Option<String>,
    /// What a failed or timed-out hook means (`deny` by default).
    #[serde(default)]
    pub on_error: OnError,
    /// The key of the `Duplex-Signature` HMAC; unsigned without one.
    #[serde(default)]
    pub secret: Option<String>,
    /// Request headers of a WebSocket upgrade passed to the `connect` hook, by name.
    #[serde(default)]
    pub headers: Vec<String>,
    /// Cookies of a WebSocket upgrade passed to the `connect` hook, by name.
    #[serde(default)]
    pub cookies: Vec<String>,
}

/// The hooks in effect, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookSettings {
    /// Where duplex POSTs.
    pub url: String,
    /// Which hooks are on.
    pub events: HookSet,
    /// How long a hook may take.
    pub timeout: Duration,
    /// What a failed hook means.
    pub on_error: OnError,
    /// The signature key.
    pub secret: Option<String>,
    /// Upgrade headers passed to `connect`, lower case.
    pub headers: Vec<String>,
    /// Upgrade cookies passed to `connect`.
    pub cookies: Vec<String>,
}

impl HooksConfig {
    /// Checks the table.
    pub fn settings(self) -> Result<HookSettings, String> {
        let url = reqwest::Url::parse(&self.url).map_err(|e| format!("url: {e}"))?;
        if url.scheme() != "http" {
            return Err(format!(
                "url: {:?} must be http:// (hooks go to a backend on a private network)",
                self.url
            ));
        }
        if self.events.is_empty() {
            return Err(
                "events: name at least one of connect, subscribe, publish, refresh, rpc".into(),
            );
        }
        let timeout = match &self.timeout {
            Some(text) => crate::units::parse_duration(text)
                .filter(|t| !t.is_zero())
                .ok_or_else(|| format!("timeout: {text:?} is not a duration such as 2s"))?,
            None => Duration::from_secs(2),
        };
        Ok(HookSettings {
            url: self.url,
            events: HookSet::of(&self.events),
            timeout,
            on_error: self.on_error,
            secret: self.secret.filter(|s| !s.is_empty()),
            headers: self
                .headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            cookies: self.cookies,
        })
    }
}

/// What a hook is about, as duplex POSTs it.
#[derive(Debug, Serialize)]
pub(crate) struct HookRequest {
    pub hook: Hook,
    pub client: String,
    pub user: Option<String>,
    pub transport: &'static str,
    pub address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
    /// `base64` when `data` is a binary publication, base64 encoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoding: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The token the client sent, when duplex has no key to verify it with itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cookies: Option<serde_json::Map<String, serde_json::Value>>,
}

impl HookRequest {
    /// A request about `client`, every optional part empty.
    pub(crate) fn new(hook: Hook, who: &crate::hub::connection::ConnectionHandle) -> HookRequest {
        HookRequest {
            hook,
            client: who.id.to_string(),
            user: who.user().map(|u| u.to_string()),
            transport: who.transport,
            address: who.remote.map(|a| a.to_string()),
            meta: who.meta().map(|m| boxed(&m)),
            channel: None,
            data: None,
            encoding: None,
            method: None,
            token: None,
            headers: None,
            cookies: None,
        }
    }
}

/// A copy of shared JSON.
pub(crate) fn boxed(json: &RawValue) -> Box<RawValue> {
    RawValue::from_string(json.get().to_owned()).expect("RawValue holds valid JSON")
}

/// What the backend answered.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Answer {
    /// Whether the request may go on (not needed by `rpc`).
    pub allow: Option<bool>,
    /// A refusal's code.
    pub code: Option<String>,
    /// A refusal's sentence.
    pub message: Option<String>,
    /// `connect`: who the connection is.
    pub user: Option<String>,
    /// `connect`: what presence shows; `subscribe`: what presence shows in that channel.
    pub meta: Option<Box<RawValue>>,
    /// `connect`, `refresh`: when the connection must refresh, seconds since the Unix epoch.
    pub expires_at: Option<u64>,
    /// `connect`, `refresh`: the channels granted, as a token's `channels` claim.
    pub channels: Option<Vec<String>>,
    /// `publish`: the data to publish instead.
    pub data: Option<Box<RawValue>>,
    /// `rpc`: the result.
    pub result: Option<Box<RawValue>>,
    /// `rpc`: the failure.
    pub error: Option<BackendError>,
}

/// An `rpc` failure as the backend says it.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct BackendError {
    pub code: Option<String>,
    pub message: Option<String>,
}

/// What the client is told when a hook refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Denial {
    /// The backend's code, or ours.
    pub code: String,
    pub message: String,
}

impl Denial {
    /// The backend's code when it is a plain code (`[a-z0-9_.-]`, up to 64), else `fallback`.
    pub(crate) fn from_backend(
        code: Option<String>,
        message: Option<String>,
        fallback: &str,
    ) -> Denial {
        let code = code
            .filter(|c| {
                !c.is_empty()
                    && c.len() <= 64
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b)
                    })
            })
            .unwrap_or_else(|| fallback.to_owned());
        let message = message
            .map(|m| m.chars().take(1024).collect())
            .unwrap_or_else(|| "refused by the application's backend".to_owned());
        Denial { code, message }
    }
}

/// What came of a hook.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Go on, with what the backend said (empty when `on_error = "allow"` stood in for it).
    Allow(Answer),
    /// Refuse.
    Deny(Denial),
}

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("the backend did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the backend could not be reached: {0}")]
    Unreachable(String),
    #[error("the backend answered {0}")]
    Status(u16),
    #[error("the backend's answer is not a hook answer: {0}")]
    Malformed(String),
}

/// The largest answer read from the backend.
const MAX_ANSWER: usize = 1 << 20;

/// Calls the backend's hooks.
#[derive(Debug)]
pub(crate) struct Hooks {
    client: reqwest::Client,
    settings: HookSettings,
    metrics: Arc<Metrics>,
}

impl Hooks {
    pub(crate) fn new(settings: HookSettings, metrics: Arc<Metrics>) -> Hooks {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .expect("a plain HTTP client builds");
        Hooks {
            client,
            settings,
            metrics,
        }
    }

    /// Whether `hook` is on (before any namespace narrows it).
    pub(crate) fn on(&self, hook: Hook) -> bool {
        self.settings.events.has(hook)
    }

    /// The settings.
    pub(crate) fn settings(&self) -> &HookSettings {
        &self.settings
    }

    /// Asks the backend, and counts how it went.
    pub(crate) async fn ask(&self, request: &HookRequest) -> Verdict {
        let hook = request.hook;
        let started = Instant::now();
        let outcome = self.post(request).await;
        self.metrics
            .hook_duration
            .get_or_create(&HookLabels {
                hook: hook.as_str(),
            })
            .observe(started.elapsed().as_secs_f64());
        let (verdict, result) = match outcome {
            Ok(answer) => match answer.allow {
                Some(false) => (
                    Verdict::Deny(Denial::from_backend(
                        answer.code,
                        answer.message,
                        "permission_denied",
                    )),
                    "denied",
                ),
                Some(true) => (Verdict::Allow(answer), "allowed"),
                None if hook == Hook::Rpc => (Verdict::Allow(answer), "allowed"),
                None => self.failed(
                    hook,
                    &Failure::Malformed("it has no boolean \"allow\"".into()),
                ),
            },
            Err(failure) => self.failed(hook, &failure),
        };
        self.metrics
            .hook_calls
            .get_or_create(&HookResultLabels {
                hook: hook.as_str(),
                result,
            })
            .inc();
        verdict
    }

    fn failed(&self, hook: Hook, failure: &Failure) -> (Verdict, &'static str) {
        tracing::warn!(hook = hook.as_str(), %failure, "hook failed");
        match self.settings.on_error {
            OnError::Allow if hook != Hook::Rpc => {
                (Verdict::Allow(Answer::default()), "failed_allowed")
            }
            _ => (
                Verdict::Deny(Denial {
                    code: "unavailable".into(),
                    message: format!("the application's backend failed: {failure}"),
                }),
                "failed_denied",
            ),
        }
    }

    async fn post(&self, request: &HookRequest) -> Result<Answer, Failure> {
        let body = serde_json::to_vec(request).expect("hook requests serialize");
        let mut post = self
            .client
            .post(&self.settings.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some(secret) = &self.settings.secret {
            post = post.header("duplex-signature", signature(secret.as_bytes(), &body));
        }
        let timeout = self.settings.timeout;
        let failure = |e: reqwest::Error| {
            if e.is_timeout() {
                Failure::Timeout(timeout)
            } else {
                Failure::Unreachable(e.without_url().to_string())
            }
        };
        let mut response = post.body(body).send().await.map_err(failure)?;
        if !response.status().is_success() {
            return Err(Failure::Status(response.status().as_u16()));
        }
        let mut answer = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(failure)? {
            if answer.len() + chunk.len() > MAX_ANSWER {
                return Err(Failure::Malformed(format!(
                    "it is longer than {MAX_ANSWER} bytes"
                )));
            }
            answer.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&answer).map_err(|e| Failure::Malformed(e.to_string()))
    }
}

/// `sha256=HEX`: the HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    use std::fmt::Write as _;
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for byte in digest {
        write!(out, "{byte:02x}").expect("writing to a String");
    }
    out
}

/// Picks the configured headers and cookies out of an upgrade request, for `connect`. Boxed:
/// it rides in the upgrade task of every WebSocket for its whole life (an async block keeps what
/// it captured), where a pointer costs 8 bytes and two maps would cost about 250.
pub(crate) fn upgrade_context(
    settings: &HookSettings,
    headers: &axum::http::HeaderMap,
) -> Option<Box<UpgradeContext>> {
    if settings.headers.is_empty() && settings.cookies.is_empty() {
        return None;
    }
    let mut picked = serde_json::Map::new();
    for name in &settings.headers {
        if let Some(value) = headers.get(name.as_str()).and_then(|v| v.to_str().ok()) {
            picked.insert(name.clone(), value.into());
        }
    }
    let mut cookies = serde_json::Map::new();
    for header in headers.get_all(axum::http::header::COOKIE) {
        let Ok(header) = header.to_str() else {
            continue;
        };
        for pair in header.split(';') {
            if let Some((name, value)) = pair.trim().split_once('=')
                && settings.cookies.iter().any(|c| c == name)
            {
                cookies.insert(name.to_owned(), value.into());
            }
        }
    }
    Some(Box::new(UpgradeContext {
        headers: picked,
        cookies,
    }))
}

/// The headers and cookies of a WebSocket upgrade the `connect` hook is given.
#[derive(Debug, Clone, Default)]
pub(crate) struct UpgradeContext {
    pub headers: serde_json::Map<String, serde_json::Value>,
    pub cookies: serde_json::Map<String, serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_hmac_sha256_of_the_body_in_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_backend_code_passes_when_plain_and_falls_back_otherwise() {
        let plain = Denial::from_backend(Some("banned_user".into()), None, "permission_denied");
        assert_eq!(plain.code, "banned_user");
        assert_eq!(plain.message, "refused by the application's backend");
        for bad in ["", "Has Spaces", "{\"x\"}", &"a".repeat(65)] {
            let denial =
                Denial::from_backend(Some(bad.into()), Some("m".into()), "permission_denied");
            assert_eq!(denial.code, "permission_denied", "{bad:?}");
            assert_eq!(denial.message, "m");
        }
    }

    #[test]
    fn settings_check_the_table() {
        let table: HooksConfig = toml::from_str(
            "url = \"http://127.0.0.1:9000/h\"\nevents = [\"connect\", \"rpc\"]\ntimeout = \"250ms\"\non_error = \"allow\"\nheaders = [\"X-Session\"]",
        )
        .expect("toml");
        let settings = table.settings().expect("valid");
        assert!(settings.events.has(Hook::Connect) && settings.events.has(Hook::Rpc));
        assert!(!settings.events.has(Hook::Publish));
        assert_eq!(settings.timeout, Duration::from_millis(250));
        assert_eq!(settings.on_error, OnError::Allow);
        assert_eq!(settings.headers, ["x-session"]);
        for bad in [
            "url = \"ftp://x\"\nevents = [\"connect\"]",
            "url = \"http://x\"\nevents = []",
            "url = \"http://x\"\nevents = [\"connect\"]\ntimeout = \"soon\"",
        ] {
            let table: HooksConfig = toml::from_str(bad).expect("toml");
            assert!(table.settings().is_err(), "{bad}");
        }
        assert!(toml::from_str::<HooksConfig>("url = \"http://x\"\nevents = [\"kick\"]").is_err());
    }
}
