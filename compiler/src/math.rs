//! recipec's own single-precision `exp`, `erf` and `gelu`: the definitions every backend
//! computes for `f32` tensors, bit for bit (the interpreter here, Cranelift and LLVM in
//! `codegen-cpu`, later CUDA), so that generated code can evaluate them four or eight lanes at
//! a time instead of calling a scalar library function per element.
//!
//! Each is a fixed sequence of IEEE single-precision additions, multiplications and one
//! division (no fused multiply-add, no reassociation), so any correct implementation of
//! the sequence gives the same bits. Accuracy, measured against `f64` over the whole range
//! by this module's tests:
//! - `exp_f32`: Cody-Waite range reduction, the Cephes `expf` polynomial, and 2^n applied
//!   as two exact power-of-two factors; at most 2 ulp
//!   from the correctly rounded result for normal results. Inputs below -87.3 give 0 (the
//!   results there would be below 1.2e-38, near or under the subnormal range); inputs above 88.7228 give infinity; NaN gives NaN.
//! - `erf_f32`: for |x| < 0.5 the Taylor series to x^11; otherwise Abramowitz & Stegun
//!   7.1.26 with `exp_f32`; absolute error at most 4e-7.
//! - `gelu_f32(x) = (0.5 * x) * (1 + erf_f32(x * 0.70710677))`.
//!
//! Other dtypes (f64, and f16/bf16, which round from f64) use the platform's `f64` functions.

use crate::ir::Un;

/// 1.5 · 2^23: adding and subtracting it rounds an f32 of magnitude below 2^22 to the
/// nearest integer (ties to even).
pub const ROUND_MAGIC: f32 = 12_582_912.0;
pub const EXP_HI: f32 = 88.722_84;
/// Below this, results would be subnormal (slow on x86 and flushed by GPUs): they are 0.
pub const EXP_LO: f32 = -87.3;
pub const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split for Cody-Waite: `LN2_HI` has few mantissa bits, so `n * LN2_HI` is exact.
pub const LN2_HI: f32 = 0.693_359_4;
pub const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes `expf` coefficients, highest degree first.
pub const EXP_P: [f32; 6] =
    [1.987_569_2e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1];

/// Taylor coefficients of erf(x)/x in x², 2/√π · (1, −1/3, 1/10, −1/42, 1/216, −1/1320).
pub const ERF_SMALL: [f32; 6] =
    [1.128_379_2, -0.376_126_4, 0.112_837_92, -0.026_866_171, 0.005_223_977, -0.000_854_832_6];
/// Abramowitz & Stegun 7.1.26.
pub const ERF_P: f32 = 0.327_591_1;
pub const ERF_A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_8, -1.453_152_1, 1.061_405_4];
pub const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;

pub fn exp_f32(x: f32) -> f32 {
    let xc = if x > EXP_HI {
        EXP_HI
    } else if x < EXP_LO {
        EXP_LO
    } else {
        x
    };
    let n = (xc * LOG2E + ROUND_MAGIC) - ROUND_MAGIC;
    let r = xc - n * LN2_HI;
    let r = r - n * LN2_LO;
    let z = r * r;
    let mut p = EXP_P[0];
    for c in &EXP_P[1..] {
        p = p * r + c;
    }
    let p = p * z + r + 1.0;
    // 2^n in two factors, both normal for n in [-126, 128]: the products are exact.
    let ni = n as i32;
    let h = ni >> 1;
    let s1 = f32::from_bits(((h + 127) << 23) as u32);
    let s2 = f32::from_bits(((ni - h + 127) << 23) as u32);
    let y = (p * s1) * s2;
    if x.is_nan() {
        x
    } else if x > EXP_HI {
        f32::INFINITY
    } else if x < EXP_LO {
        0.0
    } else {
        y
    }
}

