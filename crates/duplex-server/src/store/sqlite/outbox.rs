//! The webhook outbox in the SQLite file: writes go through the one writer (so they join its
//! group commits and keep their order), reads through the read pool.

use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::Connection;

use super::{Readers, SqliteBackend, Writer};
use crate::store::StoreError;
use crate::store::backend::Outboxed;
use crate::store::outbox::{Live, Lost, NewEvent, Outbox, Pending, TakenOver};

const APPEND: &str = "INSERT INTO webhook_outbox (node, at_us, body) VALUES (?1, ?2, ?3)";

/// The outbox of one SQLite file.
#[derive(Debug, Clone)]
pub(crate) struct SqliteOutbox {
    readers: Arc<Readers>,
    writer: Arc<Writer>,
}

impl SqliteBackend {
    /// Its webhook outbox.
    pub(crate) fn outbox(&self) -> SqliteOutbox {
        SqliteOutbox {
            readers: self.readers.clone(),
            writer: self.writer.clone(),
        }
    }
}

/// Appends a record write's event in the write's transaction.
pub(super) fn append_one(connection: &Connection, outboxed: &Outboxed) -> rusqlite::Result<()> {
    append(
        connection,
        &outboxed.node,
        std::slice::from_ref(&outboxed.event),
    )
}

fn append(connection: &Connection, node: &str, events: &[NewEvent]) -> rusqlite::Result<()> {
    let mut statement = connection.prepare_cached(APPEND)?;
    for event in events {
        statement.execute((node, event.at_us, &event.body))?;
    }
    Ok(())
}

#[async_trait]
impl Outbox for SqliteOutbox {
    async fn append(
        &self,
        node: &str,
        events: Vec<NewEvent>,
        live: Vec<Live>,
    ) -> Result<(), StoreError> {
        let node = node.to_owned();
        self.writer
            .write(
                move |connection| {
                    append(connection, &node, &events)?;
                    for change in &live {
                        match change {
                            Live::Open { client, info } => {
                                connection
                                    .prepare_cached(
                                        "INSERT INTO webhook_live (node, client, info) VALUES (?1, ?2, ?3) \
                                         ON CONFLICT (node, client) DO UPDATE SET info = excluded.info",
                                    )?
                                    .execute((&node, client, info))?;
                            }
                            Live::Closed { client } => {
                                connection
                                    .prepare_cached(
                                        "DELETE FROM webhook_live WHERE node = ?1 AND client = ?2",
                                    )?
                                    .execute((&node, client))?;
                            }
                        }
                    }
                    Ok(())
                },
                |_: &()| {},
            )
            .await
    }

    async fn beat(&self, node: &str, now_us: i64) -> Result<(), StoreError> {
        let node = node.to_owned();
        self.writer
            .write(
                move |connection| {
                    connection
                        .prepare_cached(
                            "INSERT INTO webhook_nodes (node, seen_us) VALUES (?1, ?2) \
                             ON CONFLICT (node) DO UPDATE SET seen_us = excluded.seen_us",
                        )?
                        .execute((&node, now_us))?;
                    Ok(())
                },
                |_: &()| {},
            )
            .await
    }

    async fn take_over(
        &self,
        node: &str,
        cutoff_us: i64,
        restarted: bool,
        lost: Lost,
    ) -> Result<TakenOver, StoreError> {
        let node = node.to_owned();
        self.writer
            .write(
                move |connection| {
                    let mut stopped: Vec<String> = connection
                        .prepare_cached(
                            "SELECT node FROM webhook_nodes WHERE seen_us < ?1 AND node <> ?2",
                        )?
                        .query_map((cutoff_us, &node), |row| row.get(0))?
                        .collect::<Result<_, _>>()?;
                    let mut taken = TakenOver {
                        nodes: stopped.len(),
                        connections: 0,
                    };
                    if restarted {
                        stopped.push(node.clone());
                    }
                    for other in &stopped {
                        let infos: Vec<String> = connection
                            .prepare_cached(
                                "SELECT info FROM webhook_live WHERE node = ?1 ORDER BY rowid",
                            )?
                            .query_map([other], |row| row.get(0))?
                            .collect::<Result<_, _>>()?;
                        connection
                            .prepare_cached("UPDATE webhook_outbox SET node = ?1 WHERE node = ?2")?
                            .execute((&node, other))?;
                        let events: Vec<NewEvent> = infos.iter().map(|info| lost(info)).collect();
                        append(connection, &node, &events)?;
                        taken.connections += events.len();
                        connection
                            .prepare_cached("DELETE FROM webhook_live WHERE node = ?1")?
                            .execute([other])?;
                        if *other != node {
                            connection
                                .prepare_cached("DELETE FROM webhook_nodes WHERE node = ?1")?
                                .execute([other])?;
                        }
                    }
                    Ok(taken)
                },
                |_: &TakenOver| {},
            )
            .await
    }

    async fn pending(&self, node: &str, limit: usize) -> Result<Vec<Pending>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.readers.read(|connection| {
            connection
                .prepare_cached(
                    "SELECT seq, at_us, body FROM webhook_outbox WHERE node = ?1 \
                     ORDER BY seq LIMIT ?2",
                )?
                .query_map((node, limit), |row| {
                    Ok(Pending {
                        seq: row.get(0)?,
                        at_us: row.get(1)?,
                        body: row.get(2)?,
                    })
                })?
                .collect()
        })
    }

    async fn remove(&self, seqs: Vec<i64>) -> Result<(), StoreError> {
        self.writer
            .write(
                move |connection| {
                    let mut statement =
                        connection.prepare_cached("DELETE FROM webhook_outbox WHERE seq = ?1")?;
                    for seq in &seqs {
                        statement.execute([seq])?;
                    }
                    Ok(())
                },
                |_: &()| {},
            )
            .await
    }

    async fn expire(&self, node: &str, before_us: i64) -> Result<u64, StoreError> {
        let node = node.to_owned();
        self.writer
            .write(
                move |connection| {
                    let removed = connection
                        .prepare_cached(
                            "DELETE FROM webhook_outbox WHERE node = ?1 AND at_us < ?2",
                        )?
                        .execute((&node, before_us))?;
                    Ok(removed as u64)
                },
                |_: &u64| {},
            )
            .await
    }

    async fn count(&self, node: &str) -> Result<u64, StoreError> {
        self.readers.read(|connection| {
            connection
                .prepare_cached("SELECT COUNT(*) FROM webhook_outbox WHERE node = ?1")?
                .query_row([node], |row| row.get::<_, i64>(0))
                .map(|n| u64::try_from(n).unwrap_or(0))
        })
    }
}
