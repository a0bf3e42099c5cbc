//! A fixed-bucket latency histogram updated with relaxed atomics: recording a value is a few
//! atomic adds and no lock, so the group loop can record every token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counts of durations by upper bound (seconds), plus their sum and count, in the shape of a
/// Prometheus histogram.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds in seconds, ascending; a last bucket (`+Inf`) takes the rest.
    bounds: &'static [f64],
    /// `counts[i]`: values in `(bounds[i-1], bounds[i]]`; `counts[bounds.len()]`: above all.
    counts: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

/// What a histogram held at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound in seconds, values at or below it), cumulative, without `+Inf`.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bounds must ascend");
        Self { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_nanos: AtomicU64::new(0) }
    }

    pub fn record(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        let bucket = self.bounds.partition_point(|&b| b < seconds);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(u64::try_from(value.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Buckets made cumulative, as Prometheus reports them. Read while others record, the
    /// counts may be a few values apart from each other; each is exact on its own.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let mut buckets = Vec::with_capacity(self.bounds.len());
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            total += count.load(Ordering::Relaxed);
            buckets.push((*bound, total));
        }
        total += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        HistogramSnapshot { buckets, count: total, sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_the_first_bucket_that_holds_them_and_buckets_are_cumulative() {
        let h = Histogram::new(&[0.01, 0.1, 1.0]);
        for ms in [5, 10, 50, 2000] {
            h.record(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        assert_eq!(s.buckets, vec![(0.01, 2), (0.1, 3), (1.0, 3)]);
        assert_eq!(s.count, 4);
        assert!((s.sum_seconds - 2.065).abs() < 1e-9, "{}", s.sum_seconds);
    }
}
