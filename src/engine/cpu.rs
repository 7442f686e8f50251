//! Which instruction sets Ember's own CPU kernels may use: everything the CPU has, unless the
//! operator caps them (`ember serve --cpu-isa`, `EMBER_CPU_ISA`) as oneDNN's
//! `ONEDNN_MAX_CPU_ISA` does. A cap runs the narrower paths on a wide machine: to reproduce
//! what an older CPU of the fleet computes, to measure what it would gain, and so the test suite
//! can serve the real model through every path on one CI machine. candle's own ops (softmax, its
//! matmul) keep their own detection.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// The kernel families, narrowest first; each cap allows itself and everything before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust at the compiler's baseline width.
    Portable,
    /// 256-bit vectors with FMA (Haswell, Zen 1 and later).
    Avx2,
    /// 512-bit vectors without VNNI and BF16: AVX-512 F, BW, DQ and VL as Skylake-SP has them
    /// (oneDNN's `AVX512_CORE`).
    Avx512Core,
    /// 512-bit vectors with VNNI and BF16 where the CPU has them (Ice Lake has VNNI; Cooper
    /// Lake and Zen 4 have both).
    Avx512,
    /// Intel AMX tiles (Sapphire Rapids and later).
    Amx,
}

impl Isa {
    const ALL: [Isa; 5] = [
        Isa::Portable,
        Isa::Avx2,
        Isa::Avx512Core,
        Isa::Avx512,
        Isa::Amx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512Core => "avx512-core",
            Isa::Avx512 => "avx512",
            Isa::Amx => "amx",
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Isa {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown instruction set {s:?}; use portable, avx2, avx512-core, avx512 or amx"
                )
            })
    }
}

static CAP: OnceLock<Isa> = OnceLock::new();

/// Caps every kernel chosen from now on at `isa`. Kernels choose once, so this must come before
/// the first model loads; a second, different cap is refused and the first stays.
pub fn set_cap(isa: Isa) -> Result<(), String> {
    match CAP.get_or_init(|| isa) {
        &set if set == isa => Ok(()),
        set => Err(format!(
            "the CPU kernels were already chosen with the cap at {set}; cannot cap them at {isa}"
        )),
    }
}

/// The cap from `EMBER_CPU_ISA`, for programs without `ember serve`'s flags (the benchmarks).
pub fn set_cap_from_env() -> Result<(), String> {
    match std::env::var("EMBER_CPU_ISA") {
        Ok(v) => set_cap(v.parse().map_err(|e| format!("EMBER_CPU_ISA: {e}"))?),
        Err(_) => Ok(()),
    }
}

/// Whether kernels may use `isa` (the CPU must still have it).
pub fn allows(isa: Isa) -> bool {
    isa <= *CAP.get_or_init(|| Isa::Amx)
}

/// The widest family this CPU has within the cap, for the start-up log and
/// `ember_cpu_kernels_info`.
pub fn widest() -> Isa {
    if super::bf16_linear::amx_available() {
        return Isa::Amx;
    }
    if avx512_bf16() || avx512_vnni() {
        Isa::Avx512
    } else if avx512() {
        Isa::Avx512Core
    } else if avx2_fma() {
        Isa::Avx2
    } else {
        Isa::Portable
    }
}

/// AVX-512F with FMA, allowed and present: the 512-bit forms of the kernels. Those that need
/// more check it beside this: BF16 and VNNI through `avx512_bf16` and `avx512_vnni`, which the
/// `avx512-core` cap turns off; F16C and BW, which every AVX-512 server CPU has, directly.
pub(crate) fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        allows(Isa::Avx512Core)
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `avx512` and AVX-512 BF16 (`vdpbf16ps`), allowed and present.
pub(crate) fn avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        allows(Isa::Avx512) && avx512() && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `avx512` with BW and VNNI (`vpdpbusd`), allowed and present.
pub(crate) fn avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        allows(Isa::Avx512)
            && avx512()
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX2 and FMA, allowed and present: every 256-bit kernel form here needs both.
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        allows(Isa::Avx2)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_a_wrong_one_lists_the_choices() {
        for isa in Isa::ALL {
            assert_eq!(isa.to_string().parse::<Isa>(), Ok(isa));
        }
        let err = "avx512bf16".parse::<Isa>().unwrap_err();
        assert!(err.contains("\"avx512bf16\"") && err.contains("avx2, avx512-core, avx512 or amx"));
        assert!(
            Isa::ALL.windows(2).all(|w| w[0] < w[1]),
            "ALL is narrowest first"
        );
    }

    #[test]
    fn a_second_different_cap_is_refused_and_the_first_stays() {
        // `amx` is what no cap means, so the other tests in this process keep every kernel.
        assert_eq!(set_cap(Isa::Amx), Ok(()));
        assert_eq!(set_cap(Isa::Amx), Ok(()));
        let err = set_cap(Isa::Avx2).unwrap_err();
        assert!(err.contains("at amx") && err.contains("at avx2"), "{err}");
        assert!(allows(Isa::Amx) && allows(Isa::Portable));
    }
}
