//! The plotting module: decoded PNGs have the expected size and colours, text renders from the
//! bundled font, bad inputs are errors naming the file, and writes leave no temporary files.

use rotvar::plot::*;
use std::path::{Path, PathBuf};

struct Png {
    w: usize,
    h: usize,
    rgb: Vec<u8>,
}

impl Png {
    fn read(path: &Path) -> Png {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        buf.truncate(info.buffer_size());
        Png { w: info.width as usize, h: info.height as usize, rgb: buf }
    }
    fn at(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.w + x) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }
    fn count(&self, c: [u8; 3]) -> usize {
        self.rgb.chunks_exact(3).filter(|p| *p == c).count()
    }
    fn count_in_rows(&self, c: [u8; 3], y0: usize, y1: usize) -> usize {
        self.rgb[y0 * self.w * 3..y1.min(self.h) * self.w * 3].chunks_exact(3).filter(|p| *p == c).count()
    }
    /// Mean row of the pixels of colour `c`.
    fn mean_y(&self, c: [u8; 3]) -> f64 {
        let (mut n, mut s) = (0usize, 0usize);
        for (i, p) in self.rgb.chunks_exact(3).enumerate() {
            if p == c {
                n += 1;
                s += i / self.w;
            }
        }
        s as f64 / n.max(1) as f64
    }
    /// Pixels in rows [y0, y1) that are not white.
    fn ink_in_rows(&self, y0: usize, y1: usize) -> usize {
        (y0..y1.min(self.h))
            .flat_map(|y| (0..self.w).map(move |x| (x, y)))
            .filter(|&(x, y)| self.at(x, y) != [255; 3])
            .count()
    }
}

fn no_temp_files(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.contains(".tmp"), "temporary file left behind: {name}");
    }
}

