//! Attention of every running sequence against its own KV cache, on CPU, in one parallel pass
//! per layer. candle ops per sequence (a dozen small tensors each, per layer) made decode time
//! grow with the number of sequences far faster than the weights' share; this does the same
//! arithmetic on plain slices, sequences and KV heads spread over candle's worker pool. On
//! AVX-512 the dot products and weighted sums read the f16 cache in place, 16 lanes at a time;
//! elsewhere portable code converts each cache row first. Both add in the same order.
//!
//! Numerics are llama.cpp's CPU path, bit for bit: the cache holds f16, queries and attention
//! weights are rounded to f16 before they meet it, and the dot products, softmax and weighted sums
//! add in llama.cpp's order (`ggml.rs`), which depends only on whether this sequence brings one row
//! (decode) or several (prompt). Each (sequence, head) is computed the same way whatever else is in
//! the batch.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::ggml;

/// One sequence's cache on CPU: per layer `[kv_heads, capacity, head_dim]` in f16.
pub struct CpuKv {
    keys: Vec<Vec<f16>>,
    values: Vec<Vec<f16>>,
    capacity: usize,
}

/// The shape of attention in a model.
#[derive(Clone, Copy)]
pub struct Shape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl CpuKv {
    pub fn new(layers: usize, shape: Shape, capacity: usize) -> Self {
        let size = shape.kv_heads * capacity * shape.head_dim;
        Self {
            keys: (0..layers).map(|_| vec![f16::ZERO; size]).collect(),
            values: (0..layers).map(|_| vec![f16::ZERO; size]).collect(),
            capacity,
        }
    }

    /// Copies positions `..len` of every layer into `to` (a cache of the same model).
    pub fn copy_prefix(&self, to: &mut CpuKv, shape: Shape, len: usize) {
        let (d, n) = (shape.head_dim, len * shape.head_dim);
        let layers = self.keys.iter().zip(to.keys.iter_mut());
        for (src, dst) in layers.chain(self.values.iter().zip(to.values.iter_mut())) {
            for h in 0..shape.kv_heads {
                dst[h * to.capacity * d..][..n].copy_from_slice(&src[h * self.capacity * d..][..n]);
            }
        }
    }
}

/// One sequence's part of a forward pass: its rows `start..start + n` of the batch, whose
/// positions are `past..past + n`.
pub struct Span<'a> {
    pub cache: &'a mut CpuKv,
    pub start: usize,
    pub n: usize,
    pub past: usize,
}

/// Writes through a raw pointer from several workers at once; each writes disjoint rows.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// Safety: every work item writes only the output slots of its own (sequence, head) rows.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The `len` slots from `offset`.
    ///
    /// # Safety
    /// In bounds, and written by no other work item.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slots(&self, offset: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(offset), len)
    }
}

/// `x` rounded to f16 and back, into `out` (`half` converts whole slices with F16C).
fn round_f16(x: &[f32], scratch: &mut Vec<f16>, out: &mut [f32]) {
    scratch.resize(x.len(), f16::ZERO);
    scratch.convert_from_f32_slice(x);
    scratch.convert_to_f32_slice(out);
}

/// `q` is `[heads, rows, head_dim]`, `k` and `v` `[kv_heads, rows, head_dim]` (the batch's new
/// rows, rotated). Appends each span's keys and values to its cache for `layer`, then returns
/// attention outputs `[rows, heads · head_dim]`.
pub fn attend(
    layer: usize,
    shape: Shape,
    spans: &mut [Span],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    rows: usize,
) -> Vec<f32> {
    let Shape {
        heads,
        kv_heads,
        head_dim: d,
    } = shape;
    for span in spans.iter_mut() {
        let cap = span.cache.capacity;
        for (cache, new) in [
            (&mut span.cache.keys[layer], k),
            (&mut span.cache.values[layer], v),
        ] {
            for h in 0..kv_heads {
                // This head's new rows are contiguous in both layouts.
                let src = (h * rows + span.start) * d;
                let dst = (h * cap + span.past) * d;
                let len = span.n * d;
                cache[dst..dst + len].convert_from_f32_slice(&new[src..src + len]);
            }
        }
    }
    let mut out = vec![0f32; rows * heads * d];
    let dst = Out(out.as_mut_ptr());
    let items = spans.len() * kv_heads;
    let spans: &[Span] = spans;
    let kernels = Kernels::detect(d);
    let work = |range: std::ops::Range<usize>| {
        attend_items(layer, shape, kernels, spans, q, rows, dst, range)
    };
    let pool = candle_core::utils::barrier_pool();
    if pool.n_workers() > 0 && items > 1 {
        pool.execute_chunked(items, work);
    } else {
        work(0..items);
    }
    out
}

