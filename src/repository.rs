//! The model repository: `models/<name>/model.toml` → [`ModelSpec`].
//!
//! Like Triton's: one folder per model, named after the model, with a config beside the weights.
//! Every error names the file and, where there is one, the key.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What a model does; decides which engine loads it and which routes serve it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Embed,
    Generate,
    Tensor,
}

/// How the weights are stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A Hugging Face folder: config.json, model.safetensors, tokenizer.json.
    Safetensors,
    Gguf,
    Onnx,
}

/// Where a model belongs: `edge` models are small enough for gateways; `cloud` ones are forwarded
/// by edges to the cloud tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Edge,
    #[default]
    Cloud,
}

/// Dynamic batching knobs of one model. Defaults suit a 2-core CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchPolicy {
    /// Most inputs in one forward pass.
    pub max_batch_size: usize,
    /// Most tokens in one forward pass, counted padded (batch items × longest item).
    pub max_batch_tokens: usize,
    /// How long the first input of a batch may wait for others to join.
    pub max_queue_delay_ms: u64,
    /// Most inputs waiting for this model; past it the server answers 503 at once.
    pub queue_capacity: usize,
    /// Copies of the model computing batches side by side, each on its own thread (weights are
    /// shared). On a CPU, several single-threaded instances beat one instance whose every small
    /// op is split over all cores.
    pub instances: usize,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_batch_tokens: 16384,
            max_queue_delay_ms: 2,
            queue_capacity: 1024,
            instances: 1,
        }
    }
}

/// Continuous-batching knobs of a generation model. Defaults suit a small model on a 2-core CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratePolicy {
    /// Most sequences decoding together (one batched forward pass per step).
    pub max_concurrent_sequences: usize,
    /// The KV-cache budget in tokens, summed over running sequences (each reserves its prompt
    /// plus `max_tokens`); admission waits while it is spent.
    pub max_total_tokens: usize,
    /// Most prompt tokens one step takes from one sequence, so a long prompt cannot stall the
    /// running streams for its whole prefill.
    pub prefill_chunk: usize,
    /// Requests waiting for admission; past it the server answers 503 at once.
    pub max_waiting: usize,
    /// `max_tokens` when a request gives none (capped by what fits in the context).
    pub default_max_tokens: usize,
    /// Caps the context below the model's own (0 = the model's).
    pub context_length: usize,
    /// Finished prompts whose KV cache is kept, so that a later prompt that starts the same way
    /// (a system prompt, earlier chat turns) skips computing that part (0 = off). They count
    /// against `max_total_tokens` and are dropped, oldest first, when admission needs the room.
    pub prefix_cache_entries: usize,
    /// How Q4_1 weight blocks are summed on CPU (see [`Numerics`]).
    pub numerics: Numerics,
}

impl Default for GeneratePolicy {
    fn default() -> Self {
        Self {
            max_concurrent_sequences: 16,
            max_total_tokens: 32768,
            prefill_chunk: 256,
            max_waiting: 64,
            default_max_tokens: 256,
            context_length: 0,
            prefix_cache_entries: 8,
            numerics: Numerics::default(),
        }
    }
}

/// Arithmetic of a decoder's quantized matmuls on CPU. Both are deterministic and
/// batch-invariant (a sequence decodes the same alone or among others); they differ in whether
/// the results are llama.cpp's to the bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum Numerics {
    /// llama.cpp's own float sequence (`ggml_vec_dot_q4_1_q8_1`: eight f32 lanes per output),
    /// so hidden states, logits and greedy tokens equal llama.cpp's for the same GGUF, near ties
    /// included.
    #[default]
    #[serde(rename = "llama.cpp")]
    LlamaCpp,
    /// One integer sum per Q4_1 block and one f32 chain per output: about half the arithmetic
    /// per weight, which is what bounds several sequences' decode step. Logits differ from
    /// llama.cpp's by float rounding, so where its top two tokens nearly tie, greedy may pick
    /// the other. Q8_0 weights are summed the same way in both.
    #[serde(rename = "fast")]
    Fast,
}

/// Pooling of token states into one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    Mean,
    Cls,
}

/// Arithmetic of an encoder's dense layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 weights on CPUs with AVX-512 BF16 (twice the f32 rate) or AVX2 and FMA (weights
    /// packed once, half the bytes), f32 everywhere else.
    #[default]
    Auto,
    F32,
    /// bf16 weights and activations with f32 sums, on any CPU (slow without AVX2).
    Bf16,
}

/// Optional overrides for embedding models; by default everything comes from the model's own
/// sentence-transformers files (`1_Pooling/config.json`, `modules.json`,
/// `sentence_bert_config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EmbedOptions {
    pub pooling: Option<Pooling>,
    pub normalize: Option<bool>,
    pub max_seq_length: Option<usize>,
    #[serde(default)]
    pub precision: Precision,
}

