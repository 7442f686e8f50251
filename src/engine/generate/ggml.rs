//! llama.cpp's CPU arithmetic, operation for operation, for the steps of a decoder where another
//! summation order or another `exp` would move the logits: greedy decoding must pick llama.cpp's
//! token even where the top two logits are a hair apart (issue 4 compares the first 24 tokens of
//! ten chats). The reference is llama.cpp built for an AVX-512 CPU (`-march=native`, which is how
//! llama-cpp-python builds it), vendored commit 0c1e570: `ggml_v_expf`, `ggml_vec_soft_max_f32`,
//! `ggml_vec_dot_f16`, tinyBLAS's f16 GEMM, `ggml_compute_forward_rms_norm_f32`. The functions
//! here are scalar and give the same numbers on any CPU; `f32::mul_add` stands for the fused
//! multiply-adds that ggml's intrinsics (and GCC's contraction of `a * b + c`) use.

/// GCC's `_mm512_reduce_add_ps`: halves added pairwise, 16 → 8 → 4 → 2 → 1.
#[inline(always)]
pub fn reduce16(v: &[f32; 16]) -> f32 {
    let t8: [f32; 8] = std::array::from_fn(|i| v[8 + i] + v[i]);
    let t4: [f32; 4] = std::array::from_fn(|i| t8[4 + i] + t8[i]);
    (t4[0] + t4[2]) + (t4[1] + t4[3])
}

/// `hsum_float_8` of ggml's x86 quant kernels (128-bit halves, then movehl, then movehdup).
pub fn reduce8(v: &[f32; 8]) -> f32 {
    let t4: [f32; 4] = std::array::from_fn(|i| v[4 + i] + v[i]);
    (t4[0] + t4[2]) + (t4[1] + t4[3])
}

/// One lane of `ggml_v_expf` (AVX-512): at most ~1.5 ulp from `expf`, and not the same
/// numbers as libm's.
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    let r = f32::from_bits(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), r); // 0x1.715476p+0
    let n = z - r;
    let b = (-n).mul_add(
        f32::from_bits(0x35bf_be8e),                  // 0x1.7f7d1cp-20
        (-n).mul_add(f32::from_bits(0x3f31_7200), x), // 0x1.62e4p-1
    );
    let u = b * b;
    let j = f32::from_bits(0x3c07_2010) // 0x1.0e4020p-7
        .mul_add(b, f32::from_bits(0x3d2b_9f17)) // 0x1.573e2ep-5
        .mul_add(
            u,
            f32::from_bits(0x3e2a_af33).mul_add(b, f32::from_bits(0x3eff_fedb)), // 0x1.555e66p-3, 0x1.fffdb6p-2
        )
        .mul_add(u, f32::from_bits(0x3f7f_fff6).mul_add(b, 1.0)); // 0x1.ffffecp-1
    let res = scalef(j, n.clamp(-192.0, 192.0));
    let alt = if n <= 0.0 { 0.0 } else { f32::INFINITY };
    if n.abs() > 192.0 {
        alt
    } else {
        res
    }
}

/// `_mm512_scalef_ps` for an integral `n` within ±192: `j · 2ⁿ`, rounded once. The product is
/// exact in f64 (2ⁿ is a power of two, `j` has 24 bits), so its one rounding to f32 is scalef's,
/// subnormals and overflow included; and without branches the loops around it vectorize.
#[inline(always)]
fn scalef(j: f32, n: f32) -> f32 {
    let pow2 = f64::from_bits(((n as i64 + 1023) as u64) << 52);
    (j as f64 * pow2) as f32
}

/// `ggml_v_silu`: `x / (1 + expf(-x))` with the expf above.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + expf(-x))
}

/// `ggml_vec_swiglu_f32`: `silu(gate) · up`, element by element, into `out`.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if crate::engine::cpu::avx512() {
        // SAFETY: the feature was just detected; lengths are asserted above.
        unsafe { x86::swiglu(gate, up, out) };
        return;
    }
    swiglu_portable(gate, up, out);
}

crate::engine::fma_dispatched! {
    fn swiglu_portable(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = silu(g) * u;
        }
    }
}

/// `ggml_compute_forward_rms_norm_f32` followed by the multiplication by the norm's weight:
/// squares summed in f64, `x · (1 / sqrt(mean + eps)) · w`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    for (x, out) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
            *o = v * scale * w;
        }
    }
}

