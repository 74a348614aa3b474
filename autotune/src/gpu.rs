//! The GPUs fp8forge tunes for, from their datasheets, and how a running GPU is recognized.

use serde::{Deserialize, Serialize};

/// What the cost model needs to know about a GPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuSpec {
    /// Short id used on the command line and in tables: `h100-sxm`, `h800-pcie`, ...
    pub id: &'static str,
    /// Marketing name.
    pub name: &'static str,
    /// Streaming multiprocessors.
    pub sms: u32,
    /// Shared memory per SM in bytes (what one block may use is 1 KB less).
    pub smem_per_sm: u32,
    /// L2 cache in bytes.
    pub l2_bytes: u64,
    /// Boost clock in MHz.
    pub boost_mhz: u32,
    /// Dense FP8 tensor-core peak in TFLOP/s (no sparsity).
    pub fp8_tflops: f64,
    /// Dense BF16 tensor-core peak in TFLOP/s.
    pub bf16_tflops: f64,
    /// HBM bandwidth in GB/s.
    pub hbm_gbps: f64,
    /// Compute capability (major, minor).
    pub cc: (u32, u32),
}

/// Shared memory per SM on Hopper (228 KB).
const HOPPER_SMEM: u32 = 228 * 1024;

/// The table: datasheet figures (NVIDIA H100/H200 datasheets; H800 and H20 product briefs).
pub const GPUS: &[GpuSpec] = &[
    GpuSpec {
        id: "h100-sxm",
        name: "H100 SXM5 80GB",
        sms: 132,
        smem_per_sm: HOPPER_SMEM,
        l2_bytes: 50 << 20,
        boost_mhz: 1980,
        fp8_tflops: 1979.0,
        bf16_tflops: 989.0,
        hbm_gbps: 3350.0,
        cc: (9, 0),
    },
    GpuSpec {
        id: "h100-pcie",
        name: "H100 PCIe 80GB",
        sms: 114,
        smem_per_sm: HOPPER_SMEM,
        l2_bytes: 50 << 20,
        boost_mhz: 1755,
        fp8_tflops: 1513.0,
        bf16_tflops: 756.0,
        hbm_gbps: 2000.0,
        cc: (9, 0),
    },
    GpuSpec {
        id: "h800-sxm",
        name: "H800 SXM5 80GB",
        sms: 132,
        smem_per_sm: HOPPER_SMEM,
        l2_bytes: 50 << 20,
        boost_mhz: 1980,
        fp8_tflops: 1979.0,
        bf16_tflops: 989.0,
        hbm_gbps: 3350.0,
        cc: (9, 0),
    },
    GpuSpec {
        id: "h800-pcie",
        name: "H800 PCIe 80GB",
        sms: 114,
        smem_per_sm: HOPPER_SMEM,
        l2_bytes: 50 << 20,
        boost_mhz: 1755,
        fp8_tflops: 1513.0,
        bf16_tflops: 756.0,
        hbm_gbps: 2000.0,
        cc: (9, 0),
    },
    GpuSpec {
        id: "h200",
        name: "H200 SXM 141GB",
        sms: 132,
        smem_per_sm: HOPPER_SMEM,
        l2_bytes: 50 << 20,
        boost_mhz: 1980,
        fp8_tflops: 1979.0,
        bf16_tflops: 989.0,
        hbm_gbps: 4800.0,
        cc: (9, 0),
    },
    GpuSpec {
        id: "h20",
        name: "H20 96GB",
        sms: 78,
        smem_per_sm: HOPPER_SMEM,
        l2_bytes: 60 << 20,
        boost_mhz: 1980,
        fp8_tflops: 296.0,
        bf16_tflops: 148.0,
        hbm_gbps: 4000.0,
        cc: (9, 0),
    },
];

/// Aliases accepted by `--gpu`.
const ALIASES: &[(&str, &str)] =
    &[("h100", "h100-sxm"), ("h800", "h800-sxm"), ("h200-sxm", "h200"), ("h100-sxm5", "h100-sxm")];

/// The spec of a `--gpu` id or alias (case-insensitive).
pub fn by_id(id: &str) -> Option<&'static GpuSpec> {
    let id = id.to_ascii_lowercase();
    let id = ALIASES.iter().find(|(a, _)| *a == id).map_or(id.as_str(), |(_, t)| t);
    GPUS.iter().find(|g| g.id == id)
}

/// Recognizes a running GPU from what the driver reports: its name (`"NVIDIA H100 80GB HBM3"`),
/// multiprocessor count and compute capability. `None` for a GPU outside the table.
pub fn identify(name: &str, sms: u32, cc: (u32, u32)) -> Option<&'static GpuSpec> {
    if cc != (9, 0) {
        return None;
    }
    let n = name.to_ascii_uppercase();
    let pcie = n.contains("PCIE") || n.contains("NVL") && sms == 114;
    let id = if n.contains("H200") {
        "h200"
    } else if n.contains("H800") {
        if pcie || sms == 114 { "h800-pcie" } else { "h800-sxm" }
    } else if n.contains("H100") {
        if pcie || sms == 114 { "h100-pcie" } else { "h100-sxm" }
    } else if n.contains("H20") {
        "h20"
    } else {
        return None;
    };
    by_id(id).filter(|g| g.sms == sms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_gpus_are_identified_by_name_sms_and_cc() {
        assert_eq!(identify("NVIDIA H100 80GB HBM3", 132, (9, 0)).map(|g| g.id), Some("h100-sxm"));
        assert_eq!(identify("NVIDIA H100 PCIe", 114, (9, 0)).map(|g| g.id), Some("h100-pcie"));
        assert_eq!(identify("NVIDIA H800", 132, (9, 0)).map(|g| g.id), Some("h800-sxm"));
        assert_eq!(identify("NVIDIA H200", 132, (9, 0)).map(|g| g.id), Some("h200"));
        assert_eq!(identify("NVIDIA H20", 78, (9, 0)).map(|g| g.id), Some("h20"));
        // A partitioned (MIG) or unknown part is not taken for a full one.
        assert_eq!(identify("NVIDIA H100 80GB HBM3", 66, (9, 0)), None);
        assert_eq!(identify("NVIDIA A100-SXM4-80GB", 108, (8, 0)), None);
    }

    #[test]
    fn ids_and_aliases_resolve() {
        assert_eq!(by_id("H800").map(|g| g.id), Some("h800-sxm"));
        assert_eq!(by_id("h100").map(|g| g.sms), Some(132));
        assert!(by_id("b200").is_none());
        for g in GPUS {
            assert_eq!(by_id(g.id), Some(g));
        }
    }
}
