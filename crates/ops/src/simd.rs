//! Runtime CPU dispatch and branch-free math for the fused CPU kernels.
//!
//! Release builds target baseline x86-64 (SSE2). Each leaf kernel is written once as an
//! `#[inline(always)]` generic body over [`Isa`]; [`dispatch!`] compiles it a second time
//! inside a `#[target_feature(enable = "avx2,fma")]` function and picks that one when the
//! CPU has both (checked once by `std`, then a cached load). The bodies are plain loops over
//! fixed-width lane arrays that LLVM vectorises; sums use one accumulator per lane, in a
//! fixed order, so results do not depend on scheduling.

/// Instruction set a kernel body is compiled for.
pub(crate) trait Isa: Copy {
    /// `a * b + c` (one rounding with FMA).
    fn madd(a: f32, b: f32, c: f32) -> f32;
}

/// Baseline x86-64 / other targets: separate multiply and add.
#[derive(Clone, Copy)]
pub(crate) struct Plain;

impl Isa for Plain {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// AVX2 + FMA, only instantiated inside functions compiled with those features.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Fma;

#[cfg(target_arch = "x86_64")]
impl Isa for Fma {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// Whether the AVX2 + FMA bodies run on this CPU.
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `dispatch!(fn name(args) -> R = body)` defines `name`, which calls `body::<Fma>` compiled
/// for AVX2 + FMA when the CPU has them, else `body::<Plain>`.
macro_rules! dispatch {
    ($vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:ident) => {
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if $crate::simd::has_avx2_fma() {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? {
                    $body::<$crate::simd::Fma>($($arg),*)
                }
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                return unsafe { fast($($arg),*) };
            }
            $body::<$crate::simd::Plain>($($arg),*)
        }
    };
}
pub(crate) use dispatch;

/// Lanes of the accumulator arrays (one AVX register of f32).
pub(crate) const L: usize = 8;

/// `Σ x` with one accumulator per lane (fixed order).
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; L];
    let mut chunks = x.chunks_exact(L);
    for c in &mut chunks {
        for l in 0..L {
            acc[l] += c[l];
        }
    }
    let mut s = chunks.remainder().iter().sum::<f32>();
    for a in acc {
        s += a;
    }
    s
}

/// `Σ a·b` with one accumulator per lane (fixed order).
#[inline(always)]
pub(crate) fn dot<I: Isa>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; L];
    let mut ca = a.chunks_exact(L);
    let mut cb = b.chunks_exact(L);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..L {
            acc[l] = I::madd(x[l], y[l], acc[l]);
        }
    }
    let mut s = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s = I::madd(*x, *y, s);
    }
    for a in acc {
        s += a;
    }
    s
}

dispatch!(pub(crate) fn dot_rows(a: &[f32], b: &[f32]) -> f32 = dot);

/// `max x` (−∞ for an empty slice; NaN-propagating like a sequential scan is not needed:
/// a NaN input gives a NaN loss either way).
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; L];
    let mut chunks = x.chunks_exact(L);
    for c in &mut chunks {
        for l in 0..L {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in chunks.remainder().iter().chain(acc.iter()) {
        m = if v > m { v } else { m };
    }
    m
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5·2²³: adding and subtracting it rounds to the nearest integer (ties to even).
const ROUND: f32 = 12_582_912.0;

/// `eˣ` to about 1 ulp for x in [−87.3, 88] (clamped outside: `exp(−∞)` gives 1e−38, not 0,
/// so callers skip masked entries themselves). Cephes' `expf` polynomial, branch-free.
#[inline(always)]
pub(crate) fn exp<I: Isa>(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.0);
    // `t`'s low mantissa bits hold n = round(x·log₂e) (|n| ≤ 127 ≪ 2²²), so both the float
    // n and 2ⁿ come from it without a float-to-int conversion: Rust's saturating `as i32`
    // does not vectorise (LLVM emits a scalar convert, compare and cmov per lane).
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = I::madd(n, -LN2_HI, x);
    let r = I::madd(n, -LN2_LO, r);
    let mut p = 1.987_569_2e-4f32;
    p = I::madd(p, r, 1.398_2e-3);
    p = I::madd(p, r, 8.333_452e-3);
    p = I::madd(p, r, 4.166_579_6e-2);
    p = I::madd(p, r, 1.666_666_5e-1);
    p = I::madd(p, r, 0.5);
    let y = I::madd(p * r, r, r) + 1.0;
    // n is an integer in [−126, 127]: 2ⁿ has the biased exponent n + 127 and no mantissa.
    let scale = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    y * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    dispatch!(fn exp_all(x: &[f32], out: &mut [f32]) = exp_body);
    #[inline(always)]
    fn exp_body<I: Isa>(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = exp::<I>(v);
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let x: Vec<f32> = (0..20_000).map(|i| -87.0 + i as f32 * 0.00875).collect();
        let mut out = vec![0f32; x.len()];
        exp_all(&x, &mut out);
        for (v, e) in x.iter().zip(&out) {
            let want = (*v as f64).exp();
            let rel = ((*e as f64 - want) / want).abs();
            assert!(rel < 2.5e-7, "exp({v}) = {e}, libm {want}, rel {rel}");
        }
        let mut plain = vec![0f32; x.len()];
        exp_body::<Plain>(&x, &mut plain);
        for (a, b) in plain.iter().zip(&out) {
            assert!(((a - b) / b).abs() < 2.5e-7);
        }
    }

    #[test]
    fn lane_sums_match_f64() {
        let x: Vec<f32> = (0..1003)
            .map(|i| ((i * 37) % 101) as f32 * 0.01 - 0.5)
            .collect();
        let want: f64 = x.iter().map(|&v| v as f64).sum();
        assert!((sum(&x) as f64 - want).abs() < 1e-4);
        let d: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        assert!((dot::<Plain>(&x, &x) as f64 - d).abs() < 1e-3);
        assert_eq!(max(&x), x.iter().cloned().fold(f32::MIN, f32::max));
    }
}
