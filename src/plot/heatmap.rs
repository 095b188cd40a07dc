//! A labelled heatmap with a colour bar: the class × angle accuracy figure.

use super::colormap::luminance;
use super::text::{put_text, Label};
use super::{
    fit_text, fmt_tick, fmt_value, inferno, nice_ticks, pe, rgb, text_size, write_figure, Figure, NONFINITE_RGB,
};
use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};
use std::path::Path;

/// A heatmap of `values` (row-major, rows = `y_labels`, columns = `x_labels`) in the inferno
/// colormap. Written as a PNG at `path`, and as an SVG beside it when `svg` is set.
#[derive(Clone, Debug, Default)]
pub struct Heatmap {
    pub title: String,
    /// Axis captions, e.g. "rotation angle (°)" and "class".
    pub x_label: String,
    pub y_label: String,
    /// One label per column (e.g. "-180°", …) and per row (e.g. class names).
    pub x_labels: Vec<String>,
    pub y_labels: Vec<String>,
    /// rows × cols values, row-major. Non-finite cells are painted [`NONFINITE_RGB`] and counted in
    /// a legend line under the plot.
    pub values: Vec<f64>,
    /// Colour-bar caption, e.g. "accuracy (%)".
    pub value_label: String,
    /// Colour range (lo < hi; values outside are clipped to the end colours); `None` uses the
    /// finite min and max.
    pub range: Option<(f64, f64)>,
    /// Print each value in its cell (black or white, whichever contrasts), when the cells are large
    /// enough for the text; silently skipped otherwise.
    pub annotate: bool,
    /// Also write an SVG (same path, extension `.svg`).
    pub svg: bool,
}

const TITLE_SIZE: f64 = 20.0;
const DESC_SIZE: f64 = 16.0;
const LABEL_SIZE: f64 = 13.0;
const ANNOT_SIZE: f64 = 12.0;
const TOP: u32 = 48;
const BAR_GAP: u32 = 22;
const BAR_W: u32 = 22;

struct Prepared {
    w: u32,
    h: u32,
    rows: usize,
    cols: usize,
    cell_w: u32,
    cell_h: u32,
    left: u32,
    rotate_x: bool,
    x_band: u32,
    x_labels: Vec<String>,
    y_labels: Vec<String>,
    range: (f64, f64),
    bar_ticks: Vec<f64>,
    bar_step: f64,
    tick_w: u32,
    annotations: Option<Vec<String>>,
    nonfinite: usize,
}

/// Draw a heatmap with a colour bar into `path` (PNG, plus SVG beside it if `spec.svg`).
pub fn heatmap(path: &Path, spec: &Heatmap) -> Result<()> {
    (|| -> Result<()> {
        let p = prepare(spec)?;
        write_figure(path, &(spec, &p), spec.svg)
    })()
    .with_context(|| format!("heatmap {}", path.display()))
}

impl Figure for (&Heatmap, &Prepared) {
    fn size(&self) -> (u32, u32) {
        (self.1.w, self.1.h)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, labels: &mut Vec<Label>) -> Result<()> {
        draw(root, self.0, self.1, labels)
    }
}

