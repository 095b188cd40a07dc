//! Test data shared by the kernel test files: a tiny seedable generator (SplitMix64), kept
//! separate from the crate's own RNG so a change there never silently changes test inputs.
#![allow(dead_code)]

pub mod training;

pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1) with 53 bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [lo, hi).
    pub fn f32(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }
    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32(lo, hi)).collect()
    }
    /// Small integers in [0, levels): many ties, for the max-pool first-maximum rule.
    pub fn ties(&mut self, n: usize, levels: u64) -> Vec<f32> {
        (0..n).map(|_| (self.next_u64() % levels) as f32).collect()
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u = 1.0 - self.unit();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * self.unit()).cos()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// `n` random grey `side` × `side` images of 10 classes (label i mod 10), from rotvar's own
/// generator seeded with `seed`: small training sets for the emulated backend.
pub fn random_dataset(n: usize, side: usize, seed: u64) -> rotvar::data::Dataset {
    let mut rng = rotvar::rng::Rng::new(seed);
    rotvar::data::Dataset {
        name: "synthetic".into(),
        split: rotvar::data::Split::Train,
        images: (0..n * side * side).map(|_| (rng.next_u64() % 256) as u8).collect(),
        labels: (0..n).map(|i| (i % 10) as u8).collect(),
        n,
        channels: 1,
        height: side,
        width: side,
        class_names: (0..10).map(|i| i.to_string()).collect(),
    }
}
