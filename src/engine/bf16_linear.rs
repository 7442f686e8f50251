//! A linear layer with bf16 weights for CPUs, used where the encoder runs its dense layers.
//!
//! The profile of the f32 encoder at serving batch sizes was two thirds gemm at close to the f32
//! FMA peak, so only fewer bits per multiply could make it faster. AVX-512 BF16's `vdpbf16ps`
//! does two multiply-adds per f32 lane, twice the f32 rate, and halves the bytes of weights
//! streamed per batch. Weights are rounded to bf16 once at load and packed in the instruction's
//! pair layout; activations are rounded per call; products are exact and sums stay in f32.
//! Every output row is computed the same way whatever the batch, so results are batch-invariant.
//!
//! Without AVX-512 BF16 a portable kernel computes the same products (slower); `Precision::Auto`
//! only picks this layer when the instruction is there.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

/// Output columns per packed panel: two 16-lane registers.
const NR: usize = 32;
/// Rows per microkernel call: 12 × 2 accumulators + 2 weight registers + 1 broadcast ≤ 32.
const MR: usize = 12;
/// Activation bytes (as bf16 pairs) per row chunk: a quarter of a 1 MiB L2.
const A_CHUNK_BYTES: usize = 256 << 10;

/// `x · Wᵀ + b` with `W` rounded to bf16 and packed for `vdpbf16ps`.
pub struct Bf16Linear {
    inputs: usize,
    outputs: usize,
    /// `inputs` rounded up to even, in pairs.
    pairs: usize,
    /// `[panel][pair][NR]`: lane `j` of pair `p` holds `W[col][2p]` (low half) and
    /// `W[col][2p + 1]` (high half) for `col = panel · NR + j`; zero past the last column.
    packed: Vec<u32>,
    /// `outputs` long.
    bias: Vec<f32>,
}

/// Whether this CPU has the instruction the fast kernel needs.
pub fn native_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// f32 → bf16 bits, rounding to nearest even (as `vcvtneps2bf16` does); NaN stays NaN.
#[inline(always)]
fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

#[inline(always)]
fn from_bf16(h: u32) -> f32 {
    f32::from_bits(h << 16)
}

/// Two bf16 values in one lane, `lo` in the low half.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    u32::from(to_bf16(lo)) | (u32::from(to_bf16(hi)) << 16)
}

impl Bf16Linear {
    /// `weight` is `[outputs, inputs]` row-major (the PyTorch layout), `bias` `[outputs]`.
    pub fn new(weight: &[f32], bias: &[f32], outputs: usize, inputs: usize) -> Self {
        assert_eq!(
            weight.len(),
            outputs * inputs,
            "weight is [outputs, inputs]"
        );
        assert_eq!(bias.len(), outputs, "bias is [outputs]");
        let pairs = inputs.div_ceil(2);
        let panels = outputs.div_ceil(NR);
        let mut packed = vec![0u32; panels * pairs * NR];
        let w = |col: usize, k: usize| {
            if k < inputs {
                weight[col * inputs + k]
            } else {
                0.0
            }
        };
        for col in 0..outputs {
            let (panel, lane) = (col / NR, col % NR);
            for p in 0..pairs {
                packed[(panel * pairs + p) * NR + lane] = pair(w(col, 2 * p), w(col, 2 * p + 1));
            }
        }
        Self {
            inputs,
            outputs,
            pairs,
            packed,
            bias: bias.to_vec(),
        }
    }

    /// `x` is `[rows, inputs]`, `out` `[rows, outputs]`, both row-major.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        self.forward_with(x, out, native_supported());
    }

    fn forward_with(&self, x: &[f32], out: &mut [f32], native: bool) {
        let rows = x.len() / self.inputs;
        assert_eq!(x.len(), rows * self.inputs, "x is [rows, inputs]");
        assert_eq!(out.len(), rows * self.outputs, "out is [rows, outputs]");
        let pairs = self.pairs;
        let mut a = vec![0u32; rows * pairs];
        for (row, dst) in x.chunks_exact(self.inputs).zip(a.chunks_exact_mut(pairs)) {
            let mut src = row.chunks_exact(2);
            for (d, s) in dst.iter_mut().zip(&mut src) {
                *d = pair(s[0], s[1]);
            }
            if let [last] = src.remainder() {
                dst[pairs - 1] = pair(*last, 0.0);
            }
        }
        // Rows go in chunks whose activations stay in L2 while every weight panel passes by;
        // one pass over all rows per panel streamed them from L3 once the batch grew.
        let chunk = (A_CHUNK_BYTES / (pairs * 4)).max(MR) / MR * MR;
        for first in (0..rows).step_by(chunk) {
            let last = rows.min(first + chunk);
            for panel in 0..self.outputs.div_ceil(NR) {
                let b = &self.packed[panel * pairs * NR..(panel + 1) * pairs * NR];
                let col0 = panel * NR;
                let bias = &self.bias[col0..self.outputs.min(col0 + NR)];
                for row0 in (first..last).step_by(MR) {
                    let block = Block {
                        a: &a[row0 * pairs..],
                        pairs,
                        b,
                        bias,
                        out: &mut out[row0 * self.outputs + col0..],
                        ldc: self.outputs,
                    };
                    let n = MR.min(last - row0);
                    #[cfg(target_arch = "x86_64")]
                    if native {
                        // Safety: `native` is only true when avx512f and avx512bf16 were
                        // detected.
                        unsafe { native_block(block, n) };
                        continue;
                    }
                    let _ = native;
                    portable_block(block, n);
                }
            }
        }
    }
}