fn prepare(spec: &Heatmap) -> Result<Prepared> {
    let (rows, cols) = (spec.y_labels.len(), spec.x_labels.len());
    if rows == 0 || cols == 0 {
        bail!("empty heatmap: {rows} row labels × {cols} column labels");
    }
    if spec.values.len() != rows * cols {
        bail!("values has {} entries but y_labels × x_labels = {rows} × {cols} = {}", spec.values.len(), rows * cols);
    }
    let range = match spec.range {
        Some((lo, hi)) => {
            if !(lo.is_finite() && hi.is_finite() && lo < hi) {
                bail!("range ({lo}, {hi}) must be finite with lo < hi");
            }
            (lo, hi)
        }
        None => {
            let finite = spec.values.iter().copied().filter(|v| v.is_finite());
            let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
            if !lo.is_finite() {
                (0.0, 1.0)
            } else if hi <= lo {
                (lo - 0.5, hi + 0.5)
            } else {
                (lo, hi)
            }
        }
    };
    let nonfinite = spec.values.iter().filter(|v| !v.is_finite()).count();

    let cell_w = (800 / cols as u32).clamp(14, 64);
    let cell_h = (480 / rows as u32).clamp(14, 48);
    let x_labels: Vec<String> = spec.x_labels.iter().map(|s| fit_text(s, LABEL_SIZE, 140)).collect();
    let y_labels: Vec<String> = spec.y_labels.iter().map(|s| fit_text(s, LABEL_SIZE, 220)).collect();
    let x_lab_w = x_labels.iter().map(|s| text_size(s, LABEL_SIZE).0).max().unwrap_or(0);
    let y_lab_w = y_labels.iter().map(|s| text_size(s, LABEL_SIZE).0).max().unwrap_or(0);
    let rotate_x = x_lab_w + 6 > cell_w;
    let x_band = if rotate_x { x_lab_w + 12 } else { 24 };
    let left = 14 + if spec.y_label.is_empty() { 0 } else { 28 } + y_lab_w + 8;

    let bar_ticks = nice_ticks(range.0, range.1, 6);
    let bar_step = if bar_ticks.len() >= 2 { bar_ticks[1] - bar_ticks[0] } else { range.1 - range.0 };
    let tick_w = bar_ticks.iter().map(|&v| text_size(&fmt_tick(v, bar_step), LABEL_SIZE).0).max().unwrap_or(20);
    let bar_total = BAR_GAP + BAR_W + 6 + tick_w + 8 + if spec.value_label.is_empty() { 0 } else { 26 } + 12;
    let plot_w = cols as u32 * cell_w;
    let plot_h = rows as u32 * cell_h;
    let w = (left + plot_w + bar_total).max(text_size(&spec.title, TITLE_SIZE).0 + 40).max(420);
    let bottom = x_band + if spec.x_label.is_empty() { 0 } else { 28 } + if nonfinite > 0 { 28 } else { 0 } + 12;
    let h = TOP + plot_h + bottom;

    let annotations = if spec.annotate && cell_h as f64 >= ANNOT_SIZE + 3.0 {
        let span = range.1 - range.0;
        let dec = if span >= 20.0 {
            0
        } else if span >= 2.0 {
            1
        } else {
            2
        };
        let texts: Vec<String> = spec
            .values
            .iter()
            .map(|&v| {
                if !v.is_finite() || v.abs() >= 1e5 || (v != 0.0 && v.abs() < 1e-3) {
                    fmt_value(v)
                } else {
                    format!("{v:.dec$}")
                }
            })
            .collect();
        let fits = texts.iter().all(|t| text_size(t, ANNOT_SIZE).0 + 4 <= cell_w);
        fits.then_some(texts)
    } else {
        None
    };
    Ok(Prepared {
        w,
        h,
        rows,
        cols,
        cell_w,
        cell_h,
        left,
        rotate_x,
        x_band,
        x_labels,
        y_labels,
        range,
        bar_ticks,
        bar_step,
        tick_w,
        annotations,
        nonfinite,
    })
}

fn color_of(v: f64, (lo, hi): (f64, f64)) -> [u8; 3] {
    if v.is_finite() {
        inferno((v - lo) / (hi - lo))
    } else {
        NONFINITE_RGB
    }
}

