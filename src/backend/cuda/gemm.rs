//! The GEMM-shaped launches of the CUDA backend: the dense GEMM's numbered variants
//! (kernels/gemm.cu) and its split-K, and for the convolutions (kernels/conv.cu) the choice of
//! tile, the argument list and the split-K of the weight gradient.

use super::{grid2, i32_of, CudaBackend, BLOCK, TILE};
use crate::backend::cuda::emu::KArg;
use crate::backend::{Activation, ConvGeom, Storage};
use anyhow::{bail, Result};

/// A convolution launch: the kernel of kernels/conv.cu, its tile (BM, BN) and, for the weight
/// gradient, how many slices its reduction is split into (1 otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ConvPlan {
    pub name: String,
    pub bm: usize,
    pub bn: usize,
    pub splits: usize,
}

#[cfg(test)]
impl ConvPlan {
    /// Blocks of the conv launch itself.
    pub fn blocks(&self, m: usize, n: usize) -> usize {
        m.div_ceil(self.bm) * n.div_ceil(self.bn) * self.splits
    }
}

/// kernels/conv.cu's tiles: 64 × 64 (v1), 32 × 128 and 16 × 256 (v2); 4096 outputs each.
const CONV_TILES: [(&str, usize, usize); 3] = [("v1", 64, 64), ("v2_bm32", 32, 128), ("v2_bm16", 16, 256)];
/// v4's 128 × 128 tile (8 × 8 per thread), used only when asked for (`ConvTiles::V4`).
const CONV_TILE_V4: (&str, usize, usize) = ("v4", 128, 128);
/// v5: v4 with its tiles filled by cp.async (`ConvTiles::V5`).
const CONV_TILE_V5: (&str, usize, usize) = ("v5", 128, 128);

/// Which conv kernels the backend may choose from (`ROTVAR_CONV_TILES`, for `bench conv` to time
/// them side by side): the default picks among v1 and v2 by `conv_plan`'s estimate; `V1` is
/// always v1; `V4` always v4 and `V5` always v5, for the convolutions and the unsplit dense
/// GEMMs. In other precisions than fp32, `V4` picks as by default (no tensor-core v4), and `V5`
/// runs the tensor-core v5 kernels; strided backward-data stays on v3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvTiles {
    Auto,
    V1,
    V4,
    V5,
}

impl ConvTiles {
    /// `auto`, `v1`, `v4` or `v5`; ROTVAR_CONV_V1=1 (older scripts) is `v1`.
    pub fn parse(s: &str) -> anyhow::Result<ConvTiles> {
        match s.to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(ConvTiles::Auto),
            "v1" => Ok(ConvTiles::V1),
            "v4" => Ok(ConvTiles::V4),
            "v5" => Ok(ConvTiles::V5),
            other => anyhow::bail!("ROTVAR_CONV_TILES={other:?}: use auto, v1, v4 or v5"),
        }
    }

    fn tiles(self) -> &'static [(&'static str, usize, usize)] {
        match self {
            ConvTiles::Auto => &CONV_TILES,
            ConvTiles::V1 => &CONV_TILES[..1],
            ConvTiles::V4 => std::slice::from_ref(&CONV_TILE_V4),
            ConvTiles::V5 => std::slice::from_ref(&CONV_TILE_V5),
        }
    }
}
/// An operand value loaded costs as much as 24 FMAs: an H100 issues ~33 T fp32 FMA/s against
/// ~1.4 T floats/s from L2.
const LOAD_COST: usize = 24;
/// Resident 256-thread conv blocks an SM needs before its FMA pipes are busy: the conv kernels'
/// registers allow 3 or 4 per SM, and with 1 one block's loads and barriers leave the pipes
/// idle. So a launch of fewer than 2 blocks per SM takes about as long as one block does.
const SAT_BLOCKS: usize = 2;
/// The fewest reduction steps a split-K slice gets: below this the partials' extra traffic
/// outweighs the parallelism gained.
const MIN_SLICE: usize = 256;

/// How many slices a split-K reduction of `red` steps over `tiles` output tiles is cut into:
/// enough blocks for `SAT_BLOCKS` per SM, none shorter than `MIN_SLICE` steps. Used by the conv
/// weight gradient and the dense GEMM (v3).
pub(super) fn split_k_slices(tiles: usize, red: usize, sm_count: u32) -> usize {
    let want = (SAT_BLOCKS * (sm_count as usize).max(1)).div_ceil(tiles.max(1));
    want.clamp(1, red.div_ceil(MIN_SLICE).max(1))
}

