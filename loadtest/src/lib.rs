//! What the load tools share: texts of an exact token count, percentiles, the loopback guard;
//! and the scenario runner behind `ember-loadtest run` (scenario files, results, chart).

pub mod chart;
pub mod report;
pub mod runner;
pub mod scenario;

use anyhow::{bail, Context};

const WORDS: &str = "server model request batch queue edge cloud token vector network small large \
    fast slow data image text reply answer gateway cluster memory thread engine worker client \
    again unless because while after before under over into from with about the a an of to and";

/// Deterministic texts of exactly `tokens` tokens.
pub fn texts(
    tokenizer: &tokenizers::Tokenizer,
    tokens: usize,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let words: Vec<&str> = WORDS.split_whitespace().collect();
    let mut next = xorshift(0x2545_f491_4f6c_dd1d);
    let mut out = Vec::with_capacity(count);
    let mut attempts = 0;
    while out.len() < count {
        attempts += 1;
        if attempts > count * 100 {
            bail!("cannot make texts of exactly {tokens} tokens");
        }
        let mut text = String::new();
        loop {
            let n = tokenizer
                .encode(text.as_str(), true)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .len();
            if n >= tokens {
                if n == tokens {
                    out.push(text);
                }
                break;
            }
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(words[next() % words.len()]);
        }
    }
    Ok(out)
}

/// Deterministic texts of `words` common English words each, for a model whose tokenizer is not
/// at hand (about one token a word in byte-level BPE vocabularies).
pub fn word_texts(words: usize, count: usize) -> Vec<String> {
    let vocabulary: Vec<&str> = WORDS.split_whitespace().collect();
    let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
    (0..count)
        .map(|_| {
            (0..words)
                .map(|_| vocabulary[next() % vocabulary.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// A small deterministic generator (xorshift64); `seed` must not be 0.
pub fn xorshift(seed: u64) -> impl FnMut() -> usize {
    let mut state = seed.max(1);
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as usize
    }
}

/// The `p` quantile of sorted values (NaN when there are none).
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        f64::NAN
    } else {
        sorted[((p * sorted.len() as f64) as usize).min(sorted.len() - 1)]
    }
}

/// Refuses any target but this machine's loopback (benchmarks stay local unless a run opts in
/// with `--allow-remote`).
pub fn check_loopback(url: &str) -> anyhow::Result<()> {
    let host = reqwest::Url::parse(url)
        .with_context(|| format!("{url:?}"))?
        .host_str()
        .unwrap_or("")
        .to_string();
    if !matches!(host.as_str(), "127.0.0.1" | "localhost" | "[::1]" | "::1") {
        bail!("ember-loadtest only targets loopback addresses, not {host}");
    }
    Ok(())
}

/// A tokenizer.json without its padding and truncation, to count a text's real tokens.
pub fn load_tokenizer(path: &std::path::Path) -> anyhow::Result<tokenizers::Tokenizer> {
    let mut tokenizer = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(None)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(tokenizer)
}
