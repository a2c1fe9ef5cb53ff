//! A connection's outgoing queue: bounded in publications and in bytes, with the namespace's
//! slow-consumer policy applied at whichever bound is hit first, and drained whole by the
//! connection's writer so that everything queued goes out in one write.
//!
//! A `parking_lot` mutex guards a `VecDeque`; it is held only to push or to swap the contents
//! out, never across an `.await`. Publishers (the hub) and the writer are the only users. Lock
//! order: a conflation slot may be locked before the queue's state, never after it (dropping a
//! queued slot clears it once the state is unlocked).
//!
//! Bytes are counted twice: per queue (what this connection has fallen behind by, the bound the
//! policy applies at), and once per publication in the server's queue budget however many
//! queues share it ([`Queued`]). When the budget is over, the enforcer sheds the fullest queues
//! first ([`OutgoingQueue::shed`]); a budget far over makes a queue that holds more than
//! [`SHED_FLOOR`] bytes shed as it grows.
//!
//! A queue has one writer (the connection's task) and at most one other task waiting for it to
//! close (raw TCP's reader), so each waits through an `AtomicWaker`: two words per connection
//! and a wake-up without a lock, where `Notify` and a `CancellationToken` cost a waiter list and
//! a heap node per connection.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use duplex_proto::DisconnectCode;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

use super::budget::ByteBudget;
use super::namespace::SlowConsumerPolicy;
use super::publication::{Publication, Queued};

/// A queue holding no more than this many bytes of publications is never made to shed by a
/// budget far over its limit: fast consumers keep what they are about to receive.
pub const SHED_FLOOR: usize = 64 * 1024;

/// A writer takes at most about this many bytes per batch (always at least one item): what a
/// writer holds while its socket is full stays small, and the rest stays in the queue, where
/// the slow-consumer policy and the budget can still shed it.
pub const BATCH_BYTES: usize = 64 * 1024;

/// Something for a connection's writer to send.
#[derive(Debug)]
pub enum Outgoing {
    /// A publication.
    Publication(Queued),
    /// The newest publication of a conflated (`latest`) subscription, taken when written.
    Latest(Arc<LatestSlot>),
    /// A JSON control frame (reply, error, ping…); never dropped.
    Control(Bytes),
    /// Raw TCP: everything after this uses length-prefixed framing.
    SwitchToLengthPrefixed,
    /// WebSocket: a ping frame (the keepalive sweeper's; other transports skip it).
    Ping,
}

/// The pending publication of one conflated subscription.
#[derive(Debug, Default)]
pub struct LatestSlot {
    pending: Mutex<Option<Queued>>,
    /// The pending publication's size, readable without the lock.
    size: AtomicUsize,
}

impl LatestSlot {
    /// Takes the pending publication, if any.
    pub fn take(&self) -> Option<Queued> {
        let taken = self.pending.lock().take();
        self.size.store(0, Ordering::Relaxed);
        taken
    }

    /// The pending publication's size in bytes (0 when none), without the lock.
    pub fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }
}

/// What pushing a publication did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// Queued after dropping this many of the oldest queued publications.
    Dropped(usize),
    /// Replaced a pending publication of the same subscription.
    Conflated,
    /// The queue was full and the policy disconnects; the connection is closing.
    Disconnecting,
    /// The connection is already closing; nothing was queued.
    Closed,
}

/// What [`OutgoingQueue::shed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// Dropped this many of the oldest publications (0: nothing to shed).
    Dropped(usize),
    /// The queue holds publications of a `disconnect` namespace: it is closing instead.
    Disconnecting,
}

/// How much a queue may hold.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Publications (and conflation slots) queued before the policy applies.
    pub publications: usize,
    /// Bytes of publications queued before the policy applies; an empty queue always takes
    /// one publication, however large. Control frames may take twice this.
    pub bytes: usize,
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<Outgoing>,
    /// Publications (and conflation markers) among `items`.
    publications: usize,
    /// Their bytes.
    publication_bytes: usize,
    /// Bytes of control frames among `items`.
    control_bytes: usize,
    /// Whether a publication of a `disconnect` namespace is among `items`: shedding this queue
    /// must close it rather than drop silently.
    strict: bool,
    closing: Option<DisconnectCode>,
}