pub fn erf_f32(x: f32) -> f32 {
    let ax = x.abs();
    // Small: x · P(x²).
    let z = x * x;
    let mut s = ERF_SMALL[5];
    for c in ERF_SMALL[..5].iter().rev() {
        s = s * z + c;
    }
    let small = x * s;
    // Large: 1 − t·Q(t)·exp(−x²), t = 1/(1 + p|x|).
    let t = 1.0 / (1.0 + ERF_P * ax);
    let mut q = ERF_A[4];
    for c in ERF_A[..4].iter().rev() {
        q = q * t + c;
    }
    let e = exp_f32(-(ax * ax));
    let large = 1.0 - (t * q) * e;
    let large = if x < 0.0 { -large } else { large };
    if ax < 0.5 {
        small
    } else {
        large
    }
}

pub fn gelu_f32(x: f32) -> f32 {
    (0.5 * x) * (1.0 + erf_f32(x * FRAC_1_SQRT_2))
}

/// The unary ops with an own f32 definition.
pub fn has_f32(u: Un) -> bool {
    matches!(u, Un::Exp | Un::Erf | Un::Gelu)
}

/// `u` on an f32 value, for the ops of [`has_f32`].
pub fn unary_f32(u: Un, x: f32) -> f32 {
    match u {
        Un::Exp => exp_f32(x),
        Un::Erf => erf_f32(x),
        Un::Gelu => gelu_f32(x),
        _ => crate::interp::unary(u, x as f64) as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulp_distance(a: f32, b: f32) -> u32 {
        let key = |x: f32| {
            let i = x.to_bits() as i32;
            if i < 0 {
                i32::MIN.wrapping_sub(i)
            } else {
                i
            }
        };
        (key(a) as i64 - key(b) as i64).unsigned_abs() as u32
    }

    /// Every 97th f32 in [-100, 100] (about 22 million values).
    fn sweep(mut f: impl FnMut(f32)) {
        let lo = (-100f32).to_bits();
        let mut b = 0u32;
        while b <= 100f32.to_bits() {
            f(f32::from_bits(b));
            b += 97;
        }
        let mut b = 0x8000_0000u32;
        while b <= lo {
            f(f32::from_bits(b));
            b += 97;
        }
    }

    #[test]
    fn exp_is_within_2_ulp_for_normal_results() {
        let mut worst = 0;
        sweep(|x| {
            let want = (x as f64).exp() as f32;
            let got = exp_f32(x);
            if want.is_normal() && x <= EXP_HI && x >= EXP_LO {
                let d = ulp_distance(got, want);
                assert!(d <= 2, "exp({x:e}) = {got:e}, want {want:e} ({d} ulp)");
                worst = worst.max(d);
            } else if x < EXP_LO {
                assert_eq!(got, 0.0);
            }
        });
        assert!(worst >= 1, "the sweep compared values");
    }

    #[test]
    fn exp_special_values() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(1.0), std::f32::consts::E);
    }

    #[test]
    fn erf_and_gelu_absolute_error() {
        let mut worst = 0f64;
        sweep(|x| {
            let want = crate::interp::unary(Un::Erf, x as f64);
            let got = erf_f32(x) as f64;
            let e = (got - want).abs();
            assert!(e <= 4e-7, "erf({x:e}) = {got:e}, want {want:e}");
            worst = worst.max(e);
            let g = gelu_f32(x) as f64;
            let gw = crate::interp::unary(Un::Gelu, x as f64);
            assert!(
                (g - gw).abs() <= 4e-7 * (x as f64).abs().max(1.0) + 1e-7 * gw.abs(),
                "gelu({x:e}) = {g:e}, want {gw:e}"
            );
        });
        eprintln!("worst erf error {worst:e}");
        assert!(worst > 0.0);
        assert_eq!(erf_f32(0.0), 0.0);
        assert_eq!(erf_f32(f32::INFINITY), 1.0);
        assert_eq!(erf_f32(f32::NEG_INFINITY), -1.0);
        assert!(erf_f32(f32::NAN).is_nan());
        // Odd symmetry holds exactly.
        for x in [0.1f32, 0.49, 0.5, 0.7, 1.3, 2.9, 5.0] {
            assert_eq!(erf_f32(-x), -erf_f32(x));
        }
    }
}