/// Which code computes a row's scores and weighted values: AVX-512 reading the f16 cache in
/// place, or portable code over rows converted to f32. Both add in the same order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kernels {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernels {
    fn detect(head_dim: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        if head_dim.is_multiple_of(64)
            && crate::engine::cpu::avx512()
            && is_x86_feature_detected!("f16c")
        {
            return Kernels::Avx512;
        }
        let _ = head_dim;
        Kernels::Portable
    }

    /// `out[j] = (q · keys[j]) · scale` for every row j of `keys` (`[out.len(), d]`, f16);
    /// `q` is already rounded to f16. `gemm` picks tinyBLAS's order, else `ggml_vec_dot_f16`'s.
    fn scores(
        self,
        q: &[f32],
        keys: &[f16],
        gemm: bool,
        scale: f32,
        out: &mut [f32],
        row: &mut [f32],
    ) {
        let d = q.len();
        assert!(keys.len() >= out.len() * d && row.len() == d);
        #[cfg(target_arch = "x86_64")]
        if self == Kernels::Avx512 {
            // SAFETY: `Avx512` is only detected with the features the kernel enables, for a
            // head dimension that is a multiple of 64; lengths are asserted above.
            unsafe { x86::scores(q, keys, gemm, scale, out) };
            return;
        }
        for (j, o) in out.iter_mut().enumerate() {
            keys[j * d..(j + 1) * d].convert_to_f32_slice(row);
            let dot = if gemm {
                ggml::dot_f16_gemm(q, row)
            } else {
                ggml::dot_f16_vec(q, row)
            };
            *o = dot * scale;
        }
    }

    /// `out = Σ_j p[j] · values[j]` (`values` `[p.len(), d]`, f16; `p` rounded to f16), lane by
    /// lane as that matmul sums them: each lane takes the positions 16 apart, and
    /// `ggml_vec_dot_f16` (`sets` 4) keeps four sets of lanes, 64 positions apart, where
    /// tinyBLAS (`sets` 1) keeps one. Products of f16 values are exact in f32.
    /// `lanes` is scratch of `sets · 16 · d`.
    fn weigh(
        self,
        p: &[f32],
        values: &[f16],
        sets: usize,
        lanes: &mut [f32],
        out: &mut [f32],
        row: &mut [f32],
    ) {
        let d = out.len();
        assert!(values.len() >= p.len() * d && lanes.len() == sets * 16 * d && row.len() == d);
        assert!(sets == 1 || sets == 4);
        #[cfg(target_arch = "x86_64")]
        if self == Kernels::Avx512 {
            // SAFETY: as in `scores`; `lanes` holds at least 16 rows of `d`.
            unsafe { x86::weigh(p, values, sets, lanes, out) };
            return;
        }
        // Lane rows that no position reaches stay zero and are never written.
        let used = p.len().min(sets * 16);
        lanes[..used * d].fill(0.0);
        for (j, &pj) in p.iter().enumerate() {
            values[j * d..(j + 1) * d].convert_to_f32_slice(row);
            let lane = &mut lanes[((j / 16) % sets * 16 + j % 16) * d..][..d];
            for (a, v) in lane.iter_mut().zip(row.iter()) {
                *a += pj * v;
            }
        }
        let lane = |set: usize, t: usize, c: usize| {
            let r = set * 16 + t;
            if r < used {
                lanes[r * d + c]
            } else {
                0.0
            }
        };
        for (c, o) in out.iter_mut().enumerate() {
            let folded: [f32; 16] = if sets == 1 {
                std::array::from_fn(|t| lane(0, t, c))
            } else {
                std::array::from_fn(|t| {
                    (lane(0, t, c) + lane(2, t, c)) + (lane(1, t, c) + lane(3, t, c))
                })
            };
            *o = ggml::reduce16(&folded);
        }
    }
}

