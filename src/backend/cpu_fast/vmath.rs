//! Branch-free scalar math that the compiler vectorises: the fast CPU row kernels call these
//! inside loops over 8 lanes ([`LANES`]), so each becomes straight-line SIMD code (AVX-512,
//! AVX2 or SSE2, whichever the caller was compiled for; see `rows.rs`), provided every choice
//! is a [`select`], not an `if`. Every function is plain
//! IEEE arithmetic with no fused multiply-adds (Rust never contracts `a * b + c`) and no table,
//! so all three instruction sets give the same bits.
//!
//! Errors, measured over the stated ranges by this file's tests against f64 (`ulp` = units in
//! the last place of the f32 result):
//! - [`exp`]: Cephes' `expf` (Cody-Waite reduction by `ln 2` in two parts, a degree-7
//!   polynomial): at most 2 ulp on [-87.3, 88]; 0 below -87.33 (no subnormal results), +inf
//!   above 88 (so `exp(88.5)` is +inf, not 2.7e38: no caller needs that range).
//! - [`ln`]: Cephes' `logf` on the mantissa in [sqrt(1/2), sqrt(2)): at most 2 ulp for every
//!   positive f32 (subnormals included); `ln(0) = -inf`, `ln(x < 0) = NaN`.
//! - [`ln_f64`]: `2 atanh(f / (2 + f))` to `f^21`: relative error below 4e-16 (2 ulp of f64).
//! - [`phi`] (`e^x - 1 - x`) and [`expm1`] for `|x| < 0.5`: the Taylor series to `x^10`, relative
//!   error below 1e-9 (under f32's rounding); the callers take `exp(x) - 1` forms beyond.
//! - [`log1p`]: the `atanh` series for `|x| < 0.25` (relative 1e-11), [`ln`]`(1 + x)` beyond
//!   (at most 4 ulp: the rounding of `1 + x`).

/// Lanes per vector step of the row kernels: one AVX2 register of f32. Sixteen (one AVX-512
/// register) would double every value a step holds, and AVX2's 16 registers then spill (measured:
/// a third of the time went to reloading constants and spilled lanes). Every instruction set runs
/// the same 8-lane steps, so all give the same bits.
pub const LANES: usize = 8;

/// `if c { a } else { b }` by bit masks: the compiler keeps a bitwise select in vector form,
/// where an `if` makes it give up vectorising the whole lane loop (checked in the assembly).
#[inline(always)]
pub fn select(c: bool, a: f32, b: f32) -> f32 {
    let m = (c as u32).wrapping_neg();
    f32::from_bits((a.to_bits() & m) | (b.to_bits() & !m))
}

/// [`select`] for f64.
#[inline(always)]
pub fn select64(c: bool, a: f64, b: f64) -> f64 {
    let m = (c as u64).wrapping_neg();
    f64::from_bits((a.to_bits() & m) | (b.to_bits() & !m))
}

/// `e^xc` for `xc` in [-87.5, 88] (the range [`exp`] clamps to): Cephes' reduction and
/// polynomial, shared by [`exp`] and [`exp_nonpos`].
#[inline(always)]
fn exp_core(xc: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const MAGIC: f32 = 12_582_912.0;
    let shifted = xc * LOG2E + MAGIC;
    let kf = shifted - MAGIC;
    let r = (xc - kf * 0.693_359_4) - kf * (-2.121_944_4e-4);
    let poly =
        (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
            + 0.166_666_65)
            * r
            + 0.5)
            * (r * r)
            + r
            + 1.0;
    // k from the low bits of `shifted` (MAGIC + k, |k| < 2^22), not `kf as i32`: Rust's
    // saturating float-to-int cast is scalar code per lane. Then 2^k from its exponent field;
    // k is in [-127, 127] after the clamp.
    let k = shifted.to_bits() as i32 - MAGIC.to_bits() as i32;
    let scale = f32::from_bits(((k + 127).max(0) as u32) << 23);
    poly * scale
}

