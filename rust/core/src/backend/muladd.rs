//! Multiply-add as the instruction set does it, for kernels written once in plain arithmetic and
//! compiled per instruction set (inlined into `#[target_feature]` functions): fused where there
//! is FMA, `a * b + c` where there is not (`mul_add` without FMA is a slow library call).

pub trait MulAdd {
    fn madd(a: f32, b: f32, c: f32) -> f32;
}

/// `a * b + c`: the portable kernels.
pub struct Plain;
impl MulAdd for Plain {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// One FMA: only inside code compiled with the `fma` feature (AVX2 + FMA, AVX-512).
#[cfg(target_arch = "x86_64")]
pub struct Fused;
#[cfg(target_arch = "x86_64")]
impl MulAdd for Fused {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}
