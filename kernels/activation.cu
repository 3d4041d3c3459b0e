// SiLU-and-mul of the fused gate/up projection: out[t] = silu(gate[t]) * up[t], with each input
// row holding gate then up (`[tokens, 2 * inter]`). CPU reference: cpu::silu_mul_rows.
#include "common.cuh"

template <typename D>
__device__ void silu_and_mul(u16* __restrict__ out, const u16* __restrict__ gate_up, int inter) {
    const long t = blockIdx.x;
    const u16* g = gate_up + t * 2 * inter;
    const u16* u = g + inter;
    for (int i = threadIdx.x; i < inter; i += blockDim.x) {
        const float x = D::to_float(g[i]);
        out[t * inter + i] = D::from_float(x / (1.f + __expf(-x)) * D::to_float(u[i]));
    }
}

#define SILU(D, name)                                                                               \
    extern "C" __global__ void silu_and_mul_##name(u16* out, const u16* gate_up, int inter) {       \
        silu_and_mul<D>(out, gate_up, inter);                                                       \
    }
FOR_EACH_DTYPE(SILU)
