//! A linear layer with bf16 weights for CPUs, used where the encoder runs its dense layers.
//!
//! The profile of the f32 encoder at serving batch sizes was two thirds gemm at close to the f32
//! FMA peak, so only fewer bits per multiply could make it faster. AVX-512 BF16's `vdpbf16ps`
//! does two multiply-adds per f32 lane, twice the f32 rate, and halves the bytes of weights
//! streamed per batch. Weights are rounded to bf16 once at load and packed in the instruction's
//! pair layout; activations are rounded per call; products are exact and sums stay in f32.
//! Every output row is computed the same way whatever the batch, so results are batch-invariant.
//!
//! Without AVX-512 BF16, CPUs with AVX2 and FMA widen the bf16 values to f32 (exactly: a
//! shift) and multiply them with FMA, 512 bits wide where the CPU has AVX-512F (Skylake-SP to
//! Ice Lake). That is the f32 rate, but the weights are packed once at
//! load instead of on every call as a general matmul does, with half the bytes: 1.8× candle's
//! f32 matmul path for one 12-token text, a few per cent at 16 texts. Other CPUs get a portable
//! kernel with the same products (slow; `Precision::Auto` does not pick it). Where the CPU has
//! AMX-BF16 (and Linux grants the tile state) the same packed weights feed tile instructions
//! instead (`amx`).

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

use super::cpu::{self, avx2_fma};
#[cfg(target_arch = "x86_64")]
use super::first_lanes;
use super::CacheLine;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
use amx::TILE;
/// Pairs are padded to whole AMX tiles on every target so the packed layout is one.
#[cfg(not(target_arch = "x86_64"))]
const TILE: usize = 16;

/// Output columns per packed panel: two 16-lane registers.
const NR: usize = 32;
/// Rows per microkernel call: 12 × 2 accumulators + 2 weight registers + 1 broadcast ≤ 32.
const MR: usize = 12;
/// The same for AVX2's 16 registers, over half a panel: 5 × 2 accumulators + 2 weights + 1
/// broadcast + 1 mask. With 6 rows LLVM kept two accumulators on the stack (56 GFLOP/s on a Zen
/// 3 core against 90 with 5).
const MR_AVX2: usize = 5;
/// How many pairs ahead the kernels that widen ask for weights (of 192 or 768 per panel).
const AHEAD: usize = 8;

/// `x · Wᵀ + b` with `W` rounded to bf16 and packed for `vdpbf16ps` and AMX tiles alike.
pub struct Bf16Linear {
    inputs: usize,
    outputs: usize,
    /// `inputs` in pairs, rounded up to whole tiles (zeros past `inputs`).
    pairs: usize,
    /// `[panel][pair][NR]`: lane `j` of pair `p` holds `W[col][2p]` (low half) and
    /// `W[col][2p + 1]` (high half) for `col = panel · NR + j`; zero past the last column. 16
    /// pairs of 16 lanes are one AMX weight tile.
    packed: Lines,
    /// `panels · NR` long, zero past `outputs`.
    bias: Vec<f32>,
    /// Applied in place to each finished block of outputs (an activation), while it is in L1.
    post: Option<fn(&mut [f32])>,
}

/// The code that computes the products; all of them give the same sums up to f32 rounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Portable,
    /// AVX2 and FMA, `MR_AVX2` rows × one panel per call: the bf16 values widened to f32
    /// (exactly) and multiplied with FMA, for CPUs without AVX-512 BF16.
    Avx2,
    /// The same products at 512 bits, `MR` rows × one panel per call, for CPUs with AVX-512 but
    /// not its BF16 (Skylake-SP to Ice Lake): twice the AVX2 rate on cores with two 512-bit FMA
    /// units.
    Avx512Fma,
    /// AVX-512 BF16, `MR` rows × one panel per call.
    Avx512,
    /// AMX-BF16 tiles, 32 rows × one panel per call.
    Amx,
}

impl Kernel {
    fn best() -> Self {
        static BEST: OnceLock<Kernel> = OnceLock::new();
        *BEST.get_or_init(|| {
            if amx_available() {
                return Kernel::Amx;
            }
            if cpu::avx512_bf16() {
                Kernel::Avx512
            } else if cpu::avx512() {
                Kernel::Avx512Fma
            } else if avx2_fma() {
                Kernel::Avx2
            } else {
                Kernel::Portable
            }
        })
    }

