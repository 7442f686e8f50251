//! ember-soak: a bounded soak of a running Ember at about twice its measured capacity.
//!
//! First it measures embeddings capacity (closed loop, 32 clients, `--calibrate-secs`). Then,
//! for `--secs`, it sends at once: embeddings open-loop at `--overload` × that capacity, chat
//! streams from `--chat-clients` closed-loop clients of which a share disconnect mid-stream, and
//! a steady trickle of bad requests that must get 4xx. Every minute it prints the requests by
//! outcome, the p99 latency of accepted embeddings, and the server's RSS; at the end the totals,
//! with lost requests (no HTTP answer at all) and whether the server is still alive. Loopback
//! only.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use ember_loadtest::{check_loopback, load_tokenizer, quantile, texts};
use futures::StreamExt;
use serde_json::json;

#[derive(Parser)]
#[command(about = "Bounded mixed soak of a running Ember")]
struct Args {
    /// Server base URL (loopback only).
    #[arg(long)]
    url: String,
    /// The server's process id, for its resident memory.
    #[arg(long)]
    pid: u32,
    /// tokenizer.json of the embedding model (texts of exact token counts).
    #[arg(long)]
    tokenizer: std::path::PathBuf,
    #[arg(long, default_value = "all-MiniLM-L6-v2")]
    embed_model: String,
    #[arg(long, default_value = "SmolLM2-135M-Instruct")]
    chat_model: String,
    /// Soak length in seconds.
    #[arg(long, default_value_t = 600)]
    secs: u64,
    #[arg(long, default_value_t = 20)]
    calibrate_secs: u64,
    /// Embeddings rate as a multiple of the measured capacity.
    #[arg(long, default_value_t = 2.0)]
    overload: f64,
    #[arg(long, default_value_t = 24)]
    chat_clients: usize,
    /// Share of chat streams dropped by their client after a few events.
    #[arg(long, default_value_t = 0.25)]
    disconnect_share: f64,
    /// Bad requests per second.
    #[arg(long, default_value_t = 5.0)]
    bad_per_s: f64,
    /// Most requests in flight from this tool (bounds its own memory).
    #[arg(long, default_value_t = 2048)]
    max_in_flight: usize,
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Ok,
    /// A bad request refused as it should be (4xx other than 429).
    Refused4xx,
    RateLimited429,
    Busy503,
    Deadline504,
    /// A 5xx other than 503/504: a server error.
    ServerError,
    /// A bad request that was accepted: a validation hole.
    BadAccepted,
    /// A chat stream the client dropped on purpose.
    Disconnected,
    /// No HTTP answer at all (connection refused, reset, timeout): a lost request.
    Lost,
    /// Not sent: this tool's own in-flight bound was full.
    NotSent,
    /// An oversized body the server refused before reading it all: HTTP/1.1 servers that stop
    /// reading at their limit (hyper does) close the connection, so a client still writing sees
    /// a broken pipe instead of the 413. The server is protecting itself, not losing a request.
    OversizeCut,
}

#[derive(Default)]
struct Minute {
    outcomes: BTreeMap<Outcome, u64>,
    embed_ok_ms: Vec<f64>,
}

struct Record {
    started: Instant,
    minutes: Mutex<Vec<Minute>>,
}

impl Record {
    fn add(&self, outcome: Outcome, embed_ms: Option<f64>) {
        let minute = (self.started.elapsed().as_secs() / 60) as usize;
        let mut minutes = self.minutes.lock().unwrap();
        while minutes.len() <= minute {
            minutes.push(Minute::default());
        }
        *minutes[minute].outcomes.entry(outcome).or_default() += 1;
        if let Some(ms) = embed_ms {
            minutes[minute].embed_ok_ms.push(ms);
        }
    }
}

fn classify(status: u16) -> Outcome {
    match status {
        200..=299 => Outcome::Ok,
        429 => Outcome::RateLimited429,
        503 => Outcome::Busy503,
        504 => Outcome::Deadline504,
        400..=499 => Outcome::Refused4xx,
        _ => Outcome::ServerError,
    }
}

