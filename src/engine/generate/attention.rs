//! Attention of every running sequence against its own KV cache, on CPU, in one parallel pass
//! per layer. candle ops per sequence (a dozen small tensors each, per layer) made decode time
//! grow with the number of sequences far faster than the weights' share; this does the same
//! arithmetic on plain slices, sequences and KV heads spread over candle's worker pool.
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
    let work =
        |range: std::ops::Range<usize>| attend_items(layer, shape, spans, q, rows, dst, range);
    let pool = candle_core::utils::barrier_pool();
    if pool.n_workers() > 0 && items > 1 {
        pool.execute_chunked(items, work);
    } else {
        work(0..items);
    }
    out
}

ggml::fma_dispatched! {
    /// Work items `range` of `attend` (item = sequence · kv_heads + kv head), compiled for the
    /// CPU's vector width like the rest of `ggml`'s loops.
    fn attend_items(
        layer: usize,
        shape: Shape,
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
        let mut scores = Vec::new();
        let mut acc = vec![0f32; d];
        let mut lanes = Vec::new();
        let (mut half_row, mut probs) = (Vec::new(), Vec::new());
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for item in range {
            let span = &spans[item / kv_heads];
            let kvh = item % kv_heads;
            let cap = span.cache.capacity;
            // The visible part of this head's cache in f32, once for all its query heads.
            let len = (span.past + span.n) * d;
            let base = kvh * cap * d;
            keys.resize(len, 0.0);
            values.resize(len, 0.0);
            span.cache.keys[layer][base..base + len].convert_to_f32_slice(&mut keys);
            span.cache.values[layer][base..base + len].convert_to_f32_slice(&mut values);
            for h in kvh * group..(kvh + 1) * group {
                for i in 0..span.n {
                    let visible = span.past + i + 1;
                    let src = (h * rows + span.start + i) * d;
                    round_f16(&q[src..src + d], &mut half_row, &mut q_row);
                    // llama.cpp's matmuls: tinyBLAS when the sequence brings two rows or
                    // more to the pass (a prompt), `ggml_vec_dot_f16` for one (a decode step).
                    let gemm = span.n > 1;
                    scores.clear();
                    scores.extend((0..visible).map(|j| {
                        let key = &keys[j * d..(j + 1) * d];
                        let dot = if gemm {
                            ggml::dot_f16_gemm(&q_row, key)
                        } else {
                            ggml::dot_f16_vec(&q_row, key)
                        };
                        dot * scale
                    }));
                    ggml::softmax(&mut scores);
                    // Weights times values, lane by lane as that matmul sums them (each lane
                    // takes the positions 16 apart; `ggml_vec_dot_f16` keeps four sets of
                    // lanes, 64 positions apart). Products of f16 values are exact in f32.
                    let sets = if gemm { 1 } else { 4 };
                    lanes.clear();
                    lanes.resize(sets * 16 * d, 0.0);
                    let p16 = &mut probs;
                    p16.resize(scores.len(), 0.0);
                    round_f16(&scores, &mut half_row, p16);
                    for (j, &p) in p16.iter().enumerate() {
                        let lane = &mut lanes[((j / 16) % sets * 16 + j % 16) * d..][..d];
                        for (a, v) in lane.iter_mut().zip(&values[j * d..(j + 1) * d]) {
                            *a += p * v;
                        }
                    }
                    for (c, out) in acc.iter_mut().enumerate() {
                        let lane = |set: usize, t: usize| lanes[(set * 16 + t) * d + c];
                        let folded: [f32; 16] = if sets == 1 {
                            std::array::from_fn(|t| lane(0, t))
                        } else {
                            std::array::from_fn(|t| {
                                (lane(0, t) + lane(2, t)) + (lane(1, t) + lane(3, t))
                            })
                        };
                        *out = ggml::reduce16(&folded);
                    }
                    let row = span.start + i;
                    // Safety: (row, h) belongs to this item alone; the slot is inside `out`.
                    let slot = unsafe { dst.slots(row * hidden + h * d, d) };
                    slot.copy_from_slice(&acc);
                }
            }
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
