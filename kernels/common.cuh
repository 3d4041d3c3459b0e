// Shared by every kernel file: the loader (rust/core/src/backend/cuda/compile.rs) pastes this in
// place of `#include "common.cuh"`, because NVRTC gets one source string and no toolkit headers.
// bf16 and f16 values are stored as 16-bit integers and converted with single PTX instructions
// (sm_80+), so no cuda_bf16.h / cuda_fp16.h is needed at run time.

typedef unsigned short u16;
typedef unsigned int u32;
#define NEG_INF __int_as_float(0xff800000)

struct Bf16 {
    static __device__ __forceinline__ float to_float(u16 x) { return __uint_as_float(((u32)x) << 16); }
    static __device__ __forceinline__ u16 from_float(float f) {
        u16 r;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
        return r;
    }
};

struct F16 {
    static __device__ __forceinline__ float to_float(u16 x) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
        return f;
    }
    static __device__ __forceinline__ u16 from_float(float f) {
        u16 r;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
        return r;
    }
};

// Eight 16-bit values (one 16-byte load) to floats.
template <typename D>
__device__ __forceinline__ void load8(const u16* p, float* out) {
    uint4 v = *reinterpret_cast<const uint4*>(p);
    u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = D::to_float((u16)(w[i] & 0xffff));
        out[2 * i + 1] = D::to_float((u16)(w[i] >> 16));
    }
}

// N (2 or 4) 16-bit values to floats, one 4- or 8-byte load.
template <typename D, int N>
__device__ __forceinline__ void load_n(const u16* p, float* out) {
    if (N == 4) {
        uint2 v = *reinterpret_cast<const uint2*>(p);
        out[0] = D::to_float((u16)(v.x & 0xffff));
        out[1] = D::to_float((u16)(v.x >> 16));
        out[2] = D::to_float((u16)(v.y & 0xffff));
        out[3] = D::to_float((u16)(v.y >> 16));
    } else {
        u32 v = *reinterpret_cast<const u32*>(p);
        out[0] = D::to_float((u16)(v & 0xffff));
        out[1] = D::to_float((u16)(v >> 16));
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

struct SumOp {
    static __device__ __forceinline__ float warp(float v) { return warp_sum(v); }
    static __device__ __forceinline__ float identity() { return 0.f; }
};
struct MaxOp {
    static __device__ __forceinline__ float warp(float v) { return warp_max(v); }
    static __device__ __forceinline__ float identity() { return NEG_INF; }
};

// Reduce over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. Starts with a barrier, so `scratch` can be reused by consecutive calls.
template <typename Op>
__device__ __forceinline__ float block_reduce(float v, float* scratch /* 32 floats */) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = Op::warp(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : Op::identity();
    return Op::warp(v);
}

__device__ __forceinline__ float block_sum(float v, float* scratch) { return block_reduce<SumOp>(v, scratch); }
__device__ __forceinline__ float block_max(float v, float* scratch) { return block_reduce<MaxOp>(v, scratch); }

// Instantiates `extern "C"` entry points for both 16-bit types: NAME##_bf16 and NAME##_f16.
#define FOR_EACH_DTYPE(M) M(Bf16, bf16) M(F16, f16)
