//! Channel history in the SQLite file ([`crate::store::history`]): appends go through the one
//! writer, so a busy channel's publications share its group commits with the records writes,
//! and reads run on the read pool, each in one snapshot.
//!
//! Offsets are allocated inside the appending transaction from the channel's row in
//! `channel_logs`, so they follow commit order and a transaction that fails leaves no hole.
//! Each append trims its own channel to its size and byte bounds (a few rows at most); entries
//! past their `expires_us` are never read, and [`SqliteHistory::expire`] deletes them a bounded
//! batch at a time.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension as _};
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use super::{Readers, SqliteBackend, Writer};
use crate::broker::{
    BrokerError, BrokerHistory, ChannelLog, HistoryRange, Retention, Stored, Told, bus::new_epoch,
};
use crate::model::Payload;
use crate::store::Record;
use crate::store::StoreError;
use crate::store::history::{Delivery, DeliverySender, HistoryStore, LogTo, Logged, record_event};
use crate::store::now_micros;

const POSITION: &str = "SELECT epoch, top, bytes FROM channel_logs WHERE channel = ?1";
const NEW_LOG: &str = "INSERT INTO channel_logs (channel, epoch, top, bytes) VALUES (?1, ?2, 0, 0) \
                       ON CONFLICT (channel) DO NOTHING";
const SET_POSITION: &str = "UPDATE channel_logs SET top = ?2, bytes = ?3 WHERE channel = ?1";
const APPEND: &str = "INSERT INTO channel_log_entries (channel, seq, expires_us, binary, payload) \
                      VALUES (?1, ?2, ?3, ?4, ?5)";
const TRIM_TO: &str =
    "DELETE FROM channel_log_entries WHERE channel = ?1 AND seq <= ?2 RETURNING length(payload)";
const OLDEST: &str = "SELECT seq, length(payload) FROM channel_log_entries WHERE channel = ?1 \
                      ORDER BY seq LIMIT 1";
const DELETE_ONE: &str = "DELETE FROM channel_log_entries WHERE channel = ?1 AND seq = ?2";
const OLDEST_LIVE: &str = "SELECT seq FROM channel_log_entries WHERE channel = ?1 \
                           AND expires_us > ?2 ORDER BY seq LIMIT 1";
const AFTER: &str = "SELECT seq, binary, payload FROM channel_log_entries WHERE channel = ?1 \
                     AND seq > ?2 AND expires_us > ?3 ORDER BY seq LIMIT ?4";
const LAST: &str = "SELECT seq, binary, payload FROM channel_log_entries WHERE channel = ?1 \
                    AND expires_us > ?2 ORDER BY seq DESC LIMIT ?3";
const EXPIRE: &str = "DELETE FROM channel_log_entries WHERE id IN (SELECT id FROM \
                      channel_log_entries WHERE expires_us <= ?1 ORDER BY expires_us LIMIT ?2) \
                      RETURNING channel, length(payload)";
const LESS_BYTES: &str = "UPDATE channel_logs SET bytes = max(bytes - ?2, 0) WHERE channel = ?1";

/// The channel history of one SQLite file.
#[derive(Debug)]
pub(crate) struct SqliteHistory {
    readers: Arc<Readers>,
    writer: Arc<Writer>,
    deliveries: DeliverySender,
}

impl SqliteBackend {
    /// Its channel history, handing committed publications to `deliveries`.
    pub(crate) fn history(&self, deliveries: DeliverySender) -> SqliteHistory {
        SqliteHistory {
            readers: self.readers.clone(),
            writer: self.writer.clone(),
            deliveries,
        }
    }
}

/// A channel's row in `channel_logs`.
struct Position {
    epoch: Arc<str>,
    top: u64,
    bytes: u64,
}

fn position(connection: &Connection, channel: &str) -> rusqlite::Result<Option<Position>> {
    connection
        .prepare_cached(POSITION)?
        .query_row([channel], |row| {
            Ok(Position {
                epoch: row.get::<_, String>(0)?.into(),
                top: row.get::<_, i64>(1)? as u64,
                bytes: row.get::<_, i64>(2)? as u64,
            })
        })
        .optional()
}

/// The channel's row, made (with a fresh epoch) if it has none.
fn position_or_new(connection: &Connection, channel: &str) -> rusqlite::Result<Position> {
    if let Some(position) = position(connection, channel)? {
        return Ok(position);
    }
    connection
        .prepare_cached(NEW_LOG)?
        .execute((channel, new_epoch()))?;
    position(connection, channel)?.ok_or(rusqlite::Error::QueryReturnedNoRows)
}

