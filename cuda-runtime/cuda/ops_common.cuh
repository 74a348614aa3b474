// fp8forge-cuda-runtime: helpers shared by the small operations' kernels.
//
// The host (cuda-runtime/src/source.rs) builds each program as: `#define BLOCK <threads>`, the
// kernels crate's common.cuh (types, bf16/e4m3 conversions), this file, then one kernel file.
// Reductions are deterministic: every thread sums the per-warp partials in the same order.

#ifndef BLOCK
#error "BLOCK (threads per block) must be defined by the host"
#endif
static_assert(BLOCK >= 32 && BLOCK <= 1024 && BLOCK % 32 == 0, "BLOCK must be a multiple of 32 in 32..1024");
#define WARPS (BLOCK / 32)
#define FULL_MASK 0xFFFFFFFFu
// No CUDA header is included (NVRTC needs no include path): infinity and the quiet NaNs by bits.
#define F_INF __int_as_float(0x7F800000)
#define F_NAN __int_as_float(0x7FC00000)
#define D_NAN __longlong_as_double(0x7FF8000000000000ll)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
    return v;
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, off));
    return v;
}

// True when (v, i) ranks before (bv, bi): larger value first, of equal values the lower index
// (the CPU's `top_k` and `argmax` order). NaN never ranks first; an index < 0 is "none yet".
__device__ __forceinline__ bool ranks_before(float v, int i, float bv, int bi) {
    if (i < 0 || v != v) return false;
    if (bi < 0) return true;
    return v > bv || (v == bv && i < bi);
}

// Warp-wide best (value, index); every lane gets it.
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, v, off);
        const int oi = __shfl_xor_sync(FULL_MASK, i, off);
        if (ranks_before(ov, oi, v, i)) {
            v = ov;
            i = oi;
        }
    }
}

// Block-wide sum; every thread gets it. `scratch` is shared, WARPS elements; callable repeatedly.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    v = warp_sum(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) r += scratch[w];
    return r;
}

__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
    v = warp_sum_f64(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    double r = 0.0;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) r += scratch[w];
    return r;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    v = warp_max(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = scratch[0];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) r = fmaxf(r, scratch[w]);
    return r;
}

__device__ __forceinline__ void block_argmax(float& v, int& i, float* sv, int* si) {
    warp_argmax(v, i);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) {
        sv[threadIdx.x >> 5] = v;
        si[threadIdx.x >> 5] = i;
    }
    __syncthreads();
    v = sv[0];
    i = si[0];
#pragma unroll
    for (int w = 1; w < WARPS; ++w)
        if (ranks_before(sv[w], si[w], v, i)) {
            v = sv[w];
            i = si[w];
        }
}

// Log-sum-exp of `row[0..n)` as the CPU runtime computes it (`ops::log_sum_exp`): the maximum in
// f32, the sum of exp(x - max) in f64. Every thread of the block gets it.
__device__ __forceinline__ double block_log_sum_exp(const float* row, int n, float* fscratch, double* dscratch) {
    float m = -F_INF;
    for (int j = threadIdx.x; j < n; j += BLOCK) m = fmaxf(m, row[j]);
    m = block_max(m, fscratch);
    const double md = (double)m;
    double s = 0.0;
    // Not unrolled: unrolled, ptxas gives the f64 exp calls an 8-byte stack frame (a spill).
#pragma unroll 1
    for (int j = threadIdx.x; j < n; j += BLOCK) s += exp((double)row[j] - md);
    s = block_sum_f64(s, dscratch);
    return md + log(s);
}
