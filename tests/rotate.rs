//! Image rotation: the convention (counter-clockwise as displayed, about the centre), exact
//! identity and quarter turns, bilinear and nearest sampling against an independent f64
//! implementation, per-channel fill, CPU vs emulated CUDA parity, and input errors.

use rotvar::augment::{sampling_matrix, Augment};
use rotvar::backend::cpu::CpuBackend;
use rotvar::backend::cuda::CudaBackend;
use rotvar::backend::{rotation_matrix, Affine, BackendRef, Interp, RotateGeom};
use rotvar::ops;
use rotvar::rng::Rng as EngineRng;
use rotvar::tensor::Tensor;
use rotvar::transform::{Transform, TransformSet};

mod common;
use common::Rng;

const INTERPS: [Interp; 2] = [Interp::Nearest, Interp::Bilinear];

fn backends() -> Vec<(&'static str, BackendRef)> {
    let cpu: BackendRef = CpuBackend::shared();
    let emu: BackendRef = CudaBackend::emulated();
    vec![("cpu", cpu), ("cuda-emu", emu)]
}

/// Rotate through the backend directly, into an output poisoned with NaN.
fn rot(be: &BackendRef, x: &[f32], g: RotateGeom, angles: &[f32], interp: Interp, fill: &[f32]) -> Vec<f32> {
    let mats: Vec<Affine> = angles.iter().map(|&a| rotation_matrix(a)).collect();
    warp(be, x, g, &mats, interp, fill)
}

/// Warp through the backend directly, into an output poisoned with NaN.
fn warp(be: &BackendRef, x: &[f32], g: RotateGeom, mats: &[Affine], interp: Interp, fill: &[f32]) -> Vec<f32> {
    let xs = be.upload(x).unwrap();
    let mut ys = be.upload(&vec![f32::NAN; g.len()]).unwrap();
    be.warp(&xs, mats, interp, fill, &mut ys, &g).unwrap();
    be.download(&ys).unwrap()
}

fn random_images(seed: u64, g: RotateGeom) -> Vec<f32> {
    Rng(seed).vec(g.len(), -2.0, 2.0)
}

fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}: element {i}: got {a}, want {b}");
    }
}

/// The same images with each plane transformed by `f(out_y, out_x) -> (in_y, in_x)`.
fn remap(x: &[f32], g: RotateGeom, f: impl Fn(usize, usize) -> (usize, usize)) -> Vec<f32> {
    let hw = g.h * g.w;
    let mut y = vec![0.0; g.len()];
    for p in 0..g.n * g.c {
        for oy in 0..g.h {
            for ox in 0..g.w {
                let (iy, ix) = f(oy, ox);
                y[p * hw + oy * g.w + ox] = x[p * hw + iy * g.w + ix];
            }
        }
    }
    y
}

#[test]
fn zero_and_full_turns_are_the_identity_bit_exactly() {
    for (name, be) in backends() {
        for g in [RotateGeom { n: 3, c: 2, h: 7, w: 7 }, RotateGeom { n: 3, c: 2, h: 6, w: 11 }] {
            let x = random_images(1, g);
            for angles in [[0.0f32; 3], [360.0; 3], [-360.0, 720.0, 0.0]] {
                for interp in INTERPS {
                    let y = rot(&be, &x, g, &angles, interp, &[-1.0, 5.0]);
                    assert_bits_eq(&format!("{name} {interp:?} {angles:?} {g:?}"), &y, &x);
                }
            }
        }
    }
}

