//! The data layer: everything between MedNIST on disk and a normalised `f32` batch.
//!
//! What it is:
//! - [`mod@fetch`] downloads `MedNIST.tar.gz` (checking its md5) or imports a local copy;
//!   [`find_or_fetch_default_data`] finds `data/` or downloads into it (a plain `medcnn train`).
//! - [`load`] turns a folder of class folders, or the `.tar.gz` itself, into a [`Dataset`]:
//!   every image at the model's input size (64x64 8-bit gray by default), a label, a name and a sha256 of the file.
//!   [`folder`] and [`archive`] only *find* the files; [`decode`] turns bytes into pixels.
//! - [`split`] makes a seeded, stratified, duplicate-aware train/val/test [`Split`].
//! - [`batch`] turns a list of indices into an NCHW `f32` batch in `[-1, 1]`,
//!   with an optional left-right flip, and gives each epoch its seeded order.
//!
//! What it is not: it knows nothing of models, tensors or devices; a batch is a plain
//! `Vec<f32>`. Everything is held in memory (MedNIST is 58,954 x 4 KiB = 240 MiB of pixels).
//!
//! The usual path:
//! ```no_run
//! use medcnn::data;
//! let path = data::find_or_fetch_default_data(std::path::Path::new("data"))?;
//! let ds = data::load_dataset(&path, &data::LoadOptions::default())?;
//! let split = data::split_dataset(&ds, 42, [0.7, 0.2, 0.1]);
//! let order = data::epoch_order(split.train.len(), 42, 0);
//! let flips = data::flip_mask(order.len(), 42, 0);
//! let idx: Vec<usize> = order[..64].iter().map(|&i| split.train[i]).collect();
//! let (mut x, mut y) = (Vec::new(), Vec::new());
//! data::fill_batch(&ds, &idx, &flips[..64], &mut x, &mut y);
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod archive;
pub mod batch;
pub mod decode;
pub mod fetch;
pub mod folder;
pub mod load;
pub mod split;

pub use batch::{epoch_order, fill_batch, flip_mask, normalize_into};
pub use decode::{decode_image, decode_image_as, expand_channels, DecodeNote, InputShape, IMAGE_PIXELS, IMAGE_SIZE};
pub use fetch::{
    fetch, file_md5, find_or_fetch_default_data, import_archive, MEDNIST_MD5, MEDNIST_MD5_ENV, MEDNIST_URL,
    MEDNIST_URL_ENV,
};
pub use load::{find_default_data, fingerprint, load_data, load_dataset, Dataset, LoadOptions, LoadReport};
pub use split::{split_dataset, Split};
