//! The emulator's sanitizer catches each class of kernel bug (tests/emu_fixtures/broken.cu),
//! names the kernel and what went wrong, and stays silent on the same kernels written
//! correctly. Every emulated launch runs under these checks, the backend's included.

use rotvar::backend::cuda::emu::{self, DeviceMem, KArg};
use std::time::{Duration, Instant};

mod common;
use common::Rng;

const BLOCK: (u32, u32, u32) = (256, 1, 1);

fn input(n: usize, seed: u64) -> DeviceMem<f32> {
    DeviceMem::from_slice(&Rng(seed).vec(n, -1.0, 1.0))
}

/// Launches fixture `name` over `blocks` blocks of 256 threads and returns its error.
fn caught(name: &str, blocks: u32, args: &[KArg]) -> String {
    let r = unsafe { emu::launch(name, (blocks, 1, 1), BLOCK, 0, args) };
    match r {
        Ok(()) => panic!("the sanitizer did not catch {name}"),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_names(msg: &str, kernel: &str, words: &[&str]) {
    assert!(msg.contains(kernel), "report does not name the kernel {kernel}:\n{msg}");
    for w in words {
        assert!(msg.contains(w), "report for {kernel} lacks `{w}`:\n{msg}");
    }
}

#[test]
fn fixtures_are_not_backend_kernels() {
    assert!(emu::fixtures().len() >= 10);
    for f in emu::fixtures() {
        assert!(emu::find_kernel(f.name).is_none(), "{} is in the backend's kernel table", f.name);
    }
}

#[test]
fn missing_barrier_is_a_race() {
    let (n, blocks) = (512, 2);
    let (mut out, x) = (DeviceMem::<f32>::poisoned(n), input(n, 1));
    let msg = caught("broken_missing_barrier", blocks, &[KArg::slice_mut(&mut out), KArg::slice(&x)]);
    // Depending on who runs first the reader finds the slot unwritten (initcheck) or written by
    // another thread in the same barrier interval (racecheck): both are reported as such.
    assert_names(&msg, "broken_missing_barrier", &["shared `tile`"]);
    assert!(msg.contains("racecheck") || msg.contains("initcheck"), "{msg}");
}

#[test]
fn read_one_past_the_end_is_caught() {
    let n = 300;
    let (mut out, w) = (DeviceMem::<f32>::poisoned(n), input(n, 2));
    let msg = caught("broken_read_past_end", 2, &[KArg::slice_mut(&mut out), KArg::slice(&w), KArg::I32(n as i32)]);
    assert_names(
        &msg,
        "broken_read_past_end",
        &["memcheck", "read 4 bytes past the end of argument `w`", "1200 bytes"],
    );
}

#[test]
fn write_one_past_the_end_is_caught() {
    let n = 300;
    let (mut out, x) = (DeviceMem::<f32>::poisoned(n), input(n, 3));
    let msg = caught("broken_write_past_end", 2, &[KArg::slice_mut(&mut out), KArg::slice(&x), KArg::I32(n as i32)]);
    assert_names(&msg, "broken_write_past_end", &["memcheck", "wrote 4 bytes past the end of argument `out`"]);
}

#[test]
fn read_before_the_start_is_caught() {
    let n = 256;
    let (mut out, x) = (DeviceMem::<f32>::poisoned(n), input(n, 4));
    let msg = caught("broken_read_before_start", 1, &[KArg::slice_mut(&mut out), KArg::slice(&x), KArg::I32(n as i32)]);
    assert_names(&msg, "broken_read_before_start", &["memcheck", "before the start of argument `in`"]);
}

#[test]
fn write_into_the_guard_page_is_caught() {
    let n = 256;
    let mut out = DeviceMem::<f32>::poisoned(n);
    let msg = caught("broken_write_far_past_end", 1, &[KArg::slice_mut(&mut out), KArg::I32(n as i32)]);
    assert_names(
        &msg,
        "broken_write_far_past_end",
        &["memcheck", "trailing guard page", "past the end of argument `out`"],
    );
    // The guard page is armed again: the same bug is caught on the next launch too.
    let again = caught("broken_write_far_past_end", 1, &[KArg::slice_mut(&mut out), KArg::I32(n as i32)]);
    assert!(again.contains("memcheck"), "{again}");
}

#[test]
fn uninitialised_shared_read_is_caught() {
    let n = 256;
    let (mut out, x) = (DeviceMem::<f32>::poisoned(n), input(n, 5));
    let msg = caught("broken_uninit_shared", 1, &[KArg::slice_mut(&mut out), KArg::slice(&x)]);
    assert_names(
        &msg,
        "broken_uninit_shared",
        &["initcheck", "shared `tile`", "before any thread of its block wrote it"],
    );
    // Shared memory is poisoned: what the threads read is NaN, never a stale or zero value.
    assert!(out[128..].iter().all(|v| v.is_nan()), "unwritten shared memory was not poisoned");
}

#[test]
fn reduction_missing_its_trailing_barrier_is_a_race() {
    let blocks = 3;
    let (mut mv, x) = (DeviceMem::<f32>::poisoned(2 * blocks), input(256 * blocks, 6));
    let msg =
        caught("broken_reduction_no_trailing_barrier", blocks as u32, &[KArg::slice_mut(&mut mv), KArg::slice(&x)]);
    assert_names(&msg, "broken_reduction_no_trailing_barrier", &["racecheck", "shared `warp_sums`"]);
}

#[test]
fn non_atomic_read_modify_write_is_a_race() {
    let n = 1024;
    let (mut total, x) = (DeviceMem::filled(1, 0.0f32), input(n, 7));
    let msg = caught("broken_nonatomic_sum", 4, &[KArg::slice_mut(&mut total), KArg::slice(&x), KArg::I32(n as i32)]);
    assert_names(&msg, "broken_nonatomic_sum", &["racecheck", "argument `total`"]);
}

#[test]
fn divergent_barrier_is_caught() {
    let mut out = DeviceMem::<f32>::poisoned(256);
    let msg = caught("broken_divergent_barrier", 1, &[KArg::slice_mut(&mut out)]);
    assert_names(&msg, "broken_divergent_barrier", &["synccheck", "divergent __syncthreads", "broken.cu:"]);
}

#[test]
fn partial_full_mask_shuffle_fails_within_seconds() {
    let mut out = DeviceMem::<f32>::poisoned(512);
    let t = Instant::now();
    let msg = caught("broken_partial_shuffle", 2, &[KArg::slice_mut(&mut out)]);
    let took = t.elapsed();
    assert_names(&msg, "broken_partial_shuffle", &["synccheck", "deadlocked"]);
    assert!(took < Duration::from_secs(10), "deadlock found only after {took:?}");
    // The emulator is usable again after an aborted launch.
    let x = input(256, 8);
    unsafe { emu::launch("fixed_transpose_tile", (1, 1, 1), BLOCK, 0, &[KArg::slice_mut(&mut out), KArg::slice(&x)]) }
        .unwrap();
    for t in 0..256 {
        assert_eq!(out[t].to_bits(), x[255 - t].to_bits());
    }
}

#[test]
fn correct_kernels_pass_clean() {
    let blocks = 4usize;
    let n = 256 * blocks;
    let x = input(n, 9);
    let mut out = DeviceMem::<f32>::poisoned(n);
    unsafe {
        emu::launch(
            "fixed_transpose_tile",
            (blocks as u32, 1, 1),
            BLOCK,
            0,
            &[KArg::slice_mut(&mut out), KArg::slice(&x)],
        )
    }
    .unwrap();
    for i in 0..n {
        assert_eq!(out[i].to_bits(), x[i / 256 * 256 + 255 - i % 256].to_bits());
    }
    let mut total = DeviceMem::filled(1, 0.0f32);
    unsafe {
        emu::launch(
            "fixed_atomic_sum",
            (blocks as u32, 1, 1),
            BLOCK,
            0,
            &[KArg::slice_mut(&mut total), KArg::slice(&x), KArg::I32(n as i32)],
        )
    }
    .unwrap();
    let want: f64 = x.iter().map(|&v| v as f64).sum();
    assert!((total[0] as f64 - want).abs() < 1e-3, "{} vs {want}", total[0]);
    let mut mv = DeviceMem::<f32>::poisoned(2 * blocks);
    unsafe {
        emu::launch("fixed_reduction", (blocks as u32, 1, 1), BLOCK, 0, &[KArg::slice_mut(&mut mv), KArg::slice(&x)])
    }
    .unwrap();
    for b in 0..blocks {
        let xs = &x[b * 256..(b + 1) * 256];
        let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / 256.0;
        assert!((mv[2 * b] as f64 - mean).abs() < 1e-5, "block {b}: mean {} vs {mean}", mv[2 * b]);
    }
}

#[test]
fn host_slices_are_checked_against_their_own_bounds() {
    // A test may pass plain slices: they are staged into device memory of exactly their size,
    // so reading one past the slice is caught even though the Vec behind it is longer.
    let w = Rng(10).vec(301, -1.0, 1.0);
    let mut out = vec![f32::NAN; 300];
    let e = unsafe {
        emu::launch(
            "broken_read_past_end",
            (2, 1, 1),
            BLOCK,
            0,
            &[KArg::slice_mut(&mut out), KArg::slice(&w[..300]), KArg::I32(300)],
        )
    }
    .unwrap_err();
    assert_names(&format!("{e:#}"), "broken_read_past_end", &["memcheck", "past the end of argument `w`"]);
    // What the kernel wrote comes back; the slice after the bad read still holds real values.
    assert_eq!(out[10], w[11] * 2.0);
}

#[test]
fn raw_host_pointers_are_refused() {
    let mut out = vec![0.0f32; 256];
    let x = DeviceMem::<f32>::poisoned(256);
    let e = unsafe {
        emu::launch("fixed_transpose_tile", (1, 1, 1), BLOCK, 0, &[KArg::ptr_mut(out.as_mut_ptr()), KArg::slice(&x)])
    }
    .unwrap_err();
    assert!(format!("{e}").contains("argument `out`") && format!("{e}").contains("DeviceMem"), "{e}");
}

#[test]
fn blocks_run_concurrently_in_a_varying_order() {
    let blocks = 24usize;
    let mut orders = Vec::new();
    for _ in 0..3 {
        let mut order = DeviceMem::<u32>::poisoned(blocks);
        let mut saw = DeviceMem::<u32>::poisoned(blocks);
        let mut counter = DeviceMem::filled(1, 0u32);
        unsafe {
            emu::launch(
                "probe_block_schedule",
                (blocks as u32, 1, 1),
                (32, 1, 1),
                0,
                &[KArg::slice_mut(&mut order), KArg::slice_mut(&mut saw), KArg::slice_mut(&mut counter)],
            )
        }
        .unwrap();
        let mut sorted = order.to_vec();
        sorted.sort();
        assert_eq!(sorted, (0..blocks as u32).collect::<Vec<_>>(), "every block ran once");
        // Every block but the last to start saw another block start while it was running.
        let last = order[blocks - 1] as usize;
        for b in (0..blocks).filter(|&b| b != last) {
            assert_eq!(saw[b], 1, "block {b} ran alone: blocks are not concurrent");
        }
        orders.push(order.to_vec());
    }
    assert!(orders.iter().any(|o| o.windows(2).any(|w| w[1] != w[0] + 1)), "blocks ran in index order: {orders:?}");
    assert!(orders.windows(2).any(|w| w[0] != w[1]), "every launch ran the blocks in the same order: {orders:?}");
}

/// A launch checks every access against the buffers that were live when it started. Freeing one
/// of those from another thread mid-launch once left a stale entry whose shadow was unmapped; a
/// pool thread's new stack could then take over its addresses and the next check crashed the
/// process (a rare SIGSEGV in a parallel test run). A free now waits for the launch in progress.
#[test]
fn a_free_during_a_launch_waits_for_it_to_end() {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let flags = DeviceMem::filled(2, 0u32);
    let victim = input(4096, 7); // live when the launch starts, freed while it runs
                                 // SAFETY: the kernel only touches `flags` with atomics; the host does too, below.
    let flag = |i: usize| unsafe { &*(flags.as_ptr().add(i) as *const AtomicU32) };
    let flags_arg = KArg::ptr(flags.as_ptr());
    let freed = AtomicBool::new(false);
    std::thread::scope(|s| {
        let launch = s.spawn(|| unsafe { emu::launch("probe_wait_for_host", (1, 1, 1), (32, 1, 1), 0, &[flags_arg]) });
        let started = Instant::now();
        while flag(1).load(Ordering::SeqCst) == 0 {
            assert!(started.elapsed() < Duration::from_secs(60), "the probe kernel never started");
            std::thread::sleep(Duration::from_millis(1));
        }
        let freer = s.spawn(|| {
            drop(victim);
            freed.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(300));
        let early = freed.load(Ordering::SeqCst);
        flag(0).store(1, Ordering::SeqCst); // let the kernel finish
        launch.join().unwrap().unwrap();
        freer.join().unwrap();
        assert!(!early, "a buffer was freed while a launch that may check accesses against it was running");
        assert!(freed.load(Ordering::SeqCst));
    });
}

/// cp.async (kernels/cp_async.cuh): the double-buffered pipeline written correctly passes clean
/// and gives the data, zero-filled past n (a 16-byte copy with 8 source bytes included); read
/// before its wait, issued before the barrier that ends the other threads' reads, or never
/// waited for, it is caught.
#[test]
fn cp_async_pipelines_are_checked() {
    let (blocks, chunks) = (3u32, 4usize);
    let len = blocks as usize * 256 * chunks;
    let n = len - 2 - 256 * 3; // the last block's last chunks are partly and wholly past n
    let x = input(len, 12);
    let args = |out: &mut DeviceMem<f32>| {
        vec![KArg::slice_mut(out), KArg::slice(&x), KArg::I32(n as i32), KArg::I32(chunks as i32)]
    };
    let mut out = DeviceMem::<f32>::poisoned(len);
    unsafe { emu::launch("fixed_cp_async_pipeline", (blocks, 1, 1), BLOCK, 0, &args(&mut out)) }.unwrap();
    for i in 0..len {
        let src = i / 256 * 256 + 255 - i % 256;
        let want = if src < n { 2.0 * x[src] } else { 0.0 };
        assert_eq!(out[i].to_bits(), want.to_bits(), "out[{i}] (source {src}, n {n})");
    }
    let mut out = DeviceMem::<f32>::poisoned(len);
    let msg = caught("broken_cp_async_read_before_wait", blocks, &args(&mut out));
    assert_names(&msg, "broken_cp_async_read_before_wait", &["racecheck", "shared `stage`"]);
    let mut out = DeviceMem::<f32>::poisoned(len);
    let msg = caught("broken_cp_async_issue_before_barrier", blocks, &args(&mut out));
    assert_names(&msg, "broken_cp_async_issue_before_barrier", &["racecheck", "shared `stage`"]);
    let mut out = DeviceMem::<f32>::poisoned(len);
    let msg = caught("broken_cp_async_never_waits", blocks, &args(&mut out));
    assert_names(&msg, "broken_cp_async_never_waits", &["cp.async", "not waited for"]);
}
