//! Test-time transformations: the set of images `eval --transform` and `measure --transform`
//! look at, as a grid over one or more axes (rotation, zoom, translation, flips).
//!
//! Every point of a set becomes one affine sampling matrix for [`crate::backend::Backend::warp`],
//! the operation training augmentation uses too, so a zoom seen in training and a zoom seen in
//! evaluation are the same resampling. docs/transformations.md states the conventions.

use crate::augment::sampling_matrix;
use crate::backend::{Affine, IDENTITY};
use crate::limits;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// One transformation of an image, applied in this order: mirror (`hflip`, `vflip`), rotate by
/// `rotate` degrees counter-clockwise as displayed, zoom by `zoom` about the centre (> 1
/// enlarges), then move by `translate` = [right, down] pixels.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Transform {
    pub rotate: f32,
    pub zoom: f32,
    pub translate: [f32; 2],
    pub hflip: bool,
    pub vflip: bool,
}

impl Default for Transform {
    fn default() -> Self {
        Transform { rotate: 0.0, zoom: 1.0, translate: [0.0, 0.0], hflip: false, vflip: false }
    }
}

impl Transform {
    pub fn rotation(degrees: f32) -> Transform {
        Transform { rotate: degrees, ..Transform::default() }
    }

    /// The sampling matrix of [`crate::backend::Backend::warp`]. A pure rotation is exactly
    /// [`crate::backend::rotation_matrix`]; zoom 1 and translation 0 change no bit of it.
    pub fn matrix(&self) -> Affine {
        let zoom = (self.zoom != 1.0).then_some(self.zoom);
        let mut m = sampling_matrix(Some(self.rotate), zoom, self.hflip, self.vflip);
        m[4] = self.translate[0];
        m[5] = self.translate[1];
        m
    }

    /// Whether this leaves every image as it is, bit for bit.
    pub fn is_identity(&self) -> bool {
        self.matrix() == IDENTITY
    }
}

impl fmt::Display for Transform {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let mut parts = Vec::new();
        if self.hflip {
            parts.push("hflip".to_string());
        }
        if self.vflip {
            parts.push("vflip".to_string());
        }
        if self.rotate != 0.0 {
            parts.push(format!("rotate {}°", self.rotate));
        }
        if self.zoom != 1.0 {
            parts.push(format!("zoom {}", self.zoom));
        }
        if self.translate != [0.0, 0.0] {
            parts.push(format!("translate ({}, {})", self.translate[0], self.translate[1]));
        }
        if parts.is_empty() {
            write!(f, "identity")
        } else {
            write!(f, "{}", parts.join(", "))
        }
    }
}

/// One axis of a grid: a parameter and the values it takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Axis {
    /// Degrees, counter-clockwise as displayed.
    #[serde(rename = "rotate")]
    Rotate(Vec<f32>),
    /// Scale factors about the centre; > 1 enlarges.
    #[serde(rename = "zoom")]
    Zoom(Vec<f32>),
    /// Pixels to the right.
    #[serde(rename = "translate-x")]
    TranslateX(Vec<f32>),
    /// Pixels down.
    #[serde(rename = "translate-y")]
    TranslateY(Vec<f32>),
    /// Not mirrored, then mirrored left to right.
    #[serde(rename = "hflip")]
    HFlip,
    /// Not mirrored, then mirrored top to bottom.
    #[serde(rename = "vflip")]
    VFlip,
}

/// Zoom factors: 0 would collapse the image to a point.
const ZOOM: limits::Bound =
    limits::Bound { name: "--transform zoom", lo: 0.0, hi: 100.0, lo_open: true, hi_open: false };
/// Shifts: beyond the largest image side everything is fill.
const SHIFT: limits::Bound =
    limits::Bound { name: "--transform translate", lo: -256.0, hi: 256.0, lo_open: false, hi_open: false };

