//! Channel history in the SQLite file ([`crate::store::history`]): appends go through the one
//! writer, so a busy channel's publications share its group commits with the records writes,
//! and reads run on the read pool, each in one snapshot.
//!
//! Offsets are allocated inside the appending transaction from the channel's row in
//! `channel_logs`, so they follow commit order and a transaction that fails leaves no hole.
//! Every channel of one file has the same epoch, made once with the file: what the file keeps
//! is never lost while the file lives (trimming is told apart as `history_trimmed`), so an
//! epoch only needs to change with the file; a channel never published has no row, so
//! subscribing to a channel writes nothing.
//! Each append trims its own channel to its byte bound, and to its size bound in steps
//! ([`trim_step`]): a channel keeps up to a step's entries beyond its window, which reads skip
//! (they read only the last `size` offsets), so an append deletes a run of old entries once a
//! step instead of one with every append. Entries past their `expires_us` are never read, and
//! [`SqliteHistory::expire`] deletes them a bounded batch at a time.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension as _};
use serde_json::value::RawValue;

use super::{Readers, SqliteBackend, Writer};
use crate::broker::{
    BrokerError, BrokerHistory, ChannelLog, HistoryRange, Once, Retention, Stored, Told,
    bus::new_epoch,
};
use crate::model::Payload;
use crate::store::Record;
use crate::store::StoreError;
use crate::store::history::{
    Delivery, DeliverySender, HistoryStore, LogTo, Logged, UNDELIVERED, Undelivered, record_event,
    trim_step, window_floor,
};
use crate::store::now_micros;

const POSITION: &str = "SELECT epoch, top, bytes FROM channel_logs WHERE channel = ?1";
/// Moves a channel to its next offset, counting the new entry's bytes: one statement where a
/// read and a write were, as the writer appends for every record write.
const ADVANCE: &str = "UPDATE channel_logs SET top = top + 1, bytes = bytes + ?2 WHERE channel = ?1 \
                       RETURNING epoch, top, bytes";
const FIRST: &str = "INSERT INTO channel_logs (channel, epoch, top, bytes) VALUES (?1, ?2, 1, ?3) \
                     RETURNING epoch, top, bytes";
const SET_BYTES: &str = "UPDATE channel_logs SET bytes = ?2 WHERE channel = ?1";
const APPEND: &str = "INSERT INTO channel_log_entries (channel, seq, expires_us, is_binary, payload) \
                      VALUES (?1, ?2, ?3, ?4, ?5)";
const TRIM_TO: &str =
    "DELETE FROM channel_log_entries WHERE channel = ?1 AND seq <= ?2 RETURNING length(payload)";
const OLDEST: &str = "SELECT seq, length(payload) FROM channel_log_entries WHERE channel = ?1 \
                      ORDER BY seq LIMIT 1";
const DELETE_ONE: &str = "DELETE FROM channel_log_entries WHERE channel = ?1 AND seq = ?2";
const OLDEST_LIVE: &str = "SELECT seq FROM channel_log_entries WHERE channel = ?1 \
                           AND seq > ?2 AND expires_us > ?3 ORDER BY seq LIMIT 1";
const AFTER: &str = "SELECT seq, is_binary, payload FROM channel_log_entries WHERE channel = ?1 \
                     AND seq > ?2 AND expires_us > ?3 ORDER BY seq LIMIT ?4";
const LAST: &str = "SELECT seq, is_binary, payload FROM channel_log_entries WHERE channel = ?1 \
                    AND seq > ?2 AND expires_us > ?3 ORDER BY seq DESC LIMIT ?4";
const EXPIRE: &str = "DELETE FROM channel_log_entries WHERE id IN (SELECT id FROM \
                      channel_log_entries WHERE expires_us <= ?1 ORDER BY expires_us LIMIT ?2) \
                      RETURNING channel, length(payload)";
