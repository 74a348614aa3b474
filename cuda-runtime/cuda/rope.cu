// Rotary embedding from a precomputed table (ops::RopeTable::apply), in place, so default RoPE
// and YaRN share the kernel (YaRN differs only in the table's frequencies and attention factor).
//   x: f32 [rows, heads, stride]; the 2*half dims from `offset` of each head vector are rotated.
//   cos, sin: f32 [table_len, half] (already multiplied by the attention factor).
//   Row r is at position r % period (windows of `period` tokens, each from position 0).
//   interleave == 0: pairs (x[i], x[half+i]); interleave == 1: pairs (x[2i], x[2i+1]), written
//   de-interleaved (rotated evens, then rotated odds), as the CPU runtime and transformers do.
// One block per (row, head); dynamic shared memory: 2*half floats. Grid: rows*heads.
extern "C" __global__ void __launch_bounds__(BLOCK) rope(float* x, const float* __restrict__ cos_t,
                                                         const float* __restrict__ sin_t, int heads, int stride,
                                                         int offset, int half, int period, int interleave) {
    extern __shared__ float v[];
    const i64 row = blockIdx.x / heads;
    const int head = blockIdx.x - (int)(row * heads);
    float* p = x + (row * heads + head) * (i64)stride + offset;
    for (int i = threadIdx.x; i < 2 * half; i += BLOCK) v[i] = p[i];
    __syncthreads();
    const i64 pos = row % period;
    const float* c = cos_t + pos * half;
    const float* s = sin_t + pos * half;
    for (int i = threadIdx.x; i < half; i += BLOCK) {
        const float a = interleave ? v[2 * i] : v[i];
        const float b = interleave ? v[2 * i + 1] : v[half + i];
        p[i] = a * c[i] - b * s[i];
        p[half + i] = b * c[i] + a * s[i];
    }
}
