//! Group commit: one thread owns SQLite's write connection and gathers the writes that are
//! waiting into one transaction.
//!
//! The thread takes the first write waiting, then every other already queued (up to
//! [`MAX_BATCH`]), runs them in order inside `BEGIN IMMEDIATE … COMMIT`, and only then answers
//! each. A write sees the writes before it in the same transaction, so preconditions are decided
//! against exactly what will be committed before it; a write whose logic refuses (a failed
//! `If-Match`, a statement refused before it changed anything) writes nothing and the others go
//! on. A write that fails after it changed rows (its record inserted, then its event's append
//! refused) cannot be undone alone without a savepoint around every write, which costs each
//! write a copy of the pages it touches: the transaction is rolled back whole instead, as when
//! SQLite ends it itself (a full disk, an I/O error): the writes already run in it fail with
//! it, none of the failed write is committed, and the rest go into the next transaction.
//! Once `COMMIT` returns, the writes are announced in the order they ran, then answered: a 2xx
//! means committed, exactly as with one transaction per write, at one commit's cost for many.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use parking_lot::Mutex;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::store::StoreError;

/// The most writes one transaction gathers.
const MAX_BATCH: usize = 512;

/// Writes waiting for the thread; a full queue makes callers wait their turn.
const QUEUE: usize = 4096;

/// What a write does once its transaction's outcome is known: `Err` with why it was not
/// committed.
type Finish = Box<dyn FnOnce(Result<(), &str>) + Send>;

/// A write waiting for the thread.
trait Job: Send {
    /// Runs inside the open transaction; true when the write succeeded.
    fn run(self: Box<Self>, connection: &Connection) -> (Finish, bool);
    /// Answers without running: the transaction could not start.
    fn fail(self: Box<Self>, why: &str);
}

struct Write<T, W, C> {
    work: W,
    committed: C,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, W, C> Job for Write<T, W, C>
where
    T: Send + 'static,
    W: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    C: FnOnce(&T) + Send + 'static,
{
    fn run(self: Box<Self>, connection: &Connection) -> (Finish, bool) {
        let Write {
            work,
            committed,
            reply,
        } = *self;
        let result = work(connection);
        let succeeded = result.is_ok();
        let finish = Box::new(move |commit: Result<(), &str>| {
            let answer = match (result, commit) {
                (Ok(value), Ok(())) => {
                    committed(&value);
                    Ok(value)
                }
                (Ok(_), Err(why)) => Err(not_committed(why)),
                (Err(error), _) => Err(error),
            };
            let _ = reply.send(answer);
        });
        (finish, succeeded)
    }

    fn fail(self: Box<Self>, why: &str) {
        let _ = self.reply.send(Err(not_committed(why)));
    }
}

fn not_committed(why: &str) -> StoreError {
    StoreError::Unavailable(format!("the write was not committed: {why}"))
}

/// The handle to the writer thread.
#[derive(Debug)]
pub(super) struct Writer {
    jobs: Mutex<Option<mpsc::Sender<Box<dyn Job>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Transactions committed so far.
    commits: Arc<AtomicU64>,
    /// Set by the checkpointer when the log is long and checkpointed: the writer then
    /// checkpoints the last few frames itself between two transactions, so that its next one
    /// starts the log again from its beginning (see `checkpoint.rs`).
    restart: Arc<AtomicBool>,
}

impl Writer {
    /// Starts the thread that owns `connection`.
    pub(super) fn start(connection: Connection) -> std::io::Result<Writer> {
        let (jobs, queue) = mpsc::channel(QUEUE);
        let commits = Arc::new(AtomicU64::new(0));
        let restart = Arc::new(AtomicBool::new(false));
        let (counted, wanted) = (commits.clone(), restart.clone());
        let thread = std::thread::Builder::new()
            .name("duplex-sqlite-writer".into())
            .spawn(move || write_until_closed(&connection, queue, &counted, &wanted))?;
        Ok(Writer {
            jobs: Mutex::new(Some(jobs)),
            thread: Mutex::new(Some(thread)),
            commits,
            restart,
        })
    }

