//! Model families and all compute. Knows nothing of HTTP or queues: an engine is loaded from a
//! folder onto a device and turns a batch of inputs into outputs.

mod add_norm;
pub mod bert;
mod bf16_linear;
pub mod cpu;
pub mod embed;
mod encoder_attention;
#[cfg(feature = "generate")]
pub mod generate;
pub mod tensor;

use std::path::PathBuf;

/// 64 bytes that start on a cache line (an AVX-512 register, an AMX tile row), so no aligned
/// load of one straddles two lines. Kernels keep their scratch in these.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct CacheLine(pub(crate) [u8; 64]);

/// Defines `fn $name` to run its body compiled for AVX-512 or AVX2, with hardware fused
/// multiply-add, where the CPU has them and the cap (`cpu`) allows them: the loops vectorize at
/// the widest width, and `f32::mul_add` is one instruction instead of a call into libm (exact
/// but a hundred times slower). Every path computes the same numbers.
macro_rules! fma_dispatched {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if $crate::engine::cpu::avx512() {
                    // SAFETY: the features were just detected.
                    return unsafe { avx512($($arg),*) };
                }
                if $crate::engine::cpu::avx2_fma() {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) use fma_dispatched;

/// The AVX-512 mask of the first `min(n, 16)` lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn first_lanes(n: usize) -> u16 {
    ((1u32 << n.min(16)) - 1) as u16
}

/// A fresh output of `len` elements that `write` fills, not zeroed first: zeroing outputs that
/// the ops overwrite whole was a few per cent of a served batched pass (a memset, or the OS
/// clearing fresh pages). Each op's tests fill their output with NaN first, so they check that
/// every element gets written.
///
/// # Safety
/// `write` must write every element.
pub(crate) unsafe fn fresh_output(
    len: usize,
    write: impl FnOnce(&mut [std::mem::MaybeUninit<f32>]),
) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    write(&mut out.spare_capacity_mut()[..len]);
    // Safety: the caller's `write` wrote all `len` elements.
    unsafe { out.set_len(len) };
    out
}

/// An initialised buffer as an output for an op that only writes to it.
#[cfg(test)]
pub(crate) fn as_uninit(out: &mut [f32]) -> &mut [std::mem::MaybeUninit<f32>] {
    // Safety: `MaybeUninit<f32>` has `f32`'s layout, and only initialised values are written
    // through the result, so `out` stays initialised.
    unsafe { &mut *(out as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) }
}

/// The contiguous f32 data of a custom op's input, or why the op cannot take it.
pub(crate) fn contiguous_f32<'a>(
    op: &str,
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op} takes f32");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op} takes a contiguous tensor");
    };
    Ok(&data[start..end])
}

/// The device models are loaded on, parsed from `--device` (`cpu`, `cuda`, `cuda:N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}; use cpu, cuda or cuda:N")),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    pub fn open(self) -> Result<candle_core::Device, EngineError> {
        match self {
            Self::Cpu => Ok(candle_core::Device::Cpu),
            Self::Cuda(_) if !cfg!(feature = "cuda") => Err(EngineError::Device(
                "this binary was built without the `cuda` feature; rebuild with \
                 `cargo build --release --features cuda` or use --device cpu"
                    .into(),
            )),
            Self::Cuda(n) => candle_core::Device::new_cuda(n)
                .map_err(|e| EngineError::Device(format!("cuda:{n}: {e}"))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("device: {0}")]
    Device(String),
    #[error("{file}: {message}")]
    File { file: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl EngineError {
    pub(crate) fn file(file: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Self::File {
            file: file.into(),
            message: message.to_string(),
        }
    }
}

/// Reproducible test data for the kernels' unit tests.
#[cfg(test)]
pub(crate) fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
    // xorshift32: uniform enough in [-1, 1) and the same everywhere.
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}
