//! Image grids: test images and their rotations, first-layer kernels, feature maps.

use super::text::put_text;
use super::{fit_text, font, text_size, Raster, MAX_SIDE, NONFINITE_RGB};
use crate::fsio::write_atomic;
use anyhow::{bail, Context, Result};
use plotters::style::text_anchor::{HPos, VPos};
use std::path::Path;

/// How image values map to grey levels (or to each RGB channel): t = (v − lo)/(hi − lo) clamped
/// to [0, 1], then 0 → black, 1 → white. When hi = lo every pixel is mid grey. Non-finite pixels
/// are painted [`NONFINITE_RGB`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GridNormalize {
    /// lo, hi = min, max of each image's own finite values (all channels).
    PerImage,
    /// lo, hi = min, max of the finite values of all images: intensities comparable across cells.
    Global,
    /// Fixed lo < hi, e.g. (0, 1) for raw pixels.
    Fixed(f32, f32),
    /// Signed data (kernels): lo = −m, hi = m with m = max |v| over all images, so 0 is mid grey.
    Symmetric,
}

/// A grid of images, `cols` per row, in the order given. PNG only.
#[derive(Clone, Debug)]
pub struct ImageGrid {
    /// n × c × h × w values (NCHW, the tensor layout).
    pub images: Vec<f32>,
    pub n: usize,
    /// 1 (grey) or 3 (RGB).
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// Images per grid row (≥ 1); the grid has ⌈n / cols⌉ rows.
    pub cols: usize,
    /// Integer upscaling (≥ 1): each pixel becomes a scale × scale block (e.g. 4 for 28 × 28).
    pub scale: usize,
    /// One label per grid row, written left of it (e.g. "image 3").
    pub row_labels: Option<Vec<String>>,
    /// One label per grid column, written above it (e.g. "45°").
    pub col_labels: Option<Vec<String>>,
    pub title: Option<String>,
    pub normalize: GridNormalize,
}

/// Width of the white separators between cells and around the grid, in pixels.
pub const SEPARATOR: usize = 2;
const LABEL_SIZE: f64 = 14.0;
const TITLE_SIZE: f64 = 18.0;

/// Draw an image grid into `path` (PNG). Errors name the path.
pub fn image_grid(path: &Path, spec: &ImageGrid) -> Result<()> {
    (|| -> Result<()> {
        font::ensure()?;
        let raster = render(spec)?;
        write_atomic(path, &raster.to_png()?)
    })()
    .with_context(|| format!("image grid {}", path.display()))
}

fn finite_range(v: &[f32]) -> Option<(f32, f32)> {
    let mut it = v.iter().copied().filter(|x| x.is_finite());
    let first = it.next()?;
    Some(it.fold((first, first), |(a, b), x| (a.min(x), b.max(x))))
}