#[test]
fn quarter_turns_on_square_images_are_exact_transposes_and_flips() {
    for (name, be) in backends() {
        for size in [6, 7] {
            let g = RotateGeom { n: 1, c: 3, h: size, w: size };
            let x = random_images(2, g);
            let last = size - 1;
            let cases: [(f32, Box<dyn Fn(usize, usize) -> (usize, usize)>); 5] = [
                (90.0, Box::new(move |oy, ox| (ox, last - oy))),
                (180.0, Box::new(move |oy, ox| (last - oy, last - ox))),
                (-180.0, Box::new(move |oy, ox| (last - oy, last - ox))),
                (270.0, Box::new(move |oy, ox| (last - ox, oy))),
                (-90.0, Box::new(move |oy, ox| (last - ox, oy))),
            ];
            for (angle, f) in &cases {
                let want = remap(&x, g, f);
                for interp in INTERPS {
                    let y = rot(&be, &x, g, &[*angle], interp, &[9.0, 9.0, 9.0]);
                    assert_bits_eq(&format!("{name} {interp:?} {angle}° {size}x{size}"), &y, &want);
                }
            }
        }
    }
}

#[test]
fn positive_angles_turn_counter_clockwise_as_displayed() {
    // A bright pixel at the top-left (row 0, column 0) turned +90° lands at the bottom-left;
    // turned −90° (clockwise) it lands at the top-right.
    for (name, be) in backends() {
        for size in [4, 5] {
            let g = RotateGeom { n: 2, c: 1, h: size, w: size };
            let mut x = vec![0.0f32; g.len()];
            x[0] = 1.0;
            x[size * size] = 1.0;
            for interp in INTERPS {
                let y = rot(&be, &x, g, &[90.0, -90.0], interp, &[0.0]);
                let lit = |img: usize| -> Vec<(usize, usize)> {
                    (0..size * size)
                        .filter(|&i| y[img * size * size + i] != 0.0)
                        .map(|i| (i / size, i % size))
                        .collect()
                };
                assert_eq!(lit(0), vec![(size - 1, 0)], "{name} {interp:?} +90°: expected bottom-left");
                assert_eq!(lit(1), vec![(0, size - 1)], "{name} {interp:?} -90°: expected top-right");
            }
        }
    }
}

/// Independent f64 rotation from the definition: the inverse rotation of each output pixel's
/// offset from the centre ((w−1)/2, (h−1)/2), y down, positive = counter-clockwise as displayed.
/// Returns, per output pixel, the value and whether nearest sampling is near a rounding tie.
fn reference(x: &[f32], g: RotateGeom, angles: &[f64], interp: Interp, fill: &[f32]) -> (Vec<f64>, Vec<bool>) {
    let forward = |n: usize, u: f64, v: f64| {
        let t = angles[n].to_radians();
        let (c, s) = (t.cos(), t.sin());
        // Displayed counter-clockwise by t maps a source offset (u, v) to
        // (u·c + v·s, −u·s + v·c) in y-down coordinates.
        (u * c + v * s, -u * s + v * c)
    };
    reference_forward(x, g, &forward, interp, fill)
}

