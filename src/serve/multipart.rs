//! A small `multipart/form-data` parser (RFC 7578) over a body already in memory.
//!
//! What it is: the boundary from the Content-Type, then the parts as slices of the body (no
//! copies), each with its name, file name and content type. Bounded: at most [`MAX_PARTS`]
//! parts and [`MAX_PART_HEAD`] bytes of headers per part; the body itself was bounded by the
//! server before it got here.
//!
//! What it is not: no nested multipart, no `filename*=` (RFC 5987) names, no streaming.

use anyhow::{bail, ensure, Result};

pub const MAX_PARTS: usize = 32;
pub const MAX_PART_HEAD: usize = 8 * 1024;

/// One part of the form.
#[derive(Debug, PartialEq)]
pub struct Part<'a> {
    pub name: Option<String>,
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub data: &'a [u8],
}

/// Whether a Content-Type is `multipart/form-data`.
pub fn is_multipart(content_type: &str) -> bool {
    media_type(content_type).eq_ignore_ascii_case("multipart/form-data")
}

fn media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or_default().trim()
}

/// The `boundary` parameter of a `multipart/form-data` Content-Type.
pub fn boundary(content_type: &str) -> Result<String> {
    ensure!(is_multipart(content_type), "not multipart/form-data: {content_type:?}");
    let b = params(content_type)
        .into_iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v)
        .unwrap_or_default();
    ensure!(!b.is_empty(), "multipart/form-data without a boundary parameter");
    ensure!(b.len() <= 70, "multipart boundary longer than 70 characters");
    ensure!(b.bytes().all(|c| (0x20..0x7f).contains(&c)), "multipart boundary with non-ASCII characters");
    Ok(b)
}

/// The `key=value` parameters after the first `;` of a header value; values may be quoted.
fn params(value: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let b = value.as_bytes();
    // Skip the media type / disposition type.
    let mut i = match value.find(';') {
        Some(i) => i + 1,
        None => return out,
    };
    while i < b.len() {
        while i < b.len() && (b[i] == b' ' || b[i] == b'\t' || b[i] == b';') {
            i += 1;
        }
        let k0 = i;
        while i < b.len() && b[i] != b'=' && b[i] != b';' {
            i += 1;
        }
        let key = value[k0..i].trim().to_string();
        if i >= b.len() || b[i] == b';' {
            if !key.is_empty() {
                out.push((key, String::new()));
            }
            continue;
        }
        i += 1; // '='
        let mut val = String::new();
        if i < b.len() && b[i] == b'"' {
            i += 1;
            let mut raw = Vec::new();
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                raw.push(b[i]);
                i += 1;
            }
            i += 1; // closing quote
            val = String::from_utf8_lossy(&raw).into_owned();
        } else {
            let v0 = i;
            while i < b.len() && b[i] != b';' {
                i += 1;
            }
            val.push_str(value[v0..i].trim());
        }
        out.push((key, val));
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        match hay[i..=hay.len() - needle.len()].iter().position(|&c| c == first) {
            None => return None,
            Some(k) => i += k,
        }
        if &hay[i..i + needle.len()] == needle {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Splits `body` into its parts.
pub fn parse<'a>(body: &'a [u8], boundary: &str) -> Result<Vec<Part<'a>>> {
    let delim = [b"--", boundary.as_bytes()].concat();
    let next_delim = [b"\r\n--", boundary.as_bytes()].concat();
    // The first delimiter opens the body or follows a preamble's CRLF.
    let mut pos = if body.starts_with(&delim) {
        0
    } else {
        match find(body, &next_delim) {
            Some(i) => i + 2,
            None => bail!("the multipart body does not contain its boundary"),
        }
    };
    let mut parts = Vec::new();
    loop {
        let mut p = pos + delim.len();
        if body[p..].starts_with(b"--") {
            return Ok(parts); // the closing delimiter; an epilogue after it is ignored
        }
        while p < body.len() && (body[p] == b' ' || body[p] == b'\t') {
            p += 1;
        }
        ensure!(body[p..].starts_with(b"\r\n"), "malformed multipart delimiter line");
        p += 2;
        ensure!(parts.len() < MAX_PARTS, "more than {MAX_PARTS} parts in the form");
        // Headers end at a blank line (right away when the part has no headers).
        let (head, data_start) = if body[p..].starts_with(b"\r\n") {
            ("", p + 2)
        } else {
            let window = &body[p..body.len().min(p + MAX_PART_HEAD + 4)];
            let Some(end) = find(window, b"\r\n\r\n") else {
                bail!("a multipart part has no end of headers within {} KiB", MAX_PART_HEAD >> 10)
            };
            let head = std::str::from_utf8(&body[p..p + end])
                .map_err(|_| anyhow::anyhow!("multipart headers are not UTF-8"))?;
            (head, p + end + 4)
        };
        let Some(len) = find(&body[data_start..], &next_delim) else {
            bail!("the multipart body ends without its closing boundary (truncated upload?)")
        };
        let mut part =
            Part { name: None, filename: None, content_type: None, data: &body[data_start..data_start + len] };
        for line in head.split("\r\n").filter(|l| !l.is_empty()) {
            let Some((k, v)) = line.split_once(':') else { bail!("malformed multipart header line") };
            if k.trim().eq_ignore_ascii_case("Content-Disposition") {
                for (pk, pv) in params(v) {
                    if pk.eq_ignore_ascii_case("name") {
                        part.name = Some(pv);
                    } else if pk.eq_ignore_ascii_case("filename") {
                        part.filename = Some(pv);
                    }
                }
            } else if k.trim().eq_ignore_ascii_case("Content-Type") {
                part.content_type = Some(v.trim().to_string());
            }
        }
        parts.push(part);
        pos = data_start + len + 2;
    }
}

