//! Per-layer heatmap strips of per-unit values (docs/measure.md): one panel per class, plus "all"
//! and "stratified"; in each panel one column per layer, one cell per unit.

use super::text::put_text;
use super::{fit_text, fmt_tick, fmt_value, font, inferno, nice_ticks, robust_upper, text_size, Raster, NONFINITE_RGB};
use crate::fsio::write_atomic;
use anyhow::{bail, Context, Result};
use plotters::style::text_anchor::{HPos, VPos};
use std::path::Path;

/// One panel of a [`Strips`] figure.
#[derive(Clone, Debug, Default)]
pub struct Panel {
    /// e.g. "class 3", "all", "stratified".
    pub title: String,
    /// (layer name, one value per unit), in network order, drawn left to right.
    pub layers: Vec<(String, Vec<f64>)>,
}

/// How a pixel row of a strip summarizes the units that fall in it, when a layer has more units
/// than the strip has pixel rows. (With fewer units every unit gets whole rows: nearest.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StripAggregate {
    /// Mean of the units in the row (the default): the column's average colour matches the layer's
    /// mean V, and a 25,088-unit layer does not look less invariant than a 10-unit one merely
    /// because it has more units per pixel. A row with any non-finite unit is painted non-finite.
    #[default]
    Mean,
    /// Maximum of the units in the row: the least invariant units stand out, but large layers
    /// look uniformly high (a row of 70 units shows roughly their 99th percentile). A row with any
    /// non-finite unit is painted non-finite.
    Max,
    /// The single unit at the row's centre: every pixel is a real unit value (an even subsample),
    /// but non-finite units between samples are not shown.
    Nearest,
}

/// A figure of heatmap-strip panels sharing one colour scale. PNG only.
///
/// Each layer is a column; its units are stacked top (unit 0) to bottom and stretched to the full
/// strip height, so every layer spans the same height whatever its unit count: a 10-unit layer has
/// 10 tall cells (with thin grey separators when cells are at least 8 px tall), a 25,088-unit layer
/// many thin ones. When a layer has more units than the strip has pixel rows, each pixel row
/// summarizes its units as `aggregate` says (mean by default; non-finite units are never hidden by
/// `Mean` or `Max`).
#[derive(Clone, Debug, Default)]
pub struct Strips {
    pub title: String,
    pub panels: Vec<Panel>,
    /// Colour-bar caption, e.g. "V (normalized variance)".
    pub value_label: String,
    /// Colour limits; `None` uses [0, [`robust_upper`] of all finite values of all panels].
    /// Values above the upper limit are clipped to the top colour, below the lower to the bottom.
    pub range: Option<(f64, f64)>,
    /// Panels per row; `None` picks a balanced grid (e.g. 12 panels → 4 × 3).
    pub panel_cols: Option<usize>,
    /// How pixel rows summarize several units (see [`StripAggregate`]).
    pub aggregate: StripAggregate,
}

const TITLE_SIZE: f64 = 22.0;
const PANEL_TITLE_SIZE: f64 = 15.0;
const LAYER_SIZE: f64 = 11.0;
const FOOT_SIZE: f64 = 13.0;
const LAYER_LABEL_MAX: u32 = 110;
const MAX_W: u32 = 2400;
const MAX_H: u32 = 1600;
const LEFT: u32 = 14;
const GAP_X: u32 = 28;
const GAP_Y: u32 = 14;
const TOP: u32 = 46;
const PANEL_TITLE_H: u32 = 24;
const FOOTER: u32 = 56;

/// Draw heatmap strips into `path` (PNG). Errors name the path.
pub fn heatmap_strips(path: &Path, spec: &Strips) -> Result<()> {
    (|| -> Result<()> {
        font::ensure()?;
        let raster = render(spec)?;
        write_atomic(path, &raster.to_png()?)
    })()
    .with_context(|| format!("heatmap strips {}", path.display()))
}

