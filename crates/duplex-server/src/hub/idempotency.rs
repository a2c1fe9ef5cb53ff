//! Idempotent publishing. A publish can fail in a way that leaves its outcome unknown (the
//! answer was lost with the connection, or the broker answered after the node stopped waiting:
//! a `503` that was published after all), and a publisher that retries would then publish
//! twice. A publisher that names its publication with a key gets, on a retry with the same key
//! in the same channel within [`WINDOW`], the first publication's offset and epoch
//! (`replayed`) instead of a second publication. The same key with different data is refused
//! (`idempotency_key_reused`): a key names one publication.
//!
//! With a broker the broker keeps the keys, atomically with the publication (Redis: in the
//! publish script; NATS: JetStream's message-id deduplication), so a retry on another node is
//! recognised too. Without one this node keeps them here, at most [`MAX_KEYS`] (the oldest go
//! first), each for [`WINDOW`]; where a namespace's history is in the store, the store also
//! keeps each key with its publication ([`crate::broker::ChannelLog::publish_keyed`]), so that a
//! retry after a restart is recognised.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use super::{HubError, PublishOutcome};
use crate::broker::encode_payload;
use crate::model::Payload;

/// How long a key names its publication.
pub const WINDOW: Duration = Duration::from_secs(120);
/// The longest key.
pub const MAX_KEY_LEN: usize = 128;
/// Keys this node keeps without a broker (about 300 bytes each at most).
const MAX_KEYS: usize = 65_536;

/// A publisher's idempotency key: 1 to [`MAX_KEY_LEN`] visible ASCII characters (a UUID, say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(Box<str>);

