//! Line charts: accuracy vs angle, training curves, per-layer mean V (categorical x axis).

use super::text::{put_text, Label};
use super::{fit_text, fmt_tick, nice_ticks, pe, rgb, text_size, write_figure, Figure, PALETTE};
use anyhow::{bail, Context, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};
use std::path::Path;

/// One curve of a [`LineChart`].
#[derive(Clone, Debug, Default)]
pub struct Series {
    /// Legend entry; an empty name leaves the series out of the legend.
    pub name: String,
    /// x values. Empty means 0, 1, 2, … (handy with `categorical_x`); otherwise as long as `ys`.
    pub xs: Vec<f64>,
    /// y values; non-finite ones (and points with a non-finite x) are skipped, leaving a gap.
    pub ys: Vec<f64>,
    /// Dashed line (e.g. the unrotated model) instead of solid.
    pub dashed: bool,
    /// Index into [`PALETTE`] (modulo its length); `None` uses the series' own index.
    pub color: Option<usize>,
    /// Draw a dot at every point.
    pub markers: bool,
}

/// A line chart: written as a PNG at `path`, and as an SVG beside it (`.svg`) when `svg` is set.
#[derive(Clone, Debug, Default)]
pub struct LineChart {
    pub title: String,
    /// Axis captions, with units, e.g. "rotation angle (°)", "accuracy (%)".
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Fixed y range (lo < hi); `None` fits the finite data with 5% padding. Lines leaving the range
    /// are clipped at its edges.
    pub y_range: Option<(f64, f64)>,
    /// Explicit x tick positions (e.g. every 45°); `None` picks about 8 round values.
    pub x_ticks: Option<Vec<f64>>,
    /// Categorical x axis: positions 0..L labelled with these names (e.g. layer names), written
    /// vertically when they do not fit side by side. Overrides `x_ticks`.
    pub categorical_x: Option<Vec<String>>,
    /// Also write an SVG (same path, extension `.svg`).
    pub svg: bool,
}

const TITLE_SIZE: f64 = 22.0;
const DESC_SIZE: f64 = 17.0;
const TICK_SIZE: f64 = 14.0;
const LEGEND_SIZE: f64 = 15.0;
const TITLE_H: u32 = 46;
const CAT_LABEL_MAX_W: u32 = 170;

/// Everything computed before drawing: cleaned data, ranges, ticks and the layout.
struct Prepared {
    w: u32,
    h: u32,
    legend_w: u32,
    x_area: u32,
    y_area: u32,
    x_range: (f64, f64),
    y_range: (f64, f64),
    x_ticks: Vec<f64>,
    y_ticks: Vec<f64>,
    x_step: f64,
    y_step: f64,
    /// Per series: runs of consecutive drawable points, already clipped to the plot range.
    runs: Vec<Vec<Vec<(f64, f64)>>>,
    /// Categorical labels (fitted to width) and whether they are written vertically.
    cat: Option<(Vec<String>, bool)>,
}

/// Draw a line chart into `path` (PNG, plus SVG beside it if `spec.svg`). Errors name the path.
pub fn line_chart(path: &Path, spec: &LineChart) -> Result<()> {
    (|| -> Result<()> {
        let p = prepare(spec)?;
        write_figure(path, &(spec, &p), spec.svg)
    })()
    .with_context(|| format!("line chart {}", path.display()))
}

impl Figure for (&LineChart, &Prepared) {
    fn size(&self) -> (u32, u32) {
        (self.1.w, self.1.h)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, labels: &mut Vec<Label>) -> Result<()> {
        draw(root, self.0, self.1, labels)
    }
}

