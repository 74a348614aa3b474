//! The safetensors header: parsed and validated whole before any tensor byte is used.
//!
//! Layout of a file: 8 bytes little-endian `n`, then `n` bytes of JSON (an object mapping tensor
//! names to `{"dtype", "shape", "data_offsets": [begin, end]}`, plus an optional `__metadata__`
//! string map), then the data. Offsets are relative to the start of the data and must tile it
//! exactly: sorted, no gaps, no overlaps, the last one ending at the end of the file.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

use safetensors::Dtype;
use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::error::{FormatError, Result};

/// Largest header accepted, as in the safetensors crate: a larger one is a corrupt length field.
pub const MAX_HEADER_LEN: u64 = 100 * 1024 * 1024;

/// One tensor of a validated header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Its element type.
    pub dtype: Dtype,
    /// Its shape (row-major).
    pub shape: Vec<usize>,
    /// Byte range relative to the start of the data section.
    pub begin: usize,
    /// End of the byte range (exclusive).
    pub end: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the data in bytes.
    pub fn nbytes(&self) -> usize {
        self.end - self.begin
    }
}

/// A validated safetensors header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Tensors, in the order of their data in the file.
    pub tensors: Vec<TensorInfo>,
    /// The `__metadata__` map, if any.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Offset of the data section from the start of the file (8 + header length).
    pub data_start: usize,
}

impl Header {
    /// Total size of the data section in bytes.
    pub fn data_len(&self) -> usize {
        self.tensors.last().map_or(0, |t| t.end)
    }

    /// Finds a tensor by name.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Parses a dtype name as safetensors writes it (`"BF16"`, `"F8_E4M3"`, ...).
pub fn parse_dtype(name: &str) -> Option<Dtype> {
    serde_json::from_value(Value::String(name.to_owned())).ok()
}

/// Name of a dtype as safetensors writes it.
pub fn dtype_name(dtype: Dtype) -> String {
    match serde_json::to_value(dtype) {
        Ok(Value::String(s)) => s,
        _ => format!("{dtype:?}"),
    }
}

/// Reads the 8-byte length prefix and checks it against the file size; returns the header length.
pub fn header_len(path: &Path, prefix: &[u8], file_len: u64) -> Result<usize> {
    let bad = |reason: String| FormatError::BadHeader { path: path.to_owned(), reason };
    let Some(len_bytes) = prefix.get(..8) else {
        return Err(bad(format!("file is {file_len} bytes, too short for the 8-byte header length")));
    };
    let mut raw = [0u8; 8];
    raw.copy_from_slice(len_bytes);
    let n = u64::from_le_bytes(raw);
    if n > MAX_HEADER_LEN {
        return Err(bad(format!("header length {n} exceeds the {MAX_HEADER_LEN}-byte limit")));
    }
    if n.checked_add(8).is_none_or(|end| end > file_len) {
        return Err(bad(format!("header length {n} runs past the end of the {file_len}-byte file (truncated?)")));
    }
    usize::try_from(n).map_err(|_| bad(format!("header length {n} does not fit in memory")))
}

/// Parses and validates the header of a file of `file_len` bytes whose header JSON is `json`.
pub fn parse_header(path: &Path, json: &[u8], file_len: u64) -> Result<Header> {
    let bad = |reason: String| FormatError::BadHeader { path: path.to_owned(), reason };
    let text = std::str::from_utf8(json).map_err(|e| bad(format!("header is not UTF-8: {e}")))?;
    // serde_json refuses nesting deeper than 128 levels, so a hostile header cannot exhaust the stack.
    let mut de = serde_json::Deserializer::from_str(text.trim_end_matches(' '));
    let entries = Entries::deserialize(&mut de)
        .and_then(|e| de.end().map(|()| e))
        .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let Entries::Object(entries) = entries else {
        return Err(bad("header is not a JSON object".into()));
    };
    let data_start = 8 + json.len();
    let mut metadata = None;
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(entries.len());
    let mut seen = HashSet::with_capacity(entries.len());
    for (name, entry) in entries {
        if !seen.insert(name.clone()) {
            return Err(FormatError::BadTensor {
                path: path.to_owned(),
                tensor: name,
                reason: "listed twice in the header".into(),
            });
        }
        if name == "__metadata__" {
            metadata = Some(parse_metadata(path, &entry)?);
            continue;
        }
        tensors.push(parse_entry(path, name, &entry)?);
    }
    tensors.sort_by_key(|t| (t.begin, t.end));
    // The offsets must tile [0, data_len) exactly: this rules out overlaps and gaps at once.
    let mut expected = 0usize;
    for t in &tensors {
        if t.begin != expected {
            let what = if t.begin < expected {
                "overlaps the previous tensor"
            } else {
                "leaves a gap after the previous tensor"
            };
            return Err(FormatError::BadTensor {
                path: path.to_owned(),
                tensor: t.name.clone(),
                reason: format!("data_offsets [{}, {}] {what} (expected begin {expected})", t.begin, t.end),
            });
        }
        expected = t.end;
    }
    let end = (data_start as u64).checked_add(expected as u64);
    if end != Some(file_len) {
        let last = tensors.last().map_or("(none)".to_string(), |t| t.name.clone());
        let reason = match end {
            Some(end) if end < file_len => format!("{} trailing bytes after the last tensor {last}", file_len - end),
            Some(end) => {
                format!("data ends at byte {end} but the file has {file_len} bytes (truncated?); last tensor {last}")
            }
            None => {
                format!("data of {expected} bytes runs past the end of the {file_len}-byte file; last tensor {last}")
            }
        };
        return Err(bad(reason));
    }
    Ok(Header { tensors, metadata, data_start })
}

/// The top level of a header: an object's entries in file order, duplicates kept (so that they
/// can be refused naming the tensor), or any other JSON value. Below the top level, an object
/// with a repeated key is refused as invalid JSON: which of the two values counts would be a guess.
enum Entries {
    Object(Vec<(String, Value)>),
    Other,
}

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Top;
        impl<'de> Visitor<'de> for Top {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    v.push((k, m.next_value::<Strict>()?.0));
                }
                Ok(Entries::Object(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> std::result::Result<Entries, A::Error> {
                while s.next_element::<Strict>()?.is_some() {}
                Ok(Entries::Other)
            }
            fn visit_bool<E>(self, _: bool) -> std::result::Result<Entries, E> {
                Ok(Entries::Other)
            }
            fn visit_i64<E>(self, _: i64) -> std::result::Result<Entries, E> {
                Ok(Entries::Other)
            }
            fn visit_u64<E>(self, _: u64) -> std::result::Result<Entries, E> {
                Ok(Entries::Other)
            }
            fn visit_f64<E>(self, _: f64) -> std::result::Result<Entries, E> {
                Ok(Entries::Other)
            }
            fn visit_str<E>(self, _: &str) -> std::result::Result<Entries, E> {
                Ok(Entries::Other)
            }
            fn visit_unit<E>(self) -> std::result::Result<Entries, E> {
                Ok(Entries::Other)
            }
        }
        d.deserialize_any(Top)
    }
}

