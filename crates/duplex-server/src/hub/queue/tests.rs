//! Unit tests of `queue`.

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
    assert_eq!(outcomes[3], Pushed::Dropped(1));
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

fn sized(offset: u64, bytes: usize, budget: Option<&Arc<ByteBudget>>) -> Arc<Publication> {
    let data = RawValue::from_string(format!("\"{}\"", "x".repeat(bytes))).expect("json");
    let payload = Payload::Json(data);
    Arc::new(match budget {
        Some(budget) => Publication::counted("c:x".into(), offset, &payload, budget),
        None => Publication::new("c:x".into(), offset, &payload),
    })
}

#[tokio::test]
async fn the_byte_bound_applies_before_the_count_and_one_publication_always_fits() {
    let one = sized(0, 1000, None).size();
    let queue = OutgoingQueue::with_limits(
        QueueLimits {
            publications: 1000,
            bytes: 3 * one,
        },
        None,
    );
    let mut outcomes = Vec::new();
    for offset in 1..=5 {
        outcomes.push(queue.push_publication(
            &sized(offset, 1000, None),
            SlowConsumerPolicy::DropOldest,
            None,
        ));
    }
    assert_eq!(outcomes[2], Pushed::Queued);
    assert_eq!(outcomes[3], Pushed::Dropped(1));
    assert!(queue.queued_bytes() <= 3 * one);
    let mut batch = VecDeque::new();
    queue.next_batch(&mut batch).await;
    assert_eq!(offsets(&batch), vec![3, 4, 5]);
    // An empty queue takes a publication larger than its bound.
    let huge = sized(6, 10_000, None);
    assert_eq!(
        queue.push_publication(&huge, SlowConsumerPolicy::Disconnect, None),
        Pushed::Queued
    );
    assert_eq!(
        queue.push_publication(&sized(7, 10, None), SlowConsumerPolicy::Disconnect, None),
        Pushed::Disconnecting
    );
}

#[tokio::test]
async fn a_writer_takes_bounded_batches_and_hears_the_close_after_the_last() {
    let queue = OutgoingQueue::new(1000);
    for offset in 1..=10 {
        queue.push_publication(
            &sized(offset, 20_000, None),
            SlowConsumerPolicy::DropOldest,
            None,
        );
    }
    queue.close(DisconnectCode::Shutdown);
    let mut seen = Vec::new();
    let mut batches = 0;
    loop {
        let mut batch = VecDeque::new();
        let closing = queue.next_batch(&mut batch).await;
        batches += 1;
        let taken: usize = batch
            .iter()
            .map(|item| match item {
                Outgoing::Publication(p) => p.size(),
                _ => 0,
            })
            .sum();
        assert!(taken < BATCH_BYTES + 21_000, "{taken}");
        seen.extend(offsets(&batch));
        if closing.is_some() {
            break;
        }
    }
    assert!(batches > 1);
    assert_eq!(seen, (1..=10).collect::<Vec<_>>());
}

#[test]
fn control_frames_are_bounded_in_bytes_too() {
    let queue = OutgoingQueue::with_limits(
        QueueLimits {
            publications: 1000,
            bytes: 1000,
        },
        None,
    );
    queue.push_control(Bytes::from(vec![b'x'; 1500]));
    assert!(!queue.is_closing(), "one frame always fits");
    queue.push_control(Bytes::from(vec![b'x'; 600]));
    assert!(queue.is_closing(), "then twice the bound closes it");
}

#[tokio::test]
async fn a_shared_publication_counts_once_in_the_budget_until_every_queue_let_go() {
    let budget = ByteBudget::new(1 << 30);
    let queues: Vec<OutgoingQueue> = (0..3)
        .map(|_| {
            OutgoingQueue::with_limits(
                QueueLimits {
                    publications: 10,
                    bytes: 1 << 20,
                },
                Some(budget.clone()),
            )
        })
        .collect();
    let publication = sized(1, 500, Some(&budget));
    for queue in &queues {
        queue.push_publication(&publication, SlowConsumerPolicy::DropOldest, None);
    }
    assert_eq!(budget.used(), publication.size());
    queues[0].push_control(Bytes::from_static(b"{\"type\":\"pong\"}"));
    assert_eq!(budget.used(), publication.size() + 15);
    for queue in &queues {
        let mut batch = VecDeque::new();
        queue.next_batch(&mut batch).await;
    }
    assert_eq!(budget.used(), 0, "taken and dropped by every writer");
}

#[test]
fn shedding_drops_the_oldest_or_closes_a_queue_of_a_disconnect_namespace() {
    let lenient = OutgoingQueue::new(100);
    let strict = OutgoingQueue::new(100);
    for offset in 1..=8 {
        lenient.push_publication(
            &sized(offset, 1000, None),
            SlowConsumerPolicy::DropOldest,
            None,
        );
        strict.push_publication(
            &sized(offset, 1000, None),
            SlowConsumerPolicy::Disconnect,
            None,
        );
    }
    let before = lenient.queued_bytes();
    assert_eq!(lenient.shed(before / 2), Shed::Dropped(4));
    assert!(lenient.queued_bytes() <= before / 2);
    assert_eq!(strict.shed(0), Shed::Disconnecting);
    assert!(strict.is_closing());
}

#[test]
fn a_dropped_conflation_marker_frees_its_slot() {
    let queue = OutgoingQueue::new(1);
    let slot = Arc::new(LatestSlot::default());
    queue.push_publication(&publication(1), SlowConsumerPolicy::Latest, Some(&slot));
    // Another channel's publication pushes the marker out of the full queue.
    assert_eq!(
        queue.push_publication(&publication(2), SlowConsumerPolicy::DropOldest, None),
        Pushed::Dropped(1)
    );
    assert!(
        slot.take().is_none(),
        "the slot was cleared with its marker"
    );
    // The slot queues again next time instead of conflating into nothing.
    assert_eq!(
        queue.push_publication(&publication(3), SlowConsumerPolicy::Latest, Some(&slot)),
        Pushed::Dropped(1)
    );
}

#[tokio::test]
async fn an_idle_queue_gives_its_room_back_and_a_busy_one_keeps_it() {
    let queue = OutgoingQueue::new(8);
    let mut batch = VecDeque::new();
    // Publications taken: the room stays for the next ones (no allocation per batch).
    queue.push_publication(&publication(1), SlowConsumerPolicy::DropOldest, None);
    queue.next_batch(&mut batch).await;
    assert!(queue.state.lock().items.capacity() > 0);
    // Control frames only (`connected`, a reply, a ping): likely idle, the room goes.
    batch.clear();
    queue.push_control(Bytes::from_static(b"{}"));
    queue.next_batch(&mut batch).await;
    assert_eq!(queue.state.lock().items.capacity(), 0);
    assert_eq!(batch.len(), 1);
}
