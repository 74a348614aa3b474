// 1x128 activation quantization (per token, per 128 channels), the contract of
// kernels/src/reference.rs `act_quant_ref`:
//   amax  = max |x| over the group (bf16 widened to f32 exactly)
//   scale = max(amax, 1e-12) / 448 in f32 (UE8M0 == 1: the smallest power of two >= that)
//   q     = E4M3FN(x / scale), f32 division, round to nearest even, saturating at +-448
// x: bf16 [M, K] row-major; q: e4m3 [M, K]; scales: f32 [M, K/128] row-major. K % 128 == 0.
// One warp per group: lane l holds channels 4l..4l+3. Requires: UE8M0 (0 or 1).

static_assert(UE8M0 == 0 || UE8M0 == 1, "UE8M0: 0 (f32 scales) or 1 (power-of-two scales)");

extern "C" __global__ void __launch_bounds__(256) fp8_act_quant(const u16* __restrict__ x, u8* __restrict__ q,
                                                               float* __restrict__ scales, int M, int K) {
    const int KB = K / 128;
    const i64 group = (i64)blockIdx.x * 8 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (group >= (i64)M * KB) return;
    const i64 row = group / KB;
    const int kb = (int)(group - row * KB);
    const i64 base = row * K + (i64)kb * 128 + lane * 4;

    const u64 raw = *reinterpret_cast<const u64*>(x + base);
    float v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = bf16_to_f32((u16)(raw >> (16 * i)));

    float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, off));

    float s = __fdiv_rn(fmaxf(amax, 1e-12f), 448.0f);
#if UE8M0
    {
        const u32 bits = __float_as_uint(s);
        if (bits & 0x007FFFFFu) s = __uint_as_float((bits & 0x7F800000u) + 0x00800000u);
    }
#endif
    const u16 lo = f32x2_to_e4m3x2(__fdiv_rn(v[0], s), __fdiv_rn(v[1], s));
    const u16 hi = f32x2_to_e4m3x2(__fdiv_rn(v[2], s), __fdiv_rn(v[3], s));
    *reinterpret_cast<u32*>(q + base) = (u32)lo | ((u32)hi << 16);
    if (lane == 0) scales[row * KB + kb] = s;
}
