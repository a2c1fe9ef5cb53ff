//! One history read for every subscriber of a channel that resubscribes at about the same time.
//!
//! After a node or broker fault, every client of a channel comes back within a second or so,
//! each with `since`: a thousand clients meant a thousand reads of the same history from the
//! broker (on NATS, one request per message kept), at the moment the broker is least able to
//! answer them. Here the first subscriber reads for itself; those that come while its read runs
//! wait, and the first of them then reads once for all of them; and so on. A subscriber is
//! served only by a read that began after it joined, which is after its subscription was in
//! place and buffering live publications, so the history and what it buffered still meet with
//! nothing lost between them (`subscribe.rs`).
//!
//! A subscriber whose connection closes while it waits or reads is dropped mid-way: whoever it
//! was to serve is handed to the next one waiting, so no one waits for a read nobody makes.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::broker::{BrokerError, BrokerHistory};

/// A read's result, shared by those it served.
pub(super) type SharedHistory = Result<Arc<BrokerHistory>, BrokerError>;

/// The reads of one channel's history made for its subscribers.
#[derive(Debug, Default)]
pub(super) struct SharedReads {
    group: Mutex<Group>,
}

#[derive(Debug, Default)]
struct Group {
    /// Whether a subscriber is reading (or is about to) for itself and those it was handed.
    reading: bool,
    /// Those that came while it reads: the next read is theirs.
    waiting: Vec<oneshot::Sender<Turn>>,
}

/// What a waiting subscriber is told.
#[derive(Debug)]
enum Turn {
    /// A read made after it joined.
    Done(SharedHistory),
    /// Read now, for itself and these.
    Lead(Vec<oneshot::Sender<Turn>>),
}

impl SharedReads {
    /// The channel's history read by `read`, once for everyone who asks while a read runs; the
    /// read that serves a caller always began after the call.
    pub(super) async fn read<F, Fut>(&self, read: F) -> SharedHistory
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<BrokerHistory, BrokerError>>,
    {
        let waiting = {
            let mut group = self.group.lock();
            if group.reading {
                let (turn, told) = oneshot::channel();
                group.waiting.push(turn);
                Some(told)
            } else {
                group.reading = true;
                None
            }
        };
        let batch = match waiting {
            None => Vec::new(),
            Some(told) => match told.await {
                Ok(Turn::Done(history)) => return history,
                Ok(Turn::Lead(batch)) => batch,
                // Every turn is sent before it is dropped, even by a reader that stops; should
                // one not be, this caller reads for itself.
                Err(_) => return read().await.map(Arc::new),
            },
        };
        let mut lead = Lead { reads: self, batch };
        let history = read().await.map(Arc::new);
        for waiter in std::mem::take(&mut lead.batch) {
            let _ = waiter.send(Turn::Done(history.clone()));
        }
        history
    }
}

/// The subscriber reading: when it is done or dropped, it hands those still to be served to the
/// first of them still waiting.
struct Lead<'a> {
    reads: &'a SharedReads,
    /// Those this read serves (sent their result once it is in; handed over if it never is).
    batch: Vec<oneshot::Sender<Turn>>,
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        let mut group = self.reads.group.lock();
        // Oldest first: the subscriber waiting longest reads next.
        let mut pending: VecDeque<_> = self
            .batch
            .drain(..)
            .chain(group.waiting.drain(..))
            .collect();
        while let Some(next) = pending.pop_front() {
            match next.send(Turn::Lead(pending.into())) {
                Ok(()) => return,
                // That subscriber went away: the next one.
                Err(Turn::Lead(back)) => pending = back.into(),
                // Not what was sent; those left read for themselves (`Err` above).
                Err(Turn::Done(_)) => break,
            }
        }
        group.reading = false;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::broker::BrokerHistory;

    fn history(top: u64) -> BrokerHistory {
        BrokerHistory {
            top,
            epoch: "e".into(),
            oldest: None,
            publications: Vec::new(),
        }
    }

    /// Reads of one channel whose every read counts itself and waits for a permit to finish.
    #[derive(Clone)]
    struct Rig {
        shared: Arc<SharedReads>,
        reads: Arc<AtomicU64>,
        gate: Arc<tokio::sync::Semaphore>,
    }

    impl Rig {
        fn new() -> Rig {
            Rig {
                shared: Arc::new(SharedReads::default()),
                reads: Arc::new(AtomicU64::new(0)),
                gate: Arc::new(tokio::sync::Semaphore::new(0)),
            }
        }

        /// A subscriber asking for the history, on a task of its own.
        fn ask(&self) -> tokio::task::JoinHandle<SharedHistory> {
            let rig = self.clone();
            tokio::spawn(async move {
                rig.shared
                    .read(|| async {
                        let n = rig.reads.fetch_add(1, Ordering::SeqCst) + 1;
                        rig.gate.acquire().await.expect("open").forget();
                        Ok(history(n))
                    })
                    .await
            })
        }

        fn reads(&self) -> u64 {
            self.reads.load(Ordering::SeqCst)
        }

        async fn until(&self, done: impl Fn(&Rig) -> bool) {
            while !done(self) {
                tokio::task::yield_now().await;
            }
        }

        fn waiting(&self) -> usize {
            self.shared.group.lock().waiting.len()
        }
    }

    #[tokio::test]
    async fn those_who_come_while_a_read_runs_share_the_next_one() {
        let rig = Rig::new();
        let first = rig.ask();
        // The first read is running (it counted itself).
        rig.until(|rig| rig.reads() == 1).await;
        let later: Vec<_> = (0..50).map(|_| rig.ask()).collect();
        // All fifty join before the first read finishes.
        rig.until(|rig| rig.waiting() == 50).await;
        rig.gate.add_permits(2);
        let first = first.await.expect("task").expect("read");
        assert_eq!(first.top, 1, "the first read served its caller");
        for waiter in later {
            let history = waiter.await.expect("task").expect("read");
            assert_eq!(
                history.top, 2,
                "one read, begun after they came, served all fifty"
            );
        }
        assert_eq!(rig.reads(), 2);
        assert!(!rig.shared.group.lock().reading);
    }

    #[tokio::test]
    async fn a_reader_that_goes_away_hands_its_waiters_to_the_next_one() {
        let rig = Rig::new();
        let first = rig.ask();
        rig.until(|rig| rig.reads() == 1).await;
        // One waiter that will go away, then two that stay.
        let gone = rig.ask();
        rig.until(|rig| rig.waiting() == 1).await;
        let staying = [rig.ask(), rig.ask()];
        rig.until(|rig| rig.waiting() == 3).await;
        gone.abort();
        let _ = gone.await;
        // The first reader goes away mid-read too.
        first.abort();
        let _ = first.await;
        rig.gate.add_permits(10);
        for waiter in staying {
            let history = tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("a waiter is never left waiting")
                .expect("task")
                .expect("read");
            assert_eq!(history.top, 2, "the next read served both");
        }
        assert_eq!(rig.reads(), 2);
        assert!(!rig.shared.group.lock().reading);
        // And the channel reads again afterwards.
        let again = rig
            .shared
            .read(|| async { Ok(history(9)) })
            .await
            .expect("read");
        assert_eq!(again.top, 9);
    }

    #[tokio::test]
    async fn a_failed_read_is_shared_as_a_failure() {
        let shared = SharedReads::default();
        let failed = shared
            .read(|| async { Err(BrokerError("down".into())) })
            .await;
        assert_eq!(failed.expect_err("failed"), BrokerError("down".into()));
        assert!(!shared.group.lock().reading);
    }
}
