//! `cargo bench --bench generate_step`: the GGUF decoder alone on the real SmolLM2-135M-Instruct:
//! prefill speed for one prompt, and one batched decode step for 1–16 running sequences (each
//! with a 64-token context), medians of repeated runs. RAYON_NUM_THREADS picks the threads
//! (default: all cores, as `ember serve` gives a generation-only repository);
//! EMBER_BENCH_NUMERICS the model's `numerics` (`llama.cpp`, the default, or `fast`);
//! EMBER_BENCH_STEPS the decode steps timed per count (default 40); EMBER_CPU_ISA caps the
//! kernels as `ember serve --cpu-isa` does.

use std::time::Instant;

use candle_core::Device;
use ember::engine::generate::{self, Chunk};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // As `ember serve` does; unset, candle re-reads /proc/cpuinfo on every op.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
    }
    ember::engine::cpu::set_cap_from_env().unwrap();
    println!("CPU kernels: {}", ember::engine::cpu::widest());
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/SmolLM2-135M-Instruct/weights/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(file.is_file(), "run models/fetch.sh first");
    let numerics = match std::env::var("EMBER_BENCH_NUMERICS").as_deref() {
        Ok("fast") => generate::Numerics::Fast,
        Ok("llama.cpp") | Err(_) => generate::Numerics::LlamaCpp,
        Ok(other) => panic!("EMBER_BENCH_NUMERICS is llama.cpp or fast, not {other}"),
    };
    println!("numerics: {numerics:?}");
    let g = generate::load(&file, &Device::Cpu, numerics).unwrap();
    let model = &g.model;
    let prompt: Vec<u32> = (0..256).map(|i| 1000 + (i * 37) % 20000).collect();
    let times: Vec<f64> = (0..5)
        .map(|_| {
            let mut cache = model.new_cache(prompt.len()).unwrap();
            let t = Instant::now();
            model
                .forward(&mut [Chunk {
                    tokens: &prompt,
                    cache: &mut cache,
                    logits: true,
                }])
                .unwrap();
            t.elapsed().as_secs_f64()
        })
        .collect();
    let prefill = median(times);
    println!(
        "prefill 256 tokens: {:.1} ms, {:.0} tokens/s",
        prefill * 1000.0,
        256.0 / prefill
    );
    println!(
        "{:>9} {:>10} {:>14} {:>16}",
        "sequences", "step ms", "tokens/s", "ms per sequence"
    );
    let counts: Vec<usize> = std::env::var("EMBER_BENCH_SEQUENCES")
        .unwrap_or_else(|_| "1,2,4,8,16".into())
        .split(',')
        .map(|n| n.parse().expect("EMBER_BENCH_SEQUENCES is a list like 1,8"))
        .collect();
    // More steps make a profile of the decode step that the prefills above do not swamp.
    let steps: usize = std::env::var("EMBER_BENCH_STEPS").map_or(40, |s| {
        s.parse()
            .expect("EMBER_BENCH_STEPS is a number of decode steps")
    });
    for n in counts {
        let mut caches: Vec<_> = (0..n)
            .map(|i| {
                let mut c = model.new_cache(64 + steps).unwrap();
                let p: Vec<u32> = prompt[i..i + 64].to_vec();
                model
                    .forward(&mut [Chunk {
                        tokens: &p,
                        cache: &mut c,
                        logits: false,
                    }])
                    .unwrap();
                c
            })
            .collect();
        let tokens: Vec<u32> = (0..n as u32).map(|i| 500 + i).collect();
        let times: Vec<f64> = (0..steps)
            .map(|_| {
                let mut chunks: Vec<Chunk> = caches
                    .iter_mut()
                    .zip(&tokens)
                    .map(|(c, t)| Chunk {
                        tokens: std::slice::from_ref(t),
                        cache: c,
                        logits: true,
                    })
                    .collect();
                let t = Instant::now();
                model.forward(&mut chunks).unwrap();
                t.elapsed().as_secs_f64()
            })
            .collect();
        let step = median(times);
        println!(
            "{:>9} {:>10.2} {:>14.1} {:>16.2}",
            n,
            step * 1000.0,
            n as f64 / step,
            step * 1000.0 / n as f64
        );
    }
}
