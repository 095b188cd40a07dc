//! The arithmetic of convolutions and dense layers (`--precision`).
//!
//! fp32 is the default and the reference: the published numbers and V are fp32. The others
//! follow autocast: the two operands of every convolution and matrix product (forward, and
//! both backward passes) are rounded, to TF32 (10 mantissa bits, as the tensor cores' TF32
//! mode reads them) or to BF16 (7 bits), and the products are summed in fp32. Everything else
//! stays fp32: master weights, Adam's state, batch-norm statistics, the loss, the bias
//! gradients (sums of the unrounded output gradient) and the variance moments.
//!
//! `3xtf32` splits each operand into two TF32 halves and keeps three of the four products, so
//! tensor cores reach about fp32's accuracy. The CPU has no tensor cores: its twin of 3xTF32
//! is plain fp32, and its twins of TF32 and BF16 round the operands exactly as the GPU kernels
//! do (kernels/mma.cuh: `rv_tf32`, `rv_bf16x2`), then multiply in fp32. The two backends then
//! differ only in the order of the fp32 sums.

use anyhow::{bail, Result};
use rayon::prelude::*;
use std::borrow::Cow;
use std::fmt;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    #[default]
    Fp32,
    Tf32,
    Tf32x3,
    Bf16,
}

impl Precision {
    pub const ALL: [Precision; 4] = [Precision::Fp32, Precision::Tf32, Precision::Tf32x3, Precision::Bf16];

    /// The kernels' `prec` argument (RV_PREC_* in kernels/mma.cuh).
    pub fn code(self) -> i32 {
        match self {
            Precision::Fp32 => 0,
            Precision::Tf32 => 1,
            Precision::Tf32x3 => 2,
            Precision::Bf16 => 3,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Tf32 => "tf32",
            Precision::Tf32x3 => "3xtf32",
            Precision::Bf16 => "bf16",
        }
    }

    pub fn parse(s: &str) -> Result<Precision> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" => Ok(Precision::Fp32),
            "tf32" => Ok(Precision::Tf32),
            "3xtf32" | "tf32x3" => Ok(Precision::Tf32x3),
            "bf16" => Ok(Precision::Bf16),
            other => bail!("unknown precision {other:?}: use fp32 (the default), tf32, 3xtf32 or bf16"),
        }
    }

    /// How the CPU twin rounds an operand, if it does.
    pub fn operand_rounding(self) -> Option<fn(f32) -> f32> {
        match self {
            Precision::Fp32 | Precision::Tf32x3 => None,
            Precision::Tf32 => Some(round_tf32),
            Precision::Bf16 => Some(round_bf16),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// fp32 -> tf32 (kept in an f32), as `cvt.rna.tf32.f32`: to nearest, ties away from zero, 10
/// mantissa bits. Inf stays Inf, NaN stays NaN, a value that rounds past the largest finite
/// tf32 becomes Inf.
pub fn round_tf32(x: f32) -> f32 {
    let u = x.to_bits();
    if x.is_nan() {
        return f32::from_bits(0x7fff_e000);
    }
    if u & 0x7f80_0000 == 0x7f80_0000 {
        return x;
    }
    f32::from_bits(u.wrapping_add(0x1000) & 0xffff_e000)
}

/// fp32 -> bf16 (kept in an f32), to nearest even, as `cvt.rn.bf16x2.f32`; NaN becomes the
/// quiet NaN of its sign, as the kernels' twin (`rv_bf16_bits`) makes it. The same bits as the
/// `half` crate's `bf16::from_f32` for every other value (the tests hold it to that), in a form
/// the compiler vectorizes: rounding the operands of every layer is on the CPU's training path.
pub fn round_bf16(x: f32) -> f32 {
    let u = x.to_bits();
    if x.is_nan() {
        return f32::from_bits(0x7fc0_0000 | (u & 0x8000_0000));
    }
    f32::from_bits((u + 0x7fff + ((u >> 16) & 1)) & 0xffff_0000)
}

/// `x` with `p`'s operand rounding applied, or `x` itself where `p` does not round.
pub fn rounded(p: Precision, x: &[f32]) -> Cow<'_, [f32]> {
    match p.operand_rounding() {
        None => Cow::Borrowed(x),
        Some(f) => Cow::Owned(x.par_iter().with_min_len(1 << 14).map(|&v| f(v)).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf32_rounds_to_nearest_with_ties_away_from_zero() {
        let one = 1.0f32.to_bits();
        // 1 + 2^-11 is half an ulp of tf32 above 1: a tie, away from zero.
        assert_eq!(round_tf32(f32::from_bits(one + 0x1000)), f32::from_bits(one + 0x2000));
        assert_eq!(round_tf32(-f32::from_bits(one + 0x1000)), -f32::from_bits(one + 0x2000));
        assert_eq!(round_tf32(f32::from_bits(one + 0x0fff)), 1.0);
        assert_eq!(round_tf32(f32::from_bits(one + 0x1001)), f32::from_bits(one + 0x2000));
        assert_eq!(round_tf32(f32::INFINITY), f32::INFINITY);
        assert!(round_tf32(f32::NAN).is_nan());
        assert_eq!(round_tf32(f32::MAX), f32::INFINITY);
        for &v in &[0.0f32, -0.0, 1.5, f32::from_bits(0x0040_0000), -7.25] {
            assert_eq!(round_tf32(v).to_bits(), v.to_bits(), "{v} is already tf32");
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even_like_the_half_crate() {
        // The formula of round_bf16 and of the kernel twin (kernels/mma.cuh rv_bf16_bits),
        // against the half crate's conversion on values around every kind of tie.
        let oracle = |x: f32| half::bf16::from_f32(x).to_f32();
        let mut s = 0x1234_5678u32;
        for i in 0..20_000u32 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let bits = if i % 4 == 0 { (s & 0xffff_0000) | 0x8000 } else { s };
            let x = f32::from_bits(bits);
            if x.is_nan() {
                continue;
            }
            assert_eq!(round_bf16(x).to_bits(), oracle(x).to_bits(), "{x:e} ({bits:#x})");
        }
        for x in [f32::INFINITY, f32::NEG_INFINITY, f32::MAX, -f32::MAX, f32::MIN_POSITIVE, 0.0, -0.0] {
            assert_eq!(round_bf16(x).to_bits(), oracle(x).to_bits(), "{x:e}");
        }
        assert!(round_bf16(f32::NAN).is_nan() && round_bf16(-f32::NAN).is_sign_negative());
    }

    #[test]
    fn names_parse_back_and_unknown_names_are_refused() {
        for p in Precision::ALL {
            assert_eq!(Precision::parse(p.name()).unwrap(), p);
        }
        let e = Precision::parse("fp16").unwrap_err().to_string();
        assert!(e.contains("fp16") && e.contains("bf16"), "{e}");
    }

    #[test]
    fn rounding_borrows_where_nothing_changes() {
        let x = [1.0f32, 1.0 + f32::EPSILON];
        assert!(matches!(rounded(Precision::Fp32, &x), Cow::Borrowed(_)));
        assert!(matches!(rounded(Precision::Tf32x3, &x), Cow::Borrowed(_)));
        assert_eq!(rounded(Precision::Tf32, &x)[1], 1.0);
        assert_eq!(rounded(Precision::Bf16, &x)[1], 1.0);
    }
}
