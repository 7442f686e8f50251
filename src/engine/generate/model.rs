//! A llama-family decoder on candle's quantized tensors, batched across sequences: one forward
//! pass takes a chunk of new tokens from each running sequence, runs every weight matmul once over
//! all of their rows, and does attention per sequence against that sequence's own KV cache.
//! Each row's arithmetic does not depend on which other rows share the pass, so a sequence's
//! output is the same alone or batched.

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

use super::attention::{self, CpuKv};
use super::ggml;
use super::gguf::LlamaConfig;
use super::qlinear::QLinear;

struct Layer {
    attn_norm: Tensor,
    q: QLinear,
    k: QLinear,
    v: QLinear,
    o: QLinear,
    ffn_norm: Tensor,
    gate: QLinear,
    up: QLinear,
    down: QLinear,
}

pub struct Llama {
    config: LlamaConfig,
    embeddings: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    output: QLinear,
    /// `[context, rope_dim / 2]`, indexed by position.
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

/// One sequence's keys and values in f16, preallocated for its whole token budget so that a
/// decode step writes in place instead of copying the cache.
pub struct KvCache {
    store: Store,
    len: usize,
    capacity: usize,
}

enum Store {
    Cpu(CpuKv),
    /// Per layer `[kv_heads, capacity, head_dim]` tensors on the model's device.
    Device {
        keys: Vec<Tensor>,
        values: Vec<Tensor>,
    },
}

/// New tokens of one sequence for one forward pass, with the cache they extend (generic so the
/// scheduler can speak of any decoder's cache).
pub struct Chunk<'a, C = KvCache> {
    pub tokens: &'a [u32],
    pub cache: &'a mut C,
    /// Whether the caller needs logits after the last token (false mid-prompt).
    pub logits: bool,
}

