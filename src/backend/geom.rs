//! The shapes the backend's ops take: convolution, pooling, batch-norm and warp geometries,
//! and the affine sampling matrices of the warp.

use anyhow::{bail, Result};

/// Geometry of a 2-D convolution over NCHW input with OIHW weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeom {
    pub n: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub oh: usize,
    pub ow: usize,
}

impl ConvGeom {
    pub fn new(
        n: usize,
        c_in: usize,
        h: usize,
        w: usize,
        c_out: usize,
        (kh, kw): (usize, usize),
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        if stride == 0 {
            bail!("conv2d: stride must be at least 1");
        }
        if h + 2 * pad < kh || w + 2 * pad < kw {
            bail!("conv2d: kernel {kh}x{kw} is larger than the padded input {}x{}", h + 2 * pad, w + 2 * pad);
        }
        let oh = (h + 2 * pad - kh) / stride + 1;
        let ow = (w + 2 * pad - kw) / stride + 1;
        Ok(ConvGeom { n, c_in, h, w, c_out, kh, kw, stride, pad, oh, ow })
    }
    pub fn in_len(&self) -> usize {
        self.n * self.c_in * self.h * self.w
    }
    pub fn out_len(&self) -> usize {
        self.n * self.c_out * self.oh * self.ow
    }
    pub fn weight_len(&self) -> usize {
        self.c_out * self.c_in * self.kh * self.kw
    }
    /// Reduction length of the implicit GEMM: one output sums over this many products.
    pub fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }
    pub fn flops(&self) -> f64 {
        2.0 * self.out_len() as f64 * self.k() as f64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    Max,
    Avg,
}

/// Geometry of 2-D pooling. Average pooling divides by the full window (padding counts as zeros,
/// PyTorch's `count_include_pad=True`); max pooling ignores padded positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolGeom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub oh: usize,
    pub ow: usize,
}

impl PoolGeom {
    pub fn new(n: usize, c: usize, h: usize, w: usize, k: usize, stride: usize, pad: usize) -> Result<Self> {
        if k == 0 || stride == 0 {
            bail!("pool2d: kernel and stride must be at least 1");
        }
        if pad * 2 > k {
            bail!("pool2d: padding {pad} must be at most half the kernel size {k}");
        }
        if h + 2 * pad < k || w + 2 * pad < k {
            bail!("pool2d: window {k} is larger than the padded input {}x{}", h + 2 * pad, w + 2 * pad);
        }
        let oh = (h + 2 * pad - k) / stride + 1;
        let ow = (w + 2 * pad - k) / stride + 1;
        Ok(PoolGeom { n, c, h, w, k, stride, pad, oh, ow })
    }
    pub fn in_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    pub fn out_len(&self) -> usize {
        self.n * self.c * self.oh * self.ow
    }
}

/// Batch-norm layout: `n` samples, `c` channels, `hw` positions per channel (1 for BatchNorm1d).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormGeom {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
}

impl NormGeom {
    pub fn len(&self) -> usize {
        self.n * self.c * self.hw
    }
    /// Values per channel that the statistics are taken over.
    pub fn count(&self) -> usize {
        self.n * self.hw
    }
}

/// Sampling of [`Backend::rotate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interp {
    /// The source pixel nearest the source point (coordinates rounded half to even); `fill` where
    /// that pixel lies outside the image.
    Nearest,
    /// Bilinear blend of the four pixels around the source point; each of the four taps that lies
    /// outside the image contributes the channel's `fill` value instead (so borders blend toward
    /// the fill).
    Bilinear,
}

/// Layout of an image warp (rotation, zoom, flips): `n` NCHW images of `c` channels, `h`×`w`, rotated to the same size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotateGeom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl RotateGeom {
    pub fn len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Checks one finite matrix per image and one fill value per channel: every backend calls
    /// this before it reads either slice.
    pub fn check(&self, mats: &[Affine], fill: &[f32]) -> Result<()> {
        if mats.len() != self.n {
            bail!("warp: {} sampling matrices for {} images (one per image)", mats.len(), self.n);
        }
        if fill.len() != self.c {
            bail!("warp: {} fill values for {} channels (one per channel)", fill.len(), self.c);
        }
        if let Some(m) = mats.iter().find(|m| m.iter().any(|v| !v.is_finite())) {
            bail!("warp: sampling matrix {m:?} is not finite");
        }
        Ok(())
    }
}

/// The (cos, sin) pair that [`Backend::rotate`] uses for an angle in degrees: computed in f64
/// from the angle reduced modulo 360, with exact multiples of 90° snapped to exact values
/// (so 0°/360° is the identity and 90°/180°/270° are exact transposes/flips), then rounded once
/// to f32. Every backend uses these f32 values, so CPU and GPU apply identical coefficients.
pub fn rotation_coeffs(angle_deg: f32) -> (f32, f32) {
    let a = (angle_deg as f64).rem_euclid(360.0);
    if a == 0.0 {
        (1.0, 0.0)
    } else if a == 90.0 {
        (0.0, 1.0)
    } else if a == 180.0 {
        (-1.0, 0.0)
    } else if a == 270.0 {
        (0.0, -1.0)
    } else {
        let r = a.to_radians();
        (r.cos() as f32, r.sin() as f32)
    }
}

/// A sampling matrix of [`Backend::warp`]: the 2×2 linear part [m0, m1, m2, m3] (row major)
/// and the translation [tx, ty] in pixels, `[m0, m1, m2, m3, tx, ty]`.
pub type Affine = [f32; 6];

/// The identity [`Affine`]: every pixel is copied bit for bit.
pub const IDENTITY: Affine = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0];

/// The sampling matrix of [`Backend::warp`] that rotates an image by `angle_deg` degrees
/// counter-clockwise as displayed: the inverse rotation [[c, −s], [s, c]] with (c, s) =
/// [`rotation_coeffs`], no translation. Quarter turns are exact permutations of the pixels.
pub fn rotation_matrix(angle_deg: f32) -> Affine {
    let (c, s) = rotation_coeffs(angle_deg);
    [c, -s, s, c, 0.0, 0.0]
}
