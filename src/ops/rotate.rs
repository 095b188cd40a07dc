//! Image rotation, zoom, flips and translation of a batch: data transforms, not layers.
//!
//! There is no backward: these are applied to input data (training augmentation, rotated
//! evaluation, the variance measure's transformations), never to something a gradient flows
//! through, so the output is always untracked.

use super::expect_rank;
use crate::backend::{rotation_matrix, Affine, Interp, RotateGeom};
use crate::tensor::Tensor;
use anyhow::{bail, Result};

/// Rotate each image of `x` [N, C, H, W] by `angles_deg[i]` degrees (one angle per image;
/// repeat one angle for the whole batch), counter-clockwise as displayed, about the image
/// centre, output the same size; `fill[c]` is the value outside the source image for channel c
/// (for normalized data, the normalized value of raw black: −mean/std). See
/// [`crate::backend::Backend::warp`] for the exact convention. The result is not tracked by
/// autograd.
pub fn rotate(x: &Tensor, angles_deg: &[f32], interp: Interp, fill: &[f32]) -> Result<Tensor> {
    if let Some(a) = angles_deg.iter().find(|a| !a.is_finite()) {
        bail!("rotate: angle {a} is not finite");
    }
    let mats: Vec<Affine> = angles_deg.iter().map(|&a| rotation_matrix(a)).collect();
    warp_named("rotate", "angles", x, &mats, interp, fill)
}

/// Resample each image of `x` [N, C, H, W] through its own affine sampling matrix (see
/// [`crate::backend::Backend::warp`]; build matrices with [`crate::transform`] or
/// [`crate::augment`]), output the same size and untracked.
pub fn warp(x: &Tensor, mats: &[Affine], interp: Interp, fill: &[f32]) -> Result<Tensor> {
    warp_named("warp", "sampling matrices", x, mats, interp, fill)
}

fn warp_named(op: &str, what: &str, x: &Tensor, mats: &[Affine], interp: Interp, fill: &[f32]) -> Result<Tensor> {
    expect_rank(op, "input", x, 4)?;
    let g = RotateGeom { n: x.dim(0), c: x.dim(1), h: x.dim(2), w: x.dim(3) };
    if mats.len() != g.n {
        bail!(
            "{op}: got {} {what} for a batch of {} images (pass one per image; repeat a single one for the whole \
             batch)",
            mats.len(),
            g.n
        );
    }
    if fill.len() != g.c {
        bail!("{op}: got {} fill values for {} channels (pass one per channel)", fill.len(), g.c);
    }
    let be = x.backend().clone();
    let mut ys = be.alloc(g.len())?;
    be.warp(&x.storage(), mats, interp, fill, &mut ys, &g)?;
    Tensor::from_storage(&be, x.shape(), ys, false)
}

/// [`warp`] with the matrices (6 values per image) and the fill already on the device
/// (`Backend::warp_fed`): a training step replayed as a graph reads its augmentation there.
/// The matrices were checked on the host before they were uploaded.
pub fn warp_fed(x: &Tensor, mats: &Tensor, interp: Interp, fill: &Tensor) -> Result<Tensor> {
    expect_rank("warp", "input", x, 4)?;
    let g = RotateGeom { n: x.dim(0), c: x.dim(1), h: x.dim(2), w: x.dim(3) };
    if mats.numel() != 6 * g.n || fill.numel() != g.c {
        bail!(
            "warp: {} matrix values and {} fill values on the device for {} images of {} channels (want {} and {})",
            mats.numel(),
            fill.numel(),
            g.n,
            g.c,
            6 * g.n,
            g.c
        );
    }
    let be = x.backend().clone();
    let mut ys = be.alloc(g.len())?;
    be.warp_fed(&x.storage(), &mats.storage(), interp, &fill.storage(), &mut ys, &g)?;
    Tensor::from_storage(&be, x.shape(), ys, false)
}
