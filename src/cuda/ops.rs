//! Host-side launchers, one per kernel: they check sizes, fill the parameter struct, pick the
//! grid and launch. Shared by the engine, the benchmarks and the tests, on the GPU and in the
//! emulator alike. Shapes and the math of each kernel are in the header of its `.cu` file.

use anyhow::{bail, ensure, Result};

use super::exec::{launch, Buf, DevPtr, Exec};
use super::params::*;

/// Threads per block of the elementwise kernels and of the reductions (`MEDCNN_THREADS`).
pub const THREADS: u32 = 256;

/// A size as the kernels' `int`, or an error naming it.
pub fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow::anyhow!("{what} = {v} does not fit the kernels' 32-bit indices"))
}

/// A 1-D grid for a grid-stride loop over `total` elements.
fn grid_for(ex: &impl Exec, total: usize) -> [u32; 3] {
    let blocks = total.div_ceil(THREADS as usize).clamp(1, ex.max_grid_blocks().max(1) as usize);
    [blocks as u32, 1, 1]
}

fn elementwise<P: KernelParams>(
    ex: &mut impl Exec,
    kernel: &'static str,
    total: usize,
    p: &P,
    ptrs: &[DevPtr],
) -> Result<()> {
    // The kernels' grid-stride loops index with a 32-bit int (`grid_next` in common.cuh keeps
    // the step from wrapping); a larger launch is refused here, whatever its caller checked.
    int(total, &format!("{kernel}: elements"))?;
    let grid = grid_for(ex, total);
    launch(ex, kernel, grid, [THREADS, 1, 1], p, ptrs)
}

// ---------------------------------------------------------------------------------------
// GEMM

/// The SGEMM block tiles compiled in `kernels/gemm.cu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tile {
    /// 128x128x8, 8x8 per thread, 256 threads.
    T128,
    /// 64x64x8, 4x4 per thread, 256 threads.
    T64,
    /// 16x16x4, 2x2 per thread, 64 threads.
    T16,
}

impl Tile {
    pub const ALL: [Tile; 3] = [Tile::T128, Tile::T64, Tile::T16];

    /// (BM = BN, BK, threads per block)
    pub fn shape(self) -> (usize, usize, u32) {
        match self {
            Tile::T128 => (128, 8, 256),
            Tile::T64 => (64, 8, 256),
            Tile::T16 => (16, 4, 64),
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Tile::T128 => "128",
            Tile::T64 => "64",
            Tile::T16 => "16",
        }
    }

    /// Rough blocks resident per SM and arithmetic efficiency relative to T128, for the planner
    /// (guesses: measure with `bench::sgemm_gflops_by_tile` on the GPU to tune them).
    fn occupancy_and_efficiency(self) -> (usize, f64) {
        match self {
            Tile::T128 => (2, 1.0),
            Tile::T64 => (4, 0.55),
            Tile::T16 => (16, 0.12),
        }
    }
}

/// The kernel name of a tile and transpose pair, e.g. `sgemm_nt_128`.
pub fn sgemm_kernel(tile: Tile, ta: bool, tb: bool) -> &'static str {
    const NAMES: [[&str; 4]; 3] = [
        ["sgemm_nn_128", "sgemm_nt_128", "sgemm_tn_128", "sgemm_tt_128"],
        ["sgemm_nn_64", "sgemm_nt_64", "sgemm_tn_64", "sgemm_tt_64"],
        ["sgemm_nn_16", "sgemm_nt_16", "sgemm_tn_16", "sgemm_tt_16"],
    ];
    let t = match tile {
        Tile::T128 => 0,
        Tile::T64 => 1,
        Tile::T16 => 2,
    };
    debug_assert!(NAMES[t][0].ends_with(tile.suffix()));
    NAMES[t][2 * ta as usize + tb as usize]
}

/// How one product is launched: the tile and, for split-K, the number of k slices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmPlan {
    pub tile: Tile,
    pub splits: usize,
    pub k_chunk: usize,
}

impl GemmPlan {
    /// One tile, no split.
    pub fn simple(tile: Tile, k: usize) -> Self {
        GemmPlan { tile, splits: 1, k_chunk: k.max(1) }
    }

