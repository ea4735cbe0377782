//! Deterministic test data: a xorshift64* generator with Box–Muller Gaussians, so the estimator
//! tests need no `rand` dependency and give the same numbers on every machine.

// Each test binary includes this module and uses a different subset of it.
#![allow(dead_code)]

/// xorshift64* (Vigna), seeded; never returns to state 0.
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator from a non-zero seed (0 is mapped to a fixed odd constant).
    pub(crate) fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal by Box–Muller (one value per call; the sine half is discarded to keep the
    /// sequence simple).
    pub(crate) fn gaussian(&mut self) -> f64 {
        // 1 - u is in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// `n` standard normal values as f32.
    pub(crate) fn gaussians(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.gaussian() as f32).collect()
    }
}
