//! Dynamic batching: one bounded queue and one compute thread per model.
//!
//! [`queue`] decides what goes into a batch and when; [`worker`] runs that decision as an async
//! loop and hands each batch to the model's own OS thread, so compute never runs on the runtime.

pub mod queue;
#[cfg(feature = "generate")]
pub mod scheduler;
pub mod worker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use worker::{Batcher, Reply};

/// How long a request arriving now would wait before compute starts, for the edge's placement:
/// a moving average of recent queue waits, reported only while something is waiting (an idle
/// queue means no wait, whatever the past was). Cheap to clone; updates are lock-free.
#[derive(Clone, Default)]
pub struct QueueWait {
    mean_us: Arc<AtomicU64>,
}

impl QueueWait {
    /// Weight of the newest observation: the estimate follows a load change within a few
    /// batches without jumping on a single outlier.
    const WEIGHT: f64 = 0.25;

    pub fn observe(&self, waited: Duration) {
        let old = self.mean_us.load(Ordering::Relaxed) as f64;
        let new = waited.as_micros() as f64;
        // Racing writers may lose an observation; the estimate is a hint, not an account.
        let mean = old + Self::WEIGHT * (new - old);
        self.mean_us.store(mean as u64, Ordering::Relaxed);
    }

    pub fn expected(&self, waiting: usize) -> Duration {
        if waiting == 0 {
            Duration::ZERO
        } else {
            Duration::from_micros(self.mean_us.load(Ordering::Relaxed))
        }
    }
}

/// A model that computes a batch of inputs at once. Runs on the model's compute thread.
pub trait BatchEngine: Send + 'static {
    type Input: Send + 'static;
    type Output: Send + 'static;

    /// One output per input, in the same order.
    fn run(&mut self, inputs: Vec<Self::Input>) -> Result<Vec<Self::Output>, String>;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("the queue of model {model} is full ({capacity} inputs waiting); retry later")]
    QueueFull { model: String, capacity: usize },
    #[error("the request has {count} inputs; model {model} queues at most {capacity} at once")]
    TooManyInputs {
        model: String,
        count: usize,
        capacity: usize,
    },
    #[error("model {0} is shutting down")]
    Stopped(String),
    #[error("inference failed for model {model}: {message}")]
    Engine { model: String, message: String },
}
