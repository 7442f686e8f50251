//! The encoder's self-attention on CPU as one op: scores, padding mask, softmax and the weighted
//! sum of values for every head, read straight from the fused QKV projection's output.
//!
//! Done with candle's ops it took a permute and three copies for q, k and v, a `[batch, heads,
//! len, len]` score tensor (past 2 MiB at 16 × 60, so fresh pages from the OS every batch), a
//! mask add, libm's scalar `expf` and two batched matmuls whose calls cost more than their work
//! at these sizes: about a quarter of a 16 × 60 forward pass in the profile. Here a query's
//! scores live in one short buffer, padding keys are skipped rather than masked, and the
//! exponential is the vectorised one the GELU uses.
//!
//! Each sequence's numbers depend only on its own tokens, in a fixed order, so a text gives the
//! same bits alone and inside any padded batch.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape};

use super::bert::exp_neg;

/// `forward`'s operands, passed on together.
#[derive(Clone, Copy)]
struct Input<'a> {
    qkv: &'a [f32],
    mask: &'a [f32],
    len: usize,
}

/// `softmax(q·kᵀ · scale) · v` per head, over the keys the mask marks real.
pub struct SelfAttention {
    pub heads: usize,
    pub head_dim: usize,
}

impl SelfAttention {
    /// `qkv` is `[batch · len, 3 · hidden]` (q, then k, then v, each head's `head_dim` columns
    /// together), `mask` `[batch · len]` with non-zero for real tokens; `out` is `[batch · len,
    /// hidden]`. Rows of padding tokens get zeros: nothing reads them but row-wise layers.
    pub fn forward(&self, qkv: &[f32], mask: &[f32], len: usize, out: &mut [MaybeUninit<f32>]) {
        let simd = lanes::Simd::detect();
        let input = Input { qkv, mask, len };
        #[cfg(target_arch = "x86_64")]
        {
            // Safety (both): `Simd` names a feature only where it was detected.
            if simd.avx512() {
                return unsafe { self.forward_avx512(input, out, simd) };
            }
            if simd.avx2() {
                return unsafe { self.forward_avx2(input, out, simd) };
            }
        }
        self.forward_portable(input, out, simd);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn forward_avx512(&self, input: Input, out: &mut [MaybeUninit<f32>], simd: lanes::Simd) {
        self.forward_portable(input, out, simd);
    }

    /// Rust never contracts a multiply and an add into an FMA, so the bits stay the portable
    /// form's.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn forward_avx2(&self, input: Input, out: &mut [MaybeUninit<f32>], simd: lanes::Simd) {
        self.forward_portable(input, out, simd);
    }

