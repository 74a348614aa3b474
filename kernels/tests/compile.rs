//! The CI compile check: every kernel variant the search space allows, built for sm_90a with
//! NVRTC, with no compile error, no register spill, no stack frame and no serialized wgmma; and,
//! where cuobjdump and nvdisasm are on the PATH, QGMMA (FP8 wgmma) in the SASS of every wgmma
//! variant and no local-memory access.
//!
//! Without NVRTC this test fails if `FP8FORGE_REQUIRE_NVRTC=1` (as in CI), and otherwise says on
//! stderr, outside the test harness's capture, that it skipped and why. Variants go through the
//! kernel cache (`FP8FORGE_KERNEL_CACHE`): after `bench/gpu-check.sh prepare`, point it at
//! `target/gpu-kernel-cache` to check the bundled build without compiling it again.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use fp8forge_kernels::config::{GemmConfig, GpuArch, Swizzle, search_space};
use fp8forge_kernels::nvrtc::{self, Compiled};
use fp8forge_kernels::source::{KernelSpec, all_variants};
use fp8forge_kernels::{KernelError, KernelKind};
use rayon::prelude::*;

/// Says something on the real stderr (the harness captures only the print macros).
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// NVRTC present, or the reason this test cannot run (a failure when NVRTC is required).
fn nvrtc_or_skip(test: &str) -> bool {
    match nvrtc::ensure_nvrtc() {
        Ok(()) => true,
        Err(e) => {
            if std::env::var("FP8FORGE_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
                panic!("{test}: FP8FORGE_REQUIRE_NVRTC=1 but {e}");
            }
            say(&format!("SKIPPED {test}: {e} (set FP8FORGE_REQUIRE_NVRTC=1 to make this a failure)"));
            false
        }
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// Disassembles `cubin` and checks it: QGMMA present for a wgmma kernel, no local memory.
fn check_sass(spec: &KernelSpec, cubin: &[u8], dir: &Path) -> Result<(), String> {
    let path = dir.join(format!("{:016x}.cubin", fxhash(&spec.label())));
    std::fs::write(&path, cubin).map_err(|e| format!("{}: write {}: {e}", spec.label(), path.display()))?;
    let out = Command::new("cuobjdump").arg("--dump-sass").arg(&path).output();
    let _ = std::fs::remove_file(&path);
    let out = out.map_err(|e| format!("{}: cuobjdump: {e}", spec.label()))?;
    if !out.status.success() {
        return Err(format!("{}: cuobjdump failed: {}", spec.label(), String::from_utf8_lossy(&out.stderr)));
    }
    let sass = String::from_utf8_lossy(&out.stdout);
    let is_wgmma = matches!(spec, KernelSpec::Gemm { config: GemmConfig { kind: KernelKind::Wgmma, .. }, .. });
    if is_wgmma && !sass.contains("QGMMA") {
        return Err(format!("{}: no QGMMA in the SASS", spec.label()));
    }
    if sass.contains("LDL") || sass.contains("STL") {
        return Err(format!("{}: local memory (LDL/STL) in the SASS", spec.label()));
    }
    Ok(())
}

/// The variants whose SASS is checked (disassembling all of them takes minutes): every wgmma
/// variant with BLOCK_N 128 or its largest, and every other kernel.
fn sass_sample(spec: &KernelSpec) -> bool {
    match spec {
        KernelSpec::Gemm { config, .. } if config.kind == KernelKind::Wgmma => {
            [128, fp8forge_kernels::config::wgmma_max_block_n(config.block_m)].contains(&config.block_n)
        }
        _ => true,
    }
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Compiles `specs` for their architecture in parallel, through the kernel cache (a hit is the
/// same program, options and NVRTC version, so the same CUBIN and ptxas log; a CI machine starts
/// with an empty cache); returns the failures and the results.
fn compile_all(specs: &[(KernelSpec, GpuArch)]) -> (Vec<String>, Vec<(KernelSpec, GpuArch, Compiled)>) {
    let results: Vec<(KernelSpec, GpuArch, Result<Compiled, KernelError>)> =
        specs.par_iter().map(|(s, arch)| (*s, *arch, fp8forge_kernels::cache::compile_cached(s, *arch))).collect();
    let mut failures = Vec::new();
    let mut ok = Vec::new();
    for (spec, arch, r) in results {
        match r {
            Ok(c) if c.resources.wgmma_serialized() => {
                failures.push(format!("{}: ptxas serialized the wgmma: {:?}", spec.label(), c.resources.warnings));
            }
            Ok(c) => ok.push((spec, arch, c)),
            Err(e) => failures.push(e.to_string()),
        }
    }
    (failures, ok)
}

#[test]
fn compile_all_variants_sm90a() {
    if !nvrtc_or_skip("compile_all_variants_sm90a") {
        return;
    }
    let mut specs: Vec<(KernelSpec, GpuArch)> =
        all_variants(GpuArch::Sm90a).into_iter().map(|s| (s, GpuArch::Sm90a)).collect();
    // Legal but not searched: the 32- and 64-byte swizzles, on a few tiles with each multicast.
    for cfg in search_space(GpuArch::Sm90a) {
        let representative = matches!((cfg.block_m, cfg.block_n), (64, 64) | (128, 128) | (256, 96));
        if cfg.kind == KernelKind::Wgmma && representative && cfg.stages == 4 {
            for swizzle in [Swizzle::B32, Swizzle::B64] {
                specs
                    .push((KernelSpec::Gemm { config: GemmConfig { swizzle, ..cfg }, grouped: false }, GpuArch::Sm90a));
            }
        }
    }
    // The mma.sync fallback also builds for Ada.
    for cfg in search_space(GpuArch::Sm89) {
        specs.push((KernelSpec::Gemm { config: cfg, grouped: false }, GpuArch::Sm89));
    }
    let t0 = Instant::now();
    let (mut failures, ok) = compile_all(&specs);
    let compile_s = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut sass_count = 0;
    let sass_checked = if on_path("cuobjdump") && on_path("nvdisasm") {
        let dir = std::env::temp_dir().join(format!("fp8forge-sass-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let sample: Vec<_> = ok.iter().filter(|(spec, _, _)| sass_sample(spec)).collect();
        sass_count = sample.len();
        let sass_failures: Vec<String> =
            sample.par_iter().filter_map(|(spec, _, c)| check_sass(spec, &c.cubin, &dir).err()).collect();
        let _ = std::fs::remove_dir_all(&dir);
        failures.extend(sass_failures);
        true
    } else {
        say("compile_all_variants_sm90a: cuobjdump/nvdisasm not on PATH, SASS not checked");
        false
    };

    let max_regs = ok.iter().map(|(_, _, c)| c.resources.registers).max().unwrap_or(0);
    say(&format!(
        "compile_all_variants_sm90a: {} variants ({} compiled clean) in {compile_s:.1} s on {} threads (NVRTC {:?}); \
         max {max_regs} registers; SASS {}",
        specs.len(),
        ok.len(),
        rayon::current_num_threads(),
        nvrtc::version().ok(),
        if sass_checked {
            format!(
                "of {sass_count} variants checked in {:.1} s: QGMMA in every wgmma one, no local memory",
                t1.elapsed().as_secs_f64()
            )
        } else {
            "not checked".to_string()
        },
    ));
    if let Some(path) = std::env::var_os("FP8FORGE_COMPILE_REPORT") {
        let mut tsv = String::from("variant\tarch\tregisters\tstack\tspill_stores\tspill_loads\tcubin_bytes\n");
        for (spec, arch, c) in &ok {
            let r = &c.resources;
            tsv += &format!(
                "{}\t{arch}\t{}\t{}\t{}\t{}\t{}\n",
                spec.label(),
                r.registers,
                r.stack_bytes,
                r.spill_stores,
                r.spill_loads,
                c.cubin.len()
            );
        }
        std::fs::write(&path, tsv).expect("write FP8FORGE_COMPILE_REPORT");
    }
    assert!(failures.is_empty(), "{} of {} variants failed:\n{}", failures.len(), specs.len(), failures.join("\n"));
}

#[test]
fn a_compile_error_is_reported_with_the_log() {
    if !nvrtc_or_skip("a_compile_error_is_reported_with_the_log") {
        return;
    }
    // A wgmma configuration is only valid for sm_90a: built for sm_90, ptxas must refuse it.
    let spec =
        KernelSpec::Gemm { config: GemmConfig::wgmma(128, 128, 4, fp8forge_kernels::Multicast::None), grouped: false };
    match nvrtc::compile(&spec, GpuArch::Sm90) {
        Err(KernelError::Compile { log, .. }) => assert!(log.contains("wgmma") || log.contains("sm_90a"), "{log}"),
        other => panic!("expected a compile error, got {:?}", other.map(|c| c.log)),
    }
}

/// The static_asserts at the top of the kernels refuse a configuration the host would never
/// build (so a host/device disagreement fails the CI's compile of every variant).
#[test]
fn a_bad_configuration_is_refused_by_the_static_asserts() {
    if !nvrtc_or_skip("a_bad_configuration_is_refused_by_the_static_asserts") {
        return;
    }
    let cases = [
        // 12 stages of 128x128: more than the opt-in shared memory.
        (GemmConfig::wgmma(128, 128, 12, fp8forge_kernels::Multicast::None), "opt-in shared memory"),
        // 20 stages of a tiny tile: more than MAX_STAGES.
        (GemmConfig::wgmma(64, 16, 20, fp8forge_kernels::Multicast::None), "STAGES must be 2..MAX_STAGES"),
        // BN over the register limit of BM = 256.
        (GemmConfig::wgmma(256, 184, 2, fp8forge_kernels::Multicast::None), "register limit"),
        // mma.sync with a 96-row tile.
        (GemmConfig::mma(96, 64, 2, 2, 2), "BM must be 64 or 128"),
    ];
    for (config, message) in cases {
        let spec = KernelSpec::Gemm { config, grouped: false };
        match nvrtc::compile(&spec, GpuArch::Sm90a) {
            Err(KernelError::Compile { log, .. }) => {
                assert!(log.contains("static assert") && log.contains(message), "{}: {log}", spec.label());
            }
            other => {
                panic!("{}: expected the static_assert to refuse it, got {:?}", spec.label(), other.map(|c| c.log))
            }
        }
    }
}
