// Paged attention over the KV cache [N, P, Hkv, D]: the twins of reference.decode_attention and
// reference.prefill_attention. Templated on the head dim D (64 or 128) and the group size
// G = H / Hkv, so the per-head state of a group lives in registers. A sequence's token t lives in
// block table[t / P], row t % P. Scores, softmax and sums are float32 with the running maximum
// subtracted (online softmax), as in the reference.

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float dot4(float4 a, float4 b) {
    return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}

// ---------------------------------------------------------------- decode: one query per sequence
// Grid (S, Hkv, B): block (split, kvh, b) reads split `split` of sequence b's cached tokens for key/
// value head kvh once and serves the G query heads of that group from the same loads (GQA). Splitting
// the context over S blocks (flash-decoding) keeps the GPU busy at batch 1, where B * Hkv blocks alone
// would be 3. Each block leaves its partial sums and running max/sum in part_acc [B, H, S, D] and
// part_ml [B, H, S, 2]; the last of the S blocks of (b, kvh) to finish, told by an atomic counter
// (split_counters [B, Hkv], zero between launches: the last block resets it), merges them into out.
// With S == 1 the block writes out directly.
//
// Inside a block, LPT = D / 4 lanes read one token's row (a float4 each, coalesced), so a warp reads
// 32 / LPT tokens at once and each lane group keeps its own online-softmax state; the groups merge
// through shared memory at the end.
constexpr int DECODE_WARPS = 4;
constexpr int DECODE_UNROLL = 4;  // tokens per lane group in flight per iteration
constexpr int MAX_SPLITS = 32;

template <int D, int G>
__global__ void __launch_bounds__(DECODE_WARPS * 32)
decode_attention(const float* __restrict__ q, const float* __restrict__ k_cache,
                 const float* __restrict__ v_cache, const int* __restrict__ block_tables,
                 const int* __restrict__ context_lens, float* __restrict__ out,
                 float* __restrict__ part_acc, float* __restrict__ part_ml, int* __restrict__ split_counters,
                 int M, int P, int Hkv, float scale) {
    constexpr int LPT = D / 4;
    constexpr int GROUPS = DECODE_WARPS * (32 / LPT);
    __shared__ float s_m[GROUPS][G], s_l[GROUPS][G];
    __shared__ float4 s_acc[GROUPS][G][LPT];
    __shared__ float s_weight[G][MAX_SPLITS], s_total[G];
    __shared__ bool s_last;

    const int split = blockIdx.x, S = gridDim.x, kvh = blockIdx.y, b = blockIdx.z, H = Hkv * G;
    const int lane = threadIdx.x & 31;
    const int group = threadIdx.x / LPT, sub = lane % LPT;
    const int L = context_lens[b];
    const int chunk = (L + S - 1) / S;
    const int t_begin = split * chunk, t_end = min(L, t_begin + chunk);
    const int* table = block_tables + (long long)b * M;
    const float4* k4 = reinterpret_cast<const float4*>(k_cache);
    const float4* v4 = reinterpret_cast<const float4*>(v_cache);
    const float4* q4 = reinterpret_cast<const float4*>(q) + ((long long)b * H + kvh * G) * LPT + sub;
    const long long bh0 = (long long)b * H + kvh * G;  // the group's first head, as a row of out

    float4 qv[G], acc[G];
    float m[G], l[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const float4 x = q4[g * LPT];
        qv[g] = make_float4(x.x * scale, x.y * scale, x.z * scale, x.w * scale);
        acc[g] = make_float4(0.f, 0.f, 0.f, 0.f);
        m[g] = NEG_INF;
        l[g] = 0.f;
    }

    // the trip count is the same for every thread, so the shuffles below never lose a partner
    for (int t0 = t_begin; t0 < t_end; t0 += GROUPS * DECODE_UNROLL) {
        float4 kv[DECODE_UNROLL], vv[DECODE_UNROLL];
        bool valid[DECODE_UNROLL];
#pragma unroll
        for (int u = 0; u < DECODE_UNROLL; ++u) {
            const int t = t0 + u * GROUPS + group;
            valid[u] = t < t_end;
            kv[u] = vv[u] = make_float4(0.f, 0.f, 0.f, 0.f);
            if (valid[u]) {
                const long long row = ((long long)table[t / P] * P + t % P) * Hkv + kvh;
                kv[u] = k4[row * LPT + sub];
                vv[u] = v4[row * LPT + sub];
            }
        }
        // scores of the iteration's tokens, then one online-softmax update per head: the
        // reductions interleave and the serial chain is one rescale per iteration, not per token
        float s[DECODE_UNROLL][G];
#pragma unroll
        for (int u = 0; u < DECODE_UNROLL; ++u)
#pragma unroll
            for (int g = 0; g < G; ++g) s[u][g] = dot4(qv[g], kv[u]);
#pragma unroll
        for (int o = LPT / 2; o > 0; o >>= 1)
#pragma unroll
            for (int u = 0; u < DECODE_UNROLL; ++u)
#pragma unroll
                for (int g = 0; g < G; ++g) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], o);
