// Fused residual add + RMSNorm (vLLM's fused_add_rms_norm): the residual stream stays in f32 so
// that the GPU sums the same values as the CPU reference (backend/cpu.rs rms_norm), and the
// normalised row is written in the GEMM's input type. CPU reference: cpu::rms_norm.
#include "common.cuh"

// One block per output row b. Input row: rows ? rows[b] : b.
//   residual[row] += delta[row] (when delta is not null), written back when delta is not null;
//   out[b] = residual[row] / rms(residual[row]) * weight.
template <typename D>
__device__ void add_rms_norm(u16* __restrict__ out, float* __restrict__ residual, const u16* __restrict__ delta,
                             const float* __restrict__ weight, const int* __restrict__ rows, int hidden, float eps) {
    __shared__ float scratch[32];
    const int b = blockIdx.x;
    const long row = rows ? rows[b] : b;
    float* r = residual + row * hidden;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = r[i];
        if (delta) {
            v += D::to_float(delta[row * hidden + i]);
            r[i] = v;
        }
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        out[(long)b * hidden + i] = D::from_float(r[i] * inv * weight[i]);
}

#define RMS(D, name)                                                                                     \
    extern "C" __global__ void add_rms_norm_##name(u16* out, float* residual, const u16* delta,          \
                                                   const float* weight, const int* rows, int hidden,     \
                                                   float eps) {                                          \
        add_rms_norm<D>(out, residual, delta, weight, rows, hidden, eps);                               \
    }
FOR_EACH_DTYPE(RMS)
