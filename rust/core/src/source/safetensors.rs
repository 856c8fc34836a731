//! Parsing and full validation of one safetensors header (and the compact tensor table every
//! input format produces, [`Header`]). Nothing downstream re-checks offsets,
//! so every rule that keeps a later slice in bounds lives here.
//!
//! The rules are the safetensors library's: exact dtype names, tensor data that tiles the data
//! section with no gap, overlap or trailing byte, unknown per-tensor fields ignored,
//! `"__metadata__": null` allowed. Stricter where a loader would be left guessing: duplicate
//! tensor names and dimensions beyond torch's i64 are refused.
//!
//! Headers can hold millions of entries, so the parse streams the JSON straight into compact
//! tables (names and shapes in two arenas, 40 bytes per entry): memory stays within about
//! twice the header's own size, with no intermediate JSON tree.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{DeserializeSeed, MapAccess, Visitor};
use serde::Deserialize;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Headers larger than this are refused: a corrupt length must not make us allocate gigabytes.
pub const MAX_HEADER_LEN: u64 = 100 * 1024 * 1024;

/// One validated tensor entry, as stored.
#[derive(Clone, Copy, Debug)]
struct Slot {
    dtype: DType,
    name: (u32, u32),
    shape: (u32, u32),
    start: usize,
    end: usize,
}

/// One validated tensor entry; `start..end` are byte offsets relative to the data section.
#[derive(Clone, Copy, Debug)]
pub struct Entry<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub start: usize,
    pub end: usize,
}

/// A validated header: the tensors (sorted by name), the `__metadata__`, and where data begins.
#[derive(Clone, Debug, Default)]
pub struct Header {
    names: String,
    shapes: Vec<usize>,
    slots: Vec<Slot>,
    pub metadata: BTreeMap<String, String>,
    pub data_start: usize,
}

impl Header {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn name_of(&self, s: &Slot) -> &str {
        &self.names[s.name.0 as usize..(s.name.0 + s.name.1) as usize]
    }

    fn entry_of(&self, s: &Slot) -> Entry<'_> {
        Entry {
            dtype: s.dtype,
            shape: &self.shapes[s.shape.0 as usize..(s.shape.0 + s.shape.1) as usize],
            start: s.start,
            end: s.end,
        }
    }

    /// The entries in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Entry<'_>)> {
        self.slots
            .iter()
            .map(|s| (self.name_of(s), self.entry_of(s)))
    }

    pub fn get(&self, name: &str) -> Option<Entry<'_>> {
        self.slots
            .binary_search_by(|s| self.name_of(s).cmp(name))
            .ok()
            .map(|i| self.entry_of(&self.slots[i]))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

#[derive(Deserialize)]
struct RawEntry<'a> {
    #[serde(borrow)]
    dtype: Cow<'a, str>,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Streams the header's top-level object into a [`Header`]; the first semantic problem is kept
/// in `problem` (serde's own errors know no file or tensor).
struct Build<'f> {
    file: &'f str,
    data_len: usize,
    header: Header,
    problem: Option<Error>,
}

