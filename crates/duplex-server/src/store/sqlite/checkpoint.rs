//! WAL checkpoints off the write path.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses its threshold, so one write
//! in a thousand pages would wait for the checkpoint's copy and `fsync` of the database file:
//! the tail of the write latency. The writer's connection turns that off
//! (`wal_autocheckpoint = 0`), and this thread, on a connection of its own, checkpoints
//! `PASSIVE` (never waiting for the writer or the readers) a little after commits happened.
//!
//! A transaction starts the log again from its beginning only if every frame was checkpointed
//! when it began. Under a steady stream of writes that never happens by itself: the writer
//! begins its next transaction right after a commit, and the checkpointer, which never holds it
//! up, always finishes a few frames behind; the log grew to 1.2 GB in a minute of
//! `duplex bench http`. So once the log is past [`WRAP_FRAMES`] and a pass caught up with what
//! was committed when it started, the checkpointer runs passes back to back, each copying what
//! was committed during the one before, until one starts within [`CATCH_UP_FRAMES`] of where
//! the last ended; then it asks the writer to checkpoint the last few frames itself between two
//! transactions, and the writer's next transaction wraps the log. Each frame costs 2–4 µs to
//! copy, and the writes keep coming while a pass copies: asked after one 100 ms pass, the
//! writer had 1,000–4,000 frames to copy and held every write for 3–17 ms. Should readers keep
//! a checkpoint from finishing while the log grows past [`RESTART_FRAMES`], a `RESTART`
//! checkpoint waits for them (and holds writers back) until it is done.

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

/// WAL frames (pages) after which the writer is asked to start the log again once the
/// checkpointer caught up: 16 MiB of 4 KiB pages, 4–13 wraps a second under creates at full
/// and half speed on the machines measured. Each time costs the writer one short checkpoint
/// (0.6–7.6 ms measured, most of it the syncs of the log and the database file). A longer log
/// wrapped less often but made creates at half rate wait longer, measured: p99 5.1–5.2 ms at
/// 4,096 frames, 5.4–6.3 at 16,384, 7.1–8.0 at 65,536; and on another machine each wrap of a
/// 16,384-frame log held the writer longer (p90 5.3–6.0 ms against 2.8–3.6).
pub(super) const WRAP_FRAMES: i64 = 4_096;

/// WAL frames after which a checkpoint waits for readers: about 200 MB of 4 KiB pages.
const RESTART_FRAMES: i64 = 50_000;

/// Frames committed during a catching-up pass few enough for the writer to copy the rest.
/// What the writer then holds every write for is that copy, the checkpoint's two syncs (log,
/// then database file) and the sync of the new log's header in its next commit. With 48
/// rather than 256, its checkpoint at a wrap took p50 1.05–1.43 ms, p90 2.2–2.7, max 3.6–4.5
/// (1.36–1.83, 2.7–3.1 and 3.8–7.0 with 256; three runs each of `duplex bench http`), after
/// two to four passes most often. A pass takes at least its own two syncs, so fewer than what
/// is committed meanwhile (some 40 frames at 15,000 creates a second) would seldom be reached.
const CATCH_UP_FRAMES: i64 = 48;

