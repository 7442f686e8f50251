//! The `ember` binary: parses the command line and runs a tier.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use ember::config::{Cli, Command, LogFormat, ServeArgs};
use ember::engine::cpu::{self, Isa};
use ember::metrics::Metrics;
use ember::registry::{self, ModelRegistry};
use ember::repository::ModelSpec;
use ember::repository::RepositoryError;
use ember::server::auth::AccessPolicy;
use ember::server::rate_limit::RateLimiter;
use ember::server::{self, AppState, Health};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Err(e) = ember::config::apply_config_file(&argv) {
        eprintln!("ember: {e}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse_from(argv);
    let args = cli.command.server().clone();
    init_logging(args.log_format);
    let (access, rate_limiter, tls) = match (args.access_policy(), args.rate_limiter(), args.tls())
    {
        (Ok(access), Ok(limiter), Ok(tls)) => (access, limiter, tls),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if access.is_open() {
        tracing::warn!(target: "ember::access", "{}", access.describe());
    } else {
        tracing::info!(target: "ember::access", "{}", access.describe());
    }
    let specs = match models_to_load(&cli.command) {
        Ok(specs) => specs,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    set_compute_threads(&args, &specs);
    if let Some(isa) = args.cpu_isa {
        if let Err(e) = cpu::set_cap(isa) {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ember: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let guards = Guards {
        access,
        rate_limiter,
        tls,
    };
    match runtime.block_on(run(cli.command, specs, guards)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The repository's models this tier loads: all of them in the cloud; at the edge, its own
/// (an edge may have none and only forward).
fn models_to_load(command: &Command) -> Result<Vec<ModelSpec>, RepositoryError> {
    let scanned = ember::repository::scan(&command.server().models);
    match command {
        Command::Serve(_) => scanned,
        #[cfg(feature = "edge")]
        Command::Edge(edge) => {
            let specs = match scanned {
                Err(RepositoryError::Empty(_)) => Vec::new(),
                other => other?,
            };
            Ok(ember::edge::local_specs(specs, edge.edge_max_model_mb))
        }
    }
}

/// candle splits each op over this many threads. Instances of a model already run side by side,
/// so by default each gets an equal share of the cores; splitting a small op further costs more
/// in synchronisation than it saves. Must run before any thread is started (it sets the
/// environment, which candle reads).
fn set_compute_threads(args: &ServeArgs, specs: &[ModelSpec]) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = match args.compute_threads {
        0 => {
            // The largest instance count decides.
            let instances = specs
                .iter()
                .map(|s| s.batching.instances)
                .max()
                .unwrap_or(1);
            (cores / instances).max(1)
        }
        n => n,
    };
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    tracing::info!(threads, cores, "compute threads per model instance");
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("EMBER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Who may call, how often, and over what.
struct Guards {
    access: AccessPolicy,
    rate_limiter: Option<RateLimiter>,
    tls: Option<server::Tls>,
}

async fn run(command: Command, specs: Vec<ModelSpec>, guards: Guards) -> anyhow::Result<()> {
    let started = Instant::now();
    let args = command.server();
    let device = args.device.open()?;
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.addr))?;
    let addr = listener.local_addr()?;
    // Tests and scripts read the bound port from this line (logs go to stderr).
    let scheme = if guards.tls.is_some() {
        "https"
    } else {
        "http"
    };
    println!("ember: listening on {scheme}://{addr}");
    std::io::stdout().flush()?;
    tracing::info!(%addr, scheme, device = %args.device, models = specs.len(), "listening; loading models");

    let state = AppState {
        access: Arc::new(guards.access),
        limits: args.limits(),
        rate_limiter: guards.rate_limiter.map(Arc::new),
        registry: Arc::new(ModelRegistry::default()),
        metrics: Arc::new(Metrics::new()),
        health: Arc::new(Health::default()),
    };
    let (isa, cap) = (cpu::widest().name(), args.cpu_isa.map_or("none", Isa::name));
    tracing::info!(isa, cap, "CPU kernels");
    state.metrics.set_cpu_kernels(isa, cap);
    let app = match &command {
        Command::Serve(_) => server::router(state.clone()),
        #[cfg(feature = "edge")]
        Command::Edge(edge) => ember::edge::app(edge, &state).map_err(anyhow::Error::msg)?,
    };
    let server = tokio::spawn(server::serve(
        listener,
        guards.tls,
        app,
        state.clone(),
        server::shutdown_signal(),
        args.shutdown_grace(),
    ));

    // Models load side by side (each on the blocking pool): start-up takes the slowest
    // model's time, not the sum.
    let loads = specs.into_iter().map(|spec| {
        let name = spec.name.clone();
        let (device, metrics) = (device.clone(), &state.metrics);
        async move {
            let result = registry::load(spec, device, metrics).await;
            (name, result)
        }
    });
    // A model that fails to load is reported and left out; the others serve. Only a
    // repository where nothing loads stops the server: it would serve nothing.
    let (mut loaded, mut failed) = (0, 0);
    for (name, result) in futures::future::join_all(loads).await {
        match result {
            Ok(model) => {
                state.registry.insert(model);
                loaded += 1;
            }
            Err(e) => {
                tracing::error!(model = %name, "model failed to load, serving the others: {e}");
                state
                    .metrics
                    .model_load_failed
                    .with_label_values(&[&name])
                    .set(1);
                state.registry.insert_failure(&name, e.to_string());
                failed += 1;
            }
        }
    }
    if loaded == 0 && failed > 0 {
        anyhow::bail!("no model could be loaded ({failed} failed; see above)");
    }
    if failed > 0 && args.strict_readiness {
        tracing::warn!(
            failed,
            "not ready: a model failed to load; the others answer requests, readiness stays \
             false (--strict-readiness false reports ready without it)"
        );
    } else {
        state.health.set_loaded();
        state.metrics.ready.set(i64::from(state.health.is_ready()));
        tracing::info!(startup_ms = started.elapsed().as_millis() as u64, "ready");
    }

    server.await??;
    tracing::info!("stopped");
    Ok(())
}
