//! Namespaces: the rules shared by every channel whose name starts with `namespace:`.
//!
//! Built-in namespaces ship sensible rules (`chat`, `records`, `stream`, `game`, `private`, and
//! a default for any other name); `[namespaces.NAME]` tables in `duplex.toml` override them field
//! by field, or define new ones on top of the default.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::units::{ByteSize, parse_duration};

/// Who may do something in a namespace: publish, subscribe, read presence or history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Any connection or HTTP client, with or without a token.
    #[serde(alias = "clients")]
    Anyone,
    /// Clients with a valid token (and the server).
    Authenticated,
    /// Clients whose token's `channels` claim lists the channel (and the server).
    TokenChannels,
    /// Only the server: the server API and the records API.
    Server,
}

/// Who is asking.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    /// The server itself (server API, records API).
    Server,
    /// A client, with what its token (if any) says.
    Client(&'a ClientAuth),
}

/// What a client's token says about it; the default is an anonymous client.
#[derive(Debug, Clone, Default)]
pub struct ClientAuth {
    /// The token's `sub`.
    pub user: Option<std::sync::Arc<str>>,
    /// The token's `channels` claim: channel names, or prefixes ending in `*`.
    pub channels: Vec<String>,
    /// The token's `exp`, seconds since the Unix epoch.
    pub expires_at: Option<u64>,
    /// The token's `meta` claim (any JSON, such as a display name): what presence shows for the
    /// connection, in place of whatever `connect` says, since the token is the server's word.
    pub meta: Option<Arc<serde_json::value::RawValue>>,
}

impl ClientAuth {
    /// An anonymous client's, shared: a connection that has not connected holds this one rather
    /// than an allocation of its own.
    pub fn anonymous() -> Arc<ClientAuth> {
        static ANONYMOUS: std::sync::LazyLock<Arc<ClientAuth>> =
            std::sync::LazyLock::new(|| Arc::new(ClientAuth::default()));
        ANONYMOUS.clone()
    }

    /// Whether the token's `channels` claim covers `channel`.
    pub fn lists(&self, channel: &str) -> bool {
        self.channels
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => channel.starts_with(prefix),
                None => pattern == channel,
            })
    }
}

impl Access {
    /// Whether `caller` may act on `channel`.
    pub fn allows(self, caller: Caller<'_>, channel: &str) -> bool {
        match (self, caller) {
            (_, Caller::Server) | (Access::Anyone, _) => true,
            (Access::Authenticated, Caller::Client(auth)) => auth.user.is_some(),
            (Access::TokenChannels, Caller::Client(auth)) => auth.lists(channel),
            (Access::Server, Caller::Client(_)) => false,
        }
    }
}

/// What happens when a subscriber's outgoing queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumerPolicy {
    /// Drop the oldest queued publication to make room.
    DropOldest,
    /// Conflate: a slow subscriber gets only the newest publication of each channel.
    Latest,
    /// Disconnect the subscriber with `slow_consumer`.
    Disconnect,
}

/// Where a namespace's channels keep their offsets, epochs and history on a node without a
/// broker (with a broker, the broker keeps them for every namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryStorage {
    /// In this process: fastest; a restart starts every channel in a new epoch.
    Memory,
    /// In the store (the SQLite file, or PostgreSQL), appended by group commit before a
    /// publication is acknowledged: a channel continues in the same epoch after a restart, so
    /// clients recover across it.
    Store,
}

/// The rules of one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// The namespace's name (`default` for the fallback).
    pub name: String,
    /// Who may publish.
    pub publish: Access,
    /// Who may subscribe (and poll, and stream events).
    pub subscribe: Access,
    /// Who may read presence (when presence is on).
    pub read_presence: Access,
    /// Who may read history (`history`; recovery on subscribe follows `subscribe`).
    pub read_history: Access,
    /// How many recent publications each channel keeps.
    pub history_size: usize,
    /// How long a publication stays in history.
    pub history_ttl: Duration,
    /// How many bytes of history each channel keeps (the newest publication always stays).
    pub history_bytes: usize,
    /// Where history is kept when there is no broker.
    pub history_storage: HistoryStorage,
    /// Whether presence and join/leave events are on.
    pub presence: bool,
    /// Whether binary publications are allowed.
    pub binary: bool,
    /// The largest publication payload, in bytes.
    pub max_message_size: usize,
    /// What a full subscriber queue does.
    pub slow_consumer: SlowConsumerPolicy,
    /// Which of the configured `[hooks]` apply to its channels (all of them by default).
    pub hooks: crate::hooks::HookSet,
}

