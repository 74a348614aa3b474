// SwiGLU (ops::swiglu), elementwise into `gate`: gate = silu(gate) * up = gate / (1 + exp(-gate)) * up.
// Grid-stride over n elements.
extern "C" __global__ void __launch_bounds__(BLOCK) swiglu(float* __restrict__ gate, const float* __restrict__ up,
                                                           i64 n) {
    for (i64 i = (i64)blockIdx.x * BLOCK + threadIdx.x; i < n; i += (i64)gridDim.x * BLOCK) {
        const float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}
