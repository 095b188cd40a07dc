//! Same seed, same device, same build: same numbers, whatever the thread count.

mod common;

use common::training::adam_steps_bits;

/// Train `arch` for a few Adam steps on fixed random data and return every state tensor's bits.
/// 19 images: not a multiple of any internal chunk size.
fn train_bits(arch: &str, threads: usize, seed: u64) -> Vec<(String, Vec<u32>)> {
    adam_steps_bits(arch, threads, seed, 19)
}

#[test]
fn training_is_bit_identical_across_thread_counts() {
    for arch in ["lenet", "simpleconv"] {
        let one = train_bits(arch, 1, 7);
        let three = train_bits(arch, 3, 7);
        assert_eq!(one.len(), three.len());
        for ((name, a), (_, b)) in one.iter().zip(&three) {
            assert!(a == b, "{arch}: {name} differs between 1 and 3 threads");
        }
    }
}

#[test]
fn different_seeds_give_different_weights() {
    let a = train_bits("lenet", 2, 1);
    let b = train_bits("lenet", 2, 2);
    assert!(a.iter().zip(&b).any(|((_, x), (_, y))| x != y), "seed has no effect");
}