/// Options of tensor models. The inputs and outputs come from the graph; these may narrow a
/// dynamic dimension (or give the shape of an output the graph leaves open).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TensorOptions {
    /// Whether NaN and infinite values may be sent in floating-point inputs. Off by default: a
    /// trained classifier turns them into NaN scores, never into an answer.
    #[serde(default)]
    pub allow_non_finite: bool,
    #[serde(default)]
    pub inputs: Vec<TensorShapeOverride>,
    #[serde(default)]
    pub outputs: Vec<TensorShapeOverride>,
}

/// The shape of one input or output as served: `-1` for a dimension of any size.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorShapeOverride {
    pub name: String,
    pub shape: Vec<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelToml {
    task: Task,
    format: Format,
    path: PathBuf,
    #[serde(default)]
    tier: Tier,
    batching: Option<BatchPolicy>,
    embed: Option<EmbedOptions>,
    generate: Option<GeneratePolicy>,
    tensor: Option<TensorOptions>,
}

/// One model of the repository, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The folder's name.
    pub name: String,
    pub task: Task,
    pub format: Format,
    /// Weights, absolute or relative to the working directory (resolved against the folder).
    pub path: PathBuf,
    pub tier: Tier,
    pub batching: BatchPolicy,
    pub embed: EmbedOptions,
    pub generate: GeneratePolicy,
    pub tensor: TensorOptions,
    /// The `model.toml` this came from, for error messages.
    pub config_file: PathBuf,
}

impl ModelSpec {
    /// Bytes of the weights on disk: the file, or every file below the folder. Unreadable
    /// entries count as empty; loading reports them properly.
    pub fn weights_bytes(&self) -> u64 {
        fn size(path: &Path) -> u64 {
            match std::fs::metadata(path) {
                Ok(m) if m.is_dir() => std::fs::read_dir(path)
                    .map(|entries| entries.flatten().map(|e| size(&e.path())).sum())
                    .unwrap_or(0),
                Ok(m) => m.len(),
                Err(_) => 0,
            }
        }
        size(&self.path)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("model repository {dir}: {source}")]
    Unreadable {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("model repository {0} holds no model folders (each needs a model.toml)")]
    Empty(PathBuf),
    #[error("{file}: {message}")]
    Invalid { file: PathBuf, message: String },
}

impl RepositoryError {
    fn invalid(file: &Path, message: impl fmt::Display) -> Self {
        Self::Invalid {
            file: file.to_path_buf(),
            message: message.to_string(),
        }
    }
}

/// Reads every `*/model.toml` below `dir`, sorted by model name. Folders without a `model.toml`
/// are skipped (they may hold shared files), but a repository with no model at all is an error.
pub fn scan(dir: &Path) -> Result<Vec<ModelSpec>, RepositoryError> {
    let unreadable = |source| RepositoryError::Unreadable {
        dir: dir.to_path_buf(),
        source,
    };
    let mut folders = BTreeSet::new();
    for entry in std::fs::read_dir(dir).map_err(unreadable)? {
        let entry = entry.map_err(unreadable)?;
        if entry.path().join("model.toml").is_file() {
            folders.insert(entry.path());
        }
    }
    if folders.is_empty() {
        return Err(RepositoryError::Empty(dir.to_path_buf()));
    }
    folders.iter().map(|folder| load_spec(folder)).collect()
}

/// Parses and validates `folder/model.toml`.
pub fn load_spec(folder: &Path) -> Result<ModelSpec, RepositoryError> {
    let file = folder.join("model.toml");
    let text = std::fs::read_to_string(&file).map_err(|e| RepositoryError::invalid(&file, e))?;
    let name = folder
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| RepositoryError::invalid(&file, "the folder name is not valid UTF-8"))?
        .to_string();
    parse_spec(&name, folder, &file, &text)
}

fn parse_spec(
    name: &str,
    folder: &Path,
    file: &Path,
    text: &str,
) -> Result<ModelSpec, RepositoryError> {
    if !valid_model_name(name) {
        return Err(RepositoryError::invalid(
            file,
            format!("model name {name:?} (the folder name) may hold only letters, digits, '.', '-' and '_'"),
        ));
    }
    // toml's message names the key and shows the offending line.
    let raw: ModelToml =
        toml::from_str(text).map_err(|e| RepositoryError::invalid(file, e.to_string().trim()))?;
    // A table for another task would be silently ignored: say so instead.
    let misplaced = match raw.task {
        Task::Generate => [
            ("batching", raw.batching.is_some()),
            ("embed", raw.embed.is_some()),
            ("tensor", raw.tensor.is_some()),
        ],
        Task::Embed => [
            ("generate", raw.generate.is_some()),
            ("tensor", raw.tensor.is_some()),
            ("", false),
        ],
        Task::Tensor => [
            ("generate", raw.generate.is_some()),
            ("embed", raw.embed.is_some()),
            ("", false),
        ],
    };
    if let Some((table, _)) = misplaced.iter().find(|(_, present)| *present) {
        return Err(RepositoryError::invalid(
            file,
            format!("table `[{table}]` does not apply to task {:?}", raw.task).to_lowercase(),
        ));
    }
    let spec = ModelSpec {
        name: name.to_string(),
        task: raw.task,
        format: raw.format,
        path: folder.join(&raw.path),
        tier: raw.tier,
        batching: raw.batching.unwrap_or_default(),
        embed: raw.embed.unwrap_or_default(),
        generate: raw.generate.unwrap_or_default(),
        tensor: raw.tensor.unwrap_or_default(),
        config_file: file.to_path_buf(),
    };
    validate(&spec).map_err(|message| RepositoryError::invalid(file, message))?;
    Ok(spec)
}