    /// Activation bytes (as bf16 pairs) per row chunk: a quarter of a 1 MiB L2 for AVX-512, half
    /// of the 2 MiB L2 that every AMX CPU has. With smaller chunks the AMX kernel read each
    /// weight panel from L3 several times per batch and ran at half the speed at 384 rows.
    fn chunk_bytes(self) -> usize {
        match self {
            Kernel::Portable | Kernel::Avx2 | Kernel::Avx512Fma | Kernel::Avx512 => 256 << 10,
            Kernel::Amx => 1 << 20,
        }
    }

    /// Packed words per activation row: a pair per word, or where the kernel widens (`widens`)
    /// each value as its own f32 word, which the kernel broadcasts straight from memory.
    fn row_words(self, pairs: usize) -> usize {
        if self.widens() {
            2 * pairs
        } else {
            pairs
        }
    }

    /// Whether the products are f32 FMAs of bf16 values widened to f32.
    fn widens(self) -> bool {
        matches!(self, Kernel::Avx2 | Kernel::Avx512Fma)
    }

    /// Rows per call, and the multiple the packed activations are padded to.
    fn rows(self) -> usize {
        match self {
            Kernel::Portable | Kernel::Avx512Fma | Kernel::Avx512 => MR,
            Kernel::Avx2 => MR_AVX2,
            Kernel::Amx => 2 * TILE,
        }
    }
}

/// Whether the AMX tiles may be used: the cap allows them and `amx::available`.
pub fn amx_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        cpu::allows(cpu::Isa::Amx) && amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this layer beats candle's f32 matmul on this CPU (`Precision::Auto`).
pub fn fast_on_this_cpu() -> bool {
    cpu::avx512_bf16() || avx2_fma()
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
        let pairs = inputs.div_ceil(2 * TILE) * TILE;
        let panels = outputs.div_ceil(NR);
        let mut packed = Lines::zeroed(panels * pairs * NR);
        let words = packed.words_mut();
        let w = |col: usize, k: usize| {
            if k < inputs {
                weight[col * inputs + k]
            } else {
                0.0
            }
        };
        for col in 0..outputs {
            let (panel, lane) = (col / NR, col % NR);
            for p in 0..inputs.div_ceil(2) {
                words[(panel * pairs + p) * NR + lane] = pair(w(col, 2 * p), w(col, 2 * p + 1));
            }
        }
        let mut padded_bias = vec![0f32; panels * NR];
        padded_bias[..outputs].copy_from_slice(bias);
        Self {
            inputs,
            outputs,
            pairs,
            packed,
            bias: padded_bias,
            post: None,
        }
    }

    /// The same layer followed by `post`, applied in place to runs of one row's outputs.
    pub fn then(self, post: fn(&mut [f32])) -> Self {
        Self {
            post: Some(post),
            ..self
        }
    }

    /// `x` is `[rows, inputs]`, `out` `[rows, outputs]`, both row-major. Writes every element
    /// of `out` (the tests fill it with NaN first to check that).
    fn forward_with(&self, x: &[f32], out: &mut [MaybeUninit<f32>], kernel: Kernel) {
        let rows = x.len() / self.inputs;
        assert_eq!(x.len(), rows * self.inputs, "x is [rows, inputs]");
        assert_eq!(out.len(), rows * self.outputs, "out is [rows, outputs]");
        let pairs = self.pairs;
        let step = kernel.rows();
        // Padding rows are zeros, computed and never stored, so every row goes through the
        // same instructions whatever its batch. The buffer is the thread's own and kept: a
        // fresh one past ~1 MiB came from the OS each call (page faults and zeroing were a
        // sixth of a 32-text forward pass).
        let row_words = kernel.row_words(pairs);
        let words = rows.next_multiple_of(step) * row_words;
        let mut a = SCRATCH.take();
        a.reserve(words);
        let dst_rows = a.words_mut()[..words].chunks_exact_mut(row_words);
        let mut src_rows = x.chunks_exact(self.inputs);
        for dst in dst_rows {
            let Some(row) = src_rows.next() else {
                dst.fill(0);
                continue;
            };
            if kernel.widens() {
                widen_row(row, dst);
            } else {
                pair_row(row, dst);
            }
        }
        #[cfg(target_arch = "x86_64")]
        let tiles = (kernel == Kernel::Amx).then(|| {
            // Safety: `Kernel::Amx` is only picked (or tested) when `amx::available()`.
            unsafe { amx::Tiles::configure() }
        });
        // Rows go in chunks whose activations stay in L2 while every weight panel passes by;
        // one pass over all rows per panel streamed them from L3 once the batch grew.
        let (a_words, packed) = (&a.words()[..words], self.packed.words());
        let chunk = (kernel.chunk_bytes() / (row_words * 4)).max(step) / step * step;
        for first in (0..rows).step_by(chunk) {
            let last = rows.min(first + chunk);
            for panel in 0..self.outputs.div_ceil(NR) {
                let b = &packed[panel * pairs * NR..(panel + 1) * pairs * NR];
                let col0 = panel * NR;
                let bias = &self.bias[col0..col0 + NR];
                for row0 in (first..last).step_by(step) {
                    let block = Block {
                        a: &a_words[row0 * row_words..],
                        pairs,
                        b,
                        cold: row0 == first,
                        bias: &bias[..NR.min(self.outputs - col0)],
                        out: &mut out[row0 * self.outputs + col0..],
                        ldc: self.outputs,
                    };
                    let n = step.min(last - row0);
                    match kernel {
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Amx => {
                            let tiles = tiles.as_ref().expect("configured above");
                            // Safety: as for `configure`.
                            unsafe { amx_block(tiles, block, n, bias) };
                        }
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx512 => {
                            // Safety: `Kernel::Avx512` is only picked (or tested) when avx512f
                            // and avx512bf16 were detected.
                            unsafe { native_block(block, n) };
                        }
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx512Fma => {
                            // Safety: `Kernel::Avx512Fma` is only picked (or tested) when
                            // avx512f was detected.
                            unsafe { wide_block(block, n) };
                        }
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx2 => {
                            // Safety: `Kernel::Avx2` is only picked (or tested) when avx2 and
                            // fma were detected.
                            unsafe { avx2_block(block, n, bias) };
                        }
                        _ => portable_block(block, n),
                    }
                    if let Some(post) = self.post {
                        let cols = NR.min(self.outputs - col0);
                        for row in row0..row0 + n {
                            let start = row * self.outputs + col0;
                            // Safety: the kernel has just written these outputs.
                            post(unsafe { out[start..start + cols].assume_init_mut() });
                        }
                    }
                }
            }
        }
        // A batch far past the serving sizes would otherwise pin its buffer for good.
        if a.0.len() * std::mem::size_of::<CacheLine>() <= SCRATCH_KEEP_BYTES {
            SCRATCH.set(a);
        }
    }
}

