//! The GGUF decoder alone, on the real SmolLM2-135M-Instruct, against llama.cpp's own outputs
//! for the same file (fixtures made by tests/reference/make_llm_fixtures.py).

mod common;

use candle_core::Device;
use common::*;
use ember::engine::generate::{self, sampler::argmax, ChatMessage, Chunk, Generator, Numerics};
use serde_json::Value;

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
    let g = generate::load(&smollm_gguf(), &Device::Cpu, Numerics::LlamaCpp).unwrap();
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

/// Byte-level BPE loses nothing: any text of assigned characters, once tokenised, decodes to
/// itself (control-token spellings such as `<|im_start|>` are left out: those are meant to
/// become one token). Unassigned code points are left out too: llama.cpp's pre-tokenizer drops
/// their first byte (llama-cpp-python 0.3.36 gives [218, 218, 218], "\x80\x80\x80", for U+40000),
/// and tokenisation must equal llama.cpp's, so ours does the same.
#[test]
fn tokenisation_round_trips_any_text() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let g = generate::load(&smollm_gguf(), &Device::Cpu, Numerics::LlamaCpp).unwrap();
    assert_eq!(g.tokenizer.encode("\u{40000}").unwrap(), [218, 218, 218]);
    let mut runner = TestRunner::new(Config::with_cases(256));
    let text = prop_oneof![
        "\\PC{0,40}",
        "[ a-zA-Z0-9\\n\\t.,!?'\"-]{0,60}",
        "[\\p{Han}\\p{Cyrillic}\\p{Arabic}\\p{Emoji} ]{0,20}",
    ];
    runner
        .run(&text, |text| {
            prop_assume!(!text.contains("<|") && !text.contains("<jupyter"));
            let ids = g.tokenizer.encode(&text).unwrap();
            let bytes: Vec<u8> = ids
                .iter()
                .flat_map(|&id| g.tokenizer.piece(id).to_vec())
                .collect();
            prop_assert_eq!(String::from_utf8_lossy(&bytes), text);
            Ok(())
        })
        .unwrap();
}

/// How our argmax compared with llama.cpp's token, teacher-forced on its greedy path.
#[derive(Default)]
struct Agreement {
    decisive: usize,
    near_ties: usize,
    agreed_near_ties: usize,
    /// Decisive steps where we picked another token.
    disagreements: Vec<String>,
}

/// Teacher-forced on llama.cpp's greedy path (so one difference does not end the comparison),
/// every step of every chat and completion case; templates and prompt tokens must match exactly.
fn teacher_forced(numerics: Numerics) -> Agreement {
    let g = generate::load(&smollm_gguf(), &Device::Cpu, numerics).unwrap();
    let f = fixture("smollm2_greedy.json");
    let template = g.template.as_ref().unwrap();
    let mut seen = Agreement::default();
    let chats = f["chat"].as_array().unwrap();
    let completions = f["completion"].as_array().unwrap();
    assert!(
        chats.len() >= 10,
        "the fixture needs at least 10 chat prompts"
    );
    for case in chats.iter().chain(completions) {
        let prompt = match case.get("messages") {
            Some(messages) => {
                let messages: Vec<ChatMessage> = messages
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| ChatMessage {
                        role: m["role"].as_str().unwrap().into(),
                        content: m["content"].as_str().unwrap().into(),
                    })
                    .collect();
                let rendered = template.render(&messages).unwrap();
                assert_eq!(rendered, case["prompt"].as_str().unwrap());
                rendered
            }
            None => case["prompt"].as_str().unwrap().to_string(),
        };
        let prompt_ids = g.tokenizer.encode(&prompt).unwrap();
        assert_eq!(prompt_ids, ids(&case["prompt_ids"]), "{prompt:?}");
        let want = ids(&case["greedy_ids"]);
        let margins = margins(case);
        let mut cache = g.model.new_cache(prompt_ids.len() + want.len()).unwrap();
        let mut logits = g
            .model
            .forward(&mut [Chunk {
                tokens: &prompt_ids,
                cache: &mut cache,
                logits: true,
            }])
            .unwrap();
        for (step, (&token, &margin)) in want.iter().zip(&margins).enumerate() {
            let ours = argmax(&logits[0]);
            if margin >= DECISIVE_MARGIN {
                seen.decisive += 1;
                if ours != token {
                    seen.disagreements.push(format!(
                        "{prompt:?} step {step}: {ours} vs {token} (margin {margin})"
                    ));
                }
            } else {
                seen.near_ties += 1;
                seen.agreed_near_ties += usize::from(ours == token);
            }
            logits = g
                .model
                .forward(&mut [Chunk {
                    tokens: &[token],
                    cache: &mut cache,
                    logits: true,
                }])
                .unwrap();
        }
    }
    eprintln!(
        "{numerics:?}: {} decisive steps; near ties: {} of {} agreed",
        seen.decisive, seen.agreed_near_ties, seen.near_ties
    );
    assert!(
        seen.decisive >= 300,
        "too few decisive steps to mean much: {}",
        seen.decisive
    );
    assert!(
        seen.disagreements.is_empty(),
        "{numerics:?}: {}",
        seen.disagreements.join("\n")
    );
    seen
}

/// llama.cpp's numerics: our argmax equals llama.cpp's token at every step, near ties included
/// (the smallest top-2 gaps in the fixture are under 0.003).
#[test]
fn greedy_steps_equal_llama_cpp_at_every_step() {
    let seen = teacher_forced(Numerics::LlamaCpp);
    assert_eq!(
        seen.agreed_near_ties, seen.near_ties,
        "near ties where llama.cpp went the other way"
    );
    assert!(
        seen.near_ties > 0,
        "the fixture has no near tie to tell numerics apart"
    );
}

/// Fast numerics round differently from llama.cpp, so only its decisive steps bind, and there
/// every argmax must be llama.cpp's (`teacher_forced` asserts it).
#[test]
fn fast_numerics_agree_with_llama_cpp_at_every_decisive_step() {
    teacher_forced(Numerics::Fast);
}

/// Free-running greedy generation (our own tokens fed back) equals llama.cpp's for every chat
/// case, all 24 tokens (or up to EOS); with fast numerics, up to llama.cpp's first near tie
/// (after it, either token was a correct greedy step and the paths may part).
#[test]
fn free_running_greedy_equals_llama_cpp() {
    let f = fixture("smollm2_greedy.json");
    let chats = f["chat"].as_array().unwrap();
    assert!(chats.len() >= 10);
    for numerics in [Numerics::LlamaCpp, Numerics::Fast] {
        let g = generate::load(&smollm_gguf(), &Device::Cpu, numerics).unwrap();
        let mut compared = 0;
        for case in chats {
            let mut want = ids(&case["greedy_ids"]);
            if numerics == Numerics::Fast {
                let decisive = margins(case)
                    .iter()
                    .take_while(|&&m| m >= DECISIVE_MARGIN)
                    .count();
                want.truncate(decisive);
            }
            let got = greedy(&g, &ids(&case["prompt_ids"]), want.len());
            assert_eq!(got, want, "{numerics:?}: {}", case["prompt"]);
            compared += want.len();
        }
        eprintln!("{numerics:?}: {compared} tokens equal llama.cpp's");
        assert!(
            compared >= 30,
            "{numerics:?}: only {compared} tokens compared"
        );
    }
}