/// A `[namespaces.NAME]` table: every field optional, falling back to the built-in rules.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// See [`Namespace::publish`].
    pub publish: Option<Access>,
    /// See [`Namespace::subscribe`].
    pub subscribe: Option<Access>,
    /// See [`Namespace::read_presence`].
    pub read_presence: Option<Access>,
    /// See [`Namespace::read_history`].
    pub read_history: Option<Access>,
    /// See [`Namespace::history_size`].
    pub history_size: Option<usize>,
    /// See [`Namespace::history_ttl`], as text such as `"5m"`.
    pub history_ttl: Option<String>,
    /// See [`Namespace::history_bytes`].
    pub history_bytes: Option<ByteSize>,
    /// See [`Namespace::history_storage`]: `"memory"` or `"store"`.
    pub history_storage: Option<HistoryStorage>,
    /// See [`Namespace::presence`].
    pub presence: Option<bool>,
    /// See [`Namespace::binary`].
    pub binary: Option<bool>,
    /// See [`Namespace::max_message_size`].
    pub max_message_size: Option<ByteSize>,
    /// See [`Namespace::slow_consumer`].
    pub slow_consumer: Option<SlowConsumerPolicy>,
    /// See [`Namespace::hooks`]: the hooks that apply, such as `["publish"]`.
    pub hooks: Option<Vec<crate::hooks::Hook>>,
}

impl NamespaceConfig {
    fn apply(&self, base: &Namespace, name: &str) -> Result<Namespace, String> {
        let history_ttl = match &self.history_ttl {
            Some(text) => parse_duration(text).ok_or_else(|| {
                format!("namespaces.{name}.history_ttl: {text:?} is not a duration")
            })?,
            None => base.history_ttl,
        };
        Ok(Namespace {
            name: name.to_owned(),
            publish: self.publish.unwrap_or(base.publish),
            subscribe: self.subscribe.unwrap_or(base.subscribe),
            read_presence: self.read_presence.unwrap_or(base.read_presence),
            read_history: self.read_history.unwrap_or(base.read_history),
            history_size: self.history_size.unwrap_or(base.history_size),
            history_ttl,
            history_bytes: self.history_bytes.map_or(base.history_bytes, |b| b.0),
            history_storage: self.history_storage.unwrap_or(base.history_storage),
            presence: self.presence.unwrap_or(base.presence),
            binary: self.binary.unwrap_or(base.binary),
            max_message_size: self.max_message_size.map_or(base.max_message_size, |s| s.0),
            slow_consumer: self.slow_consumer.unwrap_or(base.slow_consumer),
            hooks: self
                .hooks
                .as_deref()
                .map_or(base.hooks, crate::hooks::HookSet::of),
        })
    }
}

/// Who may read and write one collection's records over HTTP (`[collections.NAME]`, or
/// `[collections.default]` for the rest). Reading also decides who may follow the collection's
/// `records:{collection}` channel; `token_channels` looks for `records:{collection}` in the
/// token's `channels` claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectionRule {
    /// Who may list and get records (and subscribe to their events).
    #[serde(default = "anyone")]
    pub read: Access,
    /// Who may create, replace, patch and delete records.
    #[serde(default = "anyone")]
    pub write: Access,
}

fn anyone() -> Access {
    Access::Anyone
}

impl Default for CollectionRule {
    fn default() -> Self {
        CollectionRule {
            read: Access::Anyone,
            write: Access::Anyone,
        }
    }
}

/// Every namespace's rules, looked up by channel name, and every collection's.
#[derive(Debug, Clone)]
pub struct Namespaces {
    named: HashMap<String, Arc<Namespace>>,
    fallback: Arc<Namespace>,
    /// `records:{collection}` channels of collections with their own read rule.
    record_channels: HashMap<String, Arc<Namespace>>,
    collections: HashMap<String, CollectionRule>,
    default_collection: CollectionRule,
}