crate::engine::fma_dispatched! {
    /// One activation row as bf16 pairs (`pair`), zeros past its end. Compiled for the widest
    /// vectors: at the SSE width a plain function gets, it was 4 % of a served batched pass.
    fn pair_row(row: &[f32], dst: &mut [u32]) {
        let mut src = row.chunks_exact(2);
        let mut d = dst.iter_mut();
        // `src` first: zip stops on it without taking a word from `d`.
        for (s, d) in (&mut src).zip(&mut d) {
            *d = pair(s[0], s[1]);
        }
        if let [last] = src.remainder() {
            *d.next().expect("pairs cover inputs") = pair(*last, 0.0);
        }
        d.for_each(|d| *d = 0);
    }
}

crate::engine::fma_dispatched! {
    /// One activation row rounded to bf16 and widened back to f32 bits, one word per value, for
    /// the kernels that widen; zeros past its end.
    fn widen_row(row: &[f32], dst: &mut [u32]) {
        for (d, &s) in dst.iter_mut().zip(row) {
            *d = u32::from(to_bf16(s)) << 16;
        }
        dst[row.len()..].fill(0);
    }
}

/// 32-bit words starting on a cache line, so no AMX tile row (64 bytes) straddles two.
#[derive(Default)]
struct Lines(Vec<CacheLine>);

/// The largest packed-activation buffer a thread keeps: 384 rows of 1536 inputs is 1.2 MiB.
const SCRATCH_KEEP_BYTES: usize = 4 << 20;

thread_local! {
    /// Each compute thread's packed activations, kept between calls.
    static SCRATCH: Cell<Lines> = Cell::default();
}