crate::engine::fma_dispatched! {
    /// ggml's rotary embedding (`rotate_pairs`), from `[rows, heads, dim]` to
    /// `[heads, rows, dim]`: pairs are adjacent (`neox` false, llama) or half the dimension apart
    /// (`neox`). GCC fuses each `x0 · cos − x1 · sin` into one multiply-add around the second
    /// product; `cos` and `sin` are `[rows, dim / 2]`, libm's `cosf` and `sinf` as in
    /// `ggml_rope_cache_init`.
    pub fn rope(
        x: &[f32],
        heads: usize,
        dim: usize,
        cos: &[f32],
        sin: &[f32],
        neox: bool,
    ) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        let half = dim / 2;
        let rows = cos.len() / half;
        for r in 0..rows {
            let (c, s) = (&cos[r * half..][..half], &sin[r * half..][..half]);
            for h in 0..heads {
                let src = &x[(r * heads + h) * dim..][..dim];
                let dst = &mut out[(h * rows + r) * dim..][..dim];
                for i in 0..half {
                    let (a, b) = if neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
                    let (x0, x1) = (src[a], src[b]);
                    dst[a] = x0.mul_add(c[i], -(x1 * s[i]));
                    dst[b] = x0.mul_add(s[i], x1 * c[i]);
                }
            }
        }
        out
    }
}

/// `ggml_vec_soft_max_f32` and the scaling after it, in place: `expf(x - max)` in blocks of
/// 16 (each block's sum reduced as `_mm512_reduce_add_ps`, the block sums added in f64),
/// then every value times the f32 of `1 / sum`. ggml runs it over the KV cache padded to a
/// multiple of 256 with masked (zero) entries; those add nothing, but the blocks start at
/// position 0.
pub fn softmax(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::engine::cpu::avx512() {
        // SAFETY: the feature was just detected.
        unsafe { x86::softmax(x) };
        return;
    }
    softmax_portable(x);
}

crate::engine::fma_dispatched! {
    fn softmax_portable(x: &mut [f32]) {
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f64;
        for block in x.chunks_mut(16) {
            let mut lanes = [0f32; 16];
            for (l, v) in lanes.iter_mut().zip(block.iter_mut()) {
                *v = expf(*v - max);
                *l = *v;
            }
            sum += reduce16(&lanes) as f64;
        }
        let inv = (1.0 / sum) as f32;
        x.iter_mut().for_each(|v| *v *= inv);
    }
}

/// `ggml_vec_dot_f16` (AVX-512: four 16-lane accumulators over steps of 64, folded 0+2, 1+3,
/// then 0+1, then reduced) of two f16 vectors given as f32. The products of f16 values are exact
/// in f32, so a fused multiply-add and a multiply then add agree. A length that is not a
/// multiple of 64 would leave a tail that ggml sums in f64; the callers' lengths never do
/// (head dimension 64, and the cache padded).
#[inline(always)]
pub fn dot_f16_vec(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [[0f32; 16]; 4];
    let steps = a.len() / 64;
    for s in 0..steps {
        for (j, acc) in acc.iter_mut().enumerate() {
            let o = s * 64 + j * 16;
            for l in 0..16 {
                acc[l] += a[o + l] * b[o + l];
            }
        }
    }
    let mut tail = 0f64;
    for i in steps * 64..a.len() {
        tail += (a[i] * b[i]) as f64;
    }
    let x0: [f32; 16] = std::array::from_fn(|l| acc[0][l] + acc[2][l]);
    let x1: [f32; 16] = std::array::from_fn(|l| acc[1][l] + acc[3][l]);
    let x: [f32; 16] = std::array::from_fn(|l| x0[l] + x1[l]);
    (reduce16(&x) as f64 + tail) as f32
}

/// tinyBLAS's f16 GEMM (llamafile's sgemm, which ggml uses when a matmul has at least two
/// rows on the right): one 16-lane accumulator over steps of 16, then reduced. tinyBLAS turns
/// down lengths that are not a multiple of 16, and ggml falls back to `ggml_vec_dot_f16`.
#[inline(always)]
pub fn dot_f16_gemm(a: &[f32], b: &[f32]) -> f32 {
    if !a.len().is_multiple_of(16) {
        return dot_f16_vec(a, b);
    }
    let mut acc = [0f32; 16];
    for (ca, cb) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        for l in 0..16 {
            acc[l] += ca[l] * cb[l];
        }
    }
    reduce16(&acc)
}

