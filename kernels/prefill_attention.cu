// Prefill / chunked-prefill attention over the paged KV cache, flash-style: each CTA keeps a tile
// of BQ query rows of one head and walks the keys BK at a time with an online softmax, so no
// [queries x keys] matrix is ever stored. Causal and variable length: a sequence's query rows
// are positions pos0 .. pos0 + qlen - 1 and attend to every cached position up to their own,
// which includes prefix-cache blocks and earlier chunks (already in the cache, written by
// reshape_and_cache before this kernel runs). Also used for speculative verification rows.
//
// Grid (tiles, heads), 128 threads; the host lists every (sequence, first query row) tile.
// Thread layout: row r = tid / 4 of the tile, and quad c4 = tid % 4 owns key columns c4 + 4j and
// output dimensions c4 + 4i, so a row's softmax reductions are two shuffles within a quad.
// Arithmetic is f32 on CUDA cores (tensor-core MMA is the next step; see docs/architecture.md).
// CPU reference: backend/attention/mod.rs paged_attention.
#include "common.cuh"

#define PF_THREADS 128
#define BQ 32
#define BK 16

template <typename D, int HD>
__device__ void prefill_attention(u16* __restrict__ out, long out_stride, const u16* __restrict__ q, long q_stride,
                                  const u16* __restrict__ k_cache, const u16* __restrict__ v_cache,
                                  const int* __restrict__ block_tables, int max_blocks, int block_size,
                                  const int* __restrict__ tile_seq, const int* __restrict__ tile_q0,
                                  const int* __restrict__ seq_row, const int* __restrict__ seq_qlen,
                                  const int* __restrict__ seq_pos0, int num_heads, int num_kv_heads, float scale) {
    const int tile = blockIdx.x, h = blockIdx.y;
    const int kvh = h / (num_heads / num_kv_heads);
    const int s = tile_seq[tile], q0 = tile_q0[tile];
    const int rows = min(BQ, seq_qlen[s] - q0);
    const int pos0 = seq_pos0[s] + q0;  // position of the tile's first query row
    const int kv_len = pos0 + rows;     // keys this tile can see
    const long kv_row = (long)num_kv_heads * HD;
    const int* table = block_tables + (long)s * max_blocks;
    const int tid = threadIdx.x, r = tid >> 2, c4 = tid & 3;

    // +1 padding: rows of the tile map to different banks.
    __shared__ float s_q[BQ][HD + 1];
    __shared__ float s_k[BK][HD + 1];
    __shared__ float s_v[BK][HD + 1];
    __shared__ float s_p[BQ][BK + 1];

    for (int i = tid; i < BQ * HD; i += PF_THREADS) {
        const int rr = i / HD, d = i % HD;
        s_q[rr][d] = rr < rows ? D::to_float(q[(long)(seq_row[s] + q0 + rr) * q_stride + (long)h * HD + d]) * scale : 0.f;
    }

    constexpr int DPT = HD / 4;  // output dimensions per thread
    float acc[DPT];
#pragma unroll
    for (int i = 0; i < DPT; i++) acc[i] = 0.f;
    float m = NEG_INF, l = 0.f;
    const int qpos = pos0 + r;

    for (int k0 = 0; k0 < kv_len; k0 += BK) {
        __syncthreads();  // the previous tile's s_k / s_v / s_p are no longer read
        // Load BK keys and values: 8 values (16 bytes) per load.
        for (int i = tid; i < BK * HD / 8; i += PF_THREADS) {
            const int kk = i / (HD / 8), d = (i % (HD / 8)) * 8, pos = k0 + kk;
            float kv[8], vv[8];
            if (pos < kv_len) {
                const long base = ((long)table[pos / block_size] * block_size + pos % block_size) * kv_row + (long)kvh * HD + d;
                load8<D>(k_cache + base, kv);
                load8<D>(v_cache + base, vv);
            } else {
#pragma unroll
                for (int e = 0; e < 8; e++) kv[e] = vv[e] = 0.f;
            }
#pragma unroll
            for (int e = 0; e < 8; e++) {
                s_k[kk][d + e] = kv[e];
                s_v[kk][d + e] = vv[e];
            }
        }
        __syncthreads();

        // Scores of row r against keys c4 + 4j.
        float sc[BK / 4];
#pragma unroll
        for (int j = 0; j < BK / 4; j++) sc[j] = 0.f;
#pragma unroll 8
        for (int d = 0; d < HD; d++) {
            const float qd = s_q[r][d];
#pragma unroll
            for (int j = 0; j < BK / 4; j++) sc[j] += qd * s_k[c4 + 4 * j][d];
        }
        float tile_max = NEG_INF;
#pragma unroll
        for (int j = 0; j < BK / 4; j++) {
            const int kp = k0 + c4 + 4 * j;
            if (kp > qpos || kp >= kv_len) sc[j] = NEG_INF;
            tile_max = fmaxf(tile_max, sc[j]);
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        // Key 0 is visible to every row, so m is finite after the first tile.
        const float m_new = fmaxf(m, tile_max);
        const float alpha = __expf(m - m_new);
        float psum = 0.f;
#pragma unroll
        for (int j = 0; j < BK / 4; j++) {
            const float p = sc[j] == NEG_INF ? 0.f : __expf(sc[j] - m_new);
            s_p[r][c4 + 4 * j] = p;
            psum += p;
        }
        psum += __shfl_xor_sync(0xffffffffu, psum, 1);
        psum += __shfl_xor_sync(0xffffffffu, psum, 2);
        l = l * alpha + psum;
        m = m_new;
#pragma unroll
        for (int i = 0; i < DPT; i++) acc[i] *= alpha;
        __syncwarp();  // a row's four threads are in one warp: s_p row r is complete
#pragma unroll
        for (int c = 0; c < BK; c++) {
            const float p = s_p[r][c];
#pragma unroll
            for (int i = 0; i < DPT; i++) acc[i] += p * s_v[c][c4 + 4 * i];
        }
    }
    if (r < rows) {
        const float inv = 1.f / l;
        u16* o = out + (long)(seq_row[s] + q0 + r) * out_stride + (long)h * HD;
#pragma unroll
        for (int i = 0; i < DPT; i++) o[c4 + 4 * i] = D::from_float(acc[i] * inv);
    }
}

#define PREFILL(D, name, HD)                                                                                      \
    extern "C" __global__ void __launch_bounds__(PF_THREADS) prefill_attention_##name##_hd##HD(                   \
        u16* out, long out_stride, const u16* q, long q_stride, const u16* k_cache, const u16* v_cache,           \
        const int* block_tables, int max_blocks, int block_size, const int* tile_seq, const int* tile_q0,         \
        const int* seq_row, const int* seq_qlen, const int* seq_pos0, int num_heads, int num_kv_heads,            \
        float scale) {                                                                                            \
        prefill_attention<D, HD>(out, out_stride, q, q_stride, k_cache, v_cache, block_tables, max_blocks,        \
                                 block_size, tile_seq, tile_q0, seq_row, seq_qlen, seq_pos0, num_heads,           \
                                 num_kv_heads, scale);                                                            \
    }
#define PREFILL_ALL(D, name) PREFILL(D, name, 64) PREFILL(D, name, 128)
FOR_EACH_DTYPE(PREFILL_ALL)
