//! Dynamic batching: one bounded queue and one compute thread per model.
//!
//! [`queue`] decides what goes into a batch and when; [`worker`] runs that decision as an async
//! loop and hands each batch to the model's own OS thread, so compute never runs on the runtime.

pub mod queue;
pub mod scheduler;
pub mod worker;

pub use worker::{Batcher, Reply};

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
