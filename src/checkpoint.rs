//! Saving and loading weights: `model.safetensors` (the weights PyTorch can load, plus what
//! evaluation needs) and `checkpoint.safetensors` (everything `--resume` needs to continue
//! exactly: weights, Adam moments, position in the run, split, metrics so far).
//!
//! Both are safetensors files (f32 tensors, string metadata). The metadata carries a format
//! name, a version and a sha256 over every metadata entry and every tensor byte, so a truncated,
//! bit-flipped or foreign file is refused with a message instead of being half-loaded. Files are
//! written atomically (`.tmp`, fsync, rename): a crash mid-write leaves the previous file intact.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use crate::backend::NamedTensor;

pub const MODEL_FORMAT: &str = "medcnn-model";
pub const CHECKPOINT_FORMAT: &str = "medcnn-checkpoint";
pub const FORMAT_VERSION: &str = "1";

/// Writes `tensors` and `metadata` (plus format, version and checksum) to `path` atomically.
pub fn save(path: &Path, format: &str, tensors: &[NamedTensor], metadata: &BTreeMap<String, String>) -> Result<()> {
    let mut meta = metadata.clone();
    meta.insert("format".into(), format.into());
    meta.insert("format_version".into(), FORMAT_VERSION.into());
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| t.data.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
    meta.insert(
        "checksum".into(),
        checksum(&meta, tensors.iter().map(|t| (t.name.as_str(), t.shape.as_slice())).zip(&bytes)),
    );
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| Ok((t.name.clone(), TensorView::new(Dtype::F32, t.shape.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let file = safetensors::serialize(views, Some(meta.into_iter().collect::<HashMap<_, _>>()))
        .with_context(|| format!("serialising {}", path.display()))?;
    crate::metrics::write_atomic(path, &file)
}

/// Reads a file written by `save`, checking format, version and checksum. Tensors come back in
/// the order `names` gives (every name must be present, no others).
pub fn load(path: &Path, format: &str, names: &[String]) -> Result<(Vec<NamedTensor>, BTreeMap<String, String>)> {
    load_with(path, format, |_| Ok(names.to_vec()))
}

/// `load` for files whose tensor names depend on their metadata (the model spec stored in it):
/// `names` gets the metadata once format and version are checked (the checksum is checked after,
/// so what `names` derives is trusted only once the whole file is).
pub fn load_with(
    path: &Path,
    format: &str,
    names: impl FnOnce(&BTreeMap<String, String>) -> Result<Vec<String>>,
) -> Result<(Vec<NamedTensor>, BTreeMap<String, String>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let bad = |what: String| anyhow!("{}: {what}", path.display());
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a readable safetensors file (truncated or corrupt?): {e}")))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("unreadable header: {e}")))?;
    let meta: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();
    match meta.get("format").map(String::as_str) {
        Some(f) if f == format => {}
        Some(f) => bail!(bad(format!("is a {f} file, expected a {format} file"))),
        None => bail!(bad(format!("is not a medcnn file (no format entry); expected a {format} file"))),
    }
    match meta.get("format_version").map(String::as_str) {
        Some(FORMAT_VERSION) => {}
        v => bail!(bad(format!("has format version {v:?}, this medcnn reads version {FORMAT_VERSION}"))),
    }
    let names = &names(&meta)?;

    let mut tensors = Vec::with_capacity(names.len());
    let mut raw = Vec::with_capacity(names.len());
    for name in names {
        let view =
            st.tensor(name).map_err(|_| bad(format!("has no tensor {name} (another architecture or class count?)")))?;
        if view.dtype() != Dtype::F32 {
            bail!(bad(format!("tensor {name} is {:?}, expected F32", view.dtype())));
        }
        let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        tensors.push(NamedTensor { name: name.clone(), shape: view.shape().to_vec(), data });
        raw.push(view.data().to_vec());
    }
    if st.len() != names.len() {
        let extra = st.names().into_iter().find(|n| !names.iter().any(|m| m == n)).unwrap_or_default().to_string();
        bail!(bad(format!("has unexpected tensor {extra} (another architecture?)")));
    }
    let stored = meta.get("checksum").cloned().ok_or_else(|| bad("has no checksum".into()))?;
    let mut rest = meta.clone();
    rest.remove("checksum");
    let actual = checksum(&rest, tensors.iter().map(|t| (t.name.as_str(), t.shape.as_slice())).zip(&raw));
    if actual != stored {
        bail!(bad(format!("checksum mismatch (stored {stored}, computed {actual}): the file is corrupt")));
    }
    Ok((tensors, rest))
}

/// sha256 over the metadata (sorted by key, minus the checksum itself) and the tensors in order.
fn checksum<'a>(
    meta: &BTreeMap<String, String>,
    tensors: impl Iterator<Item = ((&'a str, &'a [usize]), &'a Vec<u8>)>,
) -> String {
    let mut h = Sha256::new();
    for (k, v) in meta.iter().filter(|(k, _)| k.as_str() != "checksum") {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(v.as_bytes());
        h.update([0]);
    }
    for ((name, shape), data) in tensors {
        h.update(name.as_bytes());
        h.update([0]);
        for d in shape {
            h.update((*d as u64).to_le_bytes());
        }
        h.update(data);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A metadata entry parsed from JSON, with an error naming the file and key.
pub fn meta_json<T: serde::de::DeserializeOwned>(meta: &BTreeMap<String, String>, key: &str, path: &Path) -> Result<T> {
    let v = meta.get(key).ok_or_else(|| anyhow!("{}: missing metadata entry {key}", path.display()))?;
    serde_json::from_str(v).with_context(|| format!("{}: metadata entry {key} is malformed", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resumed run reads its metrics history back from the checkpoint's JSON, and the resume
    /// tests compare it bit for bit with an uninterrupted run's. serde_json's default float
    /// parser is off by one ulp on some values: 1.0442128604848577 (an epoch's real validation
    /// loss) came back as 1.0442128604848575 before `float_roundtrip` was turned on.
    #[test]
    fn floats_in_metadata_come_back_bit_for_bit() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut values = vec![f64::from_bits(4607381535822021997), 0.1, 1.0 / 3.0, 5e-324, f64::MAX];
        for _ in 0..10_000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let v = f64::from_bits(seed >> 2); // positive, finite, every exponent up to 2^511
            values.push(v);
        }
        let mut meta = BTreeMap::new();
        meta.insert("v".to_string(), serde_json::to_string(&values).unwrap());
        let back: Vec<f64> = meta_json(&meta, "v", Path::new("test.safetensors")).unwrap();
        for (a, b) in values.iter().zip(&back) {
            assert_eq!(a.to_bits(), b.to_bits(), "{a:e} came back as {b:e}");
        }
    }
}
