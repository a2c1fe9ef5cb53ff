//! A histogram of recent latencies that requests record into with one atomic add and a sampler
//! reads (and resets) once a second: the HTTP p99 of `GET /api/stats`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Buckets per power of two of the latency histogram (relative precision ≈ 19 %).
const SUB_BUCKETS: usize = 4;
/// Powers of two covered, from 1 µs to about 18 minutes.
const POWERS: usize = 30;

/// HTTP request latencies since the last sample, in logarithmic buckets: recording is one
/// atomic add, reading the p99 walks the buckets once a second.
#[derive(Debug)]
pub struct LatencyWindow {
    buckets: Vec<AtomicU64>,
}

impl Default for LatencyWindow {
    fn default() -> Self {
        LatencyWindow {
            buckets: (0..POWERS * SUB_BUCKETS)
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }
}

impl LatencyWindow {
    /// Counts one request that took `elapsed`.
    pub fn record(&self, elapsed: Duration) {
        let micros = elapsed.as_micros().clamp(1, u128::from(u64::MAX)) as u64;
        let power = 63 - micros.leading_zeros() as usize;
        // The two bits below the leading one pick the sub-bucket.
        let sub = if power >= 2 {
            ((micros >> (power - 2)) & 0b11) as usize
        } else {
            ((micros << (2 - power)) & 0b11) as usize
        };
        let index = (power * SUB_BUCKETS + sub).min(self.buckets.len() - 1);
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests since the last take, and the upper bound of their 99th percentile; resets.
    pub fn take(&self) -> (u64, Option<Duration>) {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return (0, None);
        }
        let rank = total - total / 100;
        let mut seen = 0;
        for (index, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let power = index / SUB_BUCKETS;
                let sub = (index % SUB_BUCKETS) as u64;
                // The bucket's upper bound: 2^power × (1 + (sub + 1) / 4).
                let upper = (1u64 << power) * (SUB_BUCKETS as u64 + sub + 1) / SUB_BUCKETS as u64;
                return (total, Some(Duration::from_micros(upper)));
            }
        }
        (total, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_p99_is_the_bucket_of_the_slowest_percent() {
        let window = LatencyWindow::default();
        for _ in 0..990 {
            window.record(Duration::from_micros(500));
        }
        for _ in 0..10 {
            window.record(Duration::from_millis(40));
        }
        let (count, p99) = window.take();
        assert_eq!(count, 1000);
        let p99 = p99.expect("requests were recorded");
        // 500 µs sits in [448, 512): the p99 is that bucket's bound, within a fifth of it.
        assert!(
            p99 >= Duration::from_micros(500) && p99 <= Duration::from_micros(600),
            "{p99:?}"
        );
        assert_eq!(window.take(), (0, None), "taking resets");
        for _ in 0..50 {
            window.record(Duration::from_millis(40));
        }
        window.record(Duration::from_micros(1));
        let (_, p99) = window.take();
        let p99 = p99.expect("some");
        assert!(
            p99 >= Duration::from_millis(40) && p99 <= Duration::from_millis(48),
            "{p99:?}"
        );
    }
}
