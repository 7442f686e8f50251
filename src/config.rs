//! Command line, `EMBER_*` environment and an optional TOML file (`--config`) → one validated
//! configuration per subcommand. Precedence: flag, then environment, then file, then default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::engine::cpu::Isa;
use crate::engine::DeviceSpec;
use crate::server::auth::{AccessPolicy, Secret};
use crate::server::limits::Limits;
use crate::server::rate_limit::RateLimiter;

#[derive(Debug, Parser)]
#[command(
    name = "ember",
    version,
    about = "Ember: serve AI models on the cloud tier and at the edge"
)]
pub struct Cli {
    /// A TOML file of settings, keyed by flag name (`upstream = "http://…"`); flags and
    /// `EMBER_*` variables override it.
    #[arg(long, env = "EMBER_CONFIG", global = true)]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the cloud tier: load every model of the repository and serve them over HTTP.
    Serve(ServeArgs),
    /// Run the edge tier: serve the repository's edge models here, forward the rest upstream.
    #[cfg(feature = "edge")]
    Edge(EdgeArgs),
}

impl Command {
    pub fn server(&self) -> &ServeArgs {
        match self {
            Self::Serve(args) => args,
            #[cfg(feature = "edge")]
            Self::Edge(args) => &args.server,
        }
    }
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

    /// The widest instruction set Ember's CPU kernels may use (portable, avx2, avx512-core,
    /// avx512, amx); unset: all the CPU has.
    #[arg(long, env = "EMBER_CPU_ISA")]
    pub cpu_isa: Option<Isa>,

    /// Log format on stderr.
    #[arg(long, env = "EMBER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// An API key for the inference routes (`Authorization: Bearer <key>`). Prefer the
    /// environment or `--api-key-file`: a command line is visible to other local users.
    #[arg(long, env = "EMBER_API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,

    /// A file of API keys, one per line (blank lines and `#` comments are skipped).
    #[arg(long, env = "EMBER_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,

    /// The admin key, for operator endpoints (model control, and `/metrics` unless open).
    #[arg(long, env = "EMBER_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<Secret>,

    /// Health probes answer without a key (what Kubernetes probes need); `false`: any valid key.
    #[arg(long, env = "EMBER_OPEN_HEALTH", default_value_t = true, action = clap::ArgAction::Set)]
    pub open_health: bool,

    /// `/metrics` answers without a key (what scrapers need); `false`: the admin key only.
    #[arg(long, env = "EMBER_OPEN_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub open_metrics: bool,

    /// Serve HTTPS with this PEM certificate chain (leaf first); needs `--tls-key`.
    #[cfg(feature = "tls")]
    #[arg(long, env = "EMBER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of `--tls-cert` (PKCS#8, PKCS#1 or SEC1).
    #[cfg(feature = "tls")]
    #[arg(long, env = "EMBER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, env = "EMBER_MAX_BODY_BYTES", default_value_t = 2 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..=(1 << 30)))]
    pub max_body_bytes: u64,

    /// Most inputs in one request (texts to embed, rows of a tensor request); more get 413.
    #[arg(long, env = "EMBER_MAX_INPUTS", default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_inputs: u64,

    /// Whether a text longer than its model's `max_seq_length` is cut there (`true`) or refused
    /// with 400 (`false`), when the request's own `truncate` does not say.
    #[arg(long, env = "EMBER_TRUNCATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub truncate: bool,

    /// Whether readiness needs every model of the repository loaded (`true`), or only that
    /// loading is over (`false`). Either way a model that fails to load is reported and the
    /// others answer requests; strict readiness keeps a pod with a broken model out of service.
    #[arg(long, env = "EMBER_STRICT_READINESS", default_value_t = true, action = clap::ArgAction::Set)]
    pub strict_readiness: bool,

    /// The longest a request may take, streamed body included; a client may ask for less with
    /// `x-request-timeout: SECONDS`. Past it: 504, and the work is cancelled.
    #[arg(long, env = "EMBER_REQUEST_TIMEOUT_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub request_timeout_secs: u64,

    /// Most open client connections; past it a new connection gets 503 and is closed.
    #[arg(long, env = "EMBER_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,

    /// How long a connection may sit without a request (between keep-alive requests, or while
    /// a request's head trickles in) before it is closed, freeing its slot. Requests being
    /// processed or streamed are never cut by it.
    #[arg(long, env = "EMBER_IDLE_TIMEOUT_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub idle_timeout_secs: u64,

    /// Requests per second allowed per API key (per client address on a server without keys);
    /// 0 = no limit. Over it: 429 with `Retry-After`. The admin key is not limited.
    #[arg(long, env = "EMBER_RATE_LIMIT_RPS", default_value_t = 0.0)]
    pub rate_limit_rps: f64,

