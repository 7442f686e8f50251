//! GGUF llama-family decoders: weights in their file's quantisation, the tokenizer and chat
//! template from the file's metadata, sampling, and detokenisation for streaming.

mod attention;
mod ggml;
pub mod gguf;
pub mod model;
pub mod qlinear;
pub mod sampler;
pub mod template;
pub mod text;
pub mod tokenizer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::Device;

use super::EngineError;
pub use crate::repository::Numerics;
pub use gguf::LlamaConfig;
pub use model::{Chunk, KvCache, Llama};
pub use sampler::{Sampler, SamplingParams};
pub use template::{ChatMessage, ChatTemplate};
pub use text::TextStream;
pub use tokenizer::GgufTokenizer;

/// What callers need to know about a loaded decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateInfo {
    pub architecture: String,
    pub context_length: usize,
    pub parameters: usize,
    pub quantization: String,
}

/// A decoder and the text side that goes with it.
pub struct Generator {
    pub model: Llama,
    pub tokenizer: Arc<GgufTokenizer>,
    pub template: Option<Arc<ChatTemplate>>,
    pub info: GenerateInfo,
}

/// `path` is a `.gguf` file, or a folder holding exactly one.
fn gguf_file_in(path: &Path) -> Result<PathBuf, EngineError> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let entries = std::fs::read_dir(path).map_err(|e| EngineError::file(path, e))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(EngineError::file(path, "no .gguf file in this folder")),
        _ => Err(EngineError::file(
            path,
            "several .gguf files here; set `path` to one of them",
        )),
    }
}

pub fn load(path: &Path, device: &Device, numerics: Numerics) -> Result<Generator, EngineError> {
    let file_path = gguf_file_in(path)?;
    let fail = |e: &dyn std::fmt::Display| EngineError::file(&file_path, e);
    let mut file = std::fs::File::open(&file_path).map_err(|e| fail(&e))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| fail(&e))?;
    let config = LlamaConfig::from_gguf(&content).map_err(|e| fail(&e))?;
    let md = gguf::Metadata(&content.metadata);
    let tokenizer = GgufTokenizer::from_metadata(&md).map_err(|e| fail(&e))?;
    let template = match md.string("tokenizer.chat_template") {
        Ok(source) => {
            let text =
                |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default();
            Some(Arc::new(
                ChatTemplate::new(source, &text(tokenizer.bos), &text(Some(tokenizer.eos)))
                    .map_err(|e| fail(&e))?,
            ))
        }
        Err(_) => None,
    };
    let parameters = content
        .tensor_infos
        .values()
        .map(|t| t.shape.elem_count())
        .sum();
    let mut kinds: Vec<String> = content
        .tensor_infos
        .values()
        .filter(|t| t.shape.rank() == 2)
        .map(|t| format!("{:?}", t.ggml_dtype))
        .collect();
    kinds.sort();
    kinds.dedup();
    let model =
        Llama::load(&content, &mut file, config.clone(), device, numerics).map_err(|e| fail(&e))?;
    let info = GenerateInfo {
        architecture: config.architecture.clone(),
        context_length: config.context_length,
        parameters,
        quantization: kinds.join("+"),
    };
    Ok(Generator {
        model,
        tokenizer: Arc::new(tokenizer),
        template,
        info,
    })
}

impl crate::batching::scheduler::Decoder for Generator {
    type Cache = KvCache;

    fn new_cache(&self, capacity: usize) -> Result<KvCache, String> {
        self.model.new_cache(capacity).map_err(|e| e.to_string())
    }

    fn forward(&self, chunks: &mut [Chunk]) -> Result<Vec<Vec<f32>>, String> {
        self.model.forward(chunks).map_err(|e| e.to_string())
    }

    fn copy_prefix(&self, from: &KvCache, to: &mut KvCache, len: usize) -> Result<(), String> {
        self.model
            .copy_prefix(from, to, len)
            .map_err(|e| e.to_string())
    }

    fn piece(&self, token: u32) -> &[u8] {
        self.tokenizer.piece(token)
    }

    fn is_end_of_generation(&self, token: u32) -> bool {
        self.tokenizer.is_end_of_generation(token)
    }
}
