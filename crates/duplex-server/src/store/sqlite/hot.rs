//! Recently read records, so that a read by id of a hot record touches no SQLite page.
//!
//! Only reads fill it. The writer thread is the only writer of the file, so it keeps the cache
//! exact: after `COMMIT` and before the write is answered, it replaces a cached record with the
//! version the write left (or takes a deleted one out). A reader that missed fills the cache
//! with what it read only if no write reached that shard since it looked ([`Ticket`]), so a
//! version read before a commit can never overwrite the one the commit left: once a write is
//! acknowledged, every read sees it or a later one.
//!
//! The cache is split into shards, each behind its own read-write lock, and bounded in bytes.
//! Readers share a shard's lock: many clients read the same hot record, and with a mutex a
//! reader the kernel takes off the CPU mid-read stops every worker reading that shard until it
//! runs again (docs/benchmarks.md, "Readers share the caches' locks"). A
//! shard over its share drops entries until it is under (whichever its table yields first,
//! which is close to random; a hot record comes back on its next read).

use std::collections::HashMap;
use std::hash::BuildHasher;

use parking_lot::RwLock;

use crate::store::Record;

const SHARDS: usize = 16;

/// What an entry costs beyond its document and names.
const ENTRY_OVERHEAD: usize = 96;

#[derive(Debug)]
pub(super) struct HotRecords {
    shards: Vec<RwLock<Shard>>,
    hasher: std::collections::hash_map::RandomState,
    /// Bytes each shard may hold.
    shard_bytes: usize,
}

#[derive(Debug, Default)]
struct Shard {
    /// Moves with every write that reached this shard.
    generation: u64,
    bytes: usize,
    entries: HashMap<u64, Hot>,
}

#[derive(Debug)]
struct Hot {
    collection: Box<str>,
    record: Record,
}

impl Hot {
    fn cost(&self) -> usize {
        self.collection.len() + self.record.id.len() + self.record.document.len() + ENTRY_OVERHEAD
    }
}

/// Where a reader that missed stands: its key, and the shard's generation when it looked.
#[derive(Debug)]
pub(super) struct Ticket {
    key: u64,
    generation: u64,
}

impl HotRecords {
    /// A cache of at most `bytes` (documents, names and overhead).
    pub(super) fn new(bytes: usize) -> HotRecords {
        HotRecords {
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            shard_bytes: bytes / SHARDS,
        }
    }

    fn key(&self, collection: &str, id: &str) -> u64 {
        self.hasher.hash_one((collection, id))
    }

    fn shard(&self, key: u64) -> &RwLock<Shard> {
        &self.shards[(key % SHARDS as u64) as usize]
    }

    /// The record if it is cached; otherwise a ticket to [`offer`](Self::offer) what the reader
    /// then reads.
    pub(super) fn get(&self, collection: &str, id: &str) -> Result<Record, Ticket> {
        let key = self.key(collection, id);
        let shard = self.shard(key).read();
        match shard.entries.get(&key) {
            Some(hot) if &*hot.collection == collection && hot.record.id == id => {
                Ok(hot.record.clone())
            }
            _ => Err(Ticket {
                key,
                generation: shard.generation,
            }),
        }
    }

    /// Keeps what a reader read, unless a write reached the shard since its ticket.
    pub(super) fn offer(&self, ticket: Ticket, collection: &str, record: &Record) {
        let mut shard = self.shard(ticket.key).write();
        if shard.generation == ticket.generation {
            self.keep(&mut shard, ticket.key, collection, record);
        }
    }

    /// A committed write left `record` (before its write is answered).
    pub(super) fn written(&self, collection: &str, record: &Record) {
        let key = self.key(collection, &record.id);
        let mut shard = self.shard(key).write();
        shard.generation += 1;
        if shard.entries.contains_key(&key) {
            self.keep(&mut shard, key, collection, record);
        }
    }

    /// A committed write deleted the record `id` (before its write is answered).
    pub(super) fn deleted(&self, collection: &str, id: &str) {
        let key = self.key(collection, id);
        let mut shard = self.shard(key).write();
        shard.generation += 1;
        if let Some(gone) = shard.entries.remove(&key) {
            shard.bytes -= gone.cost();
        }
    }

