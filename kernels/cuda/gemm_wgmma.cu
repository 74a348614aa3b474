// FP8 block-scaled GEMM for sm_90a: TMA -> multi-stage shared-memory ring -> wgmma (QGMMA).
//
//   D[M, N] (bf16) = A[M, K] (e4m3, f32 scale per row and 128 columns: SA[M, K/128])
//                  x B[N, K]^T (e4m3, f32 scale per 128x128 block: SB[ceil(N/128), K/128])
//
// Contract as in gemm_mma.cu (and kernels/src/reference.rs): per 128-wide K block the wgmma
// partial starts from zero (scale-d = 0 on the block's first k32 step), and after the block it is
// promoted into the f32 accumulator with both scales: acc += partial * (SA[m, kb] * SB[n/128, kb]).
//
// Roles: warpgroup 0 is the producer (one thread issues the TMA loads); warpgroups 1..NUM_MATH_WG
// are consumers, each owning SLABS slabs of 64 rows of the BM x BN tile. Stage s of the ring holds
// the A tile (BM rows x 128 bytes of K) and the B tile (BN rows x 128 bytes), K-major, swizzled
// by SW bytes: stored as 128/SW column chunks of [rows][SW]. full[s] completes when the TMA bytes
// of stage s have landed; empty[s] when every consumer warp (of every CTA of the cluster) is done
// with it. The schedule is persistent: CTA (or cluster) i takes tiles i, i + grid, ... in the
// banded order of raster_tile().
//
// Multicast (CLUSTER == 2): MC == 1 pairs two CTAs on neighbouring N tiles of the same M tile;
// each loads half of the A tile and multicasts it to both. MC == 2 pairs neighbouring M tiles and
// shares B the same way. The host makes the paired dimension's tile count even.
//
// Configuration (#defines): BM in {64, 128, 256}, BN (multiple of 8, <= 256), STAGES, MC (0 none,
// 1 A, 2 B), CLUSTER (1 or 2), SW (32, 64, 128), GROUPED (see gemm_mma.cu), SB_STATIC (1: the
// B-scale block of each 8-column group chosen at compile time, for BN not dividing 128), and the
// generated wgmma_m64k32(float (&)[BN / 2], u64, u64, int).

#define NUM_MATH_WG (BM >= 128 ? 2 : 1)
#define SLABS (BM / 64 / NUM_MATH_WG)
#define THREADS (128 * (1 + NUM_MATH_WG))
#define A_BYTES (BM * 128)
#define B_BYTES (BN * 128)
#define STAGE_BYTES (A_BYTES + B_BYTES)
#define CHUNKS (128 / SW)
#define A_BOX_ROWS (MC == 1 ? BM / 2 : BM)
#define B_BOX_ROWS (MC == 2 ? BN / 2 : BN)
#define NACC (BN / 2)
#define SW_MODE (SW == 128 ? 1 : (SW == 64 ? 2 : 3))
// Shared memory this layout uses: 1024 bytes of alignment slack, the stages' tiles, and one full
// and one empty mbarrier (8 bytes each) per stage.
#define SMEM_USED (1024 + STAGES * (STAGE_BYTES + 16))

// Every knob checked at compile time against what the host assumes (kernels/src/config.rs:
// check_config, is_legal, smem_bytes, threads; HOST_SMEM and HOST_THREADS are the host's launch
// values), so the CI's NVRTC build of every variant enforces host/device agreement.
static_assert(BM == 64 || BM == 128 || BM == 256, "BM must be 64, 128 or 256 (64-row slabs on 1 or 2 consumer warpgroups)");
static_assert(BN % 8 == 0 && BN >= 16 && BN <= 256,
              "BN must be a multiple of 8 in 16..256: wgmma N; 8-column groups never straddle a 128-column scale "
              "block; a tile meets at most three scale blocks");