crate::engine::fma_dispatched! {
    /// Work items `range` of `attend` (item = sequence · kv_heads + kv head), compiled for the
    /// CPU's vector width like the rest of `ggml`'s loops.
    #[allow(clippy::too_many_arguments)]
    fn attend_items(
        layer: usize,
        shape: Shape,
        kernels: Kernels,
        spans: &[Span],
        q: &[f32],
        rows: usize,
        dst: Out,
        range: std::ops::Range<usize>,
    ) {
        let Shape {
            heads,
            kv_heads,
            head_dim: d,
        } = shape;
        let hidden = heads * d;
        let group = heads / kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut q_row = vec![0f32; d];
        let mut row = vec![0f32; d];
        let mut acc = vec![0f32; d];
        let mut lanes = Vec::new();
        let (mut half_row, mut scores, mut probs) = (Vec::new(), Vec::new(), Vec::new());
        for item in range {
            let span = &spans[item / kv_heads];
            let kvh = item % kv_heads;
            let base = kvh * span.cache.capacity * d;
            let len = (span.past + span.n) * d;
            let keys = &span.cache.keys[layer][base..base + len];
            let values = &span.cache.values[layer][base..base + len];
            // llama.cpp's matmuls: tinyBLAS when the sequence brings two rows or more to the
            // pass (a prompt), `ggml_vec_dot_f16` for one (a decode step).
            let gemm = span.n > 1;
            let sets = if gemm { 1 } else { 4 };
            lanes.resize(sets * 16 * d, 0.0);
            for h in kvh * group..(kvh + 1) * group {
                for i in 0..span.n {
                    let visible = span.past + i + 1;
                    let src = (h * rows + span.start + i) * d;
                    round_f16(&q[src..src + d], &mut half_row, &mut q_row);
                    scores.resize(visible, 0.0);
                    kernels.scores(&q_row, keys, gemm, scale, &mut scores, &mut row);
                    ggml::softmax(&mut scores);
                    probs.resize(visible, 0.0);
                    round_f16(&scores, &mut half_row, &mut probs);
                    kernels.weigh(&probs, values, sets, &mut lanes, &mut acc, &mut row);
                    let row = span.start + i;
                    // Safety: (row, h) belongs to this item alone; the slot is inside `out`.
                    let slot = unsafe { dst.slots(row * hidden + h * d, d) };
                    slot.copy_from_slice(&acc);
                }
            }
        }
    }
}

