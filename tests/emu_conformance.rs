//! Conformance of the host emulator (kernels/emu/cuda_emu.h) with CUDA
//! semantics, through the probe kernels in kernels/emu_selftest.cu. The same
//! probes can be run on a GPU to check that the emulator and the hardware agree.

use rotvar::backend::cuda::emu::{self, KArg};

const POISON: f32 = f32::NAN;

mod common;
use common::Rng;

#[test]
fn emu_shuffles_follow_cuda_semantics() {
    let block = 64usize; // two warps
    for mode in 0..4 {
        for &(arg, width) in &[(0, 32), (1, 32), (5, 32), (16, 32), (31, 32), (3, 8), (9, 8), (1, 2)] {
            let mut out = vec![-1i32; block];
            unsafe {
                emu::launch(
                    "selftest_shfl",
                    (1, 1, 1),
                    (block as u32, 1, 1),
                    0,
                    &[KArg::slice_mut(&mut out), KArg::I32(mode), KArg::I32(arg), KArg::I32(width)],
                )
            }
            .unwrap();
            for (t, &got) in out.iter().enumerate() {
                let (lane, w) = ((t % 32) as i32, width);
                let seg = lane / w * w;
                let src = match mode {
                    0 => seg + arg.rem_euclid(w),
                    1 => {
                        if lane % w + arg < w {
                            lane + arg
                        } else {
                            lane
                        }
                    }
                    2 => {
                        if lane % w >= arg {
                            lane - arg
                        } else {
                            lane
                        }
                    }
                    _ => {
                        if (lane ^ arg) < seg + w {
                            lane ^ arg
                        } else {
                            lane
                        }
                    }
                };
                let want = ((t as i32 - lane) + src) * 10 + 1;
                assert_eq!(got, want, "mode {mode} arg {arg} width {width} thread {t}");
            }
        }
    }
}

#[test]
fn emu_votes() {
    let mut out = vec![0u32; 6];
    unsafe {
        emu::launch("selftest_vote", (1, 1, 1), (64, 1, 1), 0, &[KArg::slice_mut(&mut out), KArg::I32(3), KArg::I32(7)])
    }
    .unwrap();
    let ballot: u32 = (0..32).filter(|l| l % 3 == 0).map(|l| 1u32 << l).sum();
    assert_eq!(out, vec![ballot, 1, 0, ballot, 1, 0]);
    unsafe {
        emu::launch(
            "selftest_vote",
            (1, 1, 1),
            (32, 1, 1),
            0,
            &[KArg::slice_mut(&mut out), KArg::I32(1), KArg::I32(40)],
        )
    }
    .unwrap();
    assert_eq!(&out[..3], &[u32::MAX, 0, 1]);
}

#[test]
fn emu_dynamic_shared_memory() {
    let (n, block) = (200usize, 64usize);
    let x = Rng(23).vec(n, -0.5, 0.5);
    let mut out = vec![POISON; n];
    let grid = n.div_ceil(block) as u32;
    unsafe {
        emu::launch(
            "selftest_dyn_shared_reverse",
            (grid, 1, 1),
            (block as u32, 1, 1),
            (block * 4) as u32,
            &[KArg::slice_mut(&mut out), KArg::slice(&x), KArg::I32(n as i32)],
        )
    }
    .unwrap();
    for (i, &got) in out.iter().enumerate() {
        let (base, t) = (i / block * block, i % block);
        let src = base + block - 1 - t;
        let want = if src < n { x[src] } else { 0. };
        assert_eq!(got.to_bits(), want.to_bits(), "out[{i}]");
    }
}

#[test]
fn emu_atomics() {
    let n = 1000usize;
    let (mut counter, mut fsum, mut umax, mut fmax) = ([0i32], [0f32], [0u32], [-1e30f32]);
    unsafe {
        emu::launch(
            "selftest_atomics",
            (8, 1, 1),
            (128, 1, 1),
            0,
            &[
                KArg::slice_mut(&mut counter),
                KArg::slice_mut(&mut fsum),
                KArg::slice_mut(&mut umax),
                KArg::slice_mut(&mut fmax),
                KArg::I32(n as i32),
            ],
        )
    }
    .unwrap();
    assert_eq!(counter[0], n as i32);
    assert_eq!(fsum[0], (n * (n - 1) / 2) as f32);
    assert_eq!(umax[0], (0..n as u32).map(|i| i * 7 % 1000).max().unwrap());
    assert_eq!(fmax[0], 0.);
}

#[test]
fn emu_barriers_ignore_exited_threads() {
    for &(block, live) in &[(64usize, 37usize), (256, 256), (96, 1)] {
        let mut out = vec![POISON; 2 * block];
        unsafe {
            emu::launch(
                "selftest_early_exit_sync",
                (2, 1, 1),
                (block as u32, 1, 1),
                0,
                &[KArg::slice_mut(&mut out), KArg::I32(live as i32)],
            )
        }
        .unwrap();
        for b in 0..2 {
            for t in 0..block {
                let got = out[b * block + t];
                if t >= live {
                    assert!(got.is_nan(), "block {b} thread {t} exited but wrote");
                } else {
                    let want = 2. * ((t + 2) % live + 1000 * b) as f32;
                    assert_eq!(got, want, "block {block} live {live}: out[{b},{t}]");
                }
            }
        }
    }
}
