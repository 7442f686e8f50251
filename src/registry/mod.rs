//! The models this server has loaded, by name, and the request-level logic around each
//! (tokenising, validating, queueing, gathering). No HTTP here: routes call these methods.

pub mod embed;
#[cfg(feature = "generate")]
pub mod generate;
#[cfg(feature = "onnx")]
pub mod tensor;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

pub use embed::{EmbedInput, Embedding, EmbeddingModel};
#[cfg(feature = "generate")]
pub use generate::{GenerateParams, Generation, GenerationModel, Prompt};
#[cfg(feature = "onnx")]
pub use tensor::TensorModel;

use crate::batching::{BatchEngine, BatchError, Batcher};
use crate::engine::EngineError;
use crate::metrics::{BatcherMetrics, Metrics};
use crate::repository::{ModelSpec, Task};

/// A loaded model of one of the supported families; cloning shares it.
#[derive(Clone)]
pub enum LoadedModel {
    Embed(Arc<EmbeddingModel>),
    #[cfg(feature = "generate")]
    Generate(Arc<GenerationModel>),
    #[cfg(feature = "onnx")]
    Tensor(Arc<TensorModel>),
}

impl LoadedModel {
    pub fn spec(&self) -> &ModelSpec {
        match self {
            Self::Embed(m) => m.spec(),
            #[cfg(feature = "generate")]
            Self::Generate(m) => m.spec(),
            #[cfg(feature = "onnx")]
            Self::Tensor(m) => m.spec(),
        }
    }

    /// How long a request arriving now would likely queue before its compute starts.
    pub fn expected_wait(&self) -> std::time::Duration {
        match self {
            Self::Embed(m) => m.expected_wait(),
            #[cfg(feature = "generate")]
            Self::Generate(m) => m.expected_wait(),
            #[cfg(feature = "onnx")]
            Self::Tensor(m) => m.expected_wait(),
        }
    }
}

/// Why a request to a model failed, in domain terms; the server maps each to a status code.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{message}")]
    InvalidInput {
        /// Which input (by position), where one is to blame.
        index: Option<usize>,
        message: String,
    },
    /// A request parameter is out of range or does not fit the model.
    #[error("{message}")]
    InvalidParameter {
        param: &'static str,
        message: String,
    },
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error("{0}")]
    Internal(String),
}

/// Every model the server knows, by name: the loaded ones, and those that failed to load with
/// the reason (the server goes on serving the others).
#[derive(Default)]
pub struct ModelRegistry {
    models: RwLock<BTreeMap<String, LoadedModel>>,
    failed: RwLock<BTreeMap<String, String>>,
}

impl ModelRegistry {
    pub fn get(&self, name: &str) -> Option<LoadedModel> {
        self.models
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
    }

    /// Loaded models, sorted by name.
    pub fn list(&self) -> Vec<LoadedModel> {
        self.models
            .read()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }

    /// Why the model of this name failed to load, if it did.
    pub fn failure(&self, name: &str) -> Option<String> {
        self.failed
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
    }

    /// The models that failed to load, sorted by name.
    pub fn failed_names(&self) -> Vec<String> {
        self.failed
            .read()
            .expect("registry lock")
            .keys()
            .cloned()
            .collect()
    }

    pub fn insert_failure(&self, name: &str, reason: String) {
        self.failed
            .write()
            .expect("registry lock")
            .insert(name.to_string(), reason);
    }

    pub fn insert(&self, model: LoadedModel) {
        let name = model.spec().name.clone();
        self.models
            .write()
            .expect("registry lock")
            .insert(name, model);
    }
}

/// Runs model loading (file reads, decoding, a trial run) on the blocking pool, off the runtime.
async fn off_runtime<T: Send + 'static>(
    load: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(load)
        .await
        .map_err(|e| EngineError::Device(format!("model loading thread failed: {e}")))?
}