    /// Runs `work` in the next transaction; `committed` is called once it committed, in the
    /// order the writes ran, before the answer. The write goes on to its commit even if the
    /// caller stops waiting.
    pub(super) async fn write<T, W, C>(&self, work: W, committed: C) -> Result<T, StoreError>
    where
        T: Send + 'static,
        W: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        C: FnOnce(&T) + Send + 'static,
    {
        let jobs = self
            .jobs
            .lock()
            .clone()
            .ok_or_else(|| StoreError::Unavailable("the store is closed".into()))?;
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Write {
            work,
            committed,
            reply,
        });
        jobs.send(job)
            .await
            .map_err(|_| StoreError::Unavailable("the store's writer stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the store's writer stopped".into()))?
    }

    /// Transactions committed so far.
    pub(super) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// The count of transactions committed, as it moves.
    pub(super) fn commit_count(&self) -> Arc<AtomicU64> {
        self.commits.clone()
    }

    /// What the checkpointer sets to have the writer start the log again.
    pub(super) fn restart_flag(&self) -> Arc<AtomicBool> {
        self.restart.clone()
    }

    /// Takes no more writes, lets the thread finish those queued, and waits for it.
    pub(super) async fn close(&self) {
        self.jobs.lock().take();
        let thread = self.thread.lock().take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            tracing::debug!(transactions = self.commits(), "the store's writer stopped");
        }
    }
}

fn write_until_closed(
    connection: &Connection,
    mut queue: mpsc::Receiver<Box<dyn Job>>,
    commits: &AtomicU64,
    restart: &AtomicBool,
) {
    let mut batch: Vec<Box<dyn Job>> = Vec::new();
    while let Some(job) = queue.blocking_recv() {
        batch.push(job);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        while !batch.is_empty() {
            commit_some(connection, &mut batch, commits);
        }
        if restart.swap(false, Ordering::Relaxed) {
            restart_log(connection);
        }
    }
}

/// Checkpoints, between two transactions, the frames committed since the checkpointer's last
/// pass (a few milliseconds of writes, already mostly copied), so that every frame is in the
/// database file when the next transaction begins: that transaction then writes the log from
/// its beginning instead of growing it. Under a steady stream of writes nothing else can: the
/// checkpointer, which never holds the writer up, always finishes a little behind it.
fn restart_log(connection: &Connection) {
    let started = std::time::Instant::now();
    match super::checkpoint::checkpoint(connection, "PASSIVE") {
        Ok((log, done)) => {
            tracing::debug!(frames = log, checkpointed = done, took = ?started.elapsed(), "the writer checkpointed the end of the log");
        }
        Err(error) => tracing::warn!(%error, "a WAL checkpoint failed"),
    }
}

