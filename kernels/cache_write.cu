// reshape_and_cache: the step's new K and V rows (read in place from the fused QKV output, row
// stride `src_stride`) into their cache slots. Cache layout per layer, as on the CPU
// (model/llama.rs KvCache): [num_blocks, block_size, num_kv_heads, head_dim]; slot =
// block * block_size + offset, and a negative slot means "do not write" (padding).
#include "common.cuh"

extern "C" __global__ void reshape_and_cache(u16* __restrict__ k_cache, u16* __restrict__ v_cache,
                                             const u16* __restrict__ k, const u16* __restrict__ v,
                                             long src_stride, const long* __restrict__ slots, int row) {
    const long t = blockIdx.x;
    const long slot = slots[t];
    if (slot < 0) return;
    // 8 values (16 bytes) a thread: rows are kv_heads * head_dim, a multiple of 8.
    const uint4* ks = reinterpret_cast<const uint4*>(k + t * src_stride);
    const uint4* vs = reinterpret_cast<const uint4*>(v + t * src_stride);
    uint4* kd = reinterpret_cast<uint4*>(k_cache + slot * row);
    uint4* vd = reinterpret_cast<uint4*>(v_cache + slot * row);
    for (int i = threadIdx.x; i < row / 8; i += blockDim.x) {
        kd[i] = ks[i];
        vd[i] = vs[i];
    }
}
