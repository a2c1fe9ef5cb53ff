//! Server-wide byte budgets: what the server holds for clients, counted in bytes and bounded in
//! total whatever clients do.
//!
//! Two budgets exist per server: one for what outgoing queues hold (`max_queued_bytes`) and one
//! for channel history (`max_history_bytes`). Counting is an atomic add on the paths that hold
//! or release bytes; nothing on the fan-out path waits or locks for it. When a budget goes over
//! its limit, the enforcer task ([`crate::hub::Hub::enforce_budgets`]) is woken and makes room
//! where it is fair: the fullest queues shed first (their namespace's policy), and the oldest
//! history across all channels goes first. A budget far over its limit (a quarter more) makes
//! the holders that grow shed at once, in case the enforcer cannot keep up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

/// One byte budget.
#[derive(Debug)]
pub struct ByteBudget {
    used: AtomicUsize,
    limit: usize,
    /// Set when the enforcer has been woken and not yet finished.
    signalled: AtomicBool,
    over: Notify,
}

impl ByteBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(ByteBudget {
            used: AtomicUsize::new(0),
            limit: limit.max(1),
            signalled: AtomicBool::new(false),
            over: Notify::new(),
        })
    }

    /// Counts `bytes` as held; wakes the enforcer when this crosses the limit.
    pub fn add(&self, bytes: usize) {
        let now = self.used.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if now > self.limit && !self.signalled.swap(true, Ordering::AcqRel) {
            self.over.notify_one();
        }
    }

    /// Counts `bytes` as released.
    pub fn sub(&self, bytes: usize) {
        // Never below zero, even if a caller releases what a reset already forgot.
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(bytes))
            });
    }

    /// Moves the count from `before` to `after` bytes held.
    pub fn adjust(&self, before: usize, after: usize) {
        if after > before {
            self.add(after - before);
        } else if before > after {
            self.sub(before - after);
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether more than the limit is held.
    pub fn is_over(&self) -> bool {
        self.used() > self.limit
    }

    /// Whether a quarter more than the limit is held: holders that grow shed at once.
    pub fn is_far_over(&self) -> bool {
        self.used() > self.limit.saturating_add(self.limit / 4)
    }

    /// Where the enforcer stops shedding: three quarters of the limit, so it is not woken
    /// again by the next publication.
    pub fn low_water(&self) -> usize {
        self.limit - self.limit / 4
    }

    /// Whether the enforcer may stop.
    pub fn is_low(&self) -> bool {
        self.used() <= self.low_water()
    }

    /// Waits until the budget is over its limit.
    pub async fn over_limit(&self) {
        loop {
            let notified = self.over.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_over() {
                return;
            }
            notified.await;
        }
    }

    /// The enforcer has made room: the next crossing wakes it again.
    pub fn settled(&self) {
        self.signalled.store(false, Ordering::Release);
        // A crossing between the last look and the reset would otherwise be missed.
        if self.is_over() && !self.signalled.swap(true, Ordering::AcqRel) {
            self.over.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_thresholds() {
        let budget = ByteBudget::new(100);
        budget.add(60);
        assert!(!budget.is_over());
        budget.add(50);
        assert!(budget.is_over() && !budget.is_far_over());
        budget.add(20);
        assert!(budget.is_far_over());
        budget.adjust(130, 70);
        assert_eq!(budget.used(), 70);
        assert!(budget.is_low());
        budget.sub(1000);
        assert_eq!(budget.used(), 0, "never below zero");
    }

    #[tokio::test]
    async fn crossing_the_limit_wakes_the_waiter() {
        let budget = ByteBudget::new(10);
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.over_limit().await })
        };
        tokio::task::yield_now().await;
        budget.add(11);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("no panic");
    }
}
