//! The batch-forming state machine: which waiting inputs go into the next forward pass, and when.
//!
//! A plain struct with pure methods; time is passed in, so tests drive it step by step. The async
//! loop around it lives in `worker.rs`.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::repository::BatchPolicy;

/// Padding a batch may carry when inputs of different lengths share it: a quarter of its real
/// tokens, or a few tokens per input (short inputs cost less in padding than in a batch of
/// their own). Past that an input waits for a batch of its own length instead of making the
/// others pay for its padding.
const MAX_PADDING_FRACTION: f64 = 0.25;
const PADDING_TOKENS_PER_INPUT: usize = 8;

/// One waiting input.
#[derive(Debug)]
pub struct Pending<T> {
    pub item: T,
    pub tokens: usize,
    pub arrived: Instant,
}

/// Waiting inputs of one model, oldest first.
#[derive(Debug)]
pub struct BatchQueue<T> {
    policy: BatchPolicy,
    pending: VecDeque<Pending<T>>,
    pending_tokens: usize,
    /// The last batch stopped at its share for the idle instances: the rest is another idle
    /// instance's share and goes at once, without waiting out `max_queue_delay_ms`.
    share_left: bool,
}

impl<T> BatchQueue<T> {
    pub fn new(policy: BatchPolicy) -> Self {
        Self {
            policy,
            pending: VecDeque::new(),
            pending_tokens: 0,
            share_left: false,
        }
    }

    pub fn push(&mut self, item: T, tokens: usize, now: Instant) {
        self.pending_tokens += tokens;
        self.pending.push_back(Pending {
            item,
            tokens,
            arrived: now,
        });
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Enough is waiting to fill a batch by count or by tokens: no reason to wait longer.
    pub fn is_full(&self) -> bool {
        self.pending.len() >= self.policy.max_batch_size
            || self.pending_tokens >= self.policy.max_batch_tokens
    }

    /// When the oldest input has waited `max_queue_delay_ms`.
    pub fn deadline(&self) -> Option<Instant> {
        let delay = Duration::from_millis(self.policy.max_queue_delay_ms);
        self.pending.front().map(|p| p.arrived + delay)
    }

    /// A batch should go now: it is full, it is an idle instance's share of the last split, or
    /// the oldest input has waited long enough.
    pub fn should_flush(&self, now: Instant) -> bool {
        self.is_full()
            || (self.share_left && !self.pending.is_empty())
            || self.deadline().is_some_and(|d| now >= d)
    }

    /// Drops inputs nobody waits for any more; returns how many.
    pub fn remove_where(&mut self, mut gone: impl FnMut(&T) -> bool) -> usize {
        let before = self.pending.len();
        self.pending.retain(|p| !gone(&p.item));
        self.pending_tokens = self.pending.iter().map(|p| p.tokens).sum();
        self.share_left &= !self.pending.is_empty();
        before - self.pending.len()
    }

    /// Takes the next batch, for one of `idle` compute instances that are free now. The oldest
    /// input always goes (nothing starves); the others join in order of how close their length
    /// is to it, while the batch stays within `max_batch_size`, within `max_batch_tokens` counted
    /// padded, within the padding allowance above, and within an even share of what waits among
    /// the idle instances: one batch of everything would keep the others idle while it computes
    /// (on two instances a request of 32 short texts took 47 ms as one batch, 25 ms as two).
    pub fn take_batch(&mut self, idle: usize) -> Vec<Pending<T>> {
        let Some(anchor) = self.pending.front() else {
            return Vec::new();
        };
        let share = self.pending.len().div_ceil(idle.max(1));
        let limit = self.policy.max_batch_size.min(share);
        let anchor_len = anchor.tokens;
        let mut order: Vec<usize> = (1..self.pending.len()).collect();
        // Stable: among equally close lengths the older input goes first.
        order.sort_by_key(|&i| self.pending[i].tokens.abs_diff(anchor_len));

        let mut chosen = vec![0];
        let (mut longest, mut real) = (anchor_len, anchor_len);
        for i in order {
            if chosen.len() >= limit {
                break;
            }
            let tokens = self.pending[i].tokens;
            let new_longest = longest.max(tokens);
            let padded = new_longest * (chosen.len() + 1);
            let waste = padded - (real + tokens);
            let allowed = ((real + tokens) as f64 * MAX_PADDING_FRACTION) as usize;
            let allowed = allowed.max(PADDING_TOKENS_PER_INPUT * (chosen.len() + 1));
            if padded > self.policy.max_batch_tokens || waste > allowed {
                continue;
            }
            chosen.push(i);
            longest = new_longest;
            real += tokens;
        }

        chosen.sort_unstable();
        let mut batch = Vec::with_capacity(chosen.len());
        for &i in chosen.iter().rev() {
            let p = self.pending.remove(i).expect("chosen index is in range");
            self.pending_tokens -= p.tokens;
            batch.push(p);
        }
        batch.reverse();
        self.share_left =
            batch.len() == share && share < self.policy.max_batch_size && !self.pending.is_empty();
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(size: usize, tokens: usize, delay_ms: u64) -> BatchPolicy {
        BatchPolicy {
            max_batch_size: size,
            max_batch_tokens: tokens,
            max_queue_delay_ms: delay_ms,
            queue_capacity: 1024,
            instances: 1,
        }
    }

    fn items(batch: &[Pending<u32>]) -> Vec<u32> {
        batch.iter().map(|p| p.item).collect()
    }

    #[test]
    fn flushes_when_size_reached() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy(3, 1000, 50));
        q.push(1, 10, t0);
        q.push(2, 10, t0);
        assert!(!q.should_flush(t0));
        q.push(3, 10, t0);
        assert!(q.should_flush(t0));
        assert_eq!(items(&q.take_batch(1)), vec![1, 2, 3]);
        assert!(q.is_empty());
    }

