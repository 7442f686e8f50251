//! Request-level logic of a generation model: render the chat template and tokenise off the
//! runtime, check the request against the context and the KV budget, and hand it to the
//! continuous-batching scheduler, which streams events back.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::ModelError;
use crate::batching::scheduler::{Event, GenerationRequest, Scheduler};
use crate::engine::generate::{
    ChatMessage, ChatTemplate, GenerateInfo, Generator, GgufTokenizer, SamplingParams,
};
use crate::engine::EngineError;
use crate::metrics::GenerateMetrics;
use crate::repository::ModelSpec;

/// What to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Rendered with the model's chat template, the assistant's turn opened.
    Chat(Vec<ChatMessage>),
    /// Raw text, tokenised as is.
    Text(String),
    /// Token ids used as given.
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    /// `None`: the model's `default_max_tokens`, capped by what fits in the context.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
}

/// A running generation: events arrive as the scheduler produces them. Dropping it cancels the
/// sequence at the next step.
pub struct Generation {
    pub events: mpsc::UnboundedReceiver<Event>,
}

pub struct GenerationModel {
    spec: ModelSpec,
    info: GenerateInfo,
    tokenizer: Arc<GgufTokenizer>,
    template: Option<Arc<ChatTemplate>>,
    scheduler: Scheduler,
    context_length: usize,
}

impl GenerationModel {
    /// Starts the scheduler thread for a loaded decoder.
    pub fn start(
        spec: ModelSpec,
        generator: Generator,
        metrics: GenerateMetrics,
    ) -> Result<Self, EngineError> {
        let info = generator.info.clone();
        let limit = spec.generate.context_length;
        let context_length = if limit == 0 {
            info.context_length
        } else {
            limit.min(info.context_length)
        };
        let tokenizer = generator.tokenizer.clone();
        let template = generator.template.clone();
        let scheduler = Scheduler::spawn(&spec.name, generator, spec.generate, metrics)
            .map_err(|e| EngineError::Device(format!("cannot start the scheduler thread: {e}")))?;
        Ok(Self {
            spec,
            info,
            tokenizer,
            template,
            scheduler,
            context_length,
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn info(&self) -> &GenerateInfo {
        &self.info
    }

    /// The context this server grants (the model's, or less per `model.toml`).
    pub fn expected_wait(&self) -> std::time::Duration {
        self.scheduler.expected_wait()
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    pub async fn generate(
        &self,
        prompt: Prompt,
        params: GenerateParams,
    ) -> Result<Generation, ModelError> {
        let arrived = Instant::now();
        // The request field that holds the prompt, for errors about its length.
        let field = match prompt {
            Prompt::Chat(_) => "messages",
            Prompt::Text(_) | Prompt::Tokens(_) => "prompt",
        };
        let ids = self.tokenize(prompt).await?;
        let max_tokens = self.check_budget(ids.len(), params.max_tokens, field)?;
        let (events, rx) = mpsc::unbounded_channel();
        self.scheduler.submit(GenerationRequest {
            prompt: ids,
            max_tokens,
            sampling: params.sampling,
            stop: params.stop,
            events,
            arrived,
        })?;
        Ok(Generation { events: rx })
    }

    /// Template rendering and BPE on a long prompt take milliseconds: off the runtime.
    async fn tokenize(&self, prompt: Prompt) -> Result<Vec<u32>, ModelError> {
        let vocab = self.tokenizer.vocab_size();
        let ids = match prompt {
            Prompt::Tokens(ids) => {
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(ModelError::InvalidParameter {
                        param: "prompt",
                        message: format!("token id {bad} is outside the vocabulary (0..{vocab})"),
                    });
                }
                ids
            }
            Prompt::Chat(messages) => {
                let template =
                    self.template
                        .clone()
                        .ok_or_else(|| ModelError::InvalidParameter {
                            param: "messages",
                            message: format!(
                                "model {} has no chat template in its GGUF; use /v1/completions",
                                self.spec.name
                            ),
                        })?;
                let tokenizer = self.tokenizer.clone();
                tokio::task::spawn_blocking(move || {
                    let text = template.render(&messages).map_err(|message| {
                        ModelError::InvalidParameter {
                            param: "messages",
                            message,
                        }
                    })?;
                    tokenizer.encode(&text).map_err(ModelError::Internal)
                })
                .await
                .map_err(|e| ModelError::Internal(format!("tokenizer task failed: {e}")))??
            }
            Prompt::Text(text) => {
                let tokenizer = self.tokenizer.clone();
                tokio::task::spawn_blocking(move || tokenizer.encode(&text))
                    .await
                    .map_err(|e| ModelError::Internal(format!("tokenizer task failed: {e}")))?
                    .map_err(ModelError::Internal)?
            }
        };
        if ids.is_empty() {
            return Err(ModelError::InvalidParameter {
                param: "prompt",
                message: "the prompt is empty; send at least one token".into(),
            });
        }
        Ok(ids)
    }

    /// The `max_tokens` this request gets, or why it cannot run.
    fn check_budget(
        &self,
        prompt: usize,
        asked: Option<usize>,
        field: &'static str,
    ) -> Result<usize, ModelError> {
        let context = self.context_length;
        if prompt >= context {
            return Err(ModelError::InvalidParameter {
                param: field,
                message: format!(
                    "the prompt has {prompt} tokens; model {} has a context of {context} tokens, \
                     which must also hold at least one generated token",
                    self.spec.name
                ),
            });
        }
        let policy = &self.spec.generate;
        let max_tokens = match asked {
            Some(0) => {
                return Err(ModelError::InvalidParameter {
                    param: "max_tokens",
                    message: "max_tokens must be at least 1".into(),
                })
            }
            Some(n) if prompt + n > context => {
                return Err(ModelError::InvalidParameter {
                    param: "max_tokens",
                    message: format!(
                        "max_tokens is {n} but the prompt has {prompt} tokens and the context \
                         holds {context}: at most {} can be generated",
                        context - prompt
                    ),
                })
            }
            Some(n) => n,
            None => policy.default_max_tokens.min(context - prompt),
        };
        if prompt + max_tokens > policy.max_total_tokens {
            return Err(ModelError::InvalidParameter {
                param: "max_tokens",
                message: format!(
                    "the prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds this \
                     server's KV-cache budget of {} tokens",
                    policy.max_total_tokens
                ),
            });
        }
        Ok(max_tokens)
    }
}
