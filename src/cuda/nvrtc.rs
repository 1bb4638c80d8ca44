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

/// The last bytes of every cache file: this tag, the image's length (u64, little-endian) and
/// the SHA-256 of the image. A file whose trailer does not match (empty, truncated, written
/// over, or from before this format) is not trusted: the kernel is compiled again.
const TRAILER_TAG: &[u8; 8] = b"medcnn\x01\x00";
const TRAILER_LEN: usize = 8 + 8 + 32;

/// One compiled kernel file, and whether it came from the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// PTX text (NUL-terminated) or cubin bytes, as `compile` returns them.
    pub bytes: Vec<u8>,
    pub from_cache: bool,
}

/// Why an image is not usable, or None when it looks whole: a cubin must be an ELF64 file
/// whose section headers lie inside it; PTX must be NUL-terminated text with a `.version`
/// line and at least one `.entry`. (A cubin that passes can still fail to load on a driver:
/// `device.rs` then compiles it afresh with `recompile`.)
pub fn image_problem(bytes: &[u8], is_cubin: bool) -> Option<String> {
    if bytes.is_empty() {
        return Some("empty".into());
    }
    if is_cubin {
        if bytes.len() < 64 || !bytes.starts_with(b"\x7fELF") || bytes[4] != 2 {
            return Some("not an ELF64 cubin".into());
        }
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
        let u16_at = |i: usize| u16::from_le_bytes(bytes[i..i + 2].try_into().unwrap()) as u64;
        // e_shoff at 0x28, e_shentsize at 0x3A, e_shnum at 0x3C (the ELF64 header).
        let end = u64_at(0x28).saturating_add(u16_at(0x3A) * u16_at(0x3C));
        if end > bytes.len() as u64 {
            return Some(format!("truncated cubin ({} bytes, its section headers end at {end})", bytes.len()));
        }
        return None;
    }
    let Some((&0, text)) = bytes.split_last() else { return Some("PTX without its final NUL (truncated)".into()) };
    match std::str::from_utf8(text) {
        Ok(t) if t.contains(".version") && t.contains(".entry") => None,
        Ok(_) => Some("PTX without a .version or .entry".into()),
        Err(_) => Some("PTX that is not text".into()),
    }
}

/// The image stored in a cache file, or why it is not trusted.
fn read_cache_file(path: &Path, is_cubin: bool) -> std::result::Result<Vec<u8>, String> {
    let mut data = std::fs::read(path).map_err(|e| e.to_string())?;
    if data.len() < TRAILER_LEN {
        return Err(format!("{} bytes, shorter than its trailer", data.len()));
    }
    let trailer = data.split_off(data.len() - TRAILER_LEN);
    let len = u64::from_le_bytes(trailer[8..16].try_into().unwrap());
    if &trailer[..8] != TRAILER_TAG || len != data.len() as u64 {
        return Err("no valid trailer (truncated, or an older format)".into());
    }
    if trailer[16..] != Sha256::digest(&data)[..] {
        return Err("its checksum does not match (corrupted)".into());
    }
    match image_problem(&data, is_cubin) {
        Some(p) => Err(p),
        None => Ok(data),
    }
}

/// Writes `image` with its trailer to `path` through a temporary file of this writer's own
/// (process id, thread id and a counter in the name), renamed into place: the rename is atomic,
/// so a reader sees the old file, no file, or the whole new one, never a half-written one, and
/// two writers never write into the same temporary file. Best effort: a failed write only
/// costs a compile next time.
fn write_cache_file(path: &Path, image: &[u8]) {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let thread: String = format!("{:?}", std::thread::current().id()).chars().filter(char::is_ascii_digit).collect();
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp-{}-{thread}-{n}", std::process::id()));
    let mut data = Vec::with_capacity(image.len() + TRAILER_LEN);
    data.extend_from_slice(image);
    data.extend_from_slice(TRAILER_TAG);
    data.extend_from_slice(&(image.len() as u64).to_le_bytes());
    data.extend_from_slice(&Sha256::digest(image));
    if std::fs::write(&tmp, &data).is_ok() && std::fs::rename(&tmp, path).is_ok() {
        return;
    }
    let _ = std::fs::remove_file(&tmp);
}

/// The cache file of one kernel file's program for `target`: named by the hash of the program
/// text, target, options and NVRTC version, so any change compiles afresh.
fn cache_path(file: &str, program: &str, target: &str, cache: Option<&Path>) -> Result<Option<PathBuf>> {
    let Some(dir) = cache else { return Ok(None) };
    let nv = version()?;
    let mut h = Sha256::new();
    h.update(program.as_bytes());
    h.update(format!("{target} {nv:?} {OPTIONS:?}").as_bytes());
    let hash: String = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    Ok(Some(dir.join(format!("{}-{target}-{hash}.bin", file.trim_end_matches(".cu")))))
}