    /// `splits` slices of k (rounded to the tile's k step; may come out as fewer slices).
    pub fn split(tile: Tile, k: usize, splits: usize) -> Self {
        let bk = tile.shape().1;
        let k_chunk = k.div_ceil(splits.max(1)).div_ceil(bk).max(1) * bk;
        GemmPlan { tile, splits: k.div_ceil(k_chunk).max(1), k_chunk }
    }

    /// Floats of split-K workspace the plan needs for an m x n product.
    pub fn workspace(&self, m: usize, n: usize) -> usize {
        if self.splits > 1 {
            self.splits * m * n
        } else {
            0
        }
    }
}

/// Picks a tile (and, when `allow_split`, a split-K factor) for an m x n x k product on a
/// device with `sms` multiprocessors, from a rough model: the blocks an SM runs one after
/// another (or side by side, sharing its arithmetic) times each block's multiply-adds at the
/// tile's efficiency, plus launch and memory costs (C, and the split-K workspace written and
/// read back). A pure function of the shape, so a run's sums are always split the same way.
pub fn plan_gemm(m: usize, n: usize, k: usize, sms: u32, allow_split: bool) -> GemmPlan {
    // Seconds per multiply-add of one SM at T128's efficiency, per byte of memory traffic and
    // per launch, for an H100-class device; only their ratios matter.
    const FMA_S: f64 = 1.0 / (128.0 * 1.7e9);
    const BYTE_S: f64 = 1.0 / 2.5e12;
    const LAUNCH_S: f64 = 3e-6;
    let sms = sms.max(1) as usize;
    let mut best = (f64::INFINITY, GemmPlan::simple(Tile::T128, k));
    for tile in Tile::ALL {
        let (bmn, bk, _) = tile.shape();
        let (_, eff) = tile.occupancy_and_efficiency();
        let blocks = m.div_ceil(bmn) * n.div_ceil(bmn);
        let mut splits_to_try = vec![1];
        if allow_split {
            splits_to_try.extend((1..=9).map(|p| 1usize << p).filter(|&s| k / s >= 128));
        }
        for s in splits_to_try {
            let plan = if s == 1 { GemmPlan::simple(tile, k) } else { GemmPlan::split(tile, k, s) };
            let per_sm = (blocks * plan.splits).div_ceil(sms) as f64;
            let steps = plan.k_chunk.min(k.max(1)).div_ceil(bk) * bk;
            let mut t = per_sm * (bmn * bmn * steps) as f64 * FMA_S / eff + LAUNCH_S;
            t += (m * n * 4) as f64 * BYTE_S;
            if plan.splits > 1 {
                t += (plan.splits * m * n * 8) as f64 * BYTE_S + LAUNCH_S;
            }
            if t < best.0 {
                best = (t, plan);
            }
        }
    }
    best.1
}

/// A bias fused into a GEMM's store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bias {
    None,
    /// bias[row]: a conv's per-output-channel bias on y (OC, N*L).
    Rows(DevPtr),
    /// bias[col]: a linear layer's bias on y (N, OUT).
    Cols(DevPtr),
}

/// One product `C = alpha op(A) op(B) + beta C [+ bias] [relu]`, row-major, with the
/// transposes and sizes of `tensor::gemm`: op(A) is m x k, stored (m, k) or (k, m) when `ta`;
/// op(B) is k x n, stored (k, n) or (n, k) when `tb`. Leading dimensions default to packed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub ta: bool,
    pub tb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub alpha: f32,
    pub beta: f32,
    pub bias: Bias,
    pub relu: bool,
}

impl Gemm {
    pub fn new(ta: bool, tb: bool, m: usize, n: usize, k: usize) -> Self {
        Gemm {
            ta,
            tb,
            m,
            n,
            k,
            lda: if ta { m } else { k },
            ldb: if tb { k } else { n },
            ldc: n,
            alpha: 1.0,
            beta: 0.0,
            bias: Bias::None,
            relu: false,
        }
    }
    pub fn bias(mut self, bias: Bias) -> Self {
        self.bias = bias;
        self
    }
    pub fn relu(mut self) -> Self {
        self.relu = true;
        self
    }
    pub fn alpha_beta(mut self, alpha: f32, beta: f32) -> Self {
        self.alpha = alpha;
        self.beta = beta;
        self
    }