    /// Requests a caller may send at once before the rate applies; 0 = one second's worth.
    #[arg(long, env = "EMBER_RATE_LIMIT_BURST", default_value_t = 0)]
    pub rate_limit_burst: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl ServeArgs {
    /// The TLS settings, when `--tls-cert` and `--tls-key` are given; read and checked now so a
    /// bad file stops start-up with its name.
    pub fn tls(&self) -> Result<Option<crate::server::Tls>, String> {
        #[cfg(feature = "tls")]
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            return crate::server::Tls::from_pem_files(cert, key).map(Some);
        }
        Ok(None)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_body_bytes: self.max_body_bytes as usize,
            max_inputs: self.max_inputs as usize,
            truncate: self.truncate,
            request_timeout: Duration::from_secs(self.request_timeout_secs),
            max_connections: self.max_connections as usize,
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
        }
    }

    pub fn rate_limiter(&self) -> Result<Option<RateLimiter>, String> {
        let rps = self.rate_limit_rps;
        if !rps.is_finite() || rps < 0.0 {
            return Err(format!("--rate-limit-rps must be 0 or more, not {rps}"));
        }
        if rps == 0.0 {
            return Ok(None);
        }
        let burst = match self.rate_limit_burst {
            0 => rps.ceil() as u32,
            b => b,
        };
        Ok(Some(RateLimiter::new(rps, burst)))
    }

    /// The keys of `--api-key` and `--api-key-file` together, and the admin key.
    pub fn access_policy(&self) -> Result<AccessPolicy, String> {
        let mut keys: Vec<Secret> = self.api_key.iter().cloned().collect();
        if let Some(file) = &self.api_key_file {
            keys.extend(AccessPolicy::read_key_file(file)?);
        }
        Ok(AccessPolicy::new(
            &keys,
            self.admin_key.as_ref(),
            self.open_health,
            self.open_metrics,
        ))
    }
}

/// `ember edge`: the server settings of `ember serve`, plus where and how to forward.
#[cfg(feature = "edge")]
#[derive(Debug, Clone, clap::Args)]
pub struct EdgeArgs {
    #[command(flatten)]
    pub server: ServeArgs,

    /// The cloud tier's base URL (http://host:port or https://host:port), e.g. its Kubernetes
    /// Service.
    #[arg(long, env = "EMBER_UPSTREAM")]
    pub upstream: url_arg::UpstreamUrl,

    /// PEM CA certificates that an `https://` upstream's certificate must chain to, instead of
    /// the system's roots (for a private CA).
    #[cfg(feature = "tls")]
    #[arg(long, env = "EMBER_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,

    /// Bearer credential the edge presents to the upstream (the client's is never passed on).
    #[arg(long, env = "EMBER_UPSTREAM_API_KEY", hide_env_values = true)]
    pub upstream_api_key: Option<Secret>,

    /// Size budget for local models: an edge-tier model whose weights are larger is forwarded.
    #[arg(long, env = "EMBER_EDGE_MAX_MODEL_MB")]
    pub edge_max_model_mb: Option<u64>,

    /// Time to open a TCP connection to the upstream.
    #[arg(long, env = "EMBER_UPSTREAM_CONNECT_TIMEOUT_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub upstream_connect_timeout_ms: u64,

    /// Time from sending a request to the upstream's response headers. Non-streaming generation
    /// answers only when done, so this bounds its whole run.
    #[arg(long, env = "EMBER_UPSTREAM_FIRST_BYTE_TIMEOUT_MS", default_value_t = 120_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub upstream_first_byte_timeout_ms: u64,

    /// Time for a whole forwarded exchange, streamed body included.
    #[arg(long, env = "EMBER_UPSTREAM_TIMEOUT_MS", default_value_t = 600_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub upstream_timeout_ms: u64,

    /// Extra attempts after a connection failure or a 503, while nothing has reached the client
    /// and the circuit is closed.
    #[arg(long, env = "EMBER_UPSTREAM_RETRIES", default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=5))]
    pub upstream_retries: u32,

    /// How often the upstream's readiness (and model list) is probed.
    #[arg(long, env = "EMBER_UPSTREAM_PROBE_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..))]
    pub upstream_probe_interval_ms: u64,

    /// Consecutive forwarding failures that open the circuit.
    #[arg(long, env = "EMBER_CIRCUIT_FAILURE_THRESHOLD", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub circuit_failure_threshold: u32,

    /// How long an open circuit refuses before letting one trial request through.
    #[arg(long, env = "EMBER_CIRCUIT_OPEN_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub circuit_open_ms: u64,

    /// Forward a local model's request upstream when its expected queue wait passes
    /// `--spill-queue-wait-ms` (and the upstream is healthy and serves the model).
    #[arg(long, env = "EMBER_SPILLOVER", default_value_t = true, action = clap::ArgAction::Set)]
    pub spillover: bool,