/// The bounded outgoing queue of one connection.
#[derive(Debug)]
pub struct OutgoingQueue {
    state: Mutex<State>,
    /// The writer, waiting for something to send.
    writer: AtomicWaker,
    /// A task waiting for the queue to close (raw TCP's reader), so it stops too.
    closed: AtomicWaker,
    limits: QueueLimits,
    /// The server's budget for queued bytes (control frames are counted here; publications
    /// count themselves, see [`Queued`]).
    budget: Option<Arc<ByteBudget>>,
}

/// Conflation slots taken out of a queue while its state was locked, cleared once it is not.
type Unslotted = Vec<Arc<LatestSlot>>;

impl OutgoingQueue {
    /// A queue holding at most `capacity` publications, unbounded in bytes and outside any
    /// budget (unit tests).
    pub fn new(capacity: usize) -> Self {
        Self::with_limits(
            QueueLimits {
                publications: capacity,
                bytes: usize::MAX,
            },
            None,
        )
    }

    /// A queue bounded by `limits`, counting in `budget`.
    pub fn with_limits(limits: QueueLimits, budget: Option<Arc<ByteBudget>>) -> Self {
        OutgoingQueue {
            state: Mutex::new(State::default()),
            writer: AtomicWaker::new(),
            closed: AtomicWaker::new(),
            limits: QueueLimits {
                publications: limits.publications.max(1),
                bytes: limits.bytes.max(1),
            },
            budget,
        }
    }

    /// Bytes queued now (publications and control frames): how far behind the connection is.
    pub fn queued_bytes(&self) -> usize {
        let state = self.state.lock();
        state.publication_bytes + state.control_bytes
    }

    /// Publications queued now.
    pub fn queued_publications(&self) -> usize {
        self.state.lock().publications
    }

    /// Whether the queue has no room for `size` more bytes of publications.
    fn full(&self, state: &State, size: usize) -> bool {
        state.publications >= self.limits.publications
            || (state.publication_bytes > 0
                && state.publication_bytes.saturating_add(size) > self.limits.bytes)
            || (state.publication_bytes > SHED_FLOOR
                && self.budget.as_ref().is_some_and(|b| b.is_far_over()))
    }

    /// Queues a publication under `policy`; `latest` is the subscription's slot when the policy
    /// conflates.
    pub fn push_publication(
        &self,
        publication: &Arc<Publication>,
        policy: SlowConsumerPolicy,
        latest: Option<&Arc<LatestSlot>>,
    ) -> Pushed {
        let size = publication.size();
        let mut unslotted = Unslotted::new();
        let outcome = if let (SlowConsumerPolicy::Latest, Some(slot)) = (policy, latest) {
            let mut pending = slot.pending.lock();
            if pending.is_some() {
                let replaced = pending.replace(Queued::new(publication));
                let before = slot.size.swap(size, Ordering::Relaxed);
                drop(pending);
                let mut state = self.state.lock();
                state.publication_bytes = state.publication_bytes.saturating_sub(before) + size;
                drop(state);
                drop(replaced);
                return Pushed::Conflated;
            }
            let mut state = self.state.lock();
            if state.closing.is_some() {
                return Pushed::Closed;
            }
            *pending = Some(Queued::new(publication));
            slot.size.store(size, Ordering::Relaxed);
            drop(pending);
            let mut dropped = 0;
            while self.full(&state, size) && Self::drop_oldest(&mut state, &mut unslotted) {
                dropped += 1;
            }
            self.enqueue(state, Outgoing::Latest(slot.clone()), size, true);
            if dropped > 0 {
                Pushed::Dropped(dropped)
            } else {
                Pushed::Queued
            }
        } else {
            let mut state = self.state.lock();
            if state.closing.is_some() {
                return Pushed::Closed;
            }
            let mut outcome = Pushed::Queued;
            if self.full(&state, size) {
                match policy {
                    SlowConsumerPolicy::Disconnect => {
                        state.closing = Some(DisconnectCode::SlowConsumer);
                        drop(state);
                        self.wake_on_close();
                        return Pushed::Disconnecting;
                    }
                    SlowConsumerPolicy::DropOldest | SlowConsumerPolicy::Latest => {
                        let mut dropped = 0;
                        while self.full(&state, size)
                            && Self::drop_oldest(&mut state, &mut unslotted)
                        {
                            dropped += 1;
                        }
                        if dropped > 0 {
                            outcome = Pushed::Dropped(dropped);
                        }
                    }
                }
            }
            if policy == SlowConsumerPolicy::Disconnect {
                state.strict = true;
            }
            self.enqueue(
                state,
                Outgoing::Publication(Queued::new(publication)),
                size,
                true,
            );
            outcome
        };
        clear(unslotted);
        outcome
    }