fn err_text(r: anyhow::Result<()>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

fn angles(k: usize) -> Vec<f64> {
    (0..k).map(|i| -180.0 + 360.0 * i as f64 / k as f64).collect()
}

fn accuracy_chart(title: &str) -> LineChart {
    let xs = angles(16);
    let rotated: Vec<f64> = xs.iter().map(|a| 97.0 + (a / 57.3).cos()).collect();
    let mut plain: Vec<f64> = xs.iter().map(|a| 56.0 + 43.0 * (a / 57.3).cos()).collect();
    plain[3] = f64::NAN;
    plain[4] = f64::INFINITY;
    LineChart {
        title: title.into(),
        x_label: "rotation angle (°)".into(),
        y_label: "accuracy (%)".into(),
        series: vec![
            Series {
                name: "rotated model".into(),
                xs: xs.clone(),
                ys: rotated,
                color: Some(0),
                markers: true,
                ..Default::default()
            },
            Series { name: "unrotated model".into(), xs, ys: plain, dashed: true, color: Some(1), markers: true },
        ],
        y_range: Some((0.0, 100.0)),
        x_ticks: Some(vec![-180.0, -135.0, -90.0, -45.0, 0.0, 45.0, 90.0, 135.0, 180.0]),
        categorical_x: None,
        svg: true,
    }
}

#[test]
fn inferno_endpoints_and_monotone_luminance() {
    assert_eq!(inferno(0.0), [0, 0, 4]);
    assert_eq!(inferno(1.0), [252, 255, 164]);
    assert_eq!(inferno(-3.0), inferno(0.0));
    assert_eq!(inferno(7.0), inferno(1.0));
    assert_eq!(inferno(f64::NAN), inferno(0.0));
    let lum = |c: [u8; 3]| 0.2126 * c[0] as f64 + 0.7152 * c[1] as f64 + 0.0722 * c[2] as f64;
    // Luminance rises between any two points 0.01 apart; on a finer grid only 8-bit rounding
    // (under 1 unit) can make it dip.
    for k in 0..100 {
        let (a, b) = (k as f64 / 100.0, (k + 1) as f64 / 100.0);
        assert!(lum(inferno(b)) > lum(inferno(a)), "luminance does not rise from t = {a} to {b}");
    }
    let mut prev = -1.0;
    for k in 0..=1000 {
        let l = lum(inferno(k as f64 / 1000.0));
        assert!(l >= prev - 1.0, "luminance drops at t = {}", k as f64 / 1000.0);
        prev = l;
    }
    assert!(lum(inferno(0.5)) > lum(inferno(0.25)) + 10.0);
    // The non-finite colour and palette are outside the colormap.
    for k in 0..=1000 {
        assert_ne!(inferno(k as f64 / 1000.0), NONFINITE_RGB);
    }
    assert!(!PALETTE.contains(&NONFINITE_RGB));
}

#[test]
fn robust_upper_on_known_data() {
    let v: Vec<f64> = (1..=9).map(|k| k as f64).collect();
    // type-7 quartiles of 1..9: q1 = 3, median = 5, q3 = 7 → 5 + 3·4.
    assert_eq!(robust_upper(&v), 17.0);
    let mut w = v.clone();
    w.extend([f64::NAN, f64::INFINITY, f64::NEG_INFINITY]);
    assert_eq!(robust_upper(&w), 17.0, "non-finite values are ignored");
    // 1, 2, 3, 4: q1 = 1.75, median 2.5, q3 = 3.25 → 2.5 + 4.5.
    assert_eq!(robust_upper(&[4.0, 1.0, 3.0, 2.0]), 7.0);
    assert_eq!(robust_upper(&[]), 1.0);
    assert_eq!(robust_upper(&[f64::NAN, f64::INFINITY]), 1.0);
    assert_eq!(robust_upper(&[2.5; 7]), 2.5, "constant input: the constant");
    assert_eq!(robust_upper(&[0.0, 0.0, 0.0, 0.0, 0.0, 5.0]), 5.0, "IQR 0: the max");
    // An outlier does not move the limit much.
    let mut o = v.clone();
    o.push(1e9);
    assert!(robust_upper(&o) < 25.0);
}

#[test]
fn line_chart_writes_png_and_svg_with_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acc.png");
    line_chart(&path, &accuracy_chart("Accuracy vs rotation angle")).unwrap();
    let png = Png::read(&path);
    assert!(png.w >= 900 && png.w <= 1300 && png.h >= 500 && png.h <= 800, "{}×{}", png.w, png.h);
    // The title band (top 40 rows) holds the title's ink; with no title it is blank.
    assert!(png.ink_in_rows(0, 40) > 200, "no title text rendered");
    let blank = dir.path().join("blank.png");
    line_chart(&blank, &accuracy_chart("")).unwrap();
    assert_eq!(Png::read(&blank).ink_in_rows(0, 40), 0);
    // Both series' colours are drawn.
    assert!(png.count(PALETTE[0]) > 300 && png.count(PALETTE[1]) > 150);
    let svg = std::fs::read_to_string(dir.path().join("acc.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("Accuracy vs rotation angle") && svg.contains("unrotated model"));
    no_temp_files(dir.path());
}

#[test]
fn line_chart_handles_non_finite_and_categorical_axes() {
    let dir = tempfile::tempdir().unwrap();
    // All-NaN series, an infinite x, and a series wholly outside the fixed range: no panic.
    let chart = LineChart {
        title: "gaps".into(),
        series: vec![
            Series { name: "all NaN".into(), ys: vec![f64::NAN; 5], ..Default::default() },
            Series {
                name: "partly".into(),
                xs: vec![0.0, f64::INFINITY, 2.0, 3.0],
                ys: vec![1.0, 2.0, f64::NAN, 4.0],
                ..Default::default()
            },
            Series { name: "outside".into(), ys: vec![50.0, 60.0], ..Default::default() },
        ],
        y_range: Some((0.0, 5.0)),
        ..Default::default()
    };
    line_chart(&dir.path().join("gaps.png"), &chart).unwrap();
    let no_range = LineChart { y_range: None, series: vec![chart.series[0].clone()], ..chart.clone() };
    line_chart(&dir.path().join("nan.png"), &no_range).unwrap();

    // Per-layer mean V: categorical x with long layer names, rotated solid, unrotated dashed.
    let layers: Vec<String> = (0..14).map(|i| format!("layer{}.block{}.conv.post_activation", i / 3, i % 3)).collect();
    let v = |s: f64| (0..14).map(|i| s * (1.0 + i as f64 / 10.0)).collect::<Vec<_>>();
    let chart = LineChart {
        title: "Mean V per layer".into(),
        x_label: "layer".into(),
        y_label: "mean V".into(),
        series: vec![
            Series { name: "rotated".into(), ys: v(0.5), markers: true, color: Some(0), ..Default::default() },
            Series {
                name: "unrotated".into(),
                ys: v(1.0),
                markers: true,
                dashed: true,
                color: Some(0),
                ..Default::default()
            },
        ],
        categorical_x: Some(layers),
        ..Default::default()
    };
    let path = dir.path().join("layers.png");
    line_chart(&path, &chart).unwrap();
    let png = Png::read(&path);
    assert!(png.h > 600, "rotated layer labels need a taller figure, got {}", png.h);
    // Labels stand vertically: the band under the plot has ink well below the axis.
    assert!(png.ink_in_rows(png.h - 140, png.h - 60) > 100);
    no_temp_files(dir.path());
}

#[test]
fn line_chart_rejects_bad_input_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.png");
    let mut chart = accuracy_chart("t");
    chart.series[1].ys.pop();
    let e = err_text(line_chart(&path, &chart));
    assert!(e.contains("bad.png") && e.contains("16 x values but 15 y values"), "{e}");
    let e = err_text(line_chart(&path, &LineChart::default()));
    assert!(e.contains("no series"), "{e}");
    let mut chart = accuracy_chart("t");
    chart.y_range = Some((1.0, 1.0));
    assert!(err_text(line_chart(&path, &chart)).contains("y_range"));
    assert!(!path.exists());
    no_temp_files(dir.path());
}

fn class_angle(rows: usize, cols: usize, nan_at: Option<usize>) -> Heatmap {
    let mut values: Vec<f64> = (0..rows * cols).map(|i| 100.0 * ((i * 37) % 101) as f64 / 100.0).collect();
    if let Some(i) = nan_at {
        values[i] = f64::NAN;
    }
    Heatmap {
        title: "Accuracy per class and angle".into(),
        x_label: "rotation angle (°)".into(),
        y_label: "class".into(),
        x_labels: angles(cols).iter().map(|a| format!("{a:.0}°")).collect(),
        y_labels: (0..rows).map(|c| format!("class {c}")).collect(),
        values,
        value_label: "accuracy (%)".into(),
        range: Some((0.0, 100.0)),
        annotate: true,
        svg: true,
    }
}

#[test]
fn heatmap_marks_non_finite_cells_only_when_present() {
    let dir = tempfile::tempdir().unwrap();
    let with = dir.path().join("with.png");
    heatmap(&with, &class_angle(10, 16, Some(17))).unwrap();
    let png = Png::read(&with);
    assert!(png.w >= 700 && png.w <= 1400 && png.h >= 400 && png.h <= 900, "{}×{}", png.w, png.h);
    // One NaN cell (50 × 48 px) plus the legend swatch.
    assert!(png.count(NONFINITE_RGB) > 1000, "{}", png.count(NONFINITE_RGB));
    assert!(png.ink_in_rows(0, 40) > 200, "no title text rendered");
    let svg = std::fs::read_to_string(dir.path().join("with.svg")).unwrap();
    assert!(svg.contains("Accuracy per class and angle") && svg.contains("non-finite"));

    let without = dir.path().join("without.png");
    heatmap(&without, &class_angle(10, 36, None)).unwrap();
    assert_eq!(Png::read(&without).count(NONFINITE_RGB), 0);
    no_temp_files(dir.path());
}

#[test]
fn heatmap_cells_have_the_colormap_colours() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.png");
    let spec = Heatmap {
        title: "t".into(),
        x_labels: vec!["a".into(), "b".into()],
        y_labels: vec!["r0".into(), "r1".into()],
        values: vec![0.0, 1.0, 0.5, 0.0],
        range: Some((0.0, 1.0)),
        ..Default::default()
    };
    heatmap(&path, &spec).unwrap();
    let png = Png::read(&path);
    // Cells are 64 × 48 px: two at inferno(0), one at inferno(1), one at inferno(0.5).
    let cell = 64 * 48;
    assert!(png.count(inferno(0.0)) >= 2 * cell * 9 / 10, "{}", png.count(inferno(0.0)));
    assert!(png.count(inferno(1.0)) >= cell * 9 / 10);
    assert!(png.count(inferno(0.5)) >= cell * 9 / 10);
    assert!(png.mean_y(inferno(1.0)) < png.mean_y(inferno(0.5)), "row 0 is drawn above row 1");
}