/// The conv kernel of `pass` for an `m` × `n` GEMM result over `red` reduction steps on
/// `sm_count` SMs, split-K when `split_k` (the weight gradient), among the tiles `tiles` allows.
///
/// Estimated time of a tiling: one block costs, per reduction step, its 4096 outputs plus the
/// operand values it loads (each weighted `LOAD_COST`); the launch takes that block cost times
/// its steps times max(blocks / SMs, `SAT_BLOCKS`). With many blocks this is the total work over
/// the SMs: narrow tiles win on few channels, as they waste no rows on padding. With fewer blocks
/// than `SAT_BLOCKS` per SM the GPU is part idle, and the tile that gives more, cheaper blocks wins
/// (LeNet's conv3 backward-data: 196 v1 blocks rather than 49 of 16 × 256 on 132 SMs). An
/// estimate, checked by `bench conv` (which times v1 beside the choice); v1 on ties.
pub(super) fn conv_plan(
    pass: &str,
    m: usize,
    n: usize,
    red: usize,
    sm_count: u32,
    tiles: ConvTiles,
    split_k: bool,
) -> ConvPlan {
    let sms = (sm_count as usize).max(1) as f64;
    let plan = |&(tag, bm, bn): &(&str, usize, usize)| {
        let tiles = m.div_ceil(bm) * n.div_ceil(bn);
        let splits = if split_k { split_k_slices(tiles, red, sm_count) } else { 1 };
        let steps = red.div_ceil(splits).max(1);
        let block_cost = (bm * bn + LOAD_COST * (bm + bn)) * steps;
        let time = block_cost as f64 * ((tiles * splits) as f64 / sms).max(SAT_BLOCKS as f64);
        (ConvPlan { name: format!("{pass}_{tag}"), bm, bn, splits }, time)
    };
    let tiles = tiles.tiles();
    let mut best = plan(&tiles[0]);
    for t in &tiles[1..] {
        let p = plan(t);
        if p.1 < best.1 {
            best = p;
        }
    }
    best.0
}

/// The tensor-core twin of a GEMM-shaped fp32 kernel: same tile, loaders and launch, plus a
/// `prec` argument (kernels/conv_tc.cu and gemm.cu, "tensor cores").
pub(super) fn tc_kernel(name: &str) -> Option<String> {
    match name {
        "gemm_tiled_v2" => return Some("gemm_tc".into()),
        "gemm_tiled_v5" => return Some("gemm_tc_v5".into()),
        "gemm_splitk_v3" => return Some("gemm_splitk_tc".into()),
        "conv2d_bwd_data_v3" => return Some("conv2d_bwd_data_tc_v3".into()),
        _ => {}
    }
    let pass = ["conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight"]
        .into_iter()
        .find(|p| name.strip_prefix(p).is_some_and(|t| t.starts_with("_v1") || t.starts_with("_v2") || t == "_v5"))?;
    let tile = match &name[pass.len()..] {
        "_v1" => "bm64",
        "_v2_bm32" => "bm32",
        "_v2_bm16" => "bm16",
        "_v5" => "v5",
        _ => return None,
    };
    Some(format!("{pass}_tc_{tile}"))
}

/// Which kernel of kernels/gemm.cu a product runs: v2, v4 (128 × 128), v5 (v4 filled by
/// cp.async), or v3 split that many ways.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GemmHow {
    V2,
    V4,
    V5,
    Split(usize),
}

/// A GEMM's shape and layout (kernels/gemm.cu's conventions): C[m, n] = op(A)[m, k] · op(B)[k, n],
/// row-major with leading dimensions, A (B) transposed when `ta` (`tb`).
pub(super) struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub ta: bool,
    pub tb: bool,
}