    #[test]
    fn flushes_when_tokens_reached() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy(32, 100, 50));
        q.push(1, 60, t0);
        assert!(!q.should_flush(t0));
        q.push(2, 60, t0);
        assert!(q.should_flush(t0));
        // 2 × 60 padded tokens exceed 100: only the oldest goes.
        assert_eq!(items(&q.take_batch(1)), vec![1]);
        assert_eq!(items(&q.take_batch(1)), vec![2]);
    }

    #[test]
    fn flushes_after_delay_from_first_arrival() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy(32, 1000, 5));
        q.push(1, 10, t0);
        q.push(2, 10, t0 + Duration::from_millis(4));
        assert_eq!(q.deadline(), Some(t0 + Duration::from_millis(5)));
        assert!(!q.should_flush(t0 + Duration::from_millis(4)));
        assert!(q.should_flush(t0 + Duration::from_millis(5)));
        assert_eq!(items(&q.take_batch(1)), vec![1, 2]);
        assert_eq!(q.deadline(), None);
    }

    #[test]
    fn groups_by_length_and_oldest_always_goes() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy(32, 10_000, 5));
        for (item, tokens) in [(1, 12), (2, 200), (3, 11), (4, 190), (5, 60), (6, 3)] {
            q.push(item, tokens, t0);
        }
        // The short ones go together; the long ones do not make them pay for padding.
        assert_eq!(items(&q.take_batch(1)), vec![1, 3, 6]);
        assert_eq!(items(&q.take_batch(1)), vec![2, 4]);
        assert_eq!(items(&q.take_batch(1)), vec![5]);
        assert!(q.is_empty());
    }

    #[test]
    fn respects_max_batch_size_and_keeps_the_rest_in_order() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy(2, 1000, 5));
        for i in 1..=5 {
            q.push(i, 10, t0);
        }
        assert_eq!(items(&q.take_batch(1)), vec![1, 2]);
        assert_eq!(items(&q.take_batch(1)), vec![3, 4]);
        assert_eq!(items(&q.take_batch(1)), vec![5]);
    }

    #[test]
    fn an_input_longer_than_the_token_budget_still_runs_alone() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy(8, 64, 5));
        q.push(1, 300, t0);
        q.push(2, 10, t0);
        assert_eq!(items(&q.take_batch(1)), vec![1]);
        assert_eq!(items(&q.take_batch(1)), vec![2]);
    }

    #[test]
    fn removing_cancelled_inputs_updates_tokens() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy(32, 100, 5));
        q.push(1, 60, t0);
        q.push(2, 60, t0);
        assert!(q.is_full());
        assert_eq!(q.remove_where(|&i| i == 1), 1);
        assert!(!q.is_full());
        assert_eq!(items(&q.take_batch(1)), vec![2]);
    }

    #[test]
    fn idle_instances_share_what_waits() {
        let mut q = BatchQueue::new(policy(32, 1000, 50));
        let now = Instant::now();
        for i in 1..=7 {
            q.push(i, 10, now);
        }
        // Two idle: the first takes half (rounded up), the one left idle then takes the rest
        // at once, not after the queue delay.
        assert_eq!(items(&q.take_batch(2)), vec![1, 2, 3, 4]);
        assert!(q.should_flush(now));
        assert_eq!(items(&q.take_batch(1)), vec![5, 6, 7]);
        // Nothing is left over from that split: new arrivals wait out the delay again.
        q.push(8, 10, now);
        q.push(9, 10, now);
        assert!(!q.should_flush(now));
        // More idle instances than inputs: one each.
        assert_eq!(items(&q.take_batch(3)), vec![8]);
        assert!(q.should_flush(now));
        assert_eq!(items(&q.take_batch(2)), vec![9]);
        assert!(!q.should_flush(now));
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// Every input leaves exactly once, the oldest always goes in the next batch (no
            /// starvation), and no batch passes its size, its share among the idle instances, or
            /// its token budget unless alone.
            #[test]
            fn every_input_leaves_once_in_bounded_batches(
                lengths in prop::collection::vec(1usize..600, 1..80),
                size in 1usize..33,
                budget in 64usize..4096,
                idle in 1usize..4,
            ) {
                let mut q = BatchQueue::new(policy(size, budget, 0));
                let now = Instant::now();
                for (id, &tokens) in lengths.iter().enumerate() {
                    q.push(id, tokens, now);
                }
                let mut seen = vec![0u32; lengths.len()];
                while !q.is_empty() {
                    let oldest = q.pending.front().unwrap().item;
                    let waiting = q.len();
                    let batch = q.take_batch(idle);
                    prop_assert!(!batch.is_empty() && batch.len() <= size);
                    prop_assert!(batch.len() <= waiting.div_ceil(idle));
                    prop_assert_eq!(batch[0].item, oldest);
                    let longest = batch.iter().map(|p| p.tokens).max().unwrap();
                    prop_assert!(batch.len() == 1 || longest * batch.len() <= budget);
                    for p in &batch {
                        seen[p.item] += 1;
                    }
                }
                prop_assert!(seen.iter().all(|&n| n == 1));
                prop_assert_eq!(q.pending_tokens, 0);
            }
        }
    }
}