    fn keep(&self, shard: &mut Shard, key: u64, collection: &str, record: &Record) {
        let hot = Hot {
            collection: collection.into(),
            record: record.clone(),
        };
        let cost = hot.cost();
        if cost > self.shard_bytes {
            if let Some(gone) = shard.entries.remove(&key) {
                shard.bytes -= gone.cost();
            }
            return;
        }
        if let Some(gone) = shard.entries.insert(key, hot) {
            shard.bytes -= gone.cost();
        }
        shard.bytes += cost;
        while shard.bytes > self.shard_bytes {
            let Some(&victim) = shard.entries.keys().find(|&&k| k != key) else {
                break;
            };
            if let Some(gone) = shard.entries.remove(&victim) {
                shard.bytes -= gone.cost();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::HotRecords;
    use crate::store::Record;

    fn record(id: &str, version: i64, size: usize) -> Record {
        Record {
            id: id.into(),
            version,
            document: Bytes::from(vec![b' '; size]),
        }
    }

    #[test]
    fn a_read_from_before_a_write_never_replaces_what_the_write_left() {
        let hot = HotRecords::new(1 << 20);
        let ticket = hot.get("c", "a").expect_err("empty");
        // The reader read version 1; meanwhile a write committed version 2.
        hot.written("c", &record("a", 2, 10));
        hot.offer(ticket, "c", &record("a", 1, 10));
        assert!(hot.get("c", "a").is_err(), "version 1 was not kept");
        let ticket = hot.get("c", "a").expect_err("empty");
        hot.offer(ticket, "c", &record("a", 2, 10));
        // A cached record is replaced by the version a write leaves.
        hot.written("c", &record("a", 3, 10));
        assert_eq!(hot.get("c", "a").expect("cached").version, 3);

        // Likewise after a delete: the old read is not kept.
        let ticket = hot.get("c", "b").expect_err("empty");
        hot.deleted("c", "b");
        hot.offer(ticket, "c", &record("b", 1, 10));
        assert!(hot.get("c", "b").is_err());

        // With no write in between, the read is kept; a delete takes it out.
        let ticket = hot.get("c", "d").expect_err("empty");
        hot.offer(ticket, "c", &record("d", 3, 10));
        assert_eq!(hot.get("c", "d").expect("cached").version, 3);
        hot.deleted("c", "d");
        assert!(hot.get("c", "d").is_err());
        // The same id in another collection is another record.
        assert!(hot.get("other", "a").is_err());
    }

    #[test]
    fn a_reader_never_waits_for_another_reader() {
        let hot = HotRecords::new(1 << 20);
        let ticket = hot.get("c", "a").expect_err("empty");
        hot.offer(ticket, "c", &record("a", 1, 10));
        // A reader descheduled in the middle of its read holds the shard; every client reading
        // the same hot record must still be answered (with a mutex, both of a 2-core server's
        // workers stopped behind it for as long as the kernel kept it off the CPU).
        let held = hot.shard(hot.key("c", "a")).read();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| tx.send(hot.get("c", "a").map(|r| r.version).ok()));
            let read = rx.recv_timeout(std::time::Duration::from_secs(10));
            drop(held);
            assert_eq!(read, Ok(Some(1)), "the second reader was answered");
        });
    }

    #[test]
    fn the_cache_stays_within_its_bytes() {
        let hot = HotRecords::new(16 * 4096);
        for i in 0..10_000 {
            let id = format!("r{i}");
            let ticket = hot.get("c", &id).expect_err("new");
            hot.offer(ticket, "c", &record(&id, 1, 1000));
        }
        let held: usize = hot.shards.iter().map(|s| s.read().bytes).sum();
        assert!(held <= 16 * 4096, "{held}");
        let entries: usize = hot.shards.iter().map(|s| s.read().entries.len()).sum();
        assert!(entries > 0);
        // A document larger than a shard is not kept at all.
        let ticket = hot.get("c", "big").expect_err("new");
        hot.offer(ticket, "c", &record("big", 1, 8192));
        assert!(hot.get("c", "big").is_err());
    }
}
