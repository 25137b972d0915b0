// out [B, O] = x [B, I] @ w[O, I]^T for skinny x (decode steps, short prompts): the twin of
// reference.linear. It exists because cuBLAS, called through CuPy, may not run inside CUDA-graph
// stream capture, and because at a few rows the product is a stream over the weights that a plain
// warp-per-row kernel already runs at memory speed.
//
// Each warp owns ROWS output features and BT rows of x; its lanes stride over I in float4 (16-byte
// loads, coalesced across the warp), four iterations' loads in flight at once, keep ROWS x BT
// partial sums, and reduce them with shuffles.
// Grid: x = ceil(B / BT) (fastest, so blocks sharing weight rows run together and meet in L2),
// y = ceil(O / (ROWS * warps per block)). Needs I % 4 == 0 and 16-byte aligned rows.

template <int BT, int ROWS>
__global__ void gemv(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ out,
                     int B, int I, int O) {
    const int lane = threadIdx.x & 31;
    const int row0 = (blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5)) * ROWS;
    const int b0 = blockIdx.x * BT;
    if (row0 >= O) return;  // the whole warp leaves together
    const int I4 = I >> 2;
    const float4* x4 = reinterpret_cast<const float4*>(x) + (long long)b0 * I4;
    const float4* w4 = reinterpret_cast<const float4*>(w) + (long long)row0 * I4;

    float acc[ROWS][BT];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int b = 0; b < BT; ++b) acc[r][b] = 0.f;

#pragma unroll 4
    for (int e = lane; e < I4; e += 32) {
        float4 wv[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
            wv[r] = row0 + r < O ? __ldg(w4 + (long long)r * I4 + e) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int b = 0; b < BT; ++b) {
            if (b0 + b < B) {
                const float4 xv = __ldg(x4 + (long long)b * I4 + e);
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    float a = acc[r][b];
                    a = fmaf(wv[r].x, xv.x, a);
                    a = fmaf(wv[r].y, xv.y, a);
                    a = fmaf(wv[r].z, xv.z, a);
                    acc[r][b] = fmaf(wv[r].w, xv.w, a);
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int b = 0; b < BT; ++b) {
            float a = acc[r][b];
            for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
            // spread the stores over the lanes instead of queueing them all on lane 0
            if (lane == ((r * BT + b) & 31) && row0 + r < O && b0 + b < B)
                out[(long long)(b0 + b) * O + row0 + r] = a;
        }
}
