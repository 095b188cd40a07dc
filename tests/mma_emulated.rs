//! The emulated twins of `mma.sync` (kernels/mma.cuh) through the probe kernel of
//! kernels/mma.cu: one warp loads row-major A, B and C into fragments by the PTX ISA's layouts,
//! runs one instruction and stores D by the same layout. Against a plain matrix product of the
//! rounded operands, summed exactly as the twin documents (k in order, fmaf from C), the result
//! must agree to the bit. Every element is distinct, so a misplaced fragment element cannot
//! cancel out.

use rotvar::backend::cuda::emu::{self, KArg};
use rotvar::backend::precision::{round_bf16, round_tf32, Precision};

mod common;
use common::Rng;

/// Distinct values: a random sign and magnitude, then the index in the low mantissa bits that
/// the rounding keeps (bit 13 up), so no two elements are equal after rounding either.
fn distinct(rng: &mut Rng, n: usize, keep_bits: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v = rng.f32(0.5, 2.0) * if rng.below(2) == 0 { 1.0 } else { -1.0 };
            let shift = 23 - keep_bits;
            let bits = (v.to_bits() & !(((1u32 << keep_bits) - 1) << shift)) | ((i as u32 % (1 << keep_bits)) << shift);
            f32::from_bits(bits)
        })
        .collect()
}

fn probe(prec: Precision, a: &[f32], b: &[f32], c: &[f32]) -> Vec<f32> {
    let mut d = vec![f32::NAN; 16 * 8];
    let args = [KArg::slice_mut(&mut d), KArg::slice(a), KArg::slice(b), KArg::slice(c), KArg::I32(prec.code())];
    // SAFETY: A, B, C and D have the sizes the probe's contract gives for this precision.
    unsafe { emu::launch("mma_probe", (1, 1, 1), (32, 1, 1), 0, &args) }.unwrap_or_else(|e| panic!("{prec}: {e}"));
    d
}

/// D[r][c] = fma chain over k of A[r][k] * B[k][c], starting from `d`.
fn chain(d: &mut [f32], a: &[f32], b: &[f32], k: usize) {
    for r in 0..16 {
        for c in 0..8 {
            let mut acc = d[r * 8 + c];
            for kk in 0..k {
                acc = a[r * k + kk].mul_add(b[kk * 8 + c], acc);
            }
            d[r * 8 + c] = acc;
        }
    }
}

fn split(v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let hi: Vec<f32> = v.iter().map(|&x| round_tf32(x)).collect();
    let lo = v.iter().zip(&hi).map(|(&x, &h)| round_tf32(x - h)).collect();
    (hi, lo)
}

#[test]
fn mma_twins_compute_the_matrix_product_of_the_ptx_fragment_layouts() {
    let mut rng = Rng(0x33A);
    for prec in [Precision::Tf32, Precision::Tf32x3, Precision::Bf16] {
        let (k, keep) = if prec == Precision::Bf16 { (16, 7) } else { (8, 10) };
        for round in 0..3 {
            let (a, b, c) =
                (distinct(&mut rng, 16 * k, keep), distinct(&mut rng, k * 8, keep), rng.vec(16 * 8, -4., 4.));
            let mut want = c.clone();
            match prec {
                Precision::Bf16 => {
                    let r = |v: &[f32]| v.iter().map(|&x| round_bf16(x)).collect::<Vec<_>>();
                    chain(&mut want, &r(&a), &r(&b), k);
                }
                Precision::Tf32 => chain(&mut want, &split(&a).0, &split(&b).0, k),
                _ => {
                    let ((ah, al), (bh, bl)) = (split(&a), split(&b));
                    chain(&mut want, &al, &bh, k);
                    chain(&mut want, &ah, &bl, k);
                    chain(&mut want, &ah, &bh, k);
                }
            }
            let got = probe(prec, &a, &b, &c);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{prec} round {round}: D[{}][{}] = {g} want {w}", i / 8, i % 8);
            }
        }
    }
}

/// The control behind the test above: with B transposed in memory (its fragments then hold the
/// wrong elements) the probe's product is not the reference product.
#[test]
fn a_misread_layout_does_not_pass() {
    let mut rng = Rng(0x33B);
    let (a, b, c) = (distinct(&mut rng, 16 * 8, 10), distinct(&mut rng, 8 * 8, 10), vec![0.0f32; 128]);
    let bt: Vec<f32> = (0..64).map(|i| b[(i % 8) * 8 + i / 8]).collect();
    let mut want = c.clone();
    chain(&mut want, &split(&a).0, &split(&b).0, 8);
    let got = probe(Precision::Tf32, &a, &bt, &c);
    let same = got.iter().zip(&want).filter(|(g, w)| g.to_bits() == w.to_bits()).count();
    assert!(same < 16, "{same} of 128 elements agree with B transposed");
}

#[test]
fn the_probe_refuses_fp32_and_unknown_codes() {
    let (a, b, c) = (vec![1.0f32; 256], vec![1.0f32; 128], vec![0.0f32; 128]);
    for code in [0, 4] {
        let mut d = vec![0.0f32; 128];
        let args = [KArg::slice_mut(&mut d), KArg::slice(&a), KArg::slice(&b), KArg::slice(&c), KArg::I32(code)];
        // SAFETY: the buffers are larger than any precision reads.
        assert!(unsafe { emu::launch("mma_probe", (1, 1, 1), (32, 1, 1), 0, &args) }.is_err(), "code {code}");
    }
}