    /// Written for the auto-vectoriser: sums run lane-wise over fixed groups of `LANES` keys or
    /// value columns, with multiplies and adds kept apart (Rust never fuses them), so every
    /// build of this function gives the same bits.
    #[inline(always)]
    fn forward_portable(&self, input: Input, out: &mut [MaybeUninit<f32>], simd: lanes::Simd) {
        let Input { qkv, mask, len } = input;
        let (heads, hd, hidden) = (self.heads, self.head_dim, self.heads * self.head_dim);
        let hd_pad = hd.next_multiple_of(LANES);
        let stride = 3 * hidden;
        let scale = 1.0 / (hd as f32).sqrt();
        // Per sequence, every head's scaled queries (`[head][query][hd]`), keys transposed
        // (`[head][hd][keys]`, so a query's scores are a run of lane-wise multiply-adds) and
        // values as rows (`[head][key][hd]`); queries padded with zeros to whole groups of
        // `QUERIES`, keys and columns to whole lane groups. They are gathered in passes over
        // the sequence's rows in order: a pass per head read two cache lines from each row
        // 4.5 KiB apart, which the prefetcher could not follow, and those loads were half of
        // this op's time at 60 tokens.
        let (mut queries, mut keys_t, mut values, mut scores, mut key_rows) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (seq, seq_mask) in mask.chunks_exact(len).enumerate() {
            let real: Vec<usize> = (0..len).filter(|&j| seq_mask[j] != 0.0).collect();
            // Real rows are written whole below (every head's columns); only padding is zeroed.
            for (t, _) in seq_mask.iter().enumerate().filter(|(_, &m)| m == 0.0) {
                out[(seq * len + t) * hidden..][..hidden].fill(MaybeUninit::new(0.0));
            }
            let n = real.len();
            let n_pad = n.next_multiple_of(LANES);
            let n_q = n.next_multiple_of(QUERIES);
            queries.clear();
            queries.resize(heads * n_q * hd, 0.0);
            keys_t.clear();
            keys_t.resize(heads * hd * n_pad, 0.0);
            values.clear();
            values.resize(heads * n * hd_pad, 0.0);
            let row = |t: usize| &qkv[(seq * len + t) * stride..][..stride];
            for (j, &t) in real.iter().enumerate() {
                let r = row(t);
                let (r_q, r_v) = (&r[..hidden], &r[2 * hidden..]);
                for h in 0..heads {
                    let q = &mut queries[(h * n_q + j) * hd..][..hd];
                    for (q, x) in q.iter_mut().zip(&r_q[h * hd..][..hd]) {
                        *q = x * scale;
                    }
                    values[(h * n + j) * hd_pad..][..hd].copy_from_slice(&r_v[h * hd..][..hd]);
                }
            }
            // Keys transposed a lane group at a time: each line of `keys_t` is written whole,
            // from the same few rows (a row at a time scattered into every line and missed).
            for (b, block) in real.chunks(LANES).enumerate() {
                key_rows.clear();
                key_rows.extend(block.iter().map(|&t| &row(t)[hidden..2 * hidden]));
                for (c, line) in keys_t.chunks_exact_mut(n_pad).enumerate() {
                    for (x, r) in line[b * LANES..].iter_mut().zip(&key_rows) {
                        *x = r[c];
                    }
                }
            }
            for h in 0..heads {
                let keys_t = &keys_t[h * hd * n_pad..][..hd * n_pad];
                let values = &values[h * n * hd_pad..][..n * hd_pad];
                let queries = &queries[h * n_q * hd..][..n_q * hd];
                // Queries go in groups of `QUERIES`, each with its own sums (the same order as
                // alone): independent chains of adds instead of one waiting on the last.
                for (g, group) in real.chunks(QUERIES).enumerate() {
                    let q = &queries[g * QUERIES * hd..][..QUERIES * hd];
                    scores.clear();
                    scores.resize(QUERIES * n_pad, 0.0);
                    for j0 in (0..n_pad).step_by(LANES) {
                        let acc = lanes::weighted_sum(simd, hd, (q, hd), (&keys_t[j0..], n_pad));
                        for (qi, acc) in acc.iter().enumerate() {
                            scores[qi * n_pad + j0..][..LANES].copy_from_slice(acc);
                        }
                    }
                    for probs in scores.chunks_exact_mut(n_pad) {
                        softmax(probs, n);
                    }
                    for d0 in (0..hd).step_by(LANES) {
                        let acc =
                            lanes::weighted_sum(simd, n, (&scores, n_pad), (&values[d0..], hd_pad));
                        let cols = LANES.min(hd - d0);
                        for (&i, acc) in group.iter().zip(&acc) {
                            let start = (seq * len + i) * hidden + h * hd + d0;
                            out[start..start + cols].write_copy_of_slice(&acc[..cols]);
                        }
                    }
                }
            }
        }
    }
}

/// Softmax over the first `n` of `scores` (a whole number of lane groups); the rest become 0.
#[inline(always)]
fn softmax(scores: &mut [f32], n: usize) {
    scores[n..].fill(f32::NEG_INFINITY);
    let mut max = [f32::NEG_INFINITY; LANES];
    for group in scores.chunks_exact(LANES) {
        for (m, &s) in max.iter_mut().zip(group) {
            *m = m.max(s);
        }
    }
    let max = max.into_iter().fold(f32::NEG_INFINITY, f32::max);
    for s in scores.iter_mut() {
        *s = exp_neg(max - *s);
    }
    scores[n..].fill(0.0);
    let mut sum = [0f32; LANES];
    for group in scores.chunks_exact(LANES) {
        for (t, &s) in sum.iter_mut().zip(group) {
            *t += s;
        }
    }
    let sum: f32 = sum.into_iter().sum();
    for s in scores.iter_mut() {
        *s /= sum;
    }
}

