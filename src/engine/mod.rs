//! Model families and all compute. Knows nothing of HTTP or queues: an engine is loaded from a
//! folder onto a device and turns a batch of inputs into outputs.

pub mod bert;
mod bf16_linear;
pub mod embed;
pub mod generate;

use std::path::PathBuf;

/// The device models are loaded on, parsed from `--device` (`cpu`, `cuda`, `cuda:N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}; use cpu, cuda or cuda:N")),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    pub fn open(self) -> Result<candle_core::Device, EngineError> {
        match self {
            Self::Cpu => Ok(candle_core::Device::Cpu),
            Self::Cuda(_) if !cfg!(feature = "cuda") => Err(EngineError::Device(
                "this binary was built without the `cuda` feature; rebuild with \
                 `cargo build --release --features cuda` or use --device cpu"
                    .into(),
            )),
            Self::Cuda(n) => candle_core::Device::new_cuda(n)
                .map_err(|e| EngineError::Device(format!("cuda:{n}: {e}"))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("device: {0}")]
    Device(String),
    #[error("{file}: {message}")]
    File { file: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl EngineError {
    pub(crate) fn file(file: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Self::File {
            file: file.into(),
            message: message.to_string(),
        }
    }
}