/// ggml's AVX-512 `ggml_v_expf` and the loops built on it, with the intrinsics ggml uses (the
/// portable functions above compute the same numbers one lane at a time).
#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use crate::engine::first_lanes;

    #[inline(always)]
    unsafe fn splat(bits: u32) -> __m512 {
        _mm512_set1_ps(f32::from_bits(bits))
    }

    /// `ggml_v_expf`, 16 lanes.
    #[inline(always)]
    unsafe fn expf(x: __m512) -> __m512 {
        let r = splat(0x4b40_0000);
        let z = _mm512_fmadd_ps(x, splat(0x3fb8_aa3b), r);
        let n = _mm512_sub_ps(z, r);
        let b = _mm512_fnmadd_ps(
            n,
            splat(0x35bf_be8e),
            _mm512_fnmadd_ps(n, splat(0x3f31_7200), x),
        );
        let d = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
        let u = _mm512_mul_ps(b, b);
        let j = _mm512_fmadd_ps(
            _mm512_fmadd_ps(
                _mm512_fmadd_ps(splat(0x3c07_2010), b, splat(0x3d2b_9f17)),
                u,
                _mm512_fmadd_ps(splat(0x3e2a_af33), b, splat(0x3eff_fedb)),
            ),
            u,
            _mm512_fmadd_ps(splat(0x3f7f_fff6), b, _mm512_set1_ps(1.0)),
        );
        let res = _mm512_scalef_ps(j, n);
        if d == 0 {
            return res;
        }
        let zero = _mm512_setzero_ps();
        let le = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, zero);
        let alt = _mm512_mask_blend_ps(le, _mm512_set1_ps(f32::INFINITY), zero);
        _mm512_mask_blend_ps(d, res, alt)
    }

    /// # Safety
    /// The CPU has avx512f; the three slices have the same length.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len() / 16 * 16;
        let one = _mm512_set1_ps(1.0);
        for i in (0..n).step_by(16) {
            let g = _mm512_loadu_ps(gate.as_ptr().add(i));
            // `ggml_v_silu`: x / (1 + expf(0 - x)).
            let e = expf(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let silu = _mm512_div_ps(g, _mm512_add_ps(one, e));
            let y = _mm512_mul_ps(silu, _mm512_loadu_ps(up.as_ptr().add(i)));
            _mm512_storeu_ps(out.as_mut_ptr().add(i), y);
        }
        for i in n..out.len() {
            out[i] = super::silu(gate[i]) * up[i];
        }
    }

    /// # Safety
    /// The CPU has avx512f.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax(x: &mut [f32]) {
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let m = _mm512_set1_ps(max);
        let mut sum = 0f64;
        for i in (0..x.len()).step_by(16) {
            // The last block's missing lanes are zeros, as ggml's masked padding.
            let k = first_lanes(x.len() - i);
            let p = x.as_mut_ptr().add(i);
            let v = _mm512_maskz_mov_ps(k, expf(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p), m)));
            _mm512_mask_storeu_ps(p, k, v);
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), v);
            sum += super::reduce16(&lanes) as f64;
        }
        let inv = _mm512_set1_ps((1.0 / sum) as f32);
        for i in (0..x.len()).step_by(16) {
            let k = first_lanes(x.len() - i);
            let p = x.as_mut_ptr().add(i);
            _mm512_mask_storeu_ps(p, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p), inv));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expf_is_close_to_libm_and_saturates() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, libm) = (expf(x), x.exp());
            assert!(((ours - libm) / libm).abs() < 4e-7, "{x}: {ours} vs {libm}");
            x += 0.0137;
        }
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(-1000.0), 0.0);
        assert_eq!(expf(1000.0), f32::INFINITY);
        assert_eq!(expf(0.0), 1.0);
    }

    #[test]
    fn reductions_follow_the_tree() {
        // 1 + 2^-24 is lost when added to 1 alone but kept when two of them meet first.
        let e = f32::EPSILON / 2.0;
        let mut v = [0f32; 16];
        v[0] = 1.0;
        v[4] = e;
        v[12] = e;
        // Tree: lanes 4 and 12 meet first (12 = 8 + 4), giving 2e, which survives next to 1.
        assert_eq!(reduce16(&v), 1.0 + 2.0 * e);
        let mut w = [0f32; 8];
        w[0] = 1.0;
        w[2] = e;
        w[6] = e;
        assert_eq!(reduce8(&w), 1.0 + 2.0 * e);
    }

    #[test]
    fn vector_loops_equal_the_portable_ones_bit_for_bit() {
        // Values across expf's whole range, its saturation included.
        let x: Vec<f32> = (0..4000)
            .map(|i| ((i as f32) * 0.731).sin() * (1.0 + (i % 97) as f32 * 1.3))
            .chain([-200.0, 200.0, -88.0, 89.0, 0.0, -0.0])
            .collect();
        let up: Vec<f32> = x.iter().map(|v| v.cos()).collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        swiglu(&x, &up, &mut a);
        swiglu_portable(&x, &up, &mut b);
        assert_eq!(bits(&a), bits(&b));
        for len in [1, 15, 16, 17, 100, 256, 1000] {
            let (mut a, mut b) = (x[..len].to_vec(), x[..len].to_vec());
            softmax(&mut a);
            softmax_portable(&mut b);
            assert_eq!(bits(&a), bits(&b), "{len}");
        }
    }

    #[test]
    fn softmax_sums_to_one_and_ignores_masked_entries() {
        let mut x: Vec<f32> = (0..40).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        x.extend([f32::NEG_INFINITY; 24]);
        softmax(&mut x);
        let sum: f32 = x.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6, "{sum}");
        assert!(x[40..].iter().all(|&p| p == 0.0));
    }

    #[test]
    fn dot_products_are_dot_products() {
        let a: Vec<f32> = (0..128).map(|i| (i as f32 * 0.1).cos()).collect();
        let b: Vec<f32> = (0..128).map(|i| (i as f32 * 0.3).sin()).collect();
        let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        for got in [dot_f16_vec(&a, &b), dot_f16_gemm(&a, &b)] {
            assert!((got as f64 - exact).abs() < 1e-5, "{got} vs {exact}");
        }
    }
}
