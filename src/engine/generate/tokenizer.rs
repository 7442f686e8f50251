//! The tokenizer a GGUF file carries (`tokenizer.ggml.*`), rebuilt the way llama.cpp reads it:
//! byte-level BPE over the file's vocabulary and merges, the pre-tokenizer regexes llama.cpp uses
//! for the file's `tokenizer.ggml.pre`, and control tokens matched as whole pieces first (as
//! llama.cpp does when it tokenises a rendered chat template with special tokens on).

use serde_json::{json, Value};
use tokenizers::Tokenizer;

use super::gguf::Metadata;

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;

/// GPT-2's pre-tokenizer regex, as llama.cpp writes it.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's.
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regexes llama.cpp applies in order for a `tokenizer.ggml.pre` value
/// (`llm_tokenizer_bpe` in llama-vocab.cpp).
fn pre_tokenizer_regexes(pre: &str) -> Option<Vec<&'static str>> {
    Some(match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            vec![r"\p{N}", GPT2]
        }
        "gpt-2" | "gpt2" | "default" | "mpt" | "olmo" | "jais" => vec![GPT2],
        "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
            vec![LLAMA3]
        }
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" => vec![QWEN2],
        _ => return None,
    })
}

/// Control tokens that end a generation in llama.cpp even when they are not the file's EOS
/// (`special_eog_ids`).
const END_OF_GENERATION: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<|eom_id|>",
];

/// Text ↔ token ids for a GGUF model.
pub struct GgufTokenizer {
    tokenizer: Tokenizer,
    /// The bytes each id stands for in generated text (empty for control tokens).
    pieces: Vec<Vec<u8>>,
    pub bos: Option<u32>,
    pub eos: u32,
    pub add_bos: bool,
    /// Ids that end a generation.
    pub end_of_generation: Vec<u32>,
}

/// GPT-2's reversible byte ↔ printable-char mapping, char → byte direction.
fn unicode_to_byte() -> std::collections::HashMap<char, u8> {
    let mut printable: Vec<u8> = (b'!'..=b'~')
        .chain(0xa1..=0xac)
        .chain(0xae..=0xff)
        .collect();
    let mut chars: Vec<u32> = printable.iter().map(|&b| u32::from(b)).collect();
    let mut extra = 0;
    for b in 0..=255u8 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    printable
        .into_iter()
        .zip(chars)
        .map(|(b, c)| (char::from_u32(c).expect("valid char"), b))
        .collect()
}

impl GgufTokenizer {
    pub fn from_metadata(md: &Metadata) -> Result<Self, String> {
        let model = md.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(format!(
                "tokenizer.ggml.model {model:?} is not supported yet; this build reads byte-level \
                 BPE (\"gpt2\") tokenizers"
            ));
        }
        let pre = md.string("tokenizer.ggml.pre").unwrap_or("default");
        let regexes = pre_tokenizer_regexes(pre).ok_or_else(|| {
            format!("tokenizer.ggml.pre {pre:?} is not supported; known: smollm, gpt-2, llama-bpe, qwen2 and kin")
        })?;
        let tokens = md.strings("tokenizer.ggml.tokens")?;
        let types = md
            .i32s("tokenizer.ggml.token_type")
            .unwrap_or_else(|_| vec![NORMAL; tokens.len()]);
        if types.len() != tokens.len() {
            return Err(
                "tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length".into(),
            );
        }
        let merges = md.strings("tokenizer.ggml.merges")?;

        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.to_string(), json!(id)))
            .collect();
        let added: Vec<Value> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, &ty))| ty == CONTROL || ty == USER_DEFINED)
            .map(|(id, (t, &ty))| {
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": ty == CONTROL})
            })
            .collect();
        let mut pre_tokenizers: Vec<Value> = regexes
            .iter()
            .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
            .collect();
        pre_tokenizers.push(json!({"type": "ByteLevel", "add_prefix_space": false,
                                   "trim_offsets": false, "use_regex": false}));
        let spec = json!({
            "version": "1.0",
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        let tokenizer: Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e| format!("building the tokenizer from GGUF metadata: {e}"))?;

        let to_byte = unicode_to_byte();
        let pieces = tokens
            .iter()
            .zip(&types)
            .map(|(t, &ty)| match ty {
                CONTROL => Vec::new(),
                USER_DEFINED => t.as_bytes().to_vec(),
                BYTE => t
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .map_or_else(Vec::new, |b| vec![b]),
                _ => t.chars().filter_map(|c| to_byte.get(&c).copied()).collect(),
            })
            .collect();

        let eos = md.u32("tokenizer.ggml.eos_token_id")?;
        let mut end_of_generation = vec![eos];
        if let Some(eot) = md.opt_u32("tokenizer.ggml.eot_token_id") {
            end_of_generation.push(eot);
        }
        for (id, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
            if ty == CONTROL && END_OF_GENERATION.contains(t) {
                end_of_generation.push(id as u32);
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        Ok(Self {
            tokenizer,
            pieces,
            bos: md.opt_u32("tokenizer.ggml.bos_token_id"),
            eos,
            add_bos: md.opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
            end_of_generation,
        })
    }

    /// Token ids of `text`; control tokens written in the text are matched as such (llama.cpp's
    /// `parse_special`). Adds BOS when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos);
        }
        let enc = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| format!("tokenizer: {e}"))?;
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The bytes `id` adds to generated text (control tokens add none).
    pub fn piece(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// A token's text as stored in the vocabulary (for the chat template's special tokens).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }
}