/// A JSON value whose objects, at every depth, have no repeated key.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Value;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<Value, A::Error> {
                let mut obj = serde_json::Map::new();
                while let Some(k) = m.next_key::<String>()? {
                    let v = m.next_value::<Strict>()?.0;
                    if obj.contains_key(&k) {
                        return Err(A::Error::custom(format!("key {:?} repeated in an object", short(&k))));
                    }
                    obj.insert(k, v);
                }
                Ok(Value::Object(obj))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> std::result::Result<Value, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = s.next_element::<Strict>()? {
                    v.push(x.0);
                }
                Ok(Value::Array(v))
            }
            fn visit_bool<E>(self, b: bool) -> std::result::Result<Value, E> {
                Ok(Value::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> std::result::Result<Value, E> {
                Ok(Value::from(n))
            }
            fn visit_u64<E>(self, n: u64) -> std::result::Result<Value, E> {
                Ok(Value::from(n))
            }
            fn visit_f64<E>(self, n: f64) -> std::result::Result<Value, E> {
                Ok(Value::from(n))
            }
            fn visit_str<E>(self, s: &str) -> std::result::Result<Value, E> {
                Ok(Value::String(s.to_owned()))
            }
            fn visit_string<E>(self, s: String) -> std::result::Result<Value, E> {
                Ok(Value::String(s))
            }
            fn visit_unit<E>(self) -> std::result::Result<Value, E> {
                Ok(Value::Null)
            }
        }
        d.deserialize_any(V).map(Strict)
    }
}

/// At most 64 characters of `s`, with "..." when cut: values quoted in messages stay short.
fn short(s: &str) -> Cow<'_, str> {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => Cow::Owned(format!("{}...", &s[..cut])),
        None => Cow::Borrowed(s),
    }
}

/// A JSON value as compact JSON, [`short`]ened: one line, whatever the value holds.
fn json_short(v: &Value) -> String {
    short(&v.to_string()).into_owned()
}

