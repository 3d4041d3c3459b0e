// Bias add for the fused QKV projection of models that have one (Qwen2): x[t] += bias, in the
// activation dtype with an f32 add. CPU reference: cpu::add_bias.
#include "common.cuh"

template <typename D>
__device__ void add_bias(u16* x, const float* bias, int n) {
    u16* row = x + (long)blockIdx.x * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) row[i] = D::from_float(D::to_float(row[i]) + bias[i]);
}

#define BIAS(D, name)                                                                   \
    extern "C" __global__ void add_bias_##name(u16* x, const float* bias, int n) {     \
        add_bias<D>(x, bias, n);                                                       \
    }
FOR_EACH_DTYPE(BIAS)
