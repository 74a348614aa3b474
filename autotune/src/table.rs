//! Tuning tables: per GPU and kernel source, the chosen configuration for each (N, K, experts,
//! M bucket), measured or predicted, as YAML; merging, lookup for any M, stale-hash detection.

use std::path::Path;

use fp8forge_kernels::{GemmConfig, GemmShape, GpuArch, is_legal, search_space, source_hash};
use serde::{Deserialize, Serialize};

use crate::gpu::GpuSpec;
use crate::model::rank;
use crate::shapes::GemmShape as ModelShape;

/// Experts per grouped launch when tuning MoE shapes (one GPU's share under expert parallelism).
pub const SIM_EXPERTS: usize = 8;

/// The default M buckets: powers of two from 1 to 4096.
pub fn default_m() -> Vec<usize> {
    (0..=12).map(|i| 1usize << i).collect()
}

/// Which GPU a table is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Spec id (`h100-sxm`, ...).
    pub id: String,
    /// Name (the driver's name when measured, the table's when predicted).
    pub name: String,
    /// Multiprocessors.
    pub sms: u32,
    /// Compute capability, `"9.0"`.
    pub cc: String,
}

/// How an entry's time was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Timed on the GPU with CUDA events.
    Measured,
    /// Predicted by the cost model (`--simulate`, or a GPU that is not present).
    Predicted,
}

/// One tuned shape and M bucket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// Experts of a grouped launch (1: dense).
    pub experts: usize,
    /// Rows (per expert for a grouped launch).
    pub m: usize,
    /// The chosen configuration's id (`wgmma_bm128_bn128_s4_mcA2_sw128`).
    pub config: String,
    /// Its time in microseconds.
    pub us: f64,
    /// Its TFLOP/s.
    pub tflops: f64,
    /// Measured or predicted.
    pub source: Source,
    /// What the shape is in the model (`experts.gate_up`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub what: String,
    /// Measured entries: the candidates the tuner timed ...
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timed: usize,
    /// ... of this many legal ones.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub candidates: usize,
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

/// One tuning problem: a weight shape at one M bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// Experts in one grouped launch (1: dense).
    pub experts: usize,
    /// Rows (per expert for a grouped launch).
    pub m: usize,
    /// What the shape is in the model.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub what: String,
}

impl Problem {
    /// The GEMM the kernels run for it ([`problem`]).
    pub fn shape(&self) -> GemmShape {
        problem(self.n, self.k, self.experts, self.m)
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "M={} {}x{}", self.m, self.n, self.k)?;
        if self.experts > 1 {
            write!(f, " x{} experts", self.experts)?;
        }
        if !self.what.is_empty() {
            write!(f, " ({})", self.what)?;
        }
        Ok(())
    }
}

/// Every shape at every M, as tuning problems (grouped shapes with at most [`SIM_EXPERTS`]
/// experts per launch). Shapes the kernels cannot run (K not a multiple of 128) are returned as
/// skipped, with the reason.
pub fn problems(shapes: &[ModelShape], ms: &[usize]) -> (Vec<Problem>, Vec<String>) {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for s in shapes {
        let experts = if s.groups > 1 { s.groups.min(SIM_EXPERTS) } else { 1 };
        for &m in ms {
            let p = Problem { n: s.n, k: s.k, experts, m, what: s.what.clone() };
            if let Err(e) = p.shape().validate() {
                skipped.push(format!("{} {}x{}: {e}", s.what, s.n, s.k));
                break;
            }
            out.push(p);
        }
    }
    (out, skipped)
}

/// A tuning table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Table {
    /// The GPU.
    pub device: Device,
    /// `source_hash()` of the kernels the entries were tuned for.
    pub kernel_hash: String,
    /// Entries sorted by (N, K, experts, M).
    pub entries: Vec<Entry>,
}

/// Table errors.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// Reading or writing failed.
    #[error("{file}: {reason}")]
    Io {
        /// The file.
        file: String,
        /// What failed.
        reason: String,
    },
    /// Two tables of different GPUs or kernel sources cannot merge.
    #[error("cannot merge a table for {0} into one for {1}")]
    Mismatch(String, String),
}