#[test]
fn heatmap_rejects_mismatched_input() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.png");
    let mut spec = class_angle(10, 16, None);
    spec.values.pop();
    let e = err_text(heatmap(&path, &spec));
    assert!(e.contains("bad.png") && e.contains("values has 159 entries") && e.contains("10 × 16"), "{e}");
    let e = err_text(heatmap(&path, &Heatmap::default()));
    assert!(e.contains("empty heatmap"), "{e}");
    let mut spec = class_angle(2, 2, None);
    spec.range = Some((1.0, f64::NAN));
    assert!(err_text(heatmap(&path, &spec)).contains("range"));
    assert!(!path.exists());
}

fn lcg(seed: &mut u64) -> f64 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (*seed >> 11) as f64 / (1u64 << 53) as f64
}

fn random_strips(panels: usize, layers: usize, infinities: bool) -> Strips {
    let mut seed = 7u64;
    let sizes =
        [6 * 28 * 28, 6 * 14 * 14, 16 * 14 * 14, 16 * 7 * 7, 120 * 49, 5880, 84, 10, 10, 10, 64, 32, 256, 128, 10];
    let names =
        ["conv1", "conv1.relu", "pool1", "conv2", "conv2.relu", "pool2", "fc1", "fc1.relu", "fc2", "log_softmax"];
    let panels = (0..panels)
        .map(|p| Panel {
            title: match p {
                0 => "all".into(),
                1 => "stratified".into(),
                k => format!("class {}", k - 2),
            },
            layers: (0..layers)
                .map(|l| {
                    let n = sizes[l % sizes.len()];
                    let units = (0..n)
                        .map(|u| {
                            let r = lcg(&mut seed);
                            if infinities && u % 97 == 3 && l % 3 == 1 {
                                f64::INFINITY
                            } else {
                                (0.2 + 0.1 * l as f64) * r * r * 3.0
                            }
                        })
                        .collect();
                    (names[l % names.len()].to_string(), units)
                })
                .collect(),
        })
        .collect();
    Strips {
        title: "V per unit, rotated model".into(),
        panels,
        value_label: "V = V_t / V_x".into(),
        range: None,
        panel_cols: None,
        aggregate: StripAggregate::Mean,
    }
}