fn parse_metadata(path: &Path, entry: &Value) -> Result<BTreeMap<String, String>> {
    let bad =
        || FormatError::BadHeader { path: path.to_owned(), reason: "__metadata__ is not a map of strings".into() };
    let Value::Object(m) = entry else { return Err(bad()) };
    m.iter().map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())).ok_or_else(bad)).collect()
}

fn parse_entry(path: &Path, name: String, entry: &Value) -> Result<TensorInfo> {
    let bad = |reason: String| FormatError::BadTensor { path: path.to_owned(), tensor: name.clone(), reason };
    let Value::Object(e) = entry else {
        return Err(bad("entry is not an object".into()));
    };
    let dtype_str =
        e.get("dtype").and_then(Value::as_str).ok_or_else(|| bad("missing or non-string \"dtype\"".into()))?;
    let dtype = parse_dtype(dtype_str).ok_or_else(|| bad(format!("unknown dtype {:?}", short(dtype_str))))?;
    let shape_v =
        e.get("shape").and_then(Value::as_array).ok_or_else(|| bad("missing or non-array \"shape\"".into()))?;
    let mut shape = Vec::with_capacity(shape_v.len());
    for d in shape_v {
        let d = d.as_u64().and_then(|d| usize::try_from(d).ok());
        shape.push(d.ok_or_else(|| {
            bad(format!(
                "shape {} has a dimension that is not a non-negative integer",
                json_short(&Value::Array(shape_v.clone()))
            ))
        })?);
    }
    let offs = e
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing or non-array \"data_offsets\"".into()))?;
    let off = |i: usize| offs.get(i).and_then(Value::as_u64).and_then(|v| usize::try_from(v).ok());
    let (Some(begin), Some(end), 2) = (off(0), off(1), offs.len()) else {
        return Err(bad(format!(
            "data_offsets {} is not a pair of non-negative integers",
            json_short(&Value::Array(offs.clone()))
        )));
    };
    if end < begin {
        return Err(bad(format!("data_offsets [{begin}, {end}] end before they begin")));
    }
    let numel = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let bits = numel.and_then(|n| n.checked_mul(dtype.bitsize()));
    let Some(bits) = bits else {
        return Err(bad(format!("shape {} overflows", short(&format!("{shape:?}")))));
    };
    if bits % 8 != 0 || bits / 8 != end - begin {
        return Err(bad(format!(
            "{dtype_str} × shape {} is {} bits but data_offsets [{begin}, {end}] hold {} bytes",
            short(&format!("{shape:?}")),
            bits,
            end - begin
        )));
    }
    Ok(TensorInfo { name, dtype, shape, begin, end })
}

