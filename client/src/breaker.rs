//! A circuit breaker: after `failure_threshold` consecutive failures it opens and calls fail
//! fast; after `open_for` one probe is let through (half-open); its success closes the
//! circuit, its failure opens it again.
//!
//! ```text
//!  Closed ──N failures──► Open ──open_for elapsed──► HalfOpen ──probe ok──► Closed
//!    ▲                      ▲                            │
//!    └── success resets     └────────── probe failed ────┘
//! ```

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub open_for: Duration,
}

impl BreakerConfig {
    /// Opens after `failure_threshold` consecutive failures, for `open_for`.
    pub fn new(failure_threshold: u32, open_for: Duration) -> Self {
        BreakerConfig { failure_threshold, open_for }
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig { failure_threshold: 5, open_for: Duration::from_secs(2) }
    }
}

/// The breaker's state, as callers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// Thread-safe circuit breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

/// Permission to make one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Allowed,
    /// The probe of a half-open breaker.
    Probe,
    /// Open; retry after this long.
    Rejected(Duration),
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig) -> Self {
        CircuitBreaker { config, inner: Mutex::new(Inner::Closed { failures: 0 }) }
    }

    pub fn state(&self) -> BreakerState {
        match self.inner.lock().as_deref() {
            Ok(Inner::Closed { .. }) => BreakerState::Closed,
            Ok(Inner::Open { until }) if Instant::now() < *until => BreakerState::Open,
            Ok(Inner::Open { .. } | Inner::HalfOpen { .. }) => BreakerState::HalfOpen,
            Err(_) => BreakerState::Closed,
        }
    }

    /// Asks to make a call.
    pub fn acquire(&self) -> Permit {
        let Ok(mut inner) = self.inner.lock() else {
            return Permit::Allowed;
        };
        match &mut *inner {
            Inner::Closed { .. } => Permit::Allowed,
            Inner::Open { until } => {
                let now = Instant::now();
                if now < *until {
                    Permit::Rejected(*until - now)
                } else {
                    *inner = Inner::HalfOpen { probing: true };
                    Permit::Probe
                }
            }
            Inner::HalfOpen { probing } => {
                if *probing {
                    Permit::Rejected(Duration::from_millis(50))
                } else {
                    *probing = true;
                    Permit::Probe
                }
            }
        }
    }

    /// Gives back a probe whose call ended without an outcome (cancelled): the next call
    /// may probe.
    pub fn release_probe(&self) {
        if let Ok(mut inner) = self.inner.lock()
            && let Inner::HalfOpen { probing } = &mut *inner
        {
            *probing = false;
        }
    }

    /// Reports the outcome of a permitted call.
    pub fn record(&self, success: bool) {
        let Ok(mut inner) = self.inner.lock() else { return };
        *inner = match (&*inner, success) {
            (_, true) => Inner::Closed { failures: 0 },
            (Inner::Closed { failures }, false) if failures + 1 < self.config.failure_threshold => {
                Inner::Closed { failures: failures + 1 }
            }
            (_, false) => {
                if !matches!(&*inner, Inner::Open { .. }) {
                    tracing::warn!(
                        open_for_ms = self.config.open_for.as_millis() as u64,
                        "cache circuit opened after repeated failures"
                    );
                }
                Inner::Open { until: Instant::now() + self.config.open_for }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_repeated_failures_and_half_opens_to_probe() {
        let b = CircuitBreaker::new(BreakerConfig { failure_threshold: 3, open_for: Duration::from_millis(30) });
        for _ in 0..2 {
            assert_eq!(b.acquire(), Permit::Allowed);
            b.record(false);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(false);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(matches!(b.acquire(), Permit::Rejected(_)));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.acquire(), Permit::Probe);
        assert!(matches!(b.acquire(), Permit::Rejected(_)), "one probe at a time");
        b.record(false);
        assert_eq!(b.state(), BreakerState::Open, "a failed probe reopens");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.acquire(), Permit::Probe);
        b.record(true);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.acquire(), Permit::Allowed);
    }

    #[test]
    fn a_probe_given_back_lets_the_next_call_probe() {
        let b = CircuitBreaker::new(BreakerConfig { failure_threshold: 1, open_for: Duration::from_millis(1) });
        b.record(false);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(b.acquire(), Permit::Probe);
        assert!(matches!(b.acquire(), Permit::Rejected(_)));
        b.release_probe();
        assert_eq!(b.acquire(), Permit::Probe, "a cancelled probe must not block the breaker");
    }

    #[test]
    fn a_success_resets_the_count() {
        let b = CircuitBreaker::new(BreakerConfig { failure_threshold: 2, open_for: Duration::from_secs(1) });
        b.record(false);
        b.record(true);
        b.record(false);
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