    fn bias_args(&self) -> (i32, DevPtr) {
        match self.bias {
            Bias::None => (0, DevPtr::NULL),
            Bias::Rows(p) => (1, p),
            Bias::Cols(p) => (2, p),
        }
    }
}

/// Runs `g` on the device as `plan` says; `ws` is the split-K workspace (at least
/// `plan.workspace(m, n)` floats; unused without a split).
pub fn gemm(
    ex: &mut impl Exec,
    g: &Gemm,
    a: DevPtr,
    b: DevPtr,
    c: DevPtr,
    plan: &GemmPlan,
    ws: Option<&Buf<f32>>,
) -> Result<()> {
    let (m, n, k) = (g.m, g.n, g.k);
    let (min_lda, min_ldb) = (if g.ta { m } else { k }, if g.tb { k } else { n });
    ensure!(g.lda >= min_lda, "gemm: lda {} < {min_lda}", g.lda);
    ensure!(g.ldb >= min_ldb, "gemm: ldb {} < {min_ldb}", g.ldb);
    ensure!(g.ldc >= n, "gemm: ldc {} < n {n}", g.ldc);
    if m == 0 || n == 0 {
        return Ok(());
    }
    let (bmn, _, threads) = plan.tile.shape();
    let (bias_mode, bias) = g.bias_args();
    let grid_xy = [int(n.div_ceil(bmn), "gemm column blocks")? as u32, int(m.div_ceil(bmn), "gemm row blocks")? as u32];
    ensure!(grid_xy[1] <= 65535, "gemm: {m} rows need more than 65535 row blocks");
    let kernel = sgemm_kernel(plan.tile, g.ta, g.tb);
    let mut p = GemmParams {
        m: int(m, "gemm m")?,
        n: int(n, "gemm n")?,
        k: int(k, "gemm k")?,
        lda: int(g.lda, "gemm lda")?,
        ldb: int(g.ldb, "gemm ldb")?,
        ldc: int(g.ldc, "gemm ldc")?,
        alpha: g.alpha,
        beta: g.beta,
        k_chunk: int(k.max(1), "gemm k")?,
        bias_mode,
        relu: g.relu as i32,
    };
    if plan.splits <= 1 {
        return launch(ex, kernel, [grid_xy[0], grid_xy[1], 1], [threads, 1, 1], &p, &[a, b, c, bias]);
    }
    let Some(ws) = ws else { bail!("gemm: a split-K plan needs a workspace") };
    ensure!(
        ws.len >= plan.workspace(m, n),
        "gemm: workspace of {} floats, the plan needs {}",
        ws.len,
        plan.workspace(m, n)
    );
    ensure!(plan.splits <= 65535, "gemm: at most 65535 k slices");
    // Partial products into the workspace, dense (ldc = n), no epilogue...
    p.ldc = p.n;
    p.alpha = 1.0;
    p.beta = 0.0;
    p.k_chunk = int(plan.k_chunk, "gemm k chunk")?;
    p.bias_mode = 0;
    p.relu = 0;
    launch(
        ex,
        kernel,
        [grid_xy[0], grid_xy[1], plan.splits as u32],
        [threads, 1, 1],
        &p,
        &[a, b, ws.ptr, DevPtr::NULL],
    )?;
    // ...then their sum in slice order, with the epilogue.
    let r = SplitKParams {
        m: p.m,
        n: p.n,
        ldc: int(g.ldc, "gemm ldc")?,
        splits: plan.splits as i32,
        alpha: g.alpha,
        beta: g.beta,
        bias_mode,
        relu: g.relu as i32,
    };
    elementwise(ex, "sgemm_reduce_splits", m * n, &r, &[ws.ptr, c, bias])
}

// ---------------------------------------------------------------------------------------
// Bias

