//! The GEMM-shaped launches of the CUDA backend: the dense GEMM's numbered variants
//! (kernels/gemm.cu), and for the convolutions (kernels/conv.cu) the choice of tile, the
//! argument list and the split-K of the weight gradient.

use super::{grid2, i32_of, CudaBackend, BLOCK, TILE};
use crate::backend::cuda::emu::KArg;
use crate::backend::{Activation, ConvGeom, Storage};
use anyhow::{bail, Result};

/// The conv kernel of `pass` for an `m` × `n` GEMM result, and its tile (BM, BN), of
/// kernels/conv.cu's 64 × 64 (v1), 32 × 128 and 16 × 256 (v2); always v1 with `v1_only`.
/// Per reduction step a tiling costs the outputs it computes (padding included) plus the
/// operand values its blocks load, each load weighted as 24 FMAs (an H100 issues ~33 T fp32
/// FMA/s against ~1.4 T floats/s from L2): narrow tiles waste no rows on few channels but reload
/// the activations once per row tile. An estimate, to be checked with `bench conv`; v1 on ties.
pub(super) fn conv_kernel(pass: &str, m: usize, n: usize, v1_only: bool) -> (String, usize, usize) {
    const TILES: [(&str, usize, usize); 3] = [("v1", 64, 64), ("v2_bm32", 32, 128), ("v2_bm16", 16, 256)];
    const LOAD_COST: usize = 24;
    let cost = |&(_, bm, bn): &(&str, usize, usize)| {
        let (rows, cols) = (m.div_ceil(bm), n.div_ceil(bn));
        rows * bm * cols * bn + LOAD_COST * rows * cols * (bm + bn)
    };
    let best = if v1_only { TILES[0] } else { TILES.into_iter().min_by_key(cost).unwrap_or(TILES[0]) };
    (format!("{pass}_{}", best.0), best.1, best.2)
}

impl CudaBackend {
    /// C[m, n] = act(A[m, k] · B[n, k]ᵀ + bias[n]) (the dense layer's forward) with a chosen
    /// variant of kernels/gemm.cu, for `rotvar bench gemm`; the backend's ops always use v2.
    /// v1 has no epilogue: it refuses a bias or an activation.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_variant(
        &self,
        variant: u32,
        a: &Storage,
        b: &Storage,
        bias: Option<&Storage>,
        act: Activation,
        c: &mut Storage,
        (m, n, k): (usize, usize, usize),
    ) -> Result<()> {
        let (aa, ba, ca) = (self.arg(a, m * k)?, self.arg(b, n * k)?, self.arg(c, m * n)?);
        match variant {
            1 => {
                if bias.is_some() || act != Activation::Identity {
                    bail!("gemm_tiled_v1 has no epilogue: no bias or activation");
                }
                let mut args = vec![aa, ba, ca];
                args.extend(
                    [m, n, k, k, k, n, 0, 1]
                        .iter()
                        .map(|&v| i32_of(v, "gemm dimension"))
                        .collect::<Result<Vec<_>>>()?,
                );
                args.extend([KArg::F32(1.0), KArg::F32(0.0)]);
                self.launch("gemm_tiled_v1", grid2(n.div_ceil(TILE), m.div_ceil(TILE)), BLOCK, 0, &args)
            }
            2 => self.gemm(aa, ba, ca, self.opt_arg(bias, n)?, act, m, n, k, k, k, n, false, true),
            v => bail!("no gemm variant v{v}: kernels/gemm.cu has v1 and v2"),
        }
    }

    /// C[M,N] = act(op(A)·op(B) + bias[N]) with gemm_tiled_v2 (row-major, leading dimensions
    /// given; `bias` a pointer argument, `KArg::Ptr(0)` for none).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        &self,
        a: KArg,
        b: KArg,
        c: KArg,
        bias: KArg,
        act: Activation,
        m: usize,
        n: usize,
        k: usize,
        lda: usize,
        ldb: usize,
        ldc: usize,
        ta: bool,
        tb: bool,
    ) -> Result<()> {
        let grid = grid2(n.div_ceil(TILE), m.div_ceil(TILE));
        let args = [
            a,
            b,
            c,
            bias,
            i32_of(m, "M")?,
            i32_of(n, "N")?,
            i32_of(k, "K")?,
            i32_of(lda, "lda")?,
            i32_of(ldb, "ldb")?,
            i32_of(ldc, "ldc")?,
            KArg::I32(ta as i32),
            KArg::I32(tb as i32),
            KArg::F32(1.0),
            KArg::F32(0.0),
            KArg::I32(act.code()),
        ];
        self.launch("gemm_tiled_v2", grid, BLOCK, 0, &args)
    }

    pub(super) fn conv_dims(&self, g: &ConvGeom) -> Result<Vec<KArg>> {
        // The kernels index within these products in 32-bit arithmetic.
        for (what, v) in [("N·OH·OW", g.n * g.oh * g.ow), ("N·H·W", g.n * g.h * g.w), ("K·C·R·S", g.weight_len())]
        {
            i32_of(v, what)?;
        }
        [
            ("N", g.n),
            ("C", g.c_in),
            ("H", g.h),
            ("W", g.w),
            ("K", g.c_out),
            ("R", g.kh),
            ("S", g.kw),
            ("stride", g.stride),
            ("pad", g.pad),
            ("OH", g.oh),
            ("OW", g.ow),
        ]
        .iter()
        .map(|(n, v)| i32_of(*v, n))
        .collect()
    }

    /// How many slices the reduction of conv backward-weight is split into: enough blocks to
    /// fill every SM twice, and slices of at least 256 positions.
    pub(super) fn wgrad_splits(&self, g: &ConvGeom, bm: usize, bn: usize) -> usize {
        let tiles = g.c_out.div_ceil(bm) * g.k().div_ceil(bn);
        let want = (2 * self.exec.sm_count() as usize).div_ceil(tiles);
        let red = g.n * g.oh * g.ow;
        want.clamp(1, red.div_ceil(256).clamp(1, 64))
    }
}

#[cfg(test)]
mod tests {
    use super::conv_kernel;

    /// Narrow tiles for few channels, v1 for many or when forced; every name exists.
    #[test]
    fn conv_kernel_choice() {
        let big = 256 * 28 * 28;
        for pass in ["conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight"] {
            for ((m, n), want) in [
                ((6, big), "v2_bm16"),
                ((16, big), "v2_bm16"),
                ((32, big), "v2_bm32"),
                ((64, big), "v1"),
                ((120, big), "v1"),
                ((70, big), "v2_bm32"),
                ((6, 25), "v1"),
                ((16, 150), "v2_bm16"),
                ((32, 288), "v2_bm32"),
                ((64, 576), "v1"),
            ] {
                let (name, bm, bn) = conv_kernel(pass, m, n, false);
                assert_eq!(name, format!("{pass}_{want}"), "{m} x {n}");
                assert_eq!(bm * bn, 4096, "{name}");
                assert!(crate::backend::cuda::emu::find_kernel(&name).is_some(), "{name} is not a kernel");
                assert_eq!(conv_kernel(pass, m, n, true), (format!("{pass}_v1"), 64, 64));
            }
        }
    }
}