/// The part that holds the uploaded file: the first with a file name, else the one named
/// `file` or `image`, else the only part.
pub fn file_part<'a, 'b>(parts: &'b [Part<'a>]) -> Option<&'b Part<'a>> {
    parts
        .iter()
        .find(|p| p.filename.is_some())
        .or_else(|| parts.iter().find(|p| matches!(p.name.as_deref(), Some("file" | "image"))))
        .or(if parts.len() == 1 { parts.first() } else { None })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn boundaries_quoted_or_not() {
        assert_eq!(boundary("multipart/form-data; boundary=abc123").unwrap(), "abc123");
        assert_eq!(boundary("Multipart/Form-Data; charset=utf-8; boundary=\"a b;c\"").unwrap(), "a b;c");
        assert!(boundary("multipart/form-data").is_err());
        assert!(boundary("image/png").is_err());
        assert!(boundary(&format!("multipart/form-data; boundary={}", "x".repeat(71))).is_err());
    }

    #[test]
    fn parts_with_binary_data_that_looks_like_a_boundary() {
        let data: &[u8] = b"\x89PNG\r\n--not-the-boundary\r\n\r\n\x00\xff";
        let body = form("XyZ", &[("note", None, b"hello"), ("file", Some(r#"scan \"1\".png"#), data)]);
        let parts = parse(&body, "XyZ").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name.as_deref(), Some("note"));
        assert_eq!(parts[0].data, b"hello");
        assert_eq!(parts[1].filename.as_deref(), Some("scan \"1\".png"));
        assert_eq!(parts[1].content_type.as_deref(), Some("image/png"));
        assert_eq!(parts[1].data, data);
        assert_eq!(file_part(&parts).unwrap().data, data);
    }

    #[test]
    fn preamble_empty_parts_and_missing_end() {
        let mut body = b"preamble\r\n".to_vec();
        body.extend(form("b", &[("image", None, b"")]));
        let parts = parse(&body, "b").unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].data, b"");
        assert_eq!(file_part(&parts).unwrap().name.as_deref(), Some("image"));

        let full = form("b", &[("file", Some("a.png"), b"12345")]);
        let cut = &full[..full.len() - 12];
        assert!(parse(cut, "b").unwrap_err().to_string().contains("closing boundary"));
        assert!(parse(b"no boundary here", "b").is_err());
        assert!(parse(b"--b\r\nContent-Disposition: form-data", "b").is_err());
    }

    #[test]
    fn too_many_parts_are_refused() {
        let many: Vec<(&str, Option<&str>, &[u8])> = (0..MAX_PARTS + 1).map(|_| ("x", None, &b"1"[..])).collect();
        assert!(parse(&form("q", &many), "q").unwrap_err().to_string().contains("parts"));
        let two = form("q", &[("a", None, b"1"), ("b", None, b"2")]);
        assert!(file_part(&parse(&two, "q").unwrap()).is_none());
    }
}