/// y (rows, cols) += bias per row (`per_row`) or per column.
pub fn bias_add(ex: &mut impl Exec, rows: usize, cols: usize, per_row: bool, y: DevPtr, bias: DevPtr) -> Result<()> {
    let p = BiasAddParams {
        rows: int(rows, "bias rows")?,
        cols: int(cols, "bias cols")?,
        mode: if per_row { 1 } else { 2 },
    };
    int(rows * cols, "bias elements")?;
    elementwise(ex, "bias_add", rows * cols, &p, &[y, bias])
}

/// db[o] = beta db[o] + sum_i dy[o*so + i*si] for o < outputs, i < len, one block per output.
pub fn bias_grad(ex: &mut impl Exec, p: &BiasGradParams, db: DevPtr, dy: DevPtr) -> Result<()> {
    if p.outputs == 0 {
        return Ok(());
    }
    let blocks = (p.outputs as u32).min(65535);
    launch(ex, "bias_grad", [blocks, 1, 1], [THREADS, 1, 1], p, &[db, dy])
}

/// Row sums of a (rows, len) matrix (a conv's dy (OC, N*L)).
pub fn row_sums(rows: usize, len: usize, beta: f32) -> Result<BiasGradParams> {
    Ok(BiasGradParams {
        outputs: int(rows, "rows")?,
        len: int(len, "row length")?,
        so: int(len, "row length")?,
        si: 1,
        beta,
    })
}

/// Column sums of a (rows, cols) matrix (a linear layer's dy (N, OUT)).
pub fn col_sums(rows: usize, cols: usize, beta: f32) -> Result<BiasGradParams> {
    Ok(BiasGradParams { outputs: int(cols, "cols")?, len: int(rows, "rows")?, so: 1, si: int(cols, "cols")?, beta })
}

// ---------------------------------------------------------------------------------------
// Convolution data movement

/// The im2col/col2im parameters of a conv over x (C, N, H, W).
#[allow(clippy::too_many_arguments)]
pub fn conv_params(
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    oc: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
) -> Result<ConvParams> {
    let g = crate::layers::conv2d::ConvGeometry::new(c, h, w, kh, kw, stride, pad);
    int(g.k() * n * g.l(), "im2col elements")?;
    int(c * n * h * w, "conv input elements")?;
    Ok(ConvParams {
        n: int(n, "batch")?,
        c: c as i32,
        h: h as i32,
        w: w as i32,
        oc: int(oc, "out channels")?,
        kh: kh as i32,
        kw: kw as i32,
        stride: stride as i32,
        pad: pad as i32,
        oh: g.oh as i32,
        ow: g.ow as i32,
    })
}

fn col_len(p: &ConvParams) -> usize {
    (p.c * p.kh * p.kw) as usize * (p.n * p.oh * p.ow) as usize
}

/// col (C*KH*KW, N*OH*OW) from x (C, N, H, W).
pub fn im2col(ex: &mut impl Exec, p: &ConvParams, x: DevPtr, col: DevPtr) -> Result<()> {
    elementwise(ex, "im2col", col_len(p), p, &[x, col])
}

/// dx (C, N, H, W) = col2im(dcol) (overwrites dx).
pub fn col2im(ex: &mut impl Exec, p: &ConvParams, dcol: DevPtr, dx: DevPtr) -> Result<()> {
    elementwise(ex, "col2im", (p.c * p.n * p.h * p.w) as usize, p, &[dcol, dx])
}

// ---------------------------------------------------------------------------------------
// Elementwise and pooling

pub fn relu_forward(ex: &mut impl Exec, n: usize, x: DevPtr, y: DevPtr) -> Result<()> {
    elementwise(ex, "relu_forward", n, &ReluParams { n: int(n, "relu elements")? }, &[x, y])
}

/// dx = dy * [y > 0]; dx may be dy.
pub fn relu_backward(ex: &mut impl Exec, n: usize, y: DevPtr, dy: DevPtr, dx: DevPtr) -> Result<()> {
    elementwise(ex, "relu_backward", n, &ReluParams { n: int(n, "relu elements")? }, &[y, dy, dx])
}

