//! Colours: the inferno colormap, the colour for non-finite values, and the line palette.

/// Inferno (matplotlib's perceptually uniform map by N. Smith and S. van der Walt, CC0), sampled at
/// 33 evenly spaced anchors t = k/32 of its 256-entry table and rounded to 8 bits. Linear
/// interpolation between anchors stays within 1.5/255 of the full table.
const INFERNO: [[u8; 3]; 33] = [
    [0, 0, 4],
    [4, 3, 18],
    [11, 7, 36],
    [21, 11, 55],
    [33, 12, 74],
    [47, 10, 91],
    [61, 9, 101],
    [74, 12, 107],
    [87, 16, 110],
    [100, 21, 110],
    [113, 25, 110],
    [125, 30, 109],
    [138, 34, 106],
    [151, 39, 102],
    [163, 44, 97],
    [176, 49, 91],
    [188, 55, 84],
    [198, 61, 77],
    [208, 69, 69],
    [218, 78, 60],
    [227, 89, 51],
    [235, 100, 41],
    [241, 113, 31],
    [246, 126, 20],
    [249, 140, 10],
    [251, 155, 6],
    [252, 170, 15],
    [251, 186, 31],
    [249, 201, 50],
    [245, 217, 73],
    [242, 232, 101],
    [243, 245, 134],
    [252, 255, 164],
];

/// The inferno colormap: t = 0 is near-black `[0, 0, 4]`, t = 1 pale yellow `[252, 255, 164]`,
/// luminance increases monotonically. `t` is clamped to [0, 1]; NaN maps to t = 0 (callers draw
/// non-finite values in [`NONFINITE_RGB`] instead).
pub fn inferno(t: f64) -> [u8; 3] {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let x = t * (INFERNO.len() - 1) as f64;
    let i = (x.floor() as usize).min(INFERNO.len() - 2);
    let f = x - i as f64;
    let (a, b) = (INFERNO[i], INFERNO[i + 1]);
    std::array::from_fn(|k| (a[k] as f64 + (b[k] as f64 - a[k] as f64) * f).round() as u8)
}

/// The colour of non-finite values (inf, NaN) in heatmaps, strips and image grids: pure cyan,
/// which inferno, grey and the line palette never produce.
pub const NONFINITE_RGB: [u8; 3] = [0, 255, 255];

/// Line colours: the Okabe–Ito colour-blind-safe palette, reordered so that the first colours
/// contrast best on white (yellow last). `Series::color` indexes it modulo its length.
pub const PALETTE: [[u8; 3]; 8] = [
    [0, 114, 178],   // blue
    [213, 94, 0],    // vermillion
    [0, 158, 115],   // bluish green
    [204, 121, 167], // reddish purple
    [230, 159, 0],   // orange
    [86, 180, 233],  // sky blue
    [0, 0, 0],       // black
    [240, 228, 66],  // yellow
];

/// Relative luminance in [0, 1] (Rec. 709 weights on the 8-bit values, no gamma decoding): used
/// to pick black or white text over a coloured cell.
pub(crate) fn luminance(c: [u8; 3]) -> f64 {
    (0.2126 * c[0] as f64 + 0.7152 * c[1] as f64 + 0.0722 * c[2] as f64) / 255.0
}
