//! Per-caller rate limits: a token bucket per API key (or, on a server without keys, per client
//! address). A caller over its rate gets 429 with `Retry-After`, before anything is parsed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Who is asking, as far as limits go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    /// The n-th configured API key.
    Key(usize),
    /// A client of a server without API keys, by address.
    Address(std::net::IpAddr),
}

/// Most buckets kept for clients known by address; full (idle) ones are dropped past it, so a
/// crowd of one-off clients cannot grow memory without bound.
const MAX_ADDRESS_BUCKETS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<Caller, Bucket>>,
}

impl RateLimiter {
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self {
            per_second,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `caller`, or says how long until one is there.
    pub fn take(&self, caller: Caller, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_ADDRESS_BUCKETS && !buckets.contains_key(&caller) {
            let (rate, burst) = (self.per_second, self.burst);
            buckets.retain(|c, b| {
                matches!(c, Caller::Key(_)) || refill(*b, now, rate, burst).tokens < burst
            });
        }
        let bucket = buckets.entry(caller).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        *bucket = refill(*bucket, now, self.per_second, self.burst);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }
}

fn refill(b: Bucket, now: Instant, rate: f64, burst: f64) -> Bucket {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    Bucket {
        tokens: (b.tokens + elapsed * rate).min(burst),
        at: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let limiter = RateLimiter::new(2.0, 3);
        let t = Instant::now();
        for _ in 0..3 {
            assert!(limiter.take(Caller::Key(0), t).is_ok());
        }
        let wait = limiter.take(Caller::Key(0), t).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(limiter.take(Caller::Key(1), t).is_ok(), "keys are separate");
        assert!(limiter.take(Caller::Key(0), t + wait).is_ok());
        assert!(limiter.take(Caller::Key(0), t + wait).is_err());
    }

    #[test]
    fn idle_address_buckets_are_dropped_at_the_cap() {
        let limiter = RateLimiter::new(100.0, 1);
        let t = Instant::now();
        for i in 0..MAX_ADDRESS_BUCKETS as u32 {
            let ip = std::net::IpAddr::from(i.to_be_bytes());
            limiter.take(Caller::Address(ip), t).unwrap();
        }
        let later = t + Duration::from_secs(1);
        limiter
            .take(Caller::Address([10, 0, 0, 1].into()), later)
            .unwrap();
        assert!(limiter.buckets.lock().unwrap().len() < 10);
    }
}
