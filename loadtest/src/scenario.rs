//! Scenario files (`loadtest/scenarios/*.toml`): what traffic to send, at which concurrency
//! levels, and the bounds of each level. Read once, checked once; an unknown key or a bad value
//! is an error naming the file and the key.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// One scenario: levels run one after the other, each bounded in time and in request count.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Defaults to the file's stem; names the result files (`<name>.json`, `<name>.png`).
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Closed-loop clients per level; each level runs with this many requests in flight.
    pub concurrency: Vec<usize>,
    /// A level starts no request after this many seconds (requests in flight then finish).
    pub seconds_per_level: f64,
    /// A level starts at most this many requests.
    pub max_requests_per_level: usize,
    /// Each request's own limit (a stream's whole length included).
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: f64,
    /// What each request is: one entry, or several picked at random by `weight` (mixed).
    pub traffic: Vec<Traffic>,
}

fn default_request_timeout_secs() -> f64 {
    120.0
}

/// One kind of request in a scenario.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Traffic {
    /// `POST /v1/embeddings` with `inputs_per_request` texts of exactly `tokens` tokens each.
    Embeddings {
        model: String,
        /// The model's tokenizer.json (relative paths: from the scenario file's folder); texts
        /// are made to exactly `tokens` tokens with it, special tokens included.
        tokenizer: PathBuf,
        tokens: usize,
        #[serde(default = "one")]
        inputs_per_request: usize,
        #[serde(default = "one_f64")]
        weight: f64,
    },
    /// `POST /v1/chat/completions`, streamed, one user message, greedy, `max_tokens` to generate.
    Chat {
        model: String,
        /// Length of the user message. With `tokenizer` it is exact in that tokenizer (special
        /// tokens included); without one it is that many common English words, about one token
        /// each in a byte-level BPE vocabulary. The server's own count (chat template included)
        /// is reported as `prompt_tokens_mean`.
        prompt_tokens: usize,
        #[serde(default)]
        tokenizer: Option<PathBuf>,
        max_tokens: usize,
        #[serde(default = "one_f64")]
        weight: f64,
    },
    /// `POST /v2/models/{model}/infer` (KServe v2) with `rows_per_request` rows of random FP32
    /// values in [0, 1), each of `shape`; as JSON, or with `binary` as the binary tensor data
    /// extension.
    Tensor {
        model: String,
        /// The input tensor's name.
        input: String,
        /// FP32 is the only one made for now.
        #[serde(default = "fp32")]
        datatype: String,
        /// One row's shape, without the batch dimension (`[28, 28, 1]`).
        shape: Vec<usize>,
        #[serde(default = "one")]
        rows_per_request: usize,
        #[serde(default)]
        binary: bool,
        #[serde(default = "one_f64")]
        weight: f64,
    },
}

fn fp32() -> String {
    "FP32".into()
}

fn one() -> usize {
    1
}

fn one_f64() -> f64 {
    1.0
}

impl Traffic {
    pub fn kind(&self) -> &'static str {
        match self {
            Traffic::Embeddings { .. } => "embeddings",
            Traffic::Chat { .. } => "chat",
            Traffic::Tensor { .. } => "tensor",
        }
    }

    pub fn model(&self) -> &str {
        match self {
            Traffic::Embeddings { model, .. }
            | Traffic::Chat { model, .. }
            | Traffic::Tensor { model, .. } => model,
        }
    }

    pub fn weight(&self) -> f64 {
        match self {
            Traffic::Embeddings { weight, .. }
            | Traffic::Chat { weight, .. }
            | Traffic::Tensor { weight, .. } => *weight,
        }
    }

    /// A short label for tables and charts, e.g. `embeddings all-MiniLM-L6-v2 12 tok`.
    pub fn label(&self) -> String {
        match self {
            Traffic::Embeddings {
                model,
                tokens,
                inputs_per_request,
                ..
            } if *inputs_per_request > 1 => {
                format!("embeddings {model} {inputs_per_request}x{tokens} tok")
            }
            Traffic::Embeddings { model, tokens, .. } => {
                format!("embeddings {model} {tokens} tok")
            }
            Traffic::Chat {
                model,
                prompt_tokens,
                max_tokens,
                ..
            } => format!("chat {model} {prompt_tokens}+{max_tokens} tok"),
            Traffic::Tensor {
                model,
                shape,
                rows_per_request,
                binary,
                ..
            } => format!(
                "tensor {model} {rows_per_request}x{shape:?}{}",
                if *binary { " binary" } else { "" }
            ),
        }
    }
}

