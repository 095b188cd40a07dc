//! Looking inside (docs/protocol.md, the earlier course-work views): the first layer's kernels,
//! the feature maps of every conv layer for one image and its rotations, and per layer the
//! mean absolute difference between an image's activations and those of its rotated copies.

use crate::backend::Interp;
use crate::models::Model;
use crate::nn::Forward;
use crate::ops;
use crate::train::DeviceDataset;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Named intermediates of one forward pass of a batch, on the host: (name, shape, values).
pub type Activations = Vec<(String, Vec<usize>, Vec<f32>)>;

/// Every named intermediate of `model` for the images `idx` of `data`, each rotated by the
/// corresponding angle of `angles` (one per image).
pub fn activations(model: &Model, data: &DeviceDataset, idx: &[u32], angles: &[f32]) -> Result<Activations> {
    let (x, _) = data.batch(idx)?;
    let x = ops::rotate(&x, angles, Interp::Bilinear, &data.fill)?;
    let mut out: Activations = Vec::new();
    let mut keep = |name: &str, t: &crate::tensor::Tensor| -> Result<()> {
        out.push((name.to_string(), t.shape().to_vec(), t.to_vec()?));
        Ok(())
    };
    model.forward(&x, &mut Forward::observe(&mut keep))?;
    Ok(out)
}

/// The first convolution's weights [O, C, K, K] (the first 4-D parameter), for a kernel grid.
pub fn first_layer_kernels(model: &Model) -> Result<(Vec<usize>, Vec<f32>)> {
    for p in model.parameters() {
        if p.tensor.shape().len() == 4 {
            return Ok((p.tensor.shape().to_vec(), p.tensor.to_vec()?));
        }
    }
    bail!("{} has no convolution layer", model.arch)
}

/// Per layer and angle: mean over images and units of |a(x) − a(rot(x))| and the same divided
/// by the mean |a(x)| (relative; 0 = the activation does not change at all).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotationDifference {
    pub angles: Vec<f32>,
    pub layers: Vec<String>,
    /// [layer][angle]
    pub mean_abs_diff: Vec<Vec<f64>>,
    pub relative: Vec<Vec<f64>>,
    pub images: usize,
}

/// Mean absolute difference between the activations of `images` test images and those of
/// their copies rotated by each angle (position by position: no un-rotation of feature maps,
/// so it measures how much each unit's output moves).
pub fn rotation_difference(
    model: &Model,
    data: &DeviceDataset,
    images: usize,
    angles: &[f32],
) -> Result<RotationDifference> {
    let n = images.min(data.len());
    if n == 0 {
        bail!("no test images to compare");
    }
    let idx: Vec<u32> = (0..n as u32).collect();
    let base = activations(model, data, &idx, &vec![0.0; n])?;
    let layers: Vec<String> = base.iter().map(|(name, _, _)| name.clone()).collect();
    let mut diff = vec![vec![0.0; angles.len()]; layers.len()];
    let mut rel = vec![vec![0.0; angles.len()]; layers.len()];
    for (a, &angle) in angles.iter().enumerate() {
        let rotated = activations(model, data, &idx, &vec![angle; n])?;
        for (l, ((_, _, x), (_, _, y))) in base.iter().zip(&rotated).enumerate() {
            let d = x.iter().zip(y).map(|(p, q)| (p - q).abs() as f64).sum::<f64>() / x.len() as f64;
            let scale = x.iter().map(|p| p.abs() as f64).sum::<f64>() / x.len() as f64;
            diff[l][a] = d;
            rel[l][a] = if scale > 0.0 { d / scale } else { f64::NAN };
        }
    }
    Ok(RotationDifference { angles: angles.to_vec(), layers, mean_abs_diff: diff, relative: rel, images: n })
}
