//! A BERT encoder written for serving on candle: one fused QKV projection per layer, batched
//! attention with a padding mask, and an exact-to-1e-7 GELU (erf) that vectorises on CPU, where
//! candle's scalar `erf` was a tenth of the whole forward pass in the profile.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::add_norm::AddNorm;
use super::bf16_linear::Bf16Linear;
use super::encoder_attention::SelfAttention;
use crate::repository::Precision;

/// The `config.json` fields this encoder reads.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: usize,
}

fn default_act() -> String {
    "gelu".into()
}

fn default_eps() -> f64 {
    1e-12
}

/// `x · Wᵀ + b`, then GELU where `gelu`: f32 through candle's matmul, or the packed bf16 kernel
/// on CPU, which applies the GELU to each block of outputs while it is still in L1.
#[derive(Clone)]
enum Linear {
    /// `Wᵀ` stored contiguous so the matmul reads it row by row.
    F32 {
        weight_t: Tensor,
        bias: Tensor,
        gelu: bool,
    },
    Bf16(Arc<Bf16Linear>),
}

impl Linear {
    fn load(
        vb: VarBuilder,
        (inputs, outputs): (usize, usize),
        bf16: bool,
        gelu: bool,
    ) -> candle_core::Result<Self> {
        let weight = vb.get((outputs, inputs), "weight")?;
        Self::from_parts(&weight, vb.get(outputs, "bias")?, bf16, gelu)
    }

    fn from_parts(
        weight: &Tensor,
        bias: Tensor,
        bf16: bool,
        gelu: bool,
    ) -> candle_core::Result<Self> {
        if bf16 {
            let (outputs, inputs) = weight.dims2()?;
            let layer = Bf16Linear::new(
                &weight.flatten_all()?.to_vec1()?,
                &bias.to_vec1()?,
                outputs,
                inputs,
            );
            let layer = if gelu {
                layer.then(gelu_in_place)
            } else {
                layer
            };
            return Ok(Self::Bf16(Arc::new(layer)));
        }
        Ok(Self::F32 {
            weight_t: weight.t()?.contiguous()?,
            bias,
            gelu,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::F32 {
                weight_t,
                bias,
                gelu,
            } => {
                let y = x.matmul(weight_t)?.broadcast_add(bias)?;
                if *gelu {
                    gelu_erf(&y)
                } else {
                    Ok(y)
                }
            }
            Self::Bf16(layer) => x.contiguous()?.apply_op1_no_bwd(layer.as_ref()),
        }
    }
}

/// Layer norm, with the residual add folded in: `add_norm` on CPU, candle's ops elsewhere.
#[derive(Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
    cpu: Arc<AddNorm>,
}

impl LayerNorm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<Self> {
        // Old checkpoints name these gamma/beta.
        let (weight, bias) = match (vb.get(size, "weight"), vb.get(size, "bias")) {
            (Ok(w), Ok(b)) => (w, b),
            _ => (vb.get(size, "gamma")?, vb.get(size, "beta")?),
        };
        let cpu = Arc::new(AddNorm::new(weight.to_vec1()?, bias.to_vec1()?, eps as f32));
        Ok(Self {
            weight,
            bias,
            eps: eps as f32,
            cpu,
        })
    }

    /// The norm of `x + residual`, or of `x` alone.
    fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            let x = x.contiguous()?;
            return match residual {
                Some(r) => x.apply_op2_no_bwd(&r.contiguous()?, self.cpu.as_ref()),
                None => x.apply_op1_no_bwd(self.cpu.as_ref()),
            };
        }
        let x = match residual {
            Some(r) => (x + r)?,
            None => x.clone(),
        };
        candle_nn::ops::layer_norm(&x, &self.weight, &self.bias, self.eps)
    }
}