impl Lines {
    fn zeroed(words: usize) -> Self {
        Self(vec![CacheLine([0; 64]); words.div_ceil(16)])
    }

    /// Room for at least `words` words; what is there is not cleared.
    fn reserve(&mut self, words: usize) {
        if self.0.len() * 16 < words {
            self.0.resize(words.div_ceil(16), CacheLine([0; 64]));
        }
    }

    fn words(&self) -> &[u32] {
        // Safety: a `CacheLine` is 64 bytes, aligned past `u32`: 16 words, every bit pattern valid.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * 16) }
    }

    fn words_mut(&mut self) -> &mut [u32] {
        // Safety: as for `words`.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * 16) }
    }
}

/// One microkernel call's operands: `n` rows of `a` against one panel of `b`.
struct Block<'a> {
    /// Rows `Kernel::row_words` apart.
    a: &'a [u32],
    pairs: usize,
    b: &'a [u32],
    /// The first rows of their chunk against this panel: its weights come from L3 or memory.
    cold: bool,
    bias: &'a [f32],
    /// Written, never read: `cpu_fwd` hands the kernels a fresh buffer without zeroing it.
    out: &'a mut [MaybeUninit<f32>],
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
            o.write(a + b);
        }
    }
}

/// `$kernel::<n>$args` for the block's `n` rows, one of `$rows`: each row count has its own
/// kernel, its loops over rows unrolled and its accumulators in registers.
#[cfg(target_arch = "x86_64")]
macro_rules! for_rows {
    ($n:expr, [$($rows:literal)*], $kernel:ident $args:tt) => {
        match $n {
            $($rows => $kernel::<$rows> $args,)*
            n => unreachable!("a block of {n} rows; the kernel takes {:?}", [$($rows),*]),
        }
    };
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn native_block(blk: Block, n: usize) {
    for_rows!(n, [1 2 3 4 5 6 7 8 9 10 11 12], native_kernel(blk))
}

/// `bias` is the panel's whole 32 (zero past the last column); `blk.bias` is cut to the columns
/// that exist.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_block(mut blk: Block, n: usize, bias: &[f32]) {
    for half in 0..blk.bias.len().div_ceil(16) {
        for_rows!(n, [1 2 3 4 5], avx2_kernel(&mut blk, half, bias))
    }
}

/// `R` rows × the `half`-th 16 columns of a panel. Per pair, the weights' low halves are
/// widened and used by every row, then the high halves: each product is the one the other
/// kernels form, summed low then high.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn avx2_kernel<const R: usize>(blk: &mut Block, half: usize, bias: &[f32]) {
    use std::arch::x86_64::*;
    let lda = 2 * blk.pairs;
    let (a, b) = (blk.a.as_ptr().cast::<f32>(), blk.b.as_ptr().add(half * 16));
    let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    // Half 0 reads the low 64 bytes of each pair's 128 and half 1 the high ones; on a panel's
    // first rows the hardware prefetcher left both passes waiting on L3. Asking for both lines
    // of the pair `AHEAD` on made one 12-token text's forward pass 1.3× faster
    // (BENCHMARKS.md). Later rows find the panel in L2, and asking there cost 32 texts 10 %.
    let prefetch = half == 0 && blk.cold;
    for p in 0..blk.pairs {
        if prefetch {
            prefetch_ahead(blk.b, p);
        }
        // Safety (all loads): the panel holds `pairs × NR` lanes and `a` holds `R` rows of
        // `2 · pairs` words, as `forward_with` sliced them.
        let w0 = _mm256_loadu_si256(b.add(p * NR).cast());
        let w1 = _mm256_loadu_si256(b.add(p * NR + 8).cast());
        let (lo0, lo1) = (
            _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)),
            _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16)),
        );
        for (r, acc) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*a.add(r * lda + 2 * p));
            acc[0] = _mm256_fmadd_ps(av, lo0, acc[0]);
            acc[1] = _mm256_fmadd_ps(av, lo1, acc[1]);
        }
        let (hi0, hi1) = (
            _mm256_castsi256_ps(_mm256_and_si256(w0, high)),
            _mm256_castsi256_ps(_mm256_and_si256(w1, high)),
        );
        for (r, acc) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*a.add(r * lda + 2 * p + 1));
            acc[0] = _mm256_fmadd_ps(av, hi0, acc[0]);
            acc[1] = _mm256_fmadd_ps(av, hi1, acc[1]);
        }
    }
    let col0 = half * 16;
    let cols = (blk.bias.len() - col0).min(16);
    let bias = [0, 8].map(|h| _mm256_loadu_ps(bias[col0 + h..][..8].as_ptr()));
    for (r, acc) in acc.iter().enumerate() {
        let out = &mut blk.out[r * blk.ldc + col0..][..cols];
        let mut row = [0f32; 16];
        // Whole halves go straight out; the layer's last columns through `row`.
        let dst = if cols == 16 {
            out.as_mut_ptr().cast()
        } else {
            row.as_mut_ptr()
        };
        _mm256_storeu_ps(dst, _mm256_add_ps(acc[0], bias[0]));
        _mm256_storeu_ps(dst.add(8), _mm256_add_ps(acc[1], bias[1]));
        if cols < 16 {
            out.write_copy_of_slice(&row[..cols]);
        }
    }
}

