//! GPU acceptance tests (run where a CUDA device is present; elsewhere each test says on stderr
//! that it SKIPPED, or fails when `FP8FORGE_REQUIRE_GPU=1`):
//!
//! - every variant of the search space (dense, and grouped where supported) against the CPU
//!   references on fresh random inputs whose 1×128 activation groups and 128×128 weight blocks
//!   are scaled by `2^U(−3,3)` before quantizing (so a wrong scale block shows), for shapes that
//!   are and are not multiples of its tile and that give each persistent CTA several tiles:
//!   element-wise within one bf16 ulp (+5e-3 RMS) of `reference::gemm_contract`, relative
//!   Frobenius error under 1e-2 against the f64 product of the dequantized operands, no NaN,
//!   every output written (the output is poisoned with NaN first), padding rows of a grouped
//!   problem exactly 0;
//! - one configuration run 20 times on the same inputs: bitwise the same output;
//! - the activation quantization kernel bit for bit against its reference;
//! - the cuBLASLt baselines against the same reference.
//!
//! Environment:
//! - `FP8FORGE_SEED` fixes the inputs (default: drawn from the clock and printed);
//! - `FP8FORGE_GPU_REPORT=FILE` appends one TSV line per variant and shape as soon as it is known
//!   (a compile failure or spill is a line of its own), so a hang loses nothing already run;
//! - `FP8FORGE_GPU_FILTER` selects variants exactly (see `fp8forge_kernels::filter`):
//!   comma-separated `family:NAME` (`mma`, `wgmma_bm128_mcA2`, ...) or configuration ids;
//! - `FP8FORGE_GPU_SHAPES=dense|grouped` keeps only dense or only grouped problems.

use std::collections::HashMap;
use std::io::Write;

use fp8forge_kernels::cache::{compile_cached, is_cached};
use fp8forge_kernels::config::{GemmConfig, GemmShape, GpuArch, KernelKind, Multicast, is_legal, supports_grouped};
use fp8forge_kernels::cublaslt::{
    Baseline, CublasLt, LtArgs, LtScales, activation_scales_for_cublas, weight_scales_for_cublas,
};
use fp8forge_kernels::cuda::Device;
use fp8forge_kernels::filter::VariantFilter;
use fp8forge_kernels::gemm::{ActQuantKernel, DEFAULT_RASTER_GROUP, GemmArgs, GemmKernel, MIndices};
use fp8forge_kernels::problem::{HostProblem, Rng};
use fp8forge_kernels::reference::{
    Comparison, ContractComparison, ScaleFormat, act_quant_ref, bf16_to_f32, compare, compare_contract, e4m3_table,
    f32_to_bf16, gemm_references,
};
use fp8forge_kernels::source::KernelSpec;
use rayon::prelude::*;

const TOL: f64 = 1e-2;
const POISON: u16 = 0xFFFF;
/// Scale exponents of the acceptance data: `2^U(−3,3)` per block and group.
const SPREAD: u32 = 3;
/// How long one checked launch may take before it counts as hung.
const LAUNCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

fn device_or_skip(test: &str) -> Option<Device> {
    match Device::open(0) {
        Ok(d) if d.arch().is_some() => Some(d),
        Ok(d) => skip(test, &format!("{} is not an sm_89/sm_90 GPU", d.info.name)),
        Err(e) => skip(test, &e.to_string()),
    }
}

fn skip(test: &str, why: &str) -> Option<Device> {
    if std::env::var("FP8FORGE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("{test}: FP8FORGE_REQUIRE_GPU=1 but {why}");
    }
    say(&format!("SKIPPED {test}: {why} (set FP8FORGE_REQUIRE_GPU=1 to make this a failure)"));
    None
}

