//! WAL checkpoints off the write path.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses its threshold, so one write
//! in a thousand pages would wait for the checkpoint's copy and `fsync` of the database file:
//! the tail of the write latency. The writer's connection turns that off
//! (`wal_autocheckpoint = 0`), and this thread, on a connection of its own, checkpoints
//! `PASSIVE` (never waiting for the writer or the readers) a little after commits happened.
//! Once a checkpoint reached the end of the log, the writer's next transaction starts the log
//! again from its beginning, so the WAL file stays the size of a few moments of writes. Should
//! readers keep a checkpoint from finishing while the log grows past [`RESTART_FRAMES`], a
//! `RESTART` checkpoint waits for them (and holds writers back) until it is done.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::Connection;

use crate::store::StoreError;

/// How long the thread waits between looks at the commit count.
const INTERVAL: Duration = Duration::from_millis(100);

/// WAL frames (pages) after which a checkpoint waits for readers: about 200 MB of 4 KiB pages.
const RESTART_FRAMES: i64 = 50_000;

/// The checkpointing thread; stops when closed or dropped.
#[derive(Debug)]
pub(super) struct Checkpointer {
    stop: Mutex<Option<mpsc::Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Checkpointer {
    /// Starts checkpointing `path` whenever `commits` moved.
    pub(super) fn start(
        path: &Path,
        busy_timeout: Duration,
        commits: Arc<AtomicU64>,
    ) -> Result<Checkpointer, StoreError> {
        let connection = Connection::open(path)?;
        connection.busy_timeout(busy_timeout)?;
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("duplex-sqlite-checkpoint".into())
            .spawn(move || checkpoint_until_stopped(&connection, &stopped, &commits))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the checkpointer: {e}")))?;
        Ok(Checkpointer {
            stop: Mutex::new(Some(stop)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Stops the thread and waits for it.
    pub(super) async fn close(&self) {
        self.stop.lock().take();
        let thread = self.thread.lock().take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

fn checkpoint_until_stopped(
    connection: &Connection,
    stopped: &mpsc::Receiver<()>,
    commits: &AtomicU64,
) {
    let mut checkpointed = commits.load(Ordering::Relaxed);
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(INTERVAL) {
        let now = commits.load(Ordering::Relaxed);
        if now == checkpointed {
            continue;
        }
        checkpointed = now;
        match checkpoint(connection, "PASSIVE") {
            Ok((log, done)) if log > RESTART_FRAMES && done < log => {
                if let Err(error) = checkpoint(connection, "RESTART") {
                    tracing::warn!(%error, frames = log, "a WAL checkpoint failed");
                }
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "a WAL checkpoint failed"),
        }
    }
}

/// Runs a checkpoint; returns the frames in the log and how many of them are checkpointed.
fn checkpoint(connection: &Connection, mode: &str) -> rusqlite::Result<(i64, i64)> {
    connection.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
        Ok((row.get(1)?, row.get(2)?))
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rusqlite::Connection;

    use super::Checkpointer;
    use crate::store::sqlite::writer::Writer;

    /// With automatic checkpoints off, the thread is what moves committed pages into the
    /// database file.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_reach_the_database_file_without_automatic_checkpoints() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("db.sqlite");
        let connection = Connection::open(&path).expect("open");
        let _: String = connection
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .expect("wal");
        connection
            .pragma_update(None, "wal_autocheckpoint", 0)
            .expect("pragma");
        connection
            .execute_batch("CREATE TABLE t (x BLOB)")
            .expect("table");
        let writer = Writer::start(connection).expect("writer");
        let checkpointer =
            Checkpointer::start(&path, Duration::from_secs(5), writer.commit_count())
                .expect("checkpointer");
        let size = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let before = size();
        for _ in 0..20 {
            writer
                .write(
                    |connection: &Connection| {
                        for _ in 0..50 {
                            connection.execute("INSERT INTO t (x) VALUES (zeroblob(1024))", [])?;
                        }
                        Ok(())
                    },
                    |_: &()| {},
                )
                .await
                .expect("committed");
        }
        tokio::time::timeout(Duration::from_secs(10), async {
            while size() < before + 1_000_000 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the thousand rows reach the database file");
        checkpointer.close().await;
        writer.close().await;
    }
}