/// Up to 32 rows × one panel on AMX tiles. Whole blocks are stored in place; a block at the
/// batch's last rows or the layer's last columns goes through a scratch tile. `bias` is the
/// panel's whole 32 (zero past the last column), loaded as one tile row; `blk.bias` is cut to
/// the columns that exist.
///
/// Safety: `tiles` configured on this thread; `blk.a` holds 32 rows (padding included).
#[cfg(target_arch = "x86_64")]
unsafe fn amx_block(tiles: &amx::Tiles, blk: Block, n: usize, bias: &[f32]) {
    let cols = blk.bias.len();
    let lda = blk.pairs * 4;
    let k_tiles = blk.pairs / TILE;
    let (a, b, bias) = (blk.a.as_ptr(), blk.b.as_ptr(), bias.as_ptr());
    let whole = |r: usize| n == r * TILE && cols == NR;
    if whole(2) || whole(1) {
        let c = blk.out.as_mut_ptr().cast();
        let ldc = blk.ldc * 4;
        match n / TILE {
            2 => tiles.block::<2>(a, lda, b, k_tiles, bias, c, ldc),
            _ => tiles.block::<1>(a, lda, b, k_tiles, bias, c, ldc),
        }
        return;
    }
    let mut scratch = [0f32; 2 * TILE * NR];
    let c = scratch.as_mut_ptr();
    if n > TILE {
        tiles.block::<2>(a, lda, b, k_tiles, bias, c, NR * 4);
    } else {
        tiles.block::<1>(a, lda, b, k_tiles, bias, c, NR * 4);
    }
    for (r, src) in scratch.chunks_exact(NR).take(n).enumerate() {
        blk.out[r * blk.ldc..r * blk.ldc + cols].write_copy_of_slice(&src[..cols]);
    }
}

/// Asks for both cache lines of the panel's pair `AHEAD` after `p`, if there is one.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_ahead(panel: &[u32], p: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    if let Some(pair) = panel.get((p + AHEAD) * NR..(p + AHEAD + 1) * NR) {
        // Safety: both lines are inside `panel`; a prefetch only hints.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(pair.as_ptr().cast());
            _mm_prefetch::<_MM_HINT_T0>(pair.as_ptr().add(16).cast());
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn wide_block(blk: Block, n: usize) {
    for_rows!(n, [1 2 3 4 5 6 7 8 9 10 11 12], wide_kernel(blk))
}