impl Axis {
    pub fn name(&self) -> &'static str {
        match self {
            Axis::Rotate(_) => "rotate",
            Axis::Zoom(_) => "zoom",
            Axis::TranslateX(_) => "translate",
            Axis::TranslateY(_) => "translate-y",
            Axis::HFlip => "hflip",
            Axis::VFlip => "vflip",
        }
    }

    /// What the axis's values measure, for a plot's axis.
    pub fn quantity(&self) -> &'static str {
        match self {
            Axis::Rotate(_) => "rotation angle (°, counter-clockwise)",
            Axis::Zoom(_) => "zoom factor",
            Axis::TranslateX(_) => "shift right (pixels)",
            Axis::TranslateY(_) => "shift down (pixels)",
            Axis::HFlip => "horizontal mirror (0 = no, 1 = yes)",
            Axis::VFlip => "vertical mirror (0 = no, 1 = yes)",
        }
    }

    /// The values, as numbers (a flip is 0 then 1).
    pub fn values(&self) -> Vec<f64> {
        match self {
            Axis::Rotate(v) | Axis::Zoom(v) | Axis::TranslateX(v) | Axis::TranslateY(v) => {
                v.iter().map(|&x| x as f64).collect()
            }
            Axis::HFlip | Axis::VFlip => vec![0.0, 1.0],
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Axis::Rotate(v) | Axis::Zoom(v) | Axis::TranslateX(v) | Axis::TranslateY(v) => v.len(),
            Axis::HFlip | Axis::VFlip => 2,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Set this axis's parameter of `t` to its `i`-th value.
    fn apply(&self, i: usize, t: &mut Transform) {
        match self {
            Axis::Rotate(v) => t.rotate = v[i],
            Axis::Zoom(v) => t.zoom = v[i],
            Axis::TranslateX(v) => t.translate[0] = v[i],
            Axis::TranslateY(v) => t.translate[1] = v[i],
            Axis::HFlip => t.hflip = i == 1,
            Axis::VFlip => t.vflip = i == 1,
        }
    }
}

/// `s` as a finite number, or an error that starts with `what` (the flag and its value).
fn finite(s: &str, what: &str) -> Result<f64> {
    s.trim().parse::<f64>().ok().filter(|v| v.is_finite()).with_context(|| format!("{what}: '{s}' is not a number"))
}

/// A set of test angles in degrees, parsed from `--angles` (and `--transform rotate=`): a list
/// `0,90,180,270`, a range `START:STOP:STEP` (STOP excluded, as Python's range: `0:360:45` is 0,
/// 45, …, 315), or a count `16` (evenly spaced over 360° from 0°).
pub fn parse_angles(spec: &str) -> Result<Vec<f32>> {
    let spec = spec.trim();
    let num = |s: &str| finite(s, &format!("--angles {spec}"));
    let angles: Vec<f32> = if spec.contains(':') {
        let parts: Vec<&str> = spec.split(':').collect();
        let [start, stop, step] = parts[..] else {
            bail!("--angles {spec}: a range is START:STOP:STEP, e.g. 0:360:45");
        };
        let (start, stop, step) = (num(start)?, num(stop)?, num(step)?);
        if step <= 0.0 {
            bail!("--angles {spec}: STEP must be positive");
        }
        // Counted in f64 and bounded before anything is allocated: a step of 1e-300 asks for
        // more angles than there are atoms.
        let count = ((stop - start) / step - 1e-9).ceil().max(0.0);
        if count > limits::ANGLES.hi {
            bail!(
                "--angles {spec}: that range holds {count:.3e} angles; at most {} are allowed (use a larger STEP)",
                limits::ANGLES.hi
            );
        }
        (0..count as usize).map(|i| (start + step * i as f64) as f32).collect()
    } else if spec.contains(',') {
        spec.split(',').map(|s| num(s).map(|v| v as f32)).collect::<Result<_>>()?
    } else {
        let n: usize = spec.parse().ok().filter(|&n| n > 0).with_context(|| {
            format!("--angles {spec}: expected a list (0,90,180), a range (0:360:45) or a count (16)")
        })?;
        limits::ANGLES.check_usize(n)?;
        (0..n).map(|i| (360.0 * i as f64 / n as f64) as f32).collect()
    };
    if angles.is_empty() {
        bail!("--angles {spec}: the set of angles is empty");
    }
    limits::ANGLES.check_usize(angles.len()).with_context(|| format!("--angles {spec}"))?;
    Ok(angles)
}

/// Values of a zoom or translation axis: `LO:HI:N` (N values evenly spaced from LO to HI, both
/// included: `0.5:1.5:11` is 0.5, 0.6, …, 1.5) or a list `0.5,1,2`.
fn parse_values(item: &str, spec: &str, bound: limits::Bound) -> Result<Vec<f32>> {
    let num = |s: &str| finite(s, &format!("--transform {item}={spec}"));
    let values: Vec<f64> = if spec.contains(':') {
        let parts: Vec<&str> = spec.split(':').collect();
        let [lo, hi, n] = parts[..] else {
            bail!("--transform {item}={spec}: a grid is LO:HI:N (N values from LO to HI), e.g. {item}=0.5:1.5:11");
        };
        let (lo, hi) = (num(lo)?, num(hi)?);
        let n: usize =
            n.trim().parse().ok().filter(|&n| n >= 1).with_context(|| {
                format!("--transform {item}={spec}: N must be a whole number of values, at least 1")
            })?;
        limits::ANGLES.check_usize(n).with_context(|| format!("--transform {item}={spec}"))?;
        if lo > hi {
            bail!("--transform {item}={spec}: empty grid (LO must not exceed HI)");
        }
        if n == 1 && lo != hi {
            bail!("--transform {item}={spec}: one value cannot span {lo} to {hi}; use N ≥ 2, or LO = HI");
        }
        // lo + (hi − lo)·i/(n − 1) in f64, the last value exactly HI.
        (0..n).map(|i| if i + 1 == n { hi } else { lo + (hi - lo) * i as f64 / (n - 1).max(1) as f64 }).collect()
    } else {
        spec.split(',').map(num).collect::<Result<_>>()?
    };
    if values.is_empty() {
        bail!("--transform {item}={spec}: no values");
    }
    limits::ANGLES.check_usize(values.len()).with_context(|| format!("--transform {item}={spec}"))?;
    if let Some(v) = values.iter().find(|&&v| !bound.contains(v)) {
        bail!("--transform {item}={spec}: {v} is out of range: each value must be within {}", bound.range());
    }
    Ok(values.into_iter().map(|v| v as f32).collect())
}

impl FromStr for Axis {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Axis> {
        let s = s.trim();
        let (key, value) = match s.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (s, None),
        };
        Ok(match (key, value) {
            ("rotate", Some(v)) => Axis::Rotate(parse_angles(v).with_context(|| format!("--transform rotate={v}"))?),
            ("zoom", Some(v)) => Axis::Zoom(parse_values("zoom", v, ZOOM)?),
            ("translate" | "translate-x", Some(v)) => Axis::TranslateX(parse_values("translate", v, SHIFT)?),
            ("translate-y", Some(v)) => Axis::TranslateY(parse_values("translate-y", v, SHIFT)?),
            ("hflip", None) => Axis::HFlip,
            ("vflip", None) => Axis::VFlip,
            ("rotate" | "zoom" | "translate" | "translate-x" | "translate-y", None) => {
                bail!("--transform {key} needs values, e.g. {key}={}", example(key))
            }
            ("hflip" | "vflip", Some(_)) => bail!("--transform {key} takes no values (it is: not mirrored, mirrored)"),
            _ => bail!(
                "--transform: unknown transformation '{s}'; use rotate=SPEC, zoom=LO:HI:N, translate=LO:HI:N, \
                 translate-y=LO:HI:N, hflip or vflip"
            ),
        })
    }
}

