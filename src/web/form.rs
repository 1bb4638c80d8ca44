//! The file of an upload form (`multipart/form-data`, RFC 7578), parsed by multer from a body
//! already in memory (and so already bounded by the server's upload limit).
//!
//! What it is: which part holds the file (the first with a file name, else the one named
//! `file` or `image`, else the only part), its name and bytes, and an error in plain words for
//! a form that is malformed or cut short. At most [`MAX_PARTS`] parts and [`MAX_PART_HEAD`]
//! bytes of headers per part.
//!
//! What it is not: no streaming to disk, no other fields returned.

use std::convert::Infallible;

use axum::body::Bytes;

pub const MAX_PARTS: usize = 32;
pub const MAX_PART_HEAD: usize = 8 * 1024;

/// The uploaded file of a form.
#[derive(Debug, Clone, PartialEq)]
pub struct FormFile {
    /// The file name the browser sent, if any.
    pub filename: Option<String>,
    pub data: Bytes,
}

/// Whether a Content-Type is `multipart/form-data`.
pub fn is_multipart(content_type: &str) -> bool {
    content_type.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case("multipart/form-data")
}

/// The file part of the form in `body`; `Err` is a message for a 400.
pub async fn file_part(content_type: &str, body: Bytes) -> Result<Option<FormFile>, String> {
    let boundary = multer::parse_boundary(content_type)
        .map_err(|_| "multipart/form-data without a boundary parameter (or an invalid one)".to_string())?;
    let stream = futures_util::stream::once(async move { Ok::<Bytes, Infallible>(body) });
    let constraints =
        multer::Constraints::new().size_limit(multer::SizeLimit::new().whole_stream(u64::MAX).per_field(u64::MAX));
    let mut form = multer::Multipart::with_constraints(stream, boundary, constraints);
    // (name, file name, data) of every part, in order.
    let mut parts: Vec<(Option<String>, Option<String>, Bytes)> = Vec::new();
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(describe(e)),
        };
        if parts.len() == MAX_PARTS {
            return Err(format!("more than {MAX_PARTS} parts in the form"));
        }
        let head: usize = field.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
        if head > MAX_PART_HEAD {
            return Err(format!("a multipart part has more than {} KiB of headers", MAX_PART_HEAD >> 10));
        }
        let (name, filename) = (field.name().map(str::to_string), field.file_name().map(str::to_string));
        let data = field.bytes().await.map_err(describe)?;
        parts.push((name, filename, data));
    }
    let chosen = parts
        .iter()
        .position(|p| p.1.is_some())
        .or_else(|| parts.iter().position(|p| matches!(p.0.as_deref(), Some("file" | "image"))))
        .or(if parts.len() == 1 { Some(0) } else { None });
    Ok(chosen.map(|i| {
        let (_, filename, data) = parts.swap_remove(i);
        FormFile { filename, data }
    }))
}

/// multer's error in the words of someone who sent the form.
fn describe(e: multer::Error) -> String {
    use multer::Error as E;
    match e {
        E::IncompleteStream | E::IncompleteFieldData { .. } | E::IncompleteHeaders => {
            format!("the multipart body ends without its closing boundary (truncated upload?): {e}")
        }
        other => format!("malformed multipart form: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    fn form(boundary: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut b = Vec::new();
        for (name, file, data) in parts {
            b.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            match file {
                Some(f) => b.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: image/png\r\n\r\n")
                        .as_bytes(),
                ),
                None => b.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
            }
            b.extend_from_slice(data);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        b
    }

    #[test]
    fn picks_the_file_part() {
        let body = form("xyz", &[("note", None, b"hello"), ("file", Some("scan 1.png"), b"\x89PNG\r\n--xy\r\n")]);
        let f = run(file_part("multipart/form-data; boundary=xyz", body.into())).unwrap().unwrap();
        assert_eq!(f.filename.as_deref(), Some("scan 1.png"));
        assert_eq!(&f.data[..], b"\x89PNG\r\n--xy\r\n");
        // A quoted boundary; a part named "image" without a file name.
        let body = form("a b", &[("x", None, b"1"), ("image", None, b"data")]);
        let f = run(file_part("multipart/form-data; boundary=\"a b\"", body.into())).unwrap().unwrap();
        assert_eq!((f.filename, &f.data[..]), (None, &b"data"[..]));
    }

    #[test]
    fn refuses_malformed_forms() {
        assert!(run(file_part("multipart/form-data", Bytes::from_static(b"--x\r\n")))
            .unwrap_err()
            .contains("boundary"));
        let body = form("b0", &[("file", Some("a.png"), b"0123456789abcdef")]);
        let cut = Bytes::copy_from_slice(&body[..body.len() - 10]);
        assert!(run(file_part("multipart/form-data; boundary=b0", cut)).unwrap_err().contains("closing boundary"));
        let text = form("b1", &[("a", None, b"1"), ("b", None, b"2")]);
        assert_eq!(run(file_part("multipart/form-data; boundary=b1", text.into())), Ok(None));
        let many: Vec<(&str, Option<&str>, &[u8])> = (0..40).map(|_| ("a", None, &b"1"[..])).collect();
        assert!(run(file_part("multipart/form-data; boundary=m", form("m", &many).into()))
            .unwrap_err()
            .contains("more than 32 parts"));
        assert!(is_multipart("Multipart/Form-Data; boundary=x") && !is_multipart("image/png"));
    }
}