#[test]
fn strips_fit_twelve_panels_and_mark_infinities() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("strips.png");
    heatmap_strips(&path, &random_strips(12, 15, true)).unwrap();
    let png = Png::read(&path);
    assert!(png.w <= 2400 && png.h <= 1700 && png.w >= 1200 && png.h >= 800, "{}×{}", png.w, png.h);
    assert!(png.count(NONFINITE_RGB) > 100);
    assert!(png.ink_in_rows(0, 36) > 200, "no title text rendered");
    let clean = dir.path().join("clean.png");
    heatmap_strips(&clean, &random_strips(3, 4, false)).unwrap();
    assert_eq!(Png::read(&clean).count(NONFINITE_RGB), 0);
    no_temp_files(dir.path());
}

#[test]
fn strips_stretch_units_top_to_bottom_and_clip_at_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.png");
    let spec = Strips {
        title: "two units".into(),
        panels: vec![Panel { title: "all".into(), layers: vec![("fc".into(), vec![0.0, 5.0])] }],
        value_label: "V".into(),
        range: Some((0.0, 1.0)),
        panel_cols: None,
        aggregate: StripAggregate::Max,
    };
    heatmap_strips(&path, &spec).unwrap();
    let png = Png::read(&path);
    // One 42-px-wide column, 360 px tall: unit 0 (bottom colour) over unit 1 (clipped to the top).
    let (lo, hi) = (png.count(inferno(0.0)), png.count(inferno(1.0)));
    assert!(lo >= 42 * 170 && hi >= 42 * 170, "{lo} {hi}");
    assert!(png.mean_y(inferno(0.0)) < png.mean_y(inferno(1.0)));

    // Many units per pixel row with `Max`: a single large unit among zeros still shows.
    let mut units = vec![0.0; 100_000];
    units[50_000] = 3.0;
    let spec = Strips { panels: vec![Panel { title: "big".into(), layers: vec![("conv".into(), units)] }], ..spec };
    heatmap_strips(&path, &spec).unwrap();
    let png = Png::read(&path);
    assert!(png.count(inferno(1.0)) >= 42, "the one large unit vanished");
    // With `Mean` (the default) it is averaged with its ~280 neighbours in that pixel row, while
    // a single infinity still paints its row non-finite.
    let mut spec = Strips { aggregate: StripAggregate::Mean, ..spec };
    heatmap_strips(&path, &spec).unwrap();
    assert!(Png::read(&path).count(inferno(1.0)) < 42);
    spec.panels[0].layers[0].1[70_000] = f64::INFINITY;
    heatmap_strips(&path, &spec).unwrap();
    // Strip rows are 70..430 (below the 46-px title band and the 24-px panel title).
    assert!(Png::read(&path).count_in_rows(NONFINITE_RGB, 70, 430) >= 42);
}