fn seed() -> u64 {
    std::env::var("FP8FORGE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    })
}

/// The configurations `FP8FORGE_GPU_FILTER` selects on `arch`.
fn selected(arch: GpuArch) -> Vec<GemmConfig> {
    let text = std::env::var("FP8FORGE_GPU_FILTER").unwrap_or_default();
    VariantFilter::parse(&text, arch).unwrap_or_else(|e| panic!("FP8FORGE_GPU_FILTER={text:?}: {e}")).select(arch)
}

/// Whether `FP8FORGE_GPU_SHAPES` keeps dense (`grouped == false`) or grouped problems.
fn shapes_kept(grouped: bool) -> bool {
    match std::env::var("FP8FORGE_GPU_SHAPES").unwrap_or_default().as_str() {
        "dense" => !grouped,
        "grouped" => grouped,
        _ => true,
    }
}

/// Appends lines to `FP8FORGE_GPU_REPORT` as results come (the header first if the file is new).
struct Report {
    path: Option<std::path::PathBuf>,
}

impl Report {
    const HEADER: &'static str =
        "test\tvariant\tshape\trel_err_f64\tmax_abs_err\tcontract_mismatches\tcontract_worst\tstatus\n";

    fn open() -> Report {
        let path = std::env::var_os("FP8FORGE_GPU_REPORT").map(std::path::PathBuf::from);
        if let Some(p) = &path
            && std::fs::metadata(p).map_or(true, |m| m.len() == 0)
        {
            let _ = std::fs::write(p, Self::HEADER);
        }
        Report { path }
    }

    fn line(&self, fields: &[&str]) {
        let Some(p) = &self.path else { return };
        let text = fields.iter().map(|f| f.replace(['\t', '\n'], " ")).collect::<Vec<_>>().join("\t") + "\n";
        let file = std::fs::OpenOptions::new().append(true).create(true).open(p);
        if let Err(e) = file.and_then(|mut f| f.write_all(text.as_bytes())) {
            say(&format!("FP8FORGE_GPU_REPORT {}: {e}", p.display()));
        }
    }
}

/// The rows checked against the CPU: all rows of a small problem; of a large one the first and
/// last 70 (both edges of the tile grid) and 64 others.
fn rows_to_check(m: usize, seed: u64) -> Vec<usize> {
    if m <= 512 {
        return (0..m).collect();
    }
    let mut rows: Vec<usize> = (0..70).chain(m - 70..m).collect();
    let mut rng = Rng::new(seed);
    rows.extend((0..64).map(|_| (rng.next_u64() % m as u64) as usize));
    rows.sort_unstable();
    rows.dedup();
    rows
}

/// A problem with both references on the checked rows.
struct Case {
    problem: HostProblem,
    rows: Vec<usize>,
    contract: Vec<u16>,
    reference: Vec<f64>,
}

impl Case {
    fn new(shape: GemmShape, seed: u64) -> Case {
        let problem = HostProblem::random_block_scaled(&shape, seed, &[10, 0, 250], SPREAD).expect("valid shape");
        let rows = rows_to_check(shape.m, seed ^ 0x55);
        let (contract, reference) = gemm_references(&shape, &problem.inputs(), Some(&rows)).expect("reference");
        Case { problem, rows, contract, reference }
    }
}

/// The shapes a configuration is checked on: tile multiples with a deep K; ragged M and N with
/// several tiles per persistent CTA and K shorter than most pipelines; and a grouped problem
/// (experts of 10, 0, 250 and the rest of 1024 tokens: padding rows, an empty expert, and a
/// 64-row block of padding only) with ragged N. `FP8FORGE_GPU_SHAPES` may keep only some.
fn shapes_for(c: &GemmConfig) -> Vec<GemmShape> {
    let (bm, bn) = (c.block_m as usize, c.block_n as usize);
    let mut v = Vec::new();
    if shapes_kept(false) {
        v.push(GemmShape::dense(4 * bm, 6 * bn, 1024));
        v.push(GemmShape::dense(12 * bm - 37, 24 * bn - 5, 384));
    }
    if supports_grouped(c) && shapes_kept(true) {
        v.push(GemmShape::grouped(1024, 6 * bn - 5, 256, 4));
    }
    v
}

/// What one run showed: both comparisons and the padding rows that were not zero.
struct Checked {
    f64: Comparison,
    contract: ContractComparison,
    padding_nonzero: usize,
}

impl Checked {
    fn status(&self) -> String {
        let (c, k) = (&self.f64, &self.contract);
        if c.non_finite > 0 {
            format!("{} outputs not written or not finite", c.non_finite)
        } else if self.padding_nonzero > 0 {
            format!("{} padding outputs not zero", self.padding_nonzero)
        } else if !k.passes() {
            format!(
                "{} outputs off the contract (worst {:.1}x the tolerance, first at checked index {:?})",
                k.mismatches, k.worst, k.first_mismatch
            )
        } else if !c.passes(TOL) {
            format!("relative error {:.3e} >= {TOL:e}", c.rel_err)
        } else {
            "ok".to_string()
        }
    }
}

/// Runs `kernel` once on `case` (output poisoned first) and returns the output.
fn launch_once(dev: &Device, kernel: &GemmKernel, p: &HostProblem) -> Result<Vec<u16>, String> {
    let shape = p.shape;
    let e = |x: fp8forge_kernels::KernelError| x.to_string();
    let a = dev.upload(&p.a).map_err(e)?;
    let sa = dev.upload(&p.sa).map_err(e)?;
    let b = dev.upload(&p.b).map_err(e)?;
    let sb = dev.upload(&p.sb).map_err(e)?;
    let d = dev.alloc::<u16>(shape.m * shape.n).map_err(e)?;
    let idx = p.m_indices.as_ref().map(|i| MIndices::upload(dev, i, shape.experts())).transpose().map_err(e)?;
    dev.fill_u16(&d.all(), POISON).map_err(e)?;
    let args = GemmArgs { a: a.all(), sa: sa.all(), b: b.all(), sb: sb.all(), d: d.all(), m_indices: idx.as_ref() };
    kernel.launch(dev, &shape, &args, DEFAULT_RASTER_GROUP).map_err(e)?;
    dev.synchronize_within(LAUNCH_TIMEOUT).map_err(e)?;
    let mut out = vec![0u16; shape.m * shape.n];
    dev.copy_to_host(&d.all(), &mut out).map_err(e)?;
    Ok(out)
}

fn run_one(dev: &Device, kernel: &GemmKernel, case: &Case) -> Result<Checked, String> {
    let p = &case.problem;
    let shape = p.shape;
    let out = launch_once(dev, kernel, p)?;
    let non_finite = out.par_iter().filter(|&&v| !bf16_to_f32(v).is_finite()).count();
    let sampled: Vec<u16> =
        case.rows.iter().flat_map(|&r| out[r * shape.n..(r + 1) * shape.n].iter().copied()).collect();
    let mut f64 = compare(&sampled, &case.reference).map_err(|e| e.to_string())?;
    f64.non_finite = f64.non_finite.max(non_finite);
    let contract = compare_contract(&sampled, &case.contract).map_err(|e| e.to_string())?;
    let padding_nonzero = match &p.m_indices {
        Some(idx) => (0..shape.m)
            .filter(|&r| idx[r] < 0)
            .map(|r| out[r * shape.n..(r + 1) * shape.n].iter().filter(|&&v| v != 0).count())
            .sum(),
        None => 0,
    };
    Ok(Checked { f64, contract, padding_nonzero })
}

/// The kernel variants of `configs` (dense, and grouped where supported and kept).
fn specs_of(configs: &[GemmConfig]) -> Vec<KernelSpec> {
    configs
        .iter()
        .flat_map(|&config| {
            let mut v = Vec::new();
            if shapes_kept(false) {
                v.push(KernelSpec::Gemm { config, grouped: false });
            }
            if supports_grouped(&config) && shapes_kept(true) {
                v.push(KernelSpec::Gemm { config, grouped: true });
            }
            v
        })
        .collect()
}

/// Compiles (or finds in the cache) every variant, in parallel; a variant that fails to compile
/// or spills is recorded in the report and left out, the others go on. Returns the failed ones.
fn precompile(specs: &[KernelSpec], arch: GpuArch, report: &Report) -> Vec<(KernelSpec, String)> {
    let t0 = std::time::Instant::now();
    let cached = specs.iter().filter(|s| is_cached(s, arch)).count();
    let failed: Vec<(KernelSpec, String)> =
        specs.par_iter().filter_map(|s| compile_cached(s, arch).err().map(|e| (*s, e.to_string()))).collect();
    say(&format!(
        "{} variants: {cached} from the kernel cache, {} compiled here, {} failed to build, in {:.1} s",
        specs.len(),
        specs.len() - cached,
        failed.len(),
        t0.elapsed().as_secs_f64()
    ));
    for (spec, e) in &failed {
        say(&format!("BUILD FAILED {}: {e}", spec.label()));
        report.line(&["variants", &spec.label(), "-", "-", "-", "-", "-", &format!("build failed: {e}")]);
    }
    failed
}

#[test]
fn every_variant_matches_the_cpu_reference() {
    let Some(dev) = device_or_skip("every_variant_matches_the_cpu_reference") else { return };
    let arch = dev.arch().expect("supported GPU");
    let seed = seed();
    let configs = selected(arch);
    say(&format!("{} on {}: {} configurations, seed {seed}", arch, dev.info.name, configs.len()));
    let report = Report::open();
    let failed_builds = precompile(&specs_of(&configs), arch, &report);
    let built = |c: &GemmConfig, grouped: bool| {
        !failed_builds.iter().any(|(s, _)| *s == KernelSpec::Gemm { config: *c, grouped })
    };

    let mut cases: HashMap<GemmShape, Case> = HashMap::new();
    let mut failures: Vec<String> = failed_builds.iter().map(|(s, e)| format!("{}: {e}", s.label())).collect();
    let (mut runs, mut illegal, mut worst) = (0usize, 0usize, 0f64);
    let mut lost: Option<String> = None;
    'configs: for (i, c) in configs.iter().enumerate() {
        for shape in shapes_for(c) {
            let grouped = shape.groups.is_some();
            if is_legal(c, &shape).is_err() || !built(c, grouped) {
                illegal += usize::from(is_legal(c, &shape).is_err());
                continue;
            }
            let variant = format!("{}{}", c.id(), if grouped { " grouped" } else { "" });
            if let Some(why) = &lost {
                report.line(&[
                    "variants",
                    &variant,
                    &shape.to_string(),
                    "-",
                    "-",
                    "-",
                    "-",
                    &format!("not run: {why}"),
                ]);
                failures.push(format!("{variant} on {shape}: not run: {why}"));
                continue 'configs;
            }
            let case = cases.entry(shape).or_insert_with(|| Case::new(shape, seed ^ (i as u64) << 8));
            say(&format!("launch {variant} on {shape}"));
            let result =
                GemmKernel::load(&dev, *c, grouped).map_err(|e| e.to_string()).and_then(|k| run_one(&dev, &k, case));
            runs += 1;
            let (status, fields) = match &result {
                Ok(ch) => (
                    ch.status(),
                    [
                        format!("{:.3e}", ch.f64.rel_err),
                        format!("{:.3e}", ch.f64.max_abs_err),
                        ch.contract.mismatches.to_string(),
                        format!("{:.2}", ch.contract.worst),
                    ],
                ),
                Err(e) => (e.clone(), ["-".into(), "-".into(), "-".into(), "-".into()]),
            };
            say(&format!("  {variant} on {shape}: {status}"));
            report.line(&[
                "variants",
                &variant,
                &shape.to_string(),
                &fields[0],
                &fields[1],
                &fields[2],
                &fields[3],
                &status,
            ]);
            match &result {
                Ok(ch) if status == "ok" => worst = worst.max(ch.f64.rel_err),
                _ => failures.push(format!("{variant} on {shape}: {status}")),
            }
            if result.is_err()
                && let Err(e) = dev.synchronize()
                && e.is_device_lost()
            {
                lost = Some(format!("the device was lost after {variant} on {shape} ({e})"));
            }
        }
        if cases.len() > 48 {
            cases.clear(); // bound host memory; later configurations draw fresh problems
        }
    }
    say(&format!(
        "{runs} runs ({illegal} variant/shape pairs refused by is_legal), {} failed; worst passing relative error {worst:.3e}",
        failures.len()
    ));
    assert!(failures.is_empty(), "seed {seed}: {} failed:\n{}", failures.len(), failures.join("\n"));
}

