//! ReLU: y = max(x, 0), elementwise, any shape.
//!
//! The math. dy/dx = 1 where x > 0 and 0 elsewhere (PyTorch also takes 0 at x == 0), so
//!
//!   dx = dy * [y > 0]
//!
//! The output alone decides it (y > 0 exactly when x > 0), so forward keeps only that mask, one
//! byte per element, not x or y. An input the caller gives away (`forward_owned`) becomes y in
//! place. Both passes split the elements over the threads: a ReLU moves memory and computes
//! almost nothing, and one thread alone could not keep up with the conv layers around it.

use rayon::prelude::*;

use super::{Ctx, Layer};
use crate::tensor::{slice, slice_mut, zeros, Float, Tensor};

/// Elements per parallel task: below this, splitting costs more than it saves.
const CHUNK: usize = 1 << 14;

#[derive(Default)]
pub struct Relu<T: Float> {
    /// [y > 0] of the last forward, in row-major order (NaN counts as > 0: its gradient
    /// passes, as in PyTorch). Kept, allocation and all, from step to step.
    live: Vec<bool>,
    /// The last forward's shape (what backward's dy must have).
    shape: Vec<usize>,
    _t: std::marker::PhantomData<T>,
}

impl<T: Float> Relu<T> {
    pub fn new() -> Self {
        Relu { live: Vec::new(), shape: Vec::new(), _t: std::marker::PhantomData }
    }
}

/// y = max(v, 0), written `v < 0 ? 0 : v` so that a NaN stays NaN (as in PyTorch) instead of
/// vanishing; returns whether y is live (not <= 0, so NaN is live).
#[inline]
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn relu<T: Float>(v: T) -> (T, bool) {
    let y = if v < T::zero() { T::zero() } else { v };
    (y, !(y <= T::zero()))
}

/// ys = max(ys, 0) in place, live = [ys > 0]: the forward of this layer, and of a conv with
/// its ReLU fused in (`Conv2d::relu`), which calls it on each group's output while it is in cache.
pub(crate) fn relu_in_place<T: Float>(ys: &mut [T], live: &mut [bool]) {
    assert_eq!(ys.len(), live.len(), "relu_in_place: one mask entry per value");
    for (v, l) in ys.iter_mut().zip(live) {
        (*v, *l) = relu(*v);
    }
}

/// dx = dy where live, 0 elsewhere: this layer's backward, and a fused conv's first step back.
/// A select, not a branch: the mask is as good as random, and a branch on it mispredicted half
/// the time (a fused conv's backward took 1.6 ms more for 2M values).
pub(crate) fn mask_into<T: Float>(dy: &[T], live: &[bool], dx: &mut [T]) {
    assert!(dy.len() == live.len() && dy.len() == dx.len(), "mask_into: one mask entry per value");
    for ((d, &l), o) in dy.iter().zip(live).zip(dx) {
        *o = std::hint::select_unpredictable(l, *d, T::zero());
    }
}

impl<T: Float> Layer<T> for Relu<T> {
    fn describe(&self) -> String {
        "ReLU".into()
    }

    fn output_shape(&self, s: &[usize]) -> Vec<usize> {
        s.to_vec()
    }

    fn forward(&mut self, x: &Tensor<T>, ctx: Ctx) -> Tensor<T> {
        self.forward_owned(x.clone(), ctx)
    }

    fn forward_owned(&mut self, mut x: Tensor<T>, _ctx: Ctx) -> Tensor<T> {
        self.shape = x.shape().to_vec();
        self.live.resize(x.len(), false);
        slice_mut(&mut x)
            .par_chunks_mut(CHUNK)
            .zip(self.live.par_chunks_mut(CHUNK))
            .for_each(|(xs, ls)| relu_in_place(xs, ls));
        x
    }

    fn backward(&mut self, dy: &Tensor<T>) -> Tensor<T> {
        assert_eq!(dy.shape(), &self.shape[..], "ReLU::backward: dy shape (or no forward before it)");
        let mut dx = zeros(dy.shape());
        let chunks = slice_mut(&mut dx).par_chunks_mut(CHUNK).zip(slice(dy).par_chunks(CHUNK));
        chunks.zip(self.live.par_chunks(CHUNK)).for_each(|((dxs, dys), ls)| mask_into(dys, ls, dxs));
        dx
    }
}
