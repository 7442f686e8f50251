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
        // Scaled RoPE (linear, YaRN) changes every angle; serving it unscaled would be quietly
        // wrong past the trained context, so refuse it until it is implemented.
        if let Ok(scaling) = md.string(&key("rope.scaling.type")) {
            if scaling != "none" {
                return Err(format!("rope scaling {scaling:?} is not supported yet"));
            }
        }
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
            architecture: arch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::VersionedMagic;

    fn content(extra: &[(&str, Value)]) -> Content {
        let mut metadata: HashMap<String, Value> = [
            ("general.architecture", Value::String("llama".into())),
            ("llama.block_count", Value::U32(2)),
            ("llama.embedding_length", Value::U32(64)),
            ("llama.feed_forward_length", Value::U32(128)),
            ("llama.attention.head_count", Value::U32(4)),
            ("llama.attention.head_count_kv", Value::U32(2)),
            ("llama.context_length", Value::U32(512)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("llama.vocab_size", Value::U32(100)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for (k, v) in extra {
            metadata.insert(k.to_string(), v.clone());
        }
        Content {
            magic: VersionedMagic::GgufV3,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    #[test]
    fn reads_the_hyper_parameters_with_defaults() {
        let c = LlamaConfig::from_gguf(&content(&[])).unwrap();
        assert_eq!(
            (c.heads, c.kv_heads, c.head_dim, c.rope_dim),
            (4, 2, 16, 16)
        );
        assert_eq!(c.rope_base, 10_000.0);
        assert!(!c.rope_neox);
    }

    #[test]
    fn refuses_what_it_would_get_wrong() {
        let err = |extra: &[(&str, Value)]| LlamaConfig::from_gguf(&content(extra)).unwrap_err();
        assert!(err(&[("general.architecture", Value::String("gpt2".into()))]).contains("gpt2"));
        assert!(err(&[("llama.rope.scaling.type", Value::String("yarn".into()))]).contains("yarn"));
        assert!(err(&[("llama.attention.head_count_kv", Value::U32(3))]).contains("kv heads"));
        assert!(err(&[("llama.expert_count", Value::U32(8))]).contains("experts"));
        let ok = LlamaConfig::from_gguf(&content(&[(
            "llama.rope.scaling.type",
            Value::String("none".into()),
        )]));
        assert!(ok.is_ok());
    }
}
