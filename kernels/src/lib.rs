//! CUDA FP8 block-scaled GEMM kernels compiled at run time through NVRTC (issue 4; not yet implemented).
