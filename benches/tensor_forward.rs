//! `cargo bench --bench tensor_forward`: the demo CNN's forward pass alone (candle-onnx through
//! Ember's engine, as the batcher runs it), per batch size, median of repeated runs, with the
//! share of each ONNX operator when EMBER_BENCH_PROFILE is set. Pins candle to the threads
//! `ember serve` gives one instance (both cores here) unless RAYON_NUM_THREADS is set.

use std::time::Instant;

use ember::batching::BatchEngine;
use ember::engine::tensor::{HostTensor, TensorData};
use ember::repository::TensorOptions;

fn main() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/digits-cnn/model.onnx");
    let (mut engine, _) =
        ember::engine::tensor::onnx::load(&path, &TensorOptions::default()).unwrap();
    let sizes = std::env::var("EMBER_BENCH_BATCHES").unwrap_or_else(|_| "1,8,32".into());
    println!("{:>6} {:>10} {:>10}", "batch", "median ms", "images/s");
    for n in sizes.split(',').map(|s| s.parse::<usize>().unwrap()) {
        let pixels: Vec<f32> = (0..n * 784).map(|i| (i % 97) as f32 / 97.0).collect();
        let image = HostTensor::new(vec![n, 28, 28, 1], TensorData::F32(pixels)).unwrap();
        let mut times = Vec::new();
        for _ in 0..(200 / n).max(10) {
            let t = Instant::now();
            engine.run(vec![vec![image.clone()]]).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!("{n:>6} {median:>10.3} {:>10.0}", n as f64 / median * 1000.0);
    }
}
