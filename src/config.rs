//! Command line and `EMBER_*` environment → one validated configuration per subcommand.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::engine::DeviceSpec;

#[derive(Debug, Parser)]
#[command(
    name = "ember",
    version,
    about = "Ember: serve AI models on the cloud tier and at the edge"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the cloud tier: load every model of the repository and serve them over HTTP.
    Serve(ServeArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The model repository: one folder per model, each with a model.toml.
    #[arg(long, env = "EMBER_MODELS", default_value = "models")]
    pub models: PathBuf,

    /// Address to listen on; port 0 picks a free port (printed at start-up).
    #[arg(long, env = "EMBER_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// Device to run models on: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, env = "EMBER_DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,

    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish before the server exits.
    #[arg(long, env = "EMBER_SHUTDOWN_GRACE_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_grace_secs: u64,

    /// Threads candle uses for one op of one model instance; 0 = the cores divided by the
    /// largest `batching.instances` of the repository.
    #[arg(long, env = "EMBER_COMPUTE_THREADS", default_value_t = 0)]
    pub compute_threads: usize,

    /// Log format on stderr.
    #[arg(long, env = "EMBER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl ServeArgs {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}
