//! A linear layer over GGUF Q4_1 and Q8_0 weights with integer CPU kernels.
//!
//! candle runs Q4_1 through its scalar generic dot product, which leaves CPU decoding an order of
//! magnitude behind llama.cpp. Here each activation row is quantized as llama.cpp's x86 code does
//! it (Q8_1 against Q4_1 weights, Q8_0 against Q8_0: `quantize_row_q8_1` / `quantize_row_q8_0`,
//! `id = 127 / amax`, rounding half to even), and the block dot products run on AVX-512 VNNI,
//! AVX2, or portable scalar code, picked at run time. The file's quantisation is kept: the weight
//! bytes are only reordered once at load, never dequantized.
//!
//! Layout: the weights are regrouped into 16 output columns at a time, interleaved four quant bytes
//! per column, so that one 512-bit register holds the same four quants of 16 columns. `vpdpbusd`
//! against a broadcast of the matching four activation quants then accumulates all 16 columns at
//! once, with no horizontal sums; the AVX2 path reads each register as two halves of 8 columns.
//! A group's quants for all blocks come first and its f16 scales after them, so a group is one
//! contiguous, cache-line aligned stream, and whichever kernel reads a group first asks for the
//! next group meanwhile (a prefetch into L2, block by block): one sequence's step reads the whole
//! model and would otherwise wait on memory. When several row tiles share a group, the AVX-512 path
//! splits its Q4_1 nibbles into bytes once (into an L1-resident scratch) instead of per tile.
//! Layers that read the same input (q, k and v; gate and up) can be fused into one `QLinear`
//! (`QLinear::fused`): one activation quantization and one pass of the worker pool for all.
//!
//! Determinism: the integer sums are exact, so the order in which they are formed does not
//! matter. The floating-point part is one fixed sequence per output element. For Q4_1 it is
//! `ggml_vec_dot_q4_1_q8_1`'s: eight lanes of four quants each, every lane a chain of
//! `fma(d_w · d_x, sumi, acc)` over the blocks, `m_w · s_x` fused into a ninth, and the lanes
//! added as `hsum_float_8` does, so a Q4_1 output equals llama.cpp's bit for bit (greedy decoding
//! then picks llama.cpp's token even at a near tie). Q8_0 adds `sumi · d_w · d_x` block by block.
//! Every path does the same, so an element's value does not depend on the instruction set, the
//! row tile or thread it falls in, or how many rows share the call.
//!
//! `Numerics::Fast` gives up llama.cpp's lanes for Q4_1: a block's 32 products become one
//! integer sum (exact), then `acc = fma(d_w · d_x, sumi, acc)` and `acc = fma(m_w, s_x, acc)`,
//! one f32 chain per output. That is under a third of the float work per weight, and it frees the
//! registers for eight rows per tile, so the nibbles are split once per block for all of them
//! and there is no separate unpack. The same rules hold: exact integer sums, one fixed float
//! sequence, the same on every path and for any batch.

use std::ops::Range;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Storage, Tensor};
use half::f16;

use super::{ggml, Numerics};
use crate::engine::CacheLine;

/// Quants per block, in both formats.
const QK: usize = 32;
/// Output columns per packed group: one 512-bit register of f32 or i32 lanes.
const LANES: usize = 16;
/// The most activation rows that share one pass over a group's weights (`Packed::tile_rows`).
const MAX_TILE_ROWS: usize = 8;
/// Multiply-accumulates below which a call stays on the calling thread (the pool's hand-off is
/// not free either).
const PARALLEL_MIN_WORK: usize = 1 << 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Q4_1,
    Q8_0,
}

impl Format {
    /// Quant bytes of one block of a group: 16 columns × 16 bytes of nibble pairs, or × 32 i8.
    const fn qs_bytes(self) -> usize {
        match self {
            Format::Q4_1 => LANES * QK / 2,
            Format::Q8_0 => LANES * QK,
        }
    }

    /// f16 scale bytes of one block of a group: `d` of 16 columns, then `m` for Q4_1.
    const fn scale_bytes(self) -> usize {
        match self {
            Format::Q4_1 => LANES * 4,
            Format::Q8_0 => LANES * 2,
        }
    }

    /// Bytes of one block in ggml's (and candle's) storage.
    const fn ggml_block_bytes(self) -> usize {
        match self {
            Format::Q4_1 => 4 + QK / 2,
            Format::Q8_0 => 2 + QK,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Isa {
    Scalar,
    Avx2,
    Avx512Vnni,
}

impl Isa {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::engine::cpu;
            if cpu::avx512_vnni() {
                return Isa::Avx512Vnni;
            }
            if cpu::avx2_fma() && is_x86_feature_detected!("f16c") {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// Every path this CPU can run, for tests that compare them.
    #[cfg(test)]
    fn available() -> Vec<Self> {
        match Self::detect() {
            Isa::Avx512Vnni => vec![Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni],
            Isa::Avx2 => vec![Isa::Scalar, Isa::Avx2],
            Isa::Scalar => vec![Isa::Scalar],
        }
    }
}

/// A matrix `[out, in]` for `y = x · Wᵀ`, quantized, on CPU or elsewhere.
pub struct QLinear {
    inner: Inner,
}

enum Inner {
    Packed(Packed),
    /// Formats, shapes and devices the kernels here do not cover.
    Candle(QMatMul),
}

impl QLinear {
    /// From a GGUF tensor of shape `[out, in]`, as candle's gguf reader returns it.
    pub fn new(t: QTensor, numerics: Numerics) -> Result<Self> {
        let format = match t.dtype() {
            GgmlDType::Q4_1 => Some(Format::Q4_1),
            GgmlDType::Q8_0 => Some(Format::Q8_0),
            _ => None,
        };
        if let (Some(format), true, Ok((out, k))) = (format, t.device().is_cpu(), t.shape().dims2())
        {
            if out > 0 && k > 0 && k % QK == 0 {
                let packed = Packed::new(format, numerics, &t.data()?, out, k)?;
                return Ok(Self {
                    inner: Inner::Packed(packed),
                });
            }
        }
        Ok(Self {
            inner: Inner::Candle(QMatMul::from_qtensor(t)?),
        })
    }

    /// One layer over several GGUF tensors `[out_i, in]` stacked along `out` (a model's q, k
    /// and v projections), so that one call quantizes the input once and one pass of the pool
    /// computes them all. Every output column is computed as it would be alone, so the parts'
    /// values are unchanged. `None` where the kernels here do not cover the parts (another
    /// format, another device, or parts that differ in format or `in`).
    pub fn fused(parts: &[QTensor], numerics: Numerics) -> Result<Option<Self>> {
        let Some(first) = parts.first() else {
            return Ok(None);
        };
        let format = match first.dtype() {
            GgmlDType::Q4_1 => Format::Q4_1,
            GgmlDType::Q8_0 => Format::Q8_0,
            _ => return Ok(None),
        };
        let (mut out, mut raw) = (0, Vec::new());
        let k = first.shape().dims2()?.1;
        for t in parts {
            let (o, kt) = t.shape().dims2()?;
            if t.dtype() != first.dtype() || !t.device().is_cpu() || kt != k || k % QK != 0 {
                return Ok(None);
            }
            out += o;
            raw.extend_from_slice(&t.data()?);
        }
        Ok(Some(Self {
            inner: Inner::Packed(Packed::new(format, numerics, &raw, out, k)?),
        }))
    }

    /// `x` is `rows` rows of `in` f32s on the CPU; returns `[rows, out]`.
    pub fn forward_rows(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        match &self.inner {
            Inner::Packed(p) => {
                if x.len() != rows * p.nb * QK {
                    candle_core::bail!(
                        "QLinear: {} inputs for {rows} rows of {}",
                        x.len(),
                        p.nb * QK
                    );
                }
                let mut dst = vec![0f32; rows * p.out];
                p.matmul(Isa::detect(), x, rows, &mut dst);
                Ok(dst)
            }
            Inner::Candle(_) => {
                let k = x.len().checked_div(rows).unwrap_or(0);
                let x = Tensor::from_slice(x, (rows, k), &Device::Cpu)?;
                self.forward(&x)?.flatten_all()?.to_vec1()
            }
        }
    }

    /// `x` is `[.., in]`; returns `[.., out]` in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let packed = match &self.inner {
            Inner::Packed(p) => p,
            Inner::Candle(m) => return m.forward(x),
        };
        if !x.device().is_cpu() {
            candle_core::bail!("QLinear: CPU weights, input on {:?}", x.device().location());
        }
        let k = packed.nb * QK;
        let mut dims = x.dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last == k => *last = packed.out,
            _ => candle_core::bail!(
                "QLinear: input {:?} for weights [{}, {k}]",
                x.shape(),
                packed.out
            ),
        }
        let rows = x.elem_count() / k;
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let mut dst = vec![0f32; rows * packed.out];
        {
            let (storage, layout) = x.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                candle_core::bail!("QLinear: input is not in CPU storage");
            };
            let xs = &cpu.as_slice::<f32>()?[layout.start_offset()..][..rows * k];
            packed.matmul(Isa::detect(), xs, rows, &mut dst);
        }
        Tensor::from_vec(dst, dims, &Device::Cpu)?.to_dtype(dtype)
    }
}

