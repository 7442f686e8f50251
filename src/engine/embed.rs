//! BERT-family sentence encoders → pooled, optionally normalised vectors.
//!
//! Reads a sentence-transformers folder: `config.json`, `model.safetensors`, `tokenizer.json`,
//! and the pooling (`1_Pooling/config.json`), normalisation (`modules.json`) and length
//! (`sentence_bert_config.json`) settings, any of which `model.toml` may override.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationParams};

use super::bert::{Bert, BertConfig};
use super::EngineError;
use crate::batching::BatchEngine;
use crate::repository::{EmbedOptions, Pooling, Precision};

/// What callers need to know about a loaded encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedInfo {
    pub dimensions: usize,
    pub max_seq_length: usize,
    pub vocab_size: usize,
    pub pooling: Pooling,
    pub normalize: bool,
    pub parameters: usize,
    /// What the dense layers run in, as resolved at load (`F32` or `Bf16`).
    pub precision: Precision,
}

/// Text → token ids, with the model's truncation. Shared by request handlers off the runtime.
pub struct EmbedTokenizer {
    tokenizer: Tokenizer,
}

/// Token ids of one text and whether truncation cut it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub truncated: bool,
}

impl EmbedTokenizer {
    pub fn encode(&self, text: &str) -> Result<Encoded, EngineError> {
        let enc = self
            .tokenizer
            .encode_fast(text, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            truncated: !enc.get_overflowing().is_empty(),
        })
    }
}

/// The encoder on its device; runs on a compute thread. Clones share the weights.
#[derive(Clone)]
pub struct BertEmbedder {
    model: Bert,
    device: Device,
    pad_id: u32,
    info: EmbedInfo,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

#[derive(Deserialize)]
struct Module {
    #[serde(rename = "type")]
    kind: String,
}

fn read_json<T: serde::de::DeserializeOwned>(file: &Path) -> Result<Option<T>, EngineError> {
    if !file.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(file).map_err(|e| EngineError::file(file, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| EngineError::file(file, e))
}

/// Loads the encoder and its tokenizer from `dir`.
pub fn load(
    dir: &Path,
    options: &EmbedOptions,
    device: &Device,
) -> Result<(BertEmbedder, EmbedTokenizer), EngineError> {
    let config_file = dir.join("config.json");
    let config: BertConfig =
        read_json(&config_file)?.ok_or_else(|| EngineError::file(&config_file, "missing"))?;

    let pooling = match options.pooling {
        Some(p) => p,
        None => match read_json::<PoolingConfig>(&dir.join("1_Pooling/config.json"))? {
            Some(p) if p.pooling_mode_cls_token && !p.pooling_mode_mean_tokens => Pooling::Cls,
            Some(p) if p.pooling_mode_mean_tokens => Pooling::Mean,
            Some(_) => {
                return Err(EngineError::file(
                    dir.join("1_Pooling/config.json"),
                    "only mean and cls pooling are supported",
                ))
            }
            None => Pooling::Mean,
        },
    };
    let normalize = match options.normalize {
        Some(n) => n,
        None => read_json::<Vec<Module>>(&dir.join("modules.json"))?
            .is_some_and(|mods| mods.iter().any(|m| m.kind.ends_with(".Normalize"))),
    };
    let model_limit = config.max_position_embeddings;
    let max_seq_length = options
        .max_seq_length
        .or(
            read_json::<SentenceBertConfig>(&dir.join("sentence_bert_config.json"))?
                .and_then(|c| c.max_seq_length),
        )
        .unwrap_or(model_limit);
    if max_seq_length > model_limit {
        return Err(EngineError::file(
            &config_file,
            format!(
                "max_seq_length {max_seq_length} exceeds max_position_embeddings {model_limit}"
            ),
        ));
    }

    let tokenizer_file = dir.join("tokenizer.json");
    let mut tokenizer =
        Tokenizer::from_file(&tokenizer_file).map_err(|e| EngineError::file(&tokenizer_file, e))?;
    // tokenizer.json often carries the training-time padding and truncation; ours differ.
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_seq_length,
            ..Default::default()
        }))
        .map_err(|e| EngineError::file(&tokenizer_file, e))?;

    let weights = dir.join("model.safetensors");
    let parameters = {
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&weights) }
            .map_err(|e| EngineError::file(&weights, e))?;
        st.tensors()
            .iter()
            .map(|(_, view)| view.shape().iter().product::<usize>())
            .sum()
    };
    // Safety: the weights file is not modified while the server runs (it is mapped read-only).
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
        .map_err(|e| EngineError::file(&weights, e))?;
    let model =
        Bert::load(vb, &config, options.precision).map_err(|e| EngineError::file(&weights, e))?;

    let info = EmbedInfo {
        dimensions: config.hidden_size,
        max_seq_length,
        vocab_size: config.vocab_size,
        pooling,
        normalize,
        parameters,
        precision: model.precision(),
    };
    Ok((
        BertEmbedder {
            model,
            device: device.clone(),
            pad_id: config.pad_token_id as u32,
            info,
        },
        EmbedTokenizer { tokenizer },
    ))
}

impl BertEmbedder {
    pub fn info(&self) -> &EmbedInfo {
        &self.info
    }

    /// Embeds a batch of token-id sequences (each already within `max_seq_length`).
    pub fn embed(&mut self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EngineError> {
        let longest = batch.iter().map(Vec::len).max().unwrap_or(0);
        if longest == 0 {
            return Ok(Vec::new());
        }
        let mut ids = Vec::with_capacity(batch.len() * longest);
        let mut mask = Vec::with_capacity(batch.len() * longest);
        for seq in batch {
            ids.extend_from_slice(seq);
            ids.extend(std::iter::repeat_n(self.pad_id, longest - seq.len()));
            mask.extend(std::iter::repeat_n(1f32, seq.len()));
            mask.extend(std::iter::repeat_n(0f32, longest - seq.len()));
        }
        let shape = (batch.len(), longest);
        let ids = Tensor::from_vec(ids, shape, &self.device)?;
        let mask = Tensor::from_vec(mask, shape, &self.device)?;
        let hidden = self.model.forward(&ids, &mask)?;
        let pooled = match self.info.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let mask = mask.unsqueeze(2)?;
                let sum = hidden.broadcast_mul(&mask)?.sum(1)?;
                sum.broadcast_div(&mask.sum(1)?)?
            }
        };
        let pooled = if self.info.normalize {
            let norm = pooled.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
            // An all-zero vector stays zero instead of becoming NaN.
            pooled.broadcast_div(&norm.maximum(1e-12)?)?
        } else {
            pooled
        };
        Ok(pooled.to_vec2()?)
    }
}

impl BatchEngine for BertEmbedder {
    type Input = Vec<u32>;
    type Output = Vec<f32>;

    fn run(&mut self, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>, String> {
        self.embed(&inputs).map_err(|e| e.to_string())
    }
}