const KIB: usize = 1024;

fn builtin(name: &str) -> Option<Namespace> {
    // Outside the namespaces that ship open (chat, stream, game), publishing needs a token:
    // a fresh server never lets anonymous clients write to any channel name they make up.
    let default = Namespace {
        name: "default".into(),
        publish: Access::Authenticated,
        subscribe: Access::Anyone,
        read_presence: Access::Anyone,
        read_history: Access::Anyone,
        history_size: 100,
        history_ttl: Duration::from_secs(300),
        history_bytes: 1024 * KIB,
        history_storage: HistoryStorage::Memory,
        presence: false,
        binary: false,
        max_message_size: 64 * KIB,
        slow_consumer: SlowConsumerPolicy::DropOldest,
        hooks: crate::hooks::HookSet::ALL,
    };
    let namespace = match name {
        "default" => default,
        "chat" => Namespace {
            publish: Access::Anyone,
            presence: true,
            // A conversation is worth keeping across a restart.
            history_storage: HistoryStorage::Store,
            history_size: 100,
            history_ttl: Duration::from_secs(3600),
            ..default
        },
        "records" => Namespace {
            publish: Access::Server,
            history_size: 1000,
            history_ttl: Duration::from_secs(3600),
            history_bytes: 4 * 1024 * KIB,
            max_message_size: 2 * 1024 * KIB,
            history_storage: HistoryStorage::Store,
            ..default
        },
        "stream" => Namespace {
            publish: Access::Anyone,
            binary: true,
            history_size: 0,
            max_message_size: 1024 * KIB,
            slow_consumer: SlowConsumerPolicy::DropOldest,
            // Who is watching: a live stream shows its audience.
            presence: true,
            ..default
        },
        "game" => Namespace {
            publish: Access::Anyone,
            binary: true,
            history_size: 0,
            slow_consumer: SlowConsumerPolicy::Latest,
            presence: true,
            ..default
        },
        // Ephemeral signals (typing indicators, cursors): nothing kept, nobody announced.
        "signal" => Namespace {
            publish: Access::Anyone,
            history_size: 0,
            max_message_size: 4 * KIB,
            ..default
        },
        "private" => Namespace {
            publish: Access::TokenChannels,
            subscribe: Access::TokenChannels,
            read_presence: Access::TokenChannels,
            read_history: Access::TokenChannels,
            presence: true,
            ..default
        },
        _ => return None,
    };
    Some(Namespace {
        name: name.to_owned(),
        ..namespace
    })
}

impl Default for Namespaces {
    fn default() -> Self {
        Self::new(&HashMap::new()).expect("the built-in namespaces are valid")
    }
}

impl Namespace {
    /// How long and how much of a channel's history is kept, as a log (a broker, the store)
    /// is told.
    pub fn retention(&self) -> crate::broker::Retention {
        crate::broker::Retention {
            size: self.history_size.max(1),
            ttl: self.history_ttl.max(Duration::from_secs(1)),
            bytes: self.history_bytes,
        }
    }

    /// Whether, without a broker, its channels keep their history in the store.
    pub fn keeps_history_in_store(&self) -> bool {
        self.history_storage == HistoryStorage::Store && self.history_size > 0
    }
}

impl Namespaces {
    /// The largest history any namespace keeps.
    pub fn max_history_size(&self) -> usize {
        self.named
            .values()
            .chain(self.record_channels.values())
            .chain(std::iter::once(&self.fallback))
            .map(|n| n.history_size)
            .max()
            .unwrap_or(0)
    }

    /// The built-in namespaces with `configured` applied on top.
    pub fn new(configured: &HashMap<String, NamespaceConfig>) -> Result<Self, String> {
        let mut fallback = builtin("default").expect("default is built in");
        if let Some(config) = configured.get("default") {
            fallback = config.apply(&fallback, "default")?;
        }
        let mut named = HashMap::new();
        for name in ["chat", "records", "stream", "game", "signal", "private"] {
            let namespace = builtin(name).expect("listed names are built in");
            named.insert(name.to_owned(), namespace);
        }
        for (name, config) in configured {
            if name == "default" {
                continue;
            }
            if !duplex_proto::is_valid_namespace(name) {
                return Err(format!(
                    "namespace name {name:?} must be [a-z0-9_-]{{1,32}}"
                ));
            }
            let base = named.get(name).unwrap_or(&fallback).clone();
            named.insert(name.clone(), config.apply(&base, name)?);
        }
        Ok(Namespaces {
            named: named.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
            fallback: Arc::new(fallback),
            record_channels: HashMap::new(),
            collections: HashMap::new(),
            default_collection: CollectionRule::default(),
        })
    }

