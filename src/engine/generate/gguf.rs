//! What a GGUF file says about its model: architecture, hyper-parameters, tokenizer, template.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};

/// Typed access to GGUF metadata with errors that name the key.
pub struct Metadata<'a>(pub &'a HashMap<String, Value>);

impl Metadata<'_> {
    pub fn get(&self, key: &str) -> Result<&Value, String> {
        self.0
            .get(key)
            .ok_or_else(|| format!("GGUF metadata has no {key:?}"))
    }

    pub fn u32(&self, key: &str) -> Result<u32, String> {
        let v = self.get(key)?;
        v.to_u32()
            .or_else(|_| v.to_u64().map(|v| v as u32))
            .or_else(|_| v.to_i32().map(|v| v as u32))
            .map_err(|e| format!("GGUF metadata {key:?}: {e}"))
    }

    pub fn opt_u32(&self, key: &str) -> Option<u32> {
        self.0.contains_key(key).then(|| self.u32(key).ok())?
    }

    pub fn f32(&self, key: &str) -> Result<f32, String> {
        self.get(key)?
            .to_f32()
            .map_err(|e| format!("GGUF metadata {key:?}: {e}"))
    }

    pub fn opt_bool(&self, key: &str) -> Option<bool> {
        self.0.get(key).and_then(|v| v.to_bool().ok())
    }

    pub fn string(&self, key: &str) -> Result<&str, String> {
        self.get(key)?
            .to_string()
            .map(String::as_str)
            .map_err(|e| format!("GGUF metadata {key:?}: {e}"))
    }

    pub fn strings(&self, key: &str) -> Result<Vec<&str>, String> {
        self.get(key)?
            .to_vec()
            .map_err(|e| format!("GGUF metadata {key:?}: {e}"))?
            .iter()
            .map(|v| v.to_string().map(String::as_str))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("GGUF metadata {key:?}: {e}"))
    }

    pub fn i32s(&self, key: &str) -> Result<Vec<i32>, String> {
        self.get(key)?
            .to_vec()
            .map_err(|e| format!("GGUF metadata {key:?}: {e}"))?
            .iter()
            .map(|v| v.to_i32().or_else(|_| v.to_u32().map(|u| u as i32)))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("GGUF metadata {key:?}: {e}"))
    }
}

/// The hyper-parameters of a llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub architecture: String,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub feed_forward: usize,
    pub context_length: usize,
    pub rms_eps: f64,
    pub rope_base: f32,
    pub rope_dim: usize,
    /// NEOX-style rotation (halves) instead of llama's interleaved pairs.
    pub rope_neox: bool,
    pub vocab_size: usize,
}

/// Architectures whose tensors follow llama's names and shapes.
const LLAMA_FAMILY: &[&str] = &["llama", "mistral", "qwen2", "granite"];

impl LlamaConfig {
    pub fn from_gguf(content: &Content) -> Result<Self, String> {
        let md = Metadata(&content.metadata);
        let arch = md.string("general.architecture")?.to_string();
        if !LLAMA_FAMILY.contains(&arch.as_str()) {
            return Err(format!(
                "architecture {arch:?} is not supported; this build serves {LLAMA_FAMILY:?}"
            ));
        }
        if md.opt_u32(&format!("{arch}.expert_count")).unwrap_or(0) > 1 {
            return Err("mixture-of-experts models are not supported".into());
        }
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = md.u32(&key("embedding_length"))? as usize;
        let heads = md.u32(&key("attention.head_count"))? as usize;
        let kv_heads = md
            .opt_u32(&key("attention.head_count_kv"))
            .unwrap_or(heads as u32) as usize;
        if heads == 0
            || kv_heads == 0
            || !hidden.is_multiple_of(heads)
            || !heads.is_multiple_of(kv_heads)
        {
            return Err(format!(
                "inconsistent attention shape: {hidden} wide, {heads} heads, {kv_heads} kv heads"
            ));
        }
        let head_dim = hidden / heads;
        let vocab_size = match md.opt_u32(&key("vocab_size")) {
            Some(v) => v as usize,
            None => md.strings("tokenizer.ggml.tokens")?.len(),
        };
        Ok(Self {
            layers: md.u32(&key("block_count"))? as usize,
            hidden,
            heads,
            kv_heads,
            head_dim,
            feed_forward: md.u32(&key("feed_forward_length"))? as usize,
            context_length: md.u32(&key("context_length"))? as usize,
            rms_eps: md.f32(&key("attention.layer_norm_rms_epsilon"))? as f64,
            rope_base: md.f32(&key("rope.freq_base")).unwrap_or(10_000.0),
            rope_dim: md
                .opt_u32(&key("rope.dimension_count"))
                .map_or(head_dim, |d| d as usize),
            rope_neox: arch == "qwen2",
            vocab_size,
            architecture: arch,
        })
    }
}
