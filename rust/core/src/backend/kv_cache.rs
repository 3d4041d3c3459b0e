//! What the CPU's paged KV cache holds: f32, or bf16 (half the bytes). A bf16 model keeps its K
//! and V in bf16, as HF transformers' bf16 runs and vLLM's `kv_cache_dtype="auto"` do (the
//! model's own dtype); an f32 or quantized model keeps f32, which its goldens are measured with.
//! Attention reads either: each kernel widens bf16 to f32 as it loads (exact), so its sums are
//! f32 as before, and a decode step after a long history reads half the bytes.

use std::ops::Range;

use half::bf16;

/// How K and V are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    Bf16,
}

impl KvDtype {
    /// The name the Python API and `horae bench` print (torch's).
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "float32",
            KvDtype::Bf16 => "bfloat16",
        }
    }
}

/// A value of the cache as the kernels read it. `BF16` lets a kernel that is generic over the
/// element pick its widening load at compile time.
pub trait KvElem: Copy + Send + Sync + 'static {
    const BF16: bool;
    fn to_f32(self) -> f32;
}

impl KvElem for f32 {
    const BF16: bool = false;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl KvElem for bf16 {
    const BF16: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        widen(self)
    }
}

/// bf16 is f32's top half: widening is a shift, exact (a NaN stays a NaN).
#[inline(always)]
fn widen(x: bf16) -> f32 {
    f32::from_bits((x.to_bits() as u32) << 16)
}

/// `x` rounded to bf16, to nearest even (as `half` and `vcvtneps2bf16` round); a NaN stays a NaN
/// (its top mantissa bit set, so that rounding cannot carry it to infinity). Branch-free, so a
/// row's conversions vectorize: with `half::bf16::from_f32`'s branches, writing a 512-token
/// prompt's K and V cost its prefill 6% (SmolLM2, Zen 4).
#[inline(always)]
fn round(x: f32) -> bf16 {
    let b = x.to_bits();
    let nearest = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    let nan = (b >> 16) | 0x40;
    bf16::from_bits(if x.is_nan() { nan } else { nearest } as u16)
}

/// One layer's K (or V) buffer, `[blocks, block_size, kv_heads, head_dim]`.
pub enum KvBuf {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl KvBuf {
    pub fn zeros(dtype: KvDtype, len: usize) -> Self {
        match dtype {
            KvDtype::F32 => KvBuf::F32(vec![0.0; len]),
            KvDtype::Bf16 => KvBuf::Bf16(vec![bf16::ZERO; len]),
        }
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.rows().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn rows(&self) -> KvRows<'_> {
        match self {
            KvBuf::F32(x) => KvRows::F32(x),
            KvBuf::Bf16(x) => KvRows::Bf16(x),
        }
    }

    /// `x` into the values from `at`, rounded to nearest even where the cache is bf16 (as the
    /// weights are rounded).
    pub fn write(&mut self, at: usize, x: &[f32]) {
        match self {
            KvBuf::F32(buf) => buf[at..at + x.len()].copy_from_slice(x),
            KvBuf::Bf16(buf) => buf[at..at + x.len()].iter_mut().zip(x).for_each(|(b, &x)| *b = round(x)),
        }
    }

    /// Values `src` copied to start at `dst` (copy-on-write of a block).
    pub fn copy_within(&mut self, src: Range<usize>, dst: usize) {
        match self {
            KvBuf::F32(buf) => buf.copy_within(src, dst),
            KvBuf::Bf16(buf) => buf.copy_within(src, dst),
        }
    }
}

/// One layer's K (or V) as attention reads it.
#[derive(Clone, Copy)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl KvRows<'_> {
    pub fn len(&self) -> usize {
        match self {
            KvRows::F32(x) => x.len(),
            KvRows::Bf16(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `out.len()` values from `at`, widened to f32.
    pub fn read(&self, at: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            KvRows::F32(x) => out.copy_from_slice(&x[at..at + n]),
            KvRows::Bf16(x) => out.iter_mut().zip(&x[at..at + n]).for_each(|(o, &b)| *o = widen(b)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_values_round_to_nearest_even_and_read_back_widened() {
        let mut buf = KvBuf::zeros(KvDtype::Bf16, 8);
        // 1 + 2^-8 is halfway between bf16's 1 and 1 + 2^-7: even goes down; 1 + 3 * 2^-8 up.
        buf.write(2, &[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -2.5]);
        let mut out = [9.0f32; 4];
        buf.rows().read(1, &mut out);
        assert_eq!(out, [0.0, 1.0, 1.0 + 4.0 / 256.0, -2.5]);
        buf.copy_within(2..4, 6);
        buf.rows().read(6, &mut out[..2]);
        assert_eq!(out[..2], [1.0, 1.0 + 4.0 / 256.0]);
        assert!(buf.len() == 8 && matches!(buf.rows(), KvRows::Bf16(_)));
    }

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
                assert!(ours.is_nan() && widen(ours).is_nan(), "{v:?} -> {ours:?}");
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "{v:e}");
                assert_eq!(widen(ours), theirs.to_f32());
            }
        }
    }
}
