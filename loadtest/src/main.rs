//! ember-loadtest: bounded closed-loop load on Ember's HTTP API.
//!
//! `ember-loadtest run --scenario FILE --url URL --out DIR` runs a scenario file
//! (`loadtest/scenarios/*.toml`: embeddings, streamed chat or a weighted mix, at several
//! concurrency levels, each bounded in time and request count), prints a summary table and writes
//! `<DIR>/<scenario>.json` and `<DIR>/<scenario>.png` (latency percentiles vs throughput).
//!
//! Without a subcommand it is the benchmark driver of the `bench_*.sh` scripts: `POST
//! /v1/embeddings` at fixed concurrency levels (throughput and latency percentiles, plus one
//! JSON line), or `--compare` for the latency of several targets taken in turn.
//!
//! Texts are generated to an exact token count with the model's own tokenizer, like the peer
//! client in shared/bench, so both measure the same work. Loopback targets only, unless `run`
//! is given `--allow-remote`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use ember_loadtest::runner::{run_scenario, Target};
use ember_loadtest::scenario::Scenario;
use ember_loadtest::{check_loopback, load_tokenizer, quantile, report, texts};
use serde::Serialize;

#[derive(Parser)]
#[command(
    about = "Bounded closed-loop load on Ember: scenario runs (`run`) or the embeddings benchmark",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: Args,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario file; print a summary table, write <out>/<scenario>.json and .png.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Scenario file, e.g. loadtest/scenarios/embeddings-short.toml.
    #[arg(long, env = "EMBER_LOADTEST_SCENARIO")]
    scenario: std::path::PathBuf,
    /// Server base URL, e.g. http://127.0.0.1:8080 (loopback unless --allow-remote).
    #[arg(long, env = "EMBER_LOADTEST_URL")]
    url: String,
    /// Folder for <scenario>.json and <scenario>.png (created if missing).
    #[arg(long, env = "EMBER_LOADTEST_OUT", default_value = "target/loadtest")]
    out: std::path::PathBuf,
    /// Bearer key for a server with API keys (prefer the environment: a command line is visible
    /// to other local users).
    #[arg(long, env = "EMBER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Allow a URL that is not this machine's loopback (a Service from inside its cluster).
    /// Load only servers you run.
    #[arg(long, env = "EMBER_LOADTEST_ALLOW_REMOTE")]
    allow_remote: bool,
    /// PEM CA certificate(s) an https:// server must chain to (needed for https:// URLs).
    #[arg(long, env = "EMBER_LOADTEST_CA_CERT")]
    ca_cert: Option<std::path::PathBuf>,
    /// Override the scenario's concurrency levels (e.g. 1,4 for a quick run).
    #[arg(long, value_delimiter = ',', env = "EMBER_LOADTEST_CONCURRENCY")]
    concurrency: Option<Vec<usize>>,
    /// Override the scenario's seconds per level.
    #[arg(long, env = "EMBER_LOADTEST_SECONDS_PER_LEVEL")]
    seconds_per_level: Option<f64>,
    /// Override the scenario's most requests per level.
    #[arg(long, env = "EMBER_LOADTEST_MAX_REQUESTS_PER_LEVEL")]
    max_requests_per_level: Option<usize>,
}

#[derive(clap::Args)]
struct Args {
    /// Server base URL (loopback only), e.g. http://127.0.0.1:8080
    #[arg(long, default_value = "", required_unless_present = "compare")]
    url: String,
    #[arg(long, default_value = "all-MiniLM-L6-v2")]
    model: String,
    /// tokenizer.json used to make texts of exactly --tokens tokens ([CLS]/[SEP] included).
    #[arg(long, required = true)]
    tokenizer: Option<std::path::PathBuf>,
    /// Tokens per text (12 = short, 60 = medium).
    #[arg(long, default_value_t = 12)]
    tokens: usize,
    /// Concurrency levels, run one after the other.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,
    /// Seconds per level.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Most requests per level.
    #[arg(long, default_value_t = 200_000)]
    max_requests: usize,
    /// Label printed with the results (e.g. "batching" or "batch=1").
    #[arg(long, default_value = "")]
    label: String,
    /// Latency comparison instead of load: `label=url,label=url,...`, one request at a time,
    /// taking the targets in turn (so drift in the machine's speed hits all alike); prints each
    /// target's p50/p99 and what it adds over the first. `--url` is ignored; `--max-requests`
    /// counts per target.
    #[arg(long, value_delimiter = ',')]
    compare: Vec<String>,
}

#[derive(Serialize)]
struct Level {
    label: String,
    tokens: usize,
    concurrency: usize,
    requests: usize,
    errors: usize,
    seconds: f64,
    per_s: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
}

async fn run_level(args: &Args, texts: Arc<Vec<String>>, concurrency: usize) -> Level {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .expect("client");
    let url = format!("{}/v1/embeddings", args.url.trim_end_matches('/'));
    let stop = Instant::now() + Duration::from_secs_f64(args.secs);
    let budget = Arc::new(std::sync::atomic::AtomicUsize::new(args.max_requests));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (client, url, texts, budget) =
            (client.clone(), url.clone(), texts.clone(), budget.clone());
        let model = args.model.clone();
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut errors, mut i) = (Vec::new(), 0usize, worker);
            while Instant::now() < stop
                && budget
                    .fetch_update(
                        std::sync::atomic::Ordering::SeqCst,
                        std::sync::atomic::Ordering::SeqCst,
                        |b| b.checked_sub(1),
                    )
                    .is_ok()
            {
                let body = serde_json::json!({"model": model, "input": texts[i % texts.len()]});
                let t = Instant::now();
                let ok = match client
                    .post(&url)
                    .json(&body)
                    .timeout(Duration::from_secs(60))
                    .send()
                    .await
                {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                } else {
                    errors += 1;
                }
                i += concurrency;
            }
            (latencies, errors)
        }));
    }
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.expect("worker");
        latencies.extend(l);
        errors += e;
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let q = |p: f64| quantile(&latencies, p);
    Level {
        label: args.label.clone(),
        tokens: args.tokens,
        concurrency,
        requests: latencies.len(),
        errors,
        seconds,
        per_s: latencies.len() as f64 / seconds,
        p50_ms: q(0.50),
        p95_ms: q(0.95),
        p99_ms: q(0.99),
    }
}