/// Starts a model's batcher: one compute thread per instance, each with a clone of the engine
/// (clones share the weights).
fn start_batcher<E: BatchEngine + Clone>(
    spec: &ModelSpec,
    engine: E,
    metrics: BatcherMetrics,
) -> Result<Batcher<E>, EngineError> {
    let engines = vec![engine; spec.batching.instances];
    Batcher::spawn(&spec.name, engines, spec.batching, metrics)
        .map_err(|e| EngineError::Device(format!("cannot start compute thread: {e}")))
}

/// Loads one model: weights on a blocking thread, then its batcher on the current runtime.
/// Logs and records the load time and parameter count.
pub async fn load(
    spec: ModelSpec,
    device: candle_core::Device,
    metrics: &Metrics,
) -> Result<LoadedModel, EngineError> {
    let started = Instant::now();
    let model = match spec.task {
        Task::Embed => {
            let batcher_metrics = metrics.batcher(&spec.name);
            let (embedder, tokenizer, spec) = off_runtime(move || {
                crate::engine::embed::load(&spec.path, &spec.embed, &device)
                    .map(|(e, t)| (e, t, spec))
            })
            .await?;
            LoadedModel::Embed(Arc::new(EmbeddingModel::start(
                spec,
                embedder,
                tokenizer,
                batcher_metrics,
            )?))
        }
        #[cfg(feature = "generate")]
        Task::Generate => {
            let generate_metrics = metrics.generate(&spec.name);
            let (generator, spec) = off_runtime(move || {
                crate::engine::generate::load(&spec.path, &device, spec.generate.numerics)
                    .map(|g| (g, spec))
            })
            .await?;
            LoadedModel::Generate(Arc::new(GenerationModel::start(
                spec,
                generator,
                generate_metrics,
            )?))
        }
        #[cfg(not(feature = "generate"))]
        Task::Generate => {
            return Err(EngineError::file(
                &spec.config_file,
                "generation models need a build with the `generate` feature (the default)",
            ))
        }
        #[cfg(feature = "onnx")]
        Task::Tensor => {
            if !device.is_cpu() {
                tracing::info!(model = %spec.name, "ONNX graphs run on the CPU (candle-onnx keeps constants there)");
            }
            let batcher_metrics = metrics.batcher(&spec.name);
            let (engine, info, spec) = off_runtime(move || {
                crate::engine::tensor::onnx::load(&spec.path, &spec.tensor)
                    .map(|(e, i)| (e, i, spec))
            })
            .await?;
            LoadedModel::Tensor(Arc::new(TensorModel::start(
                spec,
                engine,
                info,
                batcher_metrics,
            )?))
        }
        #[cfg(not(feature = "onnx"))]
        Task::Tensor => {
            return Err(EngineError::file(
                &spec.config_file,
                "tensor models need a build with the `onnx` feature (the default)",
            ))
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let (name, parameters, detail) = match &model {
        LoadedModel::Embed(m) => (
            &m.spec().name,
            m.info().parameters,
            format!("{:?} dense layers", m.info().precision),
        ),
        #[cfg(feature = "generate")]
        LoadedModel::Generate(m) => (
            &m.spec().name,
            m.info().parameters,
            format!(
                "{} {}, context {}, numerics {:?}",
                m.info().architecture,
                m.info().quantization,
                m.context_length(),
                m.spec().generate.numerics
            ),
        ),
        #[cfg(feature = "onnx")]
        LoadedModel::Tensor(m) => (
            &m.spec().name,
            m.info().parameters,
            format!(
                "ONNX opset {}, {} operators, {}",
                m.info().opset,
                m.info().operators,
                if m.signature().batched {
                    "batched on dimension 0"
                } else {
                    "not batched (fixed dimension 0)"
                }
            ),
        ),
    };
    metrics
        .model_load_seconds
        .with_label_values(&[name])
        .set(seconds);
    metrics
        .model_parameters
        .with_label_values(&[name])
        .set(parameters as i64);
    tracing::info!(model = %name, parameters, %detail, load_ms = (seconds * 1000.0).round(), "model loaded");
    Ok(model)
}