/// One microkernel call's operands: `n` rows of `a` against one panel of `b`.
struct Block<'a> {
    a: &'a [u32],
    pairs: usize,
    b: &'a [u32],
    bias: &'a [f32],
    out: &'a mut [f32],
    ldc: usize,
}

fn portable_block(blk: Block, n: usize) {
    for r in 0..n {
        let a = &blk.a[r * blk.pairs..(r + 1) * blk.pairs];
        let mut acc = [0f32; NR];
        for (p, &ap) in a.iter().enumerate() {
            let (alo, ahi) = (from_bf16(ap & 0xffff), from_bf16(ap >> 16));
            for (j, &bp) in blk.b[p * NR..(p + 1) * NR].iter().enumerate() {
                acc[j] += alo * from_bf16(bp & 0xffff) + ahi * from_bf16(bp >> 16);
            }
        }
        let out = &mut blk.out[r * blk.ldc..r * blk.ldc + blk.bias.len()];
        for ((o, a), b) in out.iter_mut().zip(acc).zip(blk.bias) {
            *o = a + b;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn native_block(blk: Block, n: usize) {
    macro_rules! dispatch {
        ($($r:literal)*) => {
            match n { $($r => native_kernel::<$r>(blk),)* _ => unreachable!("MR is 12") }
        };
    }
    dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
}

/// `R` rows × 32 columns, all accumulators in registers; the weight panel is read once per
/// pair for all `R` rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn native_kernel<const R: usize>(blk: Block) {
    use std::arch::x86_64::*;
    let (a, b, pairs) = (blk.a.as_ptr(), blk.b.as_ptr(), blk.pairs);
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for p in 0..pairs {
        // Safety (all loads): the panel holds `pairs × NR` lanes and `a` holds `R` rows of
        // `pairs`, as `forward_with` sliced them.
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR).cast()));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16).cast()));
        for (r, acc) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * pairs + p) as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
        }
    }
    let cols = blk.bias.len();
    let masks = [lane_mask(cols), lane_mask(cols.saturating_sub(16))];
    let bias = blk.bias.as_ptr();
    let out = blk.out.as_mut_ptr();
    for (r, acc) in acc.iter().enumerate() {
        for (h, (&v, &mask)) in acc.iter().zip(&masks).enumerate() {
            let bv = _mm512_maskz_loadu_ps(mask, bias.add(h * 16));
            _mm512_mask_storeu_ps(out.add(r * blk.ldc + h * 16), mask, _mm512_add_ps(v, bv));
        }
    }
}

/// The first `n` of 16 lanes.
fn lane_mask(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        ((1u32 << n) - 1) as u16
    }
}

impl CustomOp1 for Bf16Linear {
    fn name(&self) -> &'static str {
        "bf16-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::contiguous_f32(self.name(), storage, layout)?;
        let dims = layout.shape().dims();
        if dims.last() != Some(&self.inputs) {
            candle_core::bail!(
                "bf16-linear: input {dims:?} does not end in {}",
                self.inputs
            );
        }
        let mut out = vec![0f32; x.len() / self.inputs * self.outputs];
        self.forward(x, &mut out);
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("checked above") = self.outputs;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::pseudo_random;

    /// The same products in f64 from the bf16-rounded operands: what both kernels must equal
    /// up to f32 summation error.
    fn reference(x: &[f32], w: &[f32], bias: &[f32], rows: usize, outputs: usize) -> Vec<f32> {
        let inputs = w.len() / outputs;
        let r = |v: f32| from_bf16(u32::from(to_bf16(v))) as f64;
        let mut out = vec![0f32; rows * outputs];
        for i in 0..rows {
            for j in 0..outputs {
                let dot: f64 = (0..inputs)
                    .map(|k| r(x[i * inputs + k]) * r(w[j * inputs + k]))
                    .sum();
                out[i * outputs + j] = (dot + bias[j] as f64) as f32;
            }
        }
        out
    }

    #[test]
    fn rounding_is_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to the even one.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(from_bf16(u32::from(to_bf16(f32::NAN))).is_nan());
        assert_eq!(from_bf16(u32::from(to_bf16(-2.5))), -2.5);
    }

    #[test]
    fn both_kernels_match_the_reference_on_odd_shapes() {
        // Odd inputs (a padded pair), outputs not a multiple of 32 (masked stores), and row
        // counts around the 12-row block.
        for (rows, inputs, outputs) in [(1, 7, 5), (13, 33, 40), (25, 64, 96), (12, 2, 17)] {
            let x = pseudo_random(rows * inputs, 1);
            let w = pseudo_random(outputs * inputs, 2);
            let bias = pseudo_random(outputs, 3);
            let layer = Bf16Linear::new(&w, &bias, outputs, inputs);
            let want = reference(&x, &w, &bias, rows, outputs);
            let mut modes = vec![false];
            if native_supported() {
                modes.push(true);
            }
            for native in modes {
                let mut got = vec![f32::NAN; rows * outputs];
                layer.forward_with(&x, &mut got, native);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "native={native} {rows}x{inputs}x{outputs} [{i}]: {g} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_its_batch() {
        let (inputs, outputs) = (48, 64);
        let w = pseudo_random(outputs * inputs, 4);
        let layer = Bf16Linear::new(&w, &vec![0.0; outputs], outputs, inputs);
        let x = pseudo_random(17 * inputs, 5);
        let mut all = vec![0f32; 17 * outputs];
        layer.forward(&x, &mut all);
        for row in [0, 11, 12, 16] {
            let mut one = vec![0f32; outputs];
            layer.forward(&x[row * inputs..(row + 1) * inputs], &mut one);
            assert_eq!(one, all[row * outputs..(row + 1) * outputs], "row {row}");
        }
    }
}