/// `e^x` in f32 (see the module documentation for its error and range).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = select(x < -87.5, -87.5, select(x > 88.0, 88.0, x));
    let y = exp_core(xc);
    select(
        x < -87.33,
        0.0,
        select(x > 88.0, f32::INFINITY, select(x.is_nan(), x, y)),
    )
}

/// [`exp`] for `x <= 0` (or `-inf`), the softmax sums' case: the same bits as [`exp`] there,
/// without its checks for overflow and NaN (a third of its work). Not for NaN or `x > 88`.
#[inline(always)]
pub fn exp_nonpos(x: f32) -> f32 {
    let xc = max(x, -87.5);
    select(x < -87.33, 0.0, exp_core(xc))
}

/// `ln x` in f32 (see the module documentation).
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    // Subnormals: scale into the normal range first (2^25), and take 25 off the exponent.
    let sub = x < f32::MIN_POSITIVE;
    let xs = select(sub, x * 33_554_432.0, x);
    let bits = xs.to_bits();
    let e0 = ((bits >> 23) & 0xff) as i32 - 126 - 25 * sub as i32;
    // The mantissa in [0.5, 1).
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    let low = m < SQRT_HALF;
    let e = (e0 - low as i32) as f32;
    let f = select(low, m + m - 1.0, m - 1.0);
    let z = f * f;
    let mut y =
        ((((((((7.037_683_6e-2 * f - 0.115_146_1) * f + 0.116_769_98) * f - 0.124_201_41) * f
            + 0.142_493_23)
            * f
            - 0.166_680_57)
            * f
            + 0.200_007_15)
            * f
            - 0.249_999_94)
            * f
            + 0.333_333_3)
            * f
            * z;
    y += e * -2.121_944_4e-4;
    y += -0.5 * z;
    let r = f + y + e * 0.693_359_4;
    select(
        x == 0.0,
        f32::NEG_INFINITY,
        select(
            x.is_nan() | (x < 0.0),
            f32::NAN,
            select(x == f32::INFINITY, x, r),
        ),
    )
}

/// `ln x` in f64 for the teacher's log-probabilities (see the module documentation).
#[inline(always)]
pub fn ln_f64(x: f64) -> f64 {
    const SQRT_HALF: f64 = std::f64::consts::FRAC_1_SQRT_2;
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    // f64 subnormals do not arise here (the inputs are f32 values), but scale them anyway.
    let sub = x < f64::MIN_POSITIVE;
    let xs = select64(sub, x * 18_014_398_509_481_984.0, x); // 2^54
    let bits = xs.to_bits();
    // The exponent as a float without an int-to-float conversion: OR it into 2^52's mantissa.
    let ebits = (bits >> 52) & 0x7ff;
    let e0 = f64::from_bits(0x4330_0000_0000_0000 | ebits)
        - (4_503_599_627_370_496.0 + 1022.0)
        - select64(sub, 54.0, 0.0);
    let m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3fe0_0000_0000_0000);
    let low = m < SQRT_HALF;
    let e = select64(low, e0 - 1.0, e0);
    let f = select64(low, m + m - 1.0, m - 1.0);
    let s = f / (2.0 + f);
    let s2 = s * s;
    let series = 1.0
        + s2 * (1.0 / 3.0
            + s2 * (1.0 / 5.0
                + s2 * (1.0 / 7.0
                    + s2 * (1.0 / 9.0
                        + s2 * (1.0 / 11.0
                            + s2 * (1.0 / 13.0
                                + s2 * (1.0 / 15.0
                                    + s2 * (1.0 / 17.0
                                        + s2 * (1.0 / 19.0 + s2 * (1.0 / 21.0))))))))));
    let r = e * LN2_HI + (e * LN2_LO + 2.0 * s * series);
    select64(
        x == 0.0,
        f64::NEG_INFINITY,
        select64(
            x.is_nan() | (x < 0.0),
            f64::NAN,
            select64(x == f64::INFINITY, x, r),
        ),
    )
}