    /// The expected local queue wait past which requests spill upstream.
    #[arg(long, env = "EMBER_SPILL_QUEUE_WAIT_MS", default_value_t = 100)]
    pub spill_queue_wait_ms: u64,
}

#[cfg(feature = "edge")]
pub mod url_arg {
    use std::fmt;
    use std::str::FromStr;

    /// An `http(s)://host:port[/prefix]` base URL, checked at start-up.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct UpstreamUrl {
        /// `https`: the edge talks TLS to the upstream.
        pub tls: bool,
        /// `host:port`
        pub authority: String,
        /// Path prefix without a trailing slash (empty for none).
        pub prefix: String,
    }

    impl UpstreamUrl {
        pub fn scheme(&self) -> &'static str {
            if self.tls {
                "https"
            } else {
                "http"
            }
        }
    }

    impl FromStr for UpstreamUrl {
        type Err = String;

        fn from_str(s: &str) -> Result<Self, String> {
            let uri: axum::http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
            let tls = match uri.scheme_str() {
                Some("http") => false,
                Some("https") if cfg!(feature = "tls") => true,
                Some("https") => {
                    return Err(format!(
                        "{s:?}: this build has no TLS; build with `--features tls` or use http://"
                    ))
                }
                _ => return Err(format!("{s:?} needs an http:// or https:// scheme")),
            };
            let authority = uri
                .authority()
                .ok_or_else(|| format!("{s:?} has no host"))?
                .to_string();
            if uri.query().is_some() {
                return Err(format!("{s:?}: a base URL takes no query"));
            }
            let prefix = uri.path().trim_end_matches('/').to_string();
            Ok(Self {
                tls,
                authority,
                prefix,
            })
        }
    }

    impl fmt::Display for UpstreamUrl {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{}://{}{}", self.scheme(), self.authority, self.prefix)
        }
    }
}

/// Reads the `--config` file (or `EMBER_CONFIG`) named in `args` and exports each of its keys
/// as the matching `EMBER_*` variable, unless that variable is already set; clap then reads
/// them with the usual precedence. Keys are flag names (`upstream_api_key` or
/// `upstream-api-key`); a key the subcommand does not have is an error naming file and key.
/// Must run before any thread starts (it sets the environment).
pub fn apply_config_file(args: &[std::ffi::OsString]) -> Result<(), String> {
    use clap::CommandFactory;

    let Some(path) = config_path(args) else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))?;
    let cli = Cli::command();
    // The subcommand is the first argument that names one.
    let sub = args
        .iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .find_map(|a| cli.find_subcommand(a))
        .ok_or_else(|| format!("config file {}: no subcommand given", path.display()))?;
    for (key, value) in table {
        let long = key.replace('_', "-");
        let arg = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && a.get_id() != "config")
            .ok_or_else(|| {
                format!(
                    "config file {}: unknown key `{key}` for `ember {}`",
                    path.display(),
                    sub.get_name()
                )
            })?;
        let env = arg
            .get_env()
            .expect("every setting has an EMBER_* variable")
            .to_owned();
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(format!(
                    "config file {}: key `{key}` must be a string, number or boolean, not {}",
                    path.display(),
                    other.type_str()
                ))
            }
        };
        if std::env::var_os(&env).is_none() {
            std::env::set_var(env, value);
        }
    }
    Ok(())
}

fn config_path(args: &[std::ffi::OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os("EMBER_CONFIG").map(PathBuf::from)
}

#[cfg(all(test, feature = "edge"))]
mod tests {
    use super::url_arg::UpstreamUrl;

    #[test]
    fn upstream_urls_are_http_or_https_base_urls() {
        let url: UpstreamUrl = "http://cloud.svc:8080/ember/".parse().unwrap();
        assert_eq!(url.authority, "cloud.svc:8080");
        assert_eq!(url.prefix, "/ember");
        assert_eq!(url.to_string(), "http://cloud.svc:8080/ember");
        let plain: UpstreamUrl = "http://127.0.0.1:9000".parse().unwrap();
        assert_eq!(plain.prefix, "");
        assert!(!plain.tls);
        let secure = "https://cloud:443".parse::<UpstreamUrl>();
        if cfg!(feature = "tls") {
            let secure = secure.unwrap();
            assert!(secure.tls);
            assert_eq!(secure.to_string(), "https://cloud:443");
        } else {
            assert!(secure.unwrap_err().contains("no TLS"));
        }
        for bad in ["cloud:8080", "http://cloud:1/?x=1", "ftp://x"] {
            assert!(bad.parse::<UpstreamUrl>().is_err(), "{bad} was accepted");
        }
    }
}