/// Catching-up passes before the writer is asked anyway: writes faster than the copy never
/// leave fewer frames, and the log must still wrap.
const CATCH_UP_PASSES: usize = 16;

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
        restart: Arc<std::sync::atomic::AtomicBool>,
        wrap_frames: i64,
        release_readers: Box<dyn Fn() + Send>,
    ) -> Result<Checkpointer, StoreError> {
        let connection = Connection::open(path)?;
        connection.busy_timeout(busy_timeout)?;
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("duplex-sqlite-checkpoint".into())
            .spawn(move || {
                checkpoint_until_stopped(
                    &connection,
                    &stopped,
                    &commits,
                    &restart,
                    wrap_frames,
                    &*release_readers,
                );
            })
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
    restart: &std::sync::atomic::AtomicBool,
    wrap_frames: i64,
    release_readers: &dyn Fn(),
) {
    let mut checkpointed = commits.load(Ordering::Relaxed);
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(INTERVAL) {
        let now = commits.load(Ordering::Relaxed);
        if now == checkpointed {
            continue;
        }
        checkpointed = now;
        // Idle read snapshots would keep this pass from the end of the log.
        release_readers();
        let started = std::time::Instant::now();
        match checkpoint(connection, "PASSIVE") {
            Ok((log, done)) if log > RESTART_FRAMES && done < log => {
                tracing::info!(
                    frames = log,
                    checkpointed = done,
                    "the WAL is long: a RESTART checkpoint holds writers until it is done"
                );
                let started = std::time::Instant::now();
                match checkpoint(connection, "RESTART") {
                    Ok(_) => tracing::info!(took = ?started.elapsed(), "RESTART checkpoint done"),
                    Err(error) => tracing::warn!(%error, frames = log, "a WAL checkpoint failed"),
                }
            }
            Ok((log, done)) => {
                tracing::debug!(frames = log, checkpointed = done, took = ?started.elapsed(), "WAL checkpoint");
                if log >= wrap_frames && done == log {
                    let _ = catch_up(connection, log);
                    restart.store(true, Ordering::Relaxed);
                }
            }
            Err(error) => tracing::warn!(%error, "a WAL checkpoint failed"),
        }
    }
}

/// Checkpoints pass after pass, each copying what was committed during the one before, until
/// one found at most [`CATCH_UP_FRAMES`] new frames (or after [`CATCH_UP_PASSES`]): what is
/// left for the writer to copy while every write waits is then what came during that short
/// last pass. `log` is where the last pass began. Returns the frames the last pass found new
/// when it caught up, `None` when it did not.
fn catch_up(connection: &Connection, mut log: i64) -> Option<i64> {
    let started = std::time::Instant::now();
    for pass in 1..=CATCH_UP_PASSES {
        match checkpoint(connection, "PASSIVE") {
            Ok((now, done)) => {
                // Fewer frames than before: the log started again meanwhile.
                let fresh = now - log;
                log = now;
                if done == now && fresh <= CATCH_UP_FRAMES {
                    tracing::debug!(passes = pass, frames = now, fresh, took = ?started.elapsed(), "the checkpoint caught up with the writer");
                    return Some(fresh);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "a WAL checkpoint failed");
                return None;
            }
        }
    }
    tracing::debug!(passes = CATCH_UP_PASSES, frames = log, took = ?started.elapsed(), "the checkpoint did not catch up with the writer");
    None
}

