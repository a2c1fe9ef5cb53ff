//! Connection limits: at most so many socket connections (WebSocket, raw TCP, SSE) in all and
//! from one IP address. A slot is held for a connection's life and given back on drop.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

/// Which limit a refused connection hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LimitReached {
    /// The server holds `max_connections`.
    #[error("the server holds as many connections as it may")]
    Total,
    /// This address holds `max_connections_per_ip`.
    #[error("this address holds as many connections as it may")]
    PerAddress,
}

/// The connection counts.
#[derive(Debug)]
pub(crate) struct ConnectionSlots {
    total: AtomicUsize,
    per_ip: DashMap<IpAddr, usize>,
    max_total: usize,
    max_per_ip: usize,
}

impl ConnectionSlots {
    /// Slots for at most `max_total` connections, `max_per_ip` from one address.
    pub(crate) fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(ConnectionSlots {
            total: AtomicUsize::new(0),
            per_ip: DashMap::new(),
            max_total,
            max_per_ip,
        })
    }

    /// Takes a slot for a connection from `ip`, if both limits allow it.
    pub(crate) fn acquire(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Slot, LimitReached> {
        let taken = self.total.fetch_add(1, Ordering::AcqRel);
        if taken >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitReached::Total);
        }
        if let Some(ip) = ip {
            let mut count = self.per_ip.entry(ip).or_insert(0);
            if *count >= self.max_per_ip {
                drop(count);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(LimitReached::PerAddress);
            }
            *count += 1;
        }
        Ok(Slot {
            slots: self.clone(),
            ip,
        })
    }
}

/// A held connection slot.
#[derive(Debug)]
pub(crate) struct Slot {
    slots: Arc<ConnectionSlots>,
    ip: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            self.slots.per_ip.remove_if_mut(&ip, |_, count| {
                *count -= 1;
                *count == 0
            });
        }
        self.slots.total.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_limited_in_all_and_per_address_and_come_back() {
        let slots = ConnectionSlots::new(3, 2);
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let first = slots.acquire(Some(a)).expect("slot");
        let _second = slots.acquire(Some(a)).expect("slot");
        assert_eq!(slots.acquire(Some(a)).err(), Some(LimitReached::PerAddress));
        let _third = slots.acquire(Some(b)).expect("slot");
        assert_eq!(slots.acquire(Some(b)).err(), Some(LimitReached::Total));
        drop(first);
        let _again = slots.acquire(Some(a)).expect("a slot came back");
        assert_eq!(slots.per_ip.len(), 2);
    }
}