impl CudaBackend {
    /// C[m, n] = act(A[m, k] · B[n, k]ᵀ + bias[n]) (the dense layer's forward) with a chosen
    /// variant of kernels/gemm.cu, for `rotvar bench gemm`: 1 and 2 whole (never split), 3 split
    /// as the backend's ops split it (`gemm_splits`; 1 slice where the tiles fill the GPU). v1
    /// has no epilogue: it refuses a bias or an activation.
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
            2..=5 => {
                let g = Gemm { m, n, k, lda: k, ldb: k, ldc: n, ta: false, tb: true };
                let how = match variant {
                    2 => GemmHow::V2,
                    3 => GemmHow::Split(self.gemm_splits(m, n, k)),
                    4 => GemmHow::V4,
                    _ => GemmHow::V5,
                };
                self.gemm_launch(aa, ba, ca, self.opt_arg(bias, n)?, act, &g, how)
            }
            v => bail!("no gemm variant v{v}: kernels/gemm.cu has v1, v2, v3 (split-K), v4 and v5"),
        }
    }

    /// The slices the backend's GEMMs split their reduction into on this GPU (1: v2, whole).
    pub fn gemm_splits(&self, m: usize, n: usize, k: usize) -> usize {
        split_k_slices(m.div_ceil(TILE) * n.div_ceil(TILE), k, self.exec.sm_count())
    }

    /// C[M,N] = act(op(A)·op(B) + bias[N]) (`bias` a pointer argument, `KArg::Ptr(0)` for none):
    /// gemm_tiled_v2 where its tiles fill the GPU, else split-K (gemm_splitk_v3 + splitk_sum_f32);
    /// v4 (v5) in place of v2 where ROTVAR_CONV_TILES=v4 (v5) asks (fp32 only).
    pub(super) fn gemm(&self, a: KArg, b: KArg, c: KArg, bias: KArg, act: Activation, g: &Gemm) -> Result<()> {
        let splits = self.gemm_splits(g.m, g.n, g.k);
        let how = match (splits > 1, self.tiles()) {
            (true, _) => GemmHow::Split(splits),
            (false, ConvTiles::V4) => GemmHow::V4,
            (false, ConvTiles::V5) => GemmHow::V5,
            (false, _) => GemmHow::V2,
        };
        self.gemm_launch(a, b, c, bias, act, g, how)
    }

    /// v2, v4 or v3 with that many slices (then the sum and the epilogue).
    #[allow(clippy::too_many_arguments)]
    fn gemm_launch(
        &self,
        a: KArg,
        b: KArg,
        c: KArg,
        bias: KArg,
        act: Activation,
        g: &Gemm,
        how: GemmHow,
    ) -> Result<()> {
        let grid = |z: usize| (g.n.div_ceil(TILE) as u32, g.m.div_ceil(TILE) as u32, z as u32);
        let dims =
            [i32_of(g.m, "M")?, i32_of(g.n, "N")?, i32_of(g.k, "K")?, i32_of(g.lda, "lda")?, i32_of(g.ldb, "ldb")?];
        let splits = match how {
            GemmHow::Split(s) => s,
            GemmHow::V2 | GemmHow::V4 | GemmHow::V5 => {
                let mut args = vec![a, b, c, bias];
                args.extend(dims);
                args.extend([
                    i32_of(g.ldc, "ldc")?,
                    KArg::I32(g.ta as i32),
                    KArg::I32(g.tb as i32),
                    KArg::F32(1.0),
                    KArg::F32(0.0),
                    KArg::I32(act.code()),
                ]);
                if how == GemmHow::V2 {
                    return self.launch_mm("gemm_tiled_v2", grid(1), BLOCK, &args);
                }
                let grid = (g.n.div_ceil(128) as u32, g.m.div_ceil(128) as u32, 1);
                if how == GemmHow::V5 {
                    return self.launch_mm("gemm_tiled_v5", grid, BLOCK, &args);
                }
                if self.precision != crate::backend::Precision::Fp32 {
                    bail!("gemm_tiled_v4 is fp32 only: it has no tensor-core twin");
                }
                return self.launch("gemm_tiled_v4", grid, BLOCK, 0, &args);
            }
        };
        let len = g.m * g.n;
        let partial = self.new_buf(splits * len)?;
        let p = self.arg(&partial, splits * len)?;
        let mut args = vec![a, b, p];
        args.extend(dims);
        args.extend([KArg::I32(g.ta as i32), KArg::I32(g.tb as i32), i32_of(splits, "splits")?]);
        self.launch_mm("gemm_splitk_v3", grid(splits), BLOCK, &args)?;
        let args = [
            c,
            p,
            bias,
            i32_of(g.m, "M")?,
            i32_of(g.n, "N")?,
            i32_of(g.ldc, "ldc")?,
            i32_of(splits, "splits")?,
            KArg::I32(act.code()),
        ];
        self.launch("splitk_sum_f32", self.ew_grid(len), BLOCK, 0, &args)
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
}

#[cfg(test)]
mod tests {
    use super::{conv_plan, tc_kernel, ConvPlan, ConvTiles, CONV_TILES, SAT_BLOCKS};