const LESS_BYTES: &str = "UPDATE channel_logs SET bytes = max(bytes - ?2, 0) WHERE channel = ?1";
const EXPIRE_KEYS: &str = "DELETE FROM publish_keys WHERE rowid IN (SELECT rowid FROM \
                           publish_keys WHERE expires_us <= ?1 LIMIT ?2)";
const KEPT_KEY: &str = "SELECT seq, epoch, digest FROM publish_keys \
                        WHERE channel = ?1 AND key = ?2 AND expires_us > ?3";
const KEEP_KEY: &str = "INSERT INTO publish_keys (channel, key, seq, epoch, digest, expires_us) \
                        VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (channel, key) DO UPDATE SET \
                        seq = excluded.seq, epoch = excluded.epoch, digest = excluded.digest, \
                        expires_us = excluded.expires_us";

/// A publication's idempotency key and its payload's digest.
type Keyed = (String, String);

/// The earlier publication `key` names in `channel` while its window lasts, or else `None`.
fn kept_key(
    connection: &Connection,
    channel: &str,
    key: &str,
    now_us: i64,
) -> rusqlite::Result<Option<Once>> {
    connection
        .prepare_cached(KEPT_KEY)?
        .query_row((channel, key, now_us), |row| {
            Ok(Once::Earlier {
                offset: row.get::<_, i64>(0)? as u64,
                epoch: row.get::<_, String>(1)?.into(),
                digest: row.get(2)?,
            })
        })
        .optional()
}

/// The channel history of one SQLite file.
#[derive(Debug)]
pub(crate) struct SqliteHistory {
    /// The epoch of every channel of the file.
    epoch: Arc<str>,
    readers: Arc<Readers>,
    writer: Arc<Writer>,
    deliveries: DeliverySender,
    undelivered: Undelivered,
}

impl SqliteBackend {
    /// Its channel history, handing committed publications to `deliveries`.
    pub(crate) fn history(&self, deliveries: DeliverySender) -> SqliteHistory {
        SqliteHistory {
            epoch: self.history_epoch.clone(),
            readers: self.readers.clone(),
            writer: self.writer.clone(),
            deliveries,
            undelivered: Undelivered::new(UNDELIVERED),
        }
    }
}

/// A channel's row in `channel_logs`.
struct Position {
    epoch: Arc<str>,
    top: u64,
    bytes: u64,
}

impl Position {
    /// From a row of `epoch, top, bytes`, as every statement on `channel_logs` returns them.
    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Position> {
        Ok(Position {
            epoch: row.get::<_, String>(0)?.into(),
            top: row.get::<_, i64>(1)? as u64,
            bytes: row.get::<_, i64>(2)? as u64,
        })
    }
}

fn position(connection: &Connection, channel: &str) -> rusqlite::Result<Option<Position>> {
    connection
        .prepare_cached(POSITION)?
        .query_row([channel], Position::from_row)
        .optional()
}

/// Moves the channel's row to its next offset with `added` more bytes, making it (in `epoch`)
/// if it has none: the row as it now is, whose `top` is the new entry's offset.
fn advance(
    connection: &Connection,
    channel: &str,
    epoch: &str,
    added: usize,
) -> rusqlite::Result<Position> {
    let added = added as i64;
    if let Some(position) = connection
        .prepare_cached(ADVANCE)?
        .query_row((channel, added), Position::from_row)
        .optional()?
    {
        return Ok(position);
    }
    connection
        .prepare_cached(FIRST)?
        .query_row((channel, epoch, added), Position::from_row)
}

/// The epoch of the file's channels: made the first time, then kept (with the secrets).
pub(super) fn store_epoch(connection: &Connection) -> Result<Arc<str>, StoreError> {
    connection.execute(
        "INSERT OR IGNORE INTO secrets (name, value) VALUES ('channel-epoch', ?1)",
        [new_epoch().into_bytes()],
    )?;
    let kept: Vec<u8> = connection.query_row(
        "SELECT value FROM secrets WHERE name = 'channel-epoch'",
        [],
        |row| row.get(0),
    )?;
    String::from_utf8(kept)
        .map(Arc::from)
        .map_err(|_| StoreError::Corrupt("the channel epoch is not text".into()))
}