/// Queries computed side by side.
const QUERIES: usize = 4;

/// `acc[qi][l] = Σ_t w[qi · w_stride + t] · rows[t · r_stride + l]` for `t` in `0..terms`,
/// summed in `t` order with the multiply and the add rounded apart: the portable and AVX-512
/// forms give the same bits.
mod lanes {
    use super::{LANES, QUERIES};

    pub type Sums = [[f32; LANES]; QUERIES];

    /// Which form to run: a feature only where detected (`detect` is the one way to name one).
    #[derive(Clone, Copy)]
    pub struct Simd(Form);

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Form {
        Portable,
        /// 256-bit vectors: the portable code compiled for AVX2.
        Avx2,
        Avx512,
    }

    impl Simd {
        pub fn detect() -> Self {
            #[cfg(target_arch = "x86_64")]
            {
                if crate::engine::cpu::avx512() {
                    return Self(Form::Avx512);
                }
                if crate::engine::cpu::avx2_fma() {
                    return Self(Form::Avx2);
                }
            }
            Self(Form::Portable)
        }

        pub fn avx512(self) -> bool {
            self.0 == Form::Avx512
        }

        pub fn avx2(self) -> bool {
            self.0 == Form::Avx2
        }

        #[cfg(test)]
        pub fn portable() -> Self {
            Self(Form::Portable)
        }
    }

    /// Panics unless `w` and `rows` hold what the strides and `terms` say.
    #[inline(always)]
    pub fn weighted_sum(
        simd: Simd,
        terms: usize,
        (w, w_stride): (&[f32], usize),
        (rows, r_stride): (&[f32], usize),
    ) -> Sums {
        if terms == 0 {
            return [[0.0; LANES]; QUERIES];
        }
        assert!((QUERIES - 1) * w_stride + terms <= w.len());
        assert!((terms - 1) * r_stride + LANES <= rows.len());
        #[cfg(target_arch = "x86_64")]
        if simd.avx512() {
            // Safety: `Simd` names AVX-512F only where detected; bounds were checked above.
            return unsafe { avx512(terms, (w, w_stride), (rows, r_stride)) };
        }
        // In `forward`'s AVX2 form this inlines and vectorises with it.
        portable(terms, (w, w_stride), (rows, r_stride))
    }