/// One configuration (the first `FP8FORGE_GPU_FILTER` selects; default BM = BN = 128, 4 stages,
/// no multicast) run 20 times on the same inputs and a ragged shape: every output bit the same.
#[test]
fn one_config_is_bitwise_deterministic() {
    let Some(dev) = device_or_skip("one_config_is_bitwise_deterministic") else { return };
    let arch = dev.arch().expect("supported GPU");
    let cfg = if std::env::var("FP8FORGE_GPU_FILTER").is_ok_and(|f| !f.trim().is_empty()) {
        selected(arch)[0]
    } else {
        GemmConfig::wgmma(128, 128, 4, Multicast::None)
    };
    let (bm, bn) = (cfg.block_m as usize, cfg.block_n as usize);
    let shape = GemmShape::dense(12 * bm - 37, 24 * bn - 6, 1024);
    let p = HostProblem::random_block_scaled(&shape, seed(), &[], SPREAD).expect("problem");
    let kernel = GemmKernel::load(&dev, cfg, false).unwrap_or_else(|e| panic!("{cfg}: {e}"));
    let report = Report::open();
    let first = launch_once(&dev, &kernel, &p).unwrap_or_else(|e| panic!("{cfg} run 1: {e}"));
    let mut differing = Vec::new();
    for run in 2..=20 {
        say(&format!("launch {cfg} on {shape}, run {run} of 20"));
        let out = launch_once(&dev, &kernel, &p).unwrap_or_else(|e| panic!("{cfg} run {run}: {e}"));
        let diff = out.iter().zip(&first).filter(|(a, b)| a != b).count();
        if diff > 0 {
            differing.push(format!("run {run}: {diff} outputs differ from run 1"));
        }
    }
    let status = if differing.is_empty() { "ok: 20 runs bitwise equal".to_string() } else { differing.join("; ") };
    say(&format!("{cfg} on {shape}: {status}"));
    report.line(&["determinism", &cfg.id(), &shape.to_string(), "-", "-", "-", "-", &status]);
    assert!(differing.is_empty(), "{cfg} is not deterministic: {status} (a race: METHOD.md)");
}

