//! A histogram with fixed buckets and atomic counts, for figures recorded where a metrics
//! library is not at hand (a provider call in the adapters' guard, a log writer's fsync) and
//! read by the server when `/metrics` is scraped.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Latency bucket bounds in seconds: 50 µs doubling up to 6.55 s.
pub const LATENCY_BOUNDS: [f64; 18] = [
    0.000_05, 0.000_1, 0.000_2, 0.000_4, 0.000_8, 0.001_6, 0.003_2, 0.006_4, 0.012_8, 0.025_6,
    0.051_2, 0.102_4, 0.204_8, 0.409_6, 0.819_2, 1.638_4, 3.276_8, 6.553_6,
];

/// Count bucket bounds (records in a group, say): 1 doubling up to 65,536.
pub const COUNT_BOUNDS: [f64; 17] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0, 32768.0, 65536.0,
];

/// Counts of values by bucket, their sum and number; recorded without a lock.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, and one past the last.
    counts: Vec<AtomicU64>,
    /// The sum, in millionths of the unit (microseconds for latencies).
    sum_micros: AtomicU64,
}

/// A histogram's figures at one moment, as Prometheus exposes them.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// The sum of the values recorded.
    pub sum: f64,
    /// How many values were recorded.
    pub count: u64,
    /// Each bucket's upper bound and the values at or below it (cumulative).
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    /// An empty histogram with buckets up to each of `bounds` (ascending).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Histogram { bounds, counts, sum_micros: AtomicU64::new(0) }
    }

    /// A histogram of latencies ([`LATENCY_BOUNDS`]).
    pub fn latency() -> Histogram {
        Histogram::new(&LATENCY_BOUNDS)
    }

    /// Records `value`.
    pub fn record(&self, value: f64) {
        self.record_n(value, 1);
    }

    /// Records `value` `n` times (values that came together: one look at the shared counts).
    pub fn record_n(&self, value: f64, n: u64) {
        if n == 0 {
            return;
        }
        let bucket = self.bounds.partition_point(|bound| *bound < value);
        self.counts[bucket].fetch_add(n, Relaxed);
        self.sum_micros.fetch_add((value * 1e6) as u64 * n, Relaxed);
    }

    /// Records a duration, in seconds.
    pub fn record_duration(&self, duration: Duration) {
        self.record(duration.as_secs_f64());
    }

    /// Records a duration, in seconds, `n` times.
    pub fn record_durations(&self, duration: Duration, n: u64) {
        self.record_n(duration.as_secs_f64(), n);
    }

    /// The figures now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.bounds.len() + 1);
        for (bound, count) in self.bounds.iter().chain([&f64::INFINITY]).zip(&self.counts) {
            cumulative += count.load(Relaxed);
            buckets.push((*bound, cumulative));
        }
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        HistogramSnapshot { sum, count: cumulative, buckets }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_the_first_bucket_at_or_above_them() {
        let h = Histogram::new(&COUNT_BOUNDS);
        for value in [1.0, 1.0, 3.0, 4.0, 100_000.0] {
            h.record(value);
        }
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.sum, 100_009.0);
        assert_eq!(s.buckets[0], (1.0, 2));
        assert_eq!(s.buckets[1], (2.0, 2));
        assert_eq!(s.buckets[2], (4.0, 4));
        assert_eq!(s.buckets.last().unwrap(), &(f64::INFINITY, 5));
        assert_eq!(s.buckets[s.buckets.len() - 2].1, 4, "past the last bound: only +Inf");
    }

    #[test]
    fn a_value_recorded_n_times_counts_as_n_values() {
        let (once, together) = (Histogram::new(&COUNT_BOUNDS), Histogram::new(&COUNT_BOUNDS));
        for _ in 0..3 {
            once.record(3.0);
        }
        together.record_n(3.0, 3);
        together.record_n(5.0, 0);
        assert_eq!(together.snapshot(), once.snapshot());
        assert_eq!(together.snapshot().sum, 9.0);
    }

    #[test]
    fn durations_are_seconds() {
        let h = Histogram::latency();
        h.record_duration(Duration::from_micros(70));
        let s = h.snapshot();
        assert_eq!(s.buckets[0].1, 0);
        assert_eq!(s.buckets[1], (0.000_1, 1));
        assert!((s.sum - 0.000_07).abs() < 1e-9);
    }
}