/// The value shown by pixel row `r` of `rows` for a layer's units: with fewer units than rows the
/// unit under it (each unit spans whole rows); otherwise the units [r·n/rows, (r+1)·n/rows)
/// summarized by `agg`, a non-finite unit winning for `Mean` and `Max`.
fn row_value(units: &[f64], r: usize, rows: usize, agg: StripAggregate) -> f64 {
    let n = units.len();
    let lo = r * n / rows;
    let hi = ((r + 1) * n / rows).max(lo + 1).min(n);
    if hi - lo == 1 {
        return units[lo];
    }
    if agg == StripAggregate::Nearest {
        return units[(lo + hi) / 2];
    }
    let (mut m, mut sum) = (f64::NEG_INFINITY, 0.0);
    for &v in &units[lo..hi] {
        if !v.is_finite() {
            return v;
        }
        m = m.max(v);
        sum += v;
    }
    match agg {
        StripAggregate::Max => m,
        _ => sum / (hi - lo) as f64,
    }
}

fn render(spec: &Strips) -> Result<Raster> {
    let np = spec.panels.len();
    if np == 0 {
        bail!("no panels to plot");
    }
    for (i, p) in spec.panels.iter().enumerate() {
        if p.layers.is_empty() {
            bail!("panel {i} ({:?}) has no layers", p.title);
        }
    }
    let all = || spec.panels.iter().flat_map(|p| p.layers.iter().flat_map(|l| l.1.iter().copied()));
    let (lo, hi, limit_note) = match spec.range {
        Some((lo, hi)) => {
            if !(lo.is_finite() && hi.is_finite() && lo < hi) {
                bail!("range ({lo}, {hi}) must be finite with lo < hi");
            }
            (lo, hi, "given".to_string())
        }
        None => {
            let finite: Vec<f64> = all().filter(|v| v.is_finite()).collect();
            let up = robust_upper(&finite);
            let up = if up > 0.0 { up } else { 1.0 };
            (0.0, up, "median + 3·IQR of all finite values in all panels".to_string())
        }
    };
    let (n_pinf, n_ninf, n_nan) = all().fold((0usize, 0usize, 0usize), |(a, b, c), v| {
        (a + (v == f64::INFINITY) as usize, b + (v == f64::NEG_INFINITY) as usize, c + v.is_nan() as usize)
    });
    let n_clipped = all().filter(|v| v.is_finite() && *v > hi).count();

    // Layout.
    let pc = match spec.panel_cols {
        Some(c) => c.clamp(1, np),
        None => {
            let c = ((2 * np) as f64).sqrt().ceil() as usize;
            let r = np.div_ceil(c.clamp(1, np));
            np.div_ceil(r)
        }
    };
    let pr = np.div_ceil(pc);
    let l_max = spec.panels.iter().map(|p| p.layers.len()).max().unwrap_or(1) as u32;
    let label_w = spec
        .panels
        .iter()
        .flat_map(|p| p.layers.iter())
        .map(|l| text_size(&fit_text(&l.0, LAYER_SIZE, LAYER_LABEL_MAX), LAYER_SIZE).0)
        .max()
        .unwrap_or(0);
    let label_h = label_w + 10;

    let bar_ticks = nice_ticks(lo, hi, 8);
    let bar_step = if bar_ticks.len() >= 2 { bar_ticks[1] - bar_ticks[0] } else { hi - lo };
    let tick_w = bar_ticks.iter().map(|&v| text_size(&fmt_tick(v, bar_step), FOOT_SIZE).0).max().unwrap_or(20);
    let cb_w = 24 + 20 + 8 + tick_w.max(text_size(&fmt_value(hi), FOOT_SIZE).0) + 12 + 26 + 10;

    let avail_w = MAX_W.saturating_sub(LEFT + cb_w + (pc as u32 - 1) * GAP_X) / pc as u32;
    let col_w = (avail_w / l_max).clamp(8, 44);
    let panel_w = (l_max * col_w).max(80);
    let fixed_h = TOP + FOOTER + pr as u32 * (PANEL_TITLE_H + label_h + GAP_Y);
    let strip_h = (MAX_H.saturating_sub(fixed_h) / pr as u32).clamp(80, 360);
    let row_h = PANEL_TITLE_H + strip_h + label_h + GAP_Y;

    let foot1 = format!(
        "Colour limits [{}, {}] ({limit_note}); {n_clipped} value{} above the upper limit drawn in the top colour.",
        fmt_value(lo),
        fmt_value(hi),
        if n_clipped == 1 { "" } else { "s" }
    );
    let nonfinite = n_pinf + n_ninf + n_nan;
    let foot2 = format!(
        "Columns = layers; units stacked top to bottom and stretched to full height (a pixel row shows the {} of its units). \
         Non-finite: {}",
        match spec.aggregate {
            StripAggregate::Mean => "mean",
            StripAggregate::Max => "max",
            StripAggregate::Nearest => "middle one",
        },
        if nonfinite == 0 {
            "none".to_string()
        } else {
            format!("+inf {n_pinf}, -inf {n_ninf}, NaN {n_nan}")
        }
    );
    let foot_w = text_size(&foot1, FOOT_SIZE).0.max(text_size(&foot2, FOOT_SIZE).0) + 60;
    let w = (LEFT + pc as u32 * panel_w + (pc as u32 - 1) * GAP_X + cb_w)
        .max(foot_w)
        .max(text_size(&spec.title, TITLE_SIZE).0 + 40);
    let h = TOP + pr as u32 * row_h + FOOTER;
    let mut img = Raster::new(w, h, [255, 255, 255])?;
    let color = |v: f64| if v.is_finite() { inferno((v - lo) / (hi - lo)) } else { NONFINITE_RGB };

    // Cells, straight into the pixel buffer.
    let gap = if col_w >= 12 { 2 } else { 1 };
    let panel_origin = |i: usize| {
        let (r, c) = (i / pc, i % pc);
        (LEFT + c as u32 * (panel_w + GAP_X), TOP + r as u32 * row_h + PANEL_TITLE_H)
    };
    for (i, panel) in spec.panels.iter().enumerate() {
        let (px, py) = panel_origin(i);
        for (j, (_, units)) in panel.layers.iter().enumerate() {
            let x0 = px + j as u32 * col_w;
            let x1 = x0 + col_w - gap;
            if units.is_empty() {
                img.fill(x0, py, x1, py + strip_h, [225, 225, 225]);
                continue;
            }
            let n = units.len();
            let rows = strip_h as usize;
            let separators = n * 8 <= rows;
            for r in 0..rows {
                let mut c = color(row_value(units, r, rows, spec.aggregate));
                if separators && r > 0 && r * n / rows != (r - 1) * n / rows {
                    c = [150, 150, 150];
                }
                img.fill(x0, py + r as u32, x1, py + r as u32 + 1, c);
            }
        }
    }

    // Colour bar spanning the strips of the first panel row.
    let bx = w - cb_w + 24;
    let by = TOP + PANEL_TITLE_H;
    let bh = strip_h;
    for r in 0..bh {
        let t = 1.0 - r as f64 / (bh - 1) as f64;
        img.fill(bx, by + r, bx + 20, by + r + 1, inferno(t));
    }
    let frame = [0, 0, 0];
    img.fill(bx - 1, by - 1, bx + 21, by, frame);
    img.fill(bx - 1, by + bh, bx + 21, by + bh + 1, frame);
    img.fill(bx - 1, by, bx, by + bh, frame);
    img.fill(bx + 20, by, bx + 21, by + bh, frame);
    let tick_y = |v: f64| by + ((1.0 - (v - lo) / (hi - lo)) * (bh - 1) as f64).round() as u32;
    for &v in &bar_ticks {
        let y = tick_y(v);
        img.fill(bx + 20, y, bx + 25, y + 1, frame);
    }
    let swatch_y = by + bh + 30;
    if nonfinite > 0 {
        img.fill(bx - 1, swatch_y - 1, bx + 21, swatch_y + 21, frame);
        img.fill(bx, swatch_y, bx + 20, swatch_y + 20, NONFINITE_RGB);
    }
    let foot_y = TOP + pr as u32 * row_h + 8;
    if nonfinite > 0 {
        img.fill(LEFT - 1, foot_y + 21, LEFT + 13, foot_y + 35, frame);
        img.fill(LEFT, foot_y + 22, LEFT + 12, foot_y + 34, NONFINITE_RGB);
    }

    // Text.
    {
        let mut labels = Vec::new();
        let root = &mut labels;
        let black = [0, 0, 0];
        let title = fit_text(&spec.title, TITLE_SIZE, w - 20);
        put_text(root, &title, (w as i32 / 2, 12), TITLE_SIZE, black, HPos::Center, VPos::Top, false);
        let every = (12 / col_w as usize).max(1);
        for (i, panel) in spec.panels.iter().enumerate() {
            let (px, py) = panel_origin(i);
            let pt = fit_text(&panel.title, PANEL_TITLE_SIZE, panel_w + GAP_X - 4);
            let tx = px as i32 + (panel.layers.len() as u32 * col_w).max(40) as i32 / 2;
            put_text(root, &pt, (tx, py as i32 - 4), PANEL_TITLE_SIZE, black, HPos::Center, VPos::Bottom, false);
            for (j, (name, _)) in panel.layers.iter().enumerate() {
                if j % every != 0 {
                    continue;
                }
                let name = fit_text(name, LAYER_SIZE, LAYER_LABEL_MAX);
                let x = (px + j as u32 * col_w + (col_w - gap) / 2) as i32;
                let y = (py + strip_h + 5) as i32;
                put_text(root, &name, (x, y), LAYER_SIZE, [40, 40, 40], HPos::Right, VPos::Center, true);
            }
        }
        for &v in &bar_ticks {
            let y = tick_y(v) as i32;
            let text = fmt_tick(v, bar_step);
            put_text(root, &text, (bx as i32 + 28, y), FOOT_SIZE, black, HPos::Left, VPos::Center, false);
        }
        let lx = (w - 22) as i32;
        put_text(root, &spec.value_label, (lx, (by + bh / 2) as i32), 16.0, black, HPos::Center, VPos::Center, true);
        put_text(
            root,
            "clipped above",
            (bx as i32 + 10, by as i32 - 16),
            11.0,
            black,
            HPos::Center,
            VPos::Bottom,
            false,
        );
        put_text(
            root,
            &format!("≥ {}", fmt_value(hi)),
            (bx as i32 + 10, by as i32 - 4),
            11.0,
            black,
            HPos::Center,
            VPos::Bottom,
            false,
        );
        if nonfinite > 0 {
            put_text(
                root,
                "non-finite",
                (bx as i32 + 10, (swatch_y + 24) as i32),
                11.0,
                black,
                HPos::Center,
                VPos::Top,
                false,
            );
        }
        put_text(root, &foot1, (LEFT as i32, foot_y as i32 + 8), FOOT_SIZE, black, HPos::Left, VPos::Center, false);
        let f2x = if nonfinite > 0 { LEFT as i32 + 20 } else { LEFT as i32 };
        put_text(root, &foot2, (f2x, foot_y as i32 + 28), FOOT_SIZE, black, HPos::Left, VPos::Center, false);
        img.draw_labels(&labels);
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_take_the_nearest_unit_or_summarize_and_keep_non_finite() {
        use StripAggregate::*;
        let few = [1.0, 2.0];
        assert_eq!((0..4).map(|r| row_value(&few, r, 4, Mean)).collect::<Vec<_>>(), vec![1.0, 1.0, 2.0, 2.0]);
        let many = [1.0, 5.0, 2.0, 3.0, f64::INFINITY, 0.0];
        assert_eq!((0..3).map(|r| row_value(&many, r, 3, Max)).collect::<Vec<_>>(), vec![5.0, 3.0, f64::INFINITY]);
        assert_eq!((0..3).map(|r| row_value(&many, r, 3, Mean)).collect::<Vec<_>>(), vec![3.0, 2.5, f64::INFINITY]);
        assert_eq!((0..3).map(|r| row_value(&many, r, 3, Nearest)).collect::<Vec<_>>(), vec![5.0, 3.0, 0.0]);
        assert!(row_value(&[f64::NAN, 1.0], 0, 1, Mean).is_nan());
    }
}
