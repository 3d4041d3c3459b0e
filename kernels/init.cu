// Random weights for benchmarks that need a model's shapes but not its values (the 8B-shaped
// Llama in gpu_check): a counter-based hash, so filling 16 GB takes milliseconds and needs no
// host memory. Not used by real models.
#include "common.cuh"

__device__ __forceinline__ u32 mix(unsigned long long x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return (u32)x;
}

template <typename D>
__device__ void fill_uniform(u16* out, long n, float scale, unsigned long long seed) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float u = (mix(seed * 0x9e3779b97f4a7c15ull + (unsigned long long)i) >> 8) * (1.f / 16777216.f);
        out[i] = D::from_float((2.f * u - 1.f) * scale);
    }
}

#define FILL(D, name)                                                                                    \
    extern "C" __global__ void fill_uniform_##name(u16* out, long n, float scale, unsigned long long seed) { \
        fill_uniform<D>(out, n, scale, seed);                                                            \
    }
FOR_EACH_DTYPE(FILL)
