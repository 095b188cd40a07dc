//! Which matrix multiply the CPU backend runs, and with which vector instructions.
//!
//! Two engines sit behind `gemm::sgemm`:
//! - `crate`, the default: the `gemm` crate, whose AVX2/FMA kernels it dispatches to itself (its
//!   AVX-512 kernels are behind a feature we leave off, so it runs AVX2 on every x86 machine);
//! - rotvar's own packed kernels (`gemm.rs`), at a width chosen here: `avx512`, `avx2` or
//!   `portable`. Each computes every output with the same chain of fused multiply-adds, so the
//!   three agree to the bit (tests/cpu_gemm.rs holds them to that) and the AVX2 path can be
//!   measured on an AVX-512 machine.
//!
//! The crate stays the default while it trains faster (benches/RESULTS.md has the comparison).

use anyhow::{bail, Result};
use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust with `f32::mul_add`: any CPU, and the readable oracle of the others.
    Portable,
    /// 256-bit AVX2 with FMA3.
    Avx2,
    /// 512-bit AVX-512F.
    Avx512,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The widest path this CPU runs.
    pub fn best() -> Isa {
        *Isa::ALL.iter().rev().find(|i| i.supported()).unwrap_or(&Isa::Portable)
    }

    fn code(self) -> u8 {
        self as u8 + 1
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The default path: rotvar's widest vector path on this CPU, or the crate where rotvar has none
/// (off x86, where the crate's own vector kernels beat rotvar's portable oracle).
pub fn auto() -> Option<Isa> {
    Some(Isa::best()).filter(|i| *i != Isa::Portable)
}

/// `crate` (None) or one of rotvar's own paths by name; `auto` is [`auto`].
pub fn parse(s: &str) -> Result<Option<Isa>> {
    match s.to_ascii_lowercase().as_str() {
        "crate" => Ok(None),
        "auto" => Ok(auto()),
        "portable" => Ok(Some(Isa::Portable)),
        "avx2" => Ok(Some(Isa::Avx2)),
        "avx512" | "avx-512" => Ok(Some(Isa::Avx512)),
        other => bail!("unknown CPU GEMM {other:?}: use crate, auto, avx512, avx2 or portable"),
    }
}

/// 0: the crate; `AUTO` (the default): [`auto`].
static CHOSEN: AtomicU8 = AtomicU8::new(AUTO);
const AUTO: u8 = u8::MAX;

/// Run every later GEMM of this process on rotvar's `isa` path, or on the crate (None).
pub fn choose(isa: Option<Isa>) -> Result<()> {
    if let Some(i) = isa {
        if !i.supported() {
            bail!("this CPU ({}) cannot run the {i} path; the widest it runs is {}", cpu_model(), Isa::best());
        }
    }
    CHOSEN.store(isa.map_or(0, Isa::code), Ordering::Relaxed);
    Ok(())
}

/// rotvar's own path in use, or None for the crate.
pub fn active() -> Option<Isa> {
    match CHOSEN.load(Ordering::Relaxed) {
        0 => None,
        AUTO => auto(),
        c => Some(Isa::ALL[c as usize - 1]),
    }
}

/// The CPU's brand string (from CPUID; `/proc/cpuinfo` shows the same), or the architecture
/// where there is none.
pub fn cpu_model() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        // Leaf 0x80000000 says which extended leaves follow.
        let max = __cpuid(0x8000_0000).eax;
        if max >= 0x8000_0004 {
            let mut bytes = Vec::with_capacity(48);
            for leaf in 0x8000_0002u32..=0x8000_0004 {
                let r = __cpuid(leaf);
                for v in [r.eax, r.ebx, r.ecx, r.edx] {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
            }
            let s = String::from_utf8_lossy(&bytes).trim_matches(char::from(0)).trim().to_string();
            if !s.is_empty() {
                return s;
            }
        }
    }
    std::env::consts::ARCH.to_string()
}

/// The per-core L2 cache in bytes, as Linux's sysfs gives it for CPU 0; 1 MiB where it is not
/// readable. The Winograd kernels size their blocks by it (AMD's Zen 4 has 1 MiB, Intel's
/// Sapphire Rapids 2 MiB).
pub fn l2_bytes() -> usize {
    static L2: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *L2.get_or_init(|| {
        let read =
            |i: usize, f: &str| std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu0/cache/index{i}/{f}"));
        (0..8)
            .filter(|&i| read(i, "level").is_ok_and(|l| l.trim() == "2"))
            .find_map(|i| parse_cache_size(read(i, "size").ok()?.trim()))
            .unwrap_or(1 << 20)
    })
}

/// "2048K", "1M" or a plain byte count.
fn parse_cache_size(s: &str) -> Option<usize> {
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => s.split_at(at),
        None => (s, ""),
    };
    let n: usize = digits.parse().ok()?;
    match unit.trim() {
        "" => Some(n),
        "K" | "KB" | "KiB" => Some(n << 10),
        "M" | "MB" | "MiB" => Some(n << 20),
        _ => None,
    }
}

/// What the GEMM runs on: `gemm crate avx2+fma`, or rotvar's path (`rotvar avx512`).
pub fn gemm_path() -> String {
    match active() {
        None if Isa::Avx2.supported() => "gemm crate avx2+fma".into(),
        None => "gemm crate scalar".into(),
        Some(i) => format!("rotvar {i}"),
    }
}

/// One line for `rotvar info` and bench rows: the CPU, its widest vector set, the GEMM path.
pub fn describe() -> String {
    format!("{} (up to {}), GEMM: {}", cpu_model(), Isa::best(), gemm_path())
}

/// Run `f` compiled for `isa`'s vector set, so that code written over fixed-size arrays fills
/// whole registers of that width (Winograd's lanes, the direct convolutions' rows). It is the
/// GEMM path's set, so forcing AVX2 on an AVX-512 machine forces it everywhere. Whatever `f`
/// computes with plain operations or `mul_add` has the same bits on every path.
#[inline(always)]
pub fn vectorized<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: each is called only where the CPU has the features it enables (`isa` comes
        // from `Isa::best` or a checked `--cpu-gemm`, and is asserted here).
        assert!(isa.supported(), "this CPU cannot run the {isa} path");
        match isa {
            Isa::Avx512 => return unsafe { avx512(f) },
            Isa::Avx2 => return unsafe { avx2(f) },
            Isa::Portable => {}
        }
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_sizes_parse_as_sysfs_writes_them() {
        assert_eq!(parse_cache_size("2048K"), Some(2 << 20));
        assert_eq!(parse_cache_size("1M"), Some(1 << 20));
        assert_eq!(parse_cache_size("524288"), Some(512 << 10));
        assert_eq!(parse_cache_size("big"), None);
        assert_eq!(parse_cache_size("12Q"), None);
        // Whatever this machine says, or the fallback: a real L2 size.
        assert!((64 << 10..=64 << 20).contains(&l2_bytes()), "{}", l2_bytes());
    }
}