/// Appends a publication inside the writer's transaction and trims the channel to its
/// bounds: returns its offset and the channel's epoch.
fn append(
    connection: &Connection,
    channel: &str,
    payload: &Payload,
    retention: Retention,
    now_us: i64,
) -> rusqlite::Result<(u64, Arc<str>)> {
    let Position {
        epoch,
        top,
        mut bytes,
    } = position_or_new(connection, channel)?;
    let offset = top + 1;
    let expires_us = now_us.saturating_add(retention.ttl.as_micros() as i64);
    let (binary, body): (bool, &[u8]) = match payload {
        Payload::Json(raw) => (false, raw.get().as_bytes()),
        Payload::Binary(data) => (true, data),
    };
    connection.prepare_cached(APPEND)?.execute((
        channel,
        offset as i64,
        expires_us,
        binary,
        body,
    ))?;
    bytes += body.len() as u64;
    let size = retention.size.max(1) as u64;
    if offset > size {
        let mut trim = connection.prepare_cached(TRIM_TO)?;
        let mut gone = trim.query((channel, (offset - size) as i64))?;
        while let Some(row) = gone.next()? {
            bytes = bytes.saturating_sub(row.get::<_, i64>(0)? as u64);
        }
    }
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
    connection
        .prepare_cached(SET_POSITION)?
        .execute((channel, offset as i64, bytes as i64))?;
    Ok((offset, epoch))
}

/// Appends a record write's event to its channel's history, in the write's transaction, when
/// the store keeps that history.
pub(super) fn log_event(
    connection: &Connection,
    log: Option<&LogTo>,
    record: &Record,
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
    )?;
    Ok(Some((offset, epoch, payload)))
}

/// Reads a channel's position and the part of its history asked for, in one snapshot; `None`
/// when the channel has no row yet.
fn read(
    connection: &Connection,
    channel: &str,
    range: HistoryRange,
    now_us: i64,
) -> rusqlite::Result<Option<BrokerHistory>> {
    let snapshot = connection.unchecked_transaction()?;
    let Some(Position { epoch, top, .. }) = position(&snapshot, channel)? else {
        return Ok(None);
    };
    let oldest: Option<i64> = snapshot
        .prepare_cached(OLDEST_LIVE)?
        .query_row((channel, now_us), |row| row.get(0))
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
            .query_map((channel, offset as i64, now_us, limit as i64), stored)?
            .collect::<rusqlite::Result<Vec<_>>>()?,
        HistoryRange::Last(limit) => {
            let mut last = snapshot
                .prepare_cached(LAST)?
                .query_map((channel, now_us, limit as i64), stored)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            last.reverse();
            last
        }
    };
    snapshot.finish()?;
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
                    Ok(deleted)
                },
                |_: &usize| {},
            )
            .await
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
        let channel: Arc<str> = channel.into();
        let payload = Arc::new(payload.clone());
        let (delivered, fanned_out) = oneshot::channel();
        let deliveries = self.deliveries.clone();
        let now_us = now_micros();
        let written = {
            let (appended, appended_payload) = (channel.clone(), payload.clone());
            self.writer.write(
                move |connection| {
                    Ok(append(
                        connection,
                        &appended,
                        &appended_payload,
                        retention,
                        now_us,
                    )?)
                },
                move |(offset, epoch): &(u64, Arc<str>)| {
                    // In commit order, on the writer's thread: the hub fans out in that order.
                    let _ = deliveries.send(Delivery {
                        channel,
                        offset: *offset,
                        epoch: epoch.clone(),
                        payload,
                        told,
                        delivered,
                    });
                },
            )
        };
        let (offset, epoch) = written.await.map_err(unavailable)?;
        // Committed: the answer waits for the fan-out, so that whoever is answered finds the
        // publication delivered here. If the hub is gone, the server is stopping.
        let _ = fanned_out.await;
        Ok((offset, epoch))
    }

    async fn history(
        &self,
        channel: &str,
        range: HistoryRange,
        _retention: Retention,
    ) -> Result<BrokerHistory, BrokerError> {
        let now_us = now_micros();
        if let Some(history) = self
            .readers
            .read(|connection| read(connection, channel, range, now_us))
            .map_err(unavailable)?
        {
            return Ok(history);
        }
        // A channel never published: its epoch is made now and kept, so that whoever reads
        // it now and publishes later agree.
        let owned = channel.to_owned();
        self.writer
            .write(
                move |connection| Ok(position_or_new(connection, &owned).map(|_| ())?),
                |_: &()| {},
            )
            .await
            .map_err(unavailable)?;
        self.readers
            .read(|connection| read(connection, channel, range, now_us))
            .map_err(unavailable)?
            .ok_or_else(|| unavailable("the channel's row vanished"))
    }
}
