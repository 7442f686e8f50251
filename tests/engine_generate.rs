//! The GGUF decoder alone, on the real SmolLM2-135M-Instruct, against llama.cpp's own outputs
//! for the same file (fixtures made by tests/reference/make_llm_fixtures.py).

mod common;

use candle_core::Device;
use common::*;
use ember::engine::generate::{self, sampler::argmax, ChatMessage, Chunk, Generator};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = repo_root().join("tests/fixtures").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn greedy(g: &Generator, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = g.model.new_cache(prompt.len() + n).unwrap();
    let mut out = Vec::new();
    let mut logits = g
        .model
        .forward(&mut [Chunk {
            tokens: prompt,
            cache: &mut cache,
            logits: true,
        }])
        .unwrap();
    while out.len() < n {
        let next = argmax(&logits[0]);
        out.push(next);
        if g.tokenizer.is_end_of_generation(next) {
            break;
        }
        logits = g
            .model
            .forward(&mut [Chunk {
                tokens: &[next],
                cache: &mut cache,
                logits: true,
            }])
            .unwrap();
    }
    out
}

#[test]
fn tokenisation_equals_llama_cpp() {
    let g = generate::load(&smollm_gguf(), &Device::Cpu).unwrap();
    let cases = fixture("smollm2_tokens.json");
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            g.tokenizer.encode(text).unwrap(),
            ids(&case["ids"]),
            "{text:?}"
        );
    }
}

#[test]
fn greedy_chat_equals_llama_cpp() {
    let g = generate::load(&smollm_gguf(), &Device::Cpu).unwrap();
    let f = fixture("smollm2_greedy.json");
    let template = g.template.as_ref().unwrap();
    let mut mismatches = Vec::new();
    let chats = f["chat"].as_array().unwrap();
    for case in chats {
        let messages: Vec<ChatMessage> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage {
                role: m["role"].as_str().unwrap().into(),
                content: m["content"].as_str().unwrap().into(),
            })
            .collect();
        let prompt = template.render(&messages).unwrap();
        assert_eq!(prompt, case["prompt"].as_str().unwrap());
        let prompt_ids = g.tokenizer.encode(&prompt).unwrap();
        assert_eq!(prompt_ids, ids(&case["prompt_ids"]));
        let want = ids(&case["greedy_ids"]);
        let got = greedy(&g, &prompt_ids, want.len());
        if got != want {
            let at = got.iter().zip(&want).position(|(a, b)| a != b);
            mismatches.push(format!(
                "{:?}: first difference at {at:?}",
                case["messages"]
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {}:\n{}",
        mismatches.len(),
        chats.len(),
        mismatches.join("\n")
    );
}