#[test]
fn act_quant_matches_its_reference_bit_for_bit() {
    let Some(dev) = device_or_skip("act_quant_matches_its_reference_bit_for_bit") else { return };
    let (m, k) = (333usize, 2048usize);
    let mut rng = Rng::new(seed());
    let x: Vec<u16> = (0..m * k)
        .map(|i| {
            let v = rng.normal() * if i % 131 == 0 { 300.0 } else { 1.0 };
            // Some all-zero groups and some tiny ones.
            if (i / 128) % 17 == 3 {
                0
            } else if (i / 128) % 19 == 5 {
                f32_to_bf16(v * 1e-30)
            } else {
                f32_to_bf16(v)
            }
        })
        .collect();
    let xd = dev.upload(&x).expect("upload");
    for format in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
        let kernel = ActQuantKernel::load(&dev, format).expect("act quant kernel");
        let q = dev.alloc::<u8>(m * k).expect("alloc");
        let s = dev.alloc::<f32>(m * k / 128).expect("alloc");
        kernel.launch(&dev, xd.all(), q.all(), s.all(), m, k).expect("launch");
        dev.synchronize().expect("sync");
        let (mut qh, mut sh) = (vec![0u8; m * k], vec![0f32; m * k / 128]);
        dev.copy_to_host(&q.all(), &mut qh).expect("copy");
        dev.copy_to_host(&s.all(), &mut sh).expect("copy");
        let (qr, sr) = act_quant_ref(&x, m, k, format).expect("reference");
        let bad_s = sh.iter().zip(&sr).position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(
            bad_s.is_none(),
            "{format:?}: scale {} differs: {} vs {}",
            bad_s.unwrap_or(0),
            sh[bad_s.unwrap_or(0)],
            sr[bad_s.unwrap_or(0)]
        );
        let bad_q = qh.iter().zip(&qr).position(|(a, b)| a != b);
        assert!(
            bad_q.is_none(),
            "{format:?}: code {} differs: {:#04x} vs {:#04x}",
            bad_q.unwrap_or(0),
            qh[bad_q.unwrap_or(0)],
            qr[bad_q.unwrap_or(0)]
        );
    }
}