    /// Every fp32 kernel a GEMM-shaped launch can name has a tensor-core twin that exists, with
    /// the same signature plus `prec`; other kernels have none.
    #[test]
    fn every_gemm_shaped_kernel_has_a_tensor_core_twin() {
        use crate::backend::cuda::emu::find_kernel;
        let mut names = vec![
            "gemm_tiled_v2".to_string(),
            "gemm_tiled_v5".into(),
            "gemm_splitk_v3".into(),
            "conv2d_bwd_data_v3".into(),
        ];
        for pass in ["conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight"] {
            names.extend(CONV_TILES.iter().map(|(tag, _, _)| format!("{pass}_{tag}")));
            names.push(format!("{pass}_v5"));
        }
        for name in &names {
            let tc = tc_kernel(name).unwrap_or_else(|| panic!("{name} has no twin"));
            let (a, b) = (find_kernel(name).unwrap(), find_kernel(&tc).unwrap_or_else(|| panic!("{tc} missing")));
            let sig = |ps: &[crate::backend::cuda::emu::Param]| -> Vec<String> {
                ps.iter().map(|p| format!("{:?} {}", p.kind, p.name)).collect()
            };
            let (sa, mut sb) = (sig(a.params), sig(b.params));
            assert_eq!(sb.pop().as_deref(), Some("I32 prec"), "{tc}");
            assert_eq!(sb, sa, "{tc}");
        }
        for other in
            ["gemm_tiled_v1", "gemm_tiled_v4", "conv2d_fwd_v4", "sum_partials_f32", "conv2d_fwd_v9", "conv2d_fwd"]
        {
            assert_eq!(tc_kernel(other), None, "{other}");
        }
    }

    const H200_SMS: u32 = 132;
    const PASSES: [&str; 3] = ["conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight"];

    fn plan(pass: &str, m: usize, n: usize, red: usize) -> ConvPlan {
        conv_plan(pass, m, n, red, H200_SMS, ConvTiles::Auto, pass == "conv2d_bwd_weight")
    }

    /// With work to fill the GPU many times over, the cheapest total work wins: narrow tiles for
    /// few channels, v1 for many or when forced; every name exists.
    #[test]
    fn conv_tile_choice_on_large_problems() {
        let big = 256 * 28 * 28;
        for pass in PASSES {
            for (m, want) in
                [(6, "v2_bm16"), (16, "v2_bm16"), (32, "v2_bm32"), (64, "v1"), (120, "v1"), (70, "v2_bm32")]
            {
                let p = conv_plan(pass, m, big, 150, H200_SMS, ConvTiles::Auto, false);
                assert_eq!(p.name, format!("{pass}_{want}"), "{m} x {big}");
                assert_eq!(p.bm * p.bn, 4096, "{}", p.name);
                assert!(crate::backend::cuda::emu::find_kernel(&p.name).is_some(), "{} is not a kernel", p.name);
                let v1 = conv_plan(pass, m, big, 150, H200_SMS, ConvTiles::V1, false);
                assert_eq!((v1.name, v1.bm, v1.bn), (format!("{pass}_v1"), 64, 64));
            }
        }
    }

    /// ROTVAR_CONV_TILES=v4 (v5) plans every pass on the 128 × 128 kernels, which exist; v1 and the
    /// default choice are unchanged by it.
    #[test]
    fn v4_plans_take_the_128_tile() {
        for pass in PASSES {
            for (tiles, tag) in [(ConvTiles::V4, "v4"), (ConvTiles::V5, "v5")] {
                let p = conv_plan(pass, 16, 256 * 28 * 28, 150, H200_SMS, tiles, pass == "conv2d_bwd_weight");
                assert_eq!((p.name.as_str(), p.bm, p.bn), (format!("{pass}_{tag}").as_str(), 128, 128));
                assert!(crate::backend::cuda::emu::find_kernel(&p.name).is_some(), "{} is not a kernel", p.name);
            }
        }
        for (s, want) in [
            ("", ConvTiles::Auto),
            ("auto", ConvTiles::Auto),
            ("V1", ConvTiles::V1),
            ("v4", ConvTiles::V4),
            ("v5", ConvTiles::V5),
        ] {
            assert_eq!(ConvTiles::parse(s).unwrap(), want, "{s:?}");
        }
        assert!(ConvTiles::parse("v3").unwrap_err().to_string().contains("ROTVAR_CONV_TILES"));
    }

