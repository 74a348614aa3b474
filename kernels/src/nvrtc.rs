//! Run-time compilation with NVRTC (loaded dynamically through cudarc) to CUBIN, and the
//! resource report ptxas leaves in the program log.
//!
//! cudarc panics when a library it loads is missing, so every entry point here first checks that
//! the library can be opened ([`library_loads`]) and returns a typed error otherwise.

use std::ffi::{CStr, CString, c_char};
use std::sync::OnceLock;

use cudarc::nvrtc::sys;
use serde::Serialize;

use crate::config::GpuArch;
use crate::error::KernelError;
use crate::source::{KernelSpec, compile_options};

/// A shared library none of whose file names could be opened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no file of {tried} could be loaded")]
pub struct LibraryMissing {
    /// The file names tried: one, or the first and last and how many.
    pub tried: String,
}

/// Whether the shared library `name` (as cudarc names it: "nvrtc", "cuda", "cublasLt") can be
/// loaded under one of the file names cudarc tries.
///
/// # Errors
///
/// [`LibraryMissing`] listing the names tried.
pub fn library_loads(name: &str) -> Result<(), LibraryMissing> {
    let candidates = cudarc::get_lib_name_candidates(name);
    for c in &candidates {
        let Ok(cname) = CString::new(c.as_str()) else { continue };
        // SAFETY: dlopen with a valid C string; the handle is closed right away (cudarc opens the
        // library again itself, which only bumps the loader's reference count).
        unsafe {
            let h = libc::dlopen(cname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
            if !h.is_null() {
                libc::dlclose(h);
                return Ok(());
            }
        }
    }
    let mut names = candidates;
    names.dedup();
    let tried = match names.as_slice() {
        [] => "no file names".to_string(),
        [one] => one.clone(),
        [first, .., last] => format!("{first} ... {last} ({} names)", names.len()),
    };
    Err(LibraryMissing { tried })
}

/// Checks (once) that NVRTC can be loaded.
///
/// # Errors
///
/// [`KernelError::NoNvrtc`] listing the library names tried.
pub fn ensure_nvrtc() -> Result<(), KernelError> {
    static FOUND: OnceLock<Result<(), LibraryMissing>> = OnceLock::new();
    FOUND.get_or_init(|| library_loads("nvrtc")).clone().map_err(|e| KernelError::NoNvrtc { tried: e.tried })
}

fn check(call: &'static str, r: sys::nvrtcResult) -> Result<(), KernelError> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        return Ok(());
    }
    // SAFETY: nvrtcGetErrorString returns a static C string for any result code.
    let status = unsafe {
        let p = sys::nvrtcGetErrorString(r);
        if p.is_null() { format!("{r:?}") } else { CStr::from_ptr(p).to_string_lossy().into_owned() }
    };
    Err(KernelError::Nvrtc { call, status })
}

/// NVRTC's version, `(major, minor)`.
///
/// # Errors
///
/// [`KernelError::NoNvrtc`] when NVRTC cannot be loaded.
pub fn version() -> Result<(i32, i32), KernelError> {
    ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loadable (checked above); the out-pointers are valid.
    check("nvrtcVersion", unsafe { sys::nvrtcVersion(&mut major, &mut minor) })?;
    Ok((major, minor))
}

/// What ptxas reported for one kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ResourceUsage {
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of stack frame per thread.
    pub stack_bytes: u64,
    /// Bytes of spill stores.
    pub spill_stores: u64,
    /// Bytes of spill loads.
    pub spill_loads: u64,
    /// Static shared memory, bytes.
    pub static_smem: u64,
    /// ptxas/NVRTC warning lines.
    pub warnings: Vec<String>,
}

impl ResourceUsage {
    /// Parses the `--ptxas-options=-v` report in an NVRTC program log.
    pub fn parse(log: &str) -> ResourceUsage {
        let mut r = ResourceUsage::default();
        for line in log.lines() {
            if let Some(v) = number_before(line, " bytes stack frame") {
                r.stack_bytes = r.stack_bytes.max(v);
            }
            if let Some(v) = number_before(line, " bytes spill stores") {
                r.spill_stores = r.spill_stores.max(v);
            }
            if let Some(v) = number_before(line, " bytes spill loads") {
                r.spill_loads = r.spill_loads.max(v);
            }
            if let Some(v) = number_before(line, " registers") {
                r.registers = r.registers.max(v as u32);
            }
            if let Some(v) = number_before(line, " bytes smem") {
                r.static_smem = r.static_smem.max(v);
            }
            if line.to_ascii_lowercase().contains("warning") {
                r.warnings.push(line.trim().to_string());
            }
        }
        r
    }

    /// True when ptxas spilled or gave the kernel a stack frame.
    pub fn spills(&self) -> bool {
        self.spill_stores > 0 || self.spill_loads > 0 || self.stack_bytes > 0
    }

    /// True when ptxas says it serialized the wgmma instructions (a silent performance loss).
    pub fn wgmma_serialized(&self) -> bool {
        self.warnings.iter().any(|w| w.contains("wgmma") && w.contains("serializ"))
    }
}