/// Runs a checkpoint; returns the frames in the log and how many of them are checkpointed.
pub(super) fn checkpoint(connection: &Connection, mode: &str) -> rusqlite::Result<(i64, i64)> {
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

    /// A database in WAL mode whose commits never checkpoint by themselves, as the store's,
    /// with a table `t (x BLOB)` to write to.
    fn wal_without_autocheckpoint(path: &std::path::Path) -> Connection {
        let connection = Connection::open(path).expect("open");
        let _: String = connection
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .expect("wal");
        connection
            .pragma_update(None, "wal_autocheckpoint", 0)
            .expect("pragma");
        connection
            .execute_batch("CREATE TABLE t (x BLOB)")
            .expect("table");
        connection
    }

    /// With automatic checkpoints off, the thread is what moves committed pages into the
    /// database file.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_reach_the_database_file_without_automatic_checkpoints() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("db.sqlite");
        let connection = wal_without_autocheckpoint(&path);
        let writer = Writer::start(connection).expect("writer");
        let checkpointer = Checkpointer::start(
            &path,
            Duration::from_secs(5),
            writer.commit_count(),
            writer.restart_flag(),
            super::WRAP_FRAMES,
            Box::new(|| {}),
        )
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

    /// A writer that never stops: the catching-up passes still end with one that found few new
    /// frames, so the writer is left only what came during that short pass to copy (asked
    /// after one 100 ms pass, it had 1,000–4,000 frames and held every write 3–17 ms).
    #[test]
    fn catching_up_leaves_the_writer_few_frames_while_it_keeps_writing() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("db.sqlite");
        let connection = wal_without_autocheckpoint(&path);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writing = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut commits = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    connection
                        .execute_batch(
                            "BEGIN IMMEDIATE; INSERT INTO t (x) VALUES (zeroblob(3000)); COMMIT",
                        )
                        .expect("commit");
                    commits += 1;
                }
                commits
            })
        };
        let checkpointer = Connection::open(&path).expect("open");
        checkpointer
            .busy_timeout(Duration::from_secs(5))
            .expect("busy timeout");
        // One pass, then 2,000 frames committed after it, as in the 100 ms between two of the
        // thread's passes.
        let (log, _) = super::checkpoint(&checkpointer, "PASSIVE").expect("pass");
        let wal = dir.path().join("db.sqlite-wal");
        let frames = || std::fs::metadata(&wal).map_or(0, |m| (m.len() as i64 - 32) / (4096 + 24));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while frames() < log + 2_000 {
            assert!(
                std::time::Instant::now() < deadline && !writing.is_finished(),
                "the writer committed 2,000 frames within 10 s"
            );
            std::thread::yield_now();
        }
        let caught_up = super::catch_up(&checkpointer, log);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let commits = writing.join().expect("writer");
        let fresh = caught_up.expect("a pass caught up with the writer");
        assert!(
            fresh <= super::CATCH_UP_FRAMES,
            "the last pass found {fresh} new frames ({commits} commits)"
        );
    }

    /// Under writers that never leave the writer idle, the log still starts again from its
    /// beginning, again and again: without the writer's own checkpoint it grew without bound (to 1.2 GB in a
    /// minute of `duplex bench http`), and a `RESTART` checkpoint then held writes for 57 ms.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_log_wraps_under_a_steady_stream_of_writes() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("db.sqlite");
        let connection = wal_without_autocheckpoint(&path);
        connection
            .pragma_update(None, "synchronous", "NORMAL")
            .expect("pragma");
        let writer = std::sync::Arc::new(Writer::start(connection).expect("writer"));
        let checkpointer = Checkpointer::start(
            &path,
            Duration::from_secs(5),
            writer.commit_count(),
            writer.restart_flag(),
            64,
            Box::new(|| {}),
        )
        .expect("checkpointer");
        // The log's header counts the times it started again from its beginning (the
        // checkpoint sequence number, bytes 12..16); read while the writer is open, since the
        // last connection to close checkpoints and removes the log.
        let log = dir.path().join("db.sqlite-wal");
        let wraps = move || {
            std::fs::read(&log)
                .ok()
                .and_then(|header| Some(u32::from_be_bytes(header.get(12..16)?.try_into().ok()?)))
        };
        // Sixteen writers, each always waiting on its next write, until the log started again
        // three times (or 30 s passed): the writer is seldom idle, so few of its transactions
        // start after a checkpoint that caught up.
        let started = std::time::Instant::now();
        let wrapped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for task in 0..16 {
            let (writer, wrapped, wraps) = (writer.clone(), wrapped.clone(), wraps.clone());
            tasks.push(tokio::spawn(async move {
                let mut written = 0u64;
                while !wrapped.load(std::sync::atomic::Ordering::Relaxed)
                    && started.elapsed() < Duration::from_secs(30)
                {
                    writer
                        .write(
                            |connection: &Connection| {
                                connection
                                    .execute("INSERT INTO t (x) VALUES (zeroblob(512))", [])?;
                                Ok(())
                            },
                            |_: &()| {},
                        )
                        .await
                        .expect("committed");
                    written += 1;
                    if task == 0 && written.is_multiple_of(64) && wraps().is_some_and(|n| n >= 3) {
                        wrapped.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                written
            }));
        }
        let mut written = 0;
        for task in tasks {
            written += task.await.expect("writer task");
        }
        let transactions = writer.commits();
        checkpointer.close().await;
        let wraps = wraps().expect("the log");
        writer.close().await;
        assert!(
            wraps >= 3,
            "the log started again {wraps} times in {:?} of {transactions} transactions ({written} writes)",
            started.elapsed()
        );
    }
}