fn render(s: &ImageGrid) -> Result<Raster> {
    if s.n == 0 || s.h == 0 || s.w == 0 {
        bail!("zero-size images: n = {}, h = {}, w = {}", s.n, s.h, s.w);
    }
    if s.c != 1 && s.c != 3 {
        bail!("c = {}: images must have 1 (grey) or 3 (RGB) channels", s.c);
    }
    if s.cols == 0 || s.scale == 0 {
        bail!("cols = {} and scale = {} must both be at least 1", s.cols, s.scale);
    }
    let per = s.c * s.h * s.w;
    if s.images.len() != s.n * per {
        bail!(
            "images has {} values but n × c × h × w = {} × {} × {} × {} = {}",
            s.images.len(),
            s.n,
            s.c,
            s.h,
            s.w,
            s.n * per
        );
    }
    let cols = s.cols.min(s.n);
    let rows = s.n.div_ceil(cols);
    if let Some(l) = &s.row_labels {
        if l.len() != rows {
            bail!("{} row labels for {rows} grid rows", l.len());
        }
    }
    if let Some(l) = &s.col_labels {
        if l.len() != cols {
            bail!("{} column labels for {cols} grid columns", l.len());
        }
    }
    if let GridNormalize::Fixed(lo, hi) = s.normalize {
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            bail!("GridNormalize::Fixed({lo}, {hi}) needs finite lo < hi");
        }
    }
    let (cw, ch) = (s.w.saturating_mul(s.scale), s.h.saturating_mul(s.scale));
    if cw > MAX_SIDE as usize || ch > MAX_SIDE as usize {
        bail!("cells of {cw}×{ch} px are too large");
    }

    // Layout: optional title and column labels on top, row labels on the left.
    let row_labels: Option<Vec<String>> =
        s.row_labels.as_ref().map(|l| l.iter().map(|t| fit_text(t, LABEL_SIZE, 200)).collect());
    let col_labels: Option<Vec<String>> =
        s.col_labels.as_ref().map(|l| l.iter().map(|t| fit_text(t, LABEL_SIZE, (cw + SEPARATOR) as u32)).collect());
    let title_h = if s.title.is_some() { 34 } else { 0 };
    let col_h = if col_labels.is_some() { 22 } else { 0 };
    let left = row_labels
        .as_ref()
        .map(|l| l.iter().map(|t| text_size(t, LABEL_SIZE).0).max().unwrap_or(0) as usize + 14)
        .unwrap_or(0);
    let top = title_h + col_h;
    let grid_w = SEPARATOR + cols * (cw + SEPARATOR);
    let grid_h = SEPARATOR + rows * (ch + SEPARATOR);
    let title_w = s.title.as_ref().map(|t| text_size(t, TITLE_SIZE).0 as usize + 20).unwrap_or(0);
    let w = (left + grid_w).max(title_w);
    let h = top + grid_h;
    if w > MAX_SIDE as usize || h > MAX_SIDE as usize {
        bail!("grid of {w}×{h} px is larger than {MAX_SIDE} px a side");
    }
    let mut img = Raster::new(w as u32, h as u32, [255, 255, 255])?;

    let global = match s.normalize {
        GridNormalize::Global => finite_range(&s.images),
        GridNormalize::Fixed(lo, hi) => Some((lo, hi)),
        GridNormalize::Symmetric => finite_range(&s.images).map(|(a, b)| {
            let m = a.abs().max(b.abs());
            (-m, m)
        }),
        GridNormalize::PerImage => None,
    };
    for i in 0..s.n {
        let im = &s.images[i * per..(i + 1) * per];
        let range = match s.normalize {
            GridNormalize::PerImage => finite_range(im),
            _ => global,
        };
        let level = |v: f32| -> u8 {
            match range {
                Some((lo, hi)) if hi > lo => (((v - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0).round() as u8,
                _ => 128,
            }
        };
        let (gx, gy) =
            (left + SEPARATOR + (i % cols) * (cw + SEPARATOR), top + SEPARATOR + (i / cols) * (ch + SEPARATOR));
        for y in 0..s.h {
            for x in 0..s.w {
                let px = |k: usize| im[(k * s.h + y) * s.w + x];
                let color = if (0..s.c).any(|k| !px(k).is_finite()) {
                    NONFINITE_RGB
                } else if s.c == 1 {
                    [level(px(0)); 3]
                } else {
                    [level(px(0)), level(px(1)), level(px(2))]
                };
                let (x0, y0) = ((gx + x * s.scale) as u32, (gy + y * s.scale) as u32);
                img.fill(x0, y0, x0 + s.scale as u32, y0 + s.scale as u32, color);
            }
        }
    }

    if s.title.is_some() || row_labels.is_some() || col_labels.is_some() {
        {
            let mut labels = Vec::new();
            let root = &mut labels;
            let black = [0, 0, 0];
            if let Some(t) = &s.title {
                let t = fit_text(t, TITLE_SIZE, w as u32 - 10);
                put_text(root, &t, (w as i32 / 2, 8), TITLE_SIZE, black, HPos::Center, VPos::Top, false);
            }
            if let Some(l) = &col_labels {
                for (c, t) in l.iter().enumerate() {
                    let x = (left + SEPARATOR + c * (cw + SEPARATOR) + cw / 2) as i32;
                    put_text(root, t, (x, top as i32 - 4), LABEL_SIZE, black, HPos::Center, VPos::Bottom, false);
                }
            }
            if let Some(l) = &row_labels {
                for (r, t) in l.iter().enumerate() {
                    let y = (top + SEPARATOR + r * (ch + SEPARATOR) + ch / 2) as i32;
                    put_text(root, t, (left as i32 - 8, y), LABEL_SIZE, black, HPos::Right, VPos::Center, false);
                }
            }
            img.draw_labels(&labels);
        }
    }
    Ok(img)
}
