// fp8forge kernels: shared device helpers.
//
// The host (kernels/src/source.rs) builds each program as: the configuration's #defines, this
// file, any generated code, then one kernel file. No CUDA header is included, so NVRTC needs no
// include path: the few types and conversions needed are written here with inline PTX.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef int i32;
typedef long long i64;

// Shared-window address of a generic pointer into shared memory.
__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 r;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

// f32 -> bf16, round to nearest even (NaN stays NaN).
__device__ __forceinline__ u16 f32_to_bf16(float x) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}

// Two f32 -> two bf16 packed: `lo` in bits 0..15 (the lower address), `hi` in bits 16..31.
__device__ __forceinline__ u32 f32x2_to_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// bf16 bits -> f32 (exact).
__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

// Two f32 -> two E4M3FN codes, round to nearest even, saturating to +-448: `lo` in bits 0..7.
__device__ __forceinline__ u16 f32x2_to_e4m3x2(float lo, float hi) {
    u16 r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}

// Stores two adjacent bf16 outputs D[row, col] and D[row, col + 1] of a row-major [M, N] matrix,
// each only where it lies inside the matrix. `col` is even.
__device__ __forceinline__ void store_bf16_pair(u16* d, int M, int N, int row, int col, float v0, float v1) {
    if (row >= M) return;
    u16* p = d + (i64)row * N + col;
    if ((N & 1) == 0 && col + 1 < N) {
        *reinterpret_cast<u32*>(p) = f32x2_to_bf16x2(v0, v1);
    } else {
        if (col < N) p[0] = f32_to_bf16(v0);
        if (col + 1 < N) p[1] = f32_to_bf16(v1);
    }
}

// Tile order of a grid of `nm` x `nn` tiles: bands of `group` tile rows, walked column by column
// inside a band, so that consecutive tiles share A rows and B columns in L2.
__device__ __forceinline__ void raster_tile(int t, int nm, int nn, int group, int& mb, int& nb) {
    const int per_group = group * nn;
    const int g = t / per_group;
    const int first = g * group;
    const int size = min(nm - first, group);
    const int r = t - g * per_group;
    mb = first + r % size;
    nb = r / size;
}
