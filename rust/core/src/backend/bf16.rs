//! bf16 as the CPU kernels hold it (weights, the KV cache, attention's operands): the top 16 bits
//! of an f32. Widening is a shift, exact; rounding is to nearest even. One place for both, scalar
//! and at each vector width, so that every kernel reads and writes bf16 the same way.

/// The f32 that bf16 `bits` hold: exact (a NaN stays a NaN).
#[inline(always)]
pub fn widen(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// `x` rounded to bf16 bits, to nearest even (as `half` and `vcvtneps2bf16` round); a NaN stays a
/// NaN (its top mantissa bit set, so that rounding cannot carry it to infinity). Branch-free, so a
/// row's conversions vectorize: with `half::bf16::from_f32`'s branches, writing a 512-token
/// prompt's K and V cost its prefill 6% (SmolLM2, Zen 4).
#[inline(always)]
pub fn round(x: f32) -> u16 {
    let b = x.to_bits();
    let nearest = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    let nan = (b >> 16) | 0x40;
    (if x.is_nan() { nan } else { nearest }) as u16
}

/// The widening at vector widths. Each is `inline(always)` and carries no target feature of its
/// own: it is inlined into the kernel that calls it, which runs with the features named.
#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use std::arch::x86_64::*;

    /// Sixteen bf16 values (a 256-bit register, one per 16-bit lane) widened to f32.
    ///
    /// # Safety
    /// The caller runs with AVX-512F.
    #[inline(always)]
    pub unsafe fn widen16(h: __m256i) -> __m512 {
        // SAFETY: passed on from the caller.
        unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h))) }
    }

    /// Sixteen bf16 values from `p`, widened to f32.
    ///
    /// # Safety
    /// 32 bytes from `p` are readable; the caller runs with AVX-512F.
    #[inline(always)]
    pub unsafe fn load16(p: *const u16) -> __m512 {
        // SAFETY: passed on from the caller.
        unsafe { widen16(_mm256_loadu_si256(p as *const __m256i)) }
    }

    /// Eight bf16 values from `p`, widened to f32.
    ///
    /// # Safety
    /// 16 bytes from `p` are readable; the caller runs with AVX2.
    #[inline(always)]
    pub unsafe fn load8(p: *const u16) -> __m256 {
        // SAFETY: passed on from the caller.
        unsafe {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// The branch-free rounding against `half`'s, over every class of value: both round to
    /// nearest even, keep infinities and signed zeros, and leave NaNs NaN.
    #[test]
    fn rounding_agrees_with_half() {
        let mut x = 0x1234_5678u32;
        let mut values: Vec<f32> = (0..100_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                f32::from_bits(x)
            })
            .collect();
        values.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN_POSITIVE, 1.0 + 1.0 / 256.0]);
        values.extend([f32::NAN, f32::from_bits(0x7F80_0001), f32::from_bits(0xFFFF_FFFF)]);
        for v in values {
            let (ours, theirs) = (round(v), bf16::from_f32(v));
            if v.is_nan() {
                assert!(bf16::from_bits(ours).is_nan() && widen(ours).is_nan(), "{v:?} -> {ours:#x}");
            } else {
                assert_eq!(ours, theirs.to_bits(), "{v:e}");
                assert_eq!(widen(ours), theirs.to_f32());
            }
        }
    }

    /// The vector widenings against the scalar one, on whichever of them this CPU runs.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_widening_matches_the_scalar() {
        let bits: Vec<u16> =
            (0..16u16).map(|i| round(i as f32 * -1.37 + 0.01 * (i * i) as f32)).chain([0x7FC1]).collect();
        let want: Vec<f32> = bits.iter().map(|&b| widen(b)).collect();
        // The lanes read from `at` are the scalar widenings of the same values, bit for bit.
        let same = |got: &[f32], at: usize| got.iter().zip(&want[at..]).all(|(g, w)| g.to_bits() == w.to_bits());
        if is_x86_feature_detected!("avx2") {
            #[target_feature(enable = "avx2")]
            fn eight(p: &[u16]) -> [f32; 8] {
                assert!(p.len() >= 8);
                // SAFETY: eight values from `p`; AVX2 runs (checked by the caller).
                unsafe { std::mem::transmute::<std::arch::x86_64::__m256, [f32; 8]>(x86::load8(p.as_ptr())) }
            }
            for at in [0, 8, 9] {
                // SAFETY: AVX2 was detected.
                assert!(same(&unsafe { eight(&bits[at..]) }, at), "load8 at {at}");
            }
        }
        if is_x86_feature_detected!("avx512f") {
            #[target_feature(enable = "avx512f")]
            fn sixteen(p: &[u16]) -> [f32; 16] {
                assert!(p.len() >= 16);
                // SAFETY: sixteen values from `p`; AVX-512F runs (checked by the caller).
                unsafe { std::mem::transmute::<std::arch::x86_64::__m512, [f32; 16]>(x86::load16(p.as_ptr())) }
            }
            for at in [0, 1] {
                // SAFETY: AVX-512F was detected.
                assert!(same(&unsafe { sixteen(&bits[at..]) }, at), "load16 at {at}");
            }
        }
        println!(
            "bf16 widening checked: avx2 {}, avx512f {}",
            is_x86_feature_detected!("avx2"),
            is_x86_feature_detected!("avx512f")
        );
    }
}
