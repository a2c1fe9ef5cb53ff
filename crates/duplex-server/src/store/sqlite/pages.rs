//! First pages of listings recently read, so that a collection's first page read again before
//! any write to that collection costs no SQLite step.
//!
//! A feed, a dashboard or a chat's scrollback open on their first page, and every client opens
//! the same one; later pages (with a cursor) are read once each by whoever scrolls, so they are
//! not kept.
//!
//! Exact in the same way as [`hot`](super::hot): every write to the records table goes through
//! the writer thread, which moves its collection's generation after `COMMIT` and before it
//! answers the write. A reader notes the generation before it reads, and what it read is kept
//! under that generation; an entry is served only while its collection's generation has not
//! moved. So once a write is acknowledged, no listing returns a page from before it. (The
//! writer counts its commit before it moves a generation, so a reader that sees the moved
//! generation also begins a new snapshot, which has the commit.)
//!
//! Generations are kept per slot (a collection's hash picks one of [`SLOTS`]): two collections
//! that share a slot only invalidate each other's pages more often than needed. The entries are
//! bounded in bytes; a shard over its share drops stale entries first, then any. Readers share
//! a shard's read-write lock, as in [`hot`](super::hot).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::store::ListQuery;
use crate::store::backend::Listed;

/// Generation slots (collections hash into them).
const SLOTS: usize = 64;

const SHARDS: usize = 8;

/// What an entry costs beyond its documents and its collection's name.
const ENTRY_OVERHEAD: usize = 128;

/// What a row costs beyond its document.
const ROW_OVERHEAD: usize = 48;

#[derive(Debug)]
pub(super) struct FirstPages {
    generations: Box<[AtomicU64]>,
    shards: Box<[RwLock<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
    /// Bytes each shard may hold.
    shard_bytes: usize,
}

#[derive(Debug, Default)]
struct Shard {
    bytes: usize,
    entries: HashMap<u64, Entry>,
}

#[derive(Debug)]
struct Entry {
    collection: Box<str>,
    query: ListQuery,
    rows: i64,
    slot: usize,
    generation: u64,
    page: Vec<Listed>,
    cost: usize,
}

/// Where a reader that missed stands: the listing's key and its collection's generation when it
/// looked.
#[derive(Debug)]
pub(super) struct Ticket {
    key: u64,
    slot: usize,
    generation: u64,
}

impl FirstPages {
    /// A cache of at most `bytes` (documents, names and overhead).
    pub(super) fn new(bytes: usize) -> FirstPages {
        FirstPages {
            generations: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            shard_bytes: bytes / SHARDS,
        }
    }

    fn slot(&self, collection: &str) -> usize {
        (self.hasher.hash_one(collection) % SLOTS as u64) as usize
    }

    /// The listing's rows if they are kept and current; otherwise a ticket to
    /// [`offer`](Self::offer) what the reader then reads, or `None` for a listing that is not
    /// kept (one with a cursor).
    pub(super) fn get(
        &self,
        collection: &str,
        query: &ListQuery,
        rows: i64,
    ) -> Result<Vec<Listed>, Option<Ticket>> {
        if query.after.is_some() {
            return Err(None);
        }
        let slot = self.slot(collection);
        // Before the read begins: a reader that sees a moved generation sees its commit counted.
        let generation = self.generations[slot].load(Ordering::Acquire);
        let key = self.hasher.hash_one((collection, query, rows));
        let shard = self.shards[(key % SHARDS as u64) as usize].read();
        match shard.entries.get(&key) {
            Some(entry)
                if entry.generation == generation
                    && entry.rows == rows
                    && &*entry.collection == collection
                    && entry.query == *query =>
            {
                Ok(entry.page.clone())
            }
            _ => Err(Some(Ticket {
                key,
                slot,
                generation,
            })),
        }
    }

    /// Keeps what a reader read under the generation its ticket noted (a page already stale
    /// is kept too, and never served: the next read replaces it).
    pub(super) fn offer(
        &self,
        ticket: Ticket,
        collection: &str,
        query: &ListQuery,
        rows: i64,
        page: &[Listed],
    ) {
        let cost = ENTRY_OVERHEAD
            + collection.len()
            + page
                .iter()
                .map(|(document, _, _)| document.len() + ROW_OVERHEAD)
                .sum::<usize>();
        // A page larger than a quarter of a shard would push out everything else.
        if cost > self.shard_bytes / 4 {
            return;
        }
        let entry = Entry {
            collection: collection.into(),
            query: query.clone(),
            rows,
            slot: ticket.slot,
            generation: ticket.generation,
            page: page.to_vec(),
            cost,
        };
        let mut shard = self.shards[(ticket.key % SHARDS as u64) as usize].write();
        if let Some(gone) = shard.entries.insert(ticket.key, entry) {
            shard.bytes -= gone.cost;
        }
        shard.bytes += cost;
        if shard.bytes > self.shard_bytes {
            self.make_room(&mut shard, ticket.key);
        }
    }

