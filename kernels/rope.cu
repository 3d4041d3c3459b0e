// Rotary embedding, rotate-half (GPT-NeoX / HF Llama) layout, in place on the fused QKV rows:
// the first `rot_heads` heads of each row (query heads then key heads) are rotated. Angles are
// position * inv_freq in f64 (inv_freq carries llama3 / linear scaling, computed on the host by
// ModelConfig::rope_inv_freq), as the CPU reference does. CPU reference: cpu::rope.
#include "common.cuh"

// One block per token; thread j handles frequency j for every head.
template <typename D>
__device__ void rope_neox(u16* __restrict__ qkv, long row_stride, const int* __restrict__ positions,
                          const double* __restrict__ inv_freq, int rot_heads, int head_dim) {
    const int t = blockIdx.x, half = head_dim / 2;
    u16* row = qkv + t * row_stride;
    const double pos = positions[t];
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        double s, c;
        sincos(pos * inv_freq[j], &s, &c);
        const float cf = (float)c, sf = (float)s;
        for (int h = 0; h < rot_heads; h++) {
            u16* x = row + h * head_dim;
            const float x1 = D::to_float(x[j]), x2 = D::to_float(x[j + half]);
            x[j] = D::from_float(x1 * cf - x2 * sf);
            x[j + half] = D::from_float(x2 * cf + x1 * sf);
        }
    }
}

#define ROPE(D, name)                                                                                  \
    extern "C" __global__ void rope_neox_##name(u16* qkv, long row_stride, const int* positions,       \
                                                const double* inv_freq, int rot_heads, int head_dim) { \
        rope_neox<D>(qkv, row_stride, positions, inv_freq, rot_heads, head_dim);                       \
    }
FOR_EACH_DTYPE(ROPE)