    /// Queues a publication replayed for recovery: never dropped, whatever the queue holds,
    /// because the client was promised every one of them (history bounds how many there are).
    pub fn push_recovered(&self, publication: &Arc<Publication>) {
        let state = self.state.lock();
        if state.closing.is_some() {
            return;
        }
        let size = publication.size();
        self.enqueue(
            state,
            Outgoing::Publication(Queued::new(publication)),
            size,
            true,
        );
    }

    /// Queues a control frame. A client that keeps asking without ever reading is disconnected
    /// once control frames fill the queue four times over in count, or twice over in bytes.
    pub fn push_control(&self, frame: Bytes) {
        self.push_other(Outgoing::Control(frame));
    }

    /// Queues a non-publication item (control frame or framing switch).
    pub fn push_other(&self, item: Outgoing) {
        let size = match &item {
            Outgoing::Control(frame) => frame.len(),
            _ => 0,
        };
        let mut state = self.state.lock();
        if state.closing.is_some() {
            return;
        }
        let controls = state.items.len() - state.publications;
        let too_many = controls >= self.limits.publications.saturating_mul(4);
        let too_large = state.control_bytes > 0
            && state.control_bytes.saturating_add(size) > self.limits.bytes.saturating_mul(2);
        if too_many || too_large {
            state.closing = Some(DisconnectCode::SlowConsumer);
            drop(state);
            self.wake_on_close();
            return;
        }
        if let Some(budget) = &self.budget {
            budget.add(size);
        }
        self.enqueue(state, item, size, false);
    }

    /// Asks the writer to send a `disconnect` with `code` and close; the first code wins.
    pub fn close(&self, code: DisconnectCode) {
        let mut state = self.state.lock();
        if state.closing.is_none() {
            state.closing = Some(code);
        }
        drop(state);
        self.wake_on_close();
    }

    /// Makes room when the server's queue budget is over: drops the oldest publications until
    /// at most `keep` bytes of them are queued, or closes the queue with `slow_consumer` when it
    /// holds publications of a `disconnect` namespace.
    pub fn shed(&self, keep: usize) -> Shed {
        let mut unslotted = Unslotted::new();
        let mut state = self.state.lock();
        if state.closing.is_some() || state.publication_bytes <= keep {
            return Shed::Dropped(0);
        }
        if state.strict {
            state.closing = Some(DisconnectCode::SlowConsumer);
            drop(state);
            self.wake_on_close();
            return Shed::Disconnecting;
        }
        let mut dropped = 0;
        while state.publication_bytes > keep && Self::drop_oldest(&mut state, &mut unslotted) {
            dropped += 1;
        }
        drop(state);
        clear(unslotted);
        Shed::Dropped(dropped)
    }

    fn wake_on_close(&self) {
        self.closed.wake();
        self.writer.wake();
    }