impl Scenario {
    /// Reads and checks a scenario file; relative tokenizer paths become relative to its folder.
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut scenario: Scenario =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if scenario.name.is_empty() {
            scenario.name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("scenario")
                .to_string();
        }
        let folder = path.parent().unwrap_or(Path::new("."));
        for traffic in &mut scenario.traffic {
            let tokenizer = match traffic {
                Traffic::Embeddings { tokenizer, .. } => Some(tokenizer),
                Traffic::Chat { tokenizer, .. } => tokenizer.as_mut(),
                Traffic::Tensor { .. } => None,
            };
            if let Some(t) = tokenizer {
                if t.is_relative() {
                    *t = folder.join(&*t);
                }
            }
        }
        scenario
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(scenario)
    }

    /// The checks `load` makes, for scenarios built or changed in code.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            bail!(
                "name: {:?} must be non-empty letters, digits, '-', '_' or '.' (it names the \
                 result files)",
                self.name
            );
        }
        if self.concurrency.is_empty() || self.concurrency.contains(&0) {
            bail!("concurrency: a non-empty list of levels, each at least 1");
        }
        if !(self.seconds_per_level > 0.0 && self.seconds_per_level <= 3600.0) {
            bail!("seconds_per_level: more than 0 and at most 3600");
        }
        if self.max_requests_per_level == 0 {
            bail!("max_requests_per_level: at least 1");
        }
        if self.request_timeout_secs.is_nan() || self.request_timeout_secs <= 0.0 {
            bail!("request_timeout_secs: more than 0");
        }
        if self.traffic.is_empty() {
            bail!("traffic: at least one [[traffic]] entry");
        }
        for (i, t) in self.traffic.iter().enumerate() {
            if !(t.weight() > 0.0 && t.weight().is_finite()) {
                bail!("traffic[{i}].weight: a positive number");
            }
            if t.model().is_empty() {
                bail!("traffic[{i}].model: must not be empty");
            }
            match t {
                Traffic::Embeddings {
                    tokens,
                    inputs_per_request,
                    ..
                } => {
                    if *tokens < 3 {
                        bail!("traffic[{i}].tokens: at least 3 (special tokens count)");
                    }
                    if *inputs_per_request == 0 {
                        bail!("traffic[{i}].inputs_per_request: at least 1");
                    }
                }
                Traffic::Chat {
                    prompt_tokens,
                    max_tokens,
                    ..
                } => {
                    if *prompt_tokens == 0 {
                        bail!("traffic[{i}].prompt_tokens: at least 1");
                    }
                    // TPOT is the time per token after the first: it needs a second one.
                    if *max_tokens < 2 {
                        bail!("traffic[{i}].max_tokens: at least 2");
                    }
                }
                Traffic::Tensor {
                    input,
                    datatype,
                    shape,
                    rows_per_request,
                    ..
                } => {
                    if input.is_empty() {
                        bail!("traffic[{i}].input: the input tensor's name");
                    }
                    if datatype != "FP32" {
                        bail!("traffic[{i}].datatype: only \"FP32\" is made, not {datatype:?}");
                    }
                    if shape.contains(&0) || shape.iter().product::<usize>() > 1 << 24 {
                        bail!(
                            "traffic[{i}].shape: dimensions of at least 1, at most 2^24 elements"
                        );
                    }
                    if *rows_per_request == 0 {
                        bail!("traffic[{i}].rows_per_request: at least 1");
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> anyhow::Result<Scenario> {
        let dir = std::env::temp_dir().join(format!("ember-lt-scenario-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("s{}.toml", text.len()));
        std::fs::write(&path, text).unwrap();
        Scenario::load(&path)
    }

    const BASE: &str = "concurrency = [1, 4]\nseconds_per_level = 2\nmax_requests_per_level = 10\n";

    #[test]
    fn every_shipped_scenario_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let s = Scenario::load(&path).unwrap();
                assert_eq!(s.name, path.file_stem().unwrap().to_str().unwrap());
                n += 1;
            }
        }
        assert!(n >= 6, "expected the six shipped scenarios, found {n}");
    }

    fn load_error(text: &str) -> String {
        load_str(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_name_the_file_and_the_key() {
        let e = load_error(&format!("{BASE}secs = 3\n"));
        assert!(e.contains(".toml") && e.contains("secs"), "{e}");
        let e = load_error(&format!(
            "{BASE}[[traffic]]\nkind = \"chat\"\nmodel = \"m\"\nprompt_tokens = 8\n\
             max_tokens = 8\nstreem = true\n"
        ));
        assert!(e.contains("streem"), "{e}");
        let e = load_error(&format!(
            "{BASE}[[traffic]]\nkind = \"audio\"\nmodel = \"m\"\n"
        ));
        assert!(e.contains("audio"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = load_error(
            "concurrency = []\nseconds_per_level = 2\nmax_requests_per_level = 10\n\
             [[traffic]]\nkind = \"chat\"\nmodel = \"m\"\nprompt_tokens = 8\nmax_tokens = 8\n",
        );
        assert!(e.contains("concurrency"), "{e}");
        let e = load_error(&format!(
            "{BASE}[[traffic]]\nkind = \"chat\"\nmodel = \"m\"\nprompt_tokens = 8\nmax_tokens = 1\n"
        ));
        assert!(e.contains("max_tokens"), "{e}");
    }

    #[test]
    fn tensor_traffic_is_read_and_checked() {
        let tensor = "[[traffic]]\nkind = \"tensor\"\nmodel = \"m\"\ninput = \"image\"\n";
        let s = load_str(&format!(
            "{BASE}{tensor}shape = [28, 28, 1]\nbinary = true\n"
        ))
        .unwrap();
        assert_eq!(s.traffic[0].label(), "tensor m 1x[28, 28, 1] binary");
        let e = load_error(&format!("{BASE}{tensor}shape = [28, 0]\n"));
        assert!(e.contains("traffic[0].shape"), "{e}");
        let e = load_error(&format!("{BASE}{tensor}shape = [4]\ndatatype = \"INT8\"\n"));
        assert!(e.contains("traffic[0].datatype"), "{e}");
        let e = load_error(&format!(
            "{BASE}{tensor}shape = [4]\nrows_per_request = 0\n"
        ));
        assert!(e.contains("rows_per_request"), "{e}");
    }

    #[test]
    fn tokenizer_paths_are_relative_to_the_file() {
        let s = load_str(&format!(
            "{BASE}[[traffic]]\nkind = \"embeddings\"\nmodel = \"m\"\ntokenizer = \"t/tokenizer.json\"\n\
             tokens = 12\n"
        ))
        .unwrap();
        let Traffic::Embeddings { tokenizer, .. } = &s.traffic[0] else {
            panic!()
        };
        assert!(tokenizer.ends_with("t/tokenizer.json") && tokenizer.is_absolute());
    }
}