#[derive(Clone)]
struct Layer {
    qkv: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// The encoder: token ids in, one hidden state per token out. Cloning shares the weights.
#[derive(Clone)]
pub struct Bert {
    word_embeddings: candle_nn::Embedding,
    position_embeddings: Tensor,
    token_type_embedding: Tensor,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    head_dim: usize,
    /// What the dense layers run in: `F32` or `Bf16`, never `Auto`.
    precision: Precision,
}

impl Bert {
    pub fn load(
        vb: VarBuilder,
        config: &BertConfig,
        precision: Precision,
    ) -> candle_core::Result<Self> {
        let bf16 = match precision {
            Precision::F32 => false,
            Precision::Auto => vb.device().is_cpu() && super::bf16_linear::fast_on_this_cpu(),
            Precision::Bf16 if vb.device().is_cpu() => true,
            Precision::Bf16 => candle_core::bail!(
                "precision = \"bf16\" is implemented for CPU only; use \"f32\" or \"auto\" on CUDA"
            ),
        };
        if !matches!(config.hidden_act.as_str(), "gelu" | "gelu_python") {
            candle_core::bail!(
                "hidden_act {:?} is not supported; this encoder implements \"gelu\" (erf)",
                config.hidden_act
            );
        }
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let (h, eps) = (config.hidden_size, config.layer_norm_eps);
        let e = vb.pp("embeddings");
        let word_embeddings = candle_nn::embedding(config.vocab_size, h, e.pp("word_embeddings"))?;
        let position_embeddings = e.get(
            (config.max_position_embeddings, h),
            "position_embeddings.weight",
        )?;
        // Sentence encoders take one segment: token type 0 for every token.
        let token_type_embedding = e
            .get(
                (config.type_vocab_size.max(1), h),
                "token_type_embeddings.weight",
            )?
            .get(0)?;
        let embedding_norm = LayerNorm::load(e.pp("LayerNorm"), h, eps)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention.self");
            let weight = Tensor::cat(
                &[
                    a.get((h, h), "query.weight")?,
                    a.get((h, h), "key.weight")?,
                    a.get((h, h), "value.weight")?,
                ],
                0,
            )?;
            let bias = Tensor::cat(
                &[
                    a.get(h, "query.bias")?,
                    a.get(h, "key.bias")?,
                    a.get(h, "value.bias")?,
                ],
                0,
            )?;
            layers.push(Layer {
                qkv: Linear::from_parts(&weight, bias, bf16, false)?,
                attention_out: Linear::load(l.pp("attention.output.dense"), (h, h), bf16, false)?,
                attention_norm: LayerNorm::load(l.pp("attention.output.LayerNorm"), h, eps)?,
                intermediate: Linear::load(
                    l.pp("intermediate.dense"),
                    (h, config.intermediate_size),
                    bf16,
                    true,
                )?,
                output: Linear::load(
                    l.pp("output.dense"),
                    (config.intermediate_size, h),
                    bf16,
                    false,
                )?,
                output_norm: LayerNorm::load(l.pp("output.LayerNorm"), h, eps)?,
            });
        }
        Ok(Self {
            word_embeddings,
            position_embeddings,
            token_type_embedding,
            embedding_norm,
            layers,
            heads: config.num_attention_heads,
            head_dim: h / config.num_attention_heads,
            precision: if bf16 {
                Precision::Bf16
            } else {
                Precision::F32
            },
        })
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// `ids` is `[batch, len]` (padded), `mask` `[batch, len]` with 1 for real tokens and 0 for
    /// padding. Returns `[batch, len, hidden]`.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, len) = ids.dims2()?;
        let hidden = self.heads * self.head_dim;
        let words = self.word_embeddings.forward(&ids.flatten_all()?)?;
        let positions = self.position_embeddings.narrow(0, 0, len)?;
        let x = words
            .reshape((batch, len, hidden))?
            .broadcast_add(&positions)?
            .broadcast_add(&self.token_type_embedding)?
            .reshape((batch * len, hidden))?;
        let mut x = self.embedding_norm.forward(&x, None)?;
        let attention = Attention::new(self, mask)?;
        for layer in &self.layers {
            let context = attention.forward(&layer.qkv.forward(&x)?)?;
            let attended = layer
                .attention_norm
                .forward(&layer.attention_out.forward(&context)?, Some(&x))?;
            let inner = layer.intermediate.forward(&attended)?;
            x = layer
                .output_norm
                .forward(&layer.output.forward(&inner)?, Some(&attended))?;
        }
        x.reshape((batch, len, hidden))
    }
}

/// Self-attention from the fused QKV output `[batch · len, 3 · hidden]` to the context `[batch ·
/// len, hidden]`: one op on CPU (`encoder_attention`), candle's ops elsewhere.
enum Attention<'a> {
    Cpu {
        op: SelfAttention,
        mask: &'a Tensor,
    },
    Ops {
        /// 0 for real keys, -1e9 for padding: softmax gives padding exactly zero weight.
        mask_bias: Tensor,
        batch: usize,
        len: usize,
        heads: usize,
        head_dim: usize,
    },
}

impl<'a> Attention<'a> {
    fn new(bert: &Bert, mask: &'a Tensor) -> candle_core::Result<Self> {
        let (heads, head_dim) = (bert.heads, bert.head_dim);
        if mask.device().is_cpu() && mask.dtype() == DType::F32 {
            return Ok(Self::Cpu {
                op: SelfAttention { heads, head_dim },
                mask,
            });
        }
        let (batch, len) = mask.dims2()?;
        Ok(Self::Ops {
            mask_bias: ((mask - 1.0)? * 1e9f64)?.reshape((batch, 1, 1, len))?,
            batch,
            len,
            heads,
            head_dim,
        })
    }