    /// Drops stale entries, then any but `keep`, until the shard is within its bytes.
    fn make_room(&self, shard: &mut Shard, keep: u64) {
        let generations = &self.generations;
        let before = shard.entries.len();
        shard
            .entries
            .retain(|_, entry| entry.generation == generations[entry.slot].load(Ordering::Relaxed));
        if shard.entries.len() != before {
            shard.bytes = shard.entries.values().map(|entry| entry.cost).sum();
        }
        while shard.bytes > self.shard_bytes {
            let Some(&victim) = shard.entries.keys().find(|&&key| key != keep) else {
                break;
            };
            if let Some(gone) = shard.entries.remove(&victim) {
                shard.bytes -= gone.cost;
            }
        }
    }

    /// A committed write changed `collection` (called before the write is answered).
    pub(super) fn written(&self, collection: &str) {
        self.generations[self.slot(collection)].fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::FirstPages;
    use crate::store::backend::Listed;
    use crate::store::{Cursor, ListQuery, SortOrder};

    fn page(n: usize, size: usize) -> Vec<Listed> {
        (0..n)
            .map(|i| (Bytes::from(vec![b' '; size]), i as i64, i as i64))
            .collect()
    }

    fn first(limit: u32) -> ListQuery {
        ListQuery {
            limit,
            ..ListQuery::default()
        }
    }

    /// A reader that missed, then read `page` (of 21 rows asked) after any `written` meanwhile.
    fn read(
        pages: &FirstPages,
        collection: &str,
        query: &ListQuery,
        written: bool,
        page: &[Listed],
    ) {
        let ticket = pages
            .get(collection, query, 21)
            .expect_err("not served")
            .expect("kept");
        if written {
            pages.written(collection);
        }
        pages.offer(ticket, collection, query, 21, page);
    }

    #[test]
    fn a_page_read_before_a_write_is_never_served_after_it() {
        let pages = FirstPages::new(1 << 20);
        let query = first(20);
        // The reader read its page; meanwhile a write to the collection committed.
        read(&pages, "c", &query, true, &page(3, 10));
        assert!(
            pages.get("c", &query, 21).is_err(),
            "the stale page is not served"
        );

        // Read again after the write: kept and served until the next write.
        read(&pages, "c", &query, false, &page(4, 10));
        assert_eq!(pages.get("c", &query, 21).expect("cached").len(), 4);
        pages.written("c");
        assert!(pages.get("c", &query, 21).is_err());
    }

    #[test]
    fn listings_are_told_apart_and_pages_after_a_cursor_are_not_kept() {
        let pages = FirstPages::new(1 << 20);
        let query = first(20);
        read(&pages, "c", &query, false, &page(2, 10));
        assert!(pages.get("d", &query, 21).is_err(), "another collection");
        assert!(pages.get("c", &first(10), 11).is_err(), "another limit");
        let newest = ListQuery {
            order: SortOrder::CreatedDescending,
            ..first(20)
        };
        assert!(pages.get("c", &newest, 21).is_err(), "another order");
        let later = ListQuery {
            after: Some(Cursor {
                order: SortOrder::CreatedAscending,
                key: 1,
                seq: 1,
            }),
            ..first(20)
        };
        assert!(matches!(pages.get("c", &later, 21), Err(None)));
        assert_eq!(pages.get("c", &query, 21).expect("cached").len(), 2);
    }

    #[test]
    fn a_reader_never_waits_for_another_reader() {
        let pages = FirstPages::new(1 << 20);
        let query = first(20);
        read(&pages, "c", &query, false, &page(2, 10));
        // A reader descheduled in the middle of its read holds every shard.
        let held: Vec<_> = pages.shards.iter().map(|s| s.read()).collect();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| tx.send(pages.get("c", &query, 21).map(|p| p.len()).ok()));
            let read = rx.recv_timeout(std::time::Duration::from_secs(10));
            drop(held);
            assert_eq!(read, Ok(Some(2)), "the second reader was answered");
        });
    }

    #[test]
    fn the_cache_stays_within_its_bytes() {
        let pages = FirstPages::new(8 * 16 * 1024);
        for limit in 1..=2000 {
            read(&pages, "c", &first(limit), false, &page(3, 500));
        }
        let held: usize = pages.shards.iter().map(|s| s.read().bytes).sum();
        assert!(held <= 8 * 16 * 1024, "{held}");
        let entries: usize = pages.shards.iter().map(|s| s.read().entries.len()).sum();
        assert!(entries > 0);
        // A page larger than a quarter of a shard is not kept.
        let query = first(4000);
        read(&pages, "c", &query, false, &page(20, 500));
        assert!(pages.get("c", &query, 21).is_err());
    }
}
