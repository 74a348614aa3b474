//! The on-disk compile cache: `$FP8FORGE_KERNEL_CACHE`, else `$XDG_CACHE_HOME/fp8forge/kernels/`,
//! else `~/.cache/fp8forge/kernels/`. One `<key>.cubin` (and `<key>.log`) per variant, the key
//! being sha256 of the program text, the NVRTC options, the target architecture and the NVRTC
//! version (or `$FP8FORGE_KERNEL_CACHE_NVRTC`, see [`key_version`]); files are written to a temporary name and renamed, so a reader never sees half a
//! file. The cache is best effort: a directory that cannot be written only costs a recompile.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::GpuArch;
use crate::error::KernelError;
use crate::nvrtc::{self, Compiled, ResourceUsage};
use crate::source::{KernelSpec, compile_options, hex};

/// The cache directory, if a home for it is known.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("FP8FORGE_KERNEL_CACHE").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|d| !d.is_empty()).map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("fp8forge").join("kernels"))
}

/// The cache key of `spec` built for `arch` by NVRTC `nvrtc_version`.
pub fn cache_key(spec: &KernelSpec, arch: GpuArch, nvrtc_version: (i32, i32)) -> String {
    program_key(&spec.source(), arch, nvrtc_version)
}

/// The cache key of the program text `source` built for `arch` by NVRTC `nvrtc_version`.
pub fn program_key(source: &str, arch: GpuArch, nvrtc_version: (i32, i32)) -> String {
    let mut h = Sha256::new();
    let mut put = |s: &str| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    put(source);
    for o in compile_options(arch) {
        put(&o);
    }
    put(arch.nvrtc_name());
    put(&format!("nvrtc {}.{}", nvrtc_version.0, nvrtc_version.1));
    hex(&h.finalize())
}

/// The NVRTC version the cache keys name: `$FP8FORGE_KERNEL_CACHE_NVRTC` (`MAJOR.MINOR`) when set,
/// so that a cache built elsewhere (`bench/gpu-check.sh prepare`, NVRTC 13.0 from the pip wheel)
/// is used as it is on a machine whose NVRTC differs or is missing; else the loaded NVRTC's.
///
/// # Errors
///
/// [`KernelError::NoNvrtc`] when the variable is unset (or not `MAJOR.MINOR`) and NVRTC cannot
/// be loaded.
pub fn key_version() -> Result<(i32, i32), KernelError> {
    match std::env::var("FP8FORGE_KERNEL_CACHE_NVRTC").ok().as_deref().and_then(parse_version) {
        Some(v) => Ok(v),
        None => nvrtc::version(),
    }
}

