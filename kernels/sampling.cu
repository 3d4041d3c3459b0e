// Sampling on the GPU, so that only token ids cross PCIe for greedy and common sampling.
// One block per row of f32 logits (1024 threads for argmax, 512 for sampling). Each thread owns a contiguous chunk of the
// vocabulary, which makes "first token whose running sum passes u" a block-wide scan.
// CPU reference: sample::argmax and sample::candidates/distribution.
#include "common.cuh"

#define SAMPLE_THREADS 1024
// The rejection sampler keeps more state per thread: at 1024 threads ptxas capped it at 32
// registers and spilled; 512 threads leave it room and still cover the vocabulary in chunks.
#define DRAW_THREADS 512

// The (value, index) pair with the largest value and, among equal values, the lowest index,
// over the warp; every lane gets it.
__device__ __forceinline__ void warp_argmax(float& best, int& idx) {
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > best || (ov == best && oi < idx)) {
            best = ov;
            idx = oi;
        }
    }
}

// Block b reads logits row rows[b] and writes out[b].
// Greedy: index of the largest logit, the lowest index on ties (as sample::argmax).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) argmax_f32(int* __restrict__ out,
                                                                       const float* __restrict__ logits,
                                                                       const int* __restrict__ rows, int vocab) {
    __shared__ float s_val[32];
    __shared__ int s_idx[32];
    const float* x = logits + (long)rows[blockIdx.x] * vocab;
    float best = NEG_INF;
    int idx = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = x[i];
        if (v > best) {  // i increases, so the first maximum is kept
            best = v;
            idx = i;
        }
    }
    warp_argmax(best, idx);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        s_val[warp] = best;
        s_idx[warp] = idx;
    }
    __syncthreads();
    if (warp == 0) {
        best = lane < (int)(blockDim.x >> 5) ? s_val[lane] : NEG_INF;
        idx = lane < (int)(blockDim.x >> 5) ? s_idx[lane] : 0x7fffffff;
        warp_argmax(best, idx);
        if (lane == 0) out[blockIdx.x] = idx == 0x7fffffff ? 0 : idx;
    }
}

// Exclusive prefix sum of one value per thread over the block, and the block total.
__device__ float block_exclusive_scan(float v, float* total, float* scratch /* 32 */) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = incl;
    __syncthreads();
    float before = 0.f, all = 0.f;
    for (int w = 0; w < warps; w++) {
        const float s = scratch[w];
        if (w < warp) before += s;
        all += s;
    }
    *total = all;
    return before + incl - v;
}

// Temperature, top-k, min-p and top-p sampling without sorting, by rejection (as FlashInfer
// does): draw from the distribution restricted to logits above `lo`; if the draw is outside the
// allowed set, every token at or below it is too (the set is "the largest logits"), so raise
// `lo` to it and draw again. The accepted draw follows the allowed set's renormalised
// distribution exactly. The allowed set matches sample::candidates: the top_k largest (total
// mass taken over them), those with weight >= min_p * max, and the nucleus whose mass strictly
// above the token is < top_p. uniforms: `rounds` values in [0,1) per row from the request's
// seeded generator; if they run out (a vanishing case) the argmax, always allowed, is taken.
// Ties between equal logits are treated as one group, where the CPU breaks them by index.
extern "C" __global__ void __launch_bounds__(DRAW_THREADS, 1) sample_f32(
    int* __restrict__ out, const float* __restrict__ logits, const int* __restrict__ rows, int vocab,
    const float* __restrict__ temperature,
    const int* __restrict__ top_k, const float* __restrict__ top_p, const float* __restrict__ min_p,
    const float* __restrict__ uniforms, int rounds) {
    __shared__ float scratch[32];
    __shared__ int s_tok;
    const int row = blockIdx.x;
    const float* x = logits + (long)rows[row] * vocab;
    const float inv_t = 1.f / temperature[row];
    const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
    const int begin = min(vocab, (int)threadIdx.x * chunk), end = min(vocab, begin + chunk);

    float mx = NEG_INF;
    for (int i = begin; i < end; i++) mx = fmaxf(mx, x[i]);
    mx = block_max(mx, scratch);

    // The top-k threshold: the largest logit value `kth` with at least k logits >= it, found by
    // bisection on the order-preserving integer image of the floats (32 steps).
    float kth = NEG_INF;
    const int k = top_k[row];
    if (k > 0 && k < vocab) {
        unsigned lo_key = 0x007fffffu, hi_key = 0xffffffffu;  // keys of -inf .. +NaN
        while (lo_key < hi_key) {
            const unsigned mid = lo_key + (hi_key - lo_key + 1) / 2;
            const float t = __int_as_float((int)(mid & 0x80000000u ? mid ^ 0x80000000u : ~mid));
            float cnt = 0.f;
            for (int i = begin; i < end; i++) cnt += x[i] >= t ? 1.f : 0.f;
            cnt = block_sum(cnt, scratch);
            if (cnt >= (float)k) lo_key = mid; else hi_key = mid - 1;
        }
        kth = __int_as_float((int)(lo_key & 0x80000000u ? lo_key ^ 0x80000000u : ~lo_key));
    }
    float total = 0.f;  // mass of the top-k set (the whole vocabulary without top-k)
    for (int i = begin; i < end; i++)
        if (x[i] >= kth) total += __expf((x[i] - mx) * inv_t);
    total = block_sum(total, scratch);
    const float floor = min_p[row];  // weights are relative to the max, whose weight is 1
    const float p = top_p[row];

    float lo = NEG_INF;
    bool lo_set = false;
    for (int round = 0; round < rounds; round++) {
        // Draw from the weights of tokens with logit >= kth and > lo.
        float local = 0.f;
        for (int i = begin; i < end; i++)
            if (x[i] >= kth && (!lo_set || x[i] > lo)) local += __expf((x[i] - mx) * inv_t);
        float mass;
        const float before = block_exclusive_scan(local, &mass, scratch);
        if (threadIdx.x == 0) s_tok = -1;
        __syncthreads();
        const float target = uniforms[(long)row * rounds + round] * mass;
        if (local > 0.f && target >= before && (target < before + local || before + local >= mass)) {
            float acc = before;
            int last = -1;
            for (int i = begin; i < end; i++) {
                if (x[i] >= kth && (!lo_set || x[i] > lo)) {
                    last = i;
                    acc += __expf((x[i] - mx) * inv_t);
                    if (acc > target) break;
                }
            }
            atomicMax(&s_tok, last);  // rounding can leave two candidates: take one of them
        }
        __syncthreads();
        const int tok = s_tok;
        if (tok < 0) break;
        const float lt = x[tok];
        // Is it allowed? Mass strictly above it, against the top-k total.
        float above = 0.f;
        for (int i = begin; i < end; i++)
            if (x[i] > lt && x[i] >= kth) above += __expf((x[i] - mx) * inv_t);
        above = block_sum(above, scratch);
        const float w = __expf((lt - mx) * inv_t);
        if (w >= floor && (p >= 1.f || above / total < p)) {
            if (threadIdx.x == 0) out[row] = tok;
            return;
        }
        lo = lt;
        lo_set = true;
    }
    // Out of uniforms: the argmax (first maximum) is always allowed.
    int first = 0x7fffffff;
    for (int i = begin; i < end; i++)
        if (x[i] == mx) { first = i; break; }
    const float f = -block_max(-(float)first, scratch);
    if (threadIdx.x == 0) out[row] = (int)f;
}
