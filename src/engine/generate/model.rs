//! A llama-family decoder on candle's quantized tensors, batched across sequences: one forward
//! pass takes a chunk of new tokens from each running sequence, runs every weight matmul once over
//! all of their rows, and does attention per sequence against that sequence's own KV cache.
//! Each row's arithmetic does not depend on which other rows share the pass, so a sequence's
//! output is the same alone or batched.
//!
//! On CPU the pass runs on plain host rows (`forward_cpu`) in llama.cpp's arithmetic; on other
//! devices it runs on candle's ops (`forward_device`), equal to it only up to rounding.

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Tensor};

use super::attention::{self, CpuKv};
use super::ggml;
use super::gguf::LlamaConfig;
use super::qlinear::QLinear;
use super::Numerics;

struct Layer {
    attn_norm: Norm,
    /// q, k and v.
    qkv: Projections,
    o: QLinear,
    ffn_norm: Norm,
    /// gate and up.
    gate_up: Projections,
    down: QLinear,
}

/// An RMS norm's weight, on the model's device and as host floats for the CPU path.
struct Norm {
    weight: Tensor,
    host: Vec<f32>,
}

impl Norm {
    fn new(weight: Tensor) -> candle_core::Result<Self> {
        let host = weight.to_dtype(DType::F32)?.to_vec1()?;
        Ok(Self { weight, host })
    }
}

/// Projections of one input: one fused matmul where the kernels allow it (on CPU, every part in
/// the same format), else one matmul each.
enum Projections {
    Fused { linear: QLinear, widths: Vec<usize> },
    Separate(Vec<QLinear>),
}

impl Projections {
    fn new(parts: Vec<QTensor>, numerics: Numerics) -> candle_core::Result<Self> {
        if let Some(linear) = QLinear::fused(&parts, numerics)? {
            let widths = parts
                .iter()
                .map(|t| t.shape().dims2().map(|d| d.0))
                .collect::<candle_core::Result<_>>()?;
            return Ok(Self::Fused { linear, widths });
        }
        Ok(Self::Separate(
            parts
                .into_iter()
                .map(|t| QLinear::new(t, numerics))
                .collect::<candle_core::Result<_>>()?,
        ))
    }

    /// Each part's output for `x` `[rows, in]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        match self {
            Self::Separate(parts) => parts.iter().map(|p| p.forward(x)).collect(),
            Self::Fused { linear, widths } => {
                let y = linear.forward(x)?;
                let mut start = 0;
                widths
                    .iter()
                    .map(|&w| {
                        start += w;
                        y.narrow(1, start - w, w)
                    })
                    .collect()
            }
        }
    }

    /// Each part's output `[rows, out_i]` for host rows `x`.
    fn forward_rows(&self, x: &[f32], rows: usize) -> candle_core::Result<Vec<Vec<f32>>> {
        match self {
            Self::Separate(parts) => parts.iter().map(|p| p.forward_rows(x, rows)).collect(),
            Self::Fused { linear, widths } => {
                let y = linear.forward_rows(x, rows)?;
                let total: usize = widths.iter().sum();
                let mut out: Vec<Vec<f32>> = widths
                    .iter()
                    .map(|w| Vec::with_capacity(rows * w))
                    .collect();
                for row in y.chunks_exact(total) {
                    let mut start = 0;
                    for (part, &w) in out.iter_mut().zip(widths) {
                        part.extend_from_slice(&row[start..start + w]);
                        start += w;
                    }
                }
                Ok(out)
            }
        }
    }
}