    /// Completes once the connection is closing (one task at a time may wait for it).
    pub async fn closed(&self) {
        poll_fn(|cx| {
            self.closed.register(cx.waker());
            if self.is_closing() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }

    /// Whether the connection is closing.
    pub fn is_closing(&self) -> bool {
        self.state.lock().closing.is_some()
    }

    /// The code the server is closing the connection with, if it is.
    pub fn closing_code(&self) -> Option<DisconnectCode> {
        self.state.lock().closing
    }

    /// Waits until something is queued or the connection closes, then moves the oldest queued
    /// items, about [`BATCH_BYTES`] of them, into `batch`. Returns the disconnect code once
    /// closing and everything queued has been taken. Only the queue's writer calls it.
    pub async fn next_batch(&self, batch: &mut VecDeque<Outgoing>) -> Option<DisconnectCode> {
        poll_fn(|cx| self.poll_batch(cx, batch)).await
    }

    /// [`Self::next_batch`] as a poll: ready with the next batch (and the disconnect code once
    /// closing and empty), or pending until something is queued or the queue closes.
    pub fn poll_batch(
        &self,
        cx: &mut Context<'_>,
        batch: &mut VecDeque<Outgoing>,
    ) -> Poll<Option<DisconnectCode>> {
        // Registered before looking, so a push after the look wakes this task.
        self.writer.register(cx.waker());
        let mut state = self.state.lock();
        if state.items.is_empty() && state.closing.is_none() {
            return Poll::Pending;
        }
        let mut taken = 0;
        let mut control_bytes = 0;
        let mut publications = false;
        while taken < BATCH_BYTES {
            let Some(item) = state.items.pop_front() else {
                break;
            };
            let size = match &item {
                Outgoing::Publication(publication) => {
                    state.publications -= 1;
                    publications = true;
                    let size = publication.size();
                    state.publication_bytes = state.publication_bytes.saturating_sub(size);
                    size
                }
                Outgoing::Latest(slot) => {
                    state.publications -= 1;
                    publications = true;
                    let size = slot.size.load(Ordering::Relaxed);
                    state.publication_bytes = state.publication_bytes.saturating_sub(size);
                    size
                }
                Outgoing::Control(frame) => {
                    state.control_bytes -= frame.len();
                    control_bytes += frame.len();
                    frame.len()
                }
                Outgoing::SwitchToLengthPrefixed | Outgoing::Ping => 0,
            };
            taken += size.max(1);
            batch.push_back(item);
        }
        if state.items.is_empty() {
            // Conflation can leave a few bytes counted for a slot already taken.
            state.publication_bytes = 0;
            state.strict = false;
            if !publications {
                // Control frames only (`connected`, a reply, a ping): likely an idle
                // connection, whose queue then holds no room. A busy one keeps it.
                state.items = VecDeque::new();
            }
        }
        let closing = state.closing.filter(|_| state.items.is_empty());
        drop(state);
        if let Some(budget) = &self.budget {
            budget.sub(control_bytes);
        }
        Poll::Ready(closing)
    }

    /// For a writer whose socket takes nothing more: ready with the disconnect code once the
    /// queue is closing, so a client that stopped reading cannot keep its connection open; the
    /// writer is woken when that happens.
    pub fn poll_closing(&self, cx: &mut Context<'_>) -> Poll<DisconnectCode> {
        self.writer.register(cx.waker());
        match self.state.lock().closing {
            Some(code) => Poll::Ready(code),
            None => Poll::Pending,
        }
    }

    fn enqueue(
        &self,
        mut state: parking_lot::MutexGuard<'_, State>,
        item: Outgoing,
        size: usize,
        publication: bool,
    ) {
        let was_empty = state.items.is_empty();
        state.items.push_back(item);
        if publication {
            state.publications += 1;
            state.publication_bytes += size;
        } else {
            state.control_bytes += size;
        }
        drop(state);
        // The writer takes everything at once, so only the first item after a take wakes it.
        if was_empty {
            self.writer.wake();
        }
    }

    /// Removes the oldest queued publication; false if there was none. A conflation slot it
    /// removes is cleared by the caller once the state is unlocked.
    fn drop_oldest(state: &mut State, unslotted: &mut Unslotted) -> bool {
        let Some(index) = state
            .items
            .iter()
            .position(|item| matches!(item, Outgoing::Publication(_) | Outgoing::Latest(_)))
        else {
            return false;
        };
        let size = match state.items.remove(index) {
            Some(Outgoing::Publication(publication)) => publication.size(),
            Some(Outgoing::Latest(slot)) => {
                let size = slot.size.load(Ordering::Relaxed);
                unslotted.push(slot);
                size
            }
            _ => 0,
        };
        state.publications -= 1;
        state.publication_bytes = state.publication_bytes.saturating_sub(size);
        true
    }
}

/// Clears the conflation slots whose markers were dropped.
fn clear(unslotted: Unslotted) {
    for slot in unslotted {
        slot.take();
    }
}

impl Drop for OutgoingQueue {
    fn drop(&mut self) {
        // Publications release themselves; control frames still queued are released here.
        if let Some(budget) = &self.budget {
            budget.sub(self.state.get_mut().control_bytes);
        }
    }
}

#[cfg(test)]
mod tests;
