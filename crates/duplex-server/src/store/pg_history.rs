//! Channel history in PostgreSQL ([`crate::store::history`]), for one node without a broker on
//! a PostgreSQL store: the same tables and rules as the SQLite file's (`sqlite/history.rs`).
//!
//! One task appends: it takes the publications waiting (up to [`MAX_BATCH`]) into one
//! transaction, so a busy channel costs few commits, and after `COMMIT` hands them to the hub in
//! commit order, then answers each publisher. Offsets come from the channel's row, locked for
//! the transaction, so they follow commit order. Record events are not appended here: a record
//! write on PostgreSQL commits on a pooled connection of its own, so its event could not join
//! its transaction; `records:` channels keep their history in memory on PostgreSQL.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::value::RawValue;
use sqlx::postgres::PgPool;
use sqlx::{Postgres, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::StoreError;
use super::history::{
    Delivery, DeliverySender, HistoryStore, UNDELIVERED, Undelivered, trim_step, window_floor,
};
use super::now_micros;
use crate::broker::{
    BrokerError, BrokerHistory, ChannelLog, HistoryRange, Once, Retention, Stored, Told,
};
use crate::model::Payload;

/// The most publications one transaction gathers.
const MAX_BATCH: usize = 256;

/// Publications waiting for the appending task.
const QUEUE: usize = 4096;

/// A publication waiting to be appended.
struct Append {
    channel: Arc<str>,
    payload: Arc<Payload>,
    retention: Retention,
    told: Option<Told>,
    /// The idempotency key and the payload's digest, kept beside the publication.
    keyed: Option<(String, String)>,
    place: tokio::sync::OwnedSemaphorePermit,
    reply: oneshot::Sender<Result<Once, String>>,
}

/// The channel history of a PostgreSQL store.
#[derive(Debug)]
pub(crate) struct PgHistory {
    pool: PgPool,
    epoch: Arc<str>,
    appends: mpsc::Sender<Append>,
    undelivered: Undelivered,
}

impl PgHistory {
    /// Hands a publication to the appending task and waits for its commit.
    async fn append(
        &self,
        channel: &str,
        payload: &Payload,
        retention: Retention,
        told: Option<Told>,
        keyed: Option<(String, String)>,
    ) -> Result<Once, BrokerError> {
        let place = self.undelivered.place().await;
        let (reply, answer) = oneshot::channel();
        self.appends
            .send(Append {
                channel: channel.into(),
                payload: Arc::new(payload.clone()),
                retention,
                told,
                keyed,
                place,
                reply,
            })
            .await
            .map_err(|_| unavailable("the appending task stopped"))?;
        answer
            .await
            .map_err(|_| unavailable("the appending task stopped"))?
            .map_err(unavailable)
    }

    /// Starts the appending task; committed publications go to `deliveries`. `epoch` is the
    /// store's channel epoch (kept with its secrets).
    pub(crate) fn start(pool: PgPool, epoch: Arc<str>, deliveries: DeliverySender) -> PgHistory {
        let (appends, queue) = mpsc::channel(QUEUE);
        tokio::spawn(append_until_closed(
            pool.clone(),
            epoch.clone(),
            queue,
            deliveries,
        ));
        PgHistory {
            pool,
            epoch,
            appends,
            undelivered: Undelivered::new(UNDELIVERED),
        }
    }
}

async fn append_until_closed(
    pool: PgPool,
    epoch: Arc<str>,
    mut queue: mpsc::Receiver<Append>,
    deliveries: DeliverySender,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(append) => batch.push(append),
                Err(_) => break,
            }
        }
        // What the transaction needs of each (an `Append` holds its `told`, which is not `Sync`).
        let parts: Vec<Part> = batch
            .iter()
            .map(|a| Part {
                channel: a.channel.clone(),
                payload: a.payload.clone(),
                retention: a.retention,
                keyed: a.keyed.clone(),
            })
            .collect();
        match append_all(&pool, &epoch, &parts).await {
            Ok(outcomes) => {
                for (append, once) in batch.drain(..).zip(outcomes) {
                    if let Once::Published { offset, epoch } = &once {
                        let _ = deliveries.send(Delivery {
                            channel: append.channel,
                            offset: *offset,
                            epoch: epoch.clone(),
                            payload: append.payload,
                            told: append.told,
                            delivered: None,
                            place: Some(append.place),
                        });
                    }
                    let _ = append.reply.send(Ok(once));
                }
            }
            Err(error) => {
                let why = error.to_string();
                tracing::error!(%why, publications = batch.len(), "cannot append channel history");
                for append in batch.drain(..) {
                    let _ = append.reply.send(Err(why.clone()));
                }
            }
        }
    }
}

