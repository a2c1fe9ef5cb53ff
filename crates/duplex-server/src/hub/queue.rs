//! A connection's outgoing queue: bounded for publications, with the namespace's slow-consumer
//! policy applied when it is full, and drained whole by the connection's writer so that
//! everything queued goes out in one write.
//!
//! A `parking_lot` mutex guards a `VecDeque`; it is held only to push or to swap the contents
//! out, never across an `.await`. Publishers (the hub) and the writer are the only users.
//!
//! A queue has one writer (the connection's task) and at most one other task waiting for it to
//! close (raw TCP's reader), so each waits through an `AtomicWaker`: two words per connection
//! and a wake-up without a lock, where `Notify` and a `CancellationToken` cost a waiter list and
//! a heap node per connection.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use duplex_proto::DisconnectCode;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

use super::namespace::SlowConsumerPolicy;
use super::publication::Publication;

/// Something for a connection's writer to send.
#[derive(Debug)]
pub enum Outgoing {
    /// A publication.
    Publication(Arc<Publication>),
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
    pending: Mutex<Option<Arc<Publication>>>,
}

impl LatestSlot {
    /// Takes the pending publication, if any.
    pub fn take(&self) -> Option<Arc<Publication>> {
        self.pending.lock().take()
    }
}

/// What pushing a publication did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// Queued after dropping the oldest queued publication.
    DroppedOldest,
    /// Replaced a pending publication of the same subscription.
    Conflated,
    /// The queue was full and the policy disconnects; the connection is closing.
    Disconnecting,
    /// The connection is already closing; nothing was queued.
    Closed,
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<Outgoing>,
    /// Publications (and conflation markers) among `items`.
    publications: usize,
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
    capacity: usize,
}

impl OutgoingQueue {
    /// A queue holding at most `capacity` publications.
    pub fn new(capacity: usize) -> Self {
        OutgoingQueue {
            state: Mutex::new(State::default()),
            writer: AtomicWaker::new(),
            closed: AtomicWaker::new(),
            capacity: capacity.max(1),
        }
    }

    /// Queues a publication under `policy`; `latest` is the subscription's slot when the policy
    /// conflates.
    pub fn push_publication(
        &self,
        publication: &Arc<Publication>,
        policy: SlowConsumerPolicy,
        latest: Option<&Arc<LatestSlot>>,
    ) -> Pushed {
        if let (SlowConsumerPolicy::Latest, Some(slot)) = (policy, latest) {
            let mut pending = slot.pending.lock();
            if pending.is_some() {
                *pending = Some(publication.clone());
                return Pushed::Conflated;
            }
            let mut state = self.state.lock();
            if state.closing.is_some() {
                return Pushed::Closed;
            }
            *pending = Some(publication.clone());
            drop(pending);
            let dropped = state.publications >= self.capacity && Self::drop_oldest(&mut state);
            self.enqueue(state, Outgoing::Latest(slot.clone()), true);
            return if dropped {
                Pushed::DroppedOldest
            } else {
                Pushed::Queued
            };
        }

        let mut state = self.state.lock();
        if state.closing.is_some() {
            return Pushed::Closed;
        }
        let mut outcome = Pushed::Queued;
        if state.publications >= self.capacity {
            match policy {
                SlowConsumerPolicy::Disconnect => {
                    state.closing = Some(DisconnectCode::SlowConsumer);
                    drop(state);
                    self.wake_on_close();
                    return Pushed::Disconnecting;
                }
                SlowConsumerPolicy::DropOldest | SlowConsumerPolicy::Latest => {
                    if Self::drop_oldest(&mut state) {
                        outcome = Pushed::DroppedOldest;
                    }
                }
            }
        }
        self.enqueue(state, Outgoing::Publication(publication.clone()), true);
        outcome
    }

    /// Queues a publication replayed for recovery: never dropped, whatever the queue holds,
    /// because the client was promised every one of them.
    pub fn push_recovered(&self, publication: &Arc<Publication>) {
        let state = self.state.lock();
        if state.closing.is_some() {
            return;
        }
        self.enqueue(state, Outgoing::Publication(publication.clone()), true);
    }

    /// Queues a control frame. A client that keeps asking without ever reading is disconnected
    /// once control frames alone fill the queue four times over.
    pub fn push_control(&self, frame: Bytes) {
        self.push_other(Outgoing::Control(frame));
    }

    /// Queues a non-publication item (control frame or framing switch).
    pub fn push_other(&self, item: Outgoing) {
        let mut state = self.state.lock();
        if state.closing.is_some() {
            return;
        }
        if state.items.len() - state.publications >= self.capacity * 4 {
            state.closing = Some(DisconnectCode::SlowConsumer);
            drop(state);
            self.wake_on_close();
            return;
        }
        self.enqueue(state, item, false);
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

    /// Waits until something is queued or the connection closes, then moves everything queued
    /// into `batch`. Returns the disconnect code once closing. Only the queue's writer calls it.
    pub async fn next_batch(&self, batch: &mut VecDeque<Outgoing>) -> Option<DisconnectCode> {
        poll_fn(|cx| self.poll_batch(cx, batch)).await
    }

    /// [`Self::next_batch`] as a poll: ready with everything queued (and the disconnect code
    /// once closing), or pending until something is queued or the queue closes.
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
        std::mem::swap(&mut state.items, batch);
        state.publications = 0;
        Poll::Ready(state.closing)
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
        publication: bool,
    ) {
        let was_empty = state.items.is_empty();
        state.items.push_back(item);
        if publication {
            state.publications += 1;
        }
        drop(state);
        // The writer takes everything at once, so only the first item after a take wakes it.
        if was_empty {
            self.writer.wake();
        }
    }