/// Prints the first few lost requests of each kind, so a loss can be told apart from a
/// client-side limit.
fn report_lost(kind: &str, error: &dyn std::fmt::Debug) {
    static SHOWN: AtomicUsize = AtomicUsize::new(0);
    if SHOWN.fetch_add(1, Ordering::Relaxed) < 6 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        eprintln!("lost {kind} request at {:.3}: {error:?}", now.as_secs_f64());
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

async fn embed(client: &reqwest::Client, url: &str, model: &str, text: &str) -> (Outcome, f64) {
    let t = Instant::now();
    let r = client
        .post(format!("{url}/v1/embeddings"))
        .json(&json!({"model": model, "input": text}))
        .timeout(Duration::from_secs(120))
        .send()
        .await;
    let outcome = match r {
        Ok(r) => {
            let status = r.status().as_u16();
            match r.bytes().await {
                Ok(_) => classify(status),
                Err(_) => Outcome::Lost,
            }
        }
        Err(e) => {
            report_lost("embeddings", &e);
            Outcome::Lost
        }
    };
    (outcome, t.elapsed().as_secs_f64() * 1000.0)
}

async fn chat(client: &reqwest::Client, args: &Args, i: usize, drop_early: bool) -> Outcome {
    let body = json!({"model": args.chat_model, "stream": true, "max_tokens": 64,
        "messages": [{"role": "user", "content": format!("Soak {i}: say something about the sea.")}]});
    let r = client
        .post(format!("{}/v1/chat/completions", args.url))
        .json(&body)
        .timeout(Duration::from_secs(300))
        .send()
        .await;
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            report_lost("chat", &e);
            return Outcome::Lost;
        }
    };
    let status = r.status().as_u16();
    if status != 200 {
        return match r.bytes().await {
            Ok(_) => classify(status),
            Err(_) => Outcome::Lost,
        };
    }
    let mut stream = r.bytes_stream();
    let mut events = 0;
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                report_lost("chat stream", &e);
                return Outcome::Lost;
            }
        };
        text.push_str(&String::from_utf8_lossy(&chunk));
        events += chunk.iter().filter(|&&b| b == b'\n').count() / 2;
        if drop_early && events >= 3 {
            return Outcome::Disconnected;
        }
    }
    if text.trim_end().ends_with("data: [DONE]") && !text.contains("\"error\"") {
        Outcome::Ok
    } else {
        Outcome::ServerError
    }
}