    /// These namespaces with `[collections.NAME]` rules (and `[collections.default]`). A
    /// collection's `read` rule also becomes the subscribe, presence and history rule of its
    /// `records:{collection}` channel, so events never reach whoever may not read the records.
    pub fn with_collections(
        mut self,
        configured: &HashMap<String, CollectionRule>,
    ) -> Result<Self, String> {
        let records = self
            .named
            .get("records")
            .cloned()
            .unwrap_or_else(|| self.fallback.clone());
        let readable_by = |read: Access| {
            Arc::new(Namespace {
                subscribe: read,
                read_history: read,
                read_presence: read,
                ..(*records).clone()
            })
        };
        if let Some(rule) = configured.get("default") {
            self.default_collection = *rule;
            self.named.insert("records".into(), readable_by(rule.read));
        }
        for (name, rule) in configured {
            if name == "default" {
                continue;
            }
            if !crate::store::is_valid_collection(name) {
                return Err(format!("collections.{name}: not a valid collection name"));
            }
            self.collections.insert(name.clone(), *rule);
            self.record_channels
                .insert(format!("records:{name}"), readable_by(rule.read));
        }
        Ok(self)
    }

    /// The read and write rule of a collection.
    pub fn collection(&self, collection: &str) -> CollectionRule {
        self.collections
            .get(collection)
            .copied()
            .unwrap_or(self.default_collection)
    }

