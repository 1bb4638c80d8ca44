//! NVRTC, the run-time CUDA compiler, through cudarc's bindings: `kernels/*.cu` to PTX (for a
//! virtual `compute_XY`) or to a cubin (for a real `sm_XY`, which also runs ptxas). cudarc
//! panics when the library is missing, so every entry point checks for it first and returns
//! an error that says how to point at it.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cudarc::nvrtc::{result, sys};
use sha2::{Digest, Sha256};

use super::sources::{nvrtc_program, KERNEL_FILES};

/// Where to get NVRTC when it is missing.
pub const NVRTC_HELP: &str = "NVRTC (libnvrtc.so.13 and libnvrtc-builtins.so.13.0) was not found. Install the \
     CUDA 13.0 toolkit, or just the pip wheel: `pip install --no-deps --target DIR \
     nvidia-cuda-nvrtc==13.0.88`, then `export LD_LIBRARY_PATH=DIR/nvidia/cu13/lib:$LD_LIBRARY_PATH`. (Keep \
     NVRTC at 13.0.x: a newer one emits code that a CUDA 13.0 driver rejects.)";

/// Ok when libnvrtc can be loaded, else an error with `NVRTC_HELP`.
pub fn check_available() -> Result<()> {
    // SAFETY: only tries to dlopen the library by its candidate names.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        bail!("{NVRTC_HELP}")
    }
}

/// NVRTC's (major, minor) version.
pub fn version() -> Result<(i32, i32)> {
    check_available()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-pointers to live integers.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result().context("nvrtcVersion")?;
    Ok((major, minor))
}

/// The architectures this NVRTC can target, as numbers (90 for sm_90).
pub fn supported_archs() -> Result<Vec<i32>> {
    check_available()?;
    let mut n = 0;
    // SAFETY: out-pointer to a live integer, then a buffer of the size it returned.
    unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) }.result().context("nvrtcGetNumSupportedArchs")?;
    let mut archs = vec![0; n.max(0) as usize];
    unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }.result().context("nvrtcGetSupportedArchs")?;
    Ok(archs)
}

/// What `compile` produced.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// PTX text (NUL-terminated, as NVRTC returns it) or cubin bytes.
    pub image: Vec<u8>,
    pub is_cubin: bool,
    /// NVRTC's log: warnings, and ptxas's report when asked for (-v).
    pub log: String,
}

/// Compiles one program (`sources::nvrtc_program` text) for `arch`: `compute_XY` gives PTX,
/// `sm_XY` a cubin. `extra` options are passed as they are (e.g. `--ptxas-options=-v`).
pub fn compile(name: &str, program: &str, arch: &str, extra: &[&str]) -> Result<Compiled> {
    check_available()?;
    let src = CString::new(program).context("kernel source contains a NUL byte")?;
    let cname = CString::new(name).context("program name contains a NUL byte")?;
    let prog = result::create_program(&src, Some(&cname)).map_err(|e| anyhow::anyhow!("nvrtcCreateProgram: {e:?}"))?;
    let mut options = vec![format!("--gpu-architecture={arch}"), "-std=c++17".to_string()];
    options.extend(extra.iter().map(|s| s.to_string()));
    // SAFETY: `prog` is a live program from create_program; it is destroyed exactly once below.
    let compiled = unsafe { result::compile_program(prog, &options) };
    let log = unsafe { result::get_program_log(prog) }
        .map(|raw| unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().into_owned())
        .unwrap_or_default();
    let out = match compiled {
        Err(e) => {
            let hint = if log.contains("libnvrtc-builtins") { format!("\n{NVRTC_HELP}") } else { String::new() };
            Err(anyhow::anyhow!("NVRTC could not compile {name} for {arch} ({e:?}) with {options:?}:\n{log}{hint}"))
        }
        Ok(()) if arch.starts_with("sm_") => {
            unsafe { cubin(prog) }.map(|image| Compiled { image, is_cubin: true, log })
        }
        Ok(()) => unsafe { result::get_ptx(prog) }
            .map(|ptx| Compiled { image: ptx.into_iter().map(|c| c as u8).collect(), is_cubin: false, log })
            .map_err(|e| anyhow::anyhow!("nvrtcGetPTX: {e:?}")),
    };
    // SAFETY: as above; not used after this.
    unsafe { result::destroy_program(prog) }.map_err(|e| anyhow::anyhow!("nvrtcDestroyProgram: {e:?}"))?;
    out
}

/// The cubin of a program compiled for a real architecture.
///
/// # Safety
/// `prog` must be a live, successfully compiled program.
unsafe fn cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    sys::nvrtcGetCUBINSize(prog, &mut size).result().map_err(|e| anyhow::anyhow!("nvrtcGetCUBINSize: {e:?}"))?;
    let mut image = vec![0u8; size];
    sys::nvrtcGetCUBIN(prog, image.as_mut_ptr() as *mut _)
        .result()
        .map_err(|e| anyhow::anyhow!("nvrtcGetCUBIN: {e:?}"))?;
    Ok(image)
}

/// The cache folder for compiled kernels: $MEDCNN_KERNEL_CACHE ("off" disables it), else
/// $XDG_CACHE_HOME/medcnn/kernels or ~/.cache/medcnn/kernels.
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var("MEDCNN_KERNEL_CACHE") {
        Ok(v) if v == "off" || v == "0" => None,
        Ok(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|d| d.join("medcnn").join("kernels")),
    }
}

/// The options the backend compiles with (besides the architecture and -std=c++17).
const OPTIONS: [&str; 1] = ["--ptxas-options=--warn-on-spills"];

/// The compiled image of one kernel file for `target` (as `compile`), from `cache` when an
/// image of the same program text, target, options and NVRTC version is there; a fresh one is
/// stored there.
pub fn compile_cached(file: &str, src: &str, target: &str, cache: Option<&Path>) -> Result<Vec<u8>> {
    let program = nvrtc_program(file, src);
    let nv = version()?;
    let mut h = Sha256::new();
    h.update(program.as_bytes());
    h.update(format!("{target} {nv:?} {OPTIONS:?}").as_bytes());
    let hash: String = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    let path = cache.map(|d| d.join(format!("{}-{target}-{hash}.bin", file.trim_end_matches(".cu"))));
    if let Some(image) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        return Ok(image);
    }
    let out = compile(file, &program, target, &OPTIONS)?;
    if out.log.contains("spill") {
        eprintln!("medcnn: ptxas reports register spills in {file}:\n{}", out.log);
    }
    if let Some(p) = path {
        // Best effort: a failed cache write only costs a compile next time.
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &out.image).is_ok() {
            let _ = std::fs::rename(&tmp, &p);
        }
    }
    Ok(out.image)
}

/// Every `kernels/*.cu` for `target`, compiled in parallel (NVRTC is thread-safe across
/// programs), in `KERNEL_FILES` order.
pub fn compile_all(target: &str, cache: Option<&Path>) -> Result<Vec<Vec<u8>>> {
    std::thread::scope(|s| {
        let handles: Vec<_> =
            KERNEL_FILES.iter().map(|&(file, src)| s.spawn(move || compile_cached(file, src, target, cache))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("an NVRTC thread panicked"))))
            .collect()
    })
}
