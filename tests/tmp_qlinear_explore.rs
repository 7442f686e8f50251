// Temporary timing harness for the QLinear work; deleted after measuring.
mod common;

use candle_core::Device;
use common::*;
use ember::engine::generate::{self, sampler::argmax, ChatMessage, Chunk};

#[test]
fn explore() {
    let g = generate::load(&smollm_gguf(), &Device::Cpu).unwrap();
    let prompt = g
        .template
        .as_ref()
        .unwrap()
        .render(&[ChatMessage {
            role: "user".into(),
            content: "What is the capital of France?".into(),
        }])
        .unwrap();
    let ids = g.tokenizer.encode(&prompt).unwrap();
    eprintln!("{} prompt tokens", ids.len());
    for rep in 0..8 {
        let mut cache = g.model.new_cache(ids.len() + 24).unwrap();
        let t = std::time::Instant::now();
        let mut logits = g
            .model
            .forward(&mut [Chunk {
                tokens: &ids,
                cache: &mut cache,
                logits: true,
            }])
            .unwrap();
        let prefill = t.elapsed();
        let mut out = Vec::new();
        let t = std::time::Instant::now();
        for _ in 0..24 {
            let next = argmax(&logits[0]);
            out.push(next);
            logits = g
                .model
                .forward(&mut [Chunk {
                    tokens: &[next],
                    cache: &mut cache,
                    logits: true,
                }])
                .unwrap();
        }
        eprintln!("rep {rep}: prefill {prefill:?} decode 24 {:?}", t.elapsed());
        if rep == 0 {
            let bytes: Vec<u8> = out
                .iter()
                .flat_map(|&t| g.tokenizer.piece(t).to_vec())
                .collect();
            eprintln!("{out:?} {:?}", String::from_utf8_lossy(&bytes));
        }
    }
}
