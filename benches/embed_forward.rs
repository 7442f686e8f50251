//! `cargo bench --bench embed_forward`: the encoder's forward pass alone on the real
//! all-MiniLM-L6-v2, per batch shape (inputs × tokens), median of repeated runs. Pins candle to
//! one thread per instance as `ember serve` does, unless RAYON_NUM_THREADS is set.
//! EMBER_CPU_ISA caps the kernels as `ember serve --cpu-isa` does.

use std::time::Instant;

use candle_core::Device;
use ember::repository::{EmbedOptions, Precision};

// As `ember serve` runs: per-batch tensors are reused rather than handed back to the OS.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    ember::engine::cpu::set_cap_from_env().unwrap();
    println!("CPU kernels: {}", ember::engine::cpu::widest());
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2/weights");
    assert!(
        dir.join("model.safetensors").is_file(),
        "run models/fetch.sh first"
    );
    // EMBER_BENCH_PRECISION=f32|bf16|auto, as `precision` in model.toml.
    let precision = std::env::var("EMBER_BENCH_PRECISION").unwrap_or_else(|_| "auto".into());
    let precision: Precision = serde_json::from_value(serde_json::Value::String(precision))
        .expect("EMBER_BENCH_PRECISION is f32, bf16 or auto");
    let options = EmbedOptions {
        precision,
        ..EmbedOptions::default()
    };
    let (mut embedder, _) = ember::engine::embed::load(&dir, &options, &Device::Cpu).unwrap();
    println!("precision {:?}", embedder.info().precision);
    let shapes = std::env::var("EMBER_BENCH_SHAPES")
        .unwrap_or_else(|_| "1x12,16x12,32x12,16x60,4x256".into());
    println!(
        "{:>10} {:>10} {:>12} {:>12}",
        "shape", "median ms", "inputs/s", "tokens/s"
    );
    for shape in shapes.split(',') {
        let (n, len) = shape.split_once('x').expect("shapes look like 16x12");
        let (n, len): (usize, usize) = (n.parse().unwrap(), len.parse().unwrap());
        let batch: Vec<Vec<u32>> = (0..n)
            .map(|i| {
                (0..len)
                    .map(|j| 1000 + ((i * 31 + j * 7) % 20000) as u32)
                    .collect()
            })
            .collect();
        for _ in 0..3 {
            embedder.embed(&batch).unwrap();
        }
        let runs = (200 / n.max(1)).clamp(10, 100);
        let mut times: Vec<f64> = (0..runs)
            .map(|_| {
                let t = Instant::now();
                embedder.embed(&batch).unwrap();
                t.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "{:>10} {:>10.2} {:>12.1} {:>12.0}",
            shape,
            median * 1000.0,
            n as f64 / median,
            (n * len) as f64 / median
        );
    }
}