/// Compiles with the backend's options and stores the image in the cache (when there is one).
fn compile_and_store(file: &str, program: &str, target: &str, path: Option<&Path>) -> Result<Vec<u8>> {
    let out = compile(file, program, target, &OPTIONS)?;
    if out.log.contains("spill") {
        eprintln!("medcnn: ptxas reports register spills in {file}:\n{}", out.log);
    }
    if let Some(problem) = image_problem(&out.image, out.is_cubin) {
        bail!("NVRTC returned a bad image for {file} ({target}): {problem}");
    }
    if let Some(p) = path {
        write_cache_file(p, &out.image);
    }
    Ok(out.image)
}

/// The compiled image of one kernel file for `target` (as `compile`): from `cache` when a
/// whole, checksummed image of the same program text, target, options and NVRTC version is
/// there; otherwise compiled, and stored there. A damaged cache file is reported on stderr and
/// replaced.
pub fn compile_cached(file: &str, src: &str, target: &str, cache: Option<&Path>) -> Result<Image> {
    let program = nvrtc_program(file, src);
    let path = cache_path(file, &program, target, cache)?;
    let is_cubin = target.starts_with("sm_");
    if let Some(p) = &path {
        match read_cache_file(p, is_cubin) {
            Ok(bytes) => return Ok(Image { bytes, from_cache: true }),
            Err(_) if !p.exists() => {}
            Err(why) => eprintln!("medcnn: ignoring the cached kernel {} ({why}); compiling it again", p.display()),
        }
    }
    let bytes = compile_and_store(file, &program, target, path.as_deref())?;
    Ok(Image { bytes, from_cache: false })
}

/// Compiles one kernel file afresh, whatever the cache holds, and replaces its cache file:
/// for an image the driver refused to load.
pub fn recompile(file: &str, src: &str, target: &str, cache: Option<&Path>) -> Result<Vec<u8>> {
    let program = nvrtc_program(file, src);
    let path = cache_path(file, &program, target, cache)?;
    compile_and_store(file, &program, target, path.as_deref())
}

/// Every `kernels/*.cu` for `target`, compiled in parallel (NVRTC is thread-safe across
/// programs), in `KERNEL_FILES` order.
pub fn compile_all(target: &str, cache: Option<&Path>) -> Result<Vec<Image>> {
    std::thread::scope(|s| {
        let handles: Vec<_> =
            KERNEL_FILES.iter().map(|&(file, src)| s.spawn(move || compile_cached(file, src, target, cache))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("an NVRTC thread panicked"))))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The structural checks without NVRTC: a tiny ELF64 header whose section headers point
    /// past its end is a truncated cubin; PTX must keep its NUL.
    #[test]
    fn damaged_images_are_recognised() {
        let mut elf = vec![0u8; 64];
        elf[..5].copy_from_slice(b"\x7fELF\x02");
        assert_eq!(image_problem(&elf, true), None);
        elf[0x28..0x30].copy_from_slice(&64u64.to_le_bytes()); // e_shoff
        elf[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
        elf[0x3C..0x3E].copy_from_slice(&3u16.to_le_bytes()); // e_shnum
        assert!(image_problem(&elf, true).unwrap().contains("truncated"));
        assert!(image_problem(b"", true).is_some());
        assert!(image_problem(b"\x7fELF", true).is_some());
        assert_eq!(image_problem(b".version 9.0\n.entry k()\0", false), None);
        assert!(image_problem(b".version 9.0\n.entry k(", false).unwrap().contains("NUL"));
    }

    /// A cache file round-trips; each kind of damage makes it untrusted.
    #[test]
    fn cache_files_carry_a_checksum() {
        let dir = std::env::temp_dir().join(format!("medcnn-nvrtc-unit-{}", std::process::id()));
        let path = dir.join("k.bin");
        let image = b".version 9.0\n.entry k()\0".to_vec();
        write_cache_file(&path, &image);
        assert_eq!(read_cache_file(&path, false), Ok(image.clone()));
        let whole = std::fs::read(&path).unwrap();
        std::fs::write(&path, &whole[..whole.len() - 5]).unwrap();
        assert!(read_cache_file(&path, false).is_err(), "truncated");
        let mut flipped = whole.clone();
        flipped[3] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert!(read_cache_file(&path, false).unwrap_err().contains("checksum"));
        std::fs::write(&path, b"").unwrap();
        assert!(read_cache_file(&path, false).is_err(), "empty");
        std::fs::write(&path, &image).unwrap();
        assert!(read_cache_file(&path, false).is_err(), "no trailer");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary files left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