/// The GEMM problem of an entry (grouped: `experts` blocks of `m` rows each, aligned to 128).
pub fn problem(n: usize, k: usize, experts: usize, m: usize) -> GemmShape {
    if experts > 1 {
        GemmShape::grouped(experts * m.div_ceil(128) * 128, n, k, experts)
    } else {
        GemmShape::dense(m, n, k)
    }
}

impl Table {
    /// An empty table for `gpu`.
    pub fn new(gpu: &GpuSpec) -> Self {
        Table {
            device: Device {
                id: gpu.id.into(),
                name: gpu.name.into(),
                sms: gpu.sms,
                cc: format!("{}.{}", gpu.cc.0, gpu.cc.1),
            },
            kernel_hash: source_hash(),
            entries: Vec::new(),
        }
    }

    /// True when the kernels changed since the table was tuned.
    pub fn is_stale(&self) -> bool {
        self.kernel_hash != source_hash()
    }

    /// Adds or replaces the entry of the same (N, K, experts, M); a measured entry is never
    /// replaced by a predicted one.
    pub fn insert(&mut self, e: Entry) {
        let key = |x: &Entry| (x.n, x.k, x.experts, x.m);
        match self.entries.iter_mut().find(|x| key(x) == key(&e)) {
            Some(old) if old.source == Source::Measured && e.source == Source::Predicted => {}
            Some(old) => *old = e,
            None => self.entries.push(e),
        }
        self.entries.sort_by_key(key);
    }

    /// Merges `other` (same GPU and kernel source) into this table.
    pub fn merge(&mut self, other: Table) -> Result<(), TableError> {
        if other.device.id != self.device.id || other.kernel_hash != self.kernel_hash {
            return Err(TableError::Mismatch(
                format!("{} (kernels {})", other.device.id, short(&other.kernel_hash)),
                format!("{} (kernels {})", self.device.id, short(&self.kernel_hash)),
            ));
        }
        for e in other.entries {
            self.insert(e);
        }
        Ok(())
    }

    /// The entry for a shape at any M: the bucket nearest in log2(M), `None` when the shape is
    /// not in the table (use [`choose`], which falls back to the cost model).
    pub fn lookup(&self, n: usize, k: usize, experts: usize, m: usize) -> Option<&Entry> {
        let d = |b: usize| ((b.max(1) as f64).log2() - (m.max(1) as f64).log2()).abs();
        self.entries
            .iter()
            .filter(|e| e.n == n && e.k == k && e.experts == experts)
            .min_by(|a, b| d(a.m).total_cmp(&d(b.m)).then(a.m.cmp(&b.m)))
    }

    /// Reads a YAML table.
    pub fn load(path: &Path) -> Result<Self, TableError> {
        let io = |reason: String| TableError::Io { file: path.display().to_string(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| io(e.to_string()))?;
        serde_yaml::from_str(&text).map_err(|e| io(format!("not a tuning table: {e}")))
    }

    /// The table as YAML.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_default()
    }
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}

/// The configuration to run for a shape: the table's (nearest M bucket) when it has the shape, is
/// not stale, and its entry is legal at this M (multicast pairs tiles, whose count depends on M);
/// else the cost model's best.
pub fn choose(
    table: Option<&Table>,
    gpu: &GpuSpec,
    n: usize,
    k: usize,
    experts: usize,
    m: usize,
) -> Option<GemmConfig> {
    let shape = problem(n, k, experts, m);
    if let Some(e) = table.filter(|t| !t.is_stale()).and_then(|t| t.lookup(n, k, experts, m))
        && let Ok(c) = e.config.parse::<GemmConfig>()
        && is_legal(&c, &shape).is_ok()
    {
        return Some(c);
    }
    rank(gpu, &shape, &search_space(GpuArch::Sm90a)).first().map(|(c, _)| *c)
}