/// Runs the batch's writes in one transaction and finishes them; leaves in `batch` the writes
/// that did not run because SQLite ended the transaction early. True when it committed.
/// Runs some of `batch` in one transaction and answers them; counts the commit in `commits`
/// before answering, so that a caller that got its answer finds its transaction counted.
fn commit_some(connection: &Connection, batch: &mut Vec<Box<dyn Job>>, commits: &AtomicU64) {
    if let Err(error) = connection.execute_batch("BEGIN IMMEDIATE") {
        let why = error.to_string();
        tracing::error!(%why, "cannot begin a write transaction");
        for job in batch.drain(..) {
            job.fail(&why);
        }
        return;
    }
    let mut jobs = std::mem::take(batch).into_iter();
    let mut finishes = Vec::with_capacity(jobs.len());
    let mut lost = false;
    for job in jobs.by_ref() {
        let changed = connection.total_changes();
        // A write that panics (a bug) must not take the thread, and every later write, with it:
        // its transaction is rolled back like one SQLite ended, and the thread goes on.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run(connection))) {
            Ok((finish, succeeded)) => {
                finishes.push(finish);
                if !succeeded
                    && connection.total_changes() != changed
                    && !connection.is_autocommit()
                {
                    tracing::error!(
                        "a write failed after changing rows; its transaction is rolled back"
                    );
                    let _ = connection.execute_batch("ROLLBACK");
                }
            }
            Err(_) => {
                tracing::error!("a write panicked; its transaction is rolled back");
                if !connection.is_autocommit() {
                    let _ = connection.execute_batch("ROLLBACK");
                }
                lost = true;
                break;
            }
        }
        if connection.is_autocommit() {
            // A failing statement made SQLite roll the transaction back.
            lost = true;
            break;
        }
    }
    batch.extend(jobs);
    let outcome = if lost {
        Err("the transaction was rolled back by an error".to_owned())
    } else {
        connection.execute_batch("COMMIT").map_err(|error| {
            if !connection.is_autocommit() {
                let _ = connection.execute_batch("ROLLBACK");
            }
            error.to_string()
        })
    };
    match &outcome {
        Ok(()) => {
            commits.fetch_add(1, Ordering::Relaxed);
        }
        Err(why) => tracing::error!(%why, writes = finishes.len(), "a group commit failed"),
    }
    for finish in finishes {
        finish(outcome.as_ref().map(|_| ()).map_err(String::as_str));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use rusqlite::Connection;

    use super::{QUEUE, Writer};
    use crate::store::StoreError;

    fn writer() -> Arc<Writer> {
        let connection = Connection::open_in_memory().expect("open");
        connection
            .execute_batch("CREATE TABLE t (x INTEGER PRIMARY KEY)")
            .expect("table");
        Arc::new(Writer::start(connection).expect("writer"))
    }

    fn insert(x: i64) -> impl FnOnce(&Connection) -> Result<i64, StoreError> + Send + 'static {
        move |connection: &Connection| {
            connection.execute("INSERT INTO t (x) VALUES (?1)", [x])?;
            Ok(x)
        }
    }

    fn count(connection: &Connection) -> Result<i64, StoreError> {
        Ok(connection.query_row("SELECT COUNT(*) FROM t", [], |row| row.get(0))?)
    }

    /// Keeps the writer's thread busy in a transaction of its own until the returned sender
    /// is used, so the writes sent meanwhile wait together.
    async fn hold(writer: &Arc<Writer>) -> std::sync::mpsc::Sender<()> {
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let (running, started) = tokio::sync::oneshot::channel::<()>();
        let writer = writer.clone();
        tokio::spawn(async move {
            let work = move |_: &Connection| {
                let _ = running.send(());
                gate.recv().expect("released");
                Ok(())
            };
            writer.write(work, |_: &()| {}).await.expect("committed");
        });
        started.await.expect("the holding write runs");
        release
    }

    /// Waits until `n` writes are queued behind the one running.
    async fn until_queued(writer: &Writer, n: usize) {
        let queue = writer.jobs.lock().clone().expect("open");
        tokio::time::timeout(Duration::from_secs(10), async {
            while QUEUE - queue.capacity() < n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the writes are queued");
    }

    /// Writes that wait while a transaction runs share the next one; each is answered, and
    /// told about in order, after that transaction committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_writes_share_one_transaction() {
        let writer = writer();
        let release = hold(&writer).await;
        let told = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let mut waiting = Vec::new();
        for x in 1..=10 {
            let (writer, told) = (writer.clone(), told.clone());
            waiting.push(tokio::spawn(async move {
                writer
                    .write(insert(x), move |x: &i64| told.lock().push(*x))
                    .await
            }));
        }
        until_queued(&writer, 10).await;
        release.send(()).expect("release");
        for (x, write) in (1..=10).zip(waiting) {
            assert_eq!(write.await.expect("task").expect("committed"), x);
        }
        assert_eq!(
            writer.commits(),
            2,
            "the holding write's, then one for the ten"
        );
        let mut told = told.lock().clone();
        told.sort_unstable();
        assert_eq!(told, (1..=10).collect::<Vec<_>>());
        let total = writer.write(count, |_: &i64| {}).await.expect("count");
        assert_eq!(total, 10);
        writer.close().await;
    }

    /// Sends the three writes in this order into one transaction and returns their answers.
    async fn three_together<A, B, C>(
        writer: &Arc<Writer>,
        (a, b, c): (A, B, C),
    ) -> [Result<i64, StoreError>; 3]
    where
        A: FnOnce(&Connection) -> Result<i64, StoreError> + Send + 'static,
        B: FnOnce(&Connection) -> Result<i64, StoreError> + Send + 'static,
        C: FnOnce(&Connection) -> Result<i64, StoreError> + Send + 'static,
    {
        let release = hold(writer).await;
        let told = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let tell = |told: &Arc<parking_lot::Mutex<Vec<i64>>>| {
            let told = told.clone();
            move |x: &i64| told.lock().push(*x)
        };
        let first = tokio::spawn({
            let (writer, tell) = (writer.clone(), tell(&told));
            async move { writer.write(a, tell).await }
        });
        until_queued(writer, 1).await;
        let second = tokio::spawn({
            let (writer, tell) = (writer.clone(), tell(&told));
            async move { writer.write(b, tell).await }
        });
        until_queued(writer, 2).await;
        let third = tokio::spawn({
            let (writer, tell) = (writer.clone(), tell(&told));
            async move { writer.write(c, tell).await }
        });
        until_queued(writer, 3).await;
        release.send(()).expect("release");
        let answers = [
            first.await.expect("task"),
            second.await.expect("task"),
            third.await.expect("task"),
        ];
        let committed: Vec<i64> = answers
            .iter()
            .filter_map(|a| a.as_ref().ok())
            .copied()
            .collect();
        assert_eq!(
            *told.lock(),
            committed,
            "told about exactly the committed, in order"
        );
        answers
    }

    /// A write that fails is answered with its error and writes nothing; the writes beside it
    /// in the same transaction commit. When SQLite ends the transaction itself, or a write
    /// panics, the writes already run in it are not committed (and say so), and the rest go on
    /// in the next.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_write_takes_nothing_else_with_it() {
        let writer = writer();
        let [ok, duplicate, after] =
            three_together(&writer, (insert(1), insert(1), insert(2))).await;
        assert_eq!(ok.expect("committed"), 1);
        assert!(
            matches!(duplicate, Err(StoreError::Sqlite(_))),
            "{duplicate:?}"
        );
        assert_eq!(after.expect("committed"), 2);

        let rollback = |connection: &Connection| {
            connection.execute_batch("ROLLBACK")?;
            Ok(0)
        };
        let [before, rolled_back, next] =
            three_together(&writer, (insert(3), rollback, insert(4))).await;
        assert!(
            matches!(before, Err(StoreError::Unavailable(_))),
            "{before:?}"
        );
        assert!(
            matches!(rolled_back, Err(StoreError::Unavailable(_))),
            "{rolled_back:?}"
        );
        assert_eq!(next.expect("committed in the next transaction"), 4);
        let total = writer.write(count, |_: &i64| {}).await.expect("count");
        assert_eq!(total, 3, "1, 2 and 4");

        // A write that panics fails alone with its transaction; the thread goes on.
        let panics = |_: &Connection| -> Result<i64, StoreError> { panic!("a bug in a write") };
        let [before, panicked, next] =
            three_together(&writer, (insert(5), panics, insert(6))).await;
        assert!(
            matches!(before, Err(StoreError::Unavailable(_))),
            "{before:?}"
        );
        assert!(
            matches!(panicked, Err(StoreError::Unavailable(_))),
            "{panicked:?}"
        );
        assert_eq!(next.expect("committed in the next transaction"), 6);
        let total = writer.write(count, |_: &i64| {}).await.expect("count");
        assert_eq!(total, 4, "1, 2, 4 and 6");

        // A write that fails partway (one row written, the next refused) leaves nothing of
        // itself: its transaction goes whole, the write before it with it, and the write after
        // it commits in the next.
        let halfway = |connection: &Connection| -> Result<i64, StoreError> {
            connection.execute("INSERT INTO t (x) VALUES (7)", [])?;
            connection.execute("INSERT INTO t (x) VALUES (1)", [])?;
            Ok(7)
        };
        let [before, failed, after] =
            three_together(&writer, (insert(8), halfway, insert(9))).await;
        assert!(
            matches!(before, Err(StoreError::Unavailable(_))),
            "{before:?}"
        );
        assert!(matches!(failed, Err(StoreError::Sqlite(_))), "{failed:?}");
        assert_eq!(after.expect("committed in the next transaction"), 9);
        let seven = |connection: &Connection| -> Result<i64, StoreError> {
            Ok(connection.query_row("SELECT COUNT(*) FROM t WHERE x = 7", [], |row| row.get(0))?)
        };
        assert_eq!(
            writer.write(seven, |_: &i64| {}).await.expect("count"),
            0,
            "the failed write's first row is not committed"
        );
        let total = writer.write(count, |_: &i64| {}).await.expect("count");
        assert_eq!(total, 5, "1, 2, 4, 6 and 9");
        writer.close().await;
    }
}
