// FP8 block-scaled GEMM on mma.sync (sm_89 / sm_90): the fallback and the first baseline.
//
//   D[M, N] (bf16) = A[M, K] (e4m3, f32 scale per row and 128 columns: SA[M, K/128])
//                  x B[N, K]^T (e4m3, f32 scale per 128x128 block: SB[ceil(N/128), K/128])
//
// Per 128-wide K block kb the partial product is accumulated in f32 registers from zero, then
// promoted: acc += partial * (SA[m, kb] * SB[n / 128, kb]) (one fma). K % 128 == 0; M, N arbitrary.
// GROUPED: A rows are the experts' tokens back to back, each expert's run starting at a multiple
// of 128 (so of BM); m_indices[row] is the row's expert or -1 for a padding row. B is [E, N, K],
// SB is [E, ceil(N/128), K/128]; a padding row's output is written as 0.
//
// Configuration (#defines): BM, BN (CTA tile), WM x WN warps, STAGES (cp.async ring), GROUPED.
// Shared memory per stage: (BM + BN) rows of 128 bytes, padded to 144 so that the 8 rows a
// fragment load touches fall in distinct banks.

#define ROW_BYTES 144
#define THREADS (WM * WN * 32)
#define WTM (BM / WM)
#define WTN (BN / WN)
#define MT (WTM / 16)
#define NT (WTN / 8)
#define STAGE_BYTES ((BM + BN) * ROW_BYTES)

// Every knob checked at compile time against what the host assumes (kernels/src/config.rs:
// check_config, smem_bytes, threads; HOST_SMEM and HOST_THREADS are the host's launch values).
static_assert(BM == 64 || BM == 128, "BM must be 64 or 128");
static_assert(BN == 64 || BN == 128, "BN must be 64 or 128");
static_assert(WM >= 1 && WM <= 4 && WN >= 1 && WN <= 4 && WM * WN <= 8, "1 to 4 warps each way, at most 8 in all");
static_assert(BM % (16 * WM) == 0 && BN % (8 * WN) == 0, "each warp's tile must be a multiple of 16 rows and 8 columns");
static_assert(2 * MT * NT * 4 <= 64, "at most 64 accumulator registers per thread (a 32x32 warp tile)");
static_assert(STAGES >= 2 && STAGES <= 16, "STAGES must be 2..MAX_STAGES (16)");
static_assert(STAGES * STAGE_BYTES <= 232448, "stages x stage bytes exceed the 227 KiB of opt-in shared memory");
static_assert(HOST_SMEM >= STAGES * STAGE_BYTES && HOST_SMEM <= 232448, "the host's launch shared memory does not match this layout");
static_assert(HOST_THREADS == THREADS, "host and kernel disagree on the block size");
static_assert(GROUPED == 0 || GROUPED == 1, "GROUPED: 0 or 1");
static_assert(!GROUPED || 128 % BM == 0, "grouped: a tile must lie inside one expert's 128-row aligned run");