/// Independent f64 resampling given each image's *forward* transform of offsets from the
/// centre: the source point of an output pixel is found by inverting `forward` numerically
/// (it is affine: solve the 2×2 system from the images of the origin and the unit vectors).
fn reference_forward(
    x: &[f32],
    g: RotateGeom,
    forward: &dyn Fn(usize, f64, f64) -> (f64, f64),
    interp: Interp,
    fill: &[f32],
) -> (Vec<f64>, Vec<bool>) {
    let (h, w) = (g.h as i64, g.w as i64);
    let (cx, cy) = ((w - 1) as f64 / 2.0, (h - 1) as f64 / 2.0);
    let mut out = Vec::with_capacity(g.len());
    let mut tie = Vec::with_capacity(g.len());
    for n in 0..g.n {
        let (tx, ty) = forward(n, 0.0, 0.0);
        let (a, c) = forward(n, 1.0, 0.0);
        let (b, d) = forward(n, 0.0, 1.0);
        let (a, b, c, d) = (a - tx, b - tx, c - ty, d - ty);
        let det = a * d - b * c;
        // Inverse of [[a, b], [c, d]] (columns: images of the unit offsets) after the shift.
        let inv = |dx: f64, dy: f64| {
            let (dx, dy) = (dx - tx, dy - ty);
            ((d * dx - b * dy) / det, (-c * dx + a * dy) / det)
        };
        for ch in 0..g.c {
            let plane = &x[(n * g.c + ch) * g.h * g.w..][..g.h * g.w];
            let px = |ix: i64, iy: i64| -> f64 {
                if (0..w).contains(&ix) && (0..h).contains(&iy) {
                    plane[(iy * w + ix) as usize] as f64
                } else {
                    fill[ch] as f64
                }
            };
            for oy in 0..h {
                for ox in 0..w {
                    let (dx, dy) = (ox as f64 - cx, oy as f64 - cy);
                    let (u, v) = inv(dx, dy);
                    let (sx, sy) = (u + cx, v + cy);
                    match interp {
                        Interp::Nearest => {
                            let near_tie = |v: f64| ((v - v.floor()) - 0.5).abs() < 1e-3;
                            tie.push(near_tie(sx) || near_tie(sy));
                            out.push(px(sx.round() as i64, sy.round() as i64));
                        }
                        Interp::Bilinear => {
                            let (x0, y0) = (sx.floor(), sy.floor());
                            let (wx, wy) = (sx - x0, sy - y0);
                            let (x0, y0) = (x0 as i64, y0 as i64);
                            tie.push(false);
                            out.push(
                                (1.0 - wy) * ((1.0 - wx) * px(x0, y0) + wx * px(x0 + 1, y0))
                                    + wy * ((1.0 - wx) * px(x0, y0 + 1) + wx * px(x0 + 1, y0 + 1)),
                            );
                        }
                    }
                }
            }
        }
    }
    (out, tie)
}

/// Every element not flagged as a nearest-rounding tie within 1e-5 (relative, floor 1) of the
/// f64 reference, and at least `min_share` of the elements compared.
fn assert_close_away_from_ties(what: &str, got: &[f32], want: &[f64], tie: &[bool], min_share: f64) {
    let mut compared = 0;
    for i in 0..got.len() {
        if tie[i] {
            continue;
        }
        compared += 1;
        let err = (got[i] as f64 - want[i]).abs() / want[i].abs().max(1.0);
        assert!(err <= 1e-5, "{what} element {i}: got {}, want {}", got[i], want[i]);
    }
    assert!(compared as f64 > got.len() as f64 * min_share, "{what}: only {compared} elements away from ties");
}

#[test]
fn arbitrary_angles_match_an_independent_f64_rotation() {
    let angles = [30.0f32, -57.3, 123.4, -181.0];
    let angles64: Vec<f64> = angles.iter().map(|&a| a as f64).collect();
    let fill = [-0.42f32, 1.5];
    for (name, be) in backends() {
        for g in [RotateGeom { n: 4, c: 2, h: 12, w: 12 }, RotateGeom { n: 4, c: 2, h: 9, w: 14 }] {
            let x = random_images(3, g);
            for interp in INTERPS {
                let y = rot(&be, &x, g, &angles, interp, &fill);
                let (want, tie) = reference(&x, g, &angles64, interp, &fill);
                assert_close_away_from_ties(&format!("{name} {interp:?} {g:?}"), &y, &want, &tie, 0.9);
            }
        }
    }
}

#[test]
fn fill_is_per_channel_outside_the_source_image() {
    for (name, be) in backends() {
        let g = RotateGeom { n: 2, c: 2, h: 9, w: 9 };
        let x = vec![1.0f32; g.len()];
        let fill = [-0.42f32, 0.7];
        for interp in INTERPS {
            let y = ops::rotate(&Tensor::from_vec(&be, &[2, 2, 9, 9], &x).unwrap(), &[45.0, 0.0], interp, &fill)
                .unwrap()
                .to_vec()
                .unwrap();
            for ch in 0..2 {
                let p = &y[ch * 81..(ch + 1) * 81];
                for (r, c) in [(0, 0), (0, 8), (8, 0), (8, 8)] {
                    let v = p[r * 9 + c];
                    assert!((v - fill[ch]).abs() < 1e-6, "{name} {interp:?} channel {ch} corner ({r},{c}): {v}");
                }
                assert_eq!(p[4 * 9 + 4], 1.0, "{name} {interp:?} channel {ch} centre");
                // Inside the inscribed disc every source tap is in the image.
                assert!((p[4 * 9 + 6] - 1.0).abs() < 1e-6, "{name} {interp:?} channel {ch} near centre");
                // The second image (0°) has no fill anywhere.
                assert!(y[(2 + ch) * 81..(3 + ch) * 81].iter().all(|&v| v == 1.0), "{name} {interp:?} 0° image");
            }
        }
    }
}

