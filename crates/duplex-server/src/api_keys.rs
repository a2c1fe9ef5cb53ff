//! API keys for the server API and the records API, each with the scopes it grants.
//!
//! `--api-key KEY` is one key with every scope; `[[api_keys]]` tables in `duplex.toml` add named
//! keys with a list of scopes. Keys are compared in constant time, every configured key on every
//! check, so a guess reveals neither how much of it was right nor which key it came close to.

use serde::Deserialize;
use subtle::ConstantTimeEq as _;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
pub enum Scope {
    /// `POST /api/channels/{channel}/publish`.
    #[serde(rename = "channels:publish")]
    ChannelsPublish,
    /// `GET /api/channels`, `…/history`, `…/presence`.
    #[serde(rename = "channels:read")]
    ChannelsRead,
    /// `GET /api/connections`, `POST /api/connections/{id}/request`, `POST /api/users/{user}/request`.
    #[serde(rename = "connections")]
    Connections,
    /// The records API with the server's rights: passes every collection's read and write rule.
    #[serde(rename = "records")]
    Records,
    /// Everything above.
    #[serde(rename = "*")]
    All,
}

impl Scope {
    /// The name used in `duplex.toml` and in error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::ChannelsPublish => "channels:publish",
            Scope::ChannelsRead => "channels:read",
            Scope::Connections => "connections",
            Scope::Records => "records",
            Scope::All => "*",
        }
    }
}

/// One `[[api_keys]]` table.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// A name for logs and errors (never the key itself).
    #[serde(default)]
    pub name: Option<String>,
    /// The secret the client sends as `Authorization: Bearer KEY`.
    pub key: String,
    /// What the key grants.
    pub scopes: Vec<Scope>,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// The answer to "what does this bearer value grant?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCheck {
    /// No key is configured: the server API is open (bind to loopback then).
    Open,
    /// A configured key with this scope.
    Granted,
    /// A configured key without this scope.
    MissingScope,
    /// Not one of the configured keys.
    Unknown,
}

/// Every configured key.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: Vec<ApiKey>,
}

impl ApiKeys {
    /// `--api-key` (every scope) and the `[[api_keys]]` tables; empty keys are refused.
    pub fn new(all_scopes: Option<&str>, scoped: &[ApiKey]) -> Result<ApiKeys, String> {
        let mut keys: Vec<ApiKey> = all_scopes
            .map(|key| ApiKey {
                name: Some("api_key".into()),
                key: key.to_owned(),
                scopes: vec![Scope::All],
            })
            .into_iter()
            .collect();
        for (i, key) in scoped.iter().enumerate() {
            let name = key.name.clone().unwrap_or_else(|| format!("api_keys[{i}]"));
            if key.key.len() < 16 {
                return Err(format!(
                    "{name}: use a key of at least 16 characters; a short key can be guessed"
                ));
            }
            if key.scopes.is_empty() {
                return Err(format!("{name}: list at least one scope"));
            }
            keys.push(ApiKey {
                name: Some(name),
                ..key.clone()
            });
        }
        Ok(ApiKeys { keys })
    }

    /// Whether any key is configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// What `given` (the bearer value, if any) grants for `scope`.
    pub fn check(&self, given: Option<&str>, scope: Scope) -> KeyCheck {
        if self.keys.is_empty() {
            return KeyCheck::Open;
        }
        let Some(given) = given else {
            return KeyCheck::Unknown;
        };
        // Compare against every key whatever the outcome, so timing tells nothing.
        let mut matched: Option<&ApiKey> = None;
        for key in &self.keys {
            if bool::from(key.key.as_bytes().ct_eq(given.as_bytes())) {
                matched = Some(key);
            }
        }
        match matched {
            None => KeyCheck::Unknown,
            Some(key) if key.scopes.iter().any(|s| *s == scope || *s == Scope::All) => {
                KeyCheck::Granted
            }
            Some(_) => KeyCheck::MissingScope,
        }
    }
}

/// Who a bearer value is, as far as API keys go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity<'a> {
    /// No key is configured: everything is open.
    Open,
    /// A configured key: its name and scopes.
    Key {
        /// The key's name.
        name: &'a str,
        /// What it grants.
        scopes: &'a [Scope],
    },
    /// No bearer value, while keys are configured.
    Missing,
    /// Not one of the configured keys.
    Unknown,
}

impl ApiKeys {
    /// Which configured key `given` is, compared in constant time against every key.
    pub fn identify(&self, given: Option<&str>) -> Identity<'_> {
        if self.keys.is_empty() {
            return Identity::Open;
        }
        let Some(given) = given else {
            return Identity::Missing;
        };
        let mut matched: Option<&ApiKey> = None;
        for key in &self.keys {
            if bool::from(key.key.as_bytes().ct_eq(given.as_bytes())) {
                matched = Some(key);
            }
        }
        match matched {
            Some(key) => Identity::Key {
                name: key.name.as_deref().unwrap_or("api_key"),
                scopes: &key.scopes,
            },
            None => Identity::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_grant_only_their_scopes() {
        let scoped: Vec<ApiKey> = toml::from_str::<std::collections::HashMap<String, Vec<ApiKey>>>(
            "[[k]]\nname = \"pub\"\nkey = \"publisher-key-0123456789\"\nscopes = [\"channels:publish\"]\n",
        )
        .expect("toml")
        .remove("k")
        .expect("k");
        let keys = ApiKeys::new(Some("admin"), &scoped).expect("valid");
        let publish = Scope::ChannelsPublish;
        assert_eq!(keys.check(Some("admin"), Scope::Records), KeyCheck::Granted);
        assert_eq!(
            keys.check(Some("publisher-key-0123456789"), publish),
            KeyCheck::Granted
        );
        assert_eq!(
            keys.check(Some("publisher-key-0123456789"), Scope::Connections),
            KeyCheck::MissingScope
        );
        assert_eq!(keys.check(Some("guess"), publish), KeyCheck::Unknown);
        assert_eq!(keys.check(None, publish), KeyCheck::Unknown);
        assert_eq!(ApiKeys::default().check(None, publish), KeyCheck::Open);
        assert_eq!(
            keys.identify(Some("publisher-key-0123456789")),
            Identity::Key {
                name: "pub",
                scopes: &[Scope::ChannelsPublish]
            }
        );
        assert_eq!(keys.identify(Some("guess")), Identity::Unknown);
        assert_eq!(keys.identify(None), Identity::Missing);
        assert_eq!(ApiKeys::default().identify(None), Identity::Open);
    }

    #[test]
    fn weak_or_useless_keys_are_refused() {
        let short = ApiKey {
            name: None,
            key: "short".into(),
            scopes: vec![Scope::All],
        };
        assert!(ApiKeys::new(None, &[short]).is_err());
        let unscoped = ApiKey {
            name: Some("x".into()),
            key: "long-enough-key-0123456789".into(),
            scopes: vec![],
        };
        assert!(ApiKeys::new(None, &[unscoped]).is_err());
    }
}
