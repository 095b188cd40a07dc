//! Data augmentation on the device: random rotation, zoom and flips, composed per image into
//! one 2×2 sampling matrix and applied in a single [`crate::backend::Backend::warp`] pass.
//!
//! Only the per-image parameters (four floats per image, drawn from the seeded RNG on the host)
//! travel to the device; the images never leave it.

use crate::backend::{rotation_matrix, Affine, Interp};
use crate::limits;
use crate::rng::Rng;
use crate::tensor::Tensor;
use anyhow::{bail, Context, Result};
use std::fmt;
use std::str::FromStr;

/// What to draw for each training image, each step. Parsed from `--augment`: `none`, or a
/// comma-separated list of `rotate` (angles uniform in [−180°, 180°)), `rotate=LO:HI` (degrees),
/// `zoom=LO:HI` (scale factor uniform in [LO, HI); > 1 enlarges), `hflip`, `vflip` (each with
/// probability ½).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Augment {
    pub rotate: Option<(f32, f32)>,
    pub zoom: Option<(f32, f32)>,
    pub hflip: bool,
    pub vflip: bool,
}

/// The reference protocol's rotation range (docs/protocol.md, docs/transformations.md).
pub const FULL_TURN: (f32, f32) = (-180.0, 180.0);

impl Augment {
    pub const NONE: Augment = Augment { rotate: None, zoom: None, hflip: false, vflip: false };
    pub const ROTATE: Augment = Augment { rotate: Some(FULL_TURN), zoom: None, hflip: false, vflip: false };

    pub fn is_none(&self) -> bool {
        *self == Augment::NONE
    }

    /// One sampling matrix per image, drawn from `rng` in a fixed order (angle, zoom, hflip,
    /// vflip for image 0, then image 1, ...), so a seed gives the same augmentation everywhere.
    pub fn draw(&self, n: usize, rng: &mut Rng) -> Vec<Affine> {
        (0..n)
            .map(|_| {
                let angle = self.rotate.map(|(lo, hi)| rng.uniform(lo, hi));
                let zoom = self.zoom.map(|(lo, hi)| rng.uniform(lo, hi));
                let hflip = self.hflip && rng.next_u64() >> 63 == 1;
                let vflip = self.vflip && rng.next_u64() >> 63 == 1;
                sampling_matrix(angle, zoom, hflip, vflip)
            })
            .collect()
    }

    /// Augment a batch [N, C, H, W] on its device (bilinear; `fill` per channel, see
    /// [`crate::backend::Backend::warp`]). Returns the batch itself when nothing is drawn.
    pub fn apply(&self, x: &Tensor, fill: &[f32], rng: &mut Rng) -> Result<Tensor> {
        if self.is_none() {
            return Ok(x.clone());
        }
        let mats = self.draw(x.dim(0), rng);
        crate::ops::warp(x, &mats, Interp::Bilinear, fill)
    }
}

/// The sampling matrix of an image flipped, then rotated by `angle` degrees (counter-clockwise
/// as displayed), then zoomed by `zoom` about its centre. Sampling inverts the forward
/// transform: source offset = F · R(angle)⁻¹ · (1/zoom) · output offset (a flip is its own
/// inverse). A pure rotation is exactly [`rotation_matrix`], so quarter turns stay exact. No
/// translation.
pub fn sampling_matrix(angle: Option<f32>, zoom: Option<f32>, hflip: bool, vflip: bool) -> Affine {
    let mut m = rotation_matrix(angle.unwrap_or(0.0));
    if let Some(z) = zoom {
        // The division is applied to the f32 rotation entries (exact for quarter turns when z is
        // a power of two); each entry is rounded once.
        for v in &mut m[..4] {
            *v = (*v as f64 / z as f64) as f32;
        }
    }
    if hflip {
        m[0] = -m[0];
        m[1] = -m[1];
    }
    if vflip {
        m[2] = -m[2];
        m[3] = -m[3];
    }
    m
}

fn parse_range(item: &str, value: &str) -> Result<(f32, f32)> {
    let (lo, hi) = value
        .split_once(':')
        .with_context(|| format!("--augment {item}: expected a range LO:HI, e.g. {item}=0.8:1.2"))?;
    let parse = |s: &str| -> Result<f32> {
        s.trim()
            .parse::<f32>()
            .ok()
            .filter(|v| v.is_finite())
            .with_context(|| format!("--augment {item}: '{s}' is not a number"))
    };
    let (lo, hi) = (parse(lo)?, parse(hi)?);
    if lo > hi {
        bail!("--augment {item}: empty range {lo}:{hi} (LO must not exceed HI)");
    }
    Ok((lo, hi))
}

impl FromStr for Augment {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Augment> {
        let mut a = Augment::NONE;
        let s = s.trim();
        if s.is_empty() || s == "none" {
            return Ok(a);
        }
        for item in s.split(',').map(str::trim) {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v)),
                None => (item, None),
            };
            match (key, value) {
                ("rotate", None) => a.rotate = Some(FULL_TURN),
                ("rotate", Some(v)) => a.rotate = Some(bounded(parse_range("rotate", v)?, limits::AUGMENT_DEGREES)?),
                ("zoom", Some(v)) => a.zoom = Some(bounded(parse_range("zoom", v)?, limits::AUGMENT_ZOOM)?),
                ("zoom", None) => bail!("--augment zoom needs a range, e.g. zoom=0.8:1.2"),
                ("hflip", None) => a.hflip = true,
                ("vflip", None) => a.vflip = true,
                _ => bail!(
                    "--augment: unknown item '{item}'; use none, or a comma-separated list of rotate, rotate=LO:HI, \
                     zoom=LO:HI, hflip, vflip"
                ),
            }
        }
        Ok(a)
    }
}

impl fmt::Display for Augment {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let mut parts = Vec::new();
        match self.rotate {
            Some(FULL_TURN) => parts.push("rotate".to_string()),
            Some((lo, hi)) => parts.push(format!("rotate={lo}:{hi}")),
            None => {}
        }
        if let Some((lo, hi)) = self.zoom {
            parts.push(format!("zoom={lo}:{hi}"));
        }
        if self.hflip {
            parts.push("hflip".into());
        }
        if self.vflip {
            parts.push("vflip".into());
        }
        if parts.is_empty() {
            write!(f, "none")
        } else {
            write!(f, "{}", parts.join(","))
        }
    }
}

fn bounded((lo, hi): (f32, f32), b: limits::Bound) -> Result<(f32, f32)> {
    if !(b.contains(lo as f64) && b.contains(hi as f64)) {
        bail!("{} {lo}:{hi} is out of range: both ends must be within {}", b.name, b.range());
    }
    Ok((lo, hi))
}

// Stored as its canonical text (`rotate,zoom=0.8:1.2`) in configs, manifests and checkpoints.
impl serde::Serialize for Augment {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Augment {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Augment, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e: anyhow::Error| serde::de::Error::custom(format!("{e:#}")))
    }
}