#[test]
fn cpu_and_emulated_cuda_agree_on_random_batches() {
    let cpu: BackendRef = CpuBackend::shared();
    let emu: BackendRef = CudaBackend::emulated();
    let mut rng = Rng(11);
    for g in [
        RotateGeom { n: 5, c: 3, h: 13, w: 13 },
        RotateGeom { n: 3, c: 1, h: 28, w: 28 },
        RotateGeom { n: 4, c: 2, h: 5, w: 17 },
        RotateGeom { n: 2, c: 3, h: 1, w: 1 },
    ] {
        let x = rng.vec(g.len(), -3.0, 3.0);
        let angles: Vec<f32> = (0..g.n).map(|_| rng.f32(-400.0, 400.0)).collect();
        let fill: Vec<f32> = rng.vec(g.c, -1.0, 1.0);
        // Rotations alone, and every transformation at once with fractional and whole shifts.
        let rotations: Vec<Affine> = angles.iter().map(|&a| rotation_matrix(a)).collect();
        let general: Vec<Affine> = angles
            .iter()
            .enumerate()
            .map(|(i, &a)| {
                let shift = if i % 2 == 0 { [rng.f32(-3.0, 3.0), rng.f32(-3.0, 3.0)] } else { [2.0, -1.0] };
                Transform { rotate: a, zoom: rng.f32(0.5, 1.6), translate: shift, hflip: i % 3 == 0, vflip: i % 4 == 1 }
                    .matrix()
            })
            .collect();
        for (interp, mats) in INTERPS.iter().flat_map(|&i| [(i, &rotations), (i, &general)]) {
            let a = warp(&cpu, &x, g, mats, interp, &fill);
            let b = warp(&emu, &x, g, mats, interp, &fill);
            for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                assert!(p.is_finite() && q.is_finite(), "{g:?} {interp:?} element {i}: {p} vs {q}");
                assert!((p - q).abs() <= 1e-6 * p.abs().max(1.0), "{g:?} {interp:?} element {i}: cpu {p}, emu {q}");
            }
        }
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    for (name, be) in backends() {
        let x = Tensor::from_vec(&be, &[2, 3, 4, 4], &vec![0.5; 96]).unwrap();
        let fill = [0.0f32; 3];
        let e = ops::rotate(&x, &[10.0], Interp::Bilinear, &fill).unwrap_err();
        assert!(format!("{e:#}").contains("angles"), "{name}: {e:#}");
        let e = ops::rotate(&x, &[10.0, 20.0], Interp::Nearest, &[0.0; 2]).unwrap_err();
        assert!(format!("{e:#}").contains("fill"), "{name}: {e:#}");
        assert!(ops::rotate(&x, &[10.0, f32::NAN], Interp::Nearest, &fill).is_err(), "{name}: NaN angle");
        let flat = Tensor::from_vec(&be, &[3, 4, 4], &[0.5; 48]).unwrap();
        let e = ops::rotate(&flat, &[10.0; 3], Interp::Nearest, &fill).unwrap_err();
        assert!(format!("{e:#}").contains("rank 4"), "{name}: {e:#}");
        // The backend checks too, without the op wrapper in front.
        let g = RotateGeom { n: 2, c: 3, h: 4, w: 4 };
        let mut y = be.alloc(96).unwrap();
        let m = rotation_matrix(1.0);
        assert!(be.warp(&x.storage(), &[m], Interp::Bilinear, &fill, &mut y, &g).is_err(), "{name}");
        assert!(be.warp(&x.storage(), &[m, m], Interp::Bilinear, &[0.0], &mut y, &g).is_err(), "{name}");
        let nan = [f32::NAN, 0.0, 0.0, 1.0, 0.0, 0.0];
        assert!(be.warp(&x.storage(), &[m, nan], Interp::Bilinear, &fill, &mut y, &g).is_err(), "{name}");
        // Good input still works after the errors.
        let y = ops::rotate(&x, &[10.0, 20.0], Interp::Bilinear, &fill).unwrap();
        assert_eq!(y.shape(), &[2, 3, 4, 4]);
        assert!(!y.is_tracked());
    }
}