/// Serializes a header for writing: tensors in the given order with consecutive offsets, the JSON
/// padded with spaces to a multiple of 8 bytes so that the data section starts 8-aligned.
/// Returns the full prefix (8-byte length + JSON) and the data length.
pub fn serialize_header(
    tensors: &[(String, Dtype, Vec<usize>)],
    metadata: Option<&BTreeMap<String, String>>,
) -> (Vec<u8>, u64) {
    let mut obj = serde_json::Map::new();
    if let Some(m) = metadata {
        let m: serde_json::Map<String, Value> = m.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        obj.insert("__metadata__".into(), Value::Object(m));
    }
    let mut offset = 0u64;
    for (name, dtype, shape) in tensors {
        let numel: u64 = shape.iter().map(|&d| d as u64).product();
        let nbytes = numel * dtype.bitsize() as u64 / 8;
        let entry = serde_json::json!({
            "dtype": dtype_name(*dtype),
            "shape": shape,
            "data_offsets": [offset, offset + nbytes],
        });
        obj.insert(name.clone(), entry);
        offset += nbytes;
    }
    let mut json = Value::Object(obj).to_string().into_bytes();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    (out, offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(json: &str, data_len: usize) -> (Vec<u8>, u64) {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        let len = v.len() + data_len;
        (v, len as u64)
    }

    fn parse(json: &str, data_len: usize) -> Result<Header> {
        let (bytes, len) = file_of(json, data_len);
        let p = Path::new("x.safetensors");
        let n = header_len(p, &bytes, len)?;
        parse_header(p, &bytes[8..8 + n], len)
    }

    #[test]
    fn serialized_header_round_trips_and_is_8_aligned() {
        let t = vec![
            ("a".to_string(), Dtype::BF16, vec![3, 5]),
            ("b.weight_scale_inv".to_string(), Dtype::F32, vec![1, 1]),
            ("c".to_string(), Dtype::F8_E4M3, vec![7]),
        ];
        let mut md = BTreeMap::new();
        md.insert("format".to_string(), "pt".to_string());
        let (prefix, data_len) = serialize_header(&t, Some(&md));
        assert_eq!(prefix.len() % 8, 0);
        assert_eq!(data_len, 30 + 4 + 7);
        let h = parse_header(Path::new("x"), &prefix[8..], prefix.len() as u64 + data_len).expect("valid");
        let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b.weight_scale_inv", "c"]);
        assert_eq!(h.metadata, Some(md));
        assert_eq!(h.data_start, prefix.len());
    }

    #[test]
    fn overlapping_offsets_are_refused_naming_the_tensor() {
        let j = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#;
        let e = parse(j, 6).unwrap_err().to_string();
        assert!(e.contains("tensor b") && e.contains("overlaps"), "{e}");
    }

    #[test]
    fn gap_truncation_and_trailing_bytes_are_refused() {
        let j = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[5,9]}}"#;
        assert!(parse(j, 9).unwrap_err().to_string().contains("gap"));
        let j = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
        assert!(parse(j, 3).unwrap_err().to_string().contains("truncated"));
        assert!(parse(j, 5).unwrap_err().to_string().contains("trailing"));
        assert!(parse(j, 4).is_ok());
    }

    #[test]
    fn dtype_shape_mismatch_and_unknown_dtype_are_refused() {
        let j = r#"{"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,4]}}"#;
        assert!(parse(j, 4).unwrap_err().to_string().contains("tensor w"));
        let j = r#"{"w":{"dtype":"Q4_K","shape":[4],"data_offsets":[0,4]}}"#;
        assert!(parse(j, 4).unwrap_err().to_string().contains("unknown dtype"));
        let j = r#"{"w":{"dtype":"U8","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#;
        assert!(parse(j, 4).unwrap_err().to_string().contains("overflows"));
    }

    #[test]
    fn absurd_header_length_is_refused_before_allocating() {
        let mut bytes = (u64::MAX / 2).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let e = header_len(Path::new("x"), &bytes, 10).unwrap_err().to_string();
        assert!(e.contains("exceeds"), "{e}");
        let e = header_len(Path::new("x"), &1000u64.to_le_bytes(), 100).unwrap_err().to_string();
        assert!(e.contains("past the end"), "{e}");
    }

    #[test]
    fn a_tensor_listed_twice_or_a_repeated_field_is_refused() {
        let e = r#"{"dtype":"U8","shape":[0],"data_offsets":[0,0]}"#;
        let twice = parse(&format!(r#"{{"a":{e},"a":{e}}}"#), 0).unwrap_err();
        assert!(
            matches!(&twice, FormatError::BadTensor { tensor, reason, .. } if tensor == "a" && reason.contains("twice")),
            "{twice}"
        );
        let j = r#"{"a":{"dtype":"U8","dtype":"F32","shape":[0],"data_offsets":[0,0]}}"#;
        assert!(parse(j, 0).unwrap_err().to_string().contains("repeated"));
        let j = r#"{"__metadata__":{"k":"v","k":"w"}}"#;
        assert!(parse(j, 0).unwrap_err().to_string().contains("repeated"));
    }

    #[test]
    fn messages_are_one_short_line_whatever_the_names_hold() {
        let j = r#"{"a\nb\u001b[31m":{"dtype":"U8","shape":[4],"data_offsets":[0,5]}}"#;
        let e = parse(j, 5).unwrap_err().to_string();
        assert!(e.contains(r"tensor a\nb\u{1b}[31m:"), "{e}");
        let long = "x".repeat(100_000);
        let j = format!(r#"{{"{long}":{{"dtype":"Q9","shape":[4],"data_offsets":[0,4]}}}}"#);
        let e = parse(&j, 4).unwrap_err().to_string();
        assert!(e.len() < 400 && e.contains("(100000 bytes)"), "{}", &e[..e.len().min(400)]);
        let j = format!(r#"{{"w":{{"dtype":"U8","shape":[{}],"data_offsets":[0,4]}}}}"#, ["1"; 5000].join(",") + ",-1");
        let e = parse(&j, 4).unwrap_err().to_string();
        assert!(e.len() < 400 && e.contains("..."), "{e}");
    }

    #[test]
    fn malformed_json_is_refused() {
        assert!(parse("{\"a\": ", 0).unwrap_err().to_string().contains("not valid JSON"));
        assert!(parse("[1,2]", 0).unwrap_err().to_string().contains("not a JSON object"));
    }
}