impl IdempotencyKey {
    /// Checks a key as a client sent it.
    pub fn parse(key: &str) -> Result<IdempotencyKey, HubError> {
        let valid = !key.is_empty()
            && key.len() <= MAX_KEY_LEN
            && key.bytes().all(|b| b.is_ascii_graphic());
        if valid {
            Ok(IdempotencyKey(key.into()))
        } else {
            Err(HubError::InvalidIdempotencyKey)
        }
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a key's publication carried, to tell a retry from a different publication under the
/// same key: the first 16 bytes of the SHA-256 of the payload as brokers carry it, in hex.
pub(crate) fn digest(payload: &Payload) -> String {
    digest_of_body(&encode_payload(payload))
}

/// [`digest`] of a payload already in its broker form ([`encode_payload`]).
pub(crate) fn digest_of_body(body: &[u8]) -> String {
    Sha256::digest(body)[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A key's entry.
#[derive(Debug)]
struct Slot {
    digest: String,
    /// `None` while the publication is under way.
    outcome: Option<PublishOutcome>,
    since: Instant,
}

type Name = (Arc<str>, Box<str>);

/// This node's keys (used without a broker).
#[derive(Debug, Default)]
pub(super) struct Keys {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    slots: HashMap<Name, Slot>,
    /// Keys in the order they were claimed, to expire and evict the oldest first.
    order: VecDeque<(Instant, Name)>,
}

/// What a claim found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Claim {
    /// A new key: publish, then [`Keys::settle`].
    New,
    /// The key's publication, published before.
    Earlier(PublishOutcome),
}

impl Keys {
    /// Claims `key` in `channel` for a publication whose [`digest`] is `digest`.
    pub(super) fn claim(
        &self,
        channel: &Arc<str>,
        key: &IdempotencyKey,
        digest: &str,
        now: Instant,
    ) -> Result<Claim, HubError> {
        let mut inner = self.inner.lock();
        inner.expire(now);
        let name: Name = (channel.clone(), key.0.clone());
        if let Some(slot) = inner.slots.get(&name) {
            if slot.digest != digest {
                return Err(HubError::IdempotencyKeyReused);
            }
            return match &slot.outcome {
                Some(outcome) => Ok(Claim::Earlier(outcome.clone())),
                None => Err(HubError::IdempotencyKeyInUse),
            };
        }
        // Full (counting the claims of failed publications, whose slots went but whose place
        // in the order stays until it expires): the oldest go first.
        while inner.slots.len() >= MAX_KEYS || inner.order.len() >= 2 * MAX_KEYS {
            let Some((since, oldest)) = inner.order.pop_front() else {
                break;
            };
            inner.remove_if_since(&oldest, since);
        }
        inner.slots.insert(
            name.clone(),
            Slot {
                digest: digest.to_owned(),
                outcome: None,
                since: now,
            },
        );
        inner.order.push_back((now, name));
        Ok(Claim::New)
    }

    /// Records how the claimed key's publication went: its outcome, kept for retries, or, when
    /// it failed (or never ran), nothing, so that a retry publishes.
    pub(super) fn settle(
        &self,
        channel: &Arc<str>,
        key: &IdempotencyKey,
        outcome: Option<&PublishOutcome>,
    ) {
        let mut inner = self.inner.lock();
        let name: Name = (channel.clone(), key.0.clone());
        match outcome {
            Some(outcome) => {
                if let Some(slot) = inner.slots.get_mut(&name) {
                    slot.outcome = Some(outcome.clone());
                }
            }
            None => {
                if inner.slots.get(&name).is_some_and(|s| s.outcome.is_none()) {
                    inner.slots.remove(&name);
                }
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().slots.len()
    }

    #[cfg(test)]
    fn order_len(&self) -> usize {
        self.inner.lock().order.len()
    }
}

impl Inner {
    /// Forgets keys older than [`WINDOW`].
    fn expire(&mut self, now: Instant) {
        while let Some((since, _)) = self.order.front() {
            if now.duration_since(*since) < WINDOW {
                break;
            }
            let Some((since, name)) = self.order.pop_front() else {
                break;
            };
            self.remove_if_since(&name, since);
        }
    }

    /// Removes `name` if its slot is the one claimed at `since` (not a newer claim of the same
    /// key after the old one went).
    fn remove_if_since(&mut self, name: &Name, since: Instant) {
        if self.slots.get(name).is_some_and(|s| s.since == since) {
            self.slots.remove(name);
        }
    }
}

/// Settles a claim when dropped: a publication whose future was dropped (its HTTP client went
/// away) frees its key rather than holding it `in use` for the whole window.
pub(super) struct ClaimGuard<'a> {
    pub(super) keys: &'a Keys,
    pub(super) channel: Arc<str>,
    pub(super) key: &'a IdempotencyKey,
    pub(super) settled: bool,
}

impl ClaimGuard<'_> {
    pub(super) fn settle(mut self, outcome: Option<&PublishOutcome>) {
        self.keys.settle(&self.channel, self.key, outcome);
        self.settled = true;
    }
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.keys.settle(&self.channel, self.key, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(offset: u64) -> PublishOutcome {
        PublishOutcome {
            offset,
            epoch: "e".into(),
            replayed: false,
        }
    }

    fn key(text: &str) -> IdempotencyKey {
        IdempotencyKey::parse(text).expect("valid")
    }

    #[test]
    fn keys_are_short_visible_ascii() {
        assert!(IdempotencyKey::parse("6f1c0a2e-7d4b-4c1e-9a55-0e3b5d2f8c71").is_ok());
        for bad in ["", "with space", "tab\t", "é", &"k".repeat(MAX_KEY_LEN + 1)] {
            assert_eq!(
                IdempotencyKey::parse(bad),
                Err(HubError::InvalidIdempotencyKey),
                "{bad:?}"
            );
        }
        assert!(IdempotencyKey::parse(&"k".repeat(MAX_KEY_LEN)).is_ok());
    }

    #[test]
    fn a_retry_gets_the_first_outcome_and_other_data_is_refused() {
        let keys = Keys::default();
        let (channel, k, now) = (Arc::from("feed:a"), key("k1"), Instant::now());
        assert_eq!(keys.claim(&channel, &k, "d1", now), Ok(Claim::New));
        // Under way: a concurrent retry is told so.
        assert_eq!(
            keys.claim(&channel, &k, "d1", now),
            Err(HubError::IdempotencyKeyInUse)
        );
        keys.settle(&channel, &k, Some(&outcome(7)));
        assert_eq!(
            keys.claim(&channel, &k, "d1", now),
            Ok(Claim::Earlier(outcome(7)))
        );
        assert_eq!(
            keys.claim(&channel, &k, "d2", now),
            Err(HubError::IdempotencyKeyReused)
        );
        // Keys are per channel.
        assert_eq!(
            keys.claim(&Arc::from("feed:b"), &k, "d2", now),
            Ok(Claim::New)
        );
    }

    #[test]
    fn a_failed_or_dropped_publication_frees_its_key() {
        let keys = Keys::default();
        let (channel, k, now) = (Arc::from("feed:a"), key("k1"), Instant::now());
        assert_eq!(keys.claim(&channel, &k, "d1", now), Ok(Claim::New));
        keys.settle(&channel, &k, None);
        assert_eq!(keys.claim(&channel, &k, "d1", now), Ok(Claim::New));
        drop(ClaimGuard {
            keys: &keys,
            channel: channel.clone(),
            key: &k,
            settled: false,
        });
        assert_eq!(keys.claim(&channel, &k, "d1", now), Ok(Claim::New));
        // A settled claim stays.
        ClaimGuard {
            keys: &keys,
            channel: channel.clone(),
            key: &k,
            settled: false,
        }
        .settle(Some(&outcome(1)));
        assert_eq!(
            keys.claim(&channel, &k, "d1", now),
            Ok(Claim::Earlier(outcome(1)))
        );
    }

    #[test]
    fn keys_expire_after_the_window_and_the_oldest_go_first_when_full() {
        let keys = Keys::default();
        let (channel, now) = (Arc::from("feed:a"), Instant::now());
        keys.claim(&channel, &key("old"), "d", now).expect("claim");
        keys.settle(&channel, &key("old"), Some(&outcome(1)));
        let later = now + WINDOW;
        assert_eq!(
            keys.claim(&channel, &key("old"), "d", later),
            Ok(Claim::New)
        );
        assert_eq!(keys.len(), 1);
        for i in 0..MAX_KEYS + 10 {
            keys.claim(&channel, &key(&format!("k{i}")), "d", later)
                .expect("claim");
        }
        assert_eq!(keys.len(), MAX_KEYS);
        // The first ones went to make room; the newest are kept.
        assert_eq!(
            keys.claim(&channel, &key("old"), "d", later),
            Ok(Claim::New)
        );
        assert_eq!(
            keys.claim(&channel, &key(&format!("k{}", MAX_KEYS + 9)), "d", later),
            Err(HubError::IdempotencyKeyInUse)
        );
    }

    #[test]
    fn failed_publications_do_not_grow_the_table_past_its_bound() {
        let keys = Keys::default();
        let (channel, now) = (Arc::from("feed:a"), Instant::now());
        for i in 0..2 * MAX_KEYS + 100 {
            let k = key(&format!("k{i}"));
            keys.claim(&channel, &k, "d", now).expect("claim");
            keys.settle(&channel, &k, None);
        }
        assert_eq!(keys.len(), 0);
        assert!(keys.order_len() <= 2 * MAX_KEYS, "{}", keys.order_len());
    }

    #[test]
    fn the_digest_tells_payloads_apart() {
        let json = |text: &str| {
            Payload::Json(serde_json::value::RawValue::from_string(text.into()).expect("json"))
        };
        assert_eq!(digest(&json("[1]")), digest(&json("[1]")));
        assert_ne!(digest(&json("[1]")), digest(&json("[2]")));
        assert_ne!(
            digest(&json("\"AQ==\"")),
            digest(&Payload::Binary(bytes::Bytes::from_static(&[1])))
        );
        assert_eq!(digest(&json("1")).len(), 32);
    }
}