#[test]
fn flips_are_exact_mirror_images() {
    for (name, be) in backends() {
        for g in [RotateGeom { n: 2, c: 2, h: 7, w: 7 }, RotateGeom { n: 2, c: 1, h: 6, w: 9 }] {
            let x = random_images(21, g);
            for interp in INTERPS {
                let h = warp(&be, &x, g, &[sampling_matrix(None, None, true, false); 2], interp, &[0.0; 2][..g.c]);
                assert_bits_eq(&format!("{name} hflip {interp:?}"), &h, &remap(&x, g, |oy, ox| (oy, g.w - 1 - ox)));
                let v = warp(&be, &x, g, &[sampling_matrix(None, None, false, true); 2], interp, &[0.0; 2][..g.c]);
                assert_bits_eq(&format!("{name} vflip {interp:?}"), &v, &remap(&x, g, |oy, ox| (g.h - 1 - oy, ox)));
            }
        }
    }
}

#[test]
fn zoom_rotation_flips_and_translation_compose_as_documented() {
    // Forward transform of an offset (u, v): flip, then rotate counter-clockwise as displayed,
    // then scale by z, then move by (tx, ty) (right, down). The kernels must sample its inverse.
    type Case = (f64, f64, bool, bool, f64, f64);
    let cases: [Case; 5] = [
        (0.0, 2.0, false, false, 0.0, 0.0),
        (30.0, 1.25, true, false, 1.5, -2.25),
        (-75.0, 0.8, false, true, -3.0, 0.5),
        (140.0, 1.6, true, true, 0.25, 4.0),
        (0.0, 1.0, false, false, 2.7, -1.3),
    ];
    let g = RotateGeom { n: 5, c: 2, h: 12, w: 12 };
    let transform = |&(a, z, hf, vf, tx, ty): &Case| Transform {
        rotate: a as f32,
        zoom: z as f32,
        translate: [tx as f32, ty as f32],
        hflip: hf,
        vflip: vf,
    };
    let mats: Vec<Affine> = cases.iter().map(|c| transform(c).matrix()).collect();
    // Without a shift, a Transform's matrix is the augmentation's.
    for c in &cases {
        let (a, z, hf, vf, _, _) = *c;
        let m = transform(&(a, z, hf, vf, 0.0, 0.0)).matrix();
        let want = sampling_matrix(Some(a as f32), (z != 1.0).then_some(z as f32), hf, vf);
        assert_eq!(m.map(f32::to_bits), want.map(f32::to_bits), "{c:?}");
    }
    let forward = |n: usize, u: f64, v: f64| {
        let (a, z, hf, vf, tx, ty) = cases[n];
        let (u, v) = (if hf { -u } else { u }, if vf { -v } else { v });
        let (c, s) = (a.to_radians().cos(), a.to_radians().sin());
        let (u, v) = (u * c + v * s, -u * s + v * c);
        (z * u + tx, z * v + ty)
    };
    let fill = [0.3f32, -0.6];
    for (name, be) in backends() {
        let x = random_images(5, g);
        for interp in INTERPS {
            let y = warp(&be, &x, g, &mats, interp, &fill);
            let (want, tie) = reference_forward(&x, g, &forward, interp, &fill);
            assert_close_away_from_ties(&format!("{name} {interp:?}"), &y, &want, &tie, 0.8);
        }
    }
}