static_assert(BN <= (BM == 256 ? 128 : 184), "BN over the register limit of this BM (config.rs wgmma_max_block_n)");
static_assert(SW == 32 || SW == 64 || SW == 128, "SW must be 32, 64 or 128");
static_assert(A_BYTES % 1024 == 0 && B_BYTES % 1024 == 0, "tiles must keep the 1024-byte alignment of the swizzle atoms");
static_assert(STAGES >= 2 && STAGES <= 16, "STAGES must be 2..MAX_STAGES (16)");
static_assert(SMEM_USED <= 232448, "stages x stage bytes exceed the 227 KiB of opt-in shared memory of sm_90");
static_assert(HOST_SMEM >= SMEM_USED && HOST_SMEM <= 232448, "the host's launch shared memory does not match this layout");
static_assert(HOST_THREADS == THREADS, "host and kernel disagree on the block size");
static_assert(MC == 0 || MC == 1 || MC == 2, "MC: 0 none, 1 A, 2 B");
static_assert(CLUSTER == (MC == 0 ? 1 : 2), "multicast needs a cluster of two CTAs, no multicast a cluster of one");
static_assert(MC != 1 || (BM / 2) % 8 == 0, "A multicast: each CTA loads BM/2 rows, a multiple of 8");
static_assert(MC != 2 || BN % 16 == 0, "B multicast: each CTA loads BN/2 rows, a multiple of 8");
static_assert(GROUPED == 0 || GROUPED == 1, "GROUPED: 0 or 1");
static_assert(!GROUPED || 128 % BM == 0, "grouped: a tile must lie inside one expert's 128-row aligned run");
static_assert(!GROUPED || MC != 2, "grouped: no B multicast (paired M tiles may belong to different experts)");
static_assert(SB_STATIC == 0 || SB_STATIC == 1, "SB_STATIC: 0 or 1");
static_assert(!SB_STATIC || 128 % BN != 0, "compile-time B-scale selection is for BN not dividing 128");

// A CUtensorMap, opaque: 128 bytes, 64-byte aligned, passed by value as a __grid_constant__.
struct __align__(64) TmaDesc {
    u64 opaque[16];
};

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_cluster(u32 bar, u32 cta) {
    u32 remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(bar), "r"(cta));
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(remote) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 done;
    do {
        asm volatile(
            "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}
__device__ __forceinline__ void tma_load_2d(u32 dst, const TmaDesc* map, u32 bar, int x, int y) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
            dst),
        "l"(reinterpret_cast<u64>(map)), "r"(x), "r"(y), "r"(bar)
        : "memory");
}
__device__ __forceinline__ void tma_load_3d(u32 dst, const TmaDesc* map, u32 bar, int x, int y, int z) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];" ::"r"(dst),
        "l"(reinterpret_cast<u64>(map)), "r"(x), "r"(y), "r"(z), "r"(bar)
        : "memory");
}
__device__ __forceinline__ void tma_load_2d_mc(u32 dst, const TmaDesc* map, u32 bar, int x, int y, u16 mask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, "
        "{%2, %3}], [%4], %5;" ::"r"(dst),
        "l"(reinterpret_cast<u64>(map)), "r"(x), "r"(y), "r"(bar), "h"(mask)
        : "memory");
}
__device__ __forceinline__ void tma_load_3d_mc(u32 dst, const TmaDesc* map, u32 bar, int x, int y, int z,
                                               u16 mask) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, "
        "{%2, %3, %4}], [%5], %6;" ::"r"(dst),
        "l"(reinterpret_cast<u64>(map)), "r"(x), "r"(y), "r"(z), "r"(bar), "h"(mask)
        : "memory");
}

__device__ __forceinline__ u32 cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}