/// `e^x` in f64 (for the log-softmax backward, where `dy - e^y sum dy` can cancel): reduction by
/// `ln 2` in two parts (fdlibm's, exact products for |k| < 2^20) and the Taylor series to `r^13`
/// on |r| <= 0.35: relative error below 4e-16. 0 below -708.39 (no subnormals), +inf above 709.78.
#[inline(always)]
pub fn exp_f64(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    let xc = select64(x < -708.5, -708.5, select64(x > 709.5, 709.5, x));
    let y = xc * LOG2E + MAGIC;
    let kf = y - MAGIC;
    let r = (xc - kf * LN2_HI) - kf * LN2_LO;
    let mut p = 1.0 / 6_227_020_800.0;
    p = p * r + 1.0 / 479_001_600.0;
    p = p * r + 1.0 / 39_916_800.0;
    p = p * r + 1.0 / 3_628_800.0;
    p = p * r + 1.0 / 362_880.0;
    p = p * r + 1.0 / 40_320.0;
    p = p * r + 1.0 / 5_040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // k from the low mantissa bits of y (2^51 + k), then 2^k from its exponent field; k + 1023
    // is in [1, 2047) after the clamp.
    let k = (y.to_bits() & 0x000f_ffff_ffff_ffff).wrapping_sub(1 << 51);
    let scale = f64::from_bits(k.wrapping_add(1023) << 52);
    let v = p * scale;
    select64(
        x < -708.39,
        0.0,
        select64(x > 709.78, f64::INFINITY, select64(x.is_nan(), x, v)),
    )
}

/// `(phi(x), expm1(x))` for `|x| < 0.5` by the Taylor series (`phi(x) = e^x - 1 - x`); outside
/// that range the values are not accurate and the callers select another form.
#[inline(always)]
pub fn phi_expm1_small(x: f32) -> (f32, f32) {
    let phi = x
        * x
        * (0.5
            + x * (1.0 / 6.0
                + x * (1.0 / 24.0
                    + x * (1.0 / 120.0
                        + x * (1.0 / 720.0
                            + x * (1.0 / 5040.0
                                + x * (1.0 / 40320.0
                                    + x * (1.0 / 362_880.0 + x * (1.0 / 3_628_800.0)))))))));
    (phi, x + phi)
}

/// `e^x - 1`, precise near 0.
#[inline(always)]
pub fn expm1(x: f32) -> f32 {
    let (_, small) = phi_expm1_small(x);
    let big = exp(x) - 1.0;
    select(x.abs() < 0.5, small, big)
}

/// `ln(1 + x)`, precise near 0.
#[inline(always)]
pub fn log1p(x: f32) -> f32 {
    let z = x / (2.0 + x);
    let z2 = z * z;
    let small = 2.0
        * z
        * (1.0
            + z2 * (1.0 / 3.0
                + z2 * (0.2 + z2 * (1.0 / 7.0 + z2 * (1.0 / 9.0 + z2 * (1.0 / 11.0))))));
    let big = ln(1.0 + x);
    select(x.abs() < 0.25, small, big)
}