/// Requests the server must refuse with a 4xx, in turn.
async fn bad(client: &reqwest::Client, args: &Args, i: usize) -> Outcome {
    let url = &args.url;
    let r = match i % 6 {
        0 => client
            .post(format!("{url}/v1/embeddings"))
            .header("content-type", "application/json")
            .body("{\"model\": \"x\", \"input\": ")
            .send(),
        1 => client
            .post(format!("{url}/v1/embeddings"))
            .json(&json!({"model": "no-such-model", "input": "x"}))
            .send(),
        2 => client
            .post(format!("{url}/v1/embeddings"))
            .json(&json!({"model": args.embed_model, "input": [1.5, {"a": 1}]}))
            .send(),
        3 => client
            .post(format!("{url}/v1/chat/completions"))
            .json(&json!({"model": args.chat_model, "messages": [], "max_tokens": -3}))
            .send(),
        4 => client
            .post(format!("{url}/v1/embeddings"))
            .header("content-type", "application/json")
            .body(vec![b'['; 3 * 1024 * 1024])
            .send(),
        _ => client
            .post(format!("{url}/v2/models/{}/infer", args.embed_model))
            .json(&json!({"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1]}]}))
            .send(),
    };
    match r.await {
        Ok(r) => {
            let status = r.status().as_u16();
            if r.bytes().await.is_err() {
                return Outcome::Lost;
            }
            match classify(status) {
                Outcome::Ok => Outcome::BadAccepted,
                other => other,
            }
        }
        Err(_) if i % 6 == 4 => Outcome::OversizeCut,
        Err(e) => {
            report_lost(&format!("bad #{}", i % 6), &e);
            Outcome::Lost
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    check_loopback(&args.url)?;
    let tokenizer = load_tokenizer(&args.tokenizer)?;
    let mut pool = texts(&tokenizer, 12, 256)?;
    pool.extend(texts(&tokenizer, 60, 256)?);
    let pool = Arc::new(pool);
    // Idle connections are dropped before the server's idle timeout (60 s by default), so none
    // is reused just as the server closes it (a race no server can prevent, which would count
    // as a lost request).
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .pool_idle_timeout(Duration::from_secs(20))
        .build()?;
    let rss_start = rss_kib(args.pid).context("cannot read the server's RSS (--pid)")?;

    // Capacity: closed loop, 32 clients.
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Instant::now() + Duration::from_secs(args.calibrate_secs);
    let workers: Vec<_> = (0..32)
        .map(|w| {
            let (client, args, pool, done) =
                (client.clone(), args.clone(), pool.clone(), done.clone());
            tokio::spawn(async move {
                let mut i = w;
                while Instant::now() < stop {
                    let (o, _) =
                        embed(&client, &args.url, &args.embed_model, &pool[i % pool.len()]).await;
                    if o == Outcome::Ok {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 32;
                }
            })
        })
        .collect();
    for w in workers {
        w.await?;
    }
    let capacity = done.load(Ordering::Relaxed) as f64 / args.calibrate_secs as f64;
    let rate = capacity * args.overload;
    println!(
        "capacity {capacity:.0} embeddings/s; soaking {} s at {rate:.0}/s embeddings, {} chat \
         clients ({}% disconnect), {}/s bad requests; server RSS at start {} MiB",
        args.secs,
        args.chat_clients,
        (args.disconnect_share * 100.0).round(),
        args.bad_per_s,
        rss_start / 1024
    );

    let record = Arc::new(Record {
        started: Instant::now(),
        minutes: Mutex::new(Vec::new()),
    });
    let end = Instant::now() + Duration::from_secs(args.secs);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(args.max_in_flight));
    let mut tasks = Vec::new();

    // Embeddings, open loop at `rate`.
    tasks.push(tokio::spawn({
        let (client, args, pool, record, in_flight) = (
            client.clone(),
            args.clone(),
            pool.clone(),
            record.clone(),
            in_flight.clone(),
        );
        async move {
            let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            let mut i = 0usize;
            while Instant::now() < end {
                ticks.tick().await;
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    record.add(Outcome::NotSent, None);
                    continue;
                };
                let (client, args, pool, record) =
                    (client.clone(), args.clone(), pool.clone(), record.clone());
                tokio::spawn(async move {
                    let (o, ms) =
                        embed(&client, &args.url, &args.embed_model, &pool[i % pool.len()]).await;
                    record.add(o, (o == Outcome::Ok).then_some(ms));
                    drop(permit);
                });
                i += 1;
            }
        }
    }));
    // Chat streams, closed loop.
    for c in 0..args.chat_clients {
        let (client, args, record) = (client.clone(), args.clone(), record.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            while Instant::now() < end {
                let drop_early = (i as f64 * 0.618_034).fract() < args.disconnect_share;
                let o = chat(&client, &args, i, drop_early).await;
                record.add(o, None);
                // A well-behaved client waits as Retry-After says (Ember sends 1 s).
                if matches!(o, Outcome::Busy503 | Outcome::RateLimited429) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                i += args.chat_clients;
            }
        }));
    }
    // Bad requests.
    tasks.push(tokio::spawn({
        let (client, args, record) = (client.clone(), args.clone(), record.clone());
        async move {
            let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / args.bad_per_s));
            let mut i = 0;
            while Instant::now() < end {
                ticks.tick().await;
                let o = bad(&client, &args, i).await;
                record.add(o, None);
                i += 1;
            }
        }
    }));
    // Once a minute: the server's memory (the first entry: right after calibration, warm).
    let rss = Arc::new(Mutex::new(vec![rss_kib(args.pid).unwrap_or(0)]));
    tasks.push(tokio::spawn({
        let (rss, pid) = (rss.clone(), args.pid);
        async move {
            while Instant::now() < end {
                tokio::time::sleep(Duration::from_secs(60)).await;
                rss.lock().unwrap().push(rss_kib(pid).unwrap_or(0));
            }
        }
    }));
    for t in tasks {
        t.await?;
    }
    // Let the last in-flight requests answer.
    let _ = tokio::time::timeout(
        Duration::from_secs(150),
        in_flight.acquire_many(args.max_in_flight as u32),
    )
    .await;

    let rss_end = rss_kib(args.pid);
    let minutes = record.minutes.lock().unwrap();
    let rss = rss.lock().unwrap();
    println!(
        "{:>6} {:>8} {:>8} {:>6} {:>6} {:>6} {:>6} {:>6} {:>8} {:>6} {:>6} {:>8} {:>11} {:>9}",
        "minute",
        "ok",
        "4xx",
        "429",
        "503",
        "504",
        "5xx",
        "bad-ok",
        "dropped",
        "cut",
        "lost",
        "not-sent",
        "p99 ok ms",
        "RSS MiB"
    );
    let mut totals: BTreeMap<Outcome, u64> = BTreeMap::new();
    for (m, minute) in minutes.iter().enumerate() {
        let n = |o| minute.outcomes.get(&o).copied().unwrap_or(0);
        for (o, c) in &minute.outcomes {
            *totals.entry(*o).or_default() += c;
        }
        let mut ms = minute.embed_ok_ms.clone();
        ms.sort_by(f64::total_cmp);
        println!(
            "{:>6} {:>8} {:>8} {:>6} {:>6} {:>6} {:>6} {:>6} {:>8} {:>6} {:>6} {:>8} {:>11.1} {:>9}",
            m + 1,
            n(Outcome::Ok),
            n(Outcome::Refused4xx),
            n(Outcome::RateLimited429),
            n(Outcome::Busy503),
            n(Outcome::Deadline504),
            n(Outcome::ServerError),
            n(Outcome::BadAccepted),
            n(Outcome::Disconnected),
            n(Outcome::OversizeCut),
            n(Outcome::Lost),
            n(Outcome::NotSent),
            quantile(&ms, 0.99),
            rss.get(m + 1).copied().unwrap_or(0) / 1024
        );
    }
    let alive = rss_end.is_some();
    // Growth is counted from the end of the first soak minute: by then the server holds what a
    // steady overload needs (connections, buffers, KV caches); growth after that is a leak.
    let steady = rss.get(1).copied().unwrap_or(rss[0]).max(1);
    let growth = rss_end.map(|e| (e as f64 / steady as f64 - 1.0) * 100.0);
    println!("totals: {totals:?}");
    println!(
        "server alive at the end: {alive}; RSS idle before {} MiB, after calibration {} MiB, \
         after the first soak minute {} MiB, at the end {} MiB ({:+.1}% since the first minute)",
        rss_start / 1024,
        rss[0] / 1024,
        steady / 1024,
        rss_end.unwrap_or(0) / 1024,
        growth.unwrap_or(f64::NAN)
    );
    let lost = totals.get(&Outcome::Lost).copied().unwrap_or(0);
    let server_errors = totals.get(&Outcome::ServerError).copied().unwrap_or(0);
    let holes = totals.get(&Outcome::BadAccepted).copied().unwrap_or(0);
    println!(
        "lost requests: {lost}; server errors: {server_errors}; bad requests accepted: {holes}"
    );
    if !alive || lost > 0 || server_errors > 0 || holes > 0 {
        anyhow::bail!("the soak found problems (see above)");
    }
    Ok(())
}