#pragma unroll
        for (int g = 0; g < G; ++g) {
            float m_new = m[g];
#pragma unroll
            for (int u = 0; u < DECODE_UNROLL; ++u)
                if (valid[u]) m_new = fmaxf(m_new, s[u][g]);
            if (m_new == NEG_INF) continue;  // none of this group's tokens yet
            const float alpha = expf(m[g] - m_new);
            float l_new = l[g] * alpha;
            float4 a = make_float4(acc[g].x * alpha, acc[g].y * alpha, acc[g].z * alpha, acc[g].w * alpha);
#pragma unroll
            for (int u = 0; u < DECODE_UNROLL; ++u) {
                if (!valid[u]) continue;
                const float p = expf(s[u][g] - m_new);
                l_new += p;
                a = make_float4(a.x + p * vv[u].x, a.y + p * vv[u].y, a.z + p * vv[u].z, a.w + p * vv[u].w);
            }
            acc[g] = a;
            l[g] = l_new;
            m[g] = m_new;
        }
    }

    // 1. merge the lane groups of this block
#pragma unroll
    for (int g = 0; g < G; ++g) {
        if (sub == 0) {
            s_m[group][g] = m[g];
            s_l[group][g] = l[g];
        }
        s_acc[group][g][sub] = acc[g];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * LPT; i += blockDim.x) {
        const int g = i / LPT, c = i % LPT;
        float m_all = NEG_INF;
        for (int x = 0; x < GROUPS; ++x) m_all = fmaxf(m_all, s_m[x][g]);
        float l_all = 0.f;
        float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
        if (m_all != NEG_INF) {
            for (int x = 0; x < GROUPS; ++x) {
                if (s_m[x][g] == NEG_INF) continue;
                const float w = expf(s_m[x][g] - m_all);
                const float4 part = s_acc[x][g][c];
                l_all += s_l[x][g] * w;
                a = make_float4(a.x + part.x * w, a.y + part.y * w, a.z + part.z * w, a.w + part.w * w);
            }
        }
        const long long bh = bh0 + g;
        if (S == 1) {
            const float inv = l_all > 0.f ? 1.f / l_all : 0.f;  // an empty context (padding) gives 0
            reinterpret_cast<float4*>(out)[bh * LPT + c] = make_float4(a.x * inv, a.y * inv, a.z * inv, a.w * inv);
        } else {
            reinterpret_cast<float4*>(part_acc)[(bh * S + split) * LPT + c] = a;
            if (c == 0) {
                part_ml[(bh * S + split) * 2] = m_all;
                part_ml[(bh * S + split) * 2 + 1] = l_all;
            }
        }
    }
    if (S == 1) return;

    // 2. the last block of (b, kvh) to finish merges the S splits (CUDA's threadFenceReduction)
    __threadfence();  // this block's partials are visible to all before it counts itself done
    __syncthreads();
    if (threadIdx.x == 0) {
        int* counter = split_counters + (long long)b * Hkv + kvh;
        s_last = atomicAdd(counter, 1) == S - 1;
        if (s_last) *counter = 0;  // ready for the next launch
    }
    __syncthreads();
    if (!s_last) return;
    for (int i = threadIdx.x; i < G * S; i += blockDim.x) {  // __ldcg: other blocks' writes, not L1
        const int g = i / S, s = i % S;
        s_weight[g][s] = __ldcg(part_ml + ((bh0 + g) * S + s) * 2);
    }
    __syncthreads();
    if (threadIdx.x < G) {
        const int g = threadIdx.x;
        float m_all = NEG_INF;
        for (int s = 0; s < S; ++s) m_all = fmaxf(m_all, s_weight[g][s]);
        float total = 0.f;
        for (int s = 0; s < S; ++s) {
            const float w = s_weight[g][s] == NEG_INF ? 0.f : expf(s_weight[g][s] - m_all);
            total += __ldcg(part_ml + ((bh0 + g) * S + s) * 2 + 1) * w;
            s_weight[g][s] = w;
        }
        s_total[g] = total;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * LPT; i += blockDim.x) {
        const int g = i / LPT, c = i % LPT;
        const float4* parts = reinterpret_cast<const float4*>(part_acc) + (bh0 + g) * S * LPT + c;
        float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
        for (int s = 0; s < S; ++s) {
            const float4 p = __ldcg(parts + s * LPT);
            const float w = s_weight[g][s];
            a = make_float4(a.x + p.x * w, a.y + p.y * w, a.z + p.z * w, a.w + p.w * w);
        }
        const float inv = s_total[g] > 0.f ? 1.f / s_total[g] : 0.f;
        reinterpret_cast<float4*>(out)[(bh0 + g) * LPT + c] = make_float4(a.x * inv, a.y * inv, a.z * inv, a.w * inv);
    }
}

