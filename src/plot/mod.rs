//! Figures: line charts, heatmaps, per-layer heatmap strips and image grids (docs/reproduce.md).
//!
//! Pure Rust: plotters draws into an in-memory RGB buffer (or an SVG string), the `png` crate
//! encodes it, and [`crate::fsio::write_atomic`] writes it, so a reader never sees a torn file.
//! Text uses a font compiled into the binary (`fonts/`, a DejaVu Sans subset), never system fonts.
//!
//! - [`line_chart`]: accuracy vs angle, training curves, per-layer mean V (categorical x).
//! - [`heatmap`]: class × angle accuracy, with a colour bar and optional values in the cells.
//! - [`heatmap_strips`]: per-layer strips of per-unit V, one panel per class / "all" / "stratified".
//! - [`image_grid`]: images and their rotations, first-layer kernels, feature maps.
//!
//! Non-finite values never panic: line charts leave gaps, heatmaps, strips and image grids paint
//! them in [`NONFINITE_RGB`] (cyan) and say so in a legend line. Bad inputs (mismatched lengths,
//! empty data, zero sizes) are errors naming the file and the problem.

mod colormap;
mod font;
mod grid;
mod heatmap;
mod line;
mod strips;
mod text;

pub use colormap::{inferno, NONFINITE_RGB, PALETTE};
pub use grid::{image_grid, GridNormalize, ImageGrid};
pub use heatmap::{heatmap, Heatmap};
pub use line::{line_chart, LineChart, Series};
pub use strips::{heatmap_strips, Panel, StripAggregate, Strips};

use crate::fsio::write_atomic;
use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// Quantile of sorted finite data with linear interpolation between order statistics (type 7 of
/// Hyndman & Fan, the default of numpy and R): with n values, q(p) = x[⌊h⌋] + (h − ⌊h⌋)·(x[⌊h⌋+1] −
/// x[⌊h⌋]) where h = (n − 1)·p and x is 0-indexed ascending.
fn quantile_sorted(x: &[f64], p: f64) -> f64 {
    let h = (x.len() - 1) as f64 * p;
    let i = h.floor() as usize;
    let f = h - i as f64;
    if i + 1 < x.len() {
        x[i] + f * (x[i + 1] - x[i])
    } else {
        x[i]
    }
}

/// A robust upper colour limit: median + 3·IQR of the finite values (inf and NaN are ignored),
/// with the quartiles and median computed by linear interpolation between order statistics (type 7,
/// numpy's default: h = (n − 1)·p). Fallbacks: no finite values → 1.0; IQR = 0 (e.g. constant
/// input, or more than half the values equal) → the largest finite value, so the scale is set by the
/// data rather than collapsing onto the median.
pub fn robust_upper(values: &[f64]) -> f64 {
    let mut x: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if x.is_empty() {
        return 1.0;
    }
    x.sort_by(|a, b| a.total_cmp(b));
    let (q1, med, q3) = (quantile_sorted(&x, 0.25), quantile_sorted(&x, 0.5), quantile_sorted(&x, 0.75));
    let iqr = q3 - q1;
    if iqr > 0.0 {
        med + 3.0 * iqr
    } else {
        x[x.len() - 1]
    }
}

// ---------------------------------------------------------------------------------------------
// Shared drawing helpers.

/// Turn a plotters error (not `Send`/`Sync`) into an anyhow error.
pub(crate) fn pe<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e}")
}

/// An RGB8 image in memory: raw pixel work goes straight into `buf`, shapes through plotters'
/// bitmap backend drawing into the same buffer ([`Raster::draw`]), text through
/// [`Raster::draw_labels`].
pub(crate) struct Raster {
    pub w: u32,
    pub h: u32,
    pub buf: Vec<u8>,
}

/// Largest figure side in pixels: guards against absurd sizes allocating gigabytes.
pub(crate) const MAX_SIDE: u32 = 20_000;

impl Raster {
    pub fn new(w: u32, h: u32, bg: [u8; 3]) -> Result<Self> {
        if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
            return Err(anyhow!("figure size {w}×{h} px is empty or larger than {MAX_SIDE} px a side"));
        }
        let mut buf = vec![0u8; w as usize * h as usize * 3];
        for px in buf.chunks_exact_mut(3) {
            px.copy_from_slice(&bg);
        }
        Ok(Self { w, h, buf })
    }

    pub fn set(&mut self, x: u32, y: u32, c: [u8; 3]) {
        if x < self.w && y < self.h {
            let i = (y as usize * self.w as usize + x as usize) * 3;
            self.buf[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Fill the half-open pixel rectangle [x0, x1) × [y0, y1), clipped to the image.
    pub fn fill(&mut self, x0: u32, y0: u32, x1: u32, y1: u32, c: [u8; 3]) {
        for y in y0..y1.min(self.h) {
            for x in x0..x1.min(self.w) {
                self.set(x, y, c);
            }
        }
    }

    /// Draw on top of the pixels already there with plotters (lines, shapes); nothing is cleared.
    pub fn draw(&mut self, f: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<()>) -> Result<()> {
        let (w, h) = (self.w, self.h);
        let root = BitMapBackend::with_buffer(&mut self.buf, (w, h)).into_drawing_area();
        f(&root)?;
        root.present().map_err(pe)
    }

    pub fn to_png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.w, self.h);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header()?;
            writer.write_image_data(&self.buf)?;
            writer.finish()?;
        }
        Ok(out)
    }
}