    #[inline(always)]
    fn portable(
        terms: usize,
        (w, w_stride): (&[f32], usize),
        (rows, r_stride): (&[f32], usize),
    ) -> Sums {
        let mut acc = [[0f32; LANES]; QUERIES];
        for t in 0..terms {
            let r = &rows[t * r_stride..][..LANES];
            for (qi, acc) in acc.iter_mut().enumerate() {
                let w = w[qi * w_stride + t];
                for (a, &x) in acc.iter_mut().zip(r) {
                    *a += w * x;
                }
            }
        }
        acc
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(
        terms: usize,
        (w, w_stride): (&[f32], usize),
        (rows, r_stride): (&[f32], usize),
    ) -> Sums {
        use std::arch::x86_64::*;
        let (w, rows) = (w.as_ptr(), rows.as_ptr());
        let mut acc = [_mm512_setzero_ps(); QUERIES];
        for t in 0..terms {
            // Safety (all reads): within the bounds `weighted_sum` checked.
            let x = _mm512_loadu_ps(rows.add(t * r_stride));
            for (qi, acc) in acc.iter_mut().enumerate() {
                let wt = _mm512_set1_ps(*w.add(qi * w_stride + t));
                *acc = _mm512_add_ps(*acc, _mm512_mul_ps(wt, x));
            }
        }
        let mut out = [[0f32; LANES]; QUERIES];
        for (o, a) in out.iter_mut().zip(acc) {
            // Safety: `o` is 16 floats.
            _mm512_storeu_ps(o.as_mut_ptr(), a);
        }
        out
    }

    #[cfg(test)]
    #[test]
    fn both_forms_give_the_same_bits() {
        let w: Vec<f32> = crate::engine::pseudo_random(QUERIES * 40, 3)
            .iter()
            .map(|x| x * 1e3)
            .collect();
        let rows = crate::engine::pseudo_random(37 * 20, 4);
        let (w, rows) = ((&w[..], 40), (&rows[..], 20));
        let want = portable(37, w, rows);
        assert_eq!(weighted_sum(Simd::detect(), 37, w, rows), want);
        assert_eq!(weighted_sum(Simd::portable(), 37, w, rows), want);
    }
}

/// Keys (or value columns) summed lane-wise together: one AVX-512 register.
const LANES: usize = 16;

impl CustomOp2 for SelfAttention {
    fn name(&self) -> &'static str {
        "encoder-self-attention"
    }

    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        qkv_layout: &Layout,
        mask: &CpuStorage,
        mask_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let qkv_data = super::contiguous_f32(self.name(), qkv, qkv_layout)?;
        let mask_data = super::contiguous_f32(self.name(), mask, mask_layout)?;
        let hidden = self.heads * self.head_dim;
        let (batch, len) = mask_layout.shape().dims2()?;
        let (rows, width) = qkv_layout.shape().dims2()?;
        if rows != batch * len || width != 3 * hidden {
            candle_core::bail!(
                "{}: qkv [{rows}, {width}] for a [{batch}, {len}] mask and hidden {hidden}",
                self.name()
            );
        }
        // Safety: `forward` writes every row, padding included.
        let out = unsafe {
            super::fresh_output(rows * hidden, |out| {
                self.forward(qkv_data, mask_data, len, out)
            })
        };
        Ok((CpuStorage::F32(out), Shape::from((rows, hidden))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{as_uninit, pseudo_random};

    /// Textbook attention in f64 over the real keys.
    fn reference(qkv: &[f32], mask: &[f32], len: usize, heads: usize, hd: usize) -> Vec<f32> {
        let hidden = heads * hd;
        let mut out = vec![0f32; mask.len() * hidden];
        for (b, m) in mask.chunks_exact(len).enumerate() {
            let at = |t: usize, c: usize| qkv[(b * len + t) * 3 * hidden + c] as f64;
            let real: Vec<usize> = (0..len).filter(|&j| m[j] != 0.0).collect();
            for h in 0..heads {
                for &i in &real {
                    let s: Vec<f64> = real
                        .iter()
                        .map(|&j| {
                            (0..hd)
                                .map(|d| at(i, h * hd + d) * at(j, hidden + h * hd + d))
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for d in 0..hd {
                        let v: f64 = real
                            .iter()
                            .zip(&e)
                            .map(|(&j, e)| e / sum * at(j, 2 * hidden + h * hd + d))
                            .sum();
                        out[(b * len + i) * hidden + h * hd + d] = v as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_textbook_attention_and_ignores_padding() {
        let (heads, hd, len) = (3, 8, 7);
        // Three sequences: full, padded at the end, and a single token.
        let mask: Vec<f32> = [
            [1.0; 7],
            [1., 1., 1., 1., 0., 0., 0.],
            [1., 0., 0., 0., 0., 0., 0.],
        ]
        .concat();
        let mut qkv = pseudo_random(3 * len * 3 * heads * hd, 9);
        qkv.iter_mut().for_each(|x| *x *= 3.0);
        let attention = SelfAttention {
            heads,
            head_dim: hd,
        };
        let mut got = vec![f32::NAN; 3 * len * heads * hd];
        attention.forward(&qkv, &mask, len, as_uninit(&mut got));
        let want = reference(&qkv, &mask, len, heads, hd);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 2e-6 * (1.0 + w.abs()), "[{i}] {g} vs {w}");
        }
        // The padded sequence alone, unpadded, gives the same bits.
        let hidden = heads * hd;
        let mut alone = vec![f32::NAN; 4 * hidden];
        let rows = &qkv[len * 3 * hidden..(len + 4) * 3 * hidden];
        attention.forward(rows, &[1.0; 4], 4, as_uninit(&mut alone));
        assert_eq!(alone, got[len * hidden..(len + 4) * hidden]);
        // The form this CPU runs gives the portable form's bits.
        let mut portable = vec![f32::NAN; got.len()];
        let input = Input {
            qkv: &qkv,
            mask: &mask,
            len,
        };
        attention.forward_portable(input, as_uninit(&mut portable), lanes::Simd::portable());
        assert_eq!(portable, got);
    }
}