/// Appends a publication inside the writer's transaction and trims the channel to its
/// bounds (its size bound in steps): returns its offset and the channel's epoch.
fn append(
    connection: &Connection,
    channel: &str,
    payload: &Payload,
    retention: Retention,
    now_us: i64,
    epoch: &str,
) -> rusqlite::Result<(u64, Arc<str>)> {
    let (binary, body): (bool, &[u8]) = match payload {
        Payload::Json(raw) => (false, raw.get().as_bytes()),
        Payload::Binary(data) => (true, data),
    };
    let Position {
        epoch,
        top: offset,
        bytes: counted,
    } = advance(connection, channel, epoch, body.len())?;
    let expires_us = now_us.saturating_add(retention.ttl.as_micros() as i64);
    // Should the entry be refused, the writer rolls the transaction back, the offset taken
    // with it.
    connection.prepare_cached(APPEND)?.execute((
        channel,
        offset as i64,
        expires_us,
        binary,
        body,
    ))?;
    let mut bytes = counted;
    let size = retention.size.max(1) as u64;
    if offset > size && (offset - size).is_multiple_of(trim_step(size)) {
        // Once a step: the entries beyond the window (up to a step's) go together.
        let mut trim = connection.prepare_cached(TRIM_TO)?;
        let mut gone = trim.query((channel, window_floor(offset, retention.size) as i64))?;
        while let Some(row) = gone.next()? {
            bytes = bytes.saturating_sub(row.get::<_, i64>(0)? as u64);
        }
    }
    // Entries beyond the window count here too, and go first, being the oldest.
    while bytes > retention.bytes as u64 {
        let oldest: Option<(i64, i64)> = connection
            .prepare_cached(OLDEST)?
            .query_row([channel], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        let Some((seq, size)) = oldest else { break };
        if seq as u64 >= offset {
            // The newest always stays.
            break;
        }
        connection
            .prepare_cached(DELETE_ONE)?
            .execute((channel, seq))?;
        bytes = bytes.saturating_sub(size as u64);
    }
    if bytes != counted {
        connection
            .prepare_cached(SET_BYTES)?
            .execute((channel, bytes as i64))?;
    }
    Ok((offset, epoch))
}

/// Appends a record write's event to its channel's history, in the write's transaction, when
/// the store keeps that history.
pub(super) fn log_event(
    connection: &Connection,
    log: Option<&LogTo>,
    record: &Record,
    epoch: &str,
) -> Result<Option<Logged>, StoreError> {
    let Some(log) = log else {
        return Ok(None);
    };
    let payload = Arc::new(record_event(log.op, &record.document)?);
    let (offset, epoch) = append(
        connection,
        &log.channel,
        &payload,
        log.retention,
        now_micros(),
        epoch,
    )?;
    Ok(Some((offset, epoch, payload)))
}

/// Reads a channel's position and the part of its history asked for, within its window of
/// `size` (in the read pool's snapshot: one for all); `None` when the channel has no row yet.
fn read(
    connection: &Connection,
    channel: &str,
    range: HistoryRange,
    size: usize,
    now_us: i64,
) -> rusqlite::Result<Option<BrokerHistory>> {
    // The read pool runs every read in one snapshot.
    let snapshot = connection;
    let Some(Position { epoch, top, .. }) = position(snapshot, channel)? else {
        return Ok(None);
    };
    let floor = window_floor(top, size) as i64;
    let oldest: Option<i64> = snapshot
        .prepare_cached(OLDEST_LIVE)?
        .query_row((channel, floor, now_us), |row| row.get(0))
        .optional()?;
    let stored = |row: &rusqlite::Row<'_>| -> rusqlite::Result<Stored> {
        let offset = row.get::<_, i64>(0)? as u64;
        let binary: bool = row.get(1)?;
        let body: Vec<u8> = row.get(2)?;
        let payload = if binary {
            Payload::Binary(Bytes::from(body))
        } else {
            let text = String::from_utf8(body).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Blob, e.into())
            })?;
            Payload::Json(RawValue::from_string(text).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Blob, e.into())
            })?)
        };
        Ok(Stored { offset, payload })
    };
    let publications = match range {
        HistoryRange::None => Vec::new(),
        HistoryRange::After { offset, limit } => snapshot
            .prepare_cached(AFTER)?
            .query_map(
                (
                    channel,
                    i64::try_from(offset).unwrap_or(i64::MAX).max(floor),
                    now_us,
                    limit as i64,
                ),
                stored,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?,
        HistoryRange::Last(limit) => {
            let mut last = snapshot
                .prepare_cached(LAST)?
                .query_map((channel, floor, now_us, limit as i64), stored)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            last.reverse();
            last
        }
    };
    Ok(Some(BrokerHistory {
        top,
        epoch,
        oldest: oldest.map(|seq| seq as u64),
        publications,
    }))
}