    fn forward(&self, qkv: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Cpu { op, mask } => qkv.apply_op2_no_bwd(mask, op),
            Self::Ops {
                mask_bias,
                batch,
                len,
                heads,
                head_dim,
            } => {
                let qkv = qkv
                    .reshape((*batch, *len, 3, *heads, *head_dim))?
                    .permute((2, 0, 3, 1, 4))?;
                let scale = 1.0 / (*head_dim as f64).sqrt();
                let q = (qkv.get(0)? * scale)?.contiguous()?;
                let k = qkv.get(1)?.contiguous()?;
                let v = qkv.get(2)?.contiguous()?;
                let scores = q.matmul(&k.t()?)?.broadcast_add(mask_bias)?;
                let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                probs
                    .matmul(&v)?
                    .transpose(1, 2)?
                    .reshape((batch * len, heads * head_dim))
            }
        }
    }
}

/// GELU with erf: the fast kernel below on CPU, candle's own op elsewhere.
fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    match x.device() {
        Device::Cpu if x.dtype() == DType::F32 => x.apply_op1_no_bwd(&FastGelu),
        _ => x.gelu_erf(),
    }
}

struct FastGelu;

impl CustomOp1 for FastGelu {
    fn name(&self) -> &'static str {
        "fast-gelu-erf"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut out = super::contiguous_f32(self.name(), storage, layout)?.to_vec();
        gelu_in_place(&mut out);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

super::fma_dispatched! {
    /// Applies GELU to every element in place, with the widest vectors the CPU has.
    pub fn gelu_in_place(x: &mut [f32]) {
        gelu_portable(x)
    }
}

#[inline(always)]
fn gelu_portable(x: &mut [f32]) {
    for x in x {
        *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// erf by Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7), branch-free so it vectorises.
#[inline(always)]
fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let ax = x.abs();
    let t = 1.0 / (1.0 + P * ax);
    let poly = ((((A[4] * t + A[3]) * t + A[2]) * t + A[1]) * t + A[0]) * t;
    let y = 1.0 - poly * exp_neg(ax * ax);
    y.copysign(x)
}

/// e^(-x) for x ≥ 0, relative error below 2e-7: 2^n · p(r) with a degree-6 polynomial.
#[inline(always)]
pub(super) fn exp_neg(x: f32) -> f32 {
    let v = (-x).max(-87.0);
    let n = (v * std::f32::consts::LOG2_E + 0.5).floor();
    let r = v - n * std::f32::consts::LN_2;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n from the bits of n + 127 + 2^23 (n is in [-126, 0]): integer ops only. `n as i32`
    // saturates and checks for NaN, which kept the loop scalar.
    let biased = (n + (127.0 + 8_388_608.0)).to_bits() - 0x4b00_0000;
    let scale = f32::from_bits(biased << 23);
    p * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_one_op_attention_equals_candles_ops_on_real_tokens() {
        let (batch, len, heads, head_dim) = (3, 9, 4, 8);
        let hidden = heads * head_dim;
        let qkv = Tensor::from_vec(
            crate::engine::pseudo_random(batch * len * 3 * hidden, 11),
            (batch * len, 3 * hidden),
            &Device::Cpu,
        )
        .unwrap();
        let lengths = [9, 5, 1];
        let mask: Vec<f32> = lengths
            .iter()
            .flat_map(|&n| (0..len).map(move |j| if j < n { 1.0 } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (batch, len), &Device::Cpu).unwrap();
        let one_op = Attention::Cpu {
            op: SelfAttention { heads, head_dim },
            mask: &mask,
        };
        let ops = Attention::Ops {
            mask_bias: ((&mask - 1.0).unwrap() * 1e9f64)
                .unwrap()
                .reshape((batch, 1, 1, len))
                .unwrap(),
            batch,
            len,
            heads,
            head_dim,
        };
        let a: Vec<Vec<f32>> = one_op.forward(&qkv).unwrap().to_vec2().unwrap();
        let b: Vec<Vec<f32>> = ops.forward(&qkv).unwrap().to_vec2().unwrap();
        for (seq, &n) in lengths.iter().enumerate() {
            for t in 0..n {
                let row = seq * len + t;
                for (x, y) in a[row].iter().zip(&b[row]) {
                    assert!((x - y).abs() < 1e-5, "row {row}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn fast_gelu_matches_the_exact_one() {
        let xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 / 400.0).collect();
        let mut got = xs.clone();
        gelu_in_place(&mut got);
        for (x, g) in xs.iter().zip(got) {
            let exact =
                0.5 * *x as f64 * (1.0 + candle_core::cpu::erf::erf_f64(*x as f64 / 2f64.sqrt()));
            assert!(
                (g as f64 - exact).abs() < 3e-6,
                "gelu({x}) = {g}, exact {exact}"
            );
        }
        let mut out = [-100.0, 100.0];
        gelu_in_place(&mut out);
        assert_eq!(out, [0.0, 100.0]);
    }
}