    /// The rules for a channel (`namespace:name`); the caller has validated the name.
    pub fn for_channel(&self, channel: &str) -> &Arc<Namespace> {
        let namespace = channel.split_once(':').map_or(channel, |(ns, _)| ns);
        if namespace == "records"
            && let Some(rules) = self.record_channels.get(channel)
        {
            return rules;
        }
        self.named.get(namespace).unwrap_or(&self.fallback)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_and_the_fallback_apply_by_prefix() {
        let namespaces = Namespaces::default();
        assert_eq!(
            namespaces.for_channel("records:posts").publish,
            Access::Server
        );
        assert!(namespaces.for_channel("stream:cam1").binary);
        assert_eq!(
            namespaces.for_channel("game:arena").slow_consumer,
            SlowConsumerPolicy::Latest
        );
        assert!(namespaces.for_channel("chat:lobby").presence);
        let other = namespaces.for_channel("news:today");
        assert_eq!(other.name, "default");
        assert_eq!(other.history_size, 100);
        assert_eq!(other.history_ttl, Duration::from_secs(300));
    }

    /// Where history lives: `chat` and `records` in the store, the moment's namespaces in
    /// memory, any namespace either way by configuration; another value is a clear error.
    #[test]
    fn history_storage_defaults_and_configuration() {
        let namespaces = Namespaces::default();
        for (channel, storage) in [
            ("chat:lobby", HistoryStorage::Store),
            ("records:posts", HistoryStorage::Store),
            ("stream:cam", HistoryStorage::Memory),
            ("game:arena", HistoryStorage::Memory),
            ("news:today", HistoryStorage::Memory),
        ] {
            assert_eq!(
                namespaces.for_channel(channel).history_storage,
                storage,
                "{channel}"
            );
        }
        // Without history there is nothing to keep, wherever.
        assert!(
            !namespaces
                .for_channel("stream:cam")
                .keeps_history_in_store()
        );
        let configured: HashMap<String, NamespaceConfig> = toml::from_str(
            "[chat]\nhistory_storage = \"memory\"\n[alerts]\nhistory_storage = \"store\"",
        )
        .expect("toml");
        let namespaces = Namespaces::new(&configured).expect("valid");
        assert!(!namespaces.for_channel("chat:x").keeps_history_in_store());
        assert!(namespaces.for_channel("alerts:x").keeps_history_in_store());
        let error = toml::from_str::<HashMap<String, NamespaceConfig>>(
            "[chat]\nhistory_storage = \"disk\"",
        )
        .expect_err("not a storage");
        assert!(
            error.to_string().contains("unknown variant `disk`"),
            "{error}"
        );
    }

    #[test]
    fn configured_tables_override_field_by_field() {
        let configured: HashMap<String, NamespaceConfig> = toml::from_str(
            "[chat]\nhistory_size = 5\n[alerts]\npublish = \"server\"\nslow_consumer = \"disconnect\"\n[default]\nbinary = true",
        )
        .expect("valid");
        let namespaces = Namespaces::new(&configured).expect("valid");
        let chat = namespaces.for_channel("chat:x");
        assert_eq!(chat.history_size, 5);
        assert!(chat.presence, "unset fields keep the built-in value");
        let alerts = namespaces.for_channel("alerts:x");
        assert_eq!(alerts.publish, Access::Server);
        assert_eq!(alerts.slow_consumer, SlowConsumerPolicy::Disconnect);
        assert!(
            alerts.binary,
            "new namespaces start from the configured default"
        );
        assert!(namespaces.for_channel("misc:x").binary);
    }

    #[test]
    fn a_collection_read_rule_guards_its_record_channel() {
        let configured: HashMap<String, CollectionRule> = toml::from_str(
            "[secrets]\nread = \"authenticated\"\nwrite = \"server\"\n[default]\nwrite = \"authenticated\"",
        )
        .expect("valid");
        let namespaces = Namespaces::default()
            .with_collections(&configured)
            .expect("valid");
        let secrets = namespaces.collection("secrets");
        assert_eq!(
            (secrets.read, secrets.write),
            (Access::Authenticated, Access::Server)
        );
        let posts = namespaces.collection("posts");
        assert_eq!(
            (posts.read, posts.write),
            (Access::Anyone, Access::Authenticated)
        );
        let channel = namespaces.for_channel("records:secrets");
        assert_eq!(channel.subscribe, Access::Authenticated);
        assert_eq!(channel.read_history, Access::Authenticated);
        assert_eq!(channel.publish, Access::Server);
        assert_eq!(
            namespaces.for_channel("records:posts").subscribe,
            Access::Anyone
        );
        let bad: HashMap<String, CollectionRule> =
            toml::from_str("[\"no way\"]\nread = \"anyone\"").expect("toml");
        assert!(Namespaces::default().with_collections(&bad).is_err());
    }

    #[test]
    fn access_rules_decide_by_caller_and_token() {
        let anonymous = ClientAuth::default();
        let ana = ClientAuth {
            user: Some("ana".into()),
            channels: vec!["private:ana-*".into(), "private:team".into()],
            expires_at: None,
            meta: None,
        };
        let client = |auth| Caller::Client(auth);
        assert!(Access::Anyone.allows(client(&anonymous), "x:y"));
        assert!(!Access::Authenticated.allows(client(&anonymous), "x:y"));
        assert!(Access::Authenticated.allows(client(&ana), "x:y"));
        assert!(Access::TokenChannels.allows(client(&ana), "private:ana-inbox"));
        assert!(Access::TokenChannels.allows(client(&ana), "private:team"));
        assert!(!Access::TokenChannels.allows(client(&ana), "private:teams"));
        assert!(!Access::TokenChannels.allows(client(&ana), "private:bo-inbox"));
        assert!(!Access::Server.allows(client(&ana), "x:y"));
        assert!(Access::Server.allows(Caller::Server, "x:y"));
        let legacy: NamespaceConfig = toml::from_str("publish = \"clients\"").expect("toml");
        assert_eq!(legacy.publish, Some(Access::Anyone));
    }

    #[test]
    fn bad_tables_are_refused() {
        assert!(toml::from_str::<HashMap<String, NamespaceConfig>>("[a]\npublsh = \"x\"").is_err());
        let configured: HashMap<String, NamespaceConfig> =
            toml::from_str("[a]\nhistory_ttl = \"soon\"").expect("valid toml");
        assert!(Namespaces::new(&configured).is_err());
        let configured: HashMap<String, NamespaceConfig> =
            toml::from_str("[\"Bad Name\"]\nbinary = true").expect("valid toml");
        assert!(Namespaces::new(&configured).is_err());
    }
}