/// `MAJOR.MINOR` as numbers.
fn parse_version(text: &str) -> Option<(i32, i32)> {
    let (major, minor) = text.trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Whether `spec` for `arch` is in the cache already (a later [`compile_cached`] only reads it).
/// False when NVRTC (whose version is part of the key) or the cache directory is missing.
pub fn is_cached(spec: &KernelSpec, arch: GpuArch) -> bool {
    let (Ok(version), Some(dir)) = (key_version(), cache_dir()) else { return false };
    let key = cache_key(spec, arch, version);
    dir.join(format!("{key}.log")).is_file()
        && fs::metadata(dir.join(format!("{key}.cubin"))).is_ok_and(|m| m.len() > 0)
}

/// Compiles `spec` for `arch`, or reads it from the cache.
///
/// # Errors
///
/// As [`nvrtc::compile`]; cache I/O errors are not errors (the kernel is compiled instead).
pub fn compile_cached(spec: &KernelSpec, arch: GpuArch) -> Result<Compiled, KernelError> {
    compile_program_cached(&spec.label(), &spec.source(), arch)
}

/// Compiles the program text `source` (named `label` in errors) for `arch`, or reads it from the
/// cache: [`compile_cached`] for programs that are not a [`KernelSpec`].
///
/// # Errors
///
/// As [`nvrtc::compile_program`]; cache I/O errors are not errors.
pub fn compile_program_cached(label: &str, source: &str, arch: GpuArch) -> Result<Compiled, KernelError> {
    let version = key_version()?;
    let Some(dir) = cache_dir() else { return nvrtc::compile_program(label, source, arch) };
    let key = program_key(source, arch, version);
    let cubin_path = dir.join(format!("{key}.cubin"));
    let log_path = dir.join(format!("{key}.log"));
    if let (Ok(cubin), Ok(log)) = (fs::read(&cubin_path), fs::read_to_string(&log_path))
        && !cubin.is_empty()
    {
        let resources = ResourceUsage::parse(&log);
        return Ok(Compiled { cubin, log, resources });
    }
    let compiled = nvrtc::compile_program(label, source, arch)?;
    if fs::create_dir_all(&dir).is_ok() {
        // The log first: a cubin is only trusted with its log beside it.
        let _ =
            write_atomic(&log_path, compiled.log.as_bytes()).and_then(|_| write_atomic(&cubin_path, &compiled.cubin));
    }
    Ok(compiled)
}

/// What building one variant into the cache gave.
#[derive(Debug)]
pub struct BuildOutcome {
    /// The variant.
    pub spec: KernelSpec,
    /// It was in the cache before (nothing was compiled).
    pub was_cached: bool,
    /// Its cache key (the files are `<key>.cubin` and `<key>.log`), when NVRTC's version is known.
    pub key: Option<String>,
    /// ptxas's report, or why the variant cannot be built (a compile error, a spill).
    pub result: Result<ResourceUsage, KernelError>,
}

/// Builds every one of `specs` for `arch` into the cache, in parallel: one outcome per variant,
/// in order; a variant that fails (compile error, spill) is recorded and the others go on.
pub fn build_all(specs: &[KernelSpec], arch: GpuArch) -> Vec<BuildOutcome> {
    use rayon::prelude::*;
    let version = key_version().ok();
    specs
        .par_iter()
        .map(|spec| BuildOutcome {
            spec: *spec,
            was_cached: is_cached(spec, arch),
            key: version.map(|v| cache_key(spec, arch, v)),
            result: compile_cached(spec, arch).map(|c| c.resources),
        })
        .collect()
}

/// The build report: a header, then one TSV line per variant (label, arch, status, registers,
/// stack, spill stores and loads, ptxas warnings, cache key).
pub fn build_report(outcomes: &[BuildOutcome], arch: GpuArch) -> String {
    let mut tsv =
        String::from("variant\tarch\tstatus\tregisters\tstack\tspill_stores\tspill_loads\twarnings\tcache_key\n");
    for o in outcomes {
        let clean = |t: &str| t.replace(['\t', '\n'], " ");
        let key = o.key.as_deref().unwrap_or("-");
        let line = match &o.result {
            Ok(r) => format!(
                "{}\t{arch}\t{}\t{}\t{}\t{}\t{}\t{}\t{key}",
                o.spec.label(),
                if o.was_cached { "cached" } else { "built" },
                r.registers,
                r.stack_bytes,
                r.spill_stores,
                r.spill_loads,
                clean(&r.warnings.join("; "))
            ),
            Err(e) => {
                format!("{}\t{arch}\tfailed: {}\t-\t-\t-\t-\t-\t{key}", o.spec.label(), clean(&e.to_string()))
            }
        };
        tsv += &line;
        tsv.push('\n');
    }
    tsv
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
///
/// # Errors
///
/// [`KernelError::Cache`] naming the file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), KernelError> {
    let err = |source| KernelError::Cache { path: path.display().to_string(), source };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GemmConfig, Multicast};

    #[test]
    fn keys_differ_by_config_arch_and_nvrtc_version() {
        let a = KernelSpec::Gemm { config: GemmConfig::wgmma(128, 128, 4, Multicast::None), grouped: false };
        let b = KernelSpec::Gemm { config: GemmConfig::wgmma(128, 136, 4, Multicast::None), grouped: false };
        let g = KernelSpec::Gemm { config: GemmConfig::wgmma(128, 128, 4, Multicast::None), grouped: true };
        let k = cache_key(&a, GpuArch::Sm90a, (13, 0));
        assert_eq!(k, cache_key(&a, GpuArch::Sm90a, (13, 0)));
        assert_ne!(k, cache_key(&b, GpuArch::Sm90a, (13, 0)));
        assert_ne!(k, cache_key(&g, GpuArch::Sm90a, (13, 0)));
        assert_ne!(k, cache_key(&a, GpuArch::Sm90, (13, 0)));
        assert_ne!(k, cache_key(&a, GpuArch::Sm90a, (13, 2)));
    }

    #[test]
    fn cache_nvrtc_versions_parse() {
        assert_eq!(parse_version("13.0"), Some((13, 0)));
        assert_eq!(parse_version(" 12.9\n"), Some((12, 9)));
        assert_eq!(parse_version("13"), None);
        assert_eq!(parse_version("x.y"), None);
    }

    #[test]
    fn build_report_has_a_line_per_variant_failures_included() {
        let ok = BuildOutcome {
            spec: KernelSpec::Gemm { config: GemmConfig::wgmma(128, 128, 4, Multicast::None), grouped: false },
            was_cached: true,
            key: Some("abc".into()),
            result: Ok(ResourceUsage { registers: 168, ..ResourceUsage::default() }),
        };
        let spilled = BuildOutcome {
            spec: KernelSpec::Gemm { config: GemmConfig::wgmma(64, 192, 4, Multicast::None), grouped: true },
            was_cached: false,
            key: None,
            result: Err(KernelError::Nvrtc { call: "nvrtcCompileProgram", status: "boom\tx".into() }),
        };
        let tsv = build_report(&[ok, spilled], GpuArch::Sm90a);
        let lines: Vec<&str> = tsv.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].starts_with("gemm wgmma_bm128_bn128_s4_mc1_sw128\tsm_90a\tcached\t168\t"));
        assert!(lines[2].contains(" grouped\tsm_90a\tfailed: "), "{}", lines[2]);
        assert!(lines.iter().all(|l| l.split('\t').count() == 9), "{tsv}");
        assert!(lines[1].ends_with("\tabc") && lines[2].ends_with("\t-"));
    }

    #[test]
    fn atomic_write_replaces_the_file_whole() {
        let dir = std::env::temp_dir().join(format!("fp8forge-cache-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.cubin");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