#[test]
fn strips_reject_empty_input() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.png");
    let e = err_text(heatmap_strips(&path, &Strips::default()));
    assert!(e.contains("bad.png") && e.contains("no panels"), "{e}");
    let spec = Strips { panels: vec![Panel { title: "x".into(), layers: vec![] }], ..Default::default() };
    assert!(err_text(heatmap_strips(&path, &spec)).contains("no layers"));
    // An empty layer is drawn (grey), not an error.
    let spec =
        Strips { panels: vec![Panel { title: "x".into(), layers: vec![("e".into(), vec![])] }], ..Default::default() };
    heatmap_strips(&path, &spec).unwrap();
}

fn grid(images: Vec<f32>, n: usize, c: usize, normalize: GridNormalize) -> ImageGrid {
    ImageGrid {
        images,
        n,
        c,
        h: 2,
        w: 2,
        cols: 2,
        scale: 3,
        row_labels: None,
        col_labels: None,
        title: None,
        normalize,
    }
}

#[test]
fn image_grid_pixels_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.png");
    let images = vec![0.0, 1.0, 0.5, 0.25, 1.0, 0.0, f32::NAN, 0.75];
    image_grid(&path, &grid(images, 2, 1, GridNormalize::Global)).unwrap();
    let png = Png::read(&path);
    // 2-px separators around 6 × 6 cells: 2 + 2·(6 + 2) by 2 + (6 + 2).
    assert_eq!((png.w, png.h), (18, 10));
    // Pixel (x, y) of image i covers [2 + 8i + 3x, +3) × [2 + 3y, +3).
    let px = |i: usize, x: usize, y: usize| {
        let c = png.at(2 + 8 * i + 3 * x + 1, 2 + 3 * y + 1);
        for dy in 0..3 {
            for dx in 0..3 {
                assert_eq!(png.at(2 + 8 * i + 3 * x + dx, 2 + 3 * y + dy), c, "block not uniform");
            }
        }
        c
    };
    assert_eq!(px(0, 0, 0), [0; 3]);
    assert_eq!(px(0, 1, 0), [255; 3]);
    assert_eq!(px(0, 0, 1), [128; 3]);
    assert_eq!(px(0, 1, 1), [64; 3]);
    assert_eq!(px(1, 0, 0), [255; 3]);
    assert_eq!(px(1, 1, 0), [0; 3]);
    assert_eq!(px(1, 0, 1), NONFINITE_RGB);
    assert_eq!(px(1, 1, 1), [191; 3]);
    for (x, y) in [(0, 0), (1, 5), (8, 4), (9, 9), (17, 0)] {
        assert_eq!(png.at(x, y), [255; 3], "separator at ({x}, {y})");
    }

    // Per image: each image spans black to white on its own.
    image_grid(&path, &grid(vec![0.0, 2.0, 1.0, 1.0, 10.0, 20.0, 15.0, 15.0], 2, 1, GridNormalize::PerImage)).unwrap();
    let png = Png::read(&path);
    assert_eq!(png.at(2 + 8 + 1, 3), [0; 3]);
    assert_eq!(png.at(2 + 8 + 4, 3), [255; 3]);
    assert_eq!(png.at(3, 6), [128; 3]);

    // Signed kernels: symmetric range, 0 is mid grey; Fixed clips outside values.
    image_grid(&path, &grid(vec![-1.0, 0.0, 1.0, 0.5], 1, 1, GridNormalize::Symmetric)).unwrap();
    let png = Png::read(&path);
    assert_eq!((png.w, png.h), (10, 10));
    assert_eq!([png.at(3, 3), png.at(6, 3), png.at(3, 6), png.at(6, 6)], [[0; 3], [128; 3], [255; 3], [191; 3]]);
    image_grid(&path, &grid(vec![-5.0, 0.0, 5.0, 0.5], 1, 1, GridNormalize::Fixed(0.0, 1.0))).unwrap();
    let png = Png::read(&path);
    assert_eq!([png.at(3, 3), png.at(6, 3), png.at(3, 6), png.at(6, 6)], [[0; 3], [0; 3], [255; 3], [128; 3]]);

    // RGB: channel planes map to R, G, B.
    let rgb = vec![1.0, 0.0, 0.0, 0.0, /* G */ 0.0, 1.0, 0.0, 0.0, /* B */ 0.0, 0.0, 1.0, 0.0];
    image_grid(&path, &grid(rgb, 1, 3, GridNormalize::Fixed(0.0, 1.0))).unwrap();
    let png = Png::read(&path);
    assert_eq!(
        [png.at(3, 3), png.at(6, 3), png.at(3, 6), png.at(6, 6)],
        [[255, 0, 0], [0, 255, 0], [0, 0, 255], [0; 3]]
    );
    no_temp_files(dir.path());
}

