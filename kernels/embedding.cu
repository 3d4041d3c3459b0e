// Embedding gather into the f32 residual stream. Token ids are checked on the host before the
// step (an id outside the vocabulary fails only its request); the kernel still refuses to read
// outside the table. CPU reference: PackedLinear::row.
#include "common.cuh"

template <typename D>
__device__ void embedding(float* __restrict__ out, const u16* __restrict__ table, const int* __restrict__ tokens,
                          int hidden, int vocab) {
    const long t = blockIdx.x;
    const int tok = tokens[t];
    if (tok < 0 || tok >= vocab) return;
    const u16* src = table + (long)tok * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[t * hidden + i] = D::to_float(src[i]);
}

#define EMBED(D, name)                                                                                  \
    extern "C" __global__ void embedding_##name(float* out, const u16* table, const int* tokens,        \
                                                int hidden, int vocab) {                                \
        embedding<D>(out, table, tokens, hidden, vocab);                                                \
    }
FOR_EACH_DTYPE(EMBED)
