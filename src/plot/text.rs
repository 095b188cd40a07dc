//! Text: laid out and rasterized here with ab_glyph from the bundled font.
//!
//! Figures collect their text as [`Label`]s while drawing. For PNGs the labels are rasterized
//! straight into the pixel buffer ([`Raster::draw_labels`]) with sub-pixel glyph positions, side
//! bearings and kerning (plotters' own ab_glyph text path drops the bearings and rounds each glyph
//! to whole pixels, which makes letter spacing uneven); for SVGs they become `<text>` elements via
//! plotters ([`emit`]).

use super::font::{FAMILY, FONT_BYTES};
use super::{pe, rgb, Raster};
use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use anyhow::Result;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::sync::OnceLock;

fn font() -> &'static FontRef<'static> {
    static FONT: OnceLock<FontRef<'static>> = OnceLock::new();
    // The bytes are compiled in and checked by a test; parsing cannot fail at run time.
    FONT.get_or_init(|| FontRef::try_from_slice(FONT_BYTES).expect("bundled font parses"))
}

/// One piece of text: anchored at pixel (x, y) by (h, v); `rotated` reads bottom to top.
#[derive(Clone)]
pub(crate) struct Label {
    pub text: String,
    pub x: i32,
    pub y: i32,
    pub size: f64,
    pub color: [u8; 3],
    pub h: HPos,
    pub v: VPos,
    pub rotated: bool,
}

/// Queue `text` at (x, y) of size `size` (pixels from descent to ascent).
#[allow(clippy::too_many_arguments)]
pub(crate) fn put_text(
    labels: &mut Vec<Label>,
    text: &str,
    (x, y): (i32, i32),
    size: f64,
    color: [u8; 3],
    h: HPos,
    v: VPos,
    rotated: bool,
) {
    if !text.is_empty() {
        labels.push(Label { text: text.to_string(), x, y, size, color, h, v, rotated });
    }
}

/// Glyph ids and pen x positions (pixels, from the start) of `text`, and the total advance.
fn layout(text: &str, size: f64) -> (Vec<(ab_glyph::GlyphId, f32)>, f32) {
    let f = font().as_scaled(PxScale::from(size as f32));
    let mut x = 0.0f32;
    let mut prev = None;
    let mut glyphs = Vec::with_capacity(text.len());
    for c in text.chars() {
        let id = f.glyph_id(c);
        if let Some(p) = prev {
            x += f.kern(p, id);
        }
        glyphs.push((id, x));
        x += f.h_advance(id);
        prev = Some(id);
    }
    (glyphs, x)
}

/// Width and height in pixels of `text` set horizontally at `size` (height = ascent − descent).
pub(crate) fn measure(text: &str, size: f64) -> (u32, u32) {
    if text.is_empty() {
        return (0, size.ceil() as u32);
    }
    (layout(text, size).1.ceil() as u32, size.ceil() as u32)
}

impl Raster {
    /// Rasterize labels over the current pixels (alpha-blended by glyph coverage).
    pub(crate) fn draw_labels(&mut self, labels: &[Label]) {
        let f = font();
        for l in labels {
            let scale = PxScale::from(l.size as f32);
            let sf = f.as_scaled(scale);
            let (glyphs, width) = layout(&l.text, l.size);
            let (ascent, descent) = (sf.ascent(), sf.descent());
            // Local frame: x along the text, y down; (0, 0) is the anchor point.
            let x0 = match l.h {
                HPos::Left => 0.0,
                HPos::Center => -width / 2.0,
                HPos::Right => -width,
            };
            let baseline = match l.v {
                VPos::Top => ascent,
                VPos::Center => (ascent + descent) / 2.0,
                VPos::Bottom => descent,
            };
            for (id, gx) in glyphs {
                let glyph = id.with_scale_and_position(scale, point(x0 + gx, baseline));
                let Some(outline) = f.outline_glyph(glyph) else { continue };
                let b = outline.px_bounds();
                let (bx, by) = (b.min.x as i32, b.min.y as i32);
                outline.draw(|px, py, cov| {
                    let (lx, ly) = (bx + px as i32, by + py as i32);
                    // Rotated: local +x points up the image, local +y to the right.
                    let (dx, dy) = if l.rotated { (ly, -lx) } else { (lx, ly) };
                    let (x, y) = (l.x + dx, l.y + dy);
                    if x >= 0 && y >= 0 && (x as u32) < self.w && (y as u32) < self.h {
                        self.blend(x as u32, y as u32, l.color, cov.clamp(0.0, 1.0));
                    }
                });
            }
        }
    }

    fn blend(&mut self, x: u32, y: u32, c: [u8; 3], a: f32) {
        let i = (y as usize * self.w as usize + x as usize) * 3;
        for k in 0..3 {
            let old = self.buf[i + k] as f32;
            self.buf[i + k] = (old + (c[k] as f32 - old) * a).round() as u8;
        }
    }
}

/// Draw labels through plotters (for the SVG backend, where they become `<text>` elements).
pub(crate) fn emit<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, labels: &[Label]) -> Result<()> {
    for l in labels {
        let font = FontDesc::new(FontFamily::Name(FAMILY), l.size, FontStyle::Normal);
        let font = if l.rotated { font.transform(FontTransform::Rotate270) } else { font };
        let style = TextStyle { font, color: rgb(l.color).to_backend_color(), pos: Pos::new(l.h, l.v) };
        area.draw_text(&l.text, &style, (l.x, l.y)).map_err(pe)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_font_has_the_glyphs_figures_use() {
        let f = font();
        for c in "Aa0°×·±−–…∞≤≥σμΔ→".chars() {
            assert_ne!(f.glyph_id(c).0, 0, "no glyph for {c:?}");
        }
        let (w, h) = measure("accuracy (%)", 16.0);
        assert!(w > 60 && w < 140 && h == 16, "{w}×{h}");
        assert!(measure("WWW", 16.0).0 > measure("iii", 16.0).0);
    }

    #[test]
    fn labels_rasterize_where_anchored() {
        let mut r = Raster::new(100, 100, [255; 3]).unwrap();
        let mut labels = Vec::new();
        put_text(&mut labels, "Hi", (50, 50), 20.0, [0; 3], HPos::Left, VPos::Top, false);
        r.draw_labels(&labels);
        let ink: Vec<(usize, usize)> =
            (0..100 * 100).filter(|i| r.buf[i * 3] < 128).map(|i| (i % 100, i / 100)).collect();
        assert!(!ink.is_empty());
        assert!(ink.iter().all(|&(x, y)| (50..75).contains(&x) && (50..70).contains(&y)), "{ink:?}");
        // Rotated text reading upward ends at the anchor and extends upward from it.
        let mut r = Raster::new(100, 100, [255; 3]).unwrap();
        let mut labels = Vec::new();
        put_text(&mut labels, "Hello", (50, 50), 20.0, [0; 3], HPos::Left, VPos::Center, true);
        r.draw_labels(&labels);
        let ink: Vec<(usize, usize)> =
            (0..100 * 100).filter(|i| r.buf[i * 3] < 128).map(|i| (i % 100, i / 100)).collect();
        assert!(ink.iter().all(|&(x, y)| (38..62).contains(&x) && y <= 51), "{ink:?}");
        assert!(ink.iter().any(|&(_, y)| y < 20));
    }
}
