//! The upstream's circuit breaker: closed → open → half-open → closed.
//!
//! Closed lets everything through and counts consecutive failures; at the threshold it opens.
//! Open refuses at once (the caller answers a fast 503) until its cool-down passes, then lets one
//! trial request through (half-open): its success closes the circuit, its failure opens it
//! again. The active readiness probe overrides both ways: a ready upstream closes the circuit,
//! an unready one opens it. Time is passed in, so tests drive it step by step.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    HalfOpen,
    Open,
}

impl CircuitState {
    /// The value of the `ember_edge_circuit_state` gauge.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }
}

/// Whether a request may go upstream now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// The one request that tests a half-open circuit.
    Trial,
    Refused {
        retry_after: Duration,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub open_for: Duration,
}

#[derive(Debug, Clone, Copy)]
enum Inner {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// `trial`: when the trial request went out. A trial whose outcome never comes back (its
    /// client left) is replaced after the cool-down, so the circuit cannot stick half-open.
    HalfOpen {
        trial: Option<Instant>,
    },
}

pub struct Breaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            inner: Mutex::new(Inner::Closed { failures: 0 }),
        }
    }

    pub fn state(&self, now: Instant) -> CircuitState {
        match *self.lock() {
            Inner::Closed { .. } => CircuitState::Closed,
            Inner::Open { until } if now < until => CircuitState::Open,
            Inner::Open { .. } | Inner::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// How long until an open circuit lets a trial through (zero when it is not open).
    pub fn remaining_open(&self, now: Instant) -> Duration {
        match *self.lock() {
            Inner::Open { until } => until.saturating_duration_since(now),
            _ => Duration::ZERO,
        }
    }

    pub fn admit(&self, now: Instant) -> Admission {
        let mut inner = self.lock();
        let trial_due = match *inner {
            Inner::Closed { .. } => return Admission::Allowed,
            Inner::Open { until } if now < until => {
                return Admission::Refused {
                    retry_after: until - now,
                }
            }
            Inner::Open { .. } | Inner::HalfOpen { trial: None } => true,
            Inner::HalfOpen { trial: Some(at) } => now >= at + self.config.open_for,
        };
        if trial_due {
            *inner = Inner::HalfOpen { trial: Some(now) };
            Admission::Trial
        } else {
            Admission::Refused {
                retry_after: self.config.open_for,
            }
        }
    }

    pub fn on_success(&self) {
        *self.lock() = Inner::Closed { failures: 0 };
    }

    pub fn on_failure(&self, now: Instant) {
        let mut inner = self.lock();
        *inner = match *inner {
            Inner::Closed { failures } if failures + 1 < self.config.failure_threshold => {
                Inner::Closed {
                    failures: failures + 1,
                }
            }
            // Already open: the cool-down keeps its end; stragglers do not extend it.
            Inner::Open { until } if now < until => Inner::Open { until },
            _ => Inner::Open {
                until: now + self.config.open_for,
            },
        };
    }

    /// The readiness probe's verdict.
    pub fn on_probe(&self, ready: bool, now: Instant) {
        if ready {
            let mut inner = self.lock();
            if !matches!(*inner, Inner::Closed { .. }) {
                *inner = Inner::Closed { failures: 0 };
            }
        } else {
            let mut inner = self.lock();
            if !matches!(*inner, Inner::Open { until } if now < until) {
                *inner = Inner::Open {
                    until: now + self.config.open_for,
                };
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state is a plain value: a panic elsewhere cannot leave it half-written.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN_FOR: Duration = Duration::from_secs(5);

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig {
            failure_threshold: 3,
            open_for: OPEN_FOR,
        })
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = breaker();
        let t = Instant::now();
        b.on_failure(t);
        b.on_failure(t);
        b.on_success();
        b.on_failure(t);
        b.on_failure(t);
        assert_eq!(
            b.state(t),
            CircuitState::Closed,
            "a success resets the count"
        );
        assert_eq!(b.admit(t), Admission::Allowed);
        b.on_failure(t);
        assert_eq!(b.state(t), CircuitState::Open);
        let later = t + Duration::from_secs(2);
        assert_eq!(
            b.admit(later),
            Admission::Refused {
                retry_after: Duration::from_secs(3)
            }
        );
    }

    #[test]
    fn half_open_lets_one_trial_through_and_its_outcome_decides() {
        let b = breaker();
        let t = Instant::now();
        for _ in 0..3 {
            b.on_failure(t);
        }
        let after = t + OPEN_FOR;
        assert_eq!(b.state(after), CircuitState::HalfOpen);
        assert_eq!(b.admit(after), Admission::Trial);
        assert!(matches!(b.admit(after), Admission::Refused { .. }));
        b.on_failure(after);
        assert_eq!(b.state(after), CircuitState::Open, "a failed trial reopens");

        let again = after + OPEN_FOR;
        assert_eq!(b.admit(again), Admission::Trial);
        b.on_success();
        assert_eq!(b.state(again), CircuitState::Closed);
        assert_eq!(b.admit(again), Admission::Allowed);
    }

    #[test]
    fn a_lost_trial_is_replaced_after_the_cool_down() {
        let b = breaker();
        let t = Instant::now();
        b.on_probe(false, t);
        let after = t + OPEN_FOR;
        assert_eq!(b.admit(after), Admission::Trial);
        assert!(matches!(
            b.admit(after + Duration::from_secs(1)),
            Admission::Refused { .. }
        ));
        assert_eq!(b.admit(after + OPEN_FOR), Admission::Trial);
    }

    #[test]
    fn the_probe_opens_and_closes_the_circuit() {
        let b = breaker();
        let t = Instant::now();
        b.on_probe(false, t);
        assert_eq!(b.state(t), CircuitState::Open);
        // A second failing probe does not push the trial further away.
        b.on_probe(false, t + Duration::from_secs(1));
        assert_eq!(b.state(t + OPEN_FOR), CircuitState::HalfOpen);
        b.on_probe(true, t + Duration::from_secs(2));
        assert_eq!(b.state(t + Duration::from_secs(2)), CircuitState::Closed);
        assert_eq!(b.admit(t), Admission::Allowed);
    }
}