fn prepare(spec: &LineChart) -> Result<Prepared> {
    if spec.series.is_empty() {
        bail!("no series to plot");
    }
    // Validate and collect the points of every series.
    let mut pts: Vec<Vec<(f64, f64)>> = Vec::new();
    for (i, s) in spec.series.iter().enumerate() {
        if !s.xs.is_empty() && s.xs.len() != s.ys.len() {
            bail!("series {i} ({:?}) has {} x values but {} y values", s.name, s.xs.len(), s.ys.len());
        }
        let xs: Vec<f64> = if s.xs.is_empty() { (0..s.ys.len()).map(|k| k as f64).collect() } else { s.xs.clone() };
        pts.push(xs.into_iter().zip(s.ys.iter().copied()).collect());
    }
    if pts.iter().all(|p| p.is_empty()) {
        bail!("every series is empty");
    }
    let finite = |p: &(f64, f64)| p.0.is_finite() && p.1.is_finite();

    // x range and ticks.
    let cat_names = match &spec.categorical_x {
        Some(names) if names.is_empty() => bail!("categorical_x is given but empty"),
        other => other.clone(),
    };
    let (x_range, x_ticks) = if let Some(names) = &cat_names {
        ((-0.5, names.len() as f64 - 0.5), (0..names.len()).map(|k| k as f64).collect::<Vec<_>>())
    } else {
        let mut lo = f64::INFINITY;
        let mut hi = f64::NEG_INFINITY;
        for p in pts.iter().flatten().filter(|p| p.0.is_finite()) {
            lo = lo.min(p.0);
            hi = hi.max(p.0);
        }
        if let Some(t) = &spec.x_ticks {
            for &v in t.iter().filter(|v| v.is_finite()) {
                lo = lo.min(v);
                hi = hi.max(v);
            }
        }
        if !lo.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        if hi <= lo {
            (lo, hi) = (lo - 1.0, hi + 1.0);
        }
        let pad = (hi - lo) * 0.02;
        let range = (lo - pad, hi + pad);
        let ticks = match &spec.x_ticks {
            Some(t) => t.iter().copied().filter(|v| v.is_finite()).collect(),
            None => nice_ticks(lo, hi, 8),
        };
        (range, ticks)
    };

    // y range and ticks.
    let y_range = match spec.y_range {
        Some((lo, hi)) => {
            if !(lo.is_finite() && hi.is_finite() && lo < hi) {
                bail!("y_range ({lo}, {hi}) must be finite with lo < hi");
            }
            (lo, hi)
        }
        None => {
            let mut lo = f64::INFINITY;
            let mut hi = f64::NEG_INFINITY;
            for p in pts.iter().flatten().filter(|p| finite(p)) {
                lo = lo.min(p.1);
                hi = hi.max(p.1);
            }
            if !lo.is_finite() {
                (lo, hi) = (0.0, 1.0);
            }
            if hi <= lo {
                let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
                (lo, hi) = (lo - d, hi + d);
            }
            let pad = (hi - lo) * 0.05;
            (lo - pad, hi + pad)
        }
    };
    let y_ticks = nice_ticks(y_range.0, y_range.1, 6);
    let step = |t: &[f64], r: (f64, f64)| if t.len() >= 2 { t[1] - t[0] } else { (r.1 - r.0) / 5.0 };
    let (x_step, y_step) = (step(&x_ticks, x_range), step(&y_ticks, y_range));

    // Runs of finite points, clipped to the plot rectangle.
    let rect = (x_range.0, x_range.1, y_range.0, y_range.1);
    let runs = pts
        .iter()
        .map(|p| {
            let mut out = Vec::new();
            for run in p.split(|q| !finite(q)).filter(|r| !r.is_empty()) {
                out.extend(clip_polyline(run, rect));
            }
            out
        })
        .collect();

    // Layout.
    let legend_w = spec
        .series
        .iter()
        .filter(|s| !s.name.is_empty())
        .map(|s| text_size(&s.name, LEGEND_SIZE).0 + 92)
        .max()
        .unwrap_or(0)
        .min(340);
    let w = 900.max(740 + legend_w);
    let y_tick_w = y_ticks.iter().map(|&v| text_size(&fmt_tick(v, y_step), TICK_SIZE).0).max().unwrap_or(20);
    let y_area = y_tick_w + 16 + if spec.y_label.is_empty() { 0 } else { 28 };
    let x_desc_h = if spec.x_label.is_empty() { 0 } else { 28 };
    let (cat, x_area) = match cat_names {
        Some(names) => {
            let names: Vec<String> = names.iter().map(|n| fit_text(n, TICK_SIZE, CAT_LABEL_MAX_W)).collect();
            let plot_w = w.saturating_sub(legend_w + y_area + 40).max(100);
            let slot = plot_w / names.len() as u32;
            let max_w = names.iter().map(|n| text_size(n, TICK_SIZE).0).max().unwrap_or(0);
            let rotate = max_w + 6 > slot;
            let area = if rotate { max_w + 16 } else { 30 } + x_desc_h;
            (Some((names, rotate)), area)
        }
        None => (None, 30 + x_desc_h),
    };
    let h = 520 + x_area;
    Ok(Prepared { w, h, legend_w, x_area, y_area, x_range, y_range, x_ticks, y_ticks, x_step, y_step, runs, cat })
}

