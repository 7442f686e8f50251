// Temporary micro-benchmark for the QLinear work; deleted after measuring.
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use ember::engine::generate::qlinear::QLinear;

#[test]
fn bench() {
    // memory bandwidth baseline
    let big = vec![1u64; 200 << 17];
    let t = std::time::Instant::now();
    let mut s = 0u64;
    for _ in 0..5 {
        s = s.wrapping_add(big.iter().fold(0u64, |a, &b| a ^ b.wrapping_mul(3)));
    }
    eprintln!(
        "read bw {:.1} GB/s ({s})",
        5.0 * 200.0 * 1.048576 / t.elapsed().as_secs_f64() / 1000.0 * 1000.0 / 1000.0
    );
    for (out, k, dt, copies) in [
        (576, 576, GgmlDType::Q4_1, 30),
        (192, 576, GgmlDType::Q4_1, 30),
        (1536, 576, GgmlDType::Q4_1, 30),
        (1536, 576, GgmlDType::Q4_1, 1),
        (576, 1536, GgmlDType::Q4_1, 30),
        (49152, 576, GgmlDType::Q8_0, 1),
    ] {
        let w = Tensor::randn(0f32, 1.0, (out, k), &Device::Cpu).unwrap();
        let layers: Vec<QLinear> = (0..copies)
            .map(|_| QLinear::new(QTensor::quantize(&w, dt).unwrap()).unwrap())
            .collect();
        for rows in [1usize, 4, 8, 16, 37] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &Device::Cpu).unwrap();
            let iters = (600 / copies).max(1) * copies;
            for l in &layers {
                l.forward(&x).unwrap();
            }
            let t = std::time::Instant::now();
            for i in 0..iters {
                layers[i % copies].forward(&x).unwrap();
            }
            let per = t.elapsed().as_secs_f64() / iters as f64;
            let bytes = out * k / 32 * if dt == GgmlDType::Q4_1 { 20 } else { 34 };
            eprintln!(
                "{dt:?} [{out},{k}] rows {rows}: {:.1} us, {:.1} GB/s, {:.1} GMAC/s",
                per * 1e6,
                bytes as f64 / per / 1e9,
                (rows * out * k) as f64 / per / 1e9
            );
        }
    }
}