/// The decimal number that ends right before `marker` in `line`, if any.
fn number_before(line: &str, marker: &str) -> Option<u64> {
    let end = line.find(marker)?;
    let head = &line[..end];
    let start = head.rfind(|c: char| !c.is_ascii_digit()).map_or(0, |i| i + 1);
    head[start..].parse().ok()
}

/// A compiled kernel variant.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The CUBIN for the exact target architecture.
    pub cubin: Vec<u8>,
    /// The NVRTC program log (ptxas's report included).
    pub log: String,
    /// ptxas's report, parsed.
    pub resources: ResourceUsage,
}

/// Destroys an NVRTC program when dropped.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by nvrtcCreateProgram and is destroyed once.
        unsafe {
            sys::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

/// Compiles `spec` for `arch` to CUBIN, without the cache.
///
/// # Errors
///
/// [`KernelError::NoNvrtc`] when NVRTC is missing, [`KernelError::Compile`] with the log when
/// NVRTC rejects the program, [`KernelError::Spill`] when ptxas reports spills or a stack frame.
pub fn compile(spec: &KernelSpec, arch: GpuArch) -> Result<Compiled, KernelError> {
    compile_program(&spec.label(), &spec.source(), arch)
}

/// Compiles the program text `source` (named `label` in errors) for `arch` to CUBIN, with the
/// options of every fp8forge kernel ([`compile_options`]), without the cache: the entry point
/// for kernels outside this crate (e.g. fp8forge-cuda-runtime's small operations).
///
/// # Errors
///
/// As [`compile`].
pub fn compile_program(label: &str, source: &str, arch: GpuArch) -> Result<Compiled, KernelError> {
    ensure_nvrtc()?;
    let nul = |what: &str| KernelError::Nvrtc { call: "nvrtcCreateProgram", status: format!("NUL byte in {what}") };
    let src = CString::new(source).map_err(|_| nul("the source"))?;
    let name = CString::new("fp8forge.cu").map_err(|_| nul("the name"))?;
    let opts: Vec<CString> =
        compile_options(arch).into_iter().map(CString::new).collect::<Result<_, _>>().map_err(|_| nul("an option"))?;
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();

    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: valid C strings; no headers.
    check("nvrtcCreateProgram", unsafe {
        sys::nvrtcCreateProgram(&mut prog, src.as_ptr(), name.as_ptr(), 0, std::ptr::null(), std::ptr::null())
    })?;
    let prog = Program(prog);
    // SAFETY: the program is live; the option pointers outlive the call.
    let status = unsafe { sys::nvrtcCompileProgram(prog.0, opt_ptrs.len() as i32, opt_ptrs.as_ptr()) };
    let log = program_log(&prog)?;
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(KernelError::Compile { kernel: label.to_string(), arch: arch.to_string(), log });
    }
    let mut size = 0usize;
    // SAFETY: the program compiled; the buffer has the size NVRTC reports.
    check("nvrtcGetCUBINSize", unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) })?;
    let mut cubin = vec![0u8; size];
    check("nvrtcGetCUBIN", unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast()) })?;
    let resources = ResourceUsage::parse(&log);
    if resources.spills() {
        return Err(KernelError::Spill {
            kernel: label.to_string(),
            arch: arch.to_string(),
            spill_stores: resources.spill_stores,
            spill_loads: resources.spill_loads,
            stack: resources.stack_bytes,
        });
    }
    Ok(Compiled { cubin, log, resources })
}

fn program_log(prog: &Program) -> Result<String, KernelError> {
    let mut size = 0usize;
    // SAFETY: live program; buffer sized as NVRTC reports.
    check("nvrtcGetProgramLogSize", unsafe { sys::nvrtcGetProgramLogSize(prog.0, &mut size) })?;
    let mut buf = vec![0u8; size.max(1)];
    check("nvrtcGetProgramLog", unsafe { sys::nvrtcGetProgramLog(prog.0, buf.as_mut_ptr().cast()) })?;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_ptxas_report() {
        let log = "ptxas info    : 0 bytes gmem\n\
                   ptxas info    : Compiling entry function 'fp8_gemm_wgmma' for 'sm_90a'\n\
                   ptxas info    : Function properties for fp8_gemm_wgmma\n\
                   ptxas         .     16 bytes stack frame, 20 bytes spill stores, 24 bytes spill loads\n\
                   ptxas info    : Used 168 registers, used 1 barriers, 1024 bytes smem\n\
                   ptxas warning : wgmma.mma_async instructions are serialized due to ...\n";
        let r = ResourceUsage::parse(log);
        assert_eq!(r.registers, 168);
        assert_eq!((r.stack_bytes, r.spill_stores, r.spill_loads), (16, 20, 24));
        assert_eq!(r.static_smem, 1024);
        assert!(r.spills() && r.wgmma_serialized());
        let clean = ResourceUsage::parse(
            "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n",
        );
        assert!(!clean.spills() && !clean.wgmma_serialized());
    }

    #[test]
    fn a_missing_library_is_an_error_not_a_panic() {
        let e = library_loads("fp8forge_surely_not_a_library").unwrap_err();
        assert!(e.tried.starts_with("libfp8forge_surely_not_a_library.so ... "), "{e}");
    }
}
