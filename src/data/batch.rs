//! Turning dataset indices into a training batch, and the seeded order of each epoch.
//!
//! What it is: pixels `0..=255` become floats in `[-1, 1]` (`x / 255`, then
//! `(x - 0.5) / 0.5`, i.e. `x / 127.5 - 1`), laid out NCHW with one channel, with an optional
//! left-right mirror per image as augmentation. `epoch_order` and `flip_mask` derive their
//! random numbers from `(seed, epoch)` alone, so a run resumed at epoch 7 sees exactly the
//! order and flips it would have seen without the interruption.
//!
//! What it is not: it does not pick which split to draw from (see `split`) and owns no
//! tensors: the batch is written into a caller's `Vec<f32>` so it can be reused.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

use super::load::Dataset;

/// Separate random streams for the two uses, so the order and the flips are independent.
const STREAM_ORDER: u64 = 1;
const STREAM_FLIP: u64 = 2;

/// Writes `pixels[i] / 127.5 - 1` into `out[i]`: 0 -> -1.0, 255 -> 1.0.
///
/// Panics if the two slices differ in length (a bug in the caller).
pub fn normalize_into(pixels: &[u8], out: &mut [f32]) {
    assert_eq!(pixels.len(), out.len(), "normalize_into: length mismatch");
    for (o, &p) in out.iter_mut().zip(pixels) {
        *o = p as f32 / 127.5 - 1.0;
    }
}

/// Fills `x` with the images `indices` as an NCHW batch (`len x C x S x S`, the dataset's
/// input shape) and `y` with their labels. A gray image for a three-channel input becomes three
/// equal channels. `hflip[i]` mirrors image `i` left-right; pass `&[]` for no flips at all.
///
/// Panics if an index is out of range or `hflip` is neither empty nor as long as `indices`.
pub fn fill_batch(ds: &Dataset, indices: &[usize], hflip: &[bool], x: &mut Vec<f32>, y: &mut Vec<usize>) {
    assert!(
        hflip.is_empty() || hflip.len() == indices.len(),
        "fill_batch: hflip has {} entries for {} images",
        hflip.len(),
        indices.len()
    );
    let (len, stored) = (ds.shape.len(), ds.image_len());
    x.clear();
    x.resize(indices.len() * len, 0.0);
    y.clear();
    for (slot, (k, &i)) in x.chunks_exact_mut(len).zip(indices.iter().enumerate()) {
        // One stored plane for C channels: normalise it into each channel's place.
        for part in slot.chunks_exact_mut(stored) {
            normalize_into(ds.image(i), part);
        }
        if hflip.get(k).copied().unwrap_or(false) {
            mirror_rows(slot, ds.shape.size);
        }
        y.push(ds.labels[i] as usize);
    }
}

/// Mirrors an image (any number of planes of rows of `side` values) left-right in place.
fn mirror_rows(image: &mut [f32], side: usize) {
    for row in image.chunks_exact_mut(side) {
        row.reverse();
    }
}

/// A shuffle of `0..n` that depends only on `(seed, epoch)`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut epoch_rng(seed, epoch, STREAM_ORDER));
    order
}

/// `n` fair coin flips that depend only on `(seed, epoch)`: whether to mirror the image at
/// each position of the epoch.
pub fn flip_mask(n: usize, seed: u64, epoch: u64) -> Vec<bool> {
    let mut rng = epoch_rng(seed, epoch, STREAM_FLIP);
    (0..n).map(|_| rng.random_bool(0.5)).collect()
}

/// A generator keyed by `(seed, epoch, stream)`: the three numbers are laid side by side in
/// the 256-bit ChaCha key, so different triples always give different streams.
fn epoch_rng(seed: u64, epoch: u64, stream: u64) -> StdRng {
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&stream.to_le_bytes());
    StdRng::from_seed(key)
}