/// The larger of two floats as `maxps` computes it (`b` when either is NaN; the row kernels
/// track non-finite inputs separately, so a NaN never needs to win here).
#[inline(always)]
pub fn max(a: f32, b: f32) -> f32 {
    select(a > b, a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        if got == w {
            return 0.0;
        }
        let ulp = (f32::from_bits(w.abs().to_bits() + 1) - w.abs()) as f64;
        (got as f64 - want).abs() / ulp
    }

    /// A sweep of `n` points over [lo, hi] plus a pseudo-random scatter.
    fn points(lo: f64, hi: f64, n: usize) -> Vec<f64> {
        let mut v: Vec<f64> = (0..=n)
            .map(|i| lo + (hi - lo) * i as f64 / n as f64)
            .collect();
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..n {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            v.push(lo + (hi - lo) * ((s >> 11) as f64 / (1u64 << 53) as f64));
        }
        v
    }

    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0.0f64;
        for x in points(-87.3, 88.0, 200_000) {
            let x = x as f32;
            worst = worst.max(ulps(exp(x), (x as f64).exp()));
        }
        assert!(worst <= 2.0, "exp: {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-90.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn exp_nonpos_gives_exp_bits() {
        for x in points(-100.0, 0.0, 100_000) {
            let x = x as f32;
            assert_eq!(exp_nonpos(x).to_bits(), exp(x).to_bits(), "x = {x}");
        }
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn ln_is_within_two_ulp_for_every_positive_float() {
        let mut worst = 0.0f64;
        // Log-uniform over the whole positive range, subnormals included.
        for lx in points(-103.0, 88.0, 200_000) {
            let x = (lx.exp()) as f32;
            if x == 0.0 || !x.is_finite() {
                continue;
            }
            worst = worst.max(ulps(ln(x), (x as f64).ln()));
        }
        for x in points(0.5, 2.0, 100_000) {
            let x = x as f32;
            worst = worst.max(ulps(ln(x), (x as f64).ln()));
        }
        assert!(worst <= 2.0, "ln: {worst} ulp");
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(ln(0.0), f32::NEG_INFINITY);
        assert!(ln(-1.0).is_nan());
        assert!(ln(f32::NAN).is_nan());
        assert_eq!(ln(f32::INFINITY), f32::INFINITY);
        assert!((ln(f32::from_bits(1)) as f64 - (f32::from_bits(1) as f64).ln()).abs() < 1e-5);
    }

    #[test]
    fn ln_f64_is_within_two_ulp_of_f64() {
        let mut worst = 0.0f64;
        for lx in points(-103.0, 88.0, 200_000) {
            let x = (lx.exp() as f32) as f64;
            if x == 0.0 || !x.is_finite() {
                continue;
            }
            let want = x.ln();
            let err = (ln_f64(x) - want).abs() / want.abs().max(f64::MIN_POSITIVE);
            if want != 0.0 {
                worst = worst.max(err);
            }
        }
        assert!(worst < 4.5e-16, "ln_f64: relative {worst}");
        assert_eq!(ln_f64(1.0), 0.0);
        assert_eq!(ln_f64(0.0), f64::NEG_INFINITY);
        assert!(ln_f64(-2.0).is_nan());
    }

    #[test]
    fn exp_f64_is_within_two_ulp_of_f64() {
        let mut worst = 0.0f64;
        for x in points(-708.0, 709.0, 200_000)
            .into_iter()
            .chain(points(-2.0, 2.0, 50_000))
        {
            let want = x.exp();
            worst = worst.max((exp_f64(x) - want).abs() / want);
        }
        assert!(worst < 4.5e-16, "exp_f64: relative {worst}");
        assert_eq!(exp_f64(0.0), 1.0);
        assert_eq!(exp_f64(-800.0), 0.0);
        assert_eq!(exp_f64(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp_f64(710.0), f64::INFINITY);
    }

    #[test]
    fn series_forms_are_precise_near_zero() {
        let mut worst = 0.0f64;
        for x in points(-0.5, 0.5, 100_000) {
            let x = x as f32;
            let xd = x as f64;
            let (phi, em1) = phi_expm1_small(x);
            let want_phi = xd.exp_m1() - xd;
            if want_phi != 0.0 {
                worst = worst.max(ulps(phi, want_phi));
            }
            if xd != 0.0 {
                worst = worst.max(ulps(em1, xd.exp_m1()));
                worst = worst.max(ulps(expm1(x), xd.exp_m1()));
            }
        }
        assert!(worst <= 3.0, "phi / expm1: {worst} ulp");
        let mut worst = 0.0f64;
        for x in points(-0.9, 10.0, 100_000) {
            let x = x as f32;
            let xd = x as f64;
            if xd != 0.0 {
                worst = worst.max(ulps(log1p(x), xd.ln_1p()));
            }
        }
        // Beyond 0.25, the rounding of 1 + x (half an ulp of 1.25) is up to 4 ulp of the log.
        assert!(worst <= 4.0, "log1p: {worst} ulp");
        for x in points(0.5, 80.0, 10_000) {
            let x = x as f32;
            assert!(ulps(expm1(x), (x as f64).exp_m1()) <= 3.0);
            assert!(ulps(expm1(-x), (-(x as f64)).exp_m1()) <= 3.0);
        }
    }
}
