//! Decoding one image file (JPEG or PNG bytes) into 64x64 8-bit gray pixels.
//!
//! What it is: a pure function from bytes to pixels, with limits so that a hostile file
//! (a "decompression bomb" claiming to be 100,000 x 100,000 pixels) is an error, not an
//! out-of-memory crash. Colour and 16-bit images are converted to 8-bit gray; other sizes are
//! resized. The caller learns which of the two happened through [`DecodeNote`].
//!
//! What it is not: it does not read files, walk folders or know about classes
//! (see `folder`, `archive` and `load`), and it does not normalise to floats (see `batch`).

use std::io::Cursor;

use anyhow::{bail, Result};
use image::imageops::{self, FilterType};
use image::{DynamicImage, GrayImage, ImageFormat, ImageReader, Limits};

/// Images are `IMAGE_SIZE` x `IMAGE_SIZE` 8-bit gray (MedNIST's native size).
pub const IMAGE_SIZE: usize = 64;
/// Pixels (and bytes) in one image: 64 * 64 = 4096.
pub const IMAGE_PIXELS: usize = IMAGE_SIZE * IMAGE_SIZE;

/// The largest width or height we agree to decode.
const MAX_DIMENSION: u32 = 8192;
/// The most memory the decoder may allocate for one image.
const MAX_ALLOC_BYTES: u64 = 256 * 1024 * 1024;

/// What [`decode_image`] had to do to get a 64x64 gray image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeNote {
    /// The file was colour (RGB/RGBA), had alpha, or was 16-bit: it was converted to 8-bit gray.
    pub converted_to_gray: bool,
    /// The file was not 64x64: it was resized (triangle filter).
    pub resized: bool,
}

/// Decodes JPEG or PNG `bytes` into `IMAGE_PIXELS` row-major gray pixels.
///
/// `name` is only used in error messages. The format is taken from the bytes themselves,
/// not the file name, so a text file called `x.jpeg` is reported as "not an image".
pub fn decode_image(bytes: &[u8], name: &str) -> Result<(Vec<u8>, DecodeNote)> {
    if bytes.is_empty() {
        bail!("{name}: file is empty (0 bytes), not an image");
    }
    let image = match decode_catching_panics(bytes) {
        Ok(image) => image,
        Err(e) if e.is::<TooLarge>() => bail!("{name}: {e}"),
        Err(e) => return Err(e.context(describe_undecodable(bytes, name))),
    };
    let (gray, converted_to_gray) = to_gray(image);
    let (gray, resized) = to_standard_size(gray);
    let note = DecodeNote { converted_to_gray, resized };
    Ok((gray.into_raw(), note))
}

/// A bug in a third-party decoder triggered by a hostile file should be an error for that
/// file, not a crash of the whole load, so a panic inside the decoder is caught here.
fn decode_catching_panics(bytes: &[u8]) -> Result<DynamicImage> {
    std::panic::catch_unwind(|| decode_with_limits(bytes))
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the image decoder crashed on this file")))
}

/// Runs the `image` crate's decoder with our size and memory limits.
fn decode_with_limits(bytes: &[u8]) -> Result<DynamicImage> {
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format()?;
    if reader.format().is_none() {
        bail!("not a JPEG or PNG image (unrecognised file signature)");
    }
    if reader.format() == Some(ImageFormat::Jpeg) {
        check_jpeg_complete(bytes)?;
    }
    reader.limits(decode_limits());
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => anyhow::Error::new(TooLarge { dimensions: claimed_dimensions(bytes) }),
        other => other.into(),
    })
}

/// A file over the decoder's limits: most likely a decompression bomb (a few bytes that claim
/// billions of pixels). Nothing was allocated for its pixels.
#[derive(Debug)]
struct TooLarge {
    dimensions: Option<(u32, u32)>,
}

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("image is too large to decode")?;
        if let Some((w, h)) = self.dimensions {
            write!(f, " ({w} x {h} pixels)")?;
        }
        write!(
            f,
            "; the limit is {MAX_DIMENSION} x {MAX_DIMENSION} pixels and {} MiB (a decompression bomb?)",
            MAX_ALLOC_BYTES >> 20
        )
    }
}

impl std::error::Error for TooLarge {}

/// The width and height the file's header claims (read without decoding any pixels).
fn claimed_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    ImageReader::new(Cursor::new(bytes)).with_guessed_format().ok()?.into_dimensions().ok()
}

/// The JPEG decoder is lenient: a file cut short decodes "successfully", with the missing
/// part filled in gray. A complete JPEG ends with the end-of-image marker `FF D9` (possibly
/// followed by zero padding), and that marker cannot occur inside the compressed data,
/// so checking the last bytes catches truncation.
fn check_jpeg_complete(bytes: &[u8]) -> Result<()> {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    if !bytes[..end].ends_with(&[0xFF, 0xD9]) {
        bail!("truncated JPEG: no end-of-image marker");
    }
    Ok(())
}

fn decode_limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_DIMENSION);
    limits.max_image_height = Some(MAX_DIMENSION);
    limits.max_alloc = Some(MAX_ALLOC_BYTES);
    limits
}

/// The headline of a decode error: the file name, plus a hint when the file is plainly text.
fn describe_undecodable(bytes: &[u8], name: &str) -> String {
    let head = &bytes[..bytes.len().min(64)];
    let looks_like_text = head.iter().all(|&b| b.is_ascii_graphic() || b.is_ascii_whitespace());
    if looks_like_text {
        format!("{name}: cannot decode image (the file looks like text, not a JPEG or PNG)")
    } else {
        format!("{name}: cannot decode image (corrupt, truncated, or not a JPEG/PNG)")
    }
}

/// Converts to 8-bit gray; the flag says whether any conversion was needed.
fn to_gray(image: DynamicImage) -> (GrayImage, bool) {
    match image {
        DynamicImage::ImageLuma8(gray) => (gray, false),
        other => (other.to_luma8(), true),
    }
}

/// Resizes to `IMAGE_SIZE` x `IMAGE_SIZE`; the flag says whether a resize was needed.
fn to_standard_size(gray: GrayImage) -> (GrayImage, bool) {
    let side = IMAGE_SIZE as u32;
    if gray.dimensions() == (side, side) {
        (gray, false)
    } else {
        (imageops::resize(&gray, side, side, FilterType::Triangle), true)
    }
}