fn fill_rect<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    x: i32,
    y: i32,
    w: i32,
    h: i32,
    c: [u8; 3],
) -> Result<()> {
    area.draw(&Rectangle::new([(x, y), (x + w, y + h)], rgb(c).filled())).map_err(pe)
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    spec: &Heatmap,
    p: &Prepared,
    labels: &mut Vec<Label>,
) -> Result<()> {
    root.fill(&WHITE).map_err(pe)?;
    let black = [0, 0, 0];
    let title = fit_text(&spec.title, TITLE_SIZE, p.w - 20);
    put_text(labels, &title, (p.w as i32 / 2, 14), TITLE_SIZE, black, HPos::Center, VPos::Top, false);
    let (x0, y0) = (p.left as i32, TOP as i32);
    let (cw, ch) = (p.cell_w as i32, p.cell_h as i32);
    let (pw, ph) = (cw * p.cols as i32, ch * p.rows as i32);

    // Cells.
    for r in 0..p.rows {
        for c in 0..p.cols {
            let v = spec.values[r * p.cols + c];
            let color = color_of(v, p.range);
            let (x, y) = (x0 + c as i32 * cw, y0 + r as i32 * ch);
            fill_rect(root, x, y, cw, ch, color)?;
            if let Some(texts) = &p.annotations {
                let tc = if luminance(color) > 0.5 { [0, 0, 0] } else { [255, 255, 255] };
                let t = &texts[r * p.cols + c];
                put_text(labels, t, (x + cw / 2, y + ch / 2), ANNOT_SIZE, tc, HPos::Center, VPos::Center, false);
            }
        }
    }
    root.draw(&Rectangle::new([(x0, y0), (x0 + pw, y0 + ph)], RGBColor(120, 120, 120).stroke_width(1))).map_err(pe)?;

    // Axis labels.
    let grey = [30, 30, 30];
    for (c, label) in p.x_labels.iter().enumerate() {
        let x = x0 + c as i32 * cw + cw / 2;
        if p.rotate_x {
            put_text(labels, label, (x, y0 + ph + 6), LABEL_SIZE, grey, HPos::Right, VPos::Center, true);
        } else {
            put_text(labels, label, (x, y0 + ph + 6), LABEL_SIZE, grey, HPos::Center, VPos::Top, false);
        }
    }
    for (r, label) in p.y_labels.iter().enumerate() {
        let y = y0 + r as i32 * ch + ch / 2;
        put_text(labels, label, (x0 - 8, y), LABEL_SIZE, grey, HPos::Right, VPos::Center, false);
    }
    let mut y = y0 + ph + p.x_band as i32;
    if !spec.x_label.is_empty() {
        put_text(labels, &spec.x_label, (x0 + pw / 2, y + 4), DESC_SIZE, black, HPos::Center, VPos::Top, false);
        y += 28;
    }
    put_text(labels, &spec.y_label, (16, y0 + ph / 2), DESC_SIZE, black, HPos::Center, VPos::Center, true);

    // Legend line for non-finite cells (only when there are any).
    if p.nonfinite > 0 {
        fill_rect(root, x0, y + 6, 14, 14, NONFINITE_RGB)?;
        root.draw(&Rectangle::new([(x0, y + 6), (x0 + 14, y + 20)], BLACK.stroke_width(1))).map_err(pe)?;
        let s = if p.nonfinite == 1 { "" } else { "s" };
        let text = format!("non-finite value (inf or NaN): {} cell{s}", p.nonfinite);
        put_text(labels, &text, (x0 + 22, y + 13), LABEL_SIZE, black, HPos::Left, VPos::Center, false);
    }

    // Colour bar.
    let bx = x0 + pw + BAR_GAP as i32;
    let bh = ph.max(2);
    for py in 0..bh {
        let t = 1.0 - py as f64 / (bh - 1) as f64;
        root.draw(&Rectangle::new([(bx, y0 + py), (bx + BAR_W as i32, y0 + py + 1)], rgb(inferno(t)).filled()))
            .map_err(pe)?;
    }
    root.draw(&Rectangle::new([(bx, y0), (bx + BAR_W as i32, y0 + bh)], BLACK.stroke_width(1))).map_err(pe)?;
    let (lo, hi) = p.range;
    for &v in &p.bar_ticks {
        let py = y0 + ((1.0 - (v - lo) / (hi - lo)) * (bh - 1) as f64).round() as i32;
        let tx = bx + BAR_W as i32;
        root.draw(&PathElement::new(vec![(tx, py), (tx + 4, py)], BLACK.stroke_width(1))).map_err(pe)?;
        put_text(labels, &fmt_tick(v, p.bar_step), (tx + 7, py), LABEL_SIZE, grey, HPos::Left, VPos::Center, false);
    }
    let lx = bx + BAR_W as i32 + 7 + p.tick_w as i32 + 16;
    put_text(labels, &spec.value_label, (lx, y0 + bh / 2), DESC_SIZE, black, HPos::Center, VPos::Center, true);
    Ok(())
}
