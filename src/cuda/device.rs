//! The GPU as an `Exec`: a cudarc context and stream, the kernels compiled by NVRTC at start-up
//! for the device's architecture (cached on disk), device memory, and launches by name.
//!
//! One stream carries everything in order, so no event tracking is needed (cudarc's is turned
//! off). Uploads go through a small ring of pinned staging buffers, so `upload` returns
//! without waiting for the device; `download` and `sync` are the only host waits.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};
use cudarc::nvrtc::Ptx;

use super::exec::{DevPtr, Exec, Launch};
use super::nvrtc;
use super::sources::{kernel_names, nvrtc_program, KERNEL_FILES};

/// Where to get the driver when libcuda is missing.
pub const DRIVER_HELP: &str = "the NVIDIA driver library libcuda.so was not found: this machine has no NVIDIA driver \
     (or it is not on the loader path; add its folder to LD_LIBRARY_PATH)";

/// Staging slots for uploads: a slot is reused only after the copy from it has finished.
const STAGING_SLOTS: usize = 4;

struct Staging {
    ptr: *mut u8,
    cap: usize,
    /// Recorded after the last copy out of this slot.
    done: CudaEvent,
    used: bool,
}

// SAFETY: the pinned buffer is owned by its slot and only touched through `&mut CudaExec`.
unsafe impl Send for Staging {}

/// A CUDA device with the medcnn kernels loaded.
pub struct CudaExec {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    arch: (i32, i32),
    sms: u32,
    /// How the kernels were built, e.g. "sm_90 cubin, NVRTC 13.0".
    build: String,
    modules: Vec<Arc<CudaModule>>,
    functions: HashMap<String, CudaFunction>,
    allocs: HashMap<u64, CudaSlice<u8>>,
    staging: Vec<Staging>,
    next_slot: usize,
}

impl CudaExec {
    /// Opens device `ordinal` and compiles (or loads from the cache) every kernel. Errors name
    /// what is missing: the driver, a GPU, or NVRTC.
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { sys::is_culib_present() } {
            bail!("--device cuda: {DRIVER_HELP}");
        }
        nvrtc::check_available().context("--device cuda")?;
        let count = CudaContext::device_count().map_err(|e| {
            anyhow::anyhow!("--device cuda: the CUDA driver failed to start ({e:?}); is a GPU visible (nvidia-smi)?")
        })?;
        if count <= ordinal as i32 {
            bail!("--device cuda: no CUDA device {ordinal} ({count} found)");
        }
        let ctx =
            CudaContext::new(ordinal).map_err(|e| anyhow::anyhow!("--device cuda: opening GPU {ordinal}: {e:?}"))?;
        // SAFETY: set before any allocation; everything runs on the one stream below.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| anyhow::anyhow!("creating a CUDA stream: {e:?}"))?;
        let arch = ctx.compute_capability().map_err(|e| anyhow::anyhow!("compute capability: {e:?}"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| anyhow::anyhow!("SM count: {e:?}"))? as u32;
        let mut exec = CudaExec {
            ctx,
            stream,
            name,
            arch,
            sms,
            build: String::new(),
            modules: Vec::new(),
            functions: HashMap::new(),
            allocs: HashMap::new(),
            staging: Vec::new(),
            next_slot: 0,
        };
        exec.load_kernels()?;
        Ok(exec)
    }