/// Split a polyline into the pieces inside `rect` = (x0, x1, y0, y1) (Liang–Barsky per segment).
fn clip_polyline(pts: &[(f64, f64)], rect: (f64, f64, f64, f64)) -> Vec<Vec<(f64, f64)>> {
    let inside = |p: (f64, f64)| p.0 >= rect.0 && p.0 <= rect.1 && p.1 >= rect.2 && p.1 <= rect.3;
    if pts.len() == 1 {
        return if inside(pts[0]) { vec![vec![pts[0]]] } else { vec![] };
    }
    let mut runs = Vec::new();
    let mut cur: Vec<(f64, f64)> = Vec::new();
    for w in pts.windows(2) {
        match clip_segment(w[0], w[1], rect) {
            None => {
                if !cur.is_empty() {
                    runs.push(std::mem::take(&mut cur));
                }
            }
            Some((a, b)) => {
                if cur.last() != Some(&a) {
                    if !cur.is_empty() {
                        runs.push(std::mem::take(&mut cur));
                    }
                    cur.push(a);
                }
                cur.push(b);
                if b != w[1] {
                    runs.push(std::mem::take(&mut cur));
                }
            }
        }
    }
    if !cur.is_empty() {
        runs.push(cur);
    }
    runs
}

fn clip_segment(a: (f64, f64), b: (f64, f64), r: (f64, f64, f64, f64)) -> Option<((f64, f64), (f64, f64))> {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let (mut t0, mut t1) = (0.0f64, 1.0f64);
    for (p, q) in [(-dx, a.0 - r.0), (dx, r.1 - a.0), (-dy, a.1 - r.2), (dy, r.3 - a.1)] {
        if p == 0.0 {
            if q < 0.0 {
                return None;
            }
        } else {
            let t = q / p;
            if p < 0.0 {
                t0 = t0.max(t);
            } else {
                t1 = t1.min(t);
            }
        }
    }
    if t0 > t1 {
        return None;
    }
    let at = |t: f64| {
        if t == 0.0 {
            a
        } else if t == 1.0 {
            b
        } else {
            (a.0 + t * dx, a.1 + t * dy)
        }
    };
    Some((at(t0), at(t1)))
}