impl<'de> Visitor<'de> for &mut Build<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of tensor entries")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        use serde::de::Error as _;
        let mut seen_metadata = false;
        while let Some(name) = map.next_key::<Cow<'de, str>>()? {
            if name == "__metadata__" {
                if seen_metadata {
                    self.problem = Some(Error::header(self.file, "__metadata__ appears twice"));
                    return Err(A::Error::custom("stop"));
                }
                seen_metadata = true;
                match map.next_value::<Option<BTreeMap<String, String>>>() {
                    Ok(m) => self.header.metadata = m.unwrap_or_default(),
                    Err(e) => {
                        self.problem = Some(Error::header(
                            self.file,
                            format!("__metadata__ must map strings to strings: {e}"),
                        ));
                        return Err(e);
                    }
                }
                continue;
            }
            let raw = match map.next_value::<RawEntry>() {
                Ok(r) => r,
                Err(e) => {
                    self.problem = Some(Error::tensor(
                        self.file,
                        &name,
                        format!("malformed entry: {e}"),
                    ));
                    return Err(e);
                }
            };
            if let Err(e) = self.push(&name, raw) {
                self.problem = Some(e);
                return Err(A::Error::custom("stop"));
            }
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for &mut Build<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl Build<'_> {
    fn push(&mut self, name: &str, raw: RawEntry) -> Result<()> {
        let file = self.file;
        let dtype = DType::parse_exact(&raw.dtype)
            .ok_or_else(|| Error::tensor(file, name, format!("unknown dtype '{}'", raw.dtype)))?;
        let (start, end) = raw.data_offsets;
        if start > end {
            return Err(Error::tensor(
                file,
                name,
                format!("data offsets [{start}, {end}] end before they start"),
            ));
        }
        if end > self.data_len as u64 {
            return Err(Error::tensor(
                file,
                name,
                format!(
                    "data offsets [{start}, {end}] outside the {}-byte data section",
                    self.data_len
                ),
            ));
        }
        // Like safetensors: the product of the dimensions must not overflow (a zero dimension
        // makes it 0 whatever follows); and like torch, every dimension must fit an i64.
        let mut numel: u64 = 1;
        for &d in &raw.shape {
            if d > i64::MAX as u64 {
                return Err(Error::tensor(
                    file,
                    name,
                    format!("dimension {d} exceeds the i64 range"),
                ));
            }
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
        let h = &mut self.header;
        let at = |v: usize| u32::try_from(v).map_err(|_| Error::header(file, "header too large"));
        let slot = Slot {
            dtype,
            name: (at(h.names.len())?, at(name.len())?),
            shape: (at(h.shapes.len())?, at(raw.shape.len())?),
            start: start as usize,
            end: end as usize,
        };
        h.names.push_str(name);
        h.shapes.extend(raw.shape.iter().map(|&d| d as usize));
        h.slots.push(slot);
        Ok(())
    }

    /// Name order and no duplicates.
    fn sorted_unique(mut self) -> Result<Header> {
        let mut h = std::mem::take(&mut self.header);
        let names = std::mem::take(&mut h.names);
        let name = |s: &Slot| &names[s.name.0 as usize..(s.name.0 + s.name.1) as usize];
        h.slots.sort_unstable_by(|a, b| name(a).cmp(name(b)));
        if let Some(w) = h.slots.windows(2).find(|w| name(&w[0]) == name(&w[1])) {
            return Err(Error::tensor(self.file, name(&w[0]), "appears twice"));
        }
        h.names = names;
        h.names.shrink_to_fit();
        h.shapes.shrink_to_fit();
        h.slots.shrink_to_fit();
        Ok(h)
    }

    /// Name order, no duplicates, and data that tiles `data_len` bytes exactly.
    fn finish(self) -> Result<Header> {
        let (file, data_len) = (self.file, self.data_len);
        let h = self.sorted_unique()?;
        let name = |s: &Slot| &h.names[s.name.0 as usize..(s.name.0 + s.name.1) as usize];
        let mut order: Vec<u32> = (0..h.slots.len() as u32).collect();
        order.sort_unstable_by_key(|&i| (h.slots[i as usize].start, h.slots[i as usize].end));
        let mut at = 0usize;
        for &i in &order {
            let s = &h.slots[i as usize];
            if s.start != at {
                let what = if s.start > at {
                    "leaves a gap before it"
                } else {
                    "overlaps another tensor"
                };
                return Err(Error::tensor(
                    file,
                    name(s),
                    format!(
                        "data at [{}, {}] {what} (the data section must be tensors back to back)",
                        s.start, s.end
                    ),
                ));
            }
            at = s.end;
        }
        if at != data_len {
            return Err(Error::header(
                file,
                format!("the tensors' data ends at byte {at} of a {data_len}-byte data section (trailing bytes)"),
            ));
        }
        Ok(h)
    }
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
    let mut build = Build {
        file,
        data_len,
        header: Header::default(),
        problem: None,
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = (&mut build).deserialize(&mut de).and_then(|()| de.end());
    if let Err(e) = parsed {
        return Err(build
            .problem
            .take()
            .unwrap_or_else(|| Error::header(file, format!("header is not a JSON object: {e}"))));
    }
    let mut h = build.finish()?;
    h.data_start = data_start;
    Ok(h)
}
impl Header {
    /// A table built by another format's reader (`rows`: name, dtype, shape, byte range within
    /// the file). Unlike a safetensors data section, ranges may overlap (tied tensors share a
    /// storage) and leave gaps; each must lie inside the file and match its shape.
    pub fn from_table(
        file: &str,
        rows: Vec<(String, DType, Vec<u64>, u64, u64)>,
        file_len: usize,
        metadata: BTreeMap<String, String>,
    ) -> Result<Header> {
        let mut build = Build {
            file,
            data_len: file_len,
            header: Header::default(),
            problem: None,
        };
        for (name, dtype, shape, start, end) in rows {
            build.push(
                &name,
                RawEntry {
                    dtype: Cow::Borrowed(dtype.name()),
                    shape,
                    data_offsets: (start, end),
                },
            )?;
        }
        let mut h = build.sorted_unique()?;
        h.metadata = metadata;
        Ok(h)
    }
}

/// Parses `bytes` and panics if an accepted header breaks a rule the readers rely on (every
/// tensor inside the data section, sizes matching shapes, names sorted and unique). The fuzz
/// target and the corpus replay test call this.
#[doc(hidden)]
pub fn check_accepted(bytes: &[u8]) {
    let Ok(h) = parse("fuzz", bytes) else { return };
    assert!(h.data_start >= 8 && h.data_start <= bytes.len());
    let data_len = bytes.len() - h.data_start;
    let mut spans = Vec::new();
    let mut last: Option<&str> = None;
    for (name, e) in h.iter() {
        if let Some(l) = last {
            assert!(l < name, "names sorted and unique");
        }
        last = Some(name);
        assert!(
            e.start <= e.end && e.end <= data_len,
            "{name} inside the data"
        );
        let numel: usize = e.shape.iter().product();
        assert_eq!(numel * e.dtype.size(), e.end - e.start, "{name} size");
        assert_eq!(h.get(name).map(|g| g.start), Some(e.start));
        spans.push((e.start, e.end));
    }
    spans.sort_unstable();
    let mut at = 0;
    for (s, e) in spans {
        assert_eq!(s, at, "tensors tile the data section");
        at = e;
    }
    assert_eq!(at, data_len);
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
        assert_eq!(h.len(), 2);
        assert_eq!(h.metadata["format"], "pt");
        assert_eq!(h.get("b").unwrap().shape, &[] as &[usize]);
        assert_eq!(h.get("a").unwrap().shape, &[2]);
        assert!(h.get("c").is_none());
    }

    #[test]
    fn accepts_what_safetensors_accepts() {
        // Unknown per-tensor fields, a null __metadata__, padding spaces, out-of-order
        // offsets, zero-sized tensors anywhere, an empty header.
        for (header, data) in [
            (
                r#"{"__metadata__":null,"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":[1]}}  "#,
                4,
            ),
            (
                r#"{"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
                3,
            ),
            (
                r#"{"z":{"dtype":"F16","shape":[0,7],"data_offsets":[2,2]},"a":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}}"#,
                2,
            ),
            ("{}", 0),
        ] {
            let f = file_with(header, data);
            parse("f", &f).unwrap_or_else(|e| panic!("{header}: {e}"));
        }
    }

    #[test]
    fn rejects_bad_headers() {
        let cases = [
            (vec![1, 2, 3], "shorter"),
            (u64::MAX.to_le_bytes().to_vec(), "exceeds"),
            (file_with("{not json", 0), "JSON"),
            (file_with("[1, 2]", 0), "JSON"),
            (
                file_with(
                    r#"{"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}}"#,
                    1,
                ),
                "unknown dtype",
            ),
            (
                file_with(
                    r#"{"a":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}"#,
                    4,
                ),
                "unknown dtype 'f32'",
            ),
            (
                file_with(
                    r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,8]}}"#,
                    8,
                ),
                "needs 4",
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
            (
                file_with(
                    r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
                    12,
                ),
                "gap",
            ),
            (
                file_with(
                    r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                    8,
                ),
                "trailing",
            ),
            (
                file_with(
                    r#"{"a":{"dtype":"F32","shape":[0,18446744073709551615],"data_offsets":[0,0]}}"#,
                    0,
                ),
                "i64",
            ),
            (
                file_with(
                    r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                    2,
                ),
                "twice",
            ),
            (
                file_with(
                    r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}}"#,
                    1,
                ),
                "end before",
            ),
            (
                file_with(r#"{"a":{"shape":[1],"data_offsets":[0,1]}}"#, 1),
                "malformed entry",
            ),
            (file_with(r#"{"__metadata__":{"a":1}}"#, 0), "strings"),
            (
                file_with(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                    4,
                ),
                "outside the 4-byte",
            ),
        ];
        for (bytes, needle) in cases {
            let err = parse("file.safetensors", &bytes).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} lacks {needle}");
            assert!(err.contains("file.safetensors"), "{err}");
        }
    }
}