/// What a publication appends: its channel, payload, bounds, and key with its digest.
struct Part {
    channel: Arc<str>,
    payload: Arc<Payload>,
    retention: Retention,
    keyed: Option<(String, String)>,
}

/// Appends the batch in one transaction; what each did, in order.
async fn append_all(pool: &PgPool, epoch: &str, batch: &[Part]) -> Result<Vec<Once>, sqlx::Error> {
    let now_us = now_micros();
    let mut tx = pool.begin().await?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for append in batch {
        outcomes.push(append_keyed(&mut tx, epoch, append, now_us).await?);
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// Appends one publication, and keeps its idempotency key beside it; a key that names an
/// earlier publication still in its window answers that one, and nothing is appended.
async fn append_keyed(
    tx: &mut Transaction<'_, Postgres>,
    epoch: &str,
    append: &Part,
    now_us: i64,
) -> Result<Once, sqlx::Error> {
    let channel = &*append.channel;
    let Some((key, digest)) = &append.keyed else {
        let (offset, epoch) = append_one(tx, epoch, append, now_us).await?;
        return Ok(Once::Published { offset, epoch });
    };
    let earlier: Option<(i64, String, String)> = sqlx::query_as(
        "SELECT seq, epoch, digest FROM publish_keys \
         WHERE channel = $1 AND key = $2 AND expires_us > $3",
    )
    .bind(channel)
    .bind(key)
    .bind(now_us)
    .fetch_optional(&mut **tx)
    .await?;
    if let Some((offset, epoch, digest)) = earlier {
        return Ok(Once::Earlier {
            offset: offset as u64,
            epoch: epoch.into(),
            digest,
        });
    }
    let (offset, epoch) = append_one(tx, epoch, append, now_us).await?;
    let window = crate::hub::idempotency::WINDOW.as_micros() as i64;
    sqlx::query(
        "INSERT INTO publish_keys (channel, key, seq, epoch, digest, expires_us) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (channel, key) DO UPDATE SET \
         seq = EXCLUDED.seq, epoch = EXCLUDED.epoch, digest = EXCLUDED.digest, \
         expires_us = EXCLUDED.expires_us",
    )
    .bind(channel)
    .bind(key)
    .bind(offset as i64)
    .bind(&*epoch)
    .bind(digest)
    .bind(now_us.saturating_add(window))
    .execute(&mut **tx)
    .await?;
    Ok(Once::Published { offset, epoch })
}

async fn append_one(
    tx: &mut Transaction<'_, Postgres>,
    epoch: &str,
    append: &Part,
    now_us: i64,
) -> Result<(u64, Arc<str>), sqlx::Error> {
    let (channel, payload, retention) = (&*append.channel, &append.payload, &append.retention);
    let (binary, body): (bool, &[u8]) = match &**payload {
        Payload::Json(raw) => (false, raw.get().as_bytes()),
        Payload::Binary(data) => (true, data),
    };
    let expires_us = now_us.saturating_add(retention.ttl.as_micros() as i64);
    // One statement moves the channel on (its row made, in the store's epoch, the first time)
    // and appends the entry. The row stays locked until COMMIT, so offsets follow commit order.
    let (epoch, offset, mut bytes): (String, i64, i64) = sqlx::query_as(ADVANCE_AND_APPEND)
        .bind(channel)
        .bind(epoch)
        .bind(body.len() as i64)
        .bind(expires_us)
        .bind(binary)
        .bind(body)
        .fetch_one(&mut **tx)
        .await?;
    // The size bound in steps, as in the SQLite file (`trim_step`): reads skip what waits.
    let (top, size) = (offset as u64, retention.size.max(1) as u64);
    if top > size && (top - size).is_multiple_of(trim_step(size)) {
        bytes = sqlx::query_scalar(TRIM_TO_SIZE)
            .bind(channel)
            .bind(window_floor(top, retention.size) as i64)
            .fetch_one(&mut **tx)
            .await?;
    }
    let counted = bytes;
    while bytes > retention.bytes as i64 {
        let oldest: Option<(i64, i32)> = sqlx::query_as(
            "SELECT seq, octet_length(payload) FROM channel_log_entries WHERE channel = $1 \
             ORDER BY seq LIMIT 1",
        )
        .bind(channel)
        .fetch_optional(&mut **tx)
        .await?;
        let Some((seq, size)) = oldest else { break };
        if seq >= offset {
            // The newest always stays.
            break;
        }
        sqlx::query("DELETE FROM channel_log_entries WHERE channel = $1 AND seq = $2")
            .bind(channel)
            .bind(seq)
            .execute(&mut **tx)
            .await?;
        bytes -= i64::from(size);
    }
    if bytes != counted {
        sqlx::query("UPDATE channel_logs SET bytes = $2 WHERE channel = $1")
            .bind(channel)
            .bind(bytes.max(0))
            .execute(&mut **tx)
            .await?;
    }
    Ok((offset as u64, epoch.into()))
}

/// Moves a channel to its next offset and appends the publication there: `$1` channel, `$2`
/// the store's epoch (for a channel's first publication), `$3` the payload's length, `$4`
/// expiry, `$5` binary or not, `$6` the payload. Its epoch, new offset and bytes kept.
const ADVANCE_AND_APPEND: &str = "\
    WITH log AS ( \
        INSERT INTO channel_logs AS l (channel, epoch, top, bytes) VALUES ($1, $2, 1, $3) \
        ON CONFLICT (channel) DO UPDATE SET top = l.top + 1, bytes = l.bytes + EXCLUDED.bytes \
        RETURNING l.epoch, l.top, l.bytes), \
    entry AS ( \
        INSERT INTO channel_log_entries (channel, seq, expires_us, is_binary, payload) \
        SELECT $1, top, $4, $5, $6 FROM log) \
    SELECT epoch, top, bytes FROM log";

/// Deletes a channel's entries up to `$2` (those its size bound pushed out) and takes their
/// bytes off its count; the bytes left.
const TRIM_TO_SIZE: &str = "\
    WITH freed AS ( \
        DELETE FROM channel_log_entries WHERE channel = $1 AND seq <= $2 \
        RETURNING octet_length(payload) AS n) \
    UPDATE channel_logs SET bytes = bytes - (SELECT COALESCE(SUM(n), 0) FROM freed) \
    WHERE channel = $1 RETURNING bytes";

fn unavailable(error: impl std::fmt::Display) -> BrokerError {
    BrokerError(format!("the store's channel history: {error}"))
}

fn stored(seq: i64, binary: bool, body: Vec<u8>) -> Result<Stored, BrokerError> {
    let payload = if binary {
        Payload::Binary(Bytes::from(body))
    } else {
        let text = String::from_utf8(body).map_err(unavailable)?;
        Payload::Json(RawValue::from_string(text).map_err(unavailable)?)
    };
    Ok(Stored {
        offset: seq as u64,
        payload,
    })
}

#[async_trait]
impl ChannelLog for PgHistory {
    async fn publish(
        &self,
        channel: &str,
        payload: &Payload,
        retention: Retention,
        told: Option<Told>,
    ) -> Result<(u64, Arc<str>), BrokerError> {
        match self.append(channel, payload, retention, told, None).await? {
            Once::Published { offset, epoch } => Ok((offset, epoch)),
            Once::Earlier { .. } => {
                Err(unavailable("an append without a key named an earlier one"))
            }
        }
    }

    async fn publish_keyed(
        &self,
        channel: &str,
        payload: &Payload,
        retention: Retention,
        told: Option<Told>,
        key: &str,
        digest: &str,
    ) -> Result<Once, BrokerError> {
        let keyed = Some((key.to_owned(), digest.to_owned()));
        self.append(channel, payload, retention, told, keyed).await
    }

    async fn history(
        &self,
        channel: &str,
        range: HistoryRange,
        retention: Retention,
    ) -> Result<BrokerHistory, BrokerError> {
        let now_us = now_micros();
        // One snapshot for the position and the entries.
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        let position: Option<(String, i64)> =
            sqlx::query_as("SELECT epoch, top FROM channel_logs WHERE channel = $1")
                .bind(channel)
                .fetch_optional(&mut *tx)
                .await
                .map_err(unavailable)?;
        let Some((epoch, top)) = position else {
            tx.commit().await.map_err(unavailable)?;
            // Never published: offset 0 in the store's epoch, which the first publication keeps.
            return Ok(BrokerHistory {
                top: 0,
                epoch: self.epoch.clone(),
                oldest: None,
                publications: Vec::new(),
            });
        };
        // Entries at or below the window's floor wait for the next trim step: never read.
        let floor = window_floor(top as u64, retention.size) as i64;
        let oldest: Option<i64> = sqlx::query_scalar(
            "SELECT seq FROM channel_log_entries WHERE channel = $1 AND seq > $2 \
             AND expires_us > $3 ORDER BY seq LIMIT 1",
        )
        .bind(channel)
        .bind(floor)
        .bind(now_us)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
        let rows: Vec<(i64, bool, Vec<u8>)> = match range {
            HistoryRange::None => Vec::new(),
            HistoryRange::After { offset, limit } => sqlx::query_as(
                "SELECT seq, is_binary, payload FROM channel_log_entries WHERE channel = $1 \
                 AND seq > $2 AND expires_us > $3 ORDER BY seq LIMIT $4",
            )
            .bind(channel)
            .bind(i64::try_from(offset).unwrap_or(i64::MAX).max(floor))
            .bind(now_us)
            .bind(limit as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?,
            HistoryRange::Last(limit) => {
                let mut last: Vec<(i64, bool, Vec<u8>)> = sqlx::query_as(
                    "SELECT seq, is_binary, payload FROM channel_log_entries WHERE channel = $1 \
                     AND seq > $2 AND expires_us > $3 ORDER BY seq DESC LIMIT $4",
                )
                .bind(channel)
                .bind(floor)
                .bind(now_us)
                .bind(limit as i64)
                .fetch_all(&mut *tx)
                .await
                .map_err(unavailable)?;
                last.reverse();
                last
            }
        };
        tx.commit().await.map_err(unavailable)?;
        let publications = rows
            .into_iter()
            .map(|(seq, binary, body)| stored(seq, binary, body))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(BrokerHistory {
            top: top as u64,
            epoch: epoch.into(),
            oldest: oldest.map(|seq| seq as u64),
            publications,
        })
    }
}

#[async_trait]
impl HistoryStore for PgHistory {
    fn keeps_record_events(&self) -> bool {
        false
    }

    async fn expire(&self, limit: usize) -> Result<usize, StoreError> {
        let mut tx = self.pool.begin().await?;
        let gone: Vec<(String, i32)> = sqlx::query_as(
            "DELETE FROM channel_log_entries WHERE id IN (SELECT id FROM channel_log_entries \
             WHERE expires_us <= $1 ORDER BY expires_us LIMIT $2) \
             RETURNING channel, octet_length(payload)",
        )
        .bind(now_micros())
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await?;
        let mut freed: HashMap<&str, i64> = HashMap::new();
        for (channel, size) in &gone {
            *freed.entry(channel).or_default() += i64::from(*size);
        }
        for (channel, bytes) in freed {
            sqlx::query(
                "UPDATE channel_logs SET bytes = GREATEST(bytes - $2, 0) WHERE channel = $1",
            )
            .bind(channel)
            .bind(bytes)
            .execute(&mut *tx)
            .await?;
        }
        let keys = sqlx::query(
            "DELETE FROM publish_keys WHERE (channel, key) IN (SELECT channel, key \
             FROM publish_keys WHERE expires_us <= $1 LIMIT $2)",
        )
        .bind(now_micros())
        // Expired keys in what is left of the batch, so that a full batch still says that more
        // may be waiting.
        .bind((limit - gone.len()) as i64)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(gone.len() + keys as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::PgHistory;
    use crate::broker::{ChannelLog, HistoryRange, Once, Retention};
    use crate::store::history::HistoryStore as _;
    use crate::store::history::testing::{json, retention};

    /// The offsets read back, the bytes the channel's row counts against those stored, and
    /// the entries stored.
    async fn kept(
        history: &PgHistory,
        channel: &str,
        bounds: Retention,
    ) -> (Vec<u64>, i64, i64, i64) {
        let read = history
            .history(
                channel,
                HistoryRange::After {
                    offset: 0,
                    limit: 1000,
                },
                bounds,
            )
            .await
            .expect("history");
        let counted: i64 = sqlx::query_scalar("SELECT bytes FROM channel_logs WHERE channel = $1")
            .bind(channel)
            .fetch_one(&history.pool)
            .await
            .expect("count");
        let (stored, entries): (i64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(octet_length(payload)), 0)::BIGINT, COUNT(*) \
             FROM channel_log_entries WHERE channel = $1",
        )
        .bind(channel)
        .fetch_one(&history.pool)
        .await
        .expect("sum");
        let offsets = read.publications.iter().map(|p| p.offset).collect();
        (offsets, counted, stored, entries)
    }

    /// Offsets follow on from one row per channel; the size bound is kept in steps (up to a
    /// step's entries beyond the window wait, never read); the byte bound deletes the oldest
    /// (never the newest); the bytes counted are those stored.
    #[tokio::test]
    async fn appends_keep_the_bounds_and_count_the_bytes_stored() {
        let Some(url) = duplex_testkit::postgres_store() else {
            eprintln!("skipped: set DUPLEX_TEST_POSTGRES (postgres://…) to run");
            return;
        };
        let backend = crate::store::postgres::open(&url).await.expect("open");
        let (deliver, _deliveries) = tokio::sync::mpsc::unbounded_channel();
        let history = PgHistory::start(backend.pool(), "e1".into(), deliver);

        let window = retention(16, 1 << 20);
        assert_eq!(super::trim_step(16), 2);
        let (mut trims, mut entries_before) = (0, 0);
        for i in 1..=40u64 {
            let (offset, epoch) = history
                .publish("a:size", &json(&i.to_string()), window, None)
                .await
                .expect("publish");
            assert_eq!((offset, &*epoch), (i, "e1"));
            let (offsets, counted, stored, entries) = kept(&history, "a:size", window).await;
            assert_eq!(offsets, (i.saturating_sub(16) + 1..=i).collect::<Vec<_>>());
            assert_eq!(counted, stored, "at {i}");
            assert!(
                (i.min(16) as i64..=17).contains(&entries),
                "{entries} at {i}"
            );
            if entries < entries_before {
                trims += 1;
            }
            entries_before = entries;
            // `Last` and `oldest` see the window too.
            let last = history
                .history("a:size", HistoryRange::Last(3), window)
                .await
                .expect("history");
            let expected: Vec<u64> = (i.saturating_sub(3) + 1..=i).collect();
            assert_eq!(
                last.publications
                    .iter()
                    .map(|p| p.offset)
                    .collect::<Vec<_>>(),
                expected
            );
            assert_eq!(last.oldest, Some(i.saturating_sub(16) + 1));
        }
        // 40 appends past a window of 16 in steps of 2: trimmed at 18, 20, … 40.
        assert_eq!(trims, 12);

        // Ten-byte payloads under a 35-byte bound: three stay; one larger than the bound stays
        // alone, being the newest.
        let ten = json("\"12345678\"");
        let tight = retention(100, 35);
        for i in 1..=5u64 {
            history
                .publish("a:bytes", &ten, tight, None)
                .await
                .expect("publish");
            let (offsets, counted, stored, _) = kept(&history, "a:bytes", tight).await;
            assert_eq!(offsets, (i.saturating_sub(3) + 1..=i).collect::<Vec<_>>());
            assert_eq!(
                (counted, stored),
                (10 * i.min(3) as i64, 10 * i.min(3) as i64)
            );
        }
        let large = json(&format!("\"{}\"", "x".repeat(48)));
        history
            .publish("a:bytes", &large, tight, None)
            .await
            .expect("publish");
        let (offsets, counted, stored, _) = kept(&history, "a:bytes", tight).await;
        assert_eq!(offsets, vec![6]);
        assert_eq!((counted, stored), (50, 50));

        // A key is kept with its publication: a retry appends nothing; once the window passed,
        // the sweep deletes the key, within its batch.
        let first = history
            .publish_keyed("a:keys", &json("1"), window, None, "k", "d1")
            .await
            .expect("publish");
        assert!(
            matches!(first, Once::Published { offset: 1, .. }),
            "{first:?}"
        );
        let retry = history
            .publish_keyed("a:keys", &json("1"), window, None, "k", "d1")
            .await
            .expect("publish");
        assert!(
            matches!(&retry, Once::Earlier { offset: 1, digest, .. } if digest == "d1"),
            "{retry:?}"
        );
        assert_eq!(kept(&history, "a:keys", window).await.0, vec![1]);
        history
            .publish_keyed("a:keys", &json("2"), window, None, "k2", "d2")
            .await
            .expect("publish");
        sqlx::query("UPDATE publish_keys SET expires_us = 0")
            .execute(&history.pool)
            .await
            .expect("expire the keys");
        assert_eq!(history.expire(1).await.expect("expire"), 1);
        assert_eq!(history.expire(1).await.expect("expire"), 1);
        assert_eq!(history.expire(1).await.expect("expire"), 0);
    }
}