/// The weights regrouped for the kernels (see the module docs for the layout).
struct Packed {
    format: Format,
    numerics: Numerics,
    out: usize,
    /// Blocks per row: `in / 32`.
    nb: usize,
    groups: usize,
    /// Bytes from one group to the next, a whole number of cache lines.
    stride: usize,
    /// Over-allocated by a cache line so that the groups can start on a 64-byte boundary.
    bytes: Vec<u8>,
    start: usize,
}

impl Packed {
    fn new(format: Format, numerics: Numerics, raw: &[u8], out: usize, k: usize) -> Result<Self> {
        let nb = k / QK;
        let src_block = format.ggml_block_bytes();
        if raw.len() != out * nb * src_block {
            candle_core::bail!(
                "QLinear: {} bytes for a {format:?} [{out}, {k}] tensor",
                raw.len()
            );
        }
        let groups = out.div_ceil(LANES);
        let (qs_bytes, scale_bytes) = (format.qs_bytes(), format.scale_bytes());
        let stride = (nb * (qs_bytes + scale_bytes)).next_multiple_of(64);
        let mut bytes = vec![0u8; groups * stride + 63];
        let start = bytes.as_ptr().align_offset(64);
        let packed = &mut bytes[start..][..groups * stride];
        // Columns past `out` in the last group stay zero (zero scales): computed, never stored.
        for (col, row) in raw.chunks_exact(nb * src_block).enumerate() {
            let group = &mut packed[(col / LANES) * stride..][..stride];
            let (qs, scales) = group.split_at_mut(nb * qs_bytes);
            let lane = col % LANES;
            for (b, block) in row.chunks_exact(src_block).enumerate() {
                let qs = &mut qs[b * qs_bytes..][..qs_bytes];
                let scales = &mut scales[b * scale_bytes..][..scale_bytes];
                // Both formats start with the f16 `d`; Q4_1 follows it with the f16 `m`.
                scales[2 * lane..2 * lane + 2].copy_from_slice(&block[..2]);
                let quants = match format {
                    Format::Q4_1 => {
                        scales[2 * LANES + 2 * lane..][..2].copy_from_slice(&block[2..4]);
                        &block[4..]
                    }
                    Format::Q8_0 => &block[2..],
                };
                for (j, four) in quants.chunks_exact(4).enumerate() {
                    qs[j * 4 * LANES + 4 * lane..][..4].copy_from_slice(four);
                }
            }
        }
        Ok(Self {
            format,
            numerics,
            out,
            nb,
            groups,
            stride,
            bytes,
            start,
        })
    }

    /// Rows per tile. Q4_1 with llama.cpp's lanes keeps eight accumulators per row, so two rows
    /// fill AVX-512's 32 vector registers and one row AVX2's 16; more would spill them to the
    /// stack (with two rows on AVX2, 8 sequences decoded at 1.8–1.9× one sequence's rate
    /// instead of 2.3–3.1× on a Zen 3 core; BENCHMARKS.md). One accumulator per row leaves
    /// room for eight rows beside a block's eight expanded weight registers on AVX-512, and for
    /// four beside AVX2's two.
    fn tile_rows(&self, isa: Isa) -> usize {
        match (self.format, self.numerics, isa) {
            (Format::Q4_1, Numerics::LlamaCpp, Isa::Avx2) => 1,
            (Format::Q4_1, Numerics::LlamaCpp, _) => 2,
            (Format::Q4_1, Numerics::Fast, Isa::Avx2) => 4,
            (Format::Q4_1, Numerics::Fast, _) => MAX_TILE_ROWS,
            (Format::Q8_0, _, _) => 4,
        }
    }

    fn group(&self, g: usize) -> &[u8] {
        &self.bytes[self.start + g * self.stride..][..self.stride]
    }

    /// The group after `g`, for kernels that stream a group from memory once and can ask for
    /// the next one meanwhile; empty after the last.
    fn next_group(&self, g: usize) -> &[u8] {
        if g + 1 < self.groups {
            self.group(g + 1)
        } else {
            &[]
        }
    }

    /// `dst[rows, out] = x[rows, in] · Wᵀ`.
    fn matmul(&self, isa: Isa, x: &[f32], rows: usize, dst: &mut [f32]) {
        let k = self.nb * QK;
        assert_eq!(x.len(), rows * k, "QLinear: input length");
        assert_eq!(dst.len(), rows * self.out, "QLinear: output length");
        let acts = Acts::new(self.format, isa, x, rows, k);
        let dst = DstPtr(dst.as_mut_ptr());
        // Q4_1 on AVX-512 with several row tiles per group: the nibbles are split into bytes
        // once per group, not once per tile (a quarter of the kernel's vector work). The fast
        // kernel's tiles are four times taller, so it rarely has more than one.
        let tile_rows = self.tile_rows(isa);
        let unpack = cfg!(target_arch = "x86_64")
            && isa == Isa::Avx512Vnni
            && self.format == Format::Q4_1
            && self.numerics == Numerics::LlamaCpp
            && rows > tile_rows;
        // Groups outermost: a group's weights come from memory once and stay in L1 for every row
        // tile after the first.
        let run = |groups: Range<usize>| {
            let mut nibbles = Vec::new();
            for g in groups {
                #[cfg(target_arch = "x86_64")]
                if unpack {
                    nibbles.resize(self.nb * 8, CacheLine([0; 64]));
                    // SAFETY: `unpack` implies `Isa::Avx512Vnni` (avx512f and avx512bw
                    // detected); the group holds nb blocks of quants and `nibbles` 8 lines each.
                    unsafe {
                        x86::q4_1_unpack(self.group(g), self.nb, &mut nibbles, self.next_group(g))
                    };
                }
                let mut r0 = 0;
                while r0 < rows {
                    let n = (rows - r0).min(tile_rows);
                    let nib = &nibbles;
                    match n {
                        1 => self.store(g, r0, &self.tile::<1>(isa, g, &acts, r0, nib), dst),
                        2 => self.store(g, r0, &self.tile::<2>(isa, g, &acts, r0, nib), dst),
                        3 => self.store(g, r0, &self.tile::<3>(isa, g, &acts, r0, nib), dst),
                        4 => self.store(g, r0, &self.tile::<4>(isa, g, &acts, r0, nib), dst),
                        5 => self.store(g, r0, &self.tile::<5>(isa, g, &acts, r0, nib), dst),
                        6 => self.store(g, r0, &self.tile::<6>(isa, g, &acts, r0, nib), dst),
                        7 => self.store(g, r0, &self.tile::<7>(isa, g, &acts, r0, nib), dst),
                        _ => self.store(
                            g,
                            r0,
                            &self.tile::<MAX_TILE_ROWS>(isa, g, &acts, r0, nib),
                            dst,
                        ),
                    }
                    r0 += n;
                }
            }
        };
        // candle's own worker pool: its workers spin between ops (as llama.cpp's do) instead of
        // sleeping, so the hand-off costs microseconds where rayon's wake-ups cost tens of them,
        // and it is the pool candle's other ops already keep busy, so no second set of threads
        // competes for the same cores.
        let pool = candle_core::utils::barrier_pool();
        if pool.n_workers() > 0 && self.groups > 1 && rows * self.out * k >= PARALLEL_MIN_WORK {
            pool.execute_chunked(self.groups, run);
        } else {
            run(0..self.groups);
        }
    }