    /// Removes the oldest queued publication; false if there was none.
    fn drop_oldest(state: &mut State) -> bool {
        let Some(index) = state
            .items
            .iter()
            .position(|item| matches!(item, Outgoing::Publication(_) | Outgoing::Latest(_)))
        else {
            return false;
        };
        if let Some(Outgoing::Latest(slot)) = state.items.remove(index) {
            slot.take();
        }
        state.publications -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::publication::Payload;
    use serde_json::value::RawValue;

    fn publication(offset: u64) -> Arc<Publication> {
        let data = RawValue::from_string(offset.to_string()).expect("json");
        Arc::new(Publication::new("c:x".into(), offset, &Payload::Json(data)))
    }

    fn offsets(batch: &VecDeque<Outgoing>) -> Vec<u64> {
        batch
            .iter()
            .filter_map(|item| match item {
                Outgoing::Publication(p) => Some(p.offset()),
                Outgoing::Latest(slot) => slot.take().map(|p| p.offset()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn drop_oldest_keeps_the_newest_capacity_publications() {
        let queue = OutgoingQueue::new(3);
        let mut outcomes = Vec::new();
        for offset in 1..=5 {
            outcomes.push(queue.push_publication(
                &publication(offset),
                SlowConsumerPolicy::DropOldest,
                None,
            ));
        }
        assert_eq!(outcomes[3], Pushed::DroppedOldest);
        queue.push_control(Bytes::from_static(b"{}"));
        let mut batch = VecDeque::new();
        assert_eq!(queue.next_batch(&mut batch).await, None);
        assert_eq!(offsets(&batch), vec![3, 4, 5]);
        assert_eq!(batch.len(), 4, "control frames are never dropped");
    }

    #[tokio::test]
    async fn latest_conflates_to_the_newest_publication() {
        let queue = OutgoingQueue::new(8);
        let slot = Arc::new(LatestSlot::default());
        let mut outcomes = Vec::new();
        for offset in 1..=4 {
            outcomes.push(queue.push_publication(
                &publication(offset),
                SlowConsumerPolicy::Latest,
                Some(&slot),
            ));
        }
        assert_eq!(
            outcomes,
            vec![
                Pushed::Queued,
                Pushed::Conflated,
                Pushed::Conflated,
                Pushed::Conflated
            ]
        );
        let mut batch = VecDeque::new();
        queue.next_batch(&mut batch).await;
        assert_eq!(offsets(&batch), vec![4]);
        // Once written, the next publication queues again.
        assert_eq!(
            queue.push_publication(&publication(5), SlowConsumerPolicy::Latest, Some(&slot)),
            Pushed::Queued
        );
    }

    #[tokio::test]
    async fn disconnect_policy_closes_a_full_queue() {
        let queue = OutgoingQueue::new(2);
        for offset in 1..=2 {
            assert_eq!(
                queue.push_publication(&publication(offset), SlowConsumerPolicy::Disconnect, None),
                Pushed::Queued
            );
        }
        assert_eq!(
            queue.push_publication(&publication(3), SlowConsumerPolicy::Disconnect, None),
            Pushed::Disconnecting
        );
        assert_eq!(
            queue.push_publication(&publication(4), SlowConsumerPolicy::Disconnect, None),
            Pushed::Closed
        );
        let mut batch = VecDeque::new();
        assert_eq!(
            queue.next_batch(&mut batch).await,
            Some(DisconnectCode::SlowConsumer)
        );
    }

    #[tokio::test]
    async fn a_waiting_writer_wakes_on_push() {
        let queue = Arc::new(OutgoingQueue::new(4));
        let writer = {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut batch = VecDeque::new();
                queue.next_batch(&mut batch).await;
                batch.len()
            })
        };
        tokio::task::yield_now().await;
        queue.push_control(Bytes::from_static(b"{}"));
        let woke = tokio::time::timeout(std::time::Duration::from_secs(5), writer)
            .await
            .expect("the writer wakes")
            .expect("no panic");
        assert_eq!(woke, 1);
    }

    #[tokio::test]
    async fn closing_wakes_the_writer_and_the_task_waiting_for_the_close() {
        let queue = Arc::new(OutgoingQueue::new(4));
        let writer = {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut batch = VecDeque::new();
                queue.next_batch(&mut batch).await
            })
        };
        let reader = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.closed().await })
        };
        tokio::task::yield_now().await;
        assert!(!writer.is_finished() && !reader.is_finished());
        queue.close(DisconnectCode::IdleTimeout);
        let within = std::time::Duration::from_secs(5);
        let code = tokio::time::timeout(within, writer)
            .await
            .expect("the writer wakes")
            .expect("no panic");
        assert_eq!(code, Some(DisconnectCode::IdleTimeout));
        tokio::time::timeout(within, reader)
            .await
            .expect("the reader wakes")
            .expect("no panic");
        // A close before anyone waits is seen at once.
        tokio::time::timeout(within, queue.closed())
            .await
            .expect("already closed");
    }
}
