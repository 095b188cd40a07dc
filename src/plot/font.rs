//! The one font every figure uses, compiled into the binary.
//!
//! PNG text is rasterized from it by `text.rs`; plotters (built with its `ab_glyph` text backend
//! only, no `ttf`/font-kit feature, so it never looks for system fonts) gets it registered for the
//! text measurements it makes while laying out SVGs. Text therefore renders the same on a bare
//! machine. The font is a subset of DejaVu Sans (Latin-1, Greek, dashes, arrows, a few math signs);
//! see `fonts/LICENSE`.

use anyhow::{bail, Result};
use plotters::style::FontStyle;
use std::sync::OnceLock;

/// DejaVu Sans, subset (see fonts/LICENSE).
pub(crate) static FONT_BYTES: &[u8] = include_bytes!("fonts/DejaVuSans-Subset.ttf");

/// The family name every text style in this module asks for.
pub(crate) const FAMILY: &str = "sans-serif";

/// Register the bundled font with plotters, once per process, under the generic family names
/// ("sans-serif", "serif", "monospace"), so any family a style asks for resolves to it.
pub(crate) fn ensure() -> Result<()> {
    static OK: OnceLock<bool> = OnceLock::new();
    let ok = *OK.get_or_init(|| {
        ["sans-serif", "serif", "monospace", "DejaVu Sans"]
            .iter()
            .all(|name| plotters::style::register_font(name, FontStyle::Normal, FONT_BYTES).is_ok())
    });
    if !ok {
        bail!("the bundled font (DejaVu Sans subset) could not be parsed");
    }
    Ok(())
}
