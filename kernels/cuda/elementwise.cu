// Gather, normalisation, rotary, SwiGLU, KV-write and argmax kernels of the CuPy backend
// (kernels/gpu.py). Each is the twin of a numpy function in kernels/reference.py. Shape letters as
// in kernels/interface.py (T tokens, E width, F MLP width, H heads, D head dim, V vocabulary);
// index arrays are int32.

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// table [V, E], ids [T] -> out [T, E]
extern "C" __global__ void embedding(const float* __restrict__ table, const int* __restrict__ ids,
                                     float* __restrict__ out, int T, int E) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)T * E) return;
    const long long t = i / E;
    out[i] = table[(long long)ids[t] * E + (i - t * E)];
}

// The sum of v over the block, returned to every thread. scratch: 32 floats of shared memory.
__device__ float block_sum(float v, float* scratch) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.f;
    return warp_sum(v);
}

// One block per row: normed = x / sqrt(mean(x^2) + eps) * weight, where x = residual (+ delta).
// Each thread takes one float4 of the row where the block is wide enough (the launch sizes it so),
// so a row costs one round of loads and one block reduction: at decode a step normalises a few rows
// 2L times, and latency is all there is. With a delta the sum is stored too: the residual add
// fused with the next norm. Needs E % 4 == 0 and 16-byte aligned rows.
__device__ void rms_norm_row(const float* __restrict__ residual, const float* __restrict__ delta,
                             const float* __restrict__ weight, float* __restrict__ summed,
                             float* __restrict__ normed, int E, float eps) {
    __shared__ float scratch[32];
    const int E4 = E >> 2;
    const long long row = (long long)blockIdx.x * E4;
    const float4* r4 = reinterpret_cast<const float4*>(residual) + row;
    const float4* d4 = reinterpret_cast<const float4*>(delta) + row;
    float4* s4 = reinterpret_cast<float4*>(summed) + row;
    float squares = 0.f;
    for (int c = threadIdx.x; c < E4; c += blockDim.x) {
        float4 x = r4[c];
        if (delta != nullptr) {
            const float4 d = d4[c];
            x = make_float4(x.x + d.x, x.y + d.y, x.z + d.z, x.w + d.w);
            s4[c] = x;
        }
        squares += x.x * x.x + x.y * x.y + x.z * x.z + x.w * x.w;
    }
    const float denom = sqrtf(block_sum(squares, scratch) / E + eps);
    const float4* w4 = reinterpret_cast<const float4*>(weight);
    float4* n4 = reinterpret_cast<float4*>(normed) + row;
    for (int c = threadIdx.x; c < E4; c += blockDim.x) {
        const float4 x = delta != nullptr ? s4[c] : r4[c];
        const float4 w = w4[c];
        n4[c] = make_float4(x.x / denom * w.x, x.y / denom * w.y, x.z / denom * w.z, x.w / denom * w.w);
    }
}

// x [T, E] -> [T, E]
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ weight,
                                    float* __restrict__ out, int E, float eps) {
    rms_norm_row(x, nullptr, weight, nullptr, out, E, eps);
}

// residual, delta [T, E] -> summed, normed [T, E]
extern "C" __global__ void add_rms_norm(const float* __restrict__ residual, const float* __restrict__ delta,
                                        const float* __restrict__ weight, float* __restrict__ summed,
                                        float* __restrict__ normed, int E, float eps) {
    rms_norm_row(residual, delta, weight, summed, normed, E, eps);
}

// Rotates the pair (j, j + half) of one head's row src into dst by position * inv_freq: the angle
// and its sine and cosine in double (inv_freq being reference.rope_angles' own float64 values, so
// long positions keep their precision), then rounded to float.
__device__ __forceinline__ void rotate_pair(const float* src, float* dst, int j, int half, int position,
                                            double inv_freq) {
    double sin_angle, cos_angle;
    sincos((double)position * inv_freq, &sin_angle, &cos_angle);
    const float c = (float)cos_angle, s = (float)sin_angle;
    const float x1 = src[j], x2 = src[j + half];
    dst[j] = x1 * c - x2 * s;
    dst[j + half] = x2 * c + x1 * s;
}

// x [T, H, D] with element strides (stride_t, stride_h, 1) -> out [T, H, D] contiguous; one thread
// per rotated pair (j, j + D/2).
extern "C" __global__ void rope(const float* __restrict__ x, const int* __restrict__ positions,
                                const double* __restrict__ inv_freq, float* __restrict__ out,
                                int T, int H, int D, long long stride_t, long long stride_h) {
    const int half = D / 2;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)T * H * half) return;
    const int j = (int)(i % half);
    const long long th = i / half;
    const int h = (int)(th % H);
    const long long t = th / H;
    rotate_pair(x + t * stride_t + h * stride_h, out + th * D, j, half, positions[t], inv_freq[j]);
}

