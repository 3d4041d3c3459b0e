//! What the CPU's paged KV cache holds: f32, or bf16 (half the bytes). A bf16 model keeps its K
//! and V in bf16, as HF transformers' bf16 runs and vLLM's `kv_cache_dtype="auto"` do (the
//! model's own dtype); an f32 or quantized model keeps f32, which its goldens are measured with.
//! Attention reads either: each kernel widens bf16 to f32 as it loads (exact), so its sums are
//! f32 as before, and a decode step after a long history reads half the bytes.

use std::ops::Range;

use half::bf16;

use super::huge::{try_mapped, HugeBuf};

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

/// The cache's bf16 as f32 (`backend::bf16`'s widening).
#[inline(always)]
fn widen(x: bf16) -> f32 {
    super::bf16::widen(x.to_bits())
}

/// One layer's K (or V) buffer, `[blocks, block_size, kv_heads, head_dim]`.
///
/// Mapped memory (`huge::try_mapped`): untouched pages cost nothing until a block is written,
/// and a dropped cache goes back to the kernel.
pub enum KvBuf {
    F32(HugeBuf<f32>),
    Bf16(HugeBuf<bf16>),
}

impl KvBuf {
    /// `len` zeros, or `None` where the machine cannot hold them.
    pub fn zeros(dtype: KvDtype, len: usize) -> Option<Self> {
        Some(match dtype {
            KvDtype::F32 => KvBuf::F32(try_mapped(len)?),
            KvDtype::Bf16 => KvBuf::Bf16(try_mapped(len)?),
        })
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
            KvBuf::Bf16(buf) => {
                buf[at..at + x.len()].iter_mut().zip(x).for_each(|(b, &x)| *b = bf16::from_bits(super::bf16::round(x)))
            }
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
        let mut buf = KvBuf::zeros(KvDtype::Bf16, 8).unwrap();
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
}