fn unavailable(error: impl std::fmt::Display) -> BrokerError {
    BrokerError(format!("the store's channel history: {error}"))
}

#[async_trait]
impl HistoryStore for SqliteHistory {
    fn keeps_record_events(&self) -> bool {
        true
    }

    async fn expire(&self, limit: usize) -> Result<usize, StoreError> {
        let now_us = now_micros();
        self.writer
            .write(
                move |connection| {
                    let mut freed: HashMap<String, i64> = HashMap::new();
                    let mut deleted = 0;
                    {
                        let mut expire = connection.prepare_cached(EXPIRE)?;
                        let mut rows = expire.query((now_us, limit as i64))?;
                        while let Some(row) = rows.next()? {
                            *freed.entry(row.get(0)?).or_default() += row.get::<_, i64>(1)?;
                            deleted += 1;
                        }
                    }
                    let mut less = connection.prepare_cached(LESS_BYTES)?;
                    for (channel, bytes) in freed {
                        less.execute((channel, bytes))?;
                    }
                    // Expired keys in what is left of the batch, so that a full batch still
                    // says that more may be waiting.
                    let keys = connection
                        .prepare_cached(EXPIRE_KEYS)?
                        .execute((now_us, (limit - deleted) as i64))?;
                    Ok(deleted + keys)
                },
                |_: &usize| {},
            )
            .await
    }
}

impl SqliteHistory {
    /// Appends in the writer's next transaction, with `keyed` kept beside the publication
    /// (unless it names an earlier one still in its window: then nothing is appended).
    async fn append_keyed(
        &self,
        channel: &str,
        payload: &Payload,
        retention: Retention,
        told: Option<Told>,
        keyed: Option<Keyed>,
    ) -> Result<Once, BrokerError> {
        let channel: Arc<str> = channel.into();
        let place = self.undelivered.place().await;
        let payload = Arc::new(payload.clone());
        let deliveries = self.deliveries.clone();
        let now_us = now_micros();
        let written = {
            let (appended, appended_payload) = (channel.clone(), payload.clone());
            let epoch = self.epoch.clone();
            self.writer.write(
                move |connection| {
                    if let Some((key, _)) = &keyed
                        && let Some(earlier) = kept_key(connection, &appended, key, now_us)?
                    {
                        return Ok(earlier);
                    }
                    let (offset, epoch) = append(
                        connection,
                        &appended,
                        &appended_payload,
                        retention,
                        now_us,
                        &epoch,
                    )?;
                    if let Some((key, digest)) = &keyed {
                        let window = crate::hub::idempotency::WINDOW.as_micros() as i64;
                        connection.prepare_cached(KEEP_KEY)?.execute((
                            &*appended,
                            key,
                            offset as i64,
                            &*epoch,
                            digest,
                            now_us.saturating_add(window),
                        ))?;
                    }
                    Ok(Once::Published { offset, epoch })
                },
                move |once: &Once| {
                    // In commit order, on the writer's thread: the hub fans out in that order.
                    if let Once::Published { offset, epoch } = once {
                        let _ = deliveries.send(Delivery {
                            channel,
                            offset: *offset,
                            epoch: epoch.clone(),
                            payload,
                            told,
                            delivered: None,
                            place: Some(place),
                        });
                    }
                },
            )
        };
        // Answered once committed: the fan-out follows in commit order, off the publisher's
        // path, so a connection's next publication commits while this one fans out.
        written.await.map_err(unavailable)
    }
}