#[test]
fn image_grid_labels_render_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("labelled.png");
    let mut g = grid(vec![0.0; 2 * 4 * 4], 2, 1, GridNormalize::Fixed(0.0, 1.0));
    g.h = 4;
    g.w = 4;
    g.cols = 1;
    g.scale = 8;
    g.row_labels = Some(vec!["image 0".into(), "image 1".into()]);
    g.col_labels = Some(vec!["45°".into()]);
    g.title = Some("Test images and their rotations".into());
    image_grid(&path, &g).unwrap();
    let png = Png::read(&path);
    assert!(png.w > 200 && png.h > 2 + 2 * 34 + 40, "{}×{}", png.w, png.h);
    assert!(png.ink_in_rows(0, 30) > 100, "no title text rendered");
    // The label band between title and grid has the column label.
    assert!(png.ink_in_rows(34, 54) > 20);
}

#[test]
fn image_grid_rejects_bad_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.png");
    let mut g = grid(vec![], 2, 1, GridNormalize::Global);
    g.h = 0;
    let e = err_text(image_grid(&path, &g));
    assert!(e.contains("bad.png") && e.contains("zero-size"), "{e}");
    let e = err_text(image_grid(&path, &grid(vec![0.0; 7], 2, 1, GridNormalize::Global)));
    assert!(e.contains("images has 7 values but n × c × h × w = 2 × 1 × 2 × 2 = 8"), "{e}");
    assert!(err_text(image_grid(&path, &grid(vec![0.0; 16], 2, 2, GridNormalize::Global))).contains("channels"));
    let mut g = grid(vec![0.0; 8], 2, 1, GridNormalize::Global);
    g.scale = 0;
    assert!(err_text(image_grid(&path, &g)).contains("scale"));
    let mut g = grid(vec![0.0; 8], 2, 1, GridNormalize::Global);
    g.col_labels = Some(vec!["a".into()]);
    assert!(err_text(image_grid(&path, &g)).contains("1 column labels for 2"));
    assert!(err_text(image_grid(&path, &grid(vec![0.0; 8], 2, 1, GridNormalize::Fixed(1.0, 1.0)))).contains("Fixed"));
    assert!(!path.exists());
    no_temp_files(dir.path());
}