// wgmma shared-memory matrix descriptor: K-major, swizzled by SW bytes; rows SW bytes apart, 8-row
// groups 8 * SW bytes apart (SBO); LBO is unused for these layouts (encoded as 1).
__device__ __forceinline__ u64 make_desc(u32 addr) {
    u64 d = (u64)((addr & 0x3FFFF) >> 4);
    d |= (u64)1 << 16;
    d |= (u64)((8 * SW) >> 4) << 32;
    d |= (u64)SW_MODE << 62;
    return d;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// Keeps the compiler from moving accesses to an accumulator register across wgmma fences/waits.
__device__ __forceinline__ void fence_reg(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// The tile of persistent step `step` of this CTA: (mb, nb), or false when no tile is left.
__device__ __forceinline__ bool next_tile(int step, int num_m, int num_n, int raster_group, int& mb, int& nb) {
#if CLUSTER == 2
    const int rank = (int)cluster_rank();
    const int t = (int)(blockIdx.x / 2) + step * (int)(gridDim.x / 2);
#if MC == 1
    if (t >= num_m * (num_n / 2)) return false;
    int nc;
    raster_tile(t, num_m, num_n / 2, raster_group, mb, nc);
    nb = nc * 2 + rank;
#else
    if (t >= (num_m / 2) * num_n) return false;
    int mc;
    raster_tile(t, num_m / 2, num_n, raster_group, mc, nb);
    mb = mc * 2 + rank;
#endif
#else
    const int t = (int)blockIdx.x + step * (int)gridDim.x;
    if (t >= num_m * num_n) return false;
    raster_tile(t, num_m, num_n, raster_group, mb, nb);
#endif
    return true;
}

// Promotion of one slab, acc += part * (sa * sb), with the B-scale block of each 8-column group
// fixed at compile time: 8-column groups [0, SPLIT8) use scale block nb0, [SPLIT8, SPLIT8 + 16)
// nb0 + 1, the rest nb0 + 2 (SPLIT8 >= BN / 8: the whole tile lies in block nb0).
template <int SPLIT8>
__device__ __forceinline__ void promote_split(float (&acc)[NACC], const float (&part)[NACC], float sa0, float sa1,
                                              const float (&sb)[3]) {
#pragma unroll
    for (int g8 = 0; g8 < BN / 8; ++g8) {
        const float sbv = g8 >= SPLIT8 + 16 ? sb[2] : (g8 >= SPLIT8 ? sb[1] : sb[0]);
        const float s0 = sa0 * sbv, s1 = sa1 * sbv;
        acc[4 * g8 + 0] = fmaf(part[4 * g8 + 0], s0, acc[4 * g8 + 0]);
        acc[4 * g8 + 1] = fmaf(part[4 * g8 + 1], s0, acc[4 * g8 + 1]);
        acc[4 * g8 + 2] = fmaf(part[4 * g8 + 2], s1, acc[4 * g8 + 2]);
        acc[4 * g8 + 3] = fmaf(part[4 * g8 + 3], s1, acc[4 * g8 + 3]);
    }
}

// Dispatches the tile's split (`split8` = first 8-column group in block nb0 + 1, 1..16; uniform
// across the CTA) to the promotion compiled for it.
template <int K>
__device__ __forceinline__ void promote_dispatch(int split8, float (&acc)[NACC], const float (&part)[NACC], float sa0,
                                                 float sa1, const float (&sb)[3]) {
    if constexpr (K >= BN / 8 || K >= 16) {
        promote_split<(BN / 8 < 16 ? BN / 8 : 16)>(acc, part, sa0, sa1, sb);
    } else {
        if (split8 == K) {
            promote_split<K>(acc, part, sa0, sa1, sb);
        } else {
            promote_dispatch<K + 1>(split8, acc, part, sa0, sa1, sb);
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
#if CLUSTER == 2
    __cluster_dims__(2, 1, 1)
#endif
        fp8_gemm_wgmma(const __grid_constant__ TmaDesc tmap_a, const __grid_constant__ TmaDesc tmap_b,
                       const float* __restrict__ SA, const float* __restrict__ SB, u16* __restrict__ D,
                       const int* __restrict__ m_indices, int M, int N, int K, int raster_group) {
    extern __shared__ __align__(1024) u8 smem_raw[];
    // Swizzled tiles need 1024-byte alignment (the host adds 1024 bytes of slack).
    const u32 raw_addr = smem_addr(smem_raw);
    const u32 base = (raw_addr + 1023u) & ~1023u;
    const u32 full_bar = base + STAGES * STAGE_BYTES;
    const u32 empty_bar = full_bar + STAGES * 8;

    const int KB = K / 128;
    const int NB = (N + 127) / 128;
    const int num_m = (M + BM - 1) / BM;
    const int num_n = (N + BN - 1) / BN;
    const int wg = threadIdx.x / 128;

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full_bar + 8 * s, 1);
            mbar_init(empty_bar + 8 * s, NUM_MATH_WG * 4 * CLUSTER);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<u64>(&tmap_a)) : "memory");
        asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<u64>(&tmap_b)) : "memory");
    }
#if CLUSTER == 2
    cluster_sync();
#else
    __syncthreads();