fn valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

fn validate(spec: &ModelSpec) -> Result<(), String> {
    let b = &spec.batching;
    let positive = [
        ("batching.max_batch_size", b.max_batch_size as u64),
        ("batching.max_batch_tokens", b.max_batch_tokens as u64),
        ("batching.queue_capacity", b.queue_capacity as u64),
        ("batching.instances", b.instances as u64),
    ];
    for (key, value) in positive {
        if value == 0 {
            return Err(format!("key `{key}` must be at least 1"));
        }
    }
    if b.max_queue_delay_ms > 60_000 {
        return Err(format!(
            "key `batching.max_queue_delay_ms` is {} ms; at most 60000 is allowed",
            b.max_queue_delay_ms
        ));
    }
    if b.instances > 64 {
        return Err(format!(
            "key `batching.instances` is {}; at most 64 is allowed",
            b.instances
        ));
    }
    if b.queue_capacity < b.max_batch_size {
        return Err(format!(
            "key `batching.queue_capacity` ({}) must be at least `batching.max_batch_size` ({})",
            b.queue_capacity, b.max_batch_size
        ));
    }
    if spec.embed.max_seq_length == Some(0) {
        return Err("key `embed.max_seq_length` must be at least 1".into());
    }
    let g = &spec.generate;
    let positive = [
        (
            "generate.max_concurrent_sequences",
            g.max_concurrent_sequences,
        ),
        ("generate.max_total_tokens", g.max_total_tokens),
        ("generate.prefill_chunk", g.prefill_chunk),
        ("generate.max_waiting", g.max_waiting),
        ("generate.default_max_tokens", g.default_max_tokens),
    ];
    for (key, value) in positive {
        if value == 0 {
            return Err(format!("key `{key}` must be at least 1"));
        }
    }
    for (table, overrides) in [
        ("tensor.inputs", &spec.tensor.inputs),
        ("tensor.outputs", &spec.tensor.outputs),
    ] {
        for o in overrides {
            if let Some(bad) = o.shape.iter().find(|&&d| d < -1 || d == 0) {
                return Err(format!(
                    "key `{table}`: dimension {bad} of {:?} is not allowed; use -1 (any size) or a size of at least 1",
                    o.name
                ));
            }
        }
    }
    match (spec.task, spec.format) {
        (Task::Embed, Format::Safetensors)
        | (Task::Generate, Format::Gguf)
        | (Task::Tensor, Format::Onnx) => Ok(()),
        (Task::Embed, other) => Err(format!(
            "key `format`: task \"embed\" needs format \"safetensors\", not {other:?}"
        )
        .to_lowercase()),
        (Task::Generate, other) => Err(format!(
            "key `format`: task \"generate\" needs format \"gguf\", not {other:?}"
        )
        .to_lowercase()),
        (Task::Tensor, other) => Err(format!(
            "key `format`: task \"tensor\" needs format \"onnx\", not {other:?}"
        )
        .to_lowercase()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelSpec, String> {
        parse_spec(
            "m",
            Path::new("/repo/m"),
            Path::new("/repo/m/model.toml"),
            text,
        )
        .map_err(|e| e.to_string())
    }

    const MINIMAL: &str = "task = \"embed\"\nformat = \"safetensors\"\npath = \"weights\"\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let spec = parse(MINIMAL).unwrap();
        assert_eq!(spec.path, PathBuf::from("/repo/m/weights"));
        assert_eq!(spec.tier, Tier::Cloud);
        assert_eq!(spec.batching, BatchPolicy::default());
        assert_eq!(spec.embed.precision, Precision::Auto);
    }

    #[test]
    fn generate_models_take_a_generate_table_only() {
        let gen = "task = \"generate\"\nformat = \"gguf\"\npath = \"m.gguf\"\n";
        let spec = parse(&format!("{gen}[generate]\nmax_concurrent_sequences = 4\n")).unwrap();
        assert_eq!(spec.generate.max_concurrent_sequences, 4);
        assert_eq!(
            spec.generate.prefill_chunk,
            GeneratePolicy::default().prefill_chunk
        );
        let err = parse(&format!("{gen}[batching]\nmax_batch_size = 4\n")).unwrap_err();
        assert!(err.contains("[batching]"), "{err}");
        let err = parse(&format!("{gen}[generate]\nprefill_chunk = 0\n")).unwrap_err();
        assert!(err.contains("generate.prefill_chunk"), "{err}");
        assert_eq!(spec.generate.numerics, Numerics::LlamaCpp);
        let spec = parse(&format!("{gen}[generate]\nnumerics = \"fast\"\n")).unwrap();
        assert_eq!(spec.generate.numerics, Numerics::Fast);
        let err = parse(&format!("{gen}[generate]\nnumerics = \"exact\"\n")).unwrap_err();
        assert!(
            err.contains("numerics") && err.contains("llama.cpp"),
            "{err}"
        );
        let err = parse("task = \"generate\"\nformat = \"onnx\"\npath = \"m\"\n").unwrap_err();
        assert!(err.contains("gguf"), "{err}");
    }

    #[test]
    fn tensor_options_are_read_and_checked() {
        let onnx = "task = \"tensor\"\nformat = \"onnx\"\npath = \"model.onnx\"\n";
        let spec = parse(&format!(
            "{onnx}[tensor]\nallow_non_finite = true\n[[tensor.inputs]]\nname = \"x\"\nshape = [-1, 3]\n"
        ))
        .unwrap();
        assert!(spec.tensor.allow_non_finite);
        assert_eq!(spec.tensor.inputs[0].shape, [-1, 3]);
        let err = parse(&format!(
            "{onnx}[[tensor.outputs]]\nname = \"y\"\nshape = [-1, 0]\n"
        ))
        .unwrap_err();
        assert!(
            err.contains("tensor.outputs") && err.contains("dimension 0"),
            "{err}"
        );
        let err = parse(&format!("{onnx}[tensor]\ncolour = 1\n")).unwrap_err();
        assert!(err.contains("colour"), "{err}");
        let err = parse(&format!("{onnx}[embed]\npooling = \"mean\"\n")).unwrap_err();
        assert!(err.contains("[embed]") && err.contains("tensor"), "{err}");
        let err = parse(&format!("{MINIMAL}[tensor]\n")).unwrap_err();
        assert!(err.contains("[tensor]"), "{err}");
        let err = parse("task = \"tensor\"\nformat = \"gguf\"\npath = \"m\"\n").unwrap_err();
        assert!(err.contains("onnx"), "{err}");
    }

    #[test]
    fn precision_is_read_and_checked() {
        let spec = parse(&format!("{MINIMAL}[embed]\nprecision = \"f32\"\n")).unwrap();
        assert_eq!(spec.embed.precision, Precision::F32);
        let err = parse(&format!("{MINIMAL}[embed]\nprecision = \"fp8\"\n")).unwrap_err();
        assert!(err.contains("precision = \"fp8\""), "{err}");
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let err = parse(&format!("{MINIMAL}colour = \"red\"\n")).unwrap_err();
        assert!(err.contains("/repo/m/model.toml"), "{err}");
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn unknown_batching_key_names_key() {
        let err = parse(&format!("{MINIMAL}[batching]\nmax_batch_sise = 3\n")).unwrap_err();
        assert!(err.contains("max_batch_sise"), "{err}");
        assert!(err.contains("line 5"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = parse(&format!("{MINIMAL}[batching]\nmax_batch_size = 0\n")).unwrap_err();
        assert!(err.contains("batching.max_batch_size"), "{err}");
        let err = parse(&format!("{MINIMAL}[batching]\nmax_batch_size = -3\n")).unwrap_err();
        assert!(err.contains("max_batch_size = -3"), "{err}");
        let err = parse("task = \"dance\"\nformat = \"safetensors\"\npath = \"w\"\n").unwrap_err();
        assert!(err.contains("task = \"dance\""), "{err}");
        let err = parse(&format!("{MINIMAL}[batching]\nqueue_capacity = 4\n")).unwrap_err();
        assert!(err.contains("batching.queue_capacity"), "{err}");
    }

    #[test]
    fn missing_key_is_named() {
        let err = parse("task = \"embed\"\nformat = \"safetensors\"\n").unwrap_err();
        assert!(err.contains("path"), "{err}");
    }

    #[test]
    fn model_name_is_checked() {
        let err = parse_spec(
            "bad name",
            Path::new("/r/bad name"),
            Path::new("/r/bad name/model.toml"),
            MINIMAL,
        )
        .unwrap_err();
        assert!(err.to_string().contains("folder name"), "{err}");
    }
}