/// The `--compare` mode: interleaved single requests, one keep-alive client per target.
async fn compare(args: &Args, texts: &[String]) -> anyhow::Result<()> {
    let targets: Vec<(String, String)> = args
        .compare
        .iter()
        .map(|t| {
            let (label, url) = t
                .split_once('=')
                .with_context(|| format!("--compare takes label=url, not {t:?}"))?;
            check_loopback(url)?;
            Ok((
                label.to_string(),
                format!("{}/v1/embeddings", url.trim_end_matches('/')),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let clients: Vec<reqwest::Client> = targets
        .iter()
        .map(|_| reqwest::Client::builder().pool_max_idle_per_host(1).build())
        .collect::<Result<_, _>>()?;
    let mut latencies = vec![Vec::new(); targets.len()];
    let stop = Instant::now() + Duration::from_secs_f64(args.secs);
    // A few unmeasured rounds open the connections and warm every path.
    for i in 0..args.max_requests + 20 {
        if Instant::now() >= stop {
            break;
        }
        for (k, ((_, url), client)) in targets.iter().zip(&clients).enumerate() {
            let body = serde_json::json!({"model": args.model, "input": texts[i % texts.len()]});
            let t = Instant::now();
            let r = client.post(url).json(&body).send().await?;
            let ok = r.status().is_success();
            r.bytes().await?;
            if !ok {
                bail!("{url} answered an error");
            }
            if i >= 20 {
                latencies[k].push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
    println!(
        "{:<10} {:>6} {:>9} {:>9} {:>9} {:>13} {:>13}",
        "target", "tokens", "requests", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms"
    );
    for l in &mut latencies {
        l.sort_by(f64::total_cmp);
    }
    let (base50, base99) = (quantile(&latencies[0], 0.5), quantile(&latencies[0], 0.99));
    for ((label, _), l) in targets.iter().zip(&latencies) {
        let (p50, p99) = (quantile(l, 0.5), quantile(l, 0.99));
        println!(
            "{label:<10} {:>6} {:>9} {p50:>9.3} {p99:>9.3} {:>13.3} {:>13.3}",
            args.tokens,
            l.len(),
            p50 - base50,
            p99 - base99
        );
    }
    Ok(())
}

/// The `run` subcommand: a scenario file, its table, its JSON and its chart.
async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut scenario = Scenario::load(&args.scenario)?;
    if let Some(c) = args.concurrency {
        scenario.concurrency = c;
    }
    if let Some(s) = args.seconds_per_level {
        scenario.seconds_per_level = s;
    }
    if let Some(m) = args.max_requests_per_level {
        scenario.max_requests_per_level = m;
    }
    scenario
        .validate()
        .with_context(|| format!("{} with the overrides", args.scenario.display()))?;
    let target = Target {
        url: args.url,
        api_key: args.api_key,
        allow_remote: args.allow_remote,
        ca_cert: args.ca_cert,
    };
    println!(
        "== {} ({}): levels {:?}, {} s or {} requests each, against {}",
        scenario.name,
        scenario.description,
        scenario.concurrency,
        scenario.seconds_per_level,
        scenario.max_requests_per_level,
        target.url
    );
    // The header comes with the first row: a run that stops before any level prints no table.
    let mut header = Some(report::table_header());
    let results = run_scenario(&scenario, &target, |level| {
        if let Some(header) = header.take() {
            println!("{header}");
        }
        for row in report::table_rows(level) {
            println!("{row}");
        }
    })
    .await?;
    let (json, png) = report::write(&results, &args.out)?;
    println!("wrote {} and {}", json.display(), png.display());
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Run(run_args)) = cli.command {
        return run(run_args).await;
    }
    let args = cli.args;
    if args.compare.is_empty() {
        check_loopback(&args.url)?;
    }
    let Some(tokenizer) = &args.tokenizer else {
        bail!("--tokenizer is required");
    };
    let tokenizer = load_tokenizer(tokenizer)?;
    let texts = Arc::new(texts(&tokenizer, args.tokens, 512)?);
    if !args.compare.is_empty() {
        return compare(&args, &texts).await;
    }
    println!(
        "{:<12} {:>6} {:>5} {:>9} {:>7} {:>10} {:>9} {:>9} {:>9}",
        "label", "tokens", "conc", "requests", "errors", "sent/s", "p50 ms", "p95 ms", "p99 ms"
    );
    let mut levels = Vec::new();
    for &c in &args.concurrency {
        let level = run_level(&args, texts.clone(), c).await;
        println!(
            "{:<12} {:>6} {:>5} {:>9} {:>7} {:>10.1} {:>9.2} {:>9.2} {:>9.2}",
            level.label,
            level.tokens,
            level.concurrency,
            level.requests,
            level.errors,
            level.per_s,
            level.p50_ms,
            level.p95_ms,
            level.p99_ms
        );
        levels.push(level);
    }
    println!("{}", serde_json::to_string(&levels)?);
    Ok(())
}