/// Max-pool parameters with PyTorch's output size (floor or ceil mode) for `planes` planes.
pub fn max_pool_params(
    planes: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    ceil_mode: bool,
) -> Result<PoolParams> {
    let pool = crate::layers::MaxPool2d::with_options(k, stride, pad, ceil_mode);
    pool_params(planes, (h, w), pool.out_hw(h, w), k, stride, pad)
}

/// Average-pool parameters (no padding, floor mode).
pub fn avg_pool_params(planes: usize, h: usize, w: usize, k: usize, stride: usize) -> Result<PoolParams> {
    ensure!(k > 0 && stride > 0, "avg pool: kernel and stride must be positive");
    let (oh, ow) = (crate::layers::out_len(h, k, stride, 0), crate::layers::out_len(w, k, stride, 0));
    pool_params(planes, (h, w), (oh, ow), k, stride, 0)
}

/// The kernels' `PoolParams` for either pool, once the output size is known.
fn pool_params(
    planes: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    k: usize,
    stride: usize,
    pad: usize,
) -> Result<PoolParams> {
    int(planes * h * w, "pool input elements")?;
    Ok(PoolParams {
        planes: planes as i32,
        h: h as i32,
        w: w as i32,
        oh: oh as i32,
        ow: ow as i32,
        k: k as i32,
        stride: stride as i32,
        pad: pad as i32,
        relu_mask: 0,
    })
}

fn pool_outputs(p: &PoolParams) -> usize {
    (p.planes * p.oh * p.ow) as usize
}

fn pool_inputs(p: &PoolParams) -> usize {
    (p.planes * p.h * p.w) as usize
}

pub fn max_pool_forward(ex: &mut impl Exec, p: &PoolParams, x: DevPtr, y: DevPtr, argmax: DevPtr) -> Result<()> {
    elementwise(ex, "max_pool_forward", pool_outputs(p), p, &[x, y, argmax])
}

/// dx from dy and the forward's argmax; with `p.relu_mask`, x (the pool's input) zeroes dx
/// where x <= 0.
pub fn max_pool_backward(
    ex: &mut impl Exec,
    p: &PoolParams,
    dy: DevPtr,
    argmax: DevPtr,
    x: DevPtr,
    dx: DevPtr,
) -> Result<()> {
    elementwise(ex, "max_pool_backward", pool_inputs(p), p, &[dy, argmax, x, dx])
}

pub fn avg_pool_forward(ex: &mut impl Exec, p: &PoolParams, x: DevPtr, y: DevPtr) -> Result<()> {
    ensure!(p.pad == 0, "avg pool: no padding");
    elementwise(ex, "avg_pool_forward", pool_outputs(p), p, &[x, y])
}

pub fn avg_pool_backward(ex: &mut impl Exec, p: &PoolParams, dy: DevPtr, dx: DevPtr) -> Result<()> {
    ensure!(p.pad == 0, "avg pool: no padding");
    elementwise(ex, "avg_pool_backward", pool_inputs(p), p, &[dy, dx])
}

/// y (planes) = mean of each plane of hw values.
pub fn global_avg_pool_forward(ex: &mut impl Exec, planes: usize, hw: usize, x: DevPtr, y: DevPtr) -> Result<()> {
    let p = GlobalPoolParams { planes: int(planes, "planes")?, hw: int(hw, "plane size")? };
    int(planes * hw, "pool input elements")?;
    elementwise(ex, "global_avg_pool_forward", planes, &p, &[x, y])
}

pub fn global_avg_pool_backward(ex: &mut impl Exec, planes: usize, hw: usize, dy: DevPtr, dx: DevPtr) -> Result<()> {
    let p = GlobalPoolParams { planes: int(planes, "planes")?, hw: int(hw, "plane size")? };
    elementwise(ex, "global_avg_pool_backward", int(planes * hw, "pool input elements")? as usize, &p, &[dy, dx])
}