// ---------------------------------------------------------------------------------------------
// Sample figures for looking at: `cargo test --test plots -- --ignored` writes them to
// $PLOT_SAMPLES (default /tmp/plot-samples).

/// A 28 × 28 stroke figure: `strokes` are line segments in [0, 1]² drawn 2.5 px thick.
fn synthetic_digit(strokes: &[((f32, f32), (f32, f32))]) -> Vec<f32> {
    let mut img = vec![0.0f32; 28 * 28];
    for y in 0..28 {
        for x in 0..28 {
            let p = (x as f32 + 0.5, y as f32 + 0.5);
            for &((ax, ay), (bx, by)) in strokes {
                let (ax, ay, bx, by) = (4.0 + ax * 20.0, 4.0 + ay * 20.0, 4.0 + bx * 20.0, 4.0 + by * 20.0);
                let (dx, dy) = (bx - ax, by - ay);
                let t = (((p.0 - ax) * dx + (p.1 - ay) * dy) / (dx * dx + dy * dy)).clamp(0.0, 1.0);
                let d = ((p.0 - ax - t * dx).powi(2) + (p.1 - ay - t * dy).powi(2)).sqrt();
                let v = (1.8 - d).clamp(0.0, 1.0);
                img[y * 28 + x] = img[y * 28 + x].max(v);
            }
        }
    }
    img
}

/// Bilinear rotation about the centre, counter-clockwise as displayed, zero fill.
fn rotate(img: &[f32], deg: f32) -> Vec<f32> {
    let (s, c) = deg.to_radians().sin_cos();
    let mut out = vec![0.0; 28 * 28];
    let at =
        |x: i32, y: i32| if (0..28).contains(&x) && (0..28).contains(&y) { img[(y * 28 + x) as usize] } else { 0.0 };
    for y in 0..28 {
        for x in 0..28 {
            let (u, v) = (x as f32 - 13.5, y as f32 - 13.5);
            // Source of a counter-clockwise rotation with y pointing down.
            let (sx, sy) = (c * u - s * v + 13.5, s * u + c * v + 13.5);
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - x0, sy - y0);
            let (x0, y0) = (x0 as i32, y0 as i32);
            out[y * 28 + x] = at(x0, y0) * (1.0 - fx) * (1.0 - fy)
                + at(x0 + 1, y0) * fx * (1.0 - fy)
                + at(x0, y0 + 1) * (1.0 - fx) * fy
                + at(x0 + 1, y0 + 1) * fx * fy;
        }
    }
    out
}

fn samples_dir() -> PathBuf {
    PathBuf::from(std::env::var("PLOT_SAMPLES").unwrap_or_else(|_| "/tmp/plot-samples".into()))
}