/// The AVX-512 kernels of `Kernels`: the same operations in the same order, on 16 lanes at a
/// time, converting the f16 cache as they read it.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    use crate::engine::first_lanes;

    /// 16 f16 at `p` as f32.
    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }

    /// # Safety
    /// The CPU has avx512f, f16c and fma; `q.len()` is a multiple of 64 and `keys` holds
    /// `out.len()` rows of it.
    #[target_feature(enable = "avx512f,f16c,fma")]
    pub(super) unsafe fn scores(q: &[f32], keys: &[f16], gemm: bool, scale: f32, out: &mut [f32]) {
        let d = q.len();
        let (q, k) = (q.as_ptr(), keys.as_ptr());
        // The 16 lanes of one key's dot product, before `reduce16`.
        let lanes = |j: usize| -> __m512 {
            let key = k.add(j * d);
            if gemm {
                let mut acc = _mm512_setzero_ps();
                for c in (0..d).step_by(16) {
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(c)), load_f16(key.add(c)), acc);
                }
                acc
            } else {
                let mut acc = [_mm512_setzero_ps(); 4];
                for s in (0..d).step_by(64) {
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let c = s + 16 * t;
                        *acc =
                            _mm512_fmadd_ps(_mm512_loadu_ps(q.add(c)), load_f16(key.add(c)), *acc);
                    }
                }
                _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]))
            }
        };
        let n = out.len();
        let scale = _mm512_set1_ps(scale);
        for j0 in (0..n).step_by(16) {
            let count = (n - j0).min(16);
            let x: [__m512; 16] = std::array::from_fn(|i| {
                if i < count {
                    lanes(j0 + i)
                } else {
                    _mm512_setzero_ps()
                }
            });
            let dots = reduce16_x16(&x);
            let mask = first_lanes(count);
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(j0), mask, _mm512_mul_ps(dots, scale));
        }
    }

    /// `reduce16` of 16 vectors at once: element i of the result is `reduce16(x[i])`, by the
    /// same tree (halves 8 apart, then 4, then 2, then 1), lanes regrouped by shuffles.
    #[inline(always)]
    unsafe fn reduce16_x16(x: &[__m512; 16]) -> __m512 {
        // 8 apart: y[k] = [x[2k] folded (8 lanes), x[2k + 1] folded (8 lanes)].
        let y: [__m512; 8] = std::array::from_fn(|k| {
            let (a, b) = (x[2 * k], x[2 * k + 1]);
            let lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b);
            let hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b);
            _mm512_add_ps(hi, lo)
        });
        // 4 apart: z[m] holds 4 lanes of each of the vectors 4m .. 4m + 3, in order.
        let z: [__m512; 4] = std::array::from_fn(|m| {
            let (a, b) = (y[2 * m], y[2 * m + 1]);
            let lo = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
            let hi = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
            _mm512_add_ps(hi, lo)
        });
        // 2 apart: in 128-bit lane L, w[r] holds 2 lanes of vector 8r + L, then of 8r + 4 + L.
        let w: [__m512; 2] = std::array::from_fn(|r| {
            let (a, b) = (z[2 * r], z[2 * r + 1]);
            let lo = _mm512_shuffle_ps::<0b01_00_01_00>(a, b);
            let hi = _mm512_shuffle_ps::<0b11_10_11_10>(a, b);
            _mm512_add_ps(lo, hi)
        });
        // 1 apart: element 4L + q of the sum is vector 4q + L.
        let lo = _mm512_shuffle_ps::<0b10_00_10_00>(w[0], w[1]);
        let hi = _mm512_shuffle_ps::<0b11_01_11_01>(w[0], w[1]);
        let sum = _mm512_add_ps(lo, hi);
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_ps(order, sum)
    }

    /// # Safety
    /// As `scores`, with `values` holding `p.len()` rows of `out.len()`, and `folded` at least
    /// `16 · out.len()` long.
    #[target_feature(enable = "avx512f,f16c,fma")]
    pub(super) unsafe fn weigh(
        p: &[f32],
        values: &[f16],
        sets: usize,
        folded: &mut [f32],
        out: &mut [f32],
    ) {
        let (d, n) = (out.len(), p.len());
        let (v, f) = (values.as_ptr(), folded.as_mut_ptr());
        // Lane t of every set holds the positions t, t + 16, t + 32, ...: one lane at a time,
        // 64 dimensions at a time, its accumulators stay in registers.
        for c0 in (0..d).step_by(64) {
            for t in 0..16 {
                let mut acc = [[_mm512_setzero_ps(); 4]; 4];
                let add = |acc: &mut [__m512; 4], j: usize| {
                    let pj = _mm512_set1_ps(*p.get_unchecked(j));
                    let row = v.add(j * d + c0);
                    for (c, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(pj, load_f16(row.add(16 * c)), *a);
                    }
                };
                let mut j = t;
                if sets == 1 {
                    while j < n {
                        add(&mut acc[0], j);
                        j += 16;
                    }
                } else {
                    // Position j belongs to set (j / 16) % 4.
                    'positions: loop {
                        for acc in acc.iter_mut() {
                            if j >= n {
                                break 'positions;
                            }
                            add(acc, j);
                            j += 16;
                        }
                    }
                }
                let [a0, a1, a2, a3] = acc;
                for c in 0..4 {
                    let lane = if sets == 1 {
                        a0[c]
                    } else {
                        _mm512_add_ps(_mm512_add_ps(a0[c], a2[c]), _mm512_add_ps(a1[c], a3[c]))
                    };
                    _mm512_storeu_ps(f.add(t * d + c0 + 16 * c), lane);
                }
            }
        }
        for c in (0..d).step_by(16) {
            let lane = |t: usize| _mm512_loadu_ps(f.add(t * d + c));
            // `ggml::reduce16` across the lanes, 16 output elements at once.
            let t8: [__m512; 8] = std::array::from_fn(|i| _mm512_add_ps(lane(8 + i), lane(i)));
            let t4: [__m512; 4] = std::array::from_fn(|i| _mm512_add_ps(t8[4 + i], t8[i]));
            let sum = _mm512_add_ps(_mm512_add_ps(t4[0], t4[2]), _mm512_add_ps(t4[1], t4[3]));
            _mm512_storeu_ps(out.as_mut_ptr().add(c), sum);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::pseudo_random as values;

    /// Causal grouped-query attention over f16-rounded keys, values and queries, in f64.
    fn reference(shape: Shape, q: &[f32], k: &[f32], v: &[f32], rows: usize) -> Vec<f32> {
        let Shape {
            heads,
            kv_heads,
            head_dim: d,
        } = shape;
        let r = |x: f32| f16::from_f32(x).to_f64();
        let mut out = vec![0f32; rows * heads * d];
        for h in 0..heads {
            let kvh = h / (heads / kv_heads);
            for i in 0..rows {
                let qi = &q[(h * rows + i) * d..][..d];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let kj = &k[(kvh * rows + j) * d..][..d];
                        qi.iter().zip(kj).map(|(a, b)| r(*a) * r(*b)).sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (j, s) in scores.iter().enumerate() {
                    let p = (s - max).exp() / sum;
                    for c in 0..d {
                        out[(i * heads + h) * d + c] += (p * r(v[(kvh * rows + j) * d + c])) as f32;
                    }
                }
            }
        }
        out
    }

    /// Every kernel set this CPU can run.
    fn available() -> Vec<Kernels> {
        let mut all = vec![Kernels::Portable];
        if Kernels::detect(64) != Kernels::Portable {
            all.push(Kernels::detect(64));
        }
        all
    }

    #[test]
    fn simd_kernels_equal_portable_bit_for_bit() {
        let d = 64;
        for visible in [1, 15, 16, 17, 63, 64, 65, 130] {
            let halves = |n: usize, seed: u32| -> Vec<f16> {
                values(n, seed)
                    .iter()
                    .map(|&x| f16::from_f32(4.0 * x))
                    .collect()
            };
            let (keys, vals) = (halves(visible * d, 7), halves(visible * d, 8));
            let q: Vec<f32> = halves(d, 9).iter().map(|h| h.to_f32()).collect();
            let p: Vec<f32> = halves(visible, 10)
                .iter()
                .map(|h| h.to_f32().abs())
                .collect();
            for gemm in [false, true] {
                let sets = if gemm { 1 } else { 4 };
                let run = |k: Kernels| {
                    let (mut scores, mut row) = (vec![0f32; visible], vec![0f32; d]);
                    k.scores(&q, &keys, gemm, 0.125, &mut scores, &mut row);
                    // Stale lanes from an earlier, longer call must not leak in.
                    let mut lanes = vec![f32::NAN; sets * 16 * d];
                    let mut out = vec![0f32; d];
                    k.weigh(&p, &vals, sets, &mut lanes, &mut out, &mut row);
                    (scores, out)
                };
                let want = run(Kernels::Portable);
                for k in available() {
                    let got = run(k);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got.0),
                        bits(&want.0),
                        "{k:?} scores, {visible}, {gemm}"
                    );
                    assert_eq!(
                        bits(&got.1),
                        bits(&want.1),
                        "{k:?} values, {visible}, {gemm}"
                    );
                }
            }
        }
    }

    #[test]
    fn prefill_then_decode_matches_the_reference_and_sequences_stay_apart() {
        let shape = Shape {
            heads: 6,
            kv_heads: 2,
            head_dim: 20,
        };
        let rows = 7;
        let (q, k, v) = (
            values(6 * rows * 20, 1),
            values(2 * rows * 20, 2),
            values(2 * rows * 20, 3),
        );
        let want = reference(shape, &q, &k, &v, rows);
        // Sequence A: 5 rows of prompt in one pass, then 2 decode steps; sequence B (other
        // data) shares every pass.
        let mut a = CpuKv::new(1, shape, rows);
        let mut b = CpuKv::new(1, shape, rows);
        let slice = |t: &[f32], heads: usize, from: usize, n: usize| -> Vec<f32> {
            (0..heads)
                .flat_map(|h| t[(h * rows + from) * 20..(h * rows + from + n) * 20].to_vec())
                .collect()
        };
        let mut got = Vec::new();
        for (from, n) in [(0, 5), (5, 1), (6, 1)] {
            // Batch layout: A's n rows, then B's n rows (B uses A's data reversed in sign).
            let both = |t: &[f32], heads: usize| -> Vec<f32> {
                let mine = slice(t, heads, from, n);
                let other: Vec<f32> = mine.iter().map(|x| -x).collect();
                (0..heads)
                    .flat_map(|h| {
                        let m = &mine[h * n * 20..(h + 1) * n * 20];
                        let o = &other[h * n * 20..(h + 1) * n * 20];
                        m.iter().chain(o).copied().collect::<Vec<_>>()
                    })
                    .collect()
            };
            let mut spans = [
                Span {
                    cache: &mut a,
                    start: 0,
                    n,
                    past: from,
                },
                Span {
                    cache: &mut b,
                    start: n,
                    n,
                    past: from,
                },
            ];
            let out = attend(
                0,
                shape,
                &mut spans,
                &both(&q, 6),
                &both(&k, 2),
                &both(&v, 2),
                2 * n,
            );
            got.extend_from_slice(&out[..n * 120]);
        }
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() < 2e-3, "[{i}] {g} vs {w}");
        }
    }
}