/// The dropout parameters of `n` elements at `step`, as `layers::dropout` draws them.
pub fn dropout_params(n: usize, p: f64, seed: u64, step: u64) -> Result<DropoutParams> {
    ensure!((0.0..1.0).contains(&p), "dropout: p must be in [0, 1), got {p}");
    Ok(DropoutParams {
        seed,
        step,
        n: int(n, "dropout elements")? as u32,
        threshold: crate::layers::dropout::drop_threshold(p),
        scale: 1.0f32 / (1.0 - p) as f32,
        pad_: 0,
    })
}

pub fn dropout_forward(ex: &mut impl Exec, p: &DropoutParams, x: DevPtr, y: DevPtr) -> Result<()> {
    elementwise(ex, "dropout_forward", p.n as usize, p, &[x, y])
}

/// dx = dy * mask * scale; dx may be dy.
pub fn dropout_backward(ex: &mut impl Exec, p: &DropoutParams, dy: DevPtr, dx: DevPtr) -> Result<()> {
    elementwise(ex, "dropout_backward", p.n as usize, p, &[dy, dx])
}

/// dlogits (n, k) and stats[0] += loss sum, stats[1] += correct, from logits (n, k) and
/// targets (n) as i32.
pub fn cross_entropy(
    ex: &mut impl Exec,
    n: usize,
    k: usize,
    logits: DevPtr,
    targets: DevPtr,
    dlogits: DevPtr,
    stats: DevPtr,
) -> Result<()> {
    ensure!(n > 0 && k > 0, "cross-entropy: empty batch or no classes");
    let p = CrossEntropyParams { n: int(n, "batch")?, k: int(k, "classes")? };
    launch(ex, "cross_entropy_forward_backward", [1, 1, 1], [THREADS, 1, 1], &p, &[logits, targets, dlogits, stats])
}

/// The f32 constants of Adam step `t` (1, 2, ...), rounded from f64 as `optim::Adam` does.
pub fn adam_params(n: usize, adam: &crate::optim::Adam<f32>, t: u64) -> Result<AdamParams> {
    let ti = t as i32;
    let (b1, b2) = (adam.beta1 as f32, adam.beta2 as f32);
    Ok(AdamParams {
        n: int(n, "parameters")?,
        b1,
        b2,
        // 1 - beta in f64, rounded once, as optim::Adam (and PyTorch) do.
        one_minus_b1: (1.0 - adam.beta1) as f32,
        one_minus_b2: (1.0 - adam.beta2) as f32,
        step_size: (adam.lr / (1.0 - adam.beta1.powi(ti))) as f32,
        bc2_sqrt: (1.0 - adam.beta2.powi(ti)).sqrt() as f32,
        eps: adam.eps as f32,
        wd: adam.weight_decay as f32,
    })
}

/// One Adam update of `p.n` parameters from their gradients.
pub fn adam_step(ex: &mut impl Exec, p: &AdamParams, param: DevPtr, grad: DevPtr, m: DevPtr, v: DevPtr) -> Result<()> {
    elementwise(ex, "adam_step", p.n as usize, p, &[param, grad, m, v])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_plans_cover_k() {
        for k in [1, 7, 8, 9, 1000, 246016] {
            for s in [1, 2, 3, 64, 300] {
                let p = GemmPlan::split(Tile::T64, k, s);
                assert!(
                    p.k_chunk.is_multiple_of(8) && p.k_chunk * p.splits >= k && p.k_chunk * (p.splits - 1) < k,
                    "{k} {s} {p:?}"
                );
            }
        }
    }

    #[test]
    fn planner_splits_long_thin_products_and_not_wide_ones() {
        // conv1's dW: 32 x 9 with k = 64 * 62 * 62.
        let p = plan_gemm(32, 9, 64 * 3844, 132, true);
        assert!(p.splits >= 32, "{p:?}");
        // conv2's forward: 64 x 53824 x 288, plenty of blocks.
        let p = plan_gemm(64, 64 * 841, 288, 132, true);
        assert_eq!(p.splits, 1, "{p:?}");
        // A big square product takes the big tile.
        assert_eq!(plan_gemm(4096, 4096, 1024, 132, false).tile, Tile::T128);
        assert_eq!(plan_gemm(5, 6, 7, 132, false).splits, 1);
    }
}