pub struct Llama {
    config: LlamaConfig,
    embeddings: Tensor,
    layers: Vec<Layer>,
    norm: Norm,
    output: QLinear,
    /// `[context, rope_dim / 2]`, indexed by position: on the device, and on the host for the
    /// CPU path.
    cos: Tensor,
    sin: Tensor,
    cos_host: Vec<f32>,
    sin_host: Vec<f32>,
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
        numerics: Numerics,
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
        let norm = Norm::new(tensor("output_norm.weight")?.dequantize(device)?)?;
        // Models with tied embeddings reuse the table as the output projection.
        let output = match tensor("output.weight") {
            Ok(t) => t,
            Err(_) => embeddings_q,
        };
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let mut q = |n: &str| tensor(&format!("blk.{i}.{n}.weight"));
            let qkv = Projections::new(vec![q("attn_q")?, q("attn_k")?, q("attn_v")?], numerics)?;
            let gate_up = Projections::new(vec![q("ffn_gate")?, q("ffn_up")?], numerics)?;
            layers.push(Layer {
                attn_norm: Norm::new(q("attn_norm")?.dequantize(device)?)?,
                qkv,
                o: QLinear::new(q("attn_output")?, numerics)?,
                ffn_norm: Norm::new(q("ffn_norm")?.dequantize(device)?)?,
                gate_up,
                down: QLinear::new(q("ffn_down")?, numerics)?,
            });
        }
        let (cos_host, sin_host) = rope_tables(&config);
        let shape = (config.context_length, config.head_dim / 2);
        Ok(Self {
            embeddings,
            layers,
            norm,
            output: QLinear::new(output, numerics)?,
            cos: Tensor::from_slice(&cos_host, shape, device)?,
            sin: Tensor::from_slice(&sin_host, shape, device)?,
            cos_host,
            sin_host,
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

    /// Makes `to` hold the first `len` positions of `from` (both caches of this model), as if
    /// they had been computed into it.
    pub fn copy_prefix(
        &self,
        from: &KvCache,
        to: &mut KvCache,
        len: usize,
    ) -> candle_core::Result<()> {
        if len > from.len || len > to.capacity {
            candle_core::bail!(
                "prefix of {len} tokens from a cache of {} into one of capacity {}",
                from.len,
                to.capacity
            );
        }
        match (&from.store, &mut to.store) {
            (Store::Cpu(a), Store::Cpu(b)) => a.copy_prefix(b, self.attention_shape(), len),
            (
                Store::Device { keys, values },
                Store::Device {
                    keys: to_keys,
                    values: to_values,
                },
            ) => {
                for (src, dst) in keys.iter().zip(to_keys).chain(values.iter().zip(to_values)) {
                    dst.slice_set(&src.narrow(1, 0, len)?, 1, 0)?;
                }
            }
            _ => candle_core::bail!("caches on different devices"),
        }
        to.len = len;
        Ok(())
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
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        // The rows whose logits are wanted: the last of each chunk that asks.
        let mut last_rows = Vec::new();
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
            if chunk.logits && !chunk.tokens.is_empty() {
                last_rows.push(ids.len() - 1);
            }
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let logits = if self.device.is_cpu() {
            self.forward_cpu(chunks, &ids, &positions, &last_rows)?
        } else {
            self.forward_device(chunks, ids, positions, &last_rows)?
        };
        for chunk in chunks.iter_mut() {
            chunk.cache.len += chunk.tokens.len();
        }
        Ok(logits)
    }

    /// The CPU pass, on host rows in llama.cpp's arithmetic (`ggml.rs`, `attention.rs` and the
    /// Q8_1 kernels of `qlinear.rs`): every step whose output is quantized next must round as
    /// llama.cpp's does, or a last-bit difference moves a quant.
    fn forward_cpu(
        &self,
        chunks: &mut [Chunk],
        ids: &[u32],
        positions: &[u32],
        last_rows: &[usize],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let (rows, hidden, d) = (ids.len(), c.hidden, c.head_dim);
        let eps = c.rms_eps as f32;
        let ids = Tensor::from_slice(ids, rows, &self.device)?;
        let mut x: Vec<f32> = self
            .embeddings
            .index_select(&ids, 0)?
            .flatten_all()?
            .to_vec1()?;
        // This pass's rows of a `[context, head_dim / 2]` table.
        let table = |t: &[f32]| -> Vec<f32> {
            let mut picked = Vec::with_capacity(positions.len() * d / 2);
            for &p in positions {
                picked.extend_from_slice(&t[p as usize * (d / 2)..][..d / 2]);
            }
            picked
        };
        let (cos, sin) = (table(&self.cos_host), table(&self.sin_host));
        let mut h = vec![0f32; rows * hidden];
        for (li, layer) in self.layers.iter().enumerate() {
            ggml::rms_norm(&x, &layer.attn_norm.host, eps, &mut h);
            let [q, k, v] = parts(layer.qkv.forward_rows(&h, rows)?)?;
            // [heads, rows, head_dim]
            let q = ggml::rope(&q, c.heads, d, &cos, &sin, c.rope_neox);
            let k = ggml::rope(&k, c.kv_heads, d, &cos, &sin, c.rope_neox);
            let v = heads_first(&v, rows, c.kv_heads, d);
            let attended = self.attend_cpu(li, chunks, &q, &k, &v, rows)?;
            add_into(&mut x, &layer.o.forward_rows(&attended, rows)?);
            ggml::rms_norm(&x, &layer.ffn_norm.host, eps, &mut h);
            let [gate, up] = parts(layer.gate_up.forward_rows(&h, rows)?)?;
            let mut gated = vec![0f32; gate.len()];
            ggml::swiglu(&gate, &up, &mut gated);
            add_into(&mut x, &layer.down.forward_rows(&gated, rows)?);
        }
        if last_rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut last = Vec::with_capacity(last_rows.len() * hidden);
        for &r in last_rows {
            last.extend_from_slice(&x[r * hidden..][..hidden]);
        }
        let mut normed = vec![0f32; last.len()];
        ggml::rms_norm(&last, &self.norm.host, eps, &mut normed);
        let logits = self.output.forward_rows(&normed, last_rows.len())?;
        let vocab = logits.len() / last_rows.len();
        Ok(logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    /// The pass on other devices, with candle's ops.
    fn forward_device(
        &self,
        chunks: &mut [Chunk],
        ids: Vec<u32>,
        positions: Vec<u32>,
        last_rows: &[usize],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let rows = ids.len();
        let ids = Tensor::from_vec(ids, rows, &self.device)?;
        let positions = Tensor::from_vec(positions, rows, &self.device)?;
        let cos = self.cos.index_select(&positions, 0)?;
        let sin = self.sin.index_select(&positions, 0)?;
        let eps = c.rms_eps as f32;
        let rotate = |t: Tensor, heads: usize| -> candle_core::Result<Tensor> {
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
        let mut x = self.embeddings.index_select(&ids, 0)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm.weight, eps)?;
            let [q, k, v] = parts(layer.qkv.forward(&h)?)?;
            // [heads, rows, head_dim]
            let q = rotate(q, c.heads)?;
            let k = rotate(k, c.kv_heads)?;
            let v = v.reshape((rows, c.kv_heads, c.head_dim))?.transpose(0, 1)?;
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
            x = (layer.o.forward(&Tensor::cat(&outputs, 0)?)? + x)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm.weight, eps)?;
            let [gate, up] = parts(layer.gate_up.forward(&h)?)?;
            x = (layer.down.forward(&(candle_nn::ops::silu(&gate)? * up)?)? + x)?;
        }
        if last_rows.is_empty() {
            return Ok(Vec::new());
        }
        let n = last_rows.len();
        let last_rows = last_rows.iter().map(|&r| r as u32).collect();
        let last = x.index_select(&Tensor::from_vec(last_rows, n, &self.device)?, 0)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm.weight, eps)?;
        self.output.forward(&last)?.to_dtype(DType::F32)?.to_vec2()
    }

    /// Attention of every chunk's new rows over its cache, on CPU, in one parallel pass.
    /// `q` is `[heads, rows, head_dim]`, `k` and `v` `[kv_heads, rows, head_dim]`.
    fn attend_cpu(
        &self,
        layer: usize,
        chunks: &mut [Chunk],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        rows: usize,
    ) -> candle_core::Result<Vec<f32>> {
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
        Ok(attention::attend(
            layer,
            self.attention_shape(),
            &mut spans,
            q,
            k,
            v,
            rows,
        ))
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

/// The `N` parts of a projection, as an array.
fn parts<T, const N: usize>(parts: Vec<T>) -> candle_core::Result<[T; N]> {
    let n = parts.len();
    parts
        .try_into()
        .map_err(|_| candle_core::Error::Msg(format!("{n} projections where {N} were expected")))
}

/// `[rows, heads, dim]` to `[heads, rows, dim]`.
fn heads_first(x: &[f32], rows: usize, heads: usize, dim: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for h in 0..heads {
        for r in 0..rows {
            out.extend_from_slice(&x[(r * heads + h) * dim..][..dim]);
        }
    }
    out
}

/// `x += y`, element by element (the residual connections).
fn add_into(x: &mut [f32], y: &[f32]) {
    for (x, y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

/// cos and sin of every position's rotation angles, `[context, head_dim / 2]`, computed as
/// llama.cpp does (`ggml_rope_cache_init`): the angle of pair i is the position times
/// `base^(-2/d)` applied i times in f32, so long contexts round the same way.
fn rope_tables(config: &LlamaConfig) -> (Vec<f32>, Vec<f32>) {
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
    (cos, sin)
}