/// `R` rows × 32 columns: `avx2_kernel`'s products in its order (each pair's low halves, then
/// its high ones), so the same bits, over the whole panel at once. Each row takes its two
/// broadcasts and four FMAs together: with all low halves first, LLVM hoisted every row's
/// broadcasts, spilled accumulators to the stack and ran at half the speed.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn wide_kernel<const R: usize>(blk: Block) {
    use std::arch::x86_64::*;
    let (pairs, lda) = (blk.pairs, 2 * blk.pairs);
    let (a, b) = (blk.a.as_ptr().cast::<f32>(), blk.b.as_ptr());
    let high = _mm512_set1_epi32(0xffff_0000_u32 as i32);
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for p in 0..pairs {
        // As in `avx2_kernel`: 1.3× for one 12-token text, the same for batches (BENCHMARKS.md).
        if blk.cold {
            prefetch_ahead(blk.b, p);
        }
        // Safety (all loads): the panel holds `pairs × NR` lanes and `a` holds `R` rows of
        // `2 · pairs` words, as `forward_with` sliced them.
        let w0 = _mm512_loadu_si512(b.add(p * NR).cast());
        let w1 = _mm512_loadu_si512(b.add(p * NR + 16).cast());
        let (lo0, lo1) = (
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w0)),
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w1)),
        );
        let (hi0, hi1) = (
            _mm512_castsi512_ps(_mm512_and_si512(w0, high)),
            _mm512_castsi512_ps(_mm512_and_si512(w1, high)),
        );
        for (r, acc) in acc.iter_mut().enumerate() {
            let alo = _mm512_set1_ps(*a.add(r * lda + 2 * p));
            let ahi = _mm512_set1_ps(*a.add(r * lda + 2 * p + 1));
            acc[0] = _mm512_fmadd_ps(ahi, hi0, _mm512_fmadd_ps(alo, lo0, acc[0]));
            acc[1] = _mm512_fmadd_ps(ahi, hi1, _mm512_fmadd_ps(alo, lo1, acc[1]));
        }
    }
    store_rows(&acc, blk);
}