impl Llama {
    pub fn load<R: std::io::Read + std::io::Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        config: LlamaConfig,
        device: &Device,
    ) -> candle_core::Result<Self> {
        if config.rope_dim != config.head_dim {
            candle_core::bail!(
                "partial rotary embeddings ({} of {}) are not supported",
                config.rope_dim,
                config.head_dim
            );
        }
        let mut tensor = |name: &str| content.tensor(reader, name, device);
        let embeddings_q = tensor("token_embd.weight")?;
        // Rows are gathered per token; dequantised once, they cost one f32 copy of the table.
        let embeddings = embeddings_q.dequantize(device)?;
        let norm = tensor("output_norm.weight")?.dequantize(device)?;
        // Models with tied embeddings reuse the table as the output projection.
        let output = match tensor("output.weight") {
            Ok(t) => t,
            Err(_) => embeddings_q,
        };
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let mut q = |n: &str| -> candle_core::Result<QLinear> {
                QLinear::new(tensor(&format!("blk.{i}.{n}.weight"))?)
            };
            let (qw, kw, vw, ow) = (q("attn_q")?, q("attn_k")?, q("attn_v")?, q("attn_output")?);
            let (gate, up, down) = (q("ffn_gate")?, q("ffn_up")?, q("ffn_down")?);
            layers.push(Layer {
                attn_norm: tensor(&format!("blk.{i}.attn_norm.weight"))?.dequantize(device)?,
                ffn_norm: tensor(&format!("blk.{i}.ffn_norm.weight"))?.dequantize(device)?,
                q: qw,
                k: kw,
                v: vw,
                o: ow,
                gate,
                up,
                down,
            });
        }
        let (cos, sin) = rope_tables(&config, device)?;
        Ok(Self {
            embeddings,
            layers,
            norm,
            output: QLinear::new(output)?,
            cos,
            sin,
            device: device.clone(),
            config,
        })
    }

    /// A cache for a sequence of at most `capacity` tokens (prompt and generation).
    pub fn new_cache(&self, capacity: usize) -> candle_core::Result<KvCache> {
        let c = &self.config;
        let store = if self.device.is_cpu() {
            Store::Cpu(CpuKv::new(c.layers, self.attention_shape(), capacity))
        } else {
            let shape = (c.kv_heads, capacity, c.head_dim);
            let make = || -> candle_core::Result<Vec<Tensor>> {
                (0..c.layers)
                    .map(|_| Tensor::zeros(shape, DType::F16, &self.device))
                    .collect()
            };
            Store::Device {
                keys: make()?,
                values: make()?,
            }
        };
        Ok(KvCache {
            store,
            len: 0,
            capacity,
        })
    }

    fn attention_shape(&self) -> attention::Shape {
        attention::Shape {
            heads: self.config.heads,
            kv_heads: self.config.kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Runs the chunks' tokens through the model, appending to each chunk's cache. Returns one
    /// row of logits `[vocab]` per chunk that asked for them, in chunk order.
    pub fn forward(&self, chunks: &mut [Chunk]) -> candle_core::Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for chunk in chunks.iter() {
            if chunk.cache.len + chunk.tokens.len() > chunk.cache.capacity {
                candle_core::bail!(
                    "sequence outgrew its KV cache ({} + {} > {})",
                    chunk.cache.len,
                    chunk.tokens.len(),
                    chunk.cache.capacity
                );
            }
            ids.extend_from_slice(chunk.tokens);
            positions
                .extend((chunk.cache.len..chunk.cache.len + chunk.tokens.len()).map(|p| p as u32));
        }
        let rows = ids.len();
        if rows == 0 {
            return Ok(Vec::new());
        }
        let ids = Tensor::from_vec(ids, rows, &self.device)?;
        let positions = Tensor::from_vec(positions, rows, &self.device)?;
        let cos = self.cos.index_select(&positions, 0)?;
        let sin = self.sin.index_select(&positions, 0)?;
        let eps = c.rms_eps as f32;
        let rope_cpu = if self.device.is_cpu() {
            let flat = |t: &Tensor| -> candle_core::Result<Vec<f32>> { t.flatten_all()?.to_vec1() };
            Some((flat(&cos)?, flat(&sin)?))
        } else {
            None
        };
        let mut x = self.embeddings.index_select(&ids, 0)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &layer.attn_norm, eps)?;
            let rotate = |t: Tensor, heads: usize| -> candle_core::Result<Tensor> {
                if let Some((cos, sin)) = &rope_cpu {
                    let x: Vec<f32> = t.flatten_all()?.to_vec1()?;
                    let out = ggml::rope(&x, heads, c.head_dim, cos, sin, c.rope_neox);
                    return Tensor::from_vec(out, (heads, rows, c.head_dim), &self.device);
                }
                let t = t
                    .reshape((1, rows, heads, c.head_dim))?
                    .transpose(1, 2)?
                    .contiguous()?;
                let t = if c.rope_neox {
                    candle_nn::rotary_emb::rope(&t, &cos, &sin)?
                } else {
                    candle_nn::rotary_emb::rope_i(&t, &cos, &sin)?
                };
                t.squeeze(0)
            };
            // [heads, rows, head_dim]
            let q = rotate(layer.q.forward(&h)?, c.heads)?;
            let k = rotate(layer.k.forward(&h)?, c.kv_heads)?;
            let v = layer
                .v
                .forward(&h)?
                .reshape((rows, c.kv_heads, c.head_dim))?
                .transpose(0, 1)?;
            let attended = if self.device.is_cpu() {
                self.attend_cpu(li, chunks, &q, &k, &v, rows)?
            } else {
                let mut outputs = Vec::with_capacity(chunks.len());
                let mut start = 0;
                for chunk in chunks.iter_mut() {
                    let n = chunk.tokens.len();
                    if n == 0 {
                        continue;
                    }
                    outputs.push(self.attend(
                        li,
                        chunk.cache,
                        &q.narrow(1, start, n)?,
                        &k.narrow(1, start, n)?.contiguous()?,
                        &v.narrow(1, start, n)?.contiguous()?,
                    )?);
                    start += n;
                }
                Tensor::cat(&outputs, 0)?
            };
            x = (layer.o.forward(&attended)? + x)?;
            let h = self.rms_norm(&x, &layer.ffn_norm, eps)?;
            let gated = self.swiglu(&layer.gate.forward(&h)?, &layer.up.forward(&h)?)?;
            x = (layer.down.forward(&gated)? + x)?;
        }
        let mut last_rows = Vec::new();
        let mut end = 0;
        for chunk in chunks.iter_mut() {
            end += chunk.tokens.len();
            chunk.cache.len += chunk.tokens.len();
            if chunk.logits && !chunk.tokens.is_empty() {
                last_rows.push((end - 1) as u32);
            }
        }
        if last_rows.is_empty() {
            return Ok(Vec::new());
        }
        let n = last_rows.len();
        let last = x.index_select(&Tensor::from_vec(last_rows, n, &self.device)?, 0)?;
        let last = self.rms_norm(&last, &self.norm, eps)?;
        self.output.forward(&last)?.to_dtype(DType::F32)?.to_vec2()
    }

    /// RMS norm times the norm's weight; on CPU in llama.cpp's arithmetic (`ggml::rms_norm`):
    /// its output is quantized next, and a last-bit difference here can move a quant.
    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
        if !self.device.is_cpu() {
            return candle_nn::ops::rms_norm(x, weight, eps);
        }
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let w: Vec<f32> = weight.to_vec1()?;
        let mut out = vec![0f32; xs.len()];
        ggml::rms_norm(&xs, &w, eps, &mut out);
        Tensor::from_vec(out, x.shape(), &self.device)
    }

    /// `silu(gate) · up`; on CPU with llama.cpp's `exp` (`ggml::silu`), for the same reason as
    /// `rms_norm`.
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
        if !self.device.is_cpu() {
            return candle_nn::ops::silu(gate)? * up;
        }
        let g: Vec<f32> = gate.flatten_all()?.to_vec1()?;
        let u: Vec<f32> = up.flatten_all()?.to_vec1()?;
        let mut out = vec![0f32; g.len()];
        ggml::swiglu(&g, &u, &mut out);
        Tensor::from_vec(out, gate.shape(), &self.device)
    }

    /// Attention of every chunk's new rows over its cache, on CPU, in one parallel pass.
    fn attend_cpu(
        &self,
        layer: usize,
        chunks: &mut [Chunk],
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rows: usize,
    ) -> candle_core::Result<Tensor> {
        let flat = |t: &Tensor| -> candle_core::Result<Vec<f32>> { t.flatten_all()?.to_vec1() };
        let (q, k, v) = (flat(q)?, flat(k)?, flat(&v.contiguous()?)?);
        let mut start = 0;
        let mut spans = Vec::with_capacity(chunks.len());
        for chunk in chunks.iter_mut() {
            let n = chunk.tokens.len();
            let past = chunk.cache.len;
            let Store::Cpu(cache) = &mut chunk.cache.store else {
                candle_core::bail!("a device cache in a CPU forward pass");
            };
            spans.push(attention::Span {
                cache,
                start,
                n,
                past,
            });
            start += n;
        }
        let out = attention::attend(layer, self.attention_shape(), &mut spans, &q, &k, &v, rows);
        Tensor::from_vec(
            out,
            (rows, self.config.heads * self.config.head_dim),
            &self.device,
        )
    }

    /// Attention of one sequence's new rows over its cache (after appending them), with
    /// candle's ops, on devices other than the CPU.
    /// `q` is `[heads, n, head_dim]`, `k` and `v` `[kv_heads, n, head_dim]`; returns `[n, hidden]`.
    fn attend(
        &self,
        layer: usize,
        cache: &mut KvCache,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let n = q.dim(1)?;
        let past = cache.len;
        let Store::Device { keys, values } = &mut cache.store else {
            candle_core::bail!("a CPU cache in a device forward pass");
        };
        keys[layer].slice_set(&k.to_dtype(DType::F16)?, 1, past)?;
        values[layer].slice_set(&v.to_dtype(DType::F16)?, 1, past)?;
        let total = past + n;
        let keys = keys[layer].narrow(1, 0, total)?.to_dtype(DType::F32)?;
        let values = values[layer].narrow(1, 0, total)?.to_dtype(DType::F32)?;
        let group = c.heads / c.kv_heads;
        // Query heads that share a KV head become rows of one matmul against it.
        // Queries and attention weights meet the f16 cache rounded to f16, as llama.cpp's CPU
        // path does; products of f16 values are exact in f32, so the f32 matmuls below give
        // llama.cpp's numbers up to summation order.
        let q = round_f16(&q.contiguous()?)?.reshape((c.kv_heads, group * n, c.head_dim))?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let scores = (q.matmul(&keys.t()?)? * scale)?;
        let scores = if n > 1 {
            // Row i (the token at position past + i) sees keys up to past + i.
            let mask: Vec<f32> = (0..n)
                .flat_map(|i| {
                    (0..total).map(move |j| {
                        if j <= past + i {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (n, total), &self.device)?;
            scores
                .reshape((c.kv_heads, group, n, total))?
                .broadcast_add(&mask)?
                .reshape((c.kv_heads, group * n, total))?
        } else {
            scores
        };
        let probs = round_f16(&candle_nn::ops::softmax_last_dim(&scores)?)?;
        probs
            .matmul(&values)?
            .reshape((c.heads, n, c.head_dim))?
            .transpose(0, 1)?
            .reshape((n, c.heads * c.head_dim))
    }
}

fn round_f16(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F16)?.to_dtype(DType::F32)
}

/// cos and sin of every position's rotation angles, `[context, head_dim / 2]`, computed as
/// llama.cpp does (`ggml_rope_cache_init`): the angle of pair i is the position times
/// `base^(-2/d)` applied i times in f32, so long contexts round the same way.
fn rope_tables(config: &LlamaConfig, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let half = config.head_dim / 2;
    let scale = config.rope_base.powf(-2.0 / config.head_dim as f32);
    let mut cos = Vec::with_capacity(config.context_length * half);
    let mut sin = Vec::with_capacity(config.context_length * half);
    for position in 0..config.context_length {
        let mut theta = position as f32;
        for _ in 0..half {
            cos.push(theta.cos());
            sin.push(theta.sin());
            theta *= scale;
        }
    }
    let shape = (config.context_length, half);
    Ok((
        Tensor::from_vec(cos, shape, device)?,
        Tensor::from_vec(sin, shape, device)?,
    ))
}