    /// Outputs of group `g` (16 columns) for activation rows `r0..r0 + R`; `nibbles` is the
    /// group's quants split by `x86::q4_1_unpack`, or empty.
    fn tile<const R: usize>(
        &self,
        isa: Isa,
        g: usize,
        acts: &Acts,
        r0: usize,
        nibbles: &[CacheLine],
    ) -> [[f32; LANES]; R] {
        let w = self.group(g);
        // The kernels index rows r0..r0 + R of `acts` and a whole group of `w` through raw
        // pointers; these two checks are what makes that in bounds.
        assert!(r0 + R <= acts.rows && acts.nb == self.nb);
        assert!(w.len() >= self.nb * (self.format.qs_bytes() + self.format.scale_bytes()));
        // Unless the group was unpacked, its first tile is what reads it from memory; that tile
        // asks for the next group meanwhile, so the stream of weights overlaps the arithmetic
        // (one sequence's decode step went from 5.6 ms to 3.0–3.3 ms; BENCHMARKS.md).
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
        let first_tile_next = if r0 == 0 { self.next_group(g) } else { &[] };
        match (isa, self.format, self.numerics) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512Vnni, Format::Q4_1, Numerics::Fast) => {
                // SAFETY: as below.
                unsafe { x86::q4_1_vnni_fast::<R>(w, acts, r0, first_tile_next) }
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512Vnni, Format::Q4_1, Numerics::LlamaCpp) => {
                // SAFETY: `Isa::Avx512Vnni` is only chosen when the CPU has avx512f, avx512bw and
                // avx512vnni (`Isa::detect`); bounds are asserted above.
                unsafe {
                    if nibbles.len() >= self.nb * 8 {
                        x86::q4_1_vnni::<R, true>(w, nibbles, acts, r0, &[])
                    } else {
                        x86::q4_1_vnni::<R, false>(w, nibbles, acts, r0, first_tile_next)
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512Vnni, Format::Q8_0, _) => {
                // SAFETY: as above.
                unsafe { x86::q8_0_vnni::<R>(w, acts, r0, first_tile_next) }
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, Format::Q4_1, Numerics::LlamaCpp) => {
                // SAFETY: `Isa::Avx2` is only chosen when the CPU has avx2, f16c and fma (every
                // AVX-512 CPU has them too); bounds are asserted above.
                unsafe { x86::q4_1_avx2::<R>(w, acts, r0, first_tile_next) }
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, Format::Q4_1, Numerics::Fast) => {
                // SAFETY: as above.
                unsafe { x86::q4_1_avx2_fast::<R>(w, acts, r0, first_tile_next) }
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, Format::Q8_0, _) => {
                // SAFETY: as above.
                unsafe { x86::q8_0_avx2::<R>(w, acts, r0, first_tile_next) }
            }
            (_, format, numerics) => tile_scalar::<R>(format, numerics, w, acts, r0),
        }
    }

    fn store<const R: usize>(&self, g: usize, r0: usize, vals: &[[f32; LANES]; R], dst: DstPtr) {
        let col0 = g * LANES;
        let n = LANES.min(self.out - col0);
        for (r, v) in vals.iter().enumerate() {
            // SAFETY: `dst` points at the `rows × out` f32s that `matmul` holds exclusively for
            // the whole call; row r0 + r < rows (asserted in `tile`) and col0 + n <= out, so the
            // write is in bounds. Each (row, group) is written by exactly one tile and the groups
            // are split between threads without overlap, so no two writes touch the same element,
            // and nothing reads `dst` before all of them are done.
            unsafe {
                std::ptr::copy_nonoverlapping(v.as_ptr(), dst.0.add((r0 + r) * self.out + col0), n)
            }
        }
    }
}

/// The output buffer, shared by the pool's threads; they write disjoint column groups.
#[derive(Clone, Copy)]
struct DstPtr(*mut f32);

// SAFETY: the pointer is only written through `Packed::store`, whose callers write disjoint
// elements while `matmul` holds the buffer's unique borrow.
unsafe impl Send for DstPtr {}
// SAFETY: as above.
unsafe impl Sync for DstPtr {}

/// Activation rows quantized to blocks of 32 `i8`.
struct Acts {
    rows: usize,
    nb: usize,
    /// `[rows, in]`.
    qs: Vec<i8>,
    /// `[rows, nb]` block scales, rounded to the f16 that the block format stores.
    d: Vec<f32>,
    /// Q8_1 only, `[rows, nb]`: the block's `s ≈ d · Σq` (f16), the term Q4_1's `m` multiplies.
    s: Vec<f32>,
    /// Q8_0 only, `[rows, nb]`: `128 · Σq`. VNNI multiplies unsigned by signed bytes, so the
    /// Q8_0 kernel offsets the weights by 128 and takes this back off.
    bias: Vec<i32>,
}

impl Acts {
    /// ggml's x86 `quantize_row_q8_1` (for Q4_1 weights) or `quantize_row_q8_0`, operation for
    /// operation, so that the quants are llama.cpp's.
    fn new(format: Format, isa: Isa, x: &[f32], rows: usize, k: usize) -> Self {
        let nb = k / QK;
        let mut acts = Acts {
            rows,
            nb,
            qs: vec![0; rows * k],
            d: vec![0.0; rows * nb],
            s: vec![0.0; rows * nb],
            bias: vec![0; rows * nb],
        };
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                // SAFETY: `Isa::Avx512Vnni` is only chosen when the CPU has avx512f (and every
                // such CPU has f16c); the buffers were sized for `x` just above.
                unsafe {
                    x86::quantize_blocks(x, &mut acts.qs, &mut acts.d, &mut acts.s, &mut acts.bias)
                }
            }
            _ => quantize_blocks(x, &mut acts.qs, &mut acts.d, &mut acts.s, &mut acts.bias),
        }
        match format {
            Format::Q4_1 => acts.bias = Vec::new(),
            Format::Q8_0 => acts.s = Vec::new(),
        }
        acts
    }

    /// Where rows `r0..r0 + R` start in `qs`, `d`, `s` and `bias`, for the kernels' raw reads.
    fn row_ptrs<const R: usize>(
        &self,
        r0: usize,
    ) -> (
        [*const i8; R],
        [*const f32; R],
        [*const f32; R],
        [*const i32; R],
    ) {
        // Wrapping arithmetic: a format leaves `s` or `bias` empty, and those pointers are then
        // never read, which plain `add` would not allow to be formed.
        let at = |r: usize, per_row: usize| (r0 + r) * per_row;
        (
            std::array::from_fn(|r| self.qs.as_ptr().wrapping_add(at(r, self.nb * QK))),
            std::array::from_fn(|r| self.d.as_ptr().wrapping_add(at(r, self.nb))),
            std::array::from_fn(|r| self.s.as_ptr().wrapping_add(at(r, self.nb))),
            std::array::from_fn(|r| self.bias.as_ptr().wrapping_add(at(r, self.nb))),
        )
    }
}

