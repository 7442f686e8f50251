//! Request-level logic of an embedding model: tokenise texts off the runtime, check token-id
//! inputs, queue every input, and gather the vectors in input order.

use std::sync::Arc;

use super::ModelError;
use crate::batching::Batcher;
use crate::engine::embed::{BertEmbedder, EmbedInfo, EmbedTokenizer};
use crate::engine::EngineError;
use crate::metrics::BatcherMetrics;
use crate::repository::ModelSpec;

/// One input as the client sent it.
#[derive(Debug, Clone, PartialEq)]
pub enum EmbedInput {
    Text(String),
    /// Token ids used as given: the caller includes any special tokens ([CLS]/[SEP]).
    Tokens(Vec<u32>),
}

/// One result: the vector and the tokens it was computed from.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    pub vector: Vec<f32>,
    pub tokens: usize,
    pub truncated: bool,
}

pub struct EmbeddingModel {
    spec: ModelSpec,
    info: EmbedInfo,
    tokenizer: Arc<EmbedTokenizer>,
    batcher: Batcher<BertEmbedder>,
}

impl EmbeddingModel {
    /// Starts the batcher for a loaded encoder; needs a tokio runtime.
    pub fn start(
        spec: ModelSpec,
        embedder: BertEmbedder,
        tokenizer: EmbedTokenizer,
        metrics: BatcherMetrics,
    ) -> Result<Self, EngineError> {
        let info = embedder.info().clone();
        let batcher = super::start_batcher(&spec, embedder, metrics)?;
        Ok(Self {
            spec,
            info,
            tokenizer: Arc::new(tokenizer),
            batcher,
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn info(&self) -> &EmbedInfo {
        &self.info
    }

    pub fn expected_wait(&self) -> std::time::Duration {
        self.batcher.expected_wait()
    }

    /// Embeds every input; the results come back in input order. A text longer than the
    /// model's `max_seq_length` is cut there when `truncate`, refused otherwise.
    pub async fn embed(
        &self,
        inputs: Vec<EmbedInput>,
        truncate: bool,
    ) -> Result<Vec<Embedding>, ModelError> {
        if inputs.is_empty() {
            return Err(ModelError::InvalidInput {
                index: None,
                message: "the input list is empty; send at least one input".into(),
            });
        }
        let encoded = self.encode(inputs, truncate).await?;
        let meta: Vec<(usize, bool)> = encoded.iter().map(|(ids, t)| (ids.len(), *t)).collect();
        let replies = self.batcher.submit(
            encoded
                .into_iter()
                .map(|(ids, _)| {
                    let n = ids.len();
                    (ids, n)
                })
                .collect(),
        )?;
        let mut out = Vec::with_capacity(replies.len());
        for (reply, (tokens, truncated)) in replies.into_iter().zip(meta) {
            let vector = reply
                .await
                .map_err(|_| ModelError::Internal("the model's compute thread stopped".into()))??;
            out.push(Embedding {
                vector,
                tokens,
                truncated,
            });
        }
        Ok(out)
    }

    /// Token ids per input and whether truncation cut it. Texts are tokenised on the blocking
    /// pool: a long text takes milliseconds, too long for the async runtime.
    async fn encode(
        &self,
        inputs: Vec<EmbedInput>,
        truncate: bool,
    ) -> Result<Vec<(Vec<u32>, bool)>, ModelError> {
        let info = self.info.clone();
        let tokenizer = self.tokenizer.clone();
        let needs_tokenizer = inputs.iter().any(|i| matches!(i, EmbedInput::Text(_)));
        let work = move || {
            inputs
                .into_iter()
                .enumerate()
                .map(|(index, input)| match input {
                    EmbedInput::Text(text) => match tokenizer.encode(&text) {
                        Ok(e) if e.truncated && !truncate => Err(ModelError::InvalidInput {
                            index: Some(index),
                            message: format!(
                                "input {index} is longer than this model's {} tokens; shorten \
                                 it or send `truncate: true` to cut it there",
                                info.max_seq_length
                            ),
                        }),
                        Ok(e) => Ok((e.ids, e.truncated)),
                        Err(e) => Err(ModelError::InvalidInput {
                            index: Some(index),
                            message: format!("input {index}: {e}"),
                        }),
                    },
                    EmbedInput::Tokens(ids) => {
                        check_tokens(index, ids, &info).map(|ids| (ids, false))
                    }
                })
                .collect::<Result<Vec<_>, _>>()
        };
        if needs_tokenizer {
            tokio::task::spawn_blocking(work)
                .await
                .map_err(|e| ModelError::Internal(format!("tokenizer task failed: {e}")))?
        } else {
            work()
        }
    }
}

fn check_tokens(index: usize, ids: Vec<u32>, info: &EmbedInfo) -> Result<Vec<u32>, ModelError> {
    let invalid = |message: String| ModelError::InvalidInput {
        index: Some(index),
        message,
    };
    if ids.is_empty() {
        return Err(invalid(format!("input {index} has no tokens")));
    }
    if ids.len() > info.max_seq_length {
        // Cutting raw ids would drop the caller's own closing special token; texts, whose
        // special tokens we add ourselves, are truncated instead.
        return Err(invalid(format!(
            "input {index} has {} tokens; this model takes at most {}",
            ids.len(),
            info.max_seq_length
        )));
    }
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= info.vocab_size) {
        return Err(invalid(format!(
            "input {index} holds token id {bad}; this model's vocabulary has ids 0..{}",
            info.vocab_size
        )));
    }
    Ok(ids)
}