// ---------------------------------------------------------------- prefill: causal, varlen, packed
// Grid (tiles, Hkv): a tile is up to QT = ROWS / G consecutive queries of one sequence (tile_seq,
// tile_q0 say which), i.e. ROWS query-head rows of one KV group, which share every K/V tile loaded
// into shared memory. Sequence b owns rows query_start[b]:query_start[b+1] of q; its queries are the
// last of its context_lens[b] cached tokens, so query i sits at position L - q_len + i and sees keys
// 0..that position. Each warp owns ROWS_PER_WARP rows; lane j scores key j of a KEY_TILE, then the
// lanes split D for P.V.
// Shared memory (dynamic): q [ROWS][D], keys transposed [D][KEY_TILE], values [KEY_TILE][D],
// probabilities [ROWS][KEY_TILE].
constexpr int PREFILL_WARPS = 4;
constexpr int ROWS_PER_WARP = 8;
constexpr int PREFILL_ROWS = PREFILL_WARPS * ROWS_PER_WARP;
constexpr int KEY_TILE = 32;

template <int D, int G>
__global__ void __launch_bounds__(PREFILL_WARPS * 32)
prefill_attention(const float* __restrict__ q, const float* __restrict__ k_cache,
                  const float* __restrict__ v_cache, const int* __restrict__ block_tables,
                  const int* __restrict__ query_start, const int* __restrict__ context_lens,
                  const int* __restrict__ tile_seq, const int* __restrict__ tile_q0,
                  float* __restrict__ out, int M, int P, int Hkv, float scale) {
    constexpr int QT = PREFILL_ROWS / G;
    constexpr int DPL = D / 32;  // dims per lane in P.V
    constexpr int D4 = D / 4;
    extern __shared__ float smem[];
    float* q_s = smem;
    float* kt_s = q_s + PREFILL_ROWS * D;
    float* v_s = kt_s + D * KEY_TILE;
    float* p_s = v_s + KEY_TILE * D;

    const int kvh = blockIdx.y, H = Hkv * G;
    const int b = tile_seq[blockIdx.x], q0 = tile_q0[blockIdx.x];
    const int qs = query_start[b], q_len = query_start[b + 1] - qs;
    const int first_pos = context_lens[b] - q_len;  // position of the sequence's first query
    const int n_q = min(QT, q_len - q0);
    const int last_pos = first_pos + q0 + n_q - 1;  // the furthest key any row of the tile sees
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int* table = block_tables + (long long)b * M;
    const float4* k4 = reinterpret_cast<const float4*>(k_cache);
    const float4* v4 = reinterpret_cast<const float4*>(v_cache);

    for (int i = threadIdx.x; i < PREFILL_ROWS * D; i += blockDim.x) {
        const int r = i / D, d = i % D, qi = r / G;
        q_s[i] = qi < n_q ? q[((long long)(qs + q0 + qi) * H + kvh * G + r % G) * D + d] * scale : 0.f;
    }
    int position[ROWS_PER_WARP];  // of each row's query; -1 (sees nothing) past the tile's queries
    float m[ROWS_PER_WARP], l[ROWS_PER_WARP], acc[ROWS_PER_WARP][DPL];
#pragma unroll
    for (int i = 0; i < ROWS_PER_WARP; ++i) {
        const int qi = (warp * ROWS_PER_WARP + i) / G;
        position[i] = qi < n_q ? first_pos + q0 + qi : -1;
        m[i] = NEG_INF;
        l[i] = 0.f;
#pragma unroll
        for (int c = 0; c < DPL; ++c) acc[i][c] = 0.f;
    }

    for (int k0 = 0; k0 <= last_pos; k0 += KEY_TILE) {
        __syncthreads();  // every warp is done with the previous tile (and q_s is written)
        for (int i = threadIdx.x; i < KEY_TILE * D4; i += blockDim.x) {
            // keys: consecutive threads take consecutive keys, so the transposed stores miss no bank
            const int j = i % KEY_TILE, c = i / KEY_TILE, t = k0 + j;
            float4 kv = make_float4(0.f, 0.f, 0.f, 0.f);
            if (t <= last_pos) kv = k4[(((long long)table[t / P] * P + t % P) * Hkv + kvh) * D4 + c];
            kt_s[(4 * c) * KEY_TILE + j] = kv.x;
            kt_s[(4 * c + 1) * KEY_TILE + j] = kv.y;
            kt_s[(4 * c + 2) * KEY_TILE + j] = kv.z;
            kt_s[(4 * c + 3) * KEY_TILE + j] = kv.w;
            // values: consecutive threads take consecutive float4 of one key (coalesced)
            const int jv = i / D4, cv = i % D4, tv = k0 + jv;
            float4 vv = make_float4(0.f, 0.f, 0.f, 0.f);
            if (tv <= last_pos) vv = v4[(((long long)table[tv / P] * P + tv % P) * Hkv + kvh) * D4 + cv];
            reinterpret_cast<float4*>(v_s)[jv * D4 + cv] = vv;
        }
        __syncthreads();

        float s[ROWS_PER_WARP];
#pragma unroll
        for (int i = 0; i < ROWS_PER_WARP; ++i) s[i] = 0.f;
        for (int d = 0; d < D; d += 4) {
            const float k_0 = kt_s[d * KEY_TILE + lane], k_1 = kt_s[(d + 1) * KEY_TILE + lane];
            const float k_2 = kt_s[(d + 2) * KEY_TILE + lane], k_3 = kt_s[(d + 3) * KEY_TILE + lane];
#pragma unroll
            for (int i = 0; i < ROWS_PER_WARP; ++i) {
                const float4 qv = *reinterpret_cast<const float4*>(q_s + (warp * ROWS_PER_WARP + i) * D + d);
                s[i] = fmaf(qv.x, k_0, fmaf(qv.y, k_1, fmaf(qv.z, k_2, fmaf(qv.w, k_3, s[i]))));
            }
        }
#pragma unroll
        for (int i = 0; i < ROWS_PER_WARP; ++i) {
            if (k0 + lane > position[i]) s[i] = NEG_INF;
            float tile_max = s[i];
            for (int o = 16; o > 0; o >>= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, o));
            const float m_new = fmaxf(m[i], tile_max);
            const bool seen = m_new != NEG_INF;  // false only for rows that see no key yet
            const float p = seen ? expf(s[i] - m_new) : 0.f;
            const float alpha = seen ? expf(m[i] - m_new) : 1.f;
            float p_sum = p;
            for (int o = 16; o > 0; o >>= 1) p_sum += __shfl_xor_sync(0xffffffffu, p_sum, o);
            l[i] = l[i] * alpha + p_sum;
            m[i] = m_new;
#pragma unroll
            for (int c = 0; c < DPL; ++c) acc[i][c] *= alpha;
            p_s[(warp * ROWS_PER_WARP + i) * KEY_TILE + lane] = p;
        }
        __syncwarp();
        for (int j = 0; j < KEY_TILE; ++j) {
            float vd[DPL];
#pragma unroll
            for (int c = 0; c < DPL; ++c) vd[c] = v_s[j * D + lane + 32 * c];
#pragma unroll
            for (int i = 0; i < ROWS_PER_WARP; ++i) {
                const float p = p_s[(warp * ROWS_PER_WARP + i) * KEY_TILE + j];
#pragma unroll
                for (int c = 0; c < DPL; ++c) acc[i][c] = fmaf(p, vd[c], acc[i][c]);
            }
        }
        __syncwarp();
    }

#pragma unroll
    for (int i = 0; i < ROWS_PER_WARP; ++i) {
        const int r = warp * ROWS_PER_WARP + i, qi = r / G;
        if (qi >= n_q) continue;
        float* dst = out + ((long long)(qs + q0 + qi) * H + kvh * G + r % G) * D;
#pragma unroll
        for (int c = 0; c < DPL; ++c) dst[lane + 32 * c] = acc[i][c] / l[i];
    }
}