#endif

    if (wg == 0) {
        // ---------------- producer ----------------
#if NUM_MATH_WG == 2
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
#endif
        if (threadIdx.x == 0) {
#if CLUSTER == 2
            const int rank = (int)cluster_rank();
#endif
            int it = 0;
            int mb, nb;
            for (int step = 0; next_tile(step, num_m, num_n, raster_group, mb, nb); ++step) {
                const int m0 = mb * BM, n0 = nb * BN;
                int expert = 0;
#if GROUPED
                expert = m_indices[m0];
                if (expert < 0) continue;
#endif
                for (int kb = 0; kb < KB; ++kb, ++it) {
                    const int s = it % STAGES;
                    const u32 ph = (u32)(it / STAGES) & 1u;
                    mbar_wait(empty_bar + 8 * s, ph ^ 1u);
                    const u32 fb = full_bar + 8 * s;
                    mbar_expect_tx(fb, STAGE_BYTES);
                    const u32 sa = base + s * STAGE_BYTES;
                    const u32 sb = sa + A_BYTES;
#pragma unroll
                    for (int c = 0; c < CHUNKS; ++c) {
                        const int kx = kb * 128 + c * SW;
#if MC == 1
                        tma_load_2d_mc(sa + c * BM * SW + rank * (BM / 2) * SW, &tmap_a, fb, kx, m0 + rank * (BM / 2),
                                       (u16)3);
#else
                        tma_load_2d(sa + c * BM * SW, &tmap_a, fb, kx, m0);
#endif
#if MC == 2
                        tma_load_3d_mc(sb + c * BN * SW + rank * (BN / 2) * SW, &tmap_b, fb, kx, n0 + rank * (BN / 2),
                                       expert, (u16)3);
#else
                        tma_load_3d(sb + c * BN * SW, &tmap_b, fb, kx, n0, expert);
#endif
                    }
                }
            }
        }
        __syncwarp();
    } else {
        // ---------------- consumers ----------------
#if NUM_MATH_WG == 2
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
#endif
        const int cw = wg - 1;
        const int tid = threadIdx.x % 128;
        const int warp = tid / 32, lane = tid % 32;
#if CLUSTER == 2
        const u32 peer = cluster_rank() ^ 1u;
#endif
        // The wgmma partial of one slab and K block (scale-d = 0 on a block's first step ignores
        // what it holds before).
        float part[NACC];
#pragma unroll
        for (int i = 0; i < NACC; ++i) part[i] = 0.f;
        int it = 0;
        int mb, nb;
        for (int step = 0; next_tile(step, num_m, num_n, raster_group, mb, nb); ++step) {
            const int m0 = mb * BM, n0 = nb * BN;
            // Rows of this thread: slab sl, half h -> row0 + sl * 64 + 8 * h.
            const int row0 = m0 + cw * SLABS * 64 + warp * 16 + lane / 4;
            const int col0 = n0 + (lane % 4) * 2;
            int expert = 0;
#if GROUPED
            expert = m_indices[m0];
            if (expert < 0) {
#pragma unroll
                for (int sl = 0; sl < SLABS; ++sl)
#pragma unroll
                    for (int g8 = 0; g8 < BN / 8; ++g8) {
                        store_bf16_pair(D, M, N, row0 + sl * 64, col0 + 8 * g8, 0.f, 0.f);
                        store_bf16_pair(D, M, N, row0 + sl * 64 + 8, col0 + 8 * g8, 0.f, 0.f);
                    }
                continue;
            }
#endif
            const float* SBe = SB + (i64)expert * NB * KB;
            const int nb0 = n0 / 128;
            // Columns [n0, n0 + BN) meet at most three 128-wide scale blocks: nb0, nb0 + 1, nb0 + 2.
            const int nb1 = min(nb0 + 1, NB - 1), nb2 = min(nb0 + 2, NB - 1);
            const int split1 = (nb0 + 1) * 128 - n0;  // first tile column in block nb0 + 1
#if !SB_STATIC
            const int split2 = split1 + 128;
#endif

            float acc[SLABS][NACC];
#pragma unroll
            for (int sl = 0; sl < SLABS; ++sl)
#pragma unroll
                for (int i = 0; i < NACC; ++i) acc[sl][i] = 0.f;

            // Scales of the next K block, loaded one block ahead.
            float nsa[SLABS][2], nsb[3];
            auto load_scales = [&](int kb) {
#pragma unroll
                for (int sl = 0; sl < SLABS; ++sl)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int r = row0 + sl * 64 + 8 * h;
                        nsa[sl][h] = r < M ? __ldg(SA + (i64)r * KB + kb) : 0.f;
                    }
                nsb[0] = __ldg(SBe + nb0 * KB + kb);
                nsb[1] = __ldg(SBe + nb1 * KB + kb);
                nsb[2] = __ldg(SBe + nb2 * KB + kb);
            };
            load_scales(0);

            for (int kb = 0; kb < KB; ++kb, ++it) {
                float csa[SLABS][2], csb[3];
#pragma unroll
                for (int sl = 0; sl < SLABS; ++sl) {
                    csa[sl][0] = nsa[sl][0];
                    csa[sl][1] = nsa[sl][1];
                }
                csb[0] = nsb[0];
                csb[1] = nsb[1];
                csb[2] = nsb[2];
                if (kb + 1 < KB) load_scales(kb + 1);

                const int s = it % STAGES;
                mbar_wait(full_bar + 8 * s, (u32)(it / STAGES) & 1u);
                // The wait loop may leave a warp's threads apart; wgmma.*.aligned needs them together.
                __syncwarp();
                const u32 sa = base + s * STAGE_BYTES;
                const u32 sb = sa + A_BYTES;
#pragma unroll
                for (int sl = 0; sl < SLABS; ++sl) {
#pragma unroll
                    for (int i = 0; i < NACC; ++i) fence_reg(part[i]);
                    __syncwarp();
                    wgmma_fence();
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const int chunk = (j * 32) / SW, within = (j * 32) % SW;
                        const u64 da = make_desc(sa + chunk * BM * SW + (cw * SLABS + sl) * 64 * SW + within);
                        const u64 db = make_desc(sb + chunk * BN * SW + within);
                        wgmma_m64k32(part, da, db, j > 0 ? 1 : 0);
                    }
                    wgmma_commit();
                    wgmma_wait_all();
#pragma unroll
                    for (int i = 0; i < NACC; ++i) fence_reg(part[i]);
                    // Promotion: acc += partial * (sa * sb).
#if SB_STATIC
                    promote_dispatch<1>(split1 / 8, acc[sl], part, csa[sl][0], csa[sl][1], csb);
#else
#pragma unroll
                    for (int g8 = 0; g8 < BN / 8; ++g8) {
                        const int c = 8 * g8;
                        const float sbv = c >= split2 ? csb[2] : (c >= split1 ? csb[1] : csb[0]);
                        const float s0 = csa[sl][0] * sbv, s1 = csa[sl][1] * sbv;
                        acc[sl][4 * g8 + 0] = fmaf(part[4 * g8 + 0], s0, acc[sl][4 * g8 + 0]);
                        acc[sl][4 * g8 + 1] = fmaf(part[4 * g8 + 1], s0, acc[sl][4 * g8 + 1]);
                        acc[sl][4 * g8 + 2] = fmaf(part[4 * g8 + 2], s1, acc[sl][4 * g8 + 2]);
                        acc[sl][4 * g8 + 3] = fmaf(part[4 * g8 + 3], s1, acc[sl][4 * g8 + 3]);
                    }
#endif
                }
                // This warp is done with stage s (its wgmmas completed at the wait above).
                if (lane == 0) {
                    mbar_arrive(empty_bar + 8 * s);
#if CLUSTER == 2
                    mbar_arrive_cluster(empty_bar + 8 * s, peer);
#endif
                }
                __syncwarp();
            }

            // Epilogue: bf16 straight from registers, bounds-checked.
#pragma unroll
            for (int sl = 0; sl < SLABS; ++sl) {
                const int r0 = row0 + sl * 64, r1 = r0 + 8;
                bool live0 = true, live1 = true;
#if GROUPED
                live0 = r0 < M && m_indices[r0] >= 0;
                live1 = r1 < M && m_indices[r1] >= 0;
#endif
#pragma unroll
                for (int g8 = 0; g8 < BN / 8; ++g8) {
                    const int c = col0 + 8 * g8;
                    store_bf16_pair(D, M, N, r0, c, live0 ? acc[sl][4 * g8] : 0.f, live0 ? acc[sl][4 * g8 + 1] : 0.f);
                    store_bf16_pair(D, M, N, r1, c, live1 ? acc[sl][4 * g8 + 2] : 0.f,
                                    live1 ? acc[sl][4 * g8 + 3] : 0.f);
                }
            }
        }
    }
#if CLUSTER == 2
    // Neither CTA may leave while its peer can still multicast into it or arrive on its barriers.
    __syncwarp();
    cluster_sync();
#endif
}