// A layer's RoPE and KV write in one launch (reference.rope_write_kv): q [T, H, D] -> q_out [T, H, D]
// rotated and contiguous; k rotated straight into k_cache [N, P, Hkv, D] at each token's slot, v
// copied beside it (a negative slot writes nothing). q, k, v have element strides (stride_t,
// stride_h, 1): views of the qkv product. One thread per pair (j, j + D/2) of each of the H + Hkv
// heads of a token; thread pairs of a key head also carry the two value elements at j, j + D/2.
extern "C" __global__ void rope_write_kv(const float* __restrict__ q, const float* __restrict__ k,
                                         const float* __restrict__ v, const int* __restrict__ positions,
                                         const double* __restrict__ inv_freq, float* __restrict__ q_out,
                                         float* __restrict__ k_cache, float* __restrict__ v_cache,
                                         const int* __restrict__ slots, int T, int H, int Hkv, int D,
                                         long long q_stride_t, long long q_stride_h,
                                         long long k_stride_t, long long k_stride_h,
                                         long long v_stride_t, long long v_stride_h) {
    const int half = D / 2;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)T * (H + Hkv) * half) return;
    const int j = (int)(i % half);
    const long long th = i / half;
    const int h = (int)(th % (H + Hkv));
    const long long t = th / (H + Hkv);
    if (h < H) {
        rotate_pair(q + t * q_stride_t + h * q_stride_h, q_out + (t * H + h) * D, j, half, positions[t], inv_freq[j]);
        return;
    }
    const int slot = slots[t];
    if (slot < 0) return;
    const int kh = h - H;
    const long long row = ((long long)slot * Hkv + kh) * D;
    rotate_pair(k + t * k_stride_t + kh * k_stride_h, k_cache + row, j, half, positions[t], inv_freq[j]);
    const float* value = v + t * v_stride_t + kh * v_stride_h;
    v_cache[row + j] = value[j];
    v_cache[row + j + half] = value[j + half];
}

// gate_up [T, 2F] (gate | up side by side) -> out [T, F] = silu(gate) * up
extern "C" __global__ void silu_mul(const float* __restrict__ gate_up, float* __restrict__ out, int T, int F) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)T * F) return;
    const long long t = i / F;
    const long long f = i - t * F;
    const float g = gate_up[t * 2 * F + f], u = gate_up[t * 2 * F + F + f];
    out[i] = g / (1.f + expf(-g)) * u;
}

// k, v [T, Hkv, D] with element strides (stride_t, stride_h, 1) -> caches [N, P, Hkv, D] at each
// token's slot. A negative slot (a padding row of a captured batch) writes nothing.
extern "C" __global__ void write_kv(float* __restrict__ k_cache, float* __restrict__ v_cache,
                                    const float* __restrict__ k, const float* __restrict__ v,
                                    const int* __restrict__ slots, int T, int Hkv, int D,
                                    long long k_stride_t, long long k_stride_h,
                                    long long v_stride_t, long long v_stride_h) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)T * Hkv * D) return;
    const int d = (int)(i % D);
    const int h = (int)((i / D) % Hkv);
    const long long t = i / ((long long)D * Hkv);
    const int slot = slots[t];
    if (slot < 0) return;
    const long long dst = ((long long)slot * Hkv + h) * D + d;
    k_cache[dst] = k[t * k_stride_t + h * k_stride_h + d];
    v_cache[dst] = v[t * v_stride_t + h * v_stride_h + d];
}

// logits [B, V] -> ids [B]: the first index of each row's maximum, as numpy.argmax; one block per row.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int* __restrict__ ids, int V) {
    __shared__ float best_value[32];
    __shared__ int best_index[32];
    const float* row = logits + (long long)blockIdx.x * V;
    float value = NEG_INF;
    int index = V;  // "none yet"; a row of -inf answers 0, as numpy does
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        if (row[i] > value) {
            value = row[i];
            index = i;
        }
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int round = 0; round < 2; ++round) {
        for (int o = 16; o > 0; o >>= 1) {
            const float other_value = __shfl_xor_sync(0xffffffffu, value, o);
            const int other_index = __shfl_xor_sync(0xffffffffu, index, o);
            if (other_value > value || (other_value == value && other_index < index)) {
                value = other_value;
                index = other_index;
            }
        }
        if (round == 1) break;
        if (lane == 0) {
            best_value[warp] = value;
            best_index[warp] = index;
        }
        __syncthreads();
        const bool filled = lane < (int)(blockDim.x >> 5);
        value = filled ? best_value[lane] : NEG_INF;
        index = filled ? best_index[lane] : V;
    }
    if (threadIdx.x == 0) ids[blockIdx.x] = index == V ? 0 : index;
}
