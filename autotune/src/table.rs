//! Tuning tables: per GPU and kernel source, the chosen configuration for each (N, K, experts,
//! M bucket), measured or predicted, as YAML; merging, lookup for any M, stale-hash detection.

use std::fmt;
use std::path::{Path, PathBuf};

use fp8forge_kernels::{GemmShape, GpuArch, Why, is_legal, search_space, source_hash};
use serde::{Deserialize, Serialize};

use crate::candidate::{Candidate, Impl};
use crate::gpu::GpuSpec;
use crate::model::{ModelParams, rank_with};
use crate::shapes::WeightShape;
use crate::tune::Timed;

/// Experts per grouped launch when tuning MoE shapes (one GPU's share under expert parallelism).
pub const SIM_EXPERTS: usize = 8;

/// The default M buckets: powers of two from 1 to 4096.
pub fn default_m() -> Vec<usize> {
    (0..=12).map(|i| 1usize << i).collect()
}

/// Which GPU a table is for (the table's `device`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableGpu {
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

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Measured => "measured",
            Source::Predicted => "predicted",
        })
    }
}

/// One tuned shape and M bucket. Read back, `impl` must agree with the config's id (a table
/// without `impl` is fp8forge's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawEntry")]
pub struct Entry {
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// Experts of a grouped launch (1: dense).
    pub experts: usize,
    /// Rows (per expert for a grouped launch).
    pub m: usize,
    /// Which implementation runs the entry: `fp8forge` or `cublaslt`.
    #[serde(rename = "impl")]
    pub implementation: Impl,
    /// The chosen candidate, written as its id: our configuration
    /// (`wgmma_bm128_bn128_s4_mcA2_sw128`) or a cuBLASLt algorithm with its parameters
    /// (`cublaslt_a66_t20_s13_k1_r0_w0_c0_i0_l0`).
    pub config: Candidate,
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
    /// Measured entries: the fastest time the search took of each other family of our kernel
    /// (kind, BLOCK_M, multicast), which calibrates the cost model beyond the chosen one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub family_best: Vec<Timed>,
}

impl Entry {
    /// The GEMM the entry's kernel runs ([`problem`]).
    pub fn problem_shape(&self) -> GemmShape {
        problem(self.n, self.k, self.experts, self.m)
    }
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

/// An [`Entry`] as written, before `impl` is checked against the config.
#[derive(Deserialize)]
struct RawEntry {
    n: usize,
    k: usize,
    experts: usize,
    m: usize,
    #[serde(rename = "impl", default)]
    implementation: Option<Impl>,
    config: Candidate,
    us: f64,
    tflops: f64,
    source: Source,
    #[serde(default)]
    what: String,
    #[serde(default)]
    timed: usize,
    #[serde(default)]
    candidates: usize,
    #[serde(default)]
    family_best: Vec<Timed>,
}

impl TryFrom<RawEntry> for Entry {
    type Error = String;

    fn try_from(r: RawEntry) -> Result<Entry, String> {
        let implementation = r.implementation.unwrap_or(Impl::Fp8forge);
        if implementation != r.config.implementation() {
            return Err(format!("entry {}x{} M={}: impl {implementation} but config {}", r.n, r.k, r.m, r.config));
        }
        Ok(Entry {
            n: r.n,
            k: r.k,
            experts: r.experts,
            m: r.m,
            implementation,
            config: r.config,
            us: r.us,
            tflops: r.tflops,
            source: r.source,
            what: r.what,
            timed: r.timed,
            candidates: r.candidates,
            family_best: r.family_best,
        })
    }
}

/// Which calibration of the cost model a table's pruning or prediction used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalibrationRef {
    /// The calibration file, as given.
    pub file: String,
    /// SHA-256 of its bytes.
    pub digest: String,
}

/// A configuration in a table or a report: its id, parsed back when read.
pub mod config_id {
    use fp8forge_kernels::GemmConfig;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the configuration's id.
    pub fn serialize<S: Serializer>(c: &GemmConfig, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&c.id())
    }

    /// Writes the configuration's id, or nothing (`null`).
    pub fn serialize_option<S: Serializer>(c: &Option<GemmConfig>, s: S) -> Result<S::Ok, S::Error> {
        match c {
            Some(c) => s.serialize_some(&c.id()),
            None => s.serialize_none(),
        }
    }

    /// Reads an id; one that does not parse is an error naming it.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<GemmConfig, D::Error> {
        let id = String::deserialize(d)?;
        id.parse().map_err(serde::de::Error::custom)
    }
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

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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