/// Adds the bias to `R` rows of 32 accumulated columns and stores the columns that exist.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_rows<const R: usize>(acc: &[[std::arch::x86_64::__m512; 2]; R], blk: Block) {
    use std::arch::x86_64::*;
    let cols = blk.bias.len();
    let masks = [first_lanes(cols), first_lanes(cols.saturating_sub(16))];
    let bias = blk.bias.as_ptr();
    let out = blk.out.as_mut_ptr().cast::<f32>();
    for (r, acc) in acc.iter().enumerate() {
        for (h, (&v, &mask)) in acc.iter().zip(&masks).enumerate() {
            // Safety: `blk.out` holds `R` rows `ldc` apart of at least `cols` columns.
            let bv = _mm512_maskz_loadu_ps(mask, bias.add(h * 16));
            _mm512_mask_storeu_ps(out.add(r * blk.ldc + h * 16), mask, _mm512_add_ps(v, bv));
        }
    }
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
    store_rows(&acc, blk);
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
        let len = x.len() / self.inputs * self.outputs;
        // Safety: the kernels write every element.
        let out =
            unsafe { super::fresh_output(len, |out| self.forward_with(x, out, Kernel::best())) };
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("checked above") = self.outputs;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{as_uninit, pseudo_random};

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

    /// Every kernel this machine can run; the AMX and AVX-512 ones are named so a CI log shows
    /// which were checked.
    pub(super) fn kernels() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::Portable];
        if avx2_fma() {
            kernels.push(Kernel::Avx2);
        }
        if cpu::avx512() {
            kernels.push(Kernel::Avx512Fma);
        }
        if cpu::avx512_bf16() {
            kernels.push(Kernel::Avx512);
        }
        if amx_available() {
            kernels.push(Kernel::Amx);
        }
        eprintln!("bf16 kernels checked: {kernels:?}");
        kernels
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
    fn every_kernel_matches_the_reference_on_odd_shapes() {
        // Odd inputs (a padded pair and tile), outputs not a multiple of 32 (masked or scratch
        // stores), row counts around the 12-row and 16/32-row blocks, whole tile blocks stored
        // in place, and more rows than one L2 chunk (85 at 1536 inputs).
        for (rows, inputs, outputs) in [
            (1, 7, 5),
            (13, 33, 40),
            (25, 64, 96),
            (12, 2, 17),
            (48, 64, 64),
            (16, 96, 32),
            (90, 1536, 40),
        ] {
            let x = pseudo_random(rows * inputs, 1);
            let w = pseudo_random(outputs * inputs, 2);
            let bias = pseudo_random(outputs, 3);
            let layer = Bf16Linear::new(&w, &bias, outputs, inputs);
            let want = reference(&x, &w, &bias, rows, outputs);
            for kernel in kernels() {
                let mut got = vec![f32::NAN; rows * outputs];
                layer.forward_with(&x, as_uninit(&mut got), kernel);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "{kernel:?} {rows}x{inputs}x{outputs} [{i}]: {g} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_wide_kernels_give_the_same_bits_at_either_width() {
        if !cpu::avx512() {
            eprintln!("no AVX-512F here: Avx512Fma is not checked against Avx2");
            return;
        }
        for (rows, inputs, outputs) in [(1, 7, 5), (13, 33, 40), (90, 1536, 40), (30, 384, 1536)] {
            let x = pseudo_random(rows * inputs, 9);
            let w = pseudo_random(outputs * inputs, 10);
            let layer = Bf16Linear::new(&w, &pseudo_random(outputs, 11), outputs, inputs);
            let [narrow, wide] = [Kernel::Avx2, Kernel::Avx512Fma].map(|kernel| {
                let mut out = vec![f32::NAN; rows * outputs];
                layer.forward_with(&x, as_uninit(&mut out), kernel);
                out
            });
            assert!(
                narrow
                    .iter()
                    .zip(&wide)
                    .all(|(n, w)| n.to_bits() == w.to_bits()),
                "{rows}x{inputs}x{outputs}"
            );
        }
    }

    #[test]
    fn the_post_op_sees_every_output_once() {
        let (rows, inputs, outputs) = (45, 40, 70);
        let w = pseudo_random(outputs * inputs, 6);
        let bias = pseudo_random(outputs, 7);
        let x = pseudo_random(rows * inputs, 8);
        let plain = Bf16Linear::new(&w, &bias, outputs, inputs);
        let doubled = Bf16Linear::new(&w, &bias, outputs, inputs).then(|y| {
            for v in y {
                *v = 2.0 * *v + 1.0;
            }
        });
        for kernel in kernels() {
            let (mut want, mut got) = (vec![0f32; rows * outputs], vec![0f32; rows * outputs]);
            plain.forward_with(&x, as_uninit(&mut want), kernel);
            doubled.forward_with(&x, as_uninit(&mut got), kernel);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(*g, 2.0 * w + 1.0, "{kernel:?} [{i}]");
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_its_batch() {
        let (inputs, outputs) = (48, 64);
        let w = pseudo_random(outputs * inputs, 4);
        let layer = Bf16Linear::new(&w, &vec![0.0; outputs], outputs, inputs);
        let x = pseudo_random(41 * inputs, 5);
        for kernel in kernels() {
            let mut all = vec![0f32; 41 * outputs];
            layer.forward_with(&x, as_uninit(&mut all), kernel);
            for row in [0, 11, 12, 16, 31, 32, 40] {
                let mut one = vec![0f32; outputs];
                layer.forward_with(
                    &x[row * inputs..(row + 1) * inputs],
                    as_uninit(&mut one),
                    kernel,
                );
                let want = &all[row * outputs..(row + 1) * outputs];
                assert_eq!(one, want, "{kernel:?} row {row}");
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use crate::engine::{as_uninit, pseudo_random};

    #[test]
    #[ignore = "a measurement: cargo test --release --lib bf16_linear::speed -- --ignored --nocapture"]
    fn encoder_layers() {
        // all-MiniLM-L6-v2's dense layers, weights cold as in a forward pass.
        let shapes = [(384, 1152), (384, 384), (384, 1536), (1536, 384)];
        let layers: Vec<_> = (0..6)
            .flat_map(|_| shapes)
            .map(|(i, o)| Bf16Linear::new(&pseudo_random(i * o, 2), &vec![0.0; o], o, i))
            .collect();
        let kernels = super::tests::kernels();
        for rows in [12, 84, 192, 384] {
            let x = pseudo_random(rows * 1536, 1);
            let mut out = vec![0f32; rows * 1536];
            for &kernel in kernels.iter().filter(|&&k| k != Kernel::Portable) {
                let mut best = f64::MAX;
                for _ in 0..20 {
                    let t = std::time::Instant::now();
                    for l in &layers {
                        l.forward_with(
                            &x[..rows * l.inputs],
                            as_uninit(&mut out[..rows * l.outputs]),
                            kernel,
                        );
                    }
                    best = best.min(t.elapsed().as_secs_f64());
                }
                let flops: usize = layers.iter().map(|l| 2 * rows * l.inputs * l.outputs).sum();
                eprintln!(
                    "{rows} rows {kernel:?}: {:.3} ms {:.0} GFLOP/s",
                    best * 1e3,
                    flops as f64 / best / 1e9
                );
            }
        }
    }
}
