//! What the CUDA engine needs from a device: memory, copies and kernel launches by name.
//!
//! Two implementations: the GPU (`device::CudaExec`, cudarc + NVRTC, feature `cuda`) and the
//! CPU emulator (`emulator::EmuExec`: the same kernels compiled as C++ by g++). Everything
//! above this seam (`ops`, `engine`) is shared, so the emulator tests the host-side launch
//! code as well as the kernels.

use anyhow::Result;

use super::params::KernelParams;

/// A device address: a `CUdeviceptr` on a GPU, `(buffer id << 40) | offset` in the emulator.
/// Zero is the null pointer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DevPtr(pub u64);

impl DevPtr {
    pub const NULL: DevPtr = DevPtr(0);

    /// The address `bytes` further on.
    pub fn byte_add(self, bytes: usize) -> DevPtr {
        DevPtr(self.0 + bytes as u64)
    }
}

/// One kernel launch: grid and block in (x, y, z), the parameter struct's bytes and the
/// kernel's pointer arguments in order (the kernels all take `(Params p, T* ...)`).
#[derive(Clone, Debug)]
pub struct Launch<'a> {
    pub kernel: &'static str,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub params: &'a [u8],
    pub ptrs: &'a [DevPtr],
}

/// A device: memory, copies in stream order, launches. All calls are queued in order on one
/// stream; only `download` and `sync` wait for the device.
pub trait Exec {
    /// The device in words, for `Backend::describe`.
    fn describe(&self) -> String;
    /// Streaming multiprocessors (the GEMM planner sizes its grids by it).
    fn sm_count(&self) -> u32;
    /// The most blocks a grid-stride kernel should launch (their loops cover the rest).
    fn max_grid_blocks(&self) -> u32;
    /// `bytes` of zeroed device memory, aligned to 256 bytes, kept until `free`.
    fn alloc(&mut self, bytes: usize) -> Result<DevPtr>;
    fn free(&mut self, ptr: DevPtr) -> Result<()>;
    /// Copies host bytes to the device; `src` may be reused as soon as this returns.
    fn upload(&mut self, dst: DevPtr, src: &[u8]) -> Result<()>;
    /// Copies device bytes to the host, after all queued work (a host sync).
    fn download(&mut self, src: DevPtr, dst: &mut [u8]) -> Result<()>;
    fn zero(&mut self, dst: DevPtr, bytes: usize) -> Result<()>;
    fn launch(&mut self, launch: &Launch) -> Result<()>;
    /// Waits for all queued work.
    fn sync(&mut self) -> Result<()>;
}

/// Element types that live in device buffers.
///
/// # Safety
/// Plain old data: any bit pattern valid, no padding.
pub unsafe trait Pod: Copy + Default + 'static {}
// SAFETY: primitive numbers.
unsafe impl Pod for f32 {}
unsafe impl Pod for f64 {}
unsafe impl Pod for i32 {}
unsafe impl Pod for u32 {}

pub fn bytes_of<T: Pod>(v: &[T]) -> &[u8] {
    // SAFETY: Pod has no padding; u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

pub fn bytes_of_mut<T: Pod>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as above, and every bit pattern is a valid T.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

/// A typed device array: a base address and a length (no ownership: `Exec::free` frees).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf<T> {
    pub ptr: DevPtr,
    pub len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: Pod> Buf<T> {
    pub fn alloc(ex: &mut impl Exec, len: usize) -> Result<Self> {
        let ptr = ex.alloc(len.max(1) * std::mem::size_of::<T>())?;
        Ok(Buf { ptr, len, _t: std::marker::PhantomData })
    }

    /// A device copy of `data`.
    pub fn from_host(ex: &mut impl Exec, data: &[T]) -> Result<Self> {
        let b = Self::alloc(ex, data.len())?;
        b.write(ex, 0, data)?;
        Ok(b)
    }

    /// The address of element `i`.
    pub fn at(&self, i: usize) -> DevPtr {
        debug_assert!(i <= self.len, "element {i} of a buffer of {}", self.len);
        self.ptr.byte_add(i * std::mem::size_of::<T>())
    }

    /// Elements `start..start + len` as a buffer of their own.
    pub fn slice(&self, start: usize, len: usize) -> Buf<T> {
        assert!(start + len <= self.len, "slice {start}+{len} of a buffer of {}", self.len);
        Buf { ptr: self.at(start), len, _t: std::marker::PhantomData }
    }

    pub fn write(&self, ex: &mut impl Exec, start: usize, data: &[T]) -> Result<()> {
        assert!(start + data.len() <= self.len, "write {start}+{} into a buffer of {}", data.len(), self.len);
        ex.upload(self.at(start), bytes_of(data))
    }

    pub fn read(&self, ex: &mut impl Exec) -> Result<Vec<T>> {
        let mut v = vec![T::default(); self.len];
        ex.download(self.ptr, bytes_of_mut(&mut v))?;
        Ok(v)
    }

    pub fn zero(&self, ex: &mut impl Exec) -> Result<()> {
        ex.zero(self.ptr, self.len * std::mem::size_of::<T>())
    }

    pub fn free(self, ex: &mut impl Exec) -> Result<()> {
        ex.free(self.ptr)
    }
}

/// Launches `kernel` with parameter struct `p` and pointer arguments `ptrs`.
pub fn launch<P: KernelParams>(
    ex: &mut impl Exec,
    kernel: &'static str,
    grid: [u32; 3],
    block: [u32; 3],
    p: &P,
    ptrs: &[DevPtr],
) -> Result<()> {
    ex.launch(&Launch { kernel, grid, block, params: p.as_bytes(), ptrs })
}