/// A weight shape no kernel can run, left out of the problems.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedShape {
    /// The shape.
    pub shape: WeightShape,
    /// Why no kernel runs it.
    pub why: Why,
}

impl fmt::Display for SkippedShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.shape;
        if !s.what.is_empty() {
            write!(f, "{} ", s.what)?;
        }
        write!(f, "{}x{}: {}", s.n, s.k, self.why)
    }
}

/// Every shape at every M, as tuning problems (grouped shapes with at most [`SIM_EXPERTS`]
/// experts per launch). Shapes the kernels cannot run (K not a multiple of 128) are returned as
/// skipped, with the reason.
pub fn problems(shapes: &[WeightShape], ms: &[usize]) -> (Vec<Problem>, Vec<SkippedShape>) {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for s in shapes {
        let experts = if s.groups > 1 { s.groups.min(SIM_EXPERTS) } else { 1 };
        for &m in ms {
            let p = Problem { n: s.n, k: s.k, experts, m, what: s.what.clone() };
            if let Err(why) = p.shape().validate() {
                skipped.push(SkippedShape { shape: s.clone(), why });
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
    pub device: TableGpu,
    /// `source_hash()` of the kernels the entries were tuned for.
    pub kernel_hash: String,
    /// The calibration of the cost model that pruned (measured) or predicted (simulated) the
    /// entries; none: the model's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationRef>,
    /// Entries sorted by (N, K, experts, M).
    pub entries: Vec<Entry>,
}

/// Why a table cannot be read, merged or written.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The table file is not there (or a directory on its path is not one).
    #[error("{}: {source}", .file.display())]
    Missing {
        /// The file.
        file: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The table file is there but cannot be read (permission denied, an I/O error, ...).
    #[error("{}: {source}", .file.display())]
    Unreadable {
        /// The file.
        file: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a tuning table (YAML that does not parse as one, an unknown configuration id).
    #[error("{}: not a tuning table: {source}", .file.display())]
    Malformed {
        /// The file.
        file: PathBuf,
        /// What the YAML parser said.
        #[source]
        source: serde_yaml::Error,
    },
    /// The table in the file is another GPU's, so a run for this one cannot extend it.
    #[error("{}: a table for {found}, not {wanted}", .file.display())]
    OtherGpu {
        /// The file.
        file: PathBuf,
        /// The GPU id of its table.
        found: String,
        /// The GPU id of the run.
        wanted: String,
    },
    /// Two tables of different GPUs or kernel sources cannot merge.
    #[error("cannot merge a table for {from} into one for {into}")]
    Mismatch {
        /// The GPU and kernels of the table merged in.
        from: String,
        /// The GPU and kernels of the table merged into.
        into: String,
    },
    /// The table could not be written as YAML.
    #[error("cannot write the table as YAML: {0}")]
    Serialize(#[source] serde_yaml::Error),
}

impl TableError {
    /// True when the user's input is at fault (a missing or malformed file, another GPU's
    /// table), as opposed to the system (a file that cannot be read): the CLI exits 2 for these,
    /// 1 otherwise.
    pub fn is_bad_input(&self) -> bool {
        match self {
            TableError::Missing { .. }
            | TableError::Malformed { .. }
            | TableError::OtherGpu { .. }
            | TableError::Mismatch { .. } => true,
            TableError::Unreadable { .. } | TableError::Serialize(_) => false,
        }
    }
}

/// What [`Table::load_for`] found in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// No table: the new one is written alone.
    Absent,
    /// A table of the same GPU and kernels: the new entries were merged into it.
    Merged,
    /// A table tuned for other kernels (stale hash): it is replaced.
    ReplacedStale,
}

/// The GEMM problem of an entry (grouped: `experts` blocks of `m` rows each, aligned to 128).
pub fn problem(n: usize, k: usize, experts: usize, m: usize) -> GemmShape {
    if experts > 1 { GemmShape::grouped_tokens(m, n, k, experts) } else { GemmShape::dense(m, n, k) }
}

impl Table {
    /// An empty table for `gpu`.
    pub fn new(gpu: &GpuSpec) -> Self {
        Table {
            device: TableGpu {
                id: gpu.id.into(),
                name: gpu.name.into(),
                sms: gpu.sms,
                cc: format!("{}.{}", gpu.cc.0, gpu.cc.1),
            },
            kernel_hash: source_hash(),
            calibration: None,
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
    ///
    /// # Errors
    ///
    /// [`TableError::Mismatch`] for a table of another GPU or other kernels.
    pub fn merge(&mut self, other: Table) -> Result<(), TableError> {
        if other.device.id != self.device.id || other.kernel_hash != self.kernel_hash {
            return Err(TableError::Mismatch {
                from: format!("{} (kernels {})", other.device.id, short(&other.kernel_hash)),
                into: format!("{} (kernels {})", self.device.id, short(&self.kernel_hash)),
            });
        }
        if other.calibration.is_some() {
            self.calibration = other.calibration;
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
    ///
    /// # Errors
    ///
    /// [`TableError::Missing`], [`TableError::Unreadable`], [`TableError::Malformed`].
    pub fn load(path: &Path) -> Result<Self, TableError> {
        let file = path.to_path_buf();
        let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory => TableError::Missing { file, source },
            _ => TableError::Unreadable { file, source },
        })?;
        serde_yaml::from_str(&text).map_err(|source| TableError::Malformed { file: path.to_path_buf(), source })
    }

    /// The table to write to `path` for a run that made `new`: the table already there with
    /// `new` merged in when it is for the same GPU and kernels; `new` alone when there is none,
    /// or when the one there was tuned for other kernels (it is replaced). The second value says
    /// which.
    ///
    /// # Errors
    ///
    /// [`TableError::OtherGpu`] when the file holds another GPU's table (it is never written
    /// over), or the file cannot be read or is not a table.
    pub fn load_for(path: &Path, new: Table) -> Result<(Table, Existing), TableError> {
        let mut old = match Table::load(path) {
            Ok(old) => old,
            Err(TableError::Missing { .. }) => return Ok((new, Existing::Absent)),
            Err(e) => return Err(e),
        };
        if old.is_stale() {
            return Ok((new, Existing::ReplacedStale));
        }
        if old.device.id != new.device.id {
            return Err(TableError::OtherGpu { file: path.to_path_buf(), found: old.device.id, wanted: new.device.id });
        }
        old.merge(new)?;
        Ok((old, Existing::Merged))
    }

    /// The table as YAML.
    ///
    /// # Errors
    ///
    /// [`TableError::Serialize`] (not expected of a table, but never an empty file instead).
    pub fn to_yaml(&self) -> Result<String, TableError> {
        serde_yaml::to_string(self).map_err(TableError::Serialize)
    }
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}

/// What to run for a shape: the table's entry (nearest M bucket) when it has the shape, is not
/// stale, and its entry can run at this M (a cuBLASLt algorithm always; our configuration when
/// legal: multicast pairs tiles, whose count depends on M); else the cost model's best.
pub fn choose(table: Option<&Table>, gpu: &GpuSpec, n: usize, k: usize, experts: usize, m: usize) -> Option<Candidate> {
    let shape = problem(n, k, experts, m);
    if let Some(e) = table.filter(|t| !t.is_stale()).and_then(|t| t.lookup(n, k, experts, m)) {
        match e.config {
            Candidate::CublasLt(_) => return Some(e.config),
            Candidate::Own(c) if is_legal(&c, &shape).is_ok() => return Some(e.config),
            Candidate::Own(_) => {}
        }
    }
    rank_with(&ModelParams::default(), gpu, &shape, &search_space(GpuArch::Sm90a))
        .first()
        .map(|(c, _)| Candidate::Own(*c))
}

/// Fills a table from the cost model alone (`--simulate`): every problem, the model's best.
pub fn simulate(gpu: &GpuSpec, problems: &[Problem]) -> Table {
    simulate_with(&ModelParams::default(), gpu, problems)
}

/// [`simulate`] with the model's parameters `params` (a calibration).
pub fn simulate_with(params: &ModelParams, gpu: &GpuSpec, problems: &[Problem]) -> Table {
    let space = search_space(GpuArch::Sm90a);
    let mut t = Table::new(gpu);
    for p in problems {
        if let Some((c, pred)) = rank_with(params, gpu, &p.shape(), &space).into_iter().next() {
            t.insert(Entry {
                n: p.n,
                k: p.k,
                experts: p.experts,
                m: p.m,
                implementation: Impl::Fp8forge,
                config: Candidate::Own(c),
                us: pred.us,
                tflops: pred.tflops,
                source: Source::Predicted,
                what: p.what.clone(),
                timed: 0,
                candidates: 0,
                family_best: Vec::new(),
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
    use crate::shapes::tests::deepseek_v3;
    use fp8forge_kernels::GemmConfig;

    fn deepseek() -> Vec<WeightShape> {
        model_shapes(&deepseek_v3())
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
                let c = e.config.own().expect("simulated entries are ours");
                assert_eq!(is_legal(&c, &problem(e.n, e.k, e.experts, e.m)), Ok(()), "{e:?}");
                assert_eq!(e.source, Source::Predicted);
                assert!(e.us > 0.0 && e.tflops > 0.0 && e.tflops < g.fp8_tflops);
            }
            let again = simulate(g, &list);
            let yaml = t.to_yaml().expect("yaml");
            assert_eq!(yaml, again.to_yaml().expect("yaml"), "{gpu}: not deterministic");
            let back: Table = serde_yaml::from_str(&yaml).expect("yaml parses");
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
            implementation: Impl::Fp8forge,
            config: "wgmma_bm128_bn128_s4_mc1_sw128".parse().expect("id"),
            us,
            tflops: 1.0,
            source,
            what: String::new(),
            timed: 0,
            candidates: 0,
            family_best: Vec::new(),
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
        mc.insert(Entry {
            config: "wgmma_bm64_bn128_s4_mcB2_sw128".parse().expect("id"),
            ..e(128, Source::Measured, 10.0)
        });
        let c = choose(Some(&mc), g, 4096, 7168, 1, 128).expect("config");
        assert_eq!(c.id(), "wgmma_bm64_bn128_s4_mcB2_sw128");
        let c = choose(Some(&mc), g, 4096, 7168, 1, 192).expect("config");
        assert_ne!(c.id(), "wgmma_bm64_bn128_s4_mcB2_sw128");
        assert_eq!(is_legal(&c.own().expect("ours"), &problem(4096, 7168, 1, 192)), Ok(()));
        // A cuBLASLt entry is run as it is, at any M.
        let lt: Candidate = "cublaslt_a66_t20_s13_k1_r0_w0_c0_i0_l0".parse().expect("id");
        mc.insert(Entry { implementation: Impl::Cublaslt, config: lt, ..e(128, Source::Measured, 9.0) });
        assert_eq!(choose(Some(&mc), g, 4096, 7168, 1, 192), Some(lt));
    }

    /// A fresh directory for one test (removed when dropped).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(test: &str) -> Self {
            let p = std::env::temp_dir().join(format!("fp8forge-autotune-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("temp dir");
            TempDir(p)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn entry(m: usize, source: Source) -> Entry {
        Entry {
            n: 4096,
            k: 7168,
            experts: 1,
            m,
            implementation: Impl::Fp8forge,
            config: Candidate::Own(GemmConfig::wgmma(128, 128, 4, fp8forge_kernels::Multicast::A)),
            us: 10.5,
            tflops: 1.0,
            source,
            what: "o".into(),
            timed: 3,
            candidates: 20,
            family_best: Vec::new(),
        }
    }

    #[test]
    fn yaml_writes_the_configuration_as_its_id() {
        let mut t = Table::new(by_id("h100-sxm").expect("gpu"));
        t.kernel_hash = "abc".into();
        t.insert(entry(64, Source::Measured));
        let want = "device:\n  id: h100-sxm\n  name: H100 SXM5 80GB\n  sms: 132\n  cc: '9.0'\nkernel_hash: abc\n\
                    entries:\n- n: 4096\n  k: 7168\n  experts: 1\n  m: 64\n  impl: fp8forge\n  config: wgmma_bm128_bn128_s4_mcA2_sw128\n\
                    \x20 us: 10.5\n  tflops: 1.0\n  source: measured\n  what: o\n  timed: 3\n  candidates: 20\n";
        assert_eq!(t.to_yaml().expect("yaml"), want);
        let bad = want.replace("mcA2", "mcC2");
        let e = serde_yaml::from_str::<Table>(&bad).expect_err("an unknown id is refused");
        assert!(e.to_string().contains("mcC2"), "{e}");
        // A table written before cuBLASLt entries (no `impl`) loads as fp8forge's.
        let old = want.replace("  impl: fp8forge\n", "");
        assert_eq!(serde_yaml::from_str::<Table>(&old).expect("old table"), t);
        // `impl` must agree with the config.
        let wrong = want.replace("impl: fp8forge", "impl: cublaslt");
        let e = serde_yaml::from_str::<Table>(&wrong).expect_err("impl and config disagree");
        assert!(e.to_string().contains("impl cublaslt but config wgmma"), "{e}");
    }

    #[test]
    fn cublaslt_entries_round_trip_with_their_parameters_and_calibration() {
        let mut t = Table::new(by_id("h100-sxm").expect("gpu"));
        t.calibration = Some(CalibrationRef { file: "h100.calibration.yaml".into(), digest: "ab".repeat(32) });
        t.insert(entry(64, Source::Measured));
        let lt: Candidate = "cublaslt_a66_t20_s13_k1_r0_w1_c0_i0_l2".parse().expect("id");
        t.insert(Entry { implementation: Impl::Cublaslt, config: lt, ..entry(128, Source::Measured) });
        let yaml = t.to_yaml().expect("yaml");
        assert!(yaml.contains("impl: cublaslt\n  config: cublaslt_a66_t20_s13_k1_r0_w1_c0_i0_l2\n"), "{yaml}");
        assert!(yaml.contains("calibration:\n  file: h100.calibration.yaml\n"), "{yaml}");
        let back: Table = serde_yaml::from_str(&yaml).expect("parses");
        assert_eq!(back, t);
        assert_eq!(
            back.entries[1].config.lt().map(|a| (a.algo, a.tile, a.stages, a.swizzle, a.cluster)),
            Some((66, 20, 13, 1, 2))
        );
    }

    #[test]
    fn load_tells_a_missing_or_malformed_file_from_an_unreadable_one() {
        let d = TempDir::new("load");
        let missing = Table::load(&d.path().join("missing.yaml")).expect_err("missing");
        assert!(matches!(missing, TableError::Missing { .. }) && missing.is_bad_input(), "{missing}");
        let bad = d.path().join("bad.yaml");
        std::fs::write(&bad, "not: [a table").expect("write");
        let malformed = Table::load(&bad).expect_err("malformed");
        assert!(matches!(malformed, TableError::Malformed { .. }) && malformed.is_bad_input(), "{malformed}");
        // A directory cannot be read as a file: the system's failure, not a malformed table.
        let unreadable = Table::load(d.path()).expect_err("a directory");
        assert!(matches!(unreadable, TableError::Unreadable { .. }) && !unreadable.is_bad_input(), "{unreadable}");
    }

    #[test]
    fn load_for_merges_same_gpu_replaces_stale_and_refuses_another_gpu() {
        let d = TempDir::new("load-for");
        let path = d.path().join("t.yaml");
        let h100 = by_id("h100-sxm").expect("gpu");
        let with = |gpu: &GpuSpec, m: usize| {
            let mut t = Table::new(gpu);
            t.insert(entry(m, Source::Predicted));
            t
        };
        let (t, existing) = Table::load_for(&path, with(h100, 64)).expect("no file");
        assert_eq!((existing, t.entries.len()), (Existing::Absent, 1));
        std::fs::write(&path, t.to_yaml().expect("yaml")).expect("write");
        let (t, existing) = Table::load_for(&path, with(h100, 128)).expect("same GPU");
        assert_eq!((existing, t.entries.len()), (Existing::Merged, 2));
        let e = Table::load_for(&path, with(by_id("h800").expect("gpu"), 64)).expect_err("another GPU");
        assert!(
            matches!(&e, TableError::OtherGpu { found, wanted, .. } if found == "h100-sxm" && wanted == "h800-sxm")
        );
        assert!(e.is_bad_input());
        let mut stale = t.clone();
        stale.kernel_hash = "0".repeat(64);
        std::fs::write(&path, stale.to_yaml().expect("yaml")).expect("write");
        let (t, existing) = Table::load_for(&path, with(by_id("h800").expect("gpu"), 64)).expect("stale");
        assert_eq!((existing, t.device.id.as_str(), t.entries.len()), (Existing::ReplacedStale, "h800-sxm", 1));
    }
}
