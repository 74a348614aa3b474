//! FP8 block-scaled GEMM tile autotuning per GPU: the GPU spec table ([`gpu`]), the GEMM shapes
//! of a model ([`shapes`]), the analytic cost model that ranks the legal search space of the
//! kernels ([`model`]), and the per-GPU YAML tables with lookup and merging ([`table`]).
//! Measured tuning ([`tune`]) times the candidates on the GPU with the kernels' benchmark
//! harness ([`measure`]); its candidates ([`candidate`]) are our configurations and cuBLASLt's
//! algorithms. A measured table calibrates the cost model ([`calibrate`]); [`metrics`] computes
//! the ratios a GPU run reports. The `autotune` and `bench gemm` commands are one call each:
//! [`run::autotune`] (and [`run::calibrate_table`]) and [`bench::bench_gemm`].

#![deny(missing_docs)]

pub mod bench;
pub mod calibrate;
pub mod candidate;
pub mod gpu;
pub mod measure;
pub mod metrics;
pub mod model;
pub mod run;
pub mod shapes;
pub mod table;
pub mod tune;