/// Fills a table from the cost model alone (`--simulate`): every problem, the model's best.
pub fn simulate(gpu: &GpuSpec, problems: &[Problem]) -> Table {
    let space = search_space(GpuArch::Sm90a);
    let mut t = Table::new(gpu);
    for p in problems {
        if let Some((c, pred)) = rank(gpu, &p.shape(), &space).into_iter().next() {
            t.insert(Entry {
                n: p.n,
                k: p.k,
                experts: p.experts,
                m: p.m,
                config: c.id(),
                us: pred.us,
                tflops: pred.tflops,
                source: Source::Predicted,
                what: p.what.clone(),
                timed: 0,
                candidates: 0,
            });
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::by_id;
    use crate::shapes::model_shapes;

    fn deepseek() -> Vec<ModelShape> {
        let c = serde_json::json!({
            "model_type": "deepseek_v3", "hidden_size": 7168, "num_attention_heads": 128, "num_hidden_layers": 61,
            "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
            "v_head_dim": 128, "intermediate_size": 18432, "moe_intermediate_size": 2048,
            "n_routed_experts": 256, "n_shared_experts": 1, "first_k_dense_replace": 3
        });
        model_shapes(&c).expect("shapes")
    }

    #[test]
    fn simulated_deepseek_tables_are_legal_deterministic_and_round_trip() {
        for gpu in ["h800", "h100-sxm"] {
            let g = by_id(gpu).expect("gpu");
            let (list, skipped) = problems(&deepseek(), &default_m());
            assert!(skipped.is_empty(), "{skipped:?}");
            let t = simulate(g, &list);
            assert_eq!(t.entries.len(), 10 * 13);
            for e in &t.entries {
                let c: GemmConfig = e.config.parse().expect("config id parses");
                assert_eq!(is_legal(&c, &problem(e.n, e.k, e.experts, e.m)), Ok(()), "{e:?}");
                assert_eq!(e.source, Source::Predicted);
                assert!(e.us > 0.0 && e.tflops > 0.0 && e.tflops < g.fp8_tflops);
            }
            let again = simulate(g, &list);
            assert_eq!(t.to_yaml(), again.to_yaml(), "{gpu}: not deterministic");
            let back: Table = serde_yaml::from_str(&t.to_yaml()).expect("yaml parses");
            assert_eq!(back, t);
        }
    }

    #[test]
    fn lookup_takes_the_nearest_bucket_and_merge_keeps_measurements() {
        let g = by_id("h100-sxm").expect("gpu");
        let mut t = Table::new(g);
        let e = |m: usize, source: Source, us: f64| Entry {
            n: 4096,
            k: 7168,
            experts: 1,
            m,
            config: "wgmma_bm128_bn128_s4_mc1_sw128".into(),
            us,
            tflops: 1.0,
            source,
            what: String::new(),
            timed: 0,
            candidates: 0,
        };
        t.insert(e(64, Source::Measured, 10.0));
        t.insert(e(4096, Source::Predicted, 100.0));
        assert_eq!(t.lookup(4096, 7168, 1, 100).map(|e| e.m), Some(64));
        assert_eq!(t.lookup(4096, 7168, 1, 1000).map(|e| e.m), Some(4096));
        assert!(t.lookup(4096, 2048, 1, 64).is_none());
        let mut other = Table::new(g);
        other.insert(e(64, Source::Predicted, 5.0));
        other.insert(e(4096, Source::Measured, 90.0));
        t.merge(other).expect("merge");
        assert_eq!(t.lookup(4096, 7168, 1, 64).map(|e| e.us), Some(10.0), "a prediction replaced a measurement");
        assert_eq!(t.lookup(4096, 7168, 1, 4096).map(|e| e.source), Some(Source::Measured));
        let mut foreign = Table::new(by_id("h800").expect("gpu"));
        foreign.kernel_hash = "0".repeat(64);
        assert!(foreign.is_stale());
        assert!(t.merge(foreign).is_err());
        // A shape missing from the table still gets a configuration, from the model.
        assert!(choose(Some(&t), g, 2112, 7168, 1, 64).is_some());
        // The table's entry is used where it is legal, and not where it is not: multicast B pairs
        // M tiles, so at M = 192 (three 64-row tiles) the bucket's choice cannot run.
        let mut mc = Table::new(g);
        mc.insert(Entry { config: "wgmma_bm64_bn128_s4_mcB2_sw128".into(), ..e(128, Source::Measured, 10.0) });
        let c = choose(Some(&mc), g, 4096, 7168, 1, 128).expect("config");
        assert_eq!(c.id(), "wgmma_bm64_bn128_s4_mcB2_sw128");
        let c = choose(Some(&mc), g, 4096, 7168, 1, 192).expect("config");
        assert_ne!(c.id(), "wgmma_bm64_bn128_s4_mcB2_sw128");
        assert_eq!(is_legal(&c, &problem(4096, 7168, 1, 192)), Ok(()));
    }
}