crate::engine::fma_dispatched! {
    /// Blocks of 32 to i8 quants, their f16 scale `d`, Q8_1's `s = f16(d · Σq)` and Q8_0's
    /// `128 · Σq` (compiled for the CPU's vector width: it runs before every matmul).
    fn quantize_blocks(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32], bias: &mut [i32]) {
        let blocks = x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK));
        for (i, (x, q)) in blocks.enumerate() {
            // |v| as bits is monotonic in |v|: an integer max, which vectorizes.
            let bits = x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
            let amax = f32::from_bits(bits);
            let scale = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            d[i] = f16::from_f32(scale).to_f32();
            let mut sum = 0i32;
            for (q, &v) in q.iter_mut().zip(x) {
                *q = round_i8(v * id);
                sum += *q as i32;
            }
            s[i] = f16::from_f32(scale * sum as f32).to_f32();
            bias[i] = 128 * sum;
        }
    }
}

/// `v.round_ties_even() as i8` (`_mm256_round_ps` with `_MM_ROUND_NEAREST`, as ggml's
/// quantizers): saturating, NaN to 0, without the libm call that baseline x86-64 makes of it.
#[inline(always)]
fn round_i8(v: f32) -> i8 {
    // Adding and taking back 1.5 · 2²³ leaves an f32 with no fraction bits, rounded half to
    // even by the FPU; exact for |v| ≤ 2²², which the clamp keeps.
    const MAGIC: f32 = 12_582_912.0;
    let v = v.clamp(-128.0, 127.0);
    ((v + MAGIC) - MAGIC) as i8
}

fn f16_at(bytes: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([bytes[i], bytes[i + 1]]).to_f32()
}