#[test]
fn integer_translations_are_exact_shifts_with_fill() {
    for (name, be) in backends() {
        for g in [RotateGeom { n: 3, c: 2, h: 7, w: 7 }, RotateGeom { n: 3, c: 1, h: 6, w: 9 }] {
            let x = random_images(31, g);
            let fill = [-0.75f32, 0.5];
            for (tx, ty) in [(2i64, 0i64), (-3, 1), (0, -2), (9, 0), (1, 6)] {
                let m = Transform { translate: [tx as f32, ty as f32], ..Transform::default() }.matrix();
                // Output (ox, oy) shows the source pixel (ox − tx, oy − ty), or the fill.
                let hw = g.h * g.w;
                let mut want = vec![0.0f32; g.len()];
                for p in 0..g.n * g.c {
                    for oy in 0..g.h as i64 {
                        for ox in 0..g.w as i64 {
                            let (sx, sy) = (ox - tx, oy - ty);
                            want[p * hw + (oy * g.w as i64 + ox) as usize] =
                                if (0..g.w as i64).contains(&sx) && (0..g.h as i64).contains(&sy) {
                                    x[p * hw + (sy * g.w as i64 + sx) as usize]
                                } else {
                                    fill[p % g.c]
                                };
                        }
                    }
                }
                for interp in INTERPS {
                    let y = warp(&be, &x, g, &vec![m; g.n], interp, &fill[..g.c]);
                    assert_bits_eq(&format!("{name} {g:?} shift ({tx}, {ty}) {interp:?}"), &y, &want);
                }
            }
        }
    }
}

#[test]
fn identity_points_of_every_axis_change_no_bit() {
    // zoom 1, shift 0, rotation 0 and 360, alone and composed: the input, bit for bit.
    let set = TransformSet::parse(&["zoom=0.5,1".into(), "translate=0,3".into(), "rotate=0,360".into()]).unwrap();
    let ids: Vec<&Transform> = set.points.iter().filter(|t| t.zoom == 1.0 && t.translate[0] == 0.0).collect();
    assert_eq!(ids.len(), 2);
    let g = RotateGeom { n: 2, c: 3, h: 9, w: 8 };
    for (name, be) in backends() {
        let x = random_images(41, g);
        for t in &ids {
            assert!(t.is_identity(), "{t}");
            for interp in INTERPS {
                let y = warp(&be, &x, g, &[t.matrix(); 2], interp, &[0.1, 0.2, 0.3]);
                assert_bits_eq(&format!("{name} {t} {interp:?}"), &y, &x);
            }
        }
    }
}

#[test]
fn augmentation_specs_parse_draw_and_apply_deterministically() {
    let a: Augment = "rotate,zoom=0.8:1.2,hflip".parse().unwrap();
    assert_eq!(a.rotate, Some((-180.0, 180.0)));
    assert_eq!(a.zoom, Some((0.8, 1.2)));
    assert!(a.hflip && !a.vflip);
    assert_eq!(a.to_string().parse::<Augment>().unwrap(), a, "Display round-trips");
    assert_eq!("none".parse::<Augment>().unwrap(), Augment::NONE);
    for bad in ["spin", "zoom", "zoom=2:1", "zoom=0:1", "rotate=a:b", "rotate=10"] {
        let e = bad.parse::<Augment>().unwrap_err();
        assert!(format!("{e:#}").contains("--augment"), "{bad}: {e:#}");
    }
    // Angles uniform over the full turn: both halves and all four quadrants are hit.
    let mut rng = EngineRng::derive(7, "augment");
    let mats = Augment::ROTATE.draw(4000, &mut rng);
    let angles: Vec<f64> = mats.iter().map(|m| (m[2] as f64).atan2(m[0] as f64).to_degrees()).collect();
    let quadrant = |lo: f64, hi: f64| angles.iter().filter(|&&a| a >= lo && a < hi).count();
    for q in [(-180.0, -90.0), (-90.0, 0.0), (0.0, 90.0), (90.0, 180.0)] {
        let c = quadrant(q.0, q.1);
        assert!((850..=1150).contains(&c), "quadrant {q:?}: {c} of 4000");
    }
    // Same seed, same matrices; the images stay on the device and come out the same.
    let again = Augment::ROTATE.draw(4000, &mut EngineRng::derive(7, "augment"));
    assert_eq!(mats, again);
    for (name, be) in backends() {
        let g = RotateGeom { n: 3, c: 1, h: 10, w: 10 };
        let x = Tensor::from_vec(&be, &[3, 1, 10, 10], &random_images(9, g)).unwrap();
        let a1 = a.apply(&x, &[-0.4], &mut EngineRng::derive(3, "augment")).unwrap().to_vec().unwrap();
        let a2 = a.apply(&x, &[-0.4], &mut EngineRng::derive(3, "augment")).unwrap().to_vec().unwrap();
        assert_bits_eq(&format!("{name} augment determinism"), &a1, &a2);
        assert_ne!(a1, x.to_vec().unwrap(), "{name}: augmentation changed nothing");
        let none = Augment::NONE.apply(&x, &[-0.4], &mut EngineRng::derive(3, "augment")).unwrap();
        assert_eq!(none.to_vec().unwrap(), x.to_vec().unwrap());
    }
}