    /// Compute capability (major, minor).
    pub fn arch(&self) -> (i32, i32) {
        self.arch
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Compiles every kernel file for this device (in parallel; cubins cached on disk) and
    /// loads them. A cubin for sm_XY when this NVRTC knows the architecture, else PTX for the
    /// newest compute_XY it knows, for the driver to finish.
    fn load_kernels(&mut self) -> Result<()> {
        let (major, minor) = self.arch;
        let want = major * 10 + minor;
        let nv = nvrtc::version()?;
        let archs = nvrtc::supported_archs()?;
        let (target, cubin) = if archs.contains(&want) {
            (format!("sm_{want}"), true)
        } else {
            let best = archs.iter().copied().filter(|&a| a <= want).max().with_context(|| {
                format!("NVRTC {}.{} supports none of the architectures up to sm_{want} ({archs:?})", nv.0, nv.1)
            })?;
            (format!("compute_{best}"), false)
        };
        let cache = nvrtc::cache_dir();
        let images = nvrtc::compile_all(&target, cache.as_deref())?;
        let mut fell_back = false;
        let load = |image: Vec<u8>| {
            if cubin {
                self.ctx.load_module(Ptx::from_binary(image))
            } else {
                self.ctx.load_module(Ptx::from_src(String::from_utf8_lossy(&image).trim_end_matches('\0').to_string()))
            }
        };
        for (&(file, src), image) in KERNEL_FILES.iter().zip(images) {
            let loaded = match load(image.bytes) {
                // A cached image the driver refuses is not trusted either: compile it afresh
                // (which replaces the cache file) and try once more.
                Err(e) if image.from_cache => {
                    eprintln!("medcnn: the cached {file} for {target} did not load ({e:?}); compiling it again");
                    load(nvrtc::recompile(file, src, &target, cache.as_deref())?)
                }
                other => other,
            };
            let module = match loaded {
                Ok(m) => m,
                // A driver that cannot take this NVRTC's cubin may still JIT its PTX.
                Err(e) if cubin => {
                    let ptx = nvrtc::compile(file, &nvrtc_program(file, src), &format!("compute_{want}"), &[])?;
                    let text = String::from_utf8_lossy(&ptx.image).trim_end_matches('\0').to_string();
                    fell_back = true;
                    self.ctx.load_module(Ptx::from_src(text)).map_err(|e2| {
                        anyhow::anyhow!(
                            "loading {file} on {}: cubin: {e:?}, PTX: {e2:?}; is the driver older than NVRTC {}.{}? \
                             (use NVRTC 13.0.x with a CUDA 13.0 driver)",
                            self.name,
                            nv.0,
                            nv.1
                        )
                    })?
                }
                Err(e) => bail!(
                    "loading {file} (PTX) on {}: {e:?}; is the driver older than NVRTC {}.{}?",
                    self.name,
                    nv.0,
                    nv.1
                ),
            };
            for k in kernel_names(src) {
                let f = module.load_function(&k).map_err(|e| anyhow::anyhow!("kernel {k} in {file}: {e:?}"))?;
                self.functions.insert(k, f);
            }
            self.modules.push(module);
        }
        self.build = match (cubin, fell_back) {
            (true, false) => format!("{target} cubin, NVRTC {}.{}", nv.0, nv.1),
            (true, true) => format!("compute_{want} PTX (the {target} cubin did not load), NVRTC {}.{}", nv.0, nv.1),
            (false, _) => format!("{target} PTX, NVRTC {}.{}", nv.0, nv.1),
        };
        Ok(())
    }

    fn slot(&mut self, len: usize) -> Result<usize> {
        let i = if self.staging.len() < STAGING_SLOTS {
            let done = self.ctx.new_event(None).map_err(|e| anyhow::anyhow!("cuEventCreate: {e:?}"))?;
            self.staging.push(Staging { ptr: std::ptr::null_mut(), cap: 0, done, used: false });
            self.staging.len() - 1
        } else {
            self.next_slot % STAGING_SLOTS
        };
        self.next_slot = i + 1;
        let s = &mut self.staging[i];
        if s.used {
            s.done.synchronize().map_err(|e| anyhow::anyhow!("waiting for an upload: {e:?}"))?;
        }
        if s.cap < len {
            if !s.ptr.is_null() {
                // SAFETY: allocated by malloc_host below, its last copy finished (synchronized).
                unsafe { result::free_host(s.ptr as *mut c_void) }
                    .map_err(|e| anyhow::anyhow!("cuMemFreeHost: {e:?}"))?;
                s.ptr = std::ptr::null_mut();
            }
            let cap = len.next_power_of_two().max(1 << 16);
            // SAFETY: a plain pinned allocation, freed in Drop.
            s.ptr = unsafe { result::malloc_host(cap, 0) }
                .map_err(|e| anyhow::anyhow!("cuMemHostAlloc({cap}): {e:?}"))? as *mut u8;
            s.cap = cap;
        }
        Ok(i)
    }
}

impl Drop for CudaExec {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let _ = self.stream.synchronize();
        for s in &self.staging {
            if !s.ptr.is_null() {
                // SAFETY: the stream is idle; allocated by malloc_host.
                let _ = unsafe { result::free_host(s.ptr as *mut c_void) };
            }
        }
    }
}

#[allow(dead_code)]
fn assert_send() {
    fn send<T: Send>() {}
    send::<CudaExec>();
}