/// Both cuBLASLt baselines against the reference, at an M that is a multiple of 4 and one that
/// is not (the activation scales' outer dimension is padded to a multiple of 4).
#[test]
fn cublaslt_baselines_match_the_reference() {
    let Some(dev) = device_or_skip("cublaslt_baselines_match_the_reference") else { return };
    let lt = match CublasLt::new(&dev) {
        Ok(lt) => lt,
        Err(e) => {
            skip("cublaslt_baselines_match_the_reference", &e.to_string());
            return;
        }
    };
    let report = Report::open();
    let mut failures = Vec::new();
    for m in [256, 254] {
        let shape = GemmShape::dense(m, 384, 1024);
        let case = Case::new(shape, seed());
        for baseline in [Baseline::Bf16, Baseline::Fp8Block] {
            say(&format!("launch {} on {shape}", baseline.name()));
            let status = match run_baseline(&dev, &lt, baseline, &case) {
                Ok(c) if c.passes(TOL) => format!("ok: relative error {:.3e}", c.rel_err),
                Ok(c) => format!("relative error {:.3e}, {} non-finite", c.rel_err, c.non_finite),
                Err(e) => e,
            };
            say(&format!("  {} on {shape}: {status}", baseline.name()));
            report.line(&["cublaslt", baseline.name(), &shape.to_string(), "-", "-", "-", "-", &status]);
            if !status.starts_with("ok") {
                failures.push(format!("{} on {shape}: {status}", baseline.name()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// One baseline call on `case` (D poisoned first), compared with the f64 reference.
fn run_baseline(dev: &Device, lt: &CublasLt, baseline: Baseline, case: &Case) -> Result<Comparison, String> {
    let e = |x: fp8forge_kernels::KernelError| x.to_string();
    let p = &case.problem;
    let shape = p.shape;
    let (m, n, k, kb, nb) = (shape.m, shape.n, shape.k, shape.k_blocks(), shape.n_blocks());
    let d = dev.alloc::<u16>(m * n).map_err(e)?;
    dev.fill_u16(&d.all(), POISON).map_err(e)?;
    let lut = e4m3_table();
    let (a, b, sa, sb) = match baseline {
        Baseline::Bf16 => {
            let a: Vec<u16> =
                (0..m * k).map(|i| f32_to_bf16(lut[p.a[i] as usize] * p.sa[(i / k) * kb + (i % k) / 128])).collect();
            let b: Vec<u16> = (0..n * k)
                .map(|i| f32_to_bf16(lut[p.b[i] as usize] * p.sb[(i / k / 128) * kb + (i % k) / 128]))
                .collect();
            let to_bytes = |v: Vec<u16>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            (to_bytes(a), to_bytes(b), None, None)
        }
        Baseline::Fp8Block => {
            let (sa, _) = activation_scales_for_cublas(&p.sa, m, kb);
            (p.a.clone(), p.b.clone(), Some(sa), Some(weight_scales_for_cublas(&p.sb, nb, kb)))
        }
    };
    let (ad, bd) = (dev.upload(&a).map_err(e)?, dev.upload(&b).map_err(e)?);
    let sad = sa.map(|s| dev.upload(&s)).transpose().map_err(e)?;
    let sbd = sb.map(|s| dev.upload(&s)).transpose().map_err(e)?;
    let scales =
        LtScales { a: sad.as_ref().map_or(0, |s| s.all().ptr()), b: sbd.as_ref().map_or(0, |s| s.all().ptr()) };
    let plan = lt.plan(baseline, m, n, k, scales).map_err(e)?;
    let args = LtArgs { a: ad.all().ptr(), b: bd.all().ptr(), d: d.all(), a_scales: scales.a, b_scales: scales.b };
    lt.run(dev, &plan, &args).map_err(e)?;
    dev.synchronize_within(LAUNCH_TIMEOUT).map_err(e)?;
    let mut out = vec![0u16; m * n];
    dev.copy_to_host(&d.all(), &mut out).map_err(e)?;
    let sampled: Vec<u16> = case.rows.iter().flat_map(|&r| out[r * n..(r + 1) * n].iter().copied()).collect();
    compare(&sampled, &case.reference).map_err(e)
}

/// cuBLASLt's block-scaled FP8 algorithms (issue 13): listed by its heuristic, each rebuilt from
/// its parameters and run through the benchmark harness's check against the f64 reference, on a
/// dense and a grouped shape.
#[test]
fn cublaslt_algorithms_are_listed_rebuilt_and_match_the_reference() {
    use fp8forge_kernels::bench::{BenchOptions, LtRow, ShapeBench};
    use fp8forge_kernels::cublaslt::LT_ALGORITHMS;
    const NAME: &str = "cublaslt_algorithms_are_listed_rebuilt_and_match_the_reference";
    let Some(dev) = device_or_skip(NAME) else { return };
    let lt = match CublasLt::new(&dev) {
        Ok(lt) => lt,
        Err(e) => {
            skip(NAME, &e.to_string());
            return;
        }
    };
    let report = Report::open();
    let mut failures = Vec::new();
    let opts = BenchOptions { baselines: false, replays: 2, warmup_replays: 1, ..BenchOptions::default() };
    for (shape, tokens) in
        [(GemmShape::dense(256, 384, 1024), None), (GemmShape::grouped(512, 384, 1024, 2), Some(200))]
    {
        let bench = ShapeBench::new(&dev, &shape, &BenchOptions { tokens_per_expert: tokens, ..opts.clone() })
            .unwrap_or_else(|e| panic!("{shape}: {e}"));
        let algos = match bench.lt_algorithms(&lt, LT_ALGORITHMS) {
            Ok(a) if !a.is_empty() => a,
            Ok(_) => {
                failures.push(format!("{shape}: the heuristic offered no algorithm"));
                continue;
            }
            Err(e) => {
                failures.push(format!("{shape}: {e}"));
                continue;
            }
        };
        say(&format!(
            "{shape}: {} algorithm(s): {}",
            algos.len(),
            algos.iter().map(|a| a.id()).collect::<Vec<_>>().join(" ")
        ));
        let rows: Vec<LtRow> = algos.iter().map(|&algo| LtRow::Algo { algo, fall_back: false }).collect();
        let out = bench.run_with(Some(&lt), &[], &rows).unwrap_or_else(|e| panic!("{shape}: {e}"));
        for a in &algos {
            let status = match out.iter().find(|r| r.config == a.id()) {
                Some(r) if r.ok && r.us.is_some() => {
                    format!("ok: relative error {:.3e}", r.rel_err.unwrap_or(f64::NAN))
                }
                Some(r) => r.error.clone().unwrap_or_else(|| "failed".into()),
                None => "no row".into(),
            };
            report.line(&["cublaslt", &a.id(), &shape.to_string(), "-", "-", "-", "-", &status]);
            if !status.starts_with("ok") {
                failures.push(format!("{shape} {a}: {status}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn multicast_and_grouped_rules_hold_at_launch() {
    let Some(dev) = device_or_skip("multicast_and_grouped_rules_hold_at_launch") else { return };
    if dev.arch() != Some(fp8forge_kernels::GpuArch::Sm90a) {
        skip("multicast_and_grouped_rules_hold_at_launch", "needs sm_90a");
        return;
    }
    // 3 N tiles cannot be paired for A multicast: the launch is refused before anything runs.
    let cfg = GemmConfig::wgmma(128, 128, 4, Multicast::A);
    assert_eq!(cfg.kind, KernelKind::Wgmma);
    let kernel = GemmKernel::load(&dev, cfg, false).expect("load");
    let shape = GemmShape::dense(128, 384, 128);
    let p = HostProblem::random(&shape, 1, &[]).expect("problem");
    let (a, sa, b, sb) =
        (dev.upload(&p.a).unwrap(), dev.upload(&p.sa).unwrap(), dev.upload(&p.b).unwrap(), dev.upload(&p.sb).unwrap());
    let d = dev.alloc::<u16>(shape.m * shape.n).unwrap();
    let args = GemmArgs { a: a.all(), sa: sa.all(), b: b.all(), sb: sb.all(), d: d.all(), m_indices: None };
    let err = kernel.launch(&dev, &shape, &args, DEFAULT_RASTER_GROUP).unwrap_err();
    assert!(err.is_bad_input(), "{err}");
}