#[test]
#[ignore = "writes sample figures to $PLOT_SAMPLES (default /tmp/plot-samples) for a person to look at"]
fn render_samples() {
    let dir = samples_dir();
    std::fs::create_dir_all(&dir).unwrap();
    line_chart(&dir.join("accuracy_vs_angle.png"), &accuracy_chart("MNIST LeNet-5: test accuracy vs rotation angle"))
        .unwrap();

    let epochs: Vec<f64> = (1..=15).map(|e| e as f64).collect();
    let curves = LineChart {
        title: "Training loss".into(),
        x_label: "epoch".into(),
        y_label: "loss (NLL)".into(),
        series: vec![
            Series {
                name: "train".into(),
                xs: epochs.clone(),
                ys: epochs.iter().map(|e| 2.0 / e).collect(),
                ..Default::default()
            },
            Series {
                name: "test".into(),
                xs: epochs.clone(),
                ys: epochs.iter().map(|e| 2.2 / e + 0.05).collect(),
                dashed: true,
                ..Default::default()
            },
        ],
        svg: true,
        ..Default::default()
    };
    line_chart(&dir.join("training_loss.png"), &curves).unwrap();

    let layers: Vec<String> = [
        "conv1",
        "conv1.relu",
        "pool1",
        "conv2",
        "conv2.relu",
        "pool2",
        "conv3",
        "conv3.relu",
        "flatten",
        "fc1",
        "fc1.relu",
        "fc2",
        "log_softmax",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mean_v = LineChart {
        title: "Mean V per layer (LeNet-5, MNIST)".into(),
        x_label: "layer".into(),
        y_label: "mean V (finite units)".into(),
        series: vec![
            Series {
                name: "rotated, stratified".into(),
                ys: (0..13).map(|i| 0.3 + 0.05 * i as f64).collect(),
                markers: true,
                color: Some(0),
                ..Default::default()
            },
            Series {
                name: "unrotated, stratified".into(),
                ys: (0..13).map(|i| 0.6 + 0.08 * i as f64).collect(),
                markers: true,
                dashed: true,
                color: Some(0),
                ..Default::default()
            },
            Series {
                name: "rotated, all".into(),
                ys: (0..13).map(|i| 0.2 + 0.04 * i as f64).collect(),
                markers: true,
                color: Some(1),
                ..Default::default()
            },
            Series {
                name: "unrotated, all".into(),
                ys: (0..13).map(|i| 0.5 + 0.07 * i as f64).collect(),
                markers: true,
                dashed: true,
                color: Some(1),
                ..Default::default()
            },
        ],
        categorical_x: Some(layers),
        svg: true,
        ..Default::default()
    };
    line_chart(&dir.join("mean_v_per_layer.png"), &mean_v).unwrap();

    let mut h = class_angle(10, 16, Some(21));
    h.title = "Unrotated model: accuracy per class and angle".into();
    h.y_labels = ["0 zero", "1 one", "2 two", "3 three", "4 four", "5 five", "6 six", "7 seven", "8 eight", "9 nine"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    heatmap(&dir.join("class_angle_16.png"), &h).unwrap();
    let mut h36 = class_angle(10, 36, None);
    h36.title = "Accuracy per class and angle (every 10°)".into();
    heatmap(&dir.join("class_angle_36.png"), &h36).unwrap();

    heatmap_strips(&dir.join("strips_12x8.png"), &random_strips(12, 8, true)).unwrap();
    heatmap_strips(&dir.join("strips_12x15.png"), &random_strips(12, 15, true)).unwrap();
    heatmap_strips(&dir.join("strips_3x10.png"), &random_strips(3, 10, false)).unwrap();

    let digits = [
        synthetic_digit(&[((0.1, 0.05), (0.9, 0.05)), ((0.9, 0.05), (0.35, 0.95))]),
        synthetic_digit(&[((0.6, 0.0), (0.6, 1.0)), ((0.6, 0.0), (0.1, 0.65)), ((0.1, 0.65), (0.9, 0.65))]),
        synthetic_digit(&[((0.5, 0.0), (0.5, 1.0)), ((0.5, 0.0), (0.3, 0.2))]),
        synthetic_digit(&[((0.2, 0.0), (0.2, 1.0)), ((0.2, 1.0), (0.85, 1.0))]),
    ];
    let angles = [0.0f32, 45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0];
    let mut images = Vec::new();
    for d in &digits {
        for &a in &angles {
            images.extend(rotate(d, a));
        }
    }
    let g = ImageGrid {
        images,
        n: 32,
        c: 1,
        h: 28,
        w: 28,
        cols: 8,
        scale: 3,
        row_labels: Some((0..4).map(|i| format!("image {i}")).collect()),
        col_labels: Some(angles.iter().map(|a| format!("{a:.0}°")).collect()),
        title: Some("Test images and their rotations".into()),
        normalize: GridNormalize::Fixed(0.0, 1.0),
    };
    image_grid(&dir.join("rotations_grid.png"), &g).unwrap();

    let mut seed = 3u64;
    let kernels: Vec<f32> = (0..6 * 25).map(|_| (lcg(&mut seed) * 2.0 - 1.0) as f32).collect();
    let k = ImageGrid {
        images: kernels,
        n: 6,
        c: 1,
        h: 5,
        w: 5,
        cols: 6,
        scale: 12,
        row_labels: None,
        col_labels: Some((0..6).map(|i| format!("k{i}")).collect()),
        title: Some("conv1 kernels".into()),
        normalize: GridNormalize::Symmetric,
    };
    image_grid(&dir.join("kernels.png"), &k).unwrap();
}