fn drv<T>(r: std::result::Result<T, cudarc::driver::DriverError>, what: &str) -> Result<T> {
    r.map_err(|e| anyhow::anyhow!("CUDA {what}: {e:?}"))
}

impl Exec for CudaExec {
    fn describe(&self) -> String {
        format!("cuda: {} (sm_{}{}, {} SMs, kernels {})", self.name, self.arch.0, self.arch.1, self.sms, self.build)
    }

    fn sm_count(&self) -> u32 {
        self.sms
    }

    fn max_grid_blocks(&self) -> u32 {
        self.sms * 16
    }

    fn alloc(&mut self, bytes: usize) -> Result<DevPtr> {
        let slice = drv(self.stream.alloc_zeros::<u8>(bytes.max(1)), "alloc")?;
        let (ptr, _) = slice.device_ptr(&self.stream);
        self.allocs.insert(ptr, slice);
        Ok(DevPtr(ptr))
    }

    fn free(&mut self, ptr: DevPtr) -> Result<()> {
        match self.allocs.remove(&ptr.0) {
            Some(_) => Ok(()),
            None => bail!("free of an address that was not allocated: {:#x}", ptr.0),
        }
    }

    fn upload(&mut self, dst: DevPtr, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        drv(self.ctx.bind_to_thread(), "bind context")?;
        let i = self.slot(src.len())?;
        let s = &mut self.staging[i];
        // SAFETY: the slot holds `cap >= src.len()` pinned bytes no copy is reading any more.
        let pinned = unsafe { std::slice::from_raw_parts_mut(s.ptr, src.len()) };
        pinned.copy_from_slice(src);
        // SAFETY: dst is device memory of ours; `pinned` lives until `done` has passed.
        drv(unsafe { result::memcpy_htod_async(dst.0, pinned, self.stream.cu_stream()) }, "upload")?;
        drv(s.done.record(&self.stream), "event record")?;
        s.used = true;
        Ok(())
    }

    fn download(&mut self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        drv(self.ctx.bind_to_thread(), "bind context")?;
        // SAFETY: src is device memory of ours; the stream is synchronized before dst is read.
        drv(unsafe { result::memcpy_dtoh_async(dst, src.0, self.stream.cu_stream()) }, "download")?;
        drv(self.stream.synchronize(), "synchronize (a kernel before this download failed)")
    }

    fn zero(&mut self, dst: DevPtr, bytes: usize) -> Result<()> {
        drv(self.ctx.bind_to_thread(), "bind context")?;
        // SAFETY: dst..dst+bytes is device memory of ours.
        drv(unsafe { result::memset_d8_async(dst.0, 0, bytes, self.stream.cu_stream()) }, "memset")
    }

    fn launch(&mut self, l: &Launch) -> Result<()> {
        let f = self.functions.get(l.kernel).with_context(|| format!("no kernel named {}", l.kernel))?;
        // The parameter struct by value (copied to an 8-byte aligned buffer), then pointers.
        let mut pbuf = [0u64; 16];
        anyhow::ensure!(l.params.len() <= 128, "parameter struct of {} bytes", l.params.len());
        // SAFETY: pbuf has 128 bytes.
        unsafe { std::ptr::copy_nonoverlapping(l.params.as_ptr(), pbuf.as_mut_ptr() as *mut u8, l.params.len()) };
        let mut ptrs: Vec<u64> = l.ptrs.iter().map(|p| p.0).collect();
        let mut args: Vec<*mut c_void> = Vec::with_capacity(ptrs.len() + 1);
        args.push(pbuf.as_mut_ptr() as *mut c_void);
        for p in ptrs.iter_mut() {
            args.push(p as *mut u64 as *mut c_void);
        }
        drv(self.ctx.bind_to_thread(), "bind context")?;
        let grid = (l.grid[0], l.grid[1], l.grid[2]);
        let block = (l.block[0], l.block[1], l.block[2]);
        // SAFETY: the launchers in `ops` pass the parameter struct and the pointer arguments
        // each kernel declares, pointing into live allocations.
        drv(
            unsafe { result::launch_kernel(f.cu_function(), grid, block, 0, self.stream.cu_stream(), &mut args) },
            l.kernel,
        )
    }

    fn sync(&mut self) -> Result<()> {
        drv(self.ctx.bind_to_thread(), "bind context")?;
        drv(self.stream.synchronize(), "synchronize (a kernel failed)")
    }
}