#[test]
fn device_copy_copies_exactly_the_requested_prefix() {
    for (name, be) in backends() {
        let x = Rng(31).vec(1000, -5.0, 5.0);
        let xs = be.upload(&x).unwrap();
        let mut ys = be.upload(&vec![f32::NAN; 1000]).unwrap();
        be.copy(&xs, &mut ys, 700).unwrap();
        let y = be.download(&ys).unwrap();
        assert_bits_eq(&format!("{name} copy"), &y[..700], &x[..700]);
        assert!(y[700..].iter().all(|v| v.is_nan()), "{name}: copied past the requested length");
        let mut short = be.alloc(10).unwrap();
        assert!(be.copy(&xs, &mut short, 700).is_err(), "{name}: short destination");
    }
}

/// The CUDA kernel steps each thread's element index by the grid's stride as a mixed-radix
/// count over (image, channel, row, column). Launched with odd grids, where one stride crosses
/// several rows, planes and images at once and threads run past the end by different amounts,
/// every element must still come out as the CPU twin's, bit for bit.
#[test]
fn warp_kernel_grid_strides_cover_every_element_exactly() {
    use rotvar::backend::cuda::emu::{self, KArg};
    let g = RotateGeom { n: 5, c: 3, h: 7, w: 9 };
    let x = random_images(77, g);
    let mats: Vec<Affine> = (0..g.n)
        .map(|i| Transform { rotate: 17.0 + 40.0 * i as f32, zoom: 1.1, ..Default::default() }.matrix())
        .collect();
    let fill = [0.25f32, -1.0, 3.0];
    let flat: Vec<f32> = mats.iter().flat_map(|m| m.iter().copied()).collect();
    let cpu: BackendRef = CpuBackend::shared();
    for (interp, code) in [(Interp::Nearest, 0), (Interp::Bilinear, 1)] {
        let want = warp(&cpu, &x, g, &mats, interp, &fill);
        for (grid, block) in [(1, 1), (1, 33), (3, 33), (7, 64), (2, 256), (40, 32)] {
            let mut y = vec![f32::NAN; g.len()];
            let args = [
                KArg::slice_mut(&mut y),
                KArg::slice(&x),
                KArg::slice(&flat),
                KArg::slice(&fill),
                KArg::I32(code),
                KArg::I32(g.n as i32),
                KArg::I32(g.c as i32),
                KArg::I32(g.h as i32),
                KArg::I32(g.w as i32),
            ];
            // SAFETY: the buffers outlive the launch and hold the lengths the kernel indexes.
            unsafe { emu::launch("warp_f32", (grid, 1, 1), (block, 1, 1), 0, &args) }.expect("warp_f32 launch");
            assert_bits_eq(&format!("{interp:?} grid {grid} block {block}"), &y, &want);
        }
    }
}
