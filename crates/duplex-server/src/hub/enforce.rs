//! The budget enforcer: one task per server that makes room when what the hub holds for
//! clients goes over `max_queued_bytes` or `max_history_bytes`.
//!
//! Queues: the fullest connections pay first. Each pass sorts the connections by the bytes
//! their queue holds and halves the fullest ones (their namespace's policy: the oldest
//! publications are dropped, or a queue holding publications of a `disconnect` namespace is
//! closed with `slow_consumer`) until the budget is back under three quarters of its limit; a
//! connection that keeps up holds next to nothing and is never shed ([`SHED_FLOOR`]).
//!
//! History: the oldest publications across every channel go first, merged by the time they
//! were published, so a quiet channel's recent history outlives a flood's old one. A channel
//! whose history was cut says so to anyone recovering (`history_trimmed`), as it would after
//! its own limits.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::queue::Shed;

/// How long the enforcer waits before looking again at a budget it could not bring down.
const RETRY: std::time::Duration = std::time::Duration::from_millis(10);

/// A queue holding less than this is never shed (nor less than a sixteenth of the budget):
/// a connection that keeps up holds a batch or two, and halving it would cost its client
/// publications without bringing the budget down. The bytes that keep the budget over are
/// then the fullest queues' batches being written, which only their writes (or the write
/// deadline) release.
const SHED_FLOOR: usize = 64 * 1024;
use super::{Channel, Hub};

impl Hub {
    /// Keeps the queue and history budgets until `shutdown`.
    pub async fn enforce_budgets(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.queue_budget.over_limit() => {
                    self.shed_queues();
                    self.queue_budget.settled();
                }
                () = self.history_budget.over_limit() => {
                    self.evict_history();
                    self.history_budget.settled();
                }
            }
            // What could not be shed is being written (or a writer is stuck until its write
            // deadline): look again in a moment rather than spin.
            if !self.queue_budget.is_low() || !self.history_budget.is_low() {
                tokio::time::sleep(RETRY).await;
            }
        }
    }

    /// Halves the fullest queues until the queue budget is low again.
    pub(crate) fn shed_queues(&self) {
        let budget = &self.queue_budget;
        let floor = (budget.limit() / 16).min(SHED_FLOOR);
        let mut passes = 0;
        while !budget.is_low() && passes < 32 {
            passes += 1;
            let mut queues: Vec<(usize, Arc<super::connection::ConnectionHandle>)> = self
                .connections
                .iter()
                .filter_map(|c| {
                    let bytes = c.queue.queued_bytes();
                    (bytes >= floor.max(1)).then(|| (bytes, c.value().clone()))
                })
                .collect();
            if queues.is_empty() {
                break;
            }
            queues.sort_unstable_by_key(|(bytes, _)| Reverse(*bytes));
            let mut progress = false;
            for (bytes, connection) in queues {
                match connection.queue.shed(bytes / 2) {
                    Shed::Dropped(0) => {}
                    Shed::Dropped(dropped) => {
                        progress = true;
                        self.metrics.dropped.inc_by(dropped as u64);
                        self.metrics.budget_sheds.inc_by(dropped as u64);
                    }
                    Shed::Disconnecting => {
                        progress = true;
                        self.metrics.slow_consumer_disconnects.inc();
                    }
                }
                if budget.is_low() {
                    return;
                }
            }
            if !progress {
                break;
            }
        }
        if !budget.is_low() {
            tracing::debug!(
                used = budget.used(),
                limit = budget.limit(),
                "the queue budget stays over: what is queued is being written"
            );
        }
    }

    /// Drops the oldest history across channels until the history budget is low again.
    pub(crate) fn evict_history(&self) {
        let budget = &self.history_budget;
        let mut oldest: BinaryHeap<Reverse<(Instant, Arc<str>)>> = self
            .channels
            .iter()
            .filter_map(|entry| {
                let at = entry.value().state.lock().oldest_held()?;
                Some(Reverse((at, entry.key().clone())))
            })
            .collect();
        let mut evicted = 0u64;
        let mut emptied = Vec::new();
        while !budget.is_low() {
            let Some(Reverse((_, name))) = oldest.pop() else {
                break;
            };
            let Some(channel) = self.channels.get(&name).map(|c| c.clone()) else {
                continue;
            };
            let next = self.evict_oldest_of(&channel);
            evicted += 1;
            match next {
                Some(at) => oldest.push(Reverse((at, name))),
                None => emptied.push(name),
            }
        }
        self.metrics.history_evictions.inc_by(evicted);
        for name in emptied {
            self.remove_if_unused(&name);
        }
    }

    /// Drops a channel's oldest held publication; when the next one was published, if any.
    pub(super) fn evict_oldest_of(&self, channel: &Channel) -> Option<Instant> {
        let mut state = channel.state.lock();
        if state.closed {
            return None;
        }
        self.holding(&mut state, |state| {
            state.drop_oldest_held();
        });
        state.oldest_held()
    }
}