pub(crate) fn rgb(c: [u8; 3]) -> RGBColor {
    RGBColor(c[0], c[1], c[2])
}

/// Width and height in pixels of `text` set horizontally at `size`.
pub(crate) fn text_size(text: &str, size: f64) -> (u32, u32) {
    text::measure(text, size)
}

/// Shorten `text` with a trailing "…" until it is at most `max_w` pixels wide at `size`.
pub(crate) fn fit_text(text: &str, size: f64, max_w: u32) -> String {
    if text_size(text, size).0 <= max_w {
        return text.to_string();
    }
    let mut chars: Vec<char> = text.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let s: String = chars.iter().collect::<String>() + "…";
        if text_size(&s, size).0 <= max_w {
            return s;
        }
    }
    String::new()
}

/// About `target` "nice" tick values (steps of 1, 2, 2.5 or 5 × 10^k) covering [lo, hi].
pub(crate) fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return vec![lo];
    }
    let step = nice_step((hi - lo) / target.max(1) as f64);
    let first = (lo / step - 1e-9).ceil();
    let mut ticks = Vec::new();
    let mut k = first;
    while k * step <= hi + step * 1e-9 && ticks.len() < 1000 {
        let v = k * step;
        ticks.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        k += 1.0;
    }
    ticks
}

pub(crate) fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 2.5 {
        2.5
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// Format a tick value with as many decimals as the tick spacing needs.
pub(crate) fn fmt_tick(v: f64, step: f64) -> String {
    let dec = if step > 0.0 && step.is_finite() { (-(step.log10()).floor()).clamp(0.0, 6.0) as usize } else { 2 };
    // 2.5-steps need one more decimal than their magnitude suggests.
    let dec = if step > 0.0 && ((step / 10f64.powi(-(dec as i32))) * 2.0).round() % 2.0 != 0.0 { dec + 1 } else { dec };
    let s = format!("{v:.dec$}");
    if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
        s[1..].to_string()
    } else {
        s
    }
}

/// Format a value for a colour-bar end or a cell annotation with about 3 significant digits.
pub(crate) fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}").trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// The SVG written beside a PNG: same path, extension `.svg`.
pub(crate) fn svg_path(path: &Path) -> PathBuf {
    path.with_extension("svg")
}

/// A chart drawn the same way into a bitmap and an SVG: labels are collected while drawing and
/// rendered with the bundled font (PNG) or emitted as `<text>` (SVG).
pub(crate) trait Figure {
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, labels: &mut Vec<text::Label>) -> Result<()>;
}

/// Write `fig` as a PNG at `path` and, with `svg`, as an SVG beside it; both atomically.
pub(crate) fn write_figure(path: &Path, fig: &impl Figure, svg: bool) -> Result<()> {
    font::ensure()?;
    let (w, h) = fig.size();
    let mut raster = Raster::new(w, h, [255, 255, 255])?;
    let mut labels = Vec::new();
    raster.draw(|root| fig.draw(root, &mut labels))?;
    raster.draw_labels(&labels);
    write_atomic(path, &raster.to_png()?)?;
    if svg {
        let mut s = String::new();
        {
            let root = SVGBackend::with_string(&mut s, (w, h)).into_drawing_area();
            let mut labels = Vec::new();
            fig.draw(&root, &mut labels)?;
            text::emit(&root, &labels)?;
            root.present().map_err(pe)?;
        }
        write_atomic(&svg_path(path), s.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_type7() {
        let x = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile_sorted(&x, 0.5), 2.5);
        assert_eq!(quantile_sorted(&x, 0.25), 1.75);
        assert_eq!(quantile_sorted(&x, 1.0), 4.0);
    }

    #[test]
    fn nice_ticks_cover_range() {
        assert_eq!(nice_ticks(0.0, 100.0, 5), vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        assert_eq!(nice_ticks(-180.0, 180.0, 8), vec![-150.0, -100.0, -50.0, 0.0, 50.0, 100.0, 150.0]);
        assert_eq!(nice_ticks(0.0, 1.0, 4), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(fmt_tick(0.25, 0.25), "0.25");
        assert_eq!(fmt_tick(2.0, 0.5), "2.0");
        assert_eq!(fmt_tick(40.0, 20.0), "40");
    }
}
