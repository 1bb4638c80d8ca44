//! Decoding one image file (JPEG or PNG bytes) into the model's input pixels: 8-bit, square,
//! one channel (gray) or three (RGB, planar). The default is MedNIST's 64x64 gray.
//!
//! What it is: a pure function from bytes to pixels, with limits so that a hostile file
//! (a "decompression bomb" claiming to be 100,000 x 100,000 pixels) is an error, not an
//! out-of-memory crash. For a one-channel model colour and 16-bit images are converted to 8-bit
//! gray; for a three-channel model a colour image keeps its colours and a gray one stays one
//! plane (the batch repeats it into three equal channels). Other sizes are resized. The caller
//! learns what happened through [`DecodeNote`].
//!
//! What it is not: it does not read files, walk folders or know about classes
//! (see `folder`, `archive` and `load`), and it does not normalise to floats (see `batch`).

use std::io::Cursor;

use anyhow::{bail, Result};
use image::imageops::{self, FilterType};
use image::{DynamicImage, GrayImage, ImageFormat, ImageReader, Limits, RgbImage};
use serde::{Deserialize, Serialize};

/// The default input: `IMAGE_SIZE` x `IMAGE_SIZE` 8-bit gray (MedNIST's native size).
pub const IMAGE_SIZE: usize = 64;
/// Pixels (and bytes) in one default image: 64 * 64 = 4096.
pub const IMAGE_PIXELS: usize = IMAGE_SIZE * IMAGE_SIZE;

/// The largest `--image-size` accepted (a 1024 x 1024 x 3 image is 12 MiB as f32).
pub const MAX_INPUT_SIZE: usize = 1024;

/// What a model takes: `channels` planes (1 = gray, 3 = RGB) of `size` x `size` pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InputShape {
    pub channels: usize,
    pub size: usize,
}

impl Default for InputShape {
    /// MedNIST's 64x64 gray.
    fn default() -> Self {
        InputShape { channels: 1, size: IMAGE_SIZE }
    }
}

impl InputShape {
    /// Checks the shape a user asked for, naming the flag.
    pub fn new(channels: usize, size: usize) -> Result<InputShape> {
        if channels != 1 && channels != 3 {
            bail!("--channels must be 1 (gray) or 3 (RGB), got {channels}");
        }
        if !(1..=MAX_INPUT_SIZE).contains(&size) {
            bail!("--image-size must be between 1 and {MAX_INPUT_SIZE}, got {size}");
        }
        Ok(InputShape { channels, size })
    }
    /// Pixels of one plane.
    pub fn plane(&self) -> usize {
        self.size * self.size
    }
    /// Values of one normalised input image: channels * size * size.
    pub fn len(&self) -> usize {
        self.channels * self.plane()
    }
    /// The per-image shape `[C, H, W]`.
    pub fn chw(&self) -> [usize; 3] {
        [self.channels, self.size, self.size]
    }
}

impl std::fmt::Display for InputShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.channels == 1 { "gray" } else { "RGB" };
        write!(f, "{}x{} {kind}", self.size, self.size)
    }
}

/// The largest width or height we agree to decode.
const MAX_DIMENSION: u32 = 8192;
/// The most memory the decoder may allocate for one image.
const MAX_ALLOC_BYTES: u64 = 256 * 1024 * 1024;

/// What [`decode_image`] had to do to get the model's input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeNote {
    /// The file was colour (RGB/RGBA), had alpha, or was 16-bit, and the model takes gray: it
    /// was converted to 8-bit gray.
    pub converted_to_gray: bool,
    /// The file was not the model's size: it was resized (triangle filter).
    pub resized: bool,
    /// The pixels returned are three planes (R, G, B) rather than one gray plane: only for a
    /// three-channel model and a colour file.
    pub colour: bool,
}

/// Decodes JPEG or PNG `bytes` into `IMAGE_PIXELS` row-major gray pixels (the default input).
///
/// `name` is only used in error messages. The format is taken from the bytes themselves,
/// not the file name, so a text file called `x.jpeg` is reported as "not an image".
pub fn decode_image(bytes: &[u8], name: &str) -> Result<(Vec<u8>, DecodeNote)> {
    decode_image_as(bytes, name, InputShape::default())
}

/// Decodes `bytes` for a model taking `shape`: `size` x `size`, row-major, one gray plane, or
/// (three channels and a colour file; `note.colour` says so) three planes R, G, B.
/// A gray file for a three-channel model stays one plane: [`expand_channels`] repeats it.
pub fn decode_image_as(bytes: &[u8], name: &str, shape: InputShape) -> Result<(Vec<u8>, DecodeNote)> {
    let image = decode_file(bytes, name)?;
    let side = shape.size as u32;
    let resized = image.width() != side || image.height() != side;
    if shape.channels == 3 && is_colour(&image) {
        let rgb = image.to_rgb8();
        let rgb = if resized { imageops::resize(&rgb, side, side, FilterType::Triangle) } else { rgb };
        let note = DecodeNote { converted_to_gray: false, resized, colour: true };
        return Ok((planar(&rgb), note));
    }
    let (gray, converted_to_gray) = to_gray(image);
    let gray = if resized { imageops::resize(&gray, side, side, FilterType::Triangle) } else { gray };
    // A gray-with-alpha or 16-bit gray file read for a three-channel model is still gray.
    let converted_to_gray = converted_to_gray && shape.channels == 1;
    Ok((gray.into_raw(), DecodeNote { converted_to_gray, resized, colour: false }))
}

/// Repeats one gray plane into `channels` equal planes (a gray image for an RGB model).
pub fn expand_channels(gray: &[u8], channels: usize) -> Vec<u8> {
    gray.repeat(channels)
}

/// True for files with colour channels (RGB, RGBA, in 8 or 16 bits).
fn is_colour(image: &DynamicImage) -> bool {
    image.color().has_color()
}

/// Interleaved RGB (HWC) to three planes R, G, B (CHW), the layout of the model's input.
fn planar(rgb: &RgbImage) -> Vec<u8> {
    let plane = (rgb.width() * rgb.height()) as usize;
    let mut out = vec![0u8; 3 * plane];
    for (i, p) in rgb.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = p.0[c];
        }
    }
    out
}

/// The decoded file, any size and colour type; errors name the file.
fn decode_file(bytes: &[u8], name: &str) -> Result<DynamicImage> {
    if bytes.is_empty() {
        bail!("{name}: file is empty (0 bytes), not an image");
    }
    let image = match decode_catching_panics(bytes) {
        Ok(image) => image,
        Err(e) if e.is::<TooLarge>() => bail!("{name}: {e}"),
        Err(e) => return Err(e.context(describe_undecodable(bytes, name))),
    };
    Ok(image)
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
