//! Parsing and full validation of one safetensors header. Nothing downstream re-checks offsets,
//! so every rule that keeps a later slice in bounds lives here.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Headers larger than this are refused: a corrupt length must not make us allocate gigabytes.
pub const MAX_HEADER_LEN: u64 = 100 * 1024 * 1024;

/// One validated tensor entry; `start..end` are byte offsets relative to the data section.
#[derive(Clone, Debug)]
pub struct Entry {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// A validated header: the tensors, the optional `__metadata__`, and where data begins.
#[derive(Clone, Debug)]
pub struct Header {
    pub tensors: BTreeMap<String, Entry>,
    pub metadata: BTreeMap<String, String>,
    pub data_start: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Parses and validates the header of a safetensors file held in `bytes`.
/// `file` names the file in errors.
pub fn parse(file: &str, bytes: &[u8]) -> Result<Header> {
    if bytes.len() < 8 {
        return Err(Error::header(
            file,
            format!(
                "file is {} bytes, shorter than the 8-byte length prefix",
                bytes.len()
            ),
        ));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let avail = bytes.len() as u64 - 8;
    if n > avail || n > MAX_HEADER_LEN {
        return Err(Error::header(
            file,
            format!("header length {n} exceeds the file ({avail} bytes after the prefix) or the {MAX_HEADER_LEN}-byte limit"),
        ));
    }
    let data_start = 8 + n as usize;
    let data_len = bytes.len() - data_start;
    let text = std::str::from_utf8(&bytes[8..data_start])
        .map_err(|e| Error::header(file, format!("header is not UTF-8: {e}")))?;
    let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text.trim_end())
        .map_err(|e| Error::header(file, format!("header is not a JSON object: {e}")))?;

    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, value) in obj {
        if name == "__metadata__" {
            metadata = serde_json::from_value(value).map_err(|e| {
                Error::header(
                    file,
                    format!("__metadata__ must map strings to strings: {e}"),
                )
            })?;
            continue;
        }
        let raw: RawEntry = serde_json::from_value(value)
            .map_err(|e| Error::tensor(file, &name, format!("malformed entry: {e}")))?;
        let entry = validate_entry(file, &name, raw, data_len)?;
        tensors.insert(name, entry);
    }
    check_overlaps(file, &tensors)?;
    Ok(Header {
        tensors,
        metadata,
        data_start,
    })
}

fn validate_entry(file: &str, name: &str, raw: RawEntry, data_len: usize) -> Result<Entry> {
    let dtype = DType::parse(&raw.dtype)
        .ok_or_else(|| Error::tensor(file, name, format!("unknown dtype '{}'", raw.dtype)))?;
    let (start, end) = raw.data_offsets;
    if start > end || end > data_len as u64 {
        return Err(Error::tensor(
            file,
            name,
            format!("data offsets [{start}, {end}] outside the {data_len}-byte data section"),
        ));
    }
    let mut numel: u64 = 1;
    for &d in &raw.shape {
        numel = numel
            .checked_mul(d)
            .ok_or_else(|| Error::tensor(file, name, "shape overflows"))?;
    }
    let expected = numel
        .checked_mul(dtype.size() as u64)
        .ok_or_else(|| Error::tensor(file, name, "shape overflows"))?;
    if end - start != expected {
        return Err(Error::tensor(
            file,
            name,
            format!(
                "{} bytes stored but shape {:?} of {} needs {expected}",
                end - start,
                raw.shape,
                dtype.name()
            ),
        ));
    }
    Ok(Entry {
        dtype,
        shape: raw.shape.iter().map(|&d| d as usize).collect(),
        start: start as usize,
        end: end as usize,
    })
}

fn check_overlaps(file: &str, tensors: &BTreeMap<String, Entry>) -> Result<()> {
    let mut spans: Vec<(&str, &Entry)> = tensors
        .iter()
        .filter(|(_, e)| e.end > e.start)
        .map(|(n, e)| (n.as_str(), e))
        .collect();
    spans.sort_by_key(|(_, e)| e.start);
    for w in spans.windows(2) {
        if w[1].1.start < w[0].1.end {
            return Err(Error::tensor(
                file,
                w[1].0,
                format!("data overlaps tensor '{}'", w[0].0),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(header: &str, data: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.resize(v.len() + data, 0);
        v
    }

    #[test]
    fn accepts_valid_header() {
        let f = file_with(
            r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[],"data_offsets":[8,10]}}"#,
            10,
        );
        let h = parse("f", &f).unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.metadata["format"], "pt");
        assert_eq!(h.tensors["b"].shape, Vec::<usize>::new());
    }

    #[test]
    fn rejects_bad_headers() {
        let cases = [
            (vec![1, 2, 3], "shorter"),
            (u64::MAX.to_le_bytes().to_vec(), "exceeds"),
            (file_with("{not json", 0), "JSON"),
            (
                file_with(
                    r#"{"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}}"#,
                    1,
                ),
                "unknown dtype",
            ),
            (
                file_with(
                    r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,8]}}"#,
                    4,
                ),
                "outside",
            ),
            (
                file_with(
                    r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                    8,
                ),
                "needs 12",
            ),
            (
                file_with(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                    8,
                ),
                "overlaps",
            ),
        ];
        for (bytes, needle) in cases {
            let err = parse("file.safetensors", &bytes).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} lacks {needle}");
            assert!(err.contains("file.safetensors"), "{err}");
        }
    }
}