fn example(key: &str) -> &'static str {
    match key {
        "rotate" => "0:360:15",
        "zoom" => "0.5:1.5:11",
        _ => "-4:4:9",
    }
}

/// Every combination of the values of one or more axes (the first axis varies slowest), at
/// most [`limits::ANGLES`] points. Stored (in shards, configs) as its axes; the points are
/// rebuilt and checked on reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Vec<Axis>", into = "Vec<Axis>")]
pub struct TransformSet {
    pub axes: Vec<Axis>,
    pub points: Vec<Transform>,
}

impl TransformSet {
    pub fn new(axes: Vec<Axis>) -> Result<TransformSet> {
        if axes.is_empty() {
            bail!("--transform: no transformation given");
        }
        let total = axes.iter().try_fold(1usize, |acc, a| acc.checked_mul(a.len())).unwrap_or(usize::MAX);
        if total as f64 > limits::ANGLES.hi {
            bail!(
                "--transform: the grid has {total} points; at most {} are allowed (use fewer values per axis)",
                limits::ANGLES.hi
            );
        }
        let mut points = vec![Transform::default()];
        for axis in &axes {
            points = points
                .iter()
                .flat_map(|p| {
                    (0..axis.len()).map(move |i| {
                        let mut t = *p;
                        axis.apply(i, &mut t);
                        t
                    })
                })
                .collect();
        }
        Ok(TransformSet { axes, points })
    }