/// A linear f64 axis whose grid lines and labels sit exactly at the given ticks.
struct TickAxis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ranged for TickAxis {
    type ValueType = f64;
    type FormatOption = DefaultFormatting;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let t = (v - self.lo) / (self.hi - self.lo);
        (limit.0 as f64 + t * (limit.1 - limit.0) as f64).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.iter().copied().filter(|t| *t >= self.lo && *t <= self.hi).collect()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    spec: &LineChart,
    p: &Prepared,
    labels: &mut Vec<Label>,
) -> Result<()> {
    root.fill(&WHITE).map_err(pe)?;
    let title = fit_text(&spec.title, TITLE_SIZE, p.w - 20);
    put_text(labels, &title, (p.w as i32 / 2, 14), TITLE_SIZE, [0, 0, 0], HPos::Center, VPos::Top, false);
    let (_, body) = root.split_vertically(TITLE_H);
    let (plot_area, legend_area) = body.split_horizontally(p.w - p.legend_w);

    let x_spec = TickAxis { lo: p.x_range.0, hi: p.x_range.1, ticks: p.x_ticks.clone() };
    let y_spec = TickAxis { lo: p.y_range.0, hi: p.y_range.1, ticks: p.y_ticks.clone() };
    let mut chart = ChartBuilder::on(&plot_area)
        .margin_top(6)
        .margin_right(24)
        .margin_left(10)
        .margin_bottom(6)
        .x_label_area_size(p.x_area)
        .y_label_area_size(p.y_area)
        .build_cartesian_2d(x_spec, y_spec)
        .map_err(pe)?;
    // Grid lines from the mesh; tick labels and captions are placed by hand (as labels).
    let blank = |_: &f64| String::new();
    chart
        .configure_mesh()
        .bold_line_style(RGBColor(222, 222, 222))
        .light_line_style(TRANSPARENT)
        .axis_style(RGBColor(60, 60, 60))
        .x_label_formatter(&blank)
        .y_label_formatter(&blank)
        .draw()
        .map_err(pe)?;
    let (xr, yr) = chart.plotting_area().get_pixel_range();
    let ink = [30, 30, 30];
    let in_range = |t: f64, r: (f64, f64)| t >= r.0 && t <= r.1;
    if let Some((names, rotate)) = &p.cat {
        // Categorical labels; long names stand vertically under their position.
        for (i, name) in names.iter().enumerate() {
            let (px, _) = chart.backend_coord(&(i as f64, p.y_range.0));
            if *rotate {
                put_text(labels, name, (px, yr.end + 8), TICK_SIZE, ink, HPos::Right, VPos::Center, true);
            } else {
                put_text(labels, name, (px, yr.end + 8), TICK_SIZE, ink, HPos::Center, VPos::Top, false);
            }
        }
    } else {
        for &t in p.x_ticks.iter().filter(|&&t| in_range(t, p.x_range)) {
            let (px, _) = chart.backend_coord(&(t, p.y_range.0));
            let text = fmt_tick(t, p.x_step);
            put_text(labels, &text, (px, yr.end + 7), TICK_SIZE, ink, HPos::Center, VPos::Top, false);
        }
    }
    for &t in p.y_ticks.iter().filter(|&&t| in_range(t, p.y_range)) {
        let (_, py) = chart.backend_coord(&(p.x_range.0, t));
        let text = fmt_tick(t, p.y_step);
        put_text(labels, &text, (xr.start - 8, py), TICK_SIZE, ink, HPos::Right, VPos::Center, false);
    }
    let black = [0, 0, 0];
    let xc = (xr.start + xr.end) / 2;
    put_text(labels, &spec.x_label, (xc, p.h as i32 - 10), DESC_SIZE, black, HPos::Center, VPos::Bottom, false);
    let yc = (yr.start + yr.end) / 2;
    put_text(labels, &spec.y_label, (22, yc), DESC_SIZE, black, HPos::Center, VPos::Center, true);

    // Series.
    for (i, (s, runs)) in spec.series.iter().zip(&p.runs).enumerate() {
        let color = rgb(PALETTE[s.color.unwrap_or(i) % PALETTE.len()]);
        let style = color.stroke_width(2);
        for run in runs {
            if run.len() == 1 && !s.markers {
                chart.draw_series(std::iter::once(Circle::new(run[0], 3, color.filled()))).map_err(pe)?;
            } else if s.dashed {
                chart.draw_series(DashedLineSeries::new(run.clone(), 9, 6, style)).map_err(pe)?;
            } else {
                chart.draw_series(LineSeries::new(run.clone(), style)).map_err(pe)?;
            }
            if s.markers {
                chart.draw_series(run.iter().map(|&q| Circle::new(q, 3, color.filled()))).map_err(pe)?;
            }
        }
    }

    // Legend, in its own column right of the plot so it never hides a curve.
    let entries: Vec<(usize, &Series)> = spec.series.iter().enumerate().filter(|(_, s)| !s.name.is_empty()).collect();
    if !entries.is_empty() {
        let row_h = 26;
        let (x0, y0) = (4, 10);
        let (ox, oy) = ((p.w - p.legend_w) as i32, TITLE_H as i32);
        let box_h = entries.len() as i32 * row_h + 10;
        legend_area
            .draw(&Rectangle::new(
                [(x0, y0), (p.legend_w as i32 - 12, y0 + box_h)],
                RGBColor(190, 190, 190).stroke_width(1),
            ))
            .map_err(pe)?;
        for (k, (i, s)) in entries.iter().enumerate() {
            let color = rgb(PALETTE[s.color.unwrap_or(*i) % PALETTE.len()]);
            let cy = y0 + 5 + row_h / 2 + k as i32 * row_h;
            let (lx0, lx1) = (x0 + 10, x0 + 54);
            if s.dashed {
                let mut x = lx0;
                while x < lx1 {
                    let xe = (x + 9).min(lx1);
                    legend_area.draw(&PathElement::new(vec![(x, cy), (xe, cy)], color.stroke_width(2))).map_err(pe)?;
                    x += 15;
                }
            } else {
                legend_area.draw(&PathElement::new(vec![(lx0, cy), (lx1, cy)], color.stroke_width(2))).map_err(pe)?;
            }
            if s.markers {
                legend_area.draw(&Circle::new(((lx0 + lx1) / 2, cy), 3, color.filled())).map_err(pe)?;
            }
            let name = fit_text(&s.name, LEGEND_SIZE, p.legend_w.saturating_sub(90));
            put_text(labels, &name, (ox + lx1 + 10, oy + cy), LEGEND_SIZE, black, HPos::Left, VPos::Center, false);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_splits_runs_at_the_range_edges() {
        let r = (0.0, 10.0, 0.0, 1.0);
        let runs = clip_polyline(&[(0.0, 0.5), (1.0, 1.5), (2.0, 0.5), (3.0, 0.5)], r);
        assert_eq!(runs, vec![vec![(0.0, 0.5), (0.5, 1.0)], vec![(1.5, 1.0), (2.0, 0.5), (3.0, 0.5)]]);
        assert!(clip_polyline(&[(0.0, 5.0), (1.0, 6.0)], r).is_empty());
        assert_eq!(clip_polyline(&[(1.0, 0.2)], r), vec![vec![(1.0, 0.2)]]);
    }
}
