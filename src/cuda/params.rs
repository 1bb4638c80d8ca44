//! The kernels' parameter structs, each mirrored field for field by a struct of the same name
//! in `kernels/common.cuh` and passed to its kernel by value. `tests/kernels_emulated.rs`
//! checks every size against the C++ compiler's `sizeof`, and the emulator refuses a launch
//! whose parameter bytes do not have the kernel's size.
//!
//! No struct has implicit padding (explicit `pad_` fields where needed), so each can be sent
//! as plain bytes.

/// A `#[repr(C)]` parameter struct without padding, sent to a kernel as its bytes.
///
/// # Safety
/// Implementors must be `#[repr(C)]`, contain only integers and floats, and have no padding.
pub unsafe trait KernelParams: Copy + 'static {
    /// The struct's name in `kernels/common.cuh`.
    const C_NAME: &'static str;

    fn as_bytes(&self) -> &[u8] {
        // SAFETY: the trait's contract: plain old data without padding bytes.
        unsafe { std::slice::from_raw_parts(self as *const Self as *const u8, std::mem::size_of::<Self>()) }
    }
}

macro_rules! kernel_params {
    ($($name:ident),* $(,)?) => {
        $(
            // SAFETY: every struct below is #[repr(C)], all 4- or 8-byte fields, no padding
            // (checked by `sizes_have_no_padding` below).
            unsafe impl KernelParams for $name {
                const C_NAME: &'static str = stringify!($name);
            }
        )*
        /// `(name, size in bytes)` of every parameter struct, to compare with the kernels'.
        pub fn all_sizes() -> Vec<(&'static str, usize)> {
            vec![$((stringify!($name), std::mem::size_of::<$name>())),*]
        }
    };
}

/// im2col / col2im: x (C, N, H, W), col (C*KH*KW, N*OH*OW).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConvParams {
    pub n: i32,
    pub c: i32,
    pub h: i32,
    pub w: i32,
    pub oc: i32,
    pub kh: i32,
    pub kw: i32,
    pub stride: i32,
    pub pad: i32,
    pub oh: i32,
    pub ow: i32,
}

/// C = alpha op(A) op(B) + beta C [+ bias] [relu]; see `kernels/gemm.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GemmParams {
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub lda: i32,
    pub ldb: i32,
    pub ldc: i32,
    pub alpha: f32,
    pub beta: f32,
    pub k_chunk: i32,
    /// 0 none, 1 bias per row, 2 bias per column.
    pub bias_mode: i32,
    pub relu: i32,
}

/// The reduction after a split-K GEMM.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SplitKParams {
    pub m: i32,
    pub n: i32,
    pub ldc: i32,
    pub splits: i32,
    pub alpha: f32,
    pub beta: f32,
    pub bias_mode: i32,
    pub relu: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BiasAddParams {
    pub rows: i32,
    pub cols: i32,
    /// 1: bias per row, 2: bias per column.
    pub mode: i32,
}

/// out[o] = beta out[o] + sum_{i < len} in[o*so + i*si].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BiasGradParams {
    pub outputs: i32,
    pub len: i32,
    pub so: i32,
    pub si: i32,
    pub beta: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReluParams {
    pub n: i32,
}

/// Max and average pooling over `planes` planes of (h, w).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolParams {
    pub planes: i32,
    pub h: i32,
    pub w: i32,
    pub oh: i32,
    pub ow: i32,
    pub k: i32,
    pub stride: i32,
    pub pad: i32,
    /// Max-pool backward only: 1 also applies the backward of a ReLU before the pool.
    pub relu_mask: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalPoolParams {
    pub planes: i32,
    pub hw: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DropoutParams {
    pub seed: u64,
    pub step: u64,
    pub n: u32,
    pub threshold: u32,
    pub scale: f32,
    pub pad_: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrossEntropyParams {
    pub n: i32,
    pub k: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AdamParams {
    pub n: i32,
    pub b1: f32,
    pub b2: f32,
    pub one_minus_b1: f32,
    pub one_minus_b2: f32,
    pub step_size: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
    pub wd: f32,
}

kernel_params!(
    ConvParams,
    GemmParams,
    SplitKParams,
    BiasAddParams,
    BiasGradParams,
    ReluParams,
    PoolParams,
    GlobalPoolParams,
    DropoutParams,
    CrossEntropyParams,
    AdamParams,
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field is 4 bytes except DropoutParams' two u64s, so the sizes below mean no
    /// padding anywhere (the C++ side is compared in tests/kernels_emulated.rs).
    #[test]
    fn sizes_have_no_padding() {
        let want = [44, 44, 32, 12, 20, 4, 36, 8, 32, 8, 36];
        let got: Vec<usize> = all_sizes().iter().map(|&(_, s)| s).collect();
        assert_eq!(got, want);
    }
}
