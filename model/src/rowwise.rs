//! The row operations of a softmax on the host (the head's cross-entropy,
//! the attention kernel): the row's maximum, and `x ← exp(x − shift)` in
//! place with the row's sum, written so that the compiler vectorizes them.
//!
//! `exp` is a polynomial (Cephes' `expf`: range reduction by `ln 2`, degree
//! 6, within 2 ulp of the exact value) instead of libm's scalar call, which
//! was a third of the attention kernel's time outside its products. Sums run in
//! [`LANES`] fixed lanes added up in a fixed order, and no multiply is fused
//! with an add, so the bits are the same on every x86-64 machine whatever
//! SIMD width runs the loop (AVX-512 or AVX2 where the processor has it,
//! else SSE2).

/// Independent partial sums (and maxima): wide enough for one AVX-512
/// register, so that every SIMD width sees the same association.
pub(crate) const LANES: usize = 16;

/// Defines `fn $name(args) -> ret` (with the given visibility) running `$body(args)` compiled for
/// AVX-512 or AVX2 when the processor has them, else as built. The bodies
/// must not depend on the vector width for their results (fixed lanes, no
/// fused multiply-add: neither feature enables FMA), so every copy gives
/// the same bits.
macro_rules! widest {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $body:ident) => {
        $(#[$doc])*
        #[allow(unsafe_code)] // the wider copies run only where the processor has them
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the processor has AVX-512F.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the processor has AVX2.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use widest;

widest! {
    /// The largest element of `row` (−∞ for an empty row).
    pub fn max(row: &[f32]) -> f32 = max_body
}

widest! {
    /// `x ← exp(x − shift)` for every element of `row`; returns their sum.
    pub fn exp_shifted_sum(row: &mut [f32], shift: f32) -> f32 = exp_shifted_sum_body
}

#[inline(always)]
fn larger(a: f32, b: f32) -> f32 {
    if a > b { a } else { b }
}

#[inline(always)]
fn max_body(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = larger(x, *lane);
        }
    }
    let m = lanes.into_iter().fold(f32::NEG_INFINITY, larger);
    rest.iter().fold(m, |m, &x| larger(x, m))
}

#[inline(always)]
fn exp_shifted_sum_body(row: &mut [f32], shift: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (lane, x) in lanes.iter_mut().zip(chunk) {
            *x = exp(*x - shift);
            *lane += *x;
        }
    }
    let mut sum = lanes.into_iter().fold(0.0, |s, x| s + x);
    for x in chunks.into_remainder() {
        *x = exp(*x - shift);
        sum += *x;
    }
    sum
}

/// `eˣ` for f32, within 2 ulp; 0 below ≈ −87.3 (where f32 turns
/// subnormal), +∞ above ≈ 88.7, NaN for NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOWEST: f32 = -87.336_54; // ln of the smallest normal f32
    const HIGHEST: f32 = 88.722_83; // ln of the largest f32
    // Adding 1.5 · 2²³ rounds to a whole number, which then sits in the
    // low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // ln 2 in two parts, the first exact in a few bits, so that x − n·ln 2
    // loses nothing.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.clamp(LOWEST, HIGHEST);
    let t = clamped * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_2e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * (r * r) + r + 1.0;
    // 2ⁿ from its exponent bits; n is within [−126, 128].
    let n_bits = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let two_n = f32::from_bits(((n_bits + 127).clamp(0, 254) as u32) << 23);
    let high = if n_bits > 127 { 2.0 } else { 1.0 };
    let value = e * two_n * high;
    if x < LOWEST {
        0.0
    } else if x > HIGHEST {
        f32::INFINITY
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, exact: f64) -> f64 {
        let exact32 = exact as f32;
        let ulp = (f32::from_bits(exact32.to_bits() + 1) - exact32) as f64;
        (a as f64 - exact).abs() / ulp
    }

    #[test]
    fn exp_is_within_two_ulp_over_the_softmax_range() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 88.7 {
            let e = exp(x);
            worst = worst.max(ulps(e, (x as f64).exp()));
            x += 0.001_3;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn row_operations_equal_their_plain_loops() {
        for len in [0, 1, 15, 16, 17, 100, 50_368] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0)
                .collect();
            let plain_max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            assert_eq!(max(&row), plain_max, "len {len}");
            let mut shifted = row.clone();
            let sum = exp_shifted_sum(&mut shifted, plain_max);
            // f32 sums in 16 lanes: within 1e-5 of the exact sum even over
            // a vocabulary-sized row.
            let mut exact = 0f64;
            for (s, x) in shifted.iter().zip(&row) {
                let e = ((x - plain_max) as f64).exp();
                assert!(ulps(*s, e) <= 2.0, "len {len}: exp({x} - {plain_max})");
                exact += e;
            }
            assert!(
                (sum as f64 - exact).abs() <= 1e-5 * exact.max(1.0),
                "len {len}: {sum} vs {exact}"
            );
            // The widest copy the processor runs gives the plain one's bits.
            let mut plain = row.clone();
            assert_eq!(
                exp_shifted_sum_body(&mut plain, plain_max).to_bits(),
                sum.to_bits()
            );
            assert_eq!(plain, shifted);
            assert_eq!(max_body(&row), max(&row));
        }
    }
}