    /// The LeNet and SimpleConv layers at batch 256 (as `bench conv` times them; c_in, hw, c_out,
    /// kernel, pad, stride 1) on an H200: every pass launches more blocks than there are SMs (the
    /// weight gradient through split-K, in slices of at least 256 steps).
    #[test]
    fn conv_plans_fill_an_h200() {
        let layers = [
            ("lenet.conv1", 1, 28, 6, 5, 2),
            ("lenet.conv2", 6, 14, 16, 5, 2),
            ("lenet.conv3", 16, 7, 120, 5, 2),
            ("simpleconv.conv1", 1, 28, 32, 3, 1),
            ("simpleconv.conv2", 32, 28, 32, 3, 1),
            ("simpleconv.conv3", 32, 14, 64, 3, 1),
            ("simpleconv.conv5", 64, 7, 128, 3, 1),
        ];
        let n = 256;
        for (layer, c, hw, k, r, _pad) in layers {
            let pixels = n * hw * hw;
            let fwd = plan("conv2d_fwd", k, pixels, c * r * r);
            assert!(fwd.blocks(k, pixels) > H200_SMS as usize, "{layer} forward: {fwd:?}");
            let bwd = plan("conv2d_bwd_data", c, pixels, k * r * r);
            assert!(bwd.blocks(c, pixels) > H200_SMS as usize, "{layer} backward data: {bwd:?}");
            let wg = plan("conv2d_bwd_weight", k, c * r * r, pixels);
            let blocks = wg.blocks(k, c * r * r);
            assert!(blocks > H200_SMS as usize, "{layer} backward weight: {wg:?}, {blocks} blocks");
            assert!(pixels.div_ceil(wg.splits) >= 256, "{layer}: slices of fewer than 256 steps");
        }
        // The case of issue 11: 49 blocks of 16 x 256 before, on 132 SMs.
        let p = plan("conv2d_bwd_data", 16, 256 * 7 * 7, 120 * 25);
        assert_eq!(p.name, "conv2d_bwd_data_v1");
        assert_eq!(p.blocks(16, 256 * 7 * 7), 196);
    }

    /// The dense layers at batch 256 on an H200: the forward passes (few 64 × 64 tiles over a
    /// long reduction) split until the GPU has 2 blocks per SM or the slices reach 256 steps;
    /// the backward passes and a 2048³ product have tiles enough and stay whole (v2).
    #[test]
    fn dense_gemm_splits_only_what_cannot_fill_an_h200() {
        let slices = |m: usize, n: usize, k: usize| super::split_k_slices(m.div_ceil(64) * n.div_ceil(64), k, H200_SMS);
        assert_eq!(slices(256, 84, 5880), 23, "LeNet fc1 forward: 8 tiles, 23 slices of 256 steps");
        assert_eq!(slices(256, 64, 6272), 25, "SimpleConv fc1 forward: 4 tiles");
        assert_eq!(slices(256, 10, 84), 1, "fc2: too short to split");
        assert_eq!(slices(84, 5880, 256), 1, "LeNet fc1 weight gradient: K = batch");
        assert_eq!(slices(256, 5880, 84), 1, "LeNet fc1 backward data");
        assert_eq!(slices(2048, 2048, 2048), 1, "1024 tiles fill the GPU");
    }

    /// Split-K never cuts a reduction into slices shorter than 256 steps, and adds no slices
    /// when the tiles alone fill the GPU.
    #[test]
    fn split_k_bounds() {
        let p = plan("conv2d_bwd_weight", 16, 150, 300);
        assert_eq!(p.splits, 2, "{p:?}");
        let p = plan("conv2d_bwd_weight", 16, 150, 100);
        assert_eq!(p.splits, 1, "{p:?}");
        let p = plan("conv2d_bwd_weight", 512, 512 * 9, 256 * 16);
        assert_eq!(p.splits, 1, "{p:?}: {} tiles fill the GPU", p.blocks(512, 512 * 9));
        // A long reduction: split until every SM has `SAT_BLOCKS` blocks.
        let p = plan("conv2d_bwd_weight", 16, 150, 1 << 20);
        assert!(p.blocks(16, 150) >= SAT_BLOCKS * H200_SMS as usize, "{p:?}");
        for pass in ["conv2d_fwd", "conv2d_bwd_data"] {
            assert_eq!(plan(pass, 16, 150, 1 << 20).splits, 1, "{pass} has no split-K");
        }
    }
}