    /// Rotations only (what `--angles` asks for).
    pub fn rotations(angles: &[f32]) -> TransformSet {
        TransformSet {
            axes: vec![Axis::Rotate(angles.to_vec())],
            points: angles.iter().map(|&a| Transform::rotation(a)).collect(),
        }
    }

    /// Parse one `--transform` value per axis.
    pub fn parse(specs: &[String]) -> Result<TransformSet> {
        TransformSet::new(specs.iter().map(|s| s.parse()).collect::<Result<_>>()?)
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Whether every axis is a rotation (the protocol's random rotation then applies).
    pub fn rotation_only(&self) -> bool {
        self.axes.iter().all(|a| matches!(a, Axis::Rotate(_)))
    }

    pub fn matrices(&self) -> Vec<Affine> {
        self.points.iter().map(Transform::matrix).collect()
    }

    /// The value each point is plotted at: the axis's value for a one-axis set, else the
    /// point's index.
    pub fn xs(&self) -> Vec<f64> {
        match &self.axes[..] {
            [axis] => axis.values(),
            _ => (0..self.len()).map(|i| i as f64).collect(),
        }
    }

    /// The x axis of a plot over the set.
    pub fn quantity(&self) -> String {
        match &self.axes[..] {
            [axis] => axis.quantity().to_string(),
            _ => format!("transformation ({})", self.spec()),
        }
    }

    /// A short label per point, for tables and heatmap columns.
    pub fn labels(&self) -> Vec<String> {
        match &self.axes[..] {
            [Axis::Rotate(v)] => v.iter().map(|a| format!("{a}°")).collect(),
            [Axis::HFlip | Axis::VFlip] => vec!["no".into(), "yes".into()],
            [Axis::Zoom(v) | Axis::TranslateX(v) | Axis::TranslateY(v)] => v.iter().map(|x| x.to_string()).collect(),
            _ => self.points.iter().map(|t| t.to_string()).collect(),
        }
    }

    /// The canonical text of the set (`zoom=0.5,0.75,1;hflip`), for configs and file headers.
    pub fn spec(&self) -> String {
        let list = |v: &[f32]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
        self.axes
            .iter()
            .map(|a| match a {
                Axis::Rotate(v) | Axis::Zoom(v) | Axis::TranslateX(v) | Axis::TranslateY(v) => {
                    format!("{}={}", a.name(), list(v))
                }
                Axis::HFlip | Axis::VFlip => a.name().to_string(),
            })
            .collect::<Vec<_>>()
            .join(";")
    }
}

impl TryFrom<Vec<Axis>> for TransformSet {
    type Error = anyhow::Error;
    fn try_from(axes: Vec<Axis>) -> Result<TransformSet> {
        for axis in &axes {
            let bound = match axis {
                Axis::Zoom(_) => ZOOM,
                Axis::TranslateX(_) | Axis::TranslateY(_) => SHIFT,
                Axis::Rotate(v) if v.iter().all(|a| a.is_finite()) && !v.is_empty() => continue,
                Axis::Rotate(_) => bail!("transformation axis rotate has no angles or one that is not finite"),
                Axis::HFlip | Axis::VFlip => continue,
            };
            if axis.is_empty() || axis.values().iter().any(|&v| !bound.contains(v)) {
                bail!("transformation axis {} has no values or values outside {}", axis.name(), bound.range());
            }
        }
        TransformSet::new(axes)
    }
}

impl From<TransformSet> for Vec<Axis> {
    fn from(set: TransformSet) -> Vec<Axis> {
        set.axes
    }
}
