//! The counter-based random number generator: Philox-4x32-10 (Salmon et al., "Parallel
//! Random Numbers: As Easy as 1, 2, 3", SC 2011). A value depends only on (seed, stream,
//! element index), so the interpreter, the CPU code and the CUDA kernels draw the same
//! numbers in any order and on any number of threads.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox-4x32 with 10 rounds on a 128-bit counter and a 64-bit key.
pub fn philox4x32(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for _ in 0..10 {
        let p0 = (M0 as u64) * (c[0] as u64);
        let p1 = (M1 as u64) * (c[2] as u64);
        c = [((p1 >> 32) as u32) ^ c[1] ^ k[0], p1 as u32, ((p0 >> 32) as u32) ^ c[3] ^ k[1], p0 as u32];
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
    }
    c
}

/// Four 32-bit random words for element `index` of stream `stream` under `seed`.
pub fn words(seed: u64, stream: u64, index: u64) -> [u32; 4] {
    philox4x32(
        [index as u32, (index >> 32) as u32, stream as u32, (stream >> 32) as u32],
        [seed as u32, (seed >> 32) as u32],
    )
}

/// A uniform sample in [0, 1) with 24 bits of precision (exactly representable in f32).
pub fn uniform(seed: u64, stream: u64, index: u64) -> f64 {
    (words(seed, stream, index)[0] >> 8) as f64 / (1u64 << 24) as f64
}

/// A standard normal sample by Box–Muller from two uniforms of the same counter.
pub fn normal(seed: u64, stream: u64, index: u64) -> f64 {
    let w = words(seed, stream, index);
    let u1 = ((w[0] >> 8) as f64 + 1.0) / (1u64 << 24) as f64; // (0, 1]
    let u2 = (w[1] >> 8) as f64 / (1u64 << 24) as f64;
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answer() {
        // Random123's known-answer test for philox4x32-10 with a zero counter and key.
        assert_eq!(philox4x32([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(philox4x32([0xffffffff; 4], [0xffffffff; 2]), [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
    }

    #[test]
    fn uniform_moments() {
        let n = 100_000;
        let mean: f64 = (0..n).map(|i| uniform(7, 1, i)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        let m2: f64 = (0..n).map(|i| normal(7, 2, i).powi(2)).sum::<f64>() / n as f64;
        assert!((m2 - 1.0).abs() < 0.02, "{m2}");
    }
}
