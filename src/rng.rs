//! A small deterministic random number generator.
//!
//! rotvar promises "same seed, same device, same build: same numbers", so randomness comes from
//! one fully specified generator (SplitMix64 seeding a xoshiro256**), never from the OS or a crate
//! whose stream may change between versions.

#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

/// SplitMix64 step: used to expand a seed and as a stateless hash for counter-based draws
/// (dropout masks), which must not depend on how work is split across threads.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [0, 1) from a 64-bit hash: the top 24 bits, so every value is an exact f32.
pub fn unit_f32(bits: u64) -> f32 {
    (bits >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut s = [0u64; 4];
        for v in &mut s {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            *v = splitmix64(z);
        }
        Rng { s }
    }

    /// An independent stream derived from this seed and a label, so that adding a new consumer
    /// of randomness does not shift the numbers every other consumer sees.
    pub fn derive(seed: u64, stream: &str) -> Self {
        let mut h = seed ^ 0xA076_1D64_78BD_642F;
        for b in stream.bytes() {
            h = splitmix64(h ^ b as u64);
        }
        Rng::new(h)
    }

    /// The generator's position, to be saved with a checkpoint so a resumed run draws the
    /// numbers an uninterrupted one would have drawn.
    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    /// A generator at a saved position. All-zero is xoshiro's one fixed point (it would only
    /// ever return 0), so it can only come from a corrupt file.
    pub fn from_state(s: [u64; 4]) -> Option<Self> {
        (s != [0; 4]).then_some(Rng { s })
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        unit_f32(self.next_u64())
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.next_f32()
    }

    /// Standard normal (Box-Muller), for tests and initializers that want it.
    pub fn normal(&mut self) -> f32 {
        let u1 = (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let u2 = (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let r = (-2.0 * (1.0 - u1).ln()).sqrt();
        (r * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// Uniform integer in [0, n) without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            xs.swap(i, j);
        }
    }

    pub fn fill_uniform(&mut self, xs: &mut [f32], lo: f32, hi: f32) {
        for x in xs {
            *x = self.uniform(lo, hi);
        }
    }
}