#[async_trait]
impl ChannelLog for SqliteHistory {
    async fn publish(
        &self,
        channel: &str,
        payload: &Payload,
        retention: Retention,
        told: Option<Told>,
    ) -> Result<(u64, Arc<str>), BrokerError> {
        match self
            .append_keyed(channel, payload, retention, told, None)
            .await?
        {
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
        self.append_keyed(channel, payload, retention, told, keyed)
            .await
    }

    async fn history(
        &self,
        channel: &str,
        range: HistoryRange,
        retention: Retention,
    ) -> Result<BrokerHistory, BrokerError> {
        let now_us = now_micros();
        let read = self
            .readers
            .read(|connection| read(connection, channel, range, retention.size, now_us))
            .map_err(unavailable)?;
        // A channel never published: at offset 0 in the file's epoch, which its first
        // publication will keep.
        Ok(read.unwrap_or_else(|| BrokerHistory {
            top: 0,
            epoch: self.epoch.clone(),
            oldest: None,
            publications: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::backend::Backend as _;
    use crate::store::history::testing::{json, retention};
    use crate::store::sqlite::open_blocking;

    async fn history() -> (
        tempfile::TempDir,
        SqliteBackend,
        SqliteHistory,
        crate::store::Deliveries,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = open_blocking(dir.path().join("data.db")).expect("open");
        let (deliver, deliveries) = tokio::sync::mpsc::unbounded_channel();
        let history = backend.history(deliver);
        (dir, backend, history, deliveries)
    }

    /// Appends straight through the writer, at `now_us`.
    async fn append_at(
        backend: &SqliteBackend,
        channel: &str,
        payload: Payload,
        retention: Retention,
        now_us: i64,
    ) -> u64 {
        let channel = channel.to_owned();
        backend
            .writer
            .write(
                move |connection| {
                    Ok(append(
                        connection, &channel, &payload, retention, now_us, "e",
                    )?)
                },
                |_: &(u64, Arc<str>)| {},
            )
            .await
            .expect("appended")
            .0
    }

    /// The offsets kept and the `bytes` the channel's row says, against the entries' sizes.
    fn kept(backend: &SqliteBackend, channel: &str) -> (Vec<u64>, u64, u64) {
        backend
            .readers
            .read(|connection| {
                let offsets = connection
                    .prepare("SELECT seq FROM channel_log_entries WHERE channel = ?1 ORDER BY seq")?
                    .query_map([channel], |row| row.get::<_, i64>(0))?
                    .map(|seq| seq.map(|seq| seq as u64))
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                let summed: i64 = connection.query_row(
                    "SELECT COALESCE(SUM(length(payload)), 0) FROM channel_log_entries \
                     WHERE channel = ?1",
                    [channel],
                    |row| row.get(0),
                )?;
                let counted: i64 = connection.query_row(
                    "SELECT bytes FROM channel_logs WHERE channel = ?1",
                    [channel],
                    |row| row.get(0),
                )?;
                Ok((offsets, summed as u64, counted as u64))
            })
            .expect("read")
    }

    #[tokio::test]
    async fn appends_keep_the_size_and_byte_bounds_and_always_the_newest() {
        let (_dir, backend, _history, _deliveries) = history().await;
        let now = now_micros();
        for i in 1..=5 {
            append_at(
                &backend,
                "a:size",
                json(&format!("{i}")),
                retention(3, 1000),
                now,
            )
            .await;
        }
        let (offsets, summed, counted) = kept(&backend, "a:size");
        assert_eq!(offsets, vec![3, 4, 5]);
        assert_eq!(counted, summed);

        // Ten bytes each, 25 bytes kept: the last two.
        let ten = json("\"12345678\"");
        for _ in 0..4 {
            append_at(&backend, "a:bytes", ten.clone(), retention(100, 25), now).await;
        }
        let (offsets, summed, counted) = kept(&backend, "a:bytes");
        assert_eq!(offsets, vec![3, 4]);
        assert_eq!((summed, counted), (20, 20));
        // One over the bound alone stays: the newest always does.
        let big = json(&format!("\"{}\"", "x".repeat(98)));
        let offset = append_at(&backend, "a:bytes", big, retention(100, 25), now).await;
        let (offsets, summed, counted) = kept(&backend, "a:bytes");
        assert_eq!(offsets, vec![offset]);
        assert_eq!((summed, counted), (100, 100));
        backend.close().await;
    }

    /// The offsets a read of the whole history returns, and its `oldest`.
    async fn read_all(
        history: &SqliteHistory,
        channel: &str,
        bounds: Retention,
    ) -> (Vec<u64>, Option<u64>) {
        let whole = history
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
        let last = history
            .history(channel, HistoryRange::Last(1000), bounds)
            .await
            .expect("history");
        assert_eq!(whole.publications.len(), last.publications.len());
        (
            whole.publications.iter().map(|p| p.offset).collect(),
            whole.oldest,
        )
    }

    /// The size bound is kept in steps: up to a step's entries beyond the window stay stored
    /// until one append deletes them together, and no read ever returns them.
    #[tokio::test]
    async fn the_size_bound_trims_in_steps_and_reads_see_only_the_window() {
        let (_dir, backend, history, _deliveries) = history().await;
        let now = now_micros();
        let bounds = retention(16, 1 << 20);
        assert_eq!(trim_step(16), 2);
        let mut trims = 0;
        let mut stored_before = 0;
        for top in 1..=40u64 {
            append_at(&backend, "a:steps", json(&format!("{top}")), bounds, now).await;
            let (stored, summed, counted) = kept(&backend, "a:steps");
            assert_eq!(counted, summed, "the bytes counted are the bytes stored");
            assert_eq!(stored.last(), Some(&top), "the newest is kept");
            assert!(
                (top.min(16)..=17).contains(&(stored.len() as u64)),
                "{} stored at {top}",
                stored.len()
            );
            if stored.len() < stored_before {
                trims += 1;
            }
            stored_before = stored.len();
            let window: Vec<u64> = (top.saturating_sub(16) + 1..=top).collect();
            let (read, oldest) = read_all(&history, "a:steps", bounds).await;
            assert_eq!(read, window, "at {top}");
            assert_eq!(oldest, window.first().copied());
            // Reading after an offset below the window starts at the window.
            let after = history
                .history(
                    "a:steps",
                    HistoryRange::After {
                        offset: 1,
                        limit: 3,
                    },
                    bounds,
                )
                .await
                .expect("history");
            assert_eq!(
                after
                    .publications
                    .iter()
                    .map(|p| p.offset)
                    .collect::<Vec<_>>(),
                window
                    .iter()
                    .copied()
                    .filter(|&o| o > 1)
                    .take(3)
                    .collect::<Vec<_>>()
            );
        }
        // 40 appends past a window of 16 in steps of 2: trimmed at 18, 20, … 40.
        assert_eq!(trims, 12);

        // A byte bound deletes the entries beyond the window first, being the oldest: the
        // 17th entry of ten bytes, between two trims, pushes the first out by bytes alone.
        let ten = json("\"12345678\"");
        let roomy = retention(16, 165);
        for _ in 0..17 {
            append_at(&backend, "a:both", ten.clone(), roomy, now).await;
        }
        let (stored, summed, counted) = kept(&backend, "a:both");
        assert_eq!(stored, (2..=17).collect::<Vec<_>>());
        assert_eq!((summed, counted), (160, 160));
        assert_eq!(
            read_all(&history, "a:both", roomy).await.0,
            (2..=17).collect::<Vec<_>>()
        );
        // Then into the window, down to the bound.
        let tight = retention(16, 25);
        append_at(&backend, "a:both", ten.clone(), tight, now).await;
        let (stored, summed, counted) = kept(&backend, "a:both");
        assert_eq!(stored, vec![17, 18]);
        assert_eq!((summed, counted), (20, 20));
        assert_eq!(read_all(&history, "a:both", tight).await.0, vec![17, 18]);
        backend.close().await;
    }

    /// A key is kept with its publication for its window: a retry within it is answered with
    /// that publication and appends nothing; once the window passed, the key names nothing
    /// (the same key publishes anew) and the expiry sweep deletes it.
    #[tokio::test]
    async fn keys_are_kept_with_their_publications_for_their_window() {
        let (_dir, backend, history, _deliveries) = history().await;
        let bounds = retention(16, 1 << 20);
        let keyed = |data: &str| {
            let data = json(data);
            let history = &history;
            async move {
                history
                    .publish_keyed("a:keys", &data, bounds, None, "k", "d1")
                    .await
                    .expect("publish")
            }
        };
        let first = keyed("1").await;
        assert!(
            matches!(first, Once::Published { offset: 1, .. }),
            "{first:?}"
        );
        let retry = keyed("1").await;
        assert!(
            matches!(&retry, Once::Earlier { offset: 1, digest, .. } if digest == "d1"),
            "{retry:?}"
        );
        assert_eq!(kept(&backend, "a:keys").0, vec![1], "nothing appended");

        let window_passes = || {
            backend.writer.write(
                |connection| Ok(connection.execute("UPDATE publish_keys SET expires_us = 0", [])?),
                |_: &usize| {},
            )
        };
        window_passes().await.expect("expire the key");
        let again = keyed("1").await;
        assert!(
            matches!(again, Once::Published { offset: 2, .. }),
            "{again:?}"
        );
        for other in ["k2", "k3"] {
            history
                .publish_keyed("a:keys", &json("2"), bounds, None, other, "d2")
                .await
                .expect("publish");
        }
        window_passes().await.expect("expire the keys");
        backend
            .writer
            .write(
                |connection| {
                    Ok(connection.execute("UPDATE channel_log_entries SET expires_us = 0", [])?)
                },
                |_: &usize| {},
            )
            .await
            .expect("expire the entries");
        // Four expired entries and three expired keys, in batches of three: entries first, keys
        // in what is left, and never more than a batch (a full batch says more may wait).
        assert_eq!(history.expire(3).await.expect("expire"), 3);
        assert_eq!(history.expire(3).await.expect("expire"), 3);
        assert_eq!(history.expire(3).await.expect("expire"), 1);
        assert_eq!(history.expire(3).await.expect("expire"), 0);
        let left: i64 = backend
            .readers
            .read(|connection| {
                connection.query_row("SELECT count(*) FROM publish_keys", [], |row| row.get(0))
            })
            .expect("count");
        assert_eq!(left, 0);
    }

    #[tokio::test]
    async fn expired_entries_are_never_read_and_deleted_a_batch_at_a_time() {
        let (_dir, backend, history, _deliveries) = history().await;
        let hour_ago = now_micros() - 3_600_000_000;
        let short = Retention {
            ttl: Duration::from_secs(60),
            ..retention(100, 1 << 20)
        };
        for i in 1..=5 {
            append_at(&backend, "a:ttl", json(&format!("{i}")), short, hour_ago).await;
        }
        append_at(&backend, "a:ttl", json("6"), short, now_micros()).await;
        let read = history
            .history("a:ttl", HistoryRange::Last(100), short)
            .await
            .expect("history");
        assert_eq!(read.top, 6);
        assert_eq!(read.oldest, Some(6), "the expired are not read");
        assert_eq!(
            read.publications
                .iter()
                .map(|p| p.offset)
                .collect::<Vec<_>>(),
            vec![6]
        );
        assert_eq!(history.expire(2).await.expect("expire"), 2);
        assert_eq!(history.expire(10).await.expect("expire"), 3);
        assert_eq!(history.expire(10).await.expect("expire"), 0);
        let (offsets, summed, counted) = kept(&backend, "a:ttl");
        assert_eq!(offsets, vec![6]);
        assert_eq!((summed, counted), (1, 1));
        backend.close().await;
    }

    /// Concurrent publishers on two channels: each gets the next offset, the deliveries come
    /// in offset order per channel (commit order), and a fresh channel's epoch (the file's) read before its first publication is
    /// kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publications_are_delivered_in_commit_order() {
        let (_dir, backend, history, mut deliveries) = history().await;
        let history = Arc::new(history);
        let before = history
            .history("a:one", HistoryRange::None, retention(100, 1 << 20))
            .await
            .expect("position");
        assert_eq!(before.top, 0);
        let rows: i64 = backend
            .readers
            .read(|c| c.query_row("SELECT COUNT(*) FROM channel_logs", [], |row| row.get(0)))
            .expect("count");
        assert_eq!(rows, 0, "reading a channel never published writes nothing");
        let delivered = tokio::spawn(async move {
            let mut seen: HashMap<Arc<str>, Vec<u64>> = HashMap::new();
            while let Some(delivery) = deliveries.recv().await {
                seen.entry(delivery.channel.clone())
                    .or_default()
                    .push(delivery.offset);
                if seen.values().map(Vec::len).sum::<usize>() == 40 {
                    break;
                }
            }
            seen
        });
        let mut publishers = Vec::new();
        for i in 0..40 {
            let history = history.clone();
            publishers.push(tokio::spawn(async move {
                let channel = if i % 2 == 0 { "a:one" } else { "a:two" };
                let (offset, epoch) = history
                    .publish(
                        channel,
                        &json(&format!("{i}")),
                        retention(100, 1 << 20),
                        None,
                    )
                    .await
                    .expect("published");
                (channel, offset, epoch)
            }));
        }
        let mut answered: HashMap<&str, Vec<u64>> = HashMap::new();
        for publisher in publishers {
            let (channel, offset, epoch) = publisher.await.expect("publisher");
            if channel == "a:one" {
                assert_eq!(epoch, before.epoch, "the epoch read first is kept");
            }
            answered.entry(channel).or_default().push(offset);
        }
        let seen = delivered.await.expect("deliveries");
        for channel in ["a:one", "a:two"] {
            assert_eq!(seen[channel], (1..=20).collect::<Vec<_>>(), "{channel}");
            let mut offsets = answered[channel].clone();
            offsets.sort_unstable();
            assert_eq!(offsets, (1..=20).collect::<Vec<_>>(), "{channel}");
        }
        backend.close().await;
    }

    /// Publishers answered at commit cannot run ahead of the fan-out without bound: past the
    /// places for undelivered publications, the next publisher waits until one is fanned out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishers_wait_when_the_fan_out_is_behind() {
        let (_dir, backend, mut history, mut deliveries) = history().await;
        history.undelivered = Undelivered::new(2);
        let history = Arc::new(history);
        let bounds = retention(100, 1 << 20);
        for i in 1..=2 {
            let (offset, _) = history
                .publish("a:slow", &json(&format!("{i}")), bounds, None)
                .await
                .expect("published");
            assert_eq!(offset, i);
        }
        let third = tokio::spawn({
            let history = history.clone();
            async move {
                history
                    .publish("a:slow", &json("3"), bounds, None)
                    .await
                    .expect("published")
            }
        });
        let held = tokio::time::timeout(Duration::from_millis(200), async {
            while !third.is_finished() {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(held.is_err(), "the third publisher waits for a place");
        // One fanned out (its delivery dropped): the third goes through.
        let first = deliveries.recv().await.expect("a delivery");
        assert_eq!(first.offset, 1);
        drop(first);
        let (offset, _) = tokio::time::timeout(Duration::from_secs(10), third)
            .await
            .expect("the third publisher goes on")
            .expect("task");
        assert_eq!(offset, 3);
        backend.close().await;
    }
}
