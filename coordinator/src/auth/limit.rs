//! A key's limits as they run: concurrent calls, and tokens per minute as a bucket that refills
//! continuously. A call is admitted while the bucket is not empty and charged as its tokens
//! pass, so one large request can overdraw it; the key then waits until the debt has refilled.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use crate::error::CoordinatorError;

/// The limits one key runs under; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KeyLimits {
    pub max_concurrent: Option<u32>,
    pub tokens_per_minute: Option<u64>,
}

pub(super) struct KeyState {
    limits: KeyLimits,
    in_flight: AtomicU32,
    /// For metrics: calls admitted, calls refused for a limit, tokens charged.
    admitted: AtomicU64,
    limited: AtomicU64,
    charged: AtomicU64,
    /// Tokens left (negative: overdrawn) and when that was last brought up to date.
    bucket: Mutex<(f64, Instant)>,
}

impl KeyState {
    pub fn new(limits: KeyLimits) -> Self {
        let full = limits.tokens_per_minute.unwrap_or(0) as f64;
        Self {
            limits,
            in_flight: AtomicU32::new(0),
            admitted: AtomicU64::new(0),
            limited: AtomicU64::new(0),
            charged: AtomicU64::new(0),
            bucket: Mutex::new((full, Instant::now())),
        }
    }

    /// Takes a concurrent slot if the key has one and budget left.
    pub fn admit(&self, name: &str) -> Result<(), CoordinatorError> {
        if let Some(per_minute) = self.limits.tokens_per_minute {
            let left = self.refill(per_minute);
            if left < 1.0 {
                self.limited.fetch_add(1, Ordering::Relaxed);
                let wait = (1.0 - left) * 60.0 / per_minute as f64;
                return Err(CoordinatorError::ResourceExhausted(format!(
                    "API key {name} used its {per_minute} tokens per minute; retry in {wait:.1} s"
                )));
            }
        }
        let previous = self.in_flight.fetch_add(1, Ordering::SeqCst);
        if let Some(max) = self.limits.max_concurrent {
            if previous >= max {
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                self.limited.fetch_add(1, Ordering::Relaxed);
                return Err(CoordinatorError::ResourceExhausted(format!(
                    "API key {name} already has its {max} concurrent requests running"
                )));
            }
        }
        self.admitted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }

    pub fn limited(&self) -> u64 {
        self.limited.load(Ordering::Relaxed)
    }

    pub fn tokens(&self) -> u64 {
        self.charged.load(Ordering::Relaxed)
    }

    pub fn running(&self) -> u64 {
        u64::from(self.in_flight.load(Ordering::SeqCst))
    }

    pub fn release(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    pub fn charge(&self, tokens: u64) {
        self.charged.fetch_add(tokens, Ordering::Relaxed);
        if let Some(per_minute) = self.limits.tokens_per_minute {
            self.refill(per_minute);
            let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
            bucket.0 -= tokens as f64;
        }
    }

    /// Brings the bucket up to now and returns what it holds.
    fn refill(&self, per_minute: u64) -> f64 {
        let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let full = per_minute as f64;
        bucket.0 = (bucket.0 + now.duration_since(bucket.1).as_secs_f64() * full / 60.0).min(full);
        bucket.1 = now;
        bucket.0
    }

    pub fn limits(&self) -> KeyLimits {
        self.limits
    }

    #[cfg(test)]
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::SeqCst)
    }
}
