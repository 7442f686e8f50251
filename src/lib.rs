//! Ember: a model-serving server on candle, with a cloud tier (`ember serve`) and an edge tier.
//!
//! The binary and the integration tests share this library. Layers, outermost first:
//! [`server`] (HTTP), [`registry`] (loaded models and their request-level logic), [`batching`]
//! (queues and compute threads), [`engine`] (candle compute), with [`repository`] and [`config`]
//! describing what to load and how.

pub mod batching;
pub mod config;
#[cfg(feature = "edge")]
pub mod edge;
pub mod engine;
pub mod metrics;
pub mod registry;
pub mod repository;
pub mod server;
