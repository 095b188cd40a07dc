//! Image rotation of a batch: a data transform, not a layer.
//!
//! There is no backward: rotation is applied to input data (training augmentation, rotated
//! evaluation, the variance measure's transformations), never to something a gradient flows
//! through, so the output is always untracked.

use super::expect_rank;
use crate::backend::{Interp, RotateGeom};
use crate::tensor::Tensor;
use anyhow::{bail, Result};

/// Rotate each image of `x` [N, C, H, W] by `angles_deg[i]` degrees (one angle per image;
/// repeat one angle for the whole batch), counter-clockwise as displayed, about the image
/// centre, output the same size; `fill[c]` is the value outside the source image for channel c
/// (for normalized data, the normalized value of raw black: −mean/std). See
/// [`crate::backend::Backend::rotate`] for the exact convention. The result is not tracked by
/// autograd.
pub fn rotate(x: &Tensor, angles_deg: &[f32], interp: Interp, fill: &[f32]) -> Result<Tensor> {
    expect_rank("rotate", "input", x, 4)?;
    let g = RotateGeom { n: x.dim(0), c: x.dim(1), h: x.dim(2), w: x.dim(3) };
    if angles_deg.len() != g.n {
        bail!(
            "rotate: got {} angles for a batch of {} images (pass one angle per image; repeat a single angle for \
             the whole batch)",
            angles_deg.len(),
            g.n
        );
    }
    if fill.len() != g.c {
        bail!("rotate: got {} fill values for {} channels (pass one per channel)", fill.len(), g.c);
    }
    let be = x.backend().clone();
    let mut ys = be.alloc(g.len())?;
    be.rotate(&x.storage(), angles_deg, interp, fill, &mut ys, &g)?;
    Tensor::from_storage(&be, x.shape(), ys, false)
}
