// Paged-attention decode: one query token per sequence against its paged KV cache.
//
// Grid (kv_heads, seqs, partitions), 128 threads. One CTA serves all the query heads that share
// a KV head (GQA: each K/V row is read from memory once for the whole group) over one partition
// of PARTITION context tokens. Long contexts are split over partitions (split-K, as vLLM's
// paged_attention_v2 and FlashDecoding do) so that a small batch still fills the GPU; a second
// kernel, paged_decode_reduce, merges the partitions by their max logits and exp sums.
// Inputs are bf16/f16, all arithmetic is f32. CPU reference: backend/attention/mod.rs paged_attention.
#include "common.cuh"

#define DEC_THREADS 128
#define DEC_WARPS 4
#define PARTITION 512
#define MAX_GROUP 8
// Q.K: a token is handled by 8 lanes, each reading 16 bytes (8 values) per load.
#define LANES_PER_TOKEN 8
#define TOKENS_PER_WARP (32 / LANES_PER_TOKEN)

template <typename D, int HD, int BS>
__device__ void paged_decode(u16* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_max,
                             float* __restrict__ part_sum, const u16* __restrict__ q, const int* __restrict__ q_rows,
                             long q_stride, long out_stride, const u16* __restrict__ k_cache,
                             const u16* __restrict__ v_cache, const int* __restrict__ block_tables,
                             int max_blocks, const int* __restrict__ ctx_lens, int num_heads, int num_kv_heads,
                             float scale, int max_parts) {
    const int kvh = blockIdx.x, seq = blockIdx.y, part = blockIdx.z;
    const int group = num_heads / num_kv_heads;
    const int ctx = ctx_lens[seq];
    const int start = part * PARTITION;
    if (start >= ctx) return;
    const int n = min(PARTITION, ctx - start);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long kv_row = (long)num_kv_heads * HD;
    const int* table = block_tables + (long)seq * max_blocks;

    __shared__ __align__(16) float s_q[MAX_GROUP][HD];
    __shared__ float s_logits[MAX_GROUP][PARTITION];
    __shared__ float s_max[MAX_GROUP], s_sum[MAX_GROUP];
    __shared__ float s_acc[DEC_WARPS][MAX_GROUP][HD];

    const long qrow = q_rows[seq];
    for (int i = tid; i < group * HD; i += DEC_THREADS) {
        const int g = i / HD, d = i % HD;
        s_q[g][d] = D::to_float(q[qrow * q_stride + (long)(kvh * group + g) * HD + d]) * scale;
    }
    __syncthreads();

    // Q.K for every token of the partition, all heads of the group at once.
    {
        constexpr int LOADS = HD / (8 * LANES_PER_TOKEN);  // 16-byte loads per lane per token
        const int sub = lane % LANES_PER_TOKEN, slot = lane / LANES_PER_TOKEN;
        // The loop bound is the same for the whole warp (the shuffles need every lane); a slot
        // past the end computes on zeros and writes nothing.
        for (int t0 = warp * TOKENS_PER_WARP; t0 < n; t0 += DEC_WARPS * TOKENS_PER_WARP) {
            const int t = t0 + slot;
            const bool live = t < n;
            float k[LOADS][8];
            if (live) {
                const int pos = start + t;
                const long base = ((long)table[pos / BS] * BS + pos % BS) * kv_row + (long)kvh * HD;
#pragma unroll
                for (int l = 0; l < LOADS; l++) load8<D>(k_cache + base + (l * LANES_PER_TOKEN + sub) * 8, k[l]);
            } else {
#pragma unroll
                for (int l = 0; l < LOADS; l++)
#pragma unroll
                    for (int e = 0; e < 8; e++) k[l][e] = 0.f;
            }
#pragma unroll
            for (int g = 0; g < MAX_GROUP; g++) {
                if (g >= group) break;
                float acc = 0.f;
#pragma unroll
                for (int l = 0; l < LOADS; l++) {
                    const float4* qv = reinterpret_cast<const float4*>(&s_q[g][(l * LANES_PER_TOKEN + sub) * 8]);
                    const float4 a = qv[0], b = qv[1];
                    acc += a.x * k[l][0] + a.y * k[l][1] + a.z * k[l][2] + a.w * k[l][3] + b.x * k[l][4] +
                           b.y * k[l][5] + b.z * k[l][6] + b.w * k[l][7];
                }
#pragma unroll
                for (int o = LANES_PER_TOKEN / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
                if (live && sub == 0) s_logits[g][t] = acc;
            }
        }
    }
    __syncthreads();

    // Softmax statistics, one warp per head.
    for (int g = warp; g < group; g += DEC_WARPS) {
        float m = NEG_INF;
        for (int t = lane; t < n; t += 32) m = fmaxf(m, s_logits[g][t]);
        m = warp_max(m);
        float s = 0.f;
        for (int t = lane; t < n; t += 32) {
            const float e = __expf(s_logits[g][t] - m);
            s_logits[g][t] = e;
            s += e;
        }
        s = warp_sum(s);
        if (lane == 0) {
            s_max[g] = m;
            s_sum[g] = s;
        }
    }
    __syncthreads();

    // P.V: each warp takes every DEC_WARPS-th token, each lane HD/32 dimensions of it.
    constexpr int DPL = HD / 32;
    float acc[MAX_GROUP][DPL];
#pragma unroll
    for (int g = 0; g < MAX_GROUP; g++)
#pragma unroll
        for (int e = 0; e < DPL; e++) acc[g][e] = 0.f;
    constexpr int UNROLL = 4;  // loads in flight per lane
    for (int t0 = warp * UNROLL; t0 < n; t0 += DEC_WARPS * UNROLL) {
        float v[UNROLL][DPL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int t = t0 + u;
            if (t < n) {
                const int pos = start + t;
                const long base = ((long)table[pos / BS] * BS + pos % BS) * kv_row + (long)kvh * HD;
                load_n<D, DPL>(v_cache + base + lane * DPL, v[u]);
            } else {
#pragma unroll
                for (int e = 0; e < DPL; e++) v[u][e] = 0.f;
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int t = min(t0 + u, n - 1);
            const float live = t0 + u < n ? 1.f : 0.f;
#pragma unroll
            for (int g = 0; g < MAX_GROUP; g++) {
                if (g >= group) break;
                const float p = s_logits[g][t] * live;
#pragma unroll
                for (int e = 0; e < DPL; e++) acc[g][e] += p * v[u][e];
            }
        }
    }
#pragma unroll
    for (int g = 0; g < MAX_GROUP; g++) {
        if (g >= group) break;
#pragma unroll
        for (int e = 0; e < DPL; e++) s_acc[warp][g][lane * DPL + e] = acc[g][e];
    }
    __syncthreads();

    const int parts = (ctx + PARTITION - 1) / PARTITION;
    for (int i = tid; i < group * HD; i += DEC_THREADS) {
        const int g = i / HD, d = i % HD, h = kvh * group + g;
        float o = 0.f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; w++) o += s_acc[w][g][d];
        o /= s_sum[g];
        if (parts == 1) {
            out[qrow * out_stride + (long)h * HD + d] = D::from_float(o);
        } else {
            const long idx = ((long)seq * num_heads + h) * max_parts + part;
            part_out[idx * HD + d] = o;
            if (d == 0) {
                part_max[idx] = s_max[g];
                part_sum[idx] = s_sum[g];
            }
        }
    }
}

// Merge the partitions of each (sequence, head): grid (heads, seqs), 128 threads.
template <typename D, int HD>
__device__ void paged_decode_reduce(u16* __restrict__ out, const float* __restrict__ part_out,
                                    const float* __restrict__ part_max, const float* __restrict__ part_sum,
                                    const int* __restrict__ q_rows, long out_stride,
                                    const int* __restrict__ ctx_lens, int num_heads, int max_parts) {
    const int h = blockIdx.x, seq = blockIdx.y;
    const int parts = (ctx_lens[seq] + PARTITION - 1) / PARTITION;
    if (parts <= 1) return;  // written by paged_decode directly
    extern __shared__ float s_w[];  // max_parts weights
    __shared__ float scratch[32];
    const long base = ((long)seq * num_heads + h) * max_parts;
    float m = NEG_INF;
    for (int p = threadIdx.x; p < parts; p += blockDim.x) m = fmaxf(m, part_max[base + p]);
    m = block_max(m, scratch);
    float total = 0.f;
    for (int p = threadIdx.x; p < parts; p += blockDim.x) {
        const float w = part_sum[base + p] * __expf(part_max[base + p] - m);
        s_w[p] = w;
        total += w;
    }
    total = block_sum(total, scratch);  // synchronises, so s_w is complete
    for (int d = threadIdx.x; d < HD; d += blockDim.x) {
        float o = 0.f;
        for (int p = 0; p < parts; p++) o += s_w[p] * part_out[(base + p) * HD + d];
        out[(long)q_rows[seq] * out_stride + (long)h * HD + d] = D::from_float(o / total);
    }
}

#define DECODE(D, name, HD, BS)                                                                               \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS) paged_decode_##name##_hd##HD##_bs##BS(           \
        u16* out, float* part_out, float* part_max, float* part_sum, const u16* q, const int* q_rows,           \
        long q_stride, long out_stride, const u16* k_cache, const u16* v_cache, const int* block_tables,        \
        int max_blocks, const int* ctx_lens, int num_heads, int num_kv_heads, float scale, int max_parts) {     \
        paged_decode<D, HD, BS>(out, part_out, part_max, part_sum, q, q_rows, q_stride, out_stride, k_cache,    \
                                v_cache, block_tables, max_blocks, ctx_lens, num_heads, num_kv_heads, scale,    \
                                max_parts);                                                                     \
    }
#define REDUCE(D, name, HD)                                                                                    \
    extern "C" __global__ void paged_decode_reduce_##name##_hd##HD(                                            \
        u16* out, const float* part_out, const float* part_max, const float* part_sum, const int* q_rows,      \
        long out_stride, const int* ctx_lens, int num_heads, int max_parts) {                                  \
        paged_decode_reduce<D, HD>(out, part_out, part_max, part_sum, q_rows, out_stride, ctx_lens, num_heads, \
                                   max_parts);                                                                 \
    }
#define DECODE_ALL(D, name) \
    DECODE(D, name, 64, 16) DECODE(D, name, 64, 32) DECODE(D, name, 128, 16) DECODE(D, name, 128, 32) \
    REDUCE(D, name, 64) REDUCE(D, name, 128)
FOR_EACH_DTYPE(DECODE_ALL)