__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void mma_e4m3(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

extern "C" __global__ void __launch_bounds__(THREADS, 1) fp8_gemm_mma(const u8* __restrict__ A,
                                                                  const float* __restrict__ SA,
                                                                  const u8* __restrict__ B,
                                                                  const float* __restrict__ SB, u16* __restrict__ D,
                                                                  const int* __restrict__ m_indices, int M, int N,
                                                                  int K, int raster_group) {
    extern __shared__ __align__(128) u8 smem[];
    const int KB = K / 128;
    const int NB = (N + 127) / 128;
    const int num_m = (M + BM - 1) / BM;
    const int num_n = (N + BN - 1) / BN;
    int mb, nb;
    raster_tile(blockIdx.x, num_m, num_n, raster_group, mb, nb);
    const int m0 = mb * BM, n0 = nb * BN;

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int wm = warp / WN, wn = warp % WN;
    const int g = lane >> 2, t = lane & 3;

    int expert = 0;
#if GROUPED
    expert = m_indices[m0];
    if (expert < 0) {
        // A tile of padding rows only: write zeros.
        for (int i = tid; i < BM * (BN / 2); i += THREADS) {
            const int r = i / (BN / 2), c = (i % (BN / 2)) * 2;
            store_bf16_pair(D, M, N, m0 + r, n0 + c, 0.f, 0.f);
        }
        return;
    }
#endif
    const u8* Be = B + (i64)expert * N * K;
    const float* SBe = SB + (i64)expert * NB * KB;
    const u32 sbase = smem_addr(smem);

    auto load_stage = [&](int kb, int s) {
        const u32 st = sbase + s * STAGE_BYTES;
        for (int c = tid; c < (BM + BN) * 8; c += THREADS) {
            const int row = c >> 3, chunk = c & 7;
            const u8* src;
            bool valid;
            if (row < BM) {
                const int gr = m0 + row;
                valid = gr < M;
                src = A + (i64)(valid ? gr : 0) * K + kb * 128 + chunk * 16;
            } else {
                const int gn = n0 + row - BM;
                valid = gn < N;
                src = Be + (i64)(valid ? gn : 0) * K + kb * 128 + chunk * 16;
            }
            cp_async_16(st + row * ROW_BYTES + chunk * 16, src, valid);
        }
    };

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < KB) load_stage(s, s);
        cp_async_commit();
    }

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    for (int kb = 0; kb < KB; ++kb) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        {
            const int nk = kb + STAGES - 1;
            if (nk < KB) load_stage(nk, nk % STAGES);
            cp_async_commit();
        }
        const u8* As = smem + (kb % STAGES) * STAGE_BYTES;
        const u8* Bs = As + BM * ROW_BYTES;

        float part[MT][NT][4];
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) part[i][j][e] = 0.f;

#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const int k = kk * 32 + t * 4;
            u32 af[MT][4];
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                const u8* r0 = As + (wm * WTM + i * 16 + g) * ROW_BYTES + k;
                const u8* r1 = r0 + 8 * ROW_BYTES;
                af[i][0] = *reinterpret_cast<const u32*>(r0);
                af[i][1] = *reinterpret_cast<const u32*>(r1);
                af[i][2] = *reinterpret_cast<const u32*>(r0 + 16);
                af[i][3] = *reinterpret_cast<const u32*>(r1 + 16);
            }
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const u8* c0 = Bs + (wn * WTN + j * 8 + g) * ROW_BYTES + k;
                u32 bf[2];
                bf[0] = *reinterpret_cast<const u32*>(c0);
                bf[1] = *reinterpret_cast<const u32*>(c0 + 16);
#pragma unroll
                for (int i = 0; i < MT; ++i) mma_e4m3(part[i][j], af[i], bf);
            }
        }

        // Promotion with both scales.
        float sb[NT];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int blk = min((n0 + wn * WTN + j * 8) / 128, NB - 1);
            sb[j] = SBe[blk * KB + kb];
        }
#pragma unroll
        for (int i = 0; i < MT; ++i) {
            const int r0 = m0 + wm * WTM + i * 16 + g;
            const float sa0 = r0 < M ? SA[(i64)r0 * KB + kb] : 0.f;
            const float sa1 = r0 + 8 < M ? SA[(i64)(r0 + 8) * KB + kb] : 0.f;
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const float s0 = sa0 * sb[j], s1 = sa1 * sb[j];
                acc[i][j][0] = fmaf(part[i][j][0], s0, acc[i][j][0]);
                acc[i][j][1] = fmaf(part[i][j][1], s0, acc[i][j][1]);
                acc[i][j][2] = fmaf(part[i][j][2], s1, acc[i][j][2]);
                acc[i][j][3] = fmaf(part[i][j][3], s1, acc[i][j][3]);
            }
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int i = 0; i < MT; ++i) {
        const int r0 = m0 + wm * WTM + i * 16 + g;
        bool live0 = true, live1 = true;
#if GROUPED
        live0 = r0 < M && m_indices[r0] >= 0;
        live1 = r0 + 8 < M && m_indices[r0 + 8] >= 0;
#endif
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int c = n0 + wn * WTN + j * 8 + t * 2;
            store_bf16_pair(D, M, N, r0, c, live0 ? acc[i][j][0] : 0.f, live0 ? acc[i][j][1] : 0.f);
            store_bf16_pair(D, M, N, r0 + 8, c, live1 ? acc[i][j][2] : 0.f, live1 ? acc[i][j][3] : 0.f);
        }
    }
}