/// The portable path, and the reference that the tests hold the SIMD kernels to.
fn tile_scalar<const R: usize>(
    format: Format,
    numerics: Numerics,
    w: &[u8],
    acts: &Acts,
    r0: usize,
) -> [[f32; LANES]; R] {
    let nb = acts.nb;
    let (qs_bytes, scale_bytes) = (format.qs_bytes(), format.scale_bytes());
    let (qs, scales) = w.split_at(nb * qs_bytes);
    let mut out = [[0f32; LANES]; R];
    for (r, out) in out.iter_mut().enumerate() {
        let row = r0 + r;
        for (lane, out) in out.iter_mut().enumerate() {
            // Q4_1 as llama.cpp: eight lanes (`ggml_vec_dot_q4_1_q8_1`); otherwise one chain.
            let mut lanes = [0f32; 8];
            let (mut summs, mut acc) = (0f32, 0f32);
            for b in 0..nb {
                let x = &acts.qs[(row * nb + b) * QK..][..QK];
                let q = &qs[b * qs_bytes..][..qs_bytes];
                let sc = &scales[b * scale_bytes..][..scale_bytes];
                let (dx, dw) = (acts.d[row * nb + b], f16_at(sc, 2 * lane));
                // Quant t of column `lane` in 4-byte chunk j is at q[j * 64 + lane * 4 + t].
                match format {
                    Format::Q4_1 => {
                        // A nibble byte holds element i (low) and element i + 16 (high); lane
                        // l < 4 sums elements 4l..4l + 4, lane 4 + l elements 16 + 4l.. .
                        let mut sumi = [0i32; 8];
                        for i in 0..QK / 2 {
                            let v = q[(i / 4) * 4 * LANES + lane * 4 + i % 4] as i32;
                            sumi[i / 4] += (v & 0x0F) * x[i] as i32;
                            sumi[4 + i / 4] += (v >> 4) * x[i + QK / 2] as i32;
                        }
                        let (d, mw) = (dw * dx, f16_at(sc, 2 * LANES + 2 * lane));
                        let sx = acts.s[row * nb + b];
                        match numerics {
                            Numerics::LlamaCpp => {
                                for (acc, sumi) in lanes.iter_mut().zip(sumi) {
                                    *acc = d.mul_add(sumi as f32, *acc);
                                }
                                summs = mw.mul_add(sx, summs);
                            }
                            Numerics::Fast => {
                                acc = d.mul_add(sumi.iter().sum::<i32>() as f32, acc);
                                acc = mw.mul_add(sx, acc);
                            }
                        }
                    }
                    Format::Q8_0 => {
                        let mut sumi = 0i32;
                        for (i, &x) in x.iter().enumerate() {
                            let v = q[(i / 4) * 4 * LANES + lane * 4 + i % 4] as i8;
                            sumi += v as i32 * x as i32;
                        }
                        acc += sumi as f32 * dw * dx;
                    }
                }
            }
            if (format, numerics) == (Format::Q4_1, Numerics::LlamaCpp) {
                acc = ggml::reduce8(&lanes) + summs;
            }
            *out = acc;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The kernels' callers guarantee what their `# Safety` sections ask: the CPU features
    //! named in `target_feature`, `w` a whole packed group of `acts.nb` blocks, and rows
    //! `r0..r0 + R` present in `acts`.
    //!
    //! The float sequence per lane is the one in the module docs; keep it in step with
    //! `tile_scalar`, which the tests hold these kernels to bit for bit.

    use std::arch::x86_64::*;

    use super::{Acts, CacheLine, Format, LANES, QK};

    /// `super::quantize_blocks` 16 lanes at a time: the same operations, so the same bytes
    /// (the max of absolute values is exact in any order, and `cvtps_epi32` rounds half to even
    /// as `round_i8` does).
    ///
    /// # Safety
    /// The CPU has avx512f and f16c; `x.len()` is a multiple of 32, `qs` as long, and `d`, `s`
    /// and `bias` hold one entry per block.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn quantize_blocks(
        x: &[f32],
        qs: &mut [i8],
        d: &mut [f32],
        s: &mut [f32],
        bias: &mut [i32],
    ) {
        let blocks = x.len() / QK;
        assert!(qs.len() == x.len() && d.len() >= blocks && s.len() >= blocks);
        assert!(bias.len() >= blocks);
        let f16_round = |v: f32| -> f32 {
            let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(v));
            _mm_cvtss_f32(_mm_cvtph_ps(h))
        };
        // SAFETY (every raw access below): block i covers x[32 i..32 i + 32] and the same
        // range of `qs`, in bounds by the asserts above.
        unsafe {
            for i in 0..blocks {
                let v0 = _mm512_loadu_ps(x.as_ptr().add(i * QK));
                let v1 = _mm512_loadu_ps(x.as_ptr().add(i * QK + 16));
                let amax =
                    _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
                let scale = amax / 127.0;
                let id = _mm512_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
                let q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));
                let q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
                let out = qs.as_mut_ptr().add(i * QK).cast::<__m128i>();
                _mm_storeu_si128(out, _mm512_cvtsepi32_epi8(q0));
                _mm_storeu_si128(out.add(1), _mm512_cvtsepi32_epi8(q1));
                let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
                d[i] = f16_round(scale);
                s[i] = f16_round(scale * sum as f32);
                bias[i] = 128 * sum;
            }
        }
    }

    /// Broadcasts the four activation quants at `p` to every 32-bit lane.
    ///
    /// # Safety
    /// `p..p + 4` must be readable.
    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> i32 {
        // SAFETY: readable by the caller's contract; i8 data has no alignment to keep.
        unsafe { p.cast::<i32>().read_unaligned() }
    }

    /// Asks for block `b` of the group `next` (its quant lines and its scale line) to be
    /// brought into L2; nothing when `next` is empty. Issued a block at a time, between a
    /// kernel's own loads, so the requests never queue up behind each other.
    #[inline(always)]
    fn prefetch_block(next: &[u8], format: Format, nb: usize, b: usize) {
        if next.is_empty() {
            return;
        }
        let base = next.as_ptr();
        let qs = format.qs_bytes();
        let scales = nb * qs + b * format.scale_bytes();
        // SAFETY: SSE is part of the x86-64 baseline, and a prefetch is only a hint: it reads
        // nothing into the program and never faults, whatever the address.
        unsafe {
            let mut off = b * qs;
            while off < (b + 1) * qs {
                _mm_prefetch::<_MM_HINT_T1>(base.wrapping_add(off).cast());
                off += 64;
            }
            _mm_prefetch::<_MM_HINT_T1>(base.wrapping_add(scales).cast());
        }
    }

    /// Splits a Q4_1 group's quants into bytes: for block b, line 8b + j holds the low
    /// nibbles of its quant bytes 4j..4j + 4 for all 16 columns, line 8b + 4 + j the high ones
    /// (what `q4_1_vnni` otherwise computes for every row tile).
    ///
    /// # Safety
    /// The CPU has avx512f and avx512bw; `w` holds `nb` blocks of quants and `out` `8 · nb`
    /// lines. `next` is the next group (or empty): its block b is requested into L2 while block
    /// b is split, so that its reads overlap this group's arithmetic instead of stalling the
    /// next unpack.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn q4_1_unpack(w: &[u8], nb: usize, out: &mut [CacheLine], next: &[u8]) {
        assert!(out.len() >= nb * 8 && w.len() >= nb * Format::Q4_1.qs_bytes());
        let nibble = _mm512_set1_epi8(0x0F);
        // SAFETY: in bounds by the assert above; a `CacheLine` is 64-byte aligned.
        unsafe {
            let lines = out.as_mut_ptr();
            for b in 0..nb {
                prefetch_block(next, Format::Q4_1, nb, b);
                for j in 0..4 {
                    let p = _mm512_loadu_si512(w.as_ptr().add(b * 256 + j * 64).cast());
                    let line = |i: usize| lines.add(b * 8 + i).cast::<__m512i>();
                    _mm512_store_si512(line(j), _mm512_and_si512(p, nibble));
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(p), nibble);
                    _mm512_store_si512(line(4 + j), hi);
                }
            }
        }
    }

    /// # Safety
    /// See the module docs.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn q4_1_vnni<const R: usize, const UNPACKED: bool>(
        w: &[u8],
        nibbles: &[CacheLine],
        acts: &Acts,
        r0: usize,
        next: &[u8],
    ) -> [[f32; LANES]; R] {
        let nb = acts.nb;
        let qs = w.as_ptr();
        // SAFETY (every raw read below): `w` holds nb · 256 quant bytes then nb · 64 scale
        // bytes, and row r0 + r of `acts` holds nb · 32 quants and nb scales, per the contract.
        unsafe {
            let scales = qs.add(nb * Format::Q4_1.qs_bytes());
            let (xq, xd, xs, _) = acts.row_ptrs::<R>(r0);
            let nibble = _mm512_set1_epi8(0x0F);
            let zero = _mm512_setzero_si512();
            // Per row, llama.cpp's eight lanes of a block (lane j: low nibbles of chunk j,
            // lane 4 + j: high nibbles), each an f32 chain of fused multiply-adds.
            let mut acc = [[_mm512_setzero_ps(); 8]; R];
            let mut summs = [_mm512_setzero_ps(); R];
            for b in 0..nb {
                prefetch_block(next, Format::Q4_1, nb, b);
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(b * 64).cast()));
                let mw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(b * 64 + 32).cast()));
                let d: [__m512; R] =
                    std::array::from_fn(|r| _mm512_mul_ps(dw, _mm512_set1_ps(*xd[r].add(b))));
                for j in 0..4 {
                    let (lo, hi) = if UNPACKED {
                        let line =
                            |i: usize| _mm512_load_si512(nibbles[b * 8 + i].0.as_ptr().cast());
                        (line(j), line(4 + j))
                    } else {
                        let p = _mm512_loadu_si512(qs.add(b * 256 + j * 64).cast());
                        (
                            _mm512_and_si512(p, nibble),
                            _mm512_and_si512(_mm512_srli_epi16::<4>(p), nibble),
                        )
                    };
                    for r in 0..R {
                        let x = xq[r].add(b * QK + 4 * j);
                        let xl = _mm512_set1_epi32(bcast4(x));
                        let xh = _mm512_set1_epi32(bcast4(x.add(QK / 2)));
                        let sl = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, lo, xl));
                        let sh = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, hi, xh));
                        acc[r][j] = _mm512_fmadd_ps(d[r], sl, acc[r][j]);
                        acc[r][4 + j] = _mm512_fmadd_ps(d[r], sh, acc[r][4 + j]);
                    }
                }
                for r in 0..R {
                    summs[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*xs[r].add(b)), summs[r]);
                }
            }
            let mut out = [[0f32; LANES]; R];
            for r in 0..R {
                let a = &acc[r];
                // `hsum_float_8`: lanes 4 apart, then 2 apart, then 1.
                let t: [__m512; 4] = std::array::from_fn(|i| _mm512_add_ps(a[4 + i], a[i]));
                let sum = _mm512_add_ps(_mm512_add_ps(t[0], t[2]), _mm512_add_ps(t[1], t[3]));
                _mm512_storeu_ps(out[r].as_mut_ptr(), _mm512_add_ps(sum, summs[r]));
            }
            out
        }
    }

    /// `q4_1_vnni` with `Numerics::Fast`: a block's eight chunk products go into one integer
    /// sum per row and each row keeps one f32 accumulator, so up to eight rows share a block's
    /// nibbles, split in registers (the rows' chains are independent, so one chain per row
    /// waits on nothing).
    ///
    /// # Safety
    /// See the module docs.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn q4_1_vnni_fast<const R: usize>(
        w: &[u8],
        acts: &Acts,
        r0: usize,
        next: &[u8],
    ) -> [[f32; LANES]; R] {
        let nb = acts.nb;
        let qs = w.as_ptr();
        // SAFETY (every raw read below): as in `q4_1_vnni`.
        unsafe {
            let scales = qs.add(nb * Format::Q4_1.qs_bytes());
            let (xq, xd, xs, _) = acts.row_ptrs::<R>(r0);
            let nibble = _mm512_set1_epi8(0x0F);
            let zero = _mm512_setzero_si512();
            let mut acc = [_mm512_setzero_ps(); R];
            for b in 0..nb {
                prefetch_block(next, Format::Q4_1, nb, b);
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(b * 64).cast()));
                let mw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(b * 64 + 32).cast()));
                let p: [__m512i; 4] =
                    std::array::from_fn(|j| _mm512_loadu_si512(qs.add(b * 256 + j * 64).cast()));
                let lo = p.map(|p| _mm512_and_si512(p, nibble));
                let hi = p.map(|p| _mm512_and_si512(_mm512_srli_epi16::<4>(p), nibble));
                for r in 0..R {
                    let x = xq[r].add(b * QK);
                    let mut si = zero;
                    for j in 0..4 {
                        let xl = _mm512_set1_epi32(bcast4(x.add(4 * j)));
                        let xh = _mm512_set1_epi32(bcast4(x.add(QK / 2 + 4 * j)));
                        si = _mm512_dpbusd_epi32(si, lo[j], xl);
                        si = _mm512_dpbusd_epi32(si, hi[j], xh);
                    }
                    let sumi = _mm512_cvtepi32_ps(si);
                    let d = _mm512_mul_ps(dw, _mm512_set1_ps(*xd[r].add(b)));
                    acc[r] = _mm512_fmadd_ps(d, sumi, acc[r]);
                    acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*xs[r].add(b)), acc[r]);
                }
            }
            let mut out = [[0f32; LANES]; R];
            for r in 0..R {
                _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
            }
            out
        }
    }

    /// # Safety
    /// See the module docs.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn q8_0_vnni<const R: usize>(
        w: &[u8],
        acts: &Acts,
        r0: usize,
        next: &[u8],
    ) -> [[f32; LANES]; R] {
        let nb = acts.nb;
        let qs = w.as_ptr();
        // SAFETY (every raw read below): `w` holds nb · 512 quant bytes then nb · 32 scale
        // bytes, and row r0 + r of `acts` holds nb · 32 quants, nb scales and nb biases.
        unsafe {
            let scales = qs.add(nb * Format::Q8_0.qs_bytes());
            let (xq, xd, _, xb) = acts.row_ptrs::<R>(r0);
            // Flipping the sign bit maps i8 w to the u8 w + 128 that vpdpbusd needs.
            let flip = _mm512_set1_epi8(i8::MIN);
            let mut acc = [_mm512_setzero_ps(); R];
            for b in 0..nb {
                prefetch_block(next, Format::Q8_0, nb, b);
                let mut even = [_mm512_setzero_si512(); R];
                let mut odd = [_mm512_setzero_si512(); R];
                for j in 0..8 {
                    let p = _mm512_loadu_si512(qs.add(b * 512 + j * 64).cast());
                    let p = _mm512_xor_si512(p, flip);
                    for r in 0..R {
                        let x = _mm512_set1_epi32(bcast4(xq[r].add(b * QK + 4 * j)));
                        if j % 2 == 0 {
                            even[r] = _mm512_dpbusd_epi32(even[r], p, x);
                        } else {
                            odd[r] = _mm512_dpbusd_epi32(odd[r], p, x);
                        }
                    }
                }
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(b * 32).cast()));
                for r in 0..R {
                    let biased = _mm512_add_epi32(even[r], odd[r]);
                    let sumi = _mm512_sub_epi32(biased, _mm512_set1_epi32(*xb[r].add(b)));
                    let sumi = _mm512_cvtepi32_ps(sumi);
                    let t = _mm512_mul_ps(_mm512_mul_ps(sumi, dw), _mm512_set1_ps(*xd[r].add(b)));
                    acc[r] = _mm512_add_ps(acc[r], t);
                }
            }
            let mut out = [[0f32; LANES]; R];
            for r in 0..R {
                _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
            }
            out
        }
    }

    /// # Safety
    /// See the module docs.
    #[target_feature(enable = "avx2,f16c,fma")]
    pub(super) unsafe fn q4_1_avx2<const R: usize>(
        w: &[u8],
        acts: &Acts,
        r0: usize,
        next: &[u8],
    ) -> [[f32; LANES]; R] {
        let nb = acts.nb;
        let qs = w.as_ptr();
        // SAFETY (every raw read below): as in `q4_1_vnni`; each half reads 32 of a chunk's 64
        // bytes and 16 of a scale vector's 32.
        unsafe {
            let scales = qs.add(nb * Format::Q4_1.qs_bytes());
            let (xq, xd, xs, _) = acts.row_ptrs::<R>(r0);
            let nibble = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let mut out = [[0f32; LANES]; R];
            for half in 0..2 {
                // As in `q4_1_vnni`, eight lanes per row.
                let mut acc = [[_mm256_setzero_ps(); 8]; R];
                let mut summs = [_mm256_setzero_ps(); R];
                // The first half brings the group in; the second finds it in cache.
                let next = if half == 0 { next } else { &[] };
                for b in 0..nb {
                    prefetch_block(next, Format::Q4_1, nb, b);
                    let sc = scales.add(b * 64 + half * 16);
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(sc.cast()));
                    let mw = _mm256_cvtph_ps(_mm_loadu_si128(sc.add(32).cast()));
                    let d: [__m256; R] =
                        std::array::from_fn(|r| _mm256_mul_ps(dw, _mm256_set1_ps(*xd[r].add(b))));
                    for j in 0..4 {
                        let p = _mm256_loadu_si256(qs.add(b * 256 + j * 64 + half * 32).cast());
                        let lo = _mm256_and_si256(p, nibble);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(p), nibble);
                        for r in 0..R {
                            let x = xq[r].add(b * QK + 4 * j);
                            let xl = _mm256_set1_epi32(bcast4(x));
                            let xh = _mm256_set1_epi32(bcast4(x.add(QK / 2)));
                            // A pair of nibble × i8 products fits an i16 (2 · 15 · 127).
                            let sl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), ones);
                            let sh = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xh), ones);
                            acc[r][j] = _mm256_fmadd_ps(d[r], _mm256_cvtepi32_ps(sl), acc[r][j]);
                            acc[r][4 + j] =
                                _mm256_fmadd_ps(d[r], _mm256_cvtepi32_ps(sh), acc[r][4 + j]);
                        }
                    }
                    for r in 0..R {
                        summs[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*xs[r].add(b)), summs[r]);
                    }
                }
                for r in 0..R {
                    let a = &acc[r];
                    let t: [__m256; 4] = std::array::from_fn(|i| _mm256_add_ps(a[4 + i], a[i]));
                    let sum = _mm256_add_ps(_mm256_add_ps(t[0], t[2]), _mm256_add_ps(t[1], t[3]));
                    _mm256_storeu_ps(
                        out[r].as_mut_ptr().add(half * 8),
                        _mm256_add_ps(sum, summs[r]),
                    );
                }
            }
            out
        }
    }

    /// `q4_1_avx2` with `Numerics::Fast`: per row one integer sum per block and one f32
    /// accumulator, so four rows share each split of the nibbles.
    ///
    /// # Safety
    /// See the module docs.
    #[target_feature(enable = "avx2,f16c,fma")]
    pub(super) unsafe fn q4_1_avx2_fast<const R: usize>(
        w: &[u8],
        acts: &Acts,
        r0: usize,
        next: &[u8],
    ) -> [[f32; LANES]; R] {
        let nb = acts.nb;
        let qs = w.as_ptr();
        // SAFETY (every raw read below): as in `q4_1_avx2`.
        unsafe {
            let scales = qs.add(nb * Format::Q4_1.qs_bytes());
            let (xq, xd, xs, _) = acts.row_ptrs::<R>(r0);
            let nibble = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let mut out = [[0f32; LANES]; R];
            for half in 0..2 {
                let mut acc = [_mm256_setzero_ps(); R];
                let next = if half == 0 { next } else { &[] };
                for b in 0..nb {
                    prefetch_block(next, Format::Q4_1, nb, b);
                    // A block's eight pair sums per i16 lane stay exact: 8 · 2 · 15 · 128 is
                    // 30720, inside i16, so they are added as i16 and widened once.
                    let mut pairs = [_mm256_setzero_si256(); R];
                    for j in 0..4 {
                        let p = _mm256_loadu_si256(qs.add(b * 256 + j * 64 + half * 32).cast());
                        let lo = _mm256_and_si256(p, nibble);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(p), nibble);
                        for r in 0..R {
                            let x = xq[r].add(b * QK + 4 * j);
                            let xl = _mm256_set1_epi32(bcast4(x));
                            let xh = _mm256_set1_epi32(bcast4(x.add(QK / 2)));
                            let both = _mm256_add_epi16(
                                _mm256_maddubs_epi16(lo, xl),
                                _mm256_maddubs_epi16(hi, xh),
                            );
                            pairs[r] = _mm256_add_epi16(pairs[r], both);
                        }
                    }
                    let sc = scales.add(b * 64 + half * 16);
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(sc.cast()));
                    let mw = _mm256_cvtph_ps(_mm_loadu_si128(sc.add(32).cast()));
                    for r in 0..R {
                        let sumi = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs[r], ones));
                        let d = _mm256_mul_ps(dw, _mm256_set1_ps(*xd[r].add(b)));
                        acc[r] = _mm256_fmadd_ps(d, sumi, acc[r]);
                        acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*xs[r].add(b)), acc[r]);
                    }
                }
                for r in 0..R {
                    _mm256_storeu_ps(out[r].as_mut_ptr().add(half * 8), acc[r]);
                }
            }
            out
        }
    }

    /// # Safety
    /// See the module docs.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn q8_0_avx2<const R: usize>(
        w: &[u8],
        acts: &Acts,
        r0: usize,
        next: &[u8],
    ) -> [[f32; LANES]; R] {
        let nb = acts.nb;
        let qs = w.as_ptr();
        // SAFETY (every raw read below): as in `q8_0_vnni`; each half reads 32 of a chunk's 64
        // bytes and 16 of a scale vector's 32.
        unsafe {
            let scales = qs.add(nb * Format::Q8_0.qs_bytes());
            let (xq, xd, ..) = acts.row_ptrs::<R>(r0);
            let ones = _mm256_set1_epi16(1);
            let mut out = [[0f32; LANES]; R];
            for half in 0..2 {
                let mut acc = [_mm256_setzero_ps(); R];
                let next = if half == 0 { next } else { &[] };
                for b in 0..nb {
                    prefetch_block(next, Format::Q8_0, nb, b);
                    let mut isum = [_mm256_setzero_si256(); R];
                    for j in 0..8 {
                        let p = _mm256_loadu_si256(qs.add(b * 512 + j * 64 + half * 32).cast());
                        // maddubs wants one unsigned operand: |w| · (x · sign w) = w · x, and
                        // a pair of those is at most 2 · 128 · 127, inside i16.
                        let abs = _mm256_abs_epi8(p);
                        for r in 0..R {
                            let x = _mm256_set1_epi32(bcast4(xq[r].add(b * QK + 4 * j)));
                            let pairs = _mm256_maddubs_epi16(abs, _mm256_sign_epi8(x, p));
                            isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(pairs, ones));
                        }
                    }
                    let dw =
                        _mm256_cvtph_ps(_mm_loadu_si128(scales.add(b * 32 + half * 16).cast()));
                    for r in 0..R {
                        let sumi = _mm256_cvtepi32_ps(isum[r]);
                        let t =
                            _mm256_mul_ps(_mm256_mul_ps(sumi, dw), _mm256_set1_ps(*xd[r].add(b)));
                        acc[r] = _mm256_add_ps(acc[r], t);
                    }
                }
                for r in 0..R {
                    _mm256_storeu_ps(out[r].as_mut_ptr().add(half * 8), acc[r]);
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in about [-1, 1], so a failure can be reproduced.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn tensor(rows: usize, cols: usize, seed: u64) -> Tensor {
        Tensor::from_vec(values(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap()
    }

    fn quantized(out: usize, k: usize, dtype: GgmlDType) -> QTensor {
        QTensor::quantize(&tensor(out, k, (out * k) as u64), dtype).unwrap()
    }

    /// Every weight format with every choice of numerics.
    const KERNELS: [(GgmlDType, Numerics); 4] = [
        (GgmlDType::Q4_1, Numerics::LlamaCpp),
        (GgmlDType::Q4_1, Numerics::Fast),
        (GgmlDType::Q8_0, Numerics::LlamaCpp),
        (GgmlDType::Q8_0, Numerics::Fast),
    ];

    fn packed(out: usize, k: usize, dtype: GgmlDType, numerics: Numerics) -> Packed {
        match QLinear::new(quantized(out, k, dtype), numerics)
            .unwrap()
            .inner
        {
            Inner::Packed(p) => p,
            Inner::Candle(_) => panic!("{dtype:?} [{out}, {k}] not packed"),
        }
    }

    fn run(p: &Packed, isa: Isa, x: &[f32], rows: usize) -> Vec<f32> {
        let mut dst = vec![0f32; rows * p.out];
        p.matmul(isa, x, rows, &mut dst);
        dst
    }

    const SHAPES: [(usize, usize); 6] = [
        (576, 576),
        (192, 576),
        (1536, 576),
        (576, 1536),
        (1000, 576),
        (40, 64),
    ];
    /// One row, part of a tile, whole tiles of every kernel, and a tile and a bit.
    const ROWS: [usize; 6] = [1, 3, 8, 9, 16, 17];

    /// Q4_1 runs candle's `vec_dot_unopt` sequence exactly; Q8_0 against candle's AVX kernel
    /// (another summation order) or, for `in` a multiple of 256, its Q8_K path (another
    /// activation quantisation), within a tolerance relative to the row's largest output.
    #[test]
    fn matches_candle() {
        for (dtype, numerics) in KERNELS {
            for (out, k) in SHAPES {
                let candle = QMatMul::from_qtensor(quantized(out, k, dtype)).unwrap();
                let ours = QLinear::new(quantized(out, k, dtype), numerics).unwrap();
                assert!(matches!(ours.inner, Inner::Packed(_)));
                for rows in ROWS {
                    let x = tensor(rows, k, 7 * rows as u64 + k as u64);
                    let want = candle.forward(&x).unwrap().to_vec2::<f32>().unwrap();
                    let got = ours.forward(&x).unwrap().to_vec2::<f32>().unwrap();
                    // candle quantizes activations with other rounding rules (half away from
                    // zero, 1 / d, Q8_1's s in f16 arithmetic) than llama.cpp's AVX code that
                    // these kernels follow: an occasional quant one step off.
                    let tol = if k % 256 == 0 && dtype == GgmlDType::Q8_0 {
                        2e-2
                    } else if dtype == GgmlDType::Q4_1 {
                        1e-2
                    } else {
                        1e-4
                    };
                    for (want, got) in want.iter().zip(&got) {
                        let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
                        for (w, g) in want.iter().zip(got) {
                            assert!(
                                (w - g).abs() <= tol * scale,
                                "{dtype:?} {rows}x{k}x{out}: {w} vs {g}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Against f64 arithmetic on candle's quantized weight blocks and the activation quants
    /// (`activation_quantisation_is_ggml_avx` checks those), independently of summation order.
    #[test]
    fn matches_f64_on_candle_blocks() {
        for (dtype, numerics) in KERNELS {
            let fmt = match dtype {
                GgmlDType::Q4_1 => Format::Q4_1,
                _ => Format::Q8_0,
            };
            for (out, k) in [(192, 576), (1000, 1536)] {
                let rows = 5;
                let w = quantized(out, k, dtype);
                let x = tensor(rows, k, 99);
                let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let acts = Acts::new(fmt, Isa::detect(), &xs, rows, k);
                let wb = w.data().unwrap().to_vec();
                let got = QLinear::new(w, numerics)
                    .unwrap()
                    .forward(&x)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                let nb = k / QK;
                let f = |b: &[u8], i: usize| f16_at(b, i) as f64;
                for (r, got) in got.iter().enumerate() {
                    for (c, &g) in got.iter().enumerate() {
                        let (mut sum, mut size) = (0f64, 0f64);
                        for b in 0..nb {
                            let i = r * nb + b;
                            let (dx, qx) = (acts.d[i] as f64, &acts.qs[i * QK..][..QK]);
                            let sx = || acts.s[i] as f64;
                            let term = match dtype {
                                GgmlDType::Q4_1 => {
                                    let blk = &wb[(c * nb + b) * 20..][..20];
                                    let sumi: i32 = (0..16)
                                        .map(|i| {
                                            (blk[4 + i] & 15) as i32 * qx[i] as i32
                                                + (blk[4 + i] >> 4) as i32 * qx[i + 16] as i32
                                        })
                                        .sum();
                                    f(blk, 0) * dx * sumi as f64 + f(blk, 2) * sx()
                                }
                                _ => {
                                    let blk = &wb[(c * nb + b) * 34..][..34];
                                    let sumi: i32 = (0..32)
                                        .map(|i| blk[2 + i] as i8 as i32 * qx[i] as i32)
                                        .sum();
                                    f(blk, 0) * dx * sumi as f64
                                }
                            };
                            sum += term;
                            size += term.abs();
                        }
                        assert!(
                            (sum - g as f64).abs() <= 1e-5 * size.max(1e-9),
                            "{dtype:?} [{r}, {c}]: {g} vs {sum}"
                        );
                    }
                }
            }
        }
    }

    /// The activation quantisation is ggml's, byte for byte, as candle implements it.
    #[test]
    fn activation_quantisation_is_ggml_avx() {
        let (rows, k) = (3, 576);
        let x = tensor(rows, k, 5);
        let mut xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // A block with amax 127 (id 1), so that halves are exact ties, and an all-zero block.
        for (i, v) in xs[..QK].iter_mut().enumerate() {
            *v = if i == 0 {
                127.0
            } else {
                (i as f32 - 16.0) + 0.5
            };
        }
        xs[QK..2 * QK].fill(0.0);
        for isa in Isa::available() {
            let a1 = Acts::new(Format::Q4_1, isa, &xs, rows, k);
            let a0 = Acts::new(Format::Q8_0, isa, &xs, rows, k);
            check_ggml_quants(&xs, &a1, &a0);
        }
    }

    /// ggml's x86 `quantize_row_q8_1` / `quantize_row_q8_0`, written out plainly.
    fn check_ggml_quants(xs: &[f32], a1: &Acts, a0: &Acts) {
        for (i, block) in xs.chunks_exact(QK).enumerate() {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = 127.0 / amax;
            let q: Vec<i8> = block
                .iter()
                .map(|v| (v * id).round_ties_even() as i8)
                .collect();
            let sum: i32 = q.iter().map(|&q| q as i32).sum();
            let dh = f16::from_f32(d).to_f32();
            assert_eq!((a1.d[i], a0.d[i]), (dh, dh));
            assert_eq!(a1.s[i], f16::from_f32(d * sum as f32).to_f32());
            assert_eq!(&a1.qs[i * QK..][..QK], &q[..]);
            assert_eq!(&a0.qs[i * QK..][..QK], &q[..]);
            assert_eq!(a0.bias[i], 128 * sum);
        }
    }

    /// Every SIMD path runs the scalar path's float sequence, so they agree bit for bit; Q8_0
    /// is summed the same way whatever the numerics.
    #[test]
    fn simd_paths_equal_scalar() {
        for (dtype, numerics) in KERNELS {
            for (out, k) in SHAPES {
                let p = packed(out, k, dtype, numerics);
                let q8_0_as_llama_cpp =
                    (dtype == GgmlDType::Q8_0).then(|| packed(out, k, dtype, Numerics::LlamaCpp));
                for rows in ROWS {
                    let x = values(rows * k, 3 + rows as u64);
                    let want = run(&p, Isa::Scalar, &x, rows);
                    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    for isa in Isa::available() {
                        let got = run(&p, isa, &x, rows);
                        assert!(
                            bits(&want) == bits(&got),
                            "{dtype:?} {numerics:?} {isa:?} {rows}x{k}x{out}"
                        );
                    }
                    if let Some(q) = &q8_0_as_llama_cpp {
                        assert!(bits(&want) == bits(&run(q, Isa::Scalar, &x, rows)));
                    }
                }
            }
        }
    }

    /// A row's output must not depend on the rows batched with it (nor on the row tile or the
    /// thread it lands in).
    #[test]
    fn row_alone_equals_row_in_batch() {
        for (dtype, numerics) in KERNELS {
            for (out, k) in [(1000, 576), (576, 1536)] {
                let p = packed(out, k, dtype, numerics);
                let rows = 13;
                let x = values(rows * k, 11);
                for isa in Isa::available() {
                    let batch = run(&p, isa, &x, rows);
                    for r in 0..rows {
                        let alone = run(&p, isa, &x[r * k..][..k], 1);
                        let same = alone
                            .iter()
                            .zip(&batch[r * out..][..out])
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{dtype:?} {numerics:?} {isa:?} [{out}, {k}] row {r}");
                    }
                }
            }
        }
    }

    #[test]
    fn round_i8_is_round_ties_even_as_i8() {
        let special = [
            0.5, -0.5, 1.5, -1.5, 2.5, 126.5, -127.5, 127.49, 128.0, -129.5, 1e9, -1e9,
        ];
        let near_halves = (-300..300).flat_map(|i| {
            let h = i as f32 + 0.5;
            [
                h,
                f32::from_bits(h.to_bits() + 1),
                f32::from_bits(h.to_bits() - 1),
            ]
        });
        let all = values(10_000, 4).into_iter().map(|v| v * 140.0);
        for v in special.into_iter().chain(near_halves).chain(all) {
            assert_eq!(round_i8(v), v.round_ties_even() as i8, "{v}");
        }
        assert_eq!(round_i8(f32::NAN), 0);
        assert_eq!(round_i8(f32::INFINITY), 127);
        assert_eq!(round_i8(f32::NEG_INFINITY), -128);
    }

    #[test]
    fn other_formats_fall_back_to_candle() {
        let (out, k, rows) = (64, 256, 3);
        let ours = QLinear::new(quantized(out, k, GgmlDType::Q4_0), Numerics::Fast).unwrap();
        assert!(matches!(ours.inner, Inner::Candle(_)));
        let candle = QMatMul::from_qtensor(quantized(out, k, GgmlDType::Q4_0)).unwrap();
        let x = tensor(rows, k, 1);
        let want = candle.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(ours.forward(&x).unwrap().to_vec2::<f32>().unwrap(), want);
    }

    #[test]
    fn keeps_leading_dims_and_dtype() {
        let (out, k) = (40, 64);
        let ours = QLinear::new(quantized(out, k, GgmlDType::Q4_1), Numerics::Fast).unwrap();
        let x = Tensor::from_vec(values(2 * 3 * k, 2), (2, 3, k), &Device::Cpu).unwrap();
        let y = ours.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 3, out]);
        let flat = ours.forward(&x.reshape((6, k)).unwrap()).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            flat.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let y16 = ours.forward(&x.to_dtype(DType::F16).unwrap()).unwrap();
        assert_eq!(y16.dtype(), DType::F16);
        assert!(ours.forward(&tensor(2, k + 32, 0)).is_err());
    }
}
