//! A deterministic fuzz test of the safetensors header parser.
//!
//! Valid files are generated from fixed seeds, then mutated in structured ways (the 8-byte length
//! prefix, truncation and extension, JSON syntax, deep nesting, huge, negative, float and
//! overflowing shapes and offsets, unknown and odd dtypes, names with control characters, empty,
//! very long or not UTF-8, repeated keys, `__metadata__` of the wrong type) and byte by byte.
//! Whether a mutant is still valid is decided by an oracle written here from the format's rules
//! (its own JSON reader, sharing no code with `fp8forge-formats`), so a mutant that happens to be
//! valid must be accepted, and every other one refused:
//!
//! - in process, through `header_len` + `parse_header`: accepted exactly when the oracle says
//!   valid; otherwise a `BadHeader` or `BadTensor` error whose message is one line, starts with
//!   the file and is short; no panic;
//! - through the binary (`inspect`, and `convert` for some invalid ones): exit 0 for valid files;
//!   for the others exit 2, exactly one line on stderr naming the file, no panic, no hang (each
//!   run is killed after a timeout and the test fails), nothing under a final name in OUT.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fp8forge_formats::FormatError;
use fp8forge_formats::header::{header_len, parse_header};
use fp8forge_tests::{Rng, bin};

// ---------------------------------------------------------------------------------------------
// The oracle: the rules of a valid safetensors file, from the format's description.

/// Largest header length accepted (as the safetensors crate).
const MAX_HEADER: u64 = 100 * 1024 * 1024;
/// Deepest nesting of arrays and objects accepted (serde_json's limit is 128 levels; the
/// generator only makes nestings far below or far above it).
const MAX_DEPTH: usize = 128;

/// Known dtypes and their sizes in bits.
const DTYPES: &[(&str, u64)] = &[
    ("BOOL", 8),
    ("F4", 4),
    ("F6_E2M3", 6),
    ("F6_E3M2", 6),
    ("U8", 8),
    ("I8", 8),
    ("F8_E5M2", 8),
    ("F8_E4M3", 8),
    ("F8_E8M0", 8),
    ("F8_E4M3FNUZ", 8),
    ("F8_E5M2FNUZ", 8),
    ("I16", 16),
    ("U16", 16),
    ("F16", 16),
    ("BF16", 16),
    ("I32", 32),
    ("U32", 32),
    ("F32", 32),
    ("C64", 64),
    ("F64", 64),
    ("I64", 64),
    ("U64", 64),
];

/// A JSON value as the oracle reads it: numbers keep their literal; objects their entries in order.
#[derive(Debug)]
enum J {
    Null,
    Bool,
    Num(String),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    /// A non-negative integer literal that fits in 64 bits (no sign, fraction or exponent).
    fn as_u64(&self) -> Option<u64> {
        match self {
            J::Num(s) if s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
            _ => None,
        }
    }
}

/// A strict JSON reader (RFC 8259), with no repeated key in any object and at most `MAX_DEPTH`
/// levels of nesting.
struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl Reader<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.b.get(self.i) == Some(&c)).then(|| self.i += 1)
    }

    fn value(&mut self, depth: usize) -> Option<J> {
        self.ws();
        match *self.b.get(self.i)? {
            b'{' | b'[' if depth + 1 >= MAX_DEPTH => None,
            b'{' => {
                self.i += 1;
                let mut entries: Vec<(String, J)> = Vec::new();
                self.ws();
                if self.eat(b'}').is_some() {
                    return Some(J::Obj(entries));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.ws();
                    self.eat(b':')?;
                    let v = self.value(depth + 1)?;
                    if entries.iter().any(|(e, _)| *e == k) && depth > 0 {
                        return None; // a repeated key below the top level is invalid JSON here
                    }
                    entries.push((k, v));
                    self.ws();
                    if self.eat(b'}').is_some() {
                        return Some(J::Obj(entries));
                    }
                    self.eat(b',')?;
                }
            }
            b'[' => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.eat(b']').is_some() {
                    return Some(J::Arr(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    if self.eat(b']').is_some() {
                        return Some(J::Arr(items));
                    }
                    self.eat(b',')?;
                }
            }
            b'"' => self.string().map(J::Str),
            b't' => self.word(b"true").map(|()| J::Bool),
            b'f' => self.word(b"false").map(|()| J::Bool),
            b'n' => self.word(b"null").map(|()| J::Null),
            _ => self.number(),
        }
    }

    fn word(&mut self, w: &[u8]) -> Option<()> {
        (self.b.get(self.i..self.i + w.len())? == w).then(|| self.i += w.len())
    }

    fn number(&mut self) -> Option<J> {
        let start = self.i;
        self.eat(b'-');
        let digits = |r: &mut Self| {
            let s = r.i;
            while r.b.get(r.i).is_some_and(u8::is_ascii_digit) {
                r.i += 1;
            }
            r.i - s
        };
        if self.eat(b'0').is_none() && digits(self) == 0 {
            return None;
        }
        if self.eat(b'.').is_some() && digits(self) == 0 {
            return None;
        }
        if self.b.get(self.i).is_some_and(|c| *c == b'e' || *c == b'E') {
            self.i += 1;
            if self.eat(b'+').is_none() {
                self.eat(b'-');
            }
            if digits(self) == 0 {
                return None;
            }
        }
        let lit = std::str::from_utf8(&self.b[start..self.i]).ok()?.to_owned();
        // A literal whose value is beyond f64 is refused by serde_json ("number out of range").
        lit.parse::<f64>().ok().filter(|v| v.is_finite())?;
        Some(J::Num(lit))
    }

    fn hex4(&mut self) -> Option<u32> {
        let s = std::str::from_utf8(self.b.get(self.i..self.i + 4)?).ok()?;
        if !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        self.i += 4;
        u32::from_str_radix(s, 16).ok()
    }

    fn string(&mut self) -> Option<String> {
        self.eat(b'"')?;
        let mut out = String::new();
        loop {
            let c = *self.b.get(self.i)?;
            self.i += 1;
            match c {
                b'"' => return Some(out),
                0..0x20 => return None,
                b'\\' => {
                    let e = *self.b.get(self.i)?;
                    self.i += 1;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let u = self.hex4()?;
                            let ch = match u {
                                0xD800..0xDC00 => {
                                    self.eat(b'\\')?;
                                    self.eat(b'u')?;
                                    let lo = self.hex4()?;
                                    if !(0xDC00..0xE000).contains(&lo) {
                                        return None;
                                    }
                                    char::from_u32(0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00))?
                                }
                                0xDC00..0xE000 => return None,
                                _ => char::from_u32(u)?,
                            };
                            out.push(ch);
                        }
                        _ => return None,
                    }
                }
                _ => {
                    // The header was checked to be UTF-8 as a whole: copy the whole character.
                    let start = self.i - 1;
                    let len = match c {
                        0xF0.. => 4,
                        0xE0.. => 3,
                        0xC0.. => 2,
                        _ => 1,
                    };
                    out.push_str(std::str::from_utf8(self.b.get(start..start + len)?).ok()?);
                    self.i = start + len;
                }
            }
        }
    }
}

/// The oracle's verdict on a whole file: `Ok(number of tensors)` or `Err(why)`.
fn oracle(file: &[u8]) -> Result<usize, &'static str> {
    let prefix: [u8; 8] = file.get(..8).ok_or("shorter than 8 bytes")?.try_into().map_err(|_| "prefix")?;
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER {
        return Err("header length over the limit");
    }
    if 8 + n as u128 > file.len() as u128 {
        return Err("header runs past the end");
    }
    let json = &file[8..8 + n as usize];
    let text = std::str::from_utf8(json).map_err(|_| "not UTF-8")?;
    let mut r = Reader { b: text.as_bytes(), i: 0 };
    let top = r.value(0).ok_or("not JSON")?;
    r.ws();
    if r.i != r.b.len() {
        return Err("trailing characters after the JSON");
    }
    let J::Obj(entries) = top else { return Err("not an object") };
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (i, (name, v)) in entries.iter().enumerate() {
        if entries[..i].iter().any(|(k, _)| k == name) {
            return Err("repeated name");
        }
        if name == "__metadata__" {
            let J::Obj(m) = v else { return Err("metadata not an object") };
            if !m.iter().all(|(_, v)| matches!(v, J::Str(_))) {
                return Err("metadata value not a string");
            }
            continue;
        }
        let J::Obj(e) = v else { return Err("entry not an object") };
        let field = |f: &str| e.iter().find(|(k, _)| k == f).map(|(_, v)| v);
        let Some(J::Str(dtype)) = field("dtype") else { return Err("no dtype string") };
        let bits = DTYPES.iter().find(|(d, _)| d == dtype).ok_or("unknown dtype")?.1;
        let Some(J::Arr(shape)) = field("shape") else { return Err("no shape array") };
        let mut numel: Option<u64> = Some(1);
        for d in shape {
            let d = d.as_u64().ok_or("dimension not a u64")?;
            numel = numel.and_then(|n| n.checked_mul(d));
        }
        let Some(J::Arr(offs)) = field("data_offsets") else { return Err("no offsets array") };
        let [b, e] = offs.as_slice() else { return Err("offsets not a pair") };
        let (b, e) = (b.as_u64().ok_or("offset not a u64")?, e.as_u64().ok_or("offset not a u64")?);
        if e < b {
            return Err("offsets reversed");
        }
        let nbits = numel.and_then(|n| n.checked_mul(bits)).ok_or("size overflows")?;
        if nbits % 8 != 0 || nbits / 8 != e - b {
            return Err("size differs from the offsets");
        }
        ranges.push((b, e));
    }
    ranges.sort();
    let mut at = 0u64;
    for (b, e) in &ranges {
        if *b != at {
            return Err("offsets do not tile the data");
        }
        at = *e;
    }
    if 8 + n as u128 + at as u128 != file.len() as u128 {
        return Err("data length differs from the file's");
    }
    Ok(ranges.len())
}

// ---------------------------------------------------------------------------------------------
// The generator: valid files, then structured and byte mutations.

/// JSON text of a string: quoted, with `"`, `\` and control characters escaped.
fn quote(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A tensor of a generated file: its JSON key (already quoted, possibly raw bytes) and fields
/// (each already JSON text).
struct Entry {
    key: Vec<u8>,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A generated file before serialization.
struct Gen {
    metadata: Option<Vec<u8>>,
    entries: Vec<Entry>,
    data_len: u64,
    pad: usize,
}

fn pick<'a, T>(rng: &mut Rng, v: &'a [T]) -> &'a T {
    &v[(rng.next_u64() % v.len() as u64) as usize]
}

fn below(rng: &mut Rng, n: u64) -> u64 {
    rng.next_u64() % n.max(1)
}

/// A valid file: 0 to 6 tensors of random known dtypes and small shapes, tiling the data.
fn valid(rng: &mut Rng) -> Gen {
    let count = below(rng, 7);
    let mut entries = Vec::new();
    let mut off = 0u64;
    for i in 0..count {
        let (dtype, bits) = *pick(rng, DTYPES);
        let rank = below(rng, 4);
        let mut shape: Vec<u64> = (0..rank).map(|_| 1 + below(rng, 6)).collect();
        if (shape.iter().product::<u64>() * bits) % 8 != 0 {
            shape.push(8); // sub-byte dtypes: make the bit count whole bytes
        }
        let nbytes = shape.iter().product::<u64>() * bits / 8;
        let name = format!("model.layers.{i}.mlp.w{}.weight", below(rng, 100));
        let shape_text = format!("[{}]", shape.iter().map(u64::to_string).collect::<Vec<_>>().join(","));
        entries.push(Entry {
            key: quote(&name).into_bytes(),
            fields: vec![
                (b"\"dtype\"".to_vec(), quote(dtype).into_bytes()),
                (b"\"shape\"".to_vec(), shape_text.into_bytes()),
                (b"\"data_offsets\"".to_vec(), format!("[{off},{}]", off + nbytes).into_bytes()),
            ],
        });
        off += nbytes;
    }
    // Data order need not be key order.
    for i in (1..entries.len()).rev() {
        let j = below(rng, i as u64 + 1) as usize;
        entries.swap(i, j);
    }
    let metadata = (below(rng, 2) == 0).then(|| b"{\"format\":\"pt\"}".to_vec());
    Gen { metadata, entries, data_len: off, pad: below(rng, 8) as usize }
}

impl Gen {
    fn json(&self) -> Vec<u8> {
        let mut o = b"{".to_vec();
        let mut first = true;
        let mut sep = |o: &mut Vec<u8>| {
            if !std::mem::take(&mut first) {
                o.push(b',');
            }
        };
        if let Some(m) = &self.metadata {
            sep(&mut o);
            o.extend_from_slice(b"\"__metadata__\":");
            o.extend_from_slice(m);
        }
        for e in &self.entries {
            sep(&mut o);
            o.extend_from_slice(&e.key);
            o.push(b':');
            o.push(b'{');
            for (i, (k, v)) in e.fields.iter().enumerate() {
                if i > 0 {
                    o.push(b',');
                }
                o.extend_from_slice(k);
                o.push(b':');
                o.extend_from_slice(v);
            }
            o.push(b'}');
        }
        o.push(b'}');
        o.extend(std::iter::repeat_n(b' ', self.pad));
        o
    }

    fn file(&self, rng: &mut Rng) -> Vec<u8> {
        let json = self.json();
        let mut f = (json.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(&json);
        f.extend((0..self.data_len).map(|_| rng.next_u64() as u8));
        f
    }

    fn field(&mut self, rng: &mut Rng, name: &[u8]) -> Option<&mut Vec<u8>> {
        let n = self.entries.len() as u64;
        if n == 0 {
            return None;
        }
        let e = &mut self.entries[below(rng, n) as usize];
        e.fields.iter_mut().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

/// Nesting `depth` levels deep.
fn nested(depth: usize) -> Vec<u8> {
    let mut v = vec![b'['; depth];
    v.push(b'1');
    v.extend(std::iter::repeat_n(b']', depth));
    v
}

const ODD_NUMBERS: &[&str] = &[
    "-1",
    "-0",
    "1.5",
    "2.0",
    "1e3",
    "1E2",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "340282366920938463463374607431768211456",
    "1e400",
    "-1e400",
    "0x10",
    "01",
    "+1",
    "NaN",
    "Infinity",
    "\"3\"",
    "null",
    "true",
    "[]",
    "{}",
    "[1,2]",
];

const ODD_DTYPES: &[&str] = &[
    "\"Q4_0\"",
    "\"bf16\"",
    "\"\"",
    "\"F8_E4M3 \"",
    "\"F8_E4M3FN\"",
    "\"BF\\u0031\\u0036\"",
    "5",
    "null",
    "[\"BF16\"]",
    "{\"BF16\":1}",
    "\"F16\"",
    "\"I16\"",
    "\"F32\"",
    "\"U8\"",
    "\"F4\"",
];

/// Tensor names that must be handled (the quoted ones are valid JSON strings, the raw ones not).
fn odd_name(rng: &mut Rng) -> Vec<u8> {
    match below(rng, 14) {
        0 => b"\"\"".to_vec(),
        1 => b"\"a\\nb\"".to_vec(),
        2 => b"\"\\u001b[31mred\\u001b[0m\"".to_vec(),
        3 => b"\"tab\\there\\r\\n\"".to_vec(),
        4 => b"\"line\xe2\x80\xa8sep\"".to_vec(),
        5 => b"\"raw\nnewline\"".to_vec(),
        6 => b"\"bad\xff\xfeutf8\"".to_vec(),
        7 => b"\"lone \\ud800 surrogate\"".to_vec(),
        8 => b"\"pair \\ud83d\\ude00 ok\"".to_vec(),
        9 => quote(&"x".repeat(1 + below(rng, 100_000) as usize)).into_bytes(),
        10 => b"\"\\u0000nul\"".to_vec(),
        11 => b"\"__metadata__\"".to_vec(),
        12 => b"\"bad escape \\q\"".to_vec(),
        _ => b"\"../../etc/passwd\"".to_vec(),
    }
}

/// Applies one structured mutation; returns what it did.
fn mutate_structure(g: &mut Gen, rng: &mut Rng) -> String {
    match below(rng, 14) {
        0 => {
            let v = pick(rng, ODD_NUMBERS).to_string();
            let Some(s) = g.field(rng, b"\"shape\"") else { return "none".into() };
            *s = match below(rng, 4) {
                0 => format!("[{v}]").into_bytes(),
                1 => format!("[{v},2]").into_bytes(),
                2 => v.clone().into_bytes(),
                // Many dimensions of 1: the size is unchanged, still valid.
                _ => {
                    let k = below(rng, 2000) as usize;
                    let ones = vec!["1"; k].join(",");
                    if s.as_slice() == b"[]" {
                        *s = format!("[{ones}]").into_bytes();
                    } else if k > 0 {
                        s.truncate(s.len() - 1);
                        s.extend_from_slice(format!(",{ones}]").as_bytes());
                    }
                    return format!("shape padded with {k} ones");
                }
            };
            format!("shape {v}")
        }
        1 => {
            let v = pick(rng, ODD_NUMBERS).to_string();
            let Some(o) = g.field(rng, b"\"data_offsets\"") else { return "none".into() };
            *o = match below(rng, 5) {
                0 => format!("[0,{v}]"),
                1 => format!("[{v},0]"),
                2 => "[0]".into(),
                3 => "[0,1,2]".into(),
                _ => format!("[{v},{v}]"),
            }
            .into_bytes();
            format!("offsets with {v}")
        }
        2 => {
            let shift = *pick(rng, &[1u64, 7, 1 << 32, 1 << 62, u64::MAX / 2]);
            let Some(o) = g.field(rng, b"\"data_offsets\"") else { return "none".into() };
            let t = String::from_utf8_lossy(o).into_owned();
            let nums: Vec<u64> = t.trim_matches(['[', ']']).split(',').filter_map(|x| x.parse().ok()).collect();
            if let [b, e] = nums[..] {
                *o = format!("[{},{}]", b.wrapping_add(shift), e.wrapping_add(shift)).into_bytes();
            }
            format!("offsets shifted by {shift}")
        }
        3 => {
            let d = pick(rng, ODD_DTYPES).to_string();
            let Some(v) = g.field(rng, b"\"dtype\"") else { return "none".into() };
            *v = d.clone().into_bytes();
            format!("dtype {d}")
        }
        4 => {
            if g.entries.is_empty() {
                return "none".into();
            }
            let i = below(rng, g.entries.len() as u64) as usize;
            let name = odd_name(rng);
            let what = format!("name {}", String::from_utf8_lossy(&name[..name.len().min(40)]));
            g.entries[i].key = name;
            what
        }
        5 => {
            let m = match below(rng, 7) {
                0 => "[]",
                1 => "5",
                2 => "null",
                3 => "\"pt\"",
                4 => "{\"format\":1}",
                5 => "{\"format\":{\"nested\":\"x\"}}",
                _ => "{\"a\\nb\":\"c\\u0007\",\"\":\"\"}",
            };
            g.metadata = Some(m.as_bytes().to_vec());
            format!("__metadata__ {m}")
        }
        6 => {
            let depth = *pick(rng, &[3usize, 50, 100, 200, 5000, 100_000]);
            let Some(e) = g.entries.first_mut() else { return "none".into() };
            e.fields.push((b"\"extra\"".to_vec(), nested(depth)));
            format!("extra field nested {depth} deep")
        }
        7 => {
            if g.entries.is_empty() {
                return "none".into();
            }
            let i = below(rng, g.entries.len() as u64) as usize;
            let e = &g.entries[i];
            let copy = Entry { key: e.key.clone(), fields: e.fields.clone() };
            g.entries.push(copy);
            "tensor listed twice".into()
        }
        8 => {
            let Some(e) = g.entries.first_mut().filter(|e| !e.fields.is_empty()) else { return "none".into() };
            let f = e.fields[below(rng, e.fields.len() as u64) as usize].clone();
            e.fields.push(f);
            "field repeated in an entry".into()
        }
        9 => {
            let Some(e) = g.entries.first_mut().filter(|e| !e.fields.is_empty()) else { return "none".into() };
            let i = below(rng, e.fields.len() as u64) as usize;
            e.fields.remove(i);
            "field removed".into()
        }
        10 => {
            let Some(e) = g.entries.first_mut() else { return "none".into() };
            e.fields = vec![];
            e.key.extend_from_slice(b":null,\"z\"");
            "entry not an object".into()
        }
        11 => {
            g.metadata = Some(b"{\"format\":\"pt\",\"format\":\"np\"}".to_vec());
            "metadata key repeated".into()
        }
        12 => {
            let names = ["tensor.a", "tensor.b", "Tensor.A"];
            for (e, n) in g.entries.iter_mut().zip(names) {
                e.key = quote(n).into_bytes();
            }
            "plain distinct names".into()
        }
        _ => {
            g.pad = *pick(rng, &[0usize, 1, 7, 64, 4096]);
            format!("{} spaces of padding", g.pad)
        }
    }
}

/// Applies one mutation to the bytes of a whole file; returns what it did.
fn mutate_bytes(f: &mut Vec<u8>, rng: &mut Rng) -> String {
    if f.len() <= 8 {
        return "none".into();
    }
    let n = u64::from_le_bytes(f[..8].try_into().expect("8 bytes"));
    let json_end = usize::try_from(n).unwrap_or(usize::MAX).saturating_add(8).min(f.len());
    match below(rng, 12) {
        0 => {
            let v = *pick(
                rng,
                &[
                    0,
                    1,
                    2,
                    n.wrapping_add(1),
                    n.wrapping_sub(1),
                    n.wrapping_add(8),
                    u64::MAX,
                    1 << 63,
                    MAX_HEADER + 1,
                    7,
                ],
            );
            f[..8].copy_from_slice(&v.to_le_bytes());
            format!("length prefix {v}")
        }
        1 => {
            let v = (f.len() as u64 - 8 + below(rng, 3)).saturating_sub(1);
            f[..8].copy_from_slice(&v.to_le_bytes());
            format!("length prefix {v} (the whole file)")
        }
        2 => {
            let at = below(rng, f.len() as u64) as usize;
            f.truncate(at);
            format!("truncated to {at} bytes")
        }
        3 => {
            let k = 1 + below(rng, 100) as usize;
            f.extend((0..k).map(|_| rng.next_u64() as u8));
            format!("{k} bytes appended")
        }
        4 | 5 => {
            let at = 8 + below(rng, (json_end - 8) as u64) as usize;
            let b = *pick(rng, b"{}[]\",:0-9e. \n\\\x00\xffau");
            f[at] = b;
            format!("JSON byte {at} set to {b:#04x}")
        }
        6 => {
            let at = 8 + below(rng, (json_end - 8) as u64) as usize;
            f.remove(at);
            format!("JSON byte {at} removed")
        }
        7 => {
            let at = 8 + below(rng, (json_end - 8) as u64) as usize;
            f.insert(at, *pick(rng, b",{[\" "));
            format!("a byte inserted at {at}")
        }
        8 => {
            // Trailing garbage inside the header: replace the padding by other characters.
            let at = json_end - 1;
            let b = *pick(rng, b"\n\t\r\x00x}");
            if f[at] == b' ' || f[at] == b'}' {
                f[at] = b;
            }
            format!("last header byte set to {b:#04x}")
        }
        9 => {
            // Flip one bit anywhere in the prefix or the JSON.
            let at = below(rng, json_end as u64) as usize;
            f[at] ^= 1 << below(rng, 8);
            format!("bit flipped in byte {at}")
        }
        10 => {
            // Replace the whole header by something else of the same length.
            let substitutes: [&[u8]; 7] = [b"[]", b"\"x\"", b"null", b"", b"{", b"{}}", b"{\"a\":1}"];
            let subst = *pick(rng, &substitutes);
            let mut h = subst.to_vec();
            h.resize(json_end - 8, b' ');
            f[8..json_end].copy_from_slice(&h[..json_end - 8]);
            format!("header replaced by {}", String::from_utf8_lossy(subst))
        }
        _ => {
            // A digit of a number changed: shapes and offsets move by a little.
            let digits: Vec<usize> = (8..json_end).filter(|&i| f[i].is_ascii_digit()).collect();
            if digits.is_empty() {
                return "none".into();
            }
            let at = *pick(rng, &digits);
            f[at] = b'0' + below(rng, 10) as u8;
            format!("digit at {at} set to {}", f[at] as char)
        }
    }
}

/// Case `i` of seed `seed`: the file bytes and a description of how it was made.
fn case(seed: u64, i: u64) -> (Vec<u8>, String) {
    let mut rng = Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i);
    let mut g = valid(&mut rng);
    let mut what = Vec::new();
    let kind = below(&mut rng, 10);
    if kind < 6 {
        for _ in 0..1 + below(&mut rng, 2) {
            what.push(mutate_structure(&mut g, &mut rng));
        }
    }
    let mut f = g.file(&mut rng);
    if (4..9).contains(&kind) {
        for _ in 0..1 + below(&mut rng, 2) {
            what.push(mutate_bytes(&mut f, &mut rng));
        }
    }
    if kind == 9 {
        what.push("unmutated (control)".into());
    }
    (f, what.join("; "))
}

// ---------------------------------------------------------------------------------------------
// The checks.

/// At most 300 characters of `s`, for failure messages.
fn clip(s: &str) -> String {
    let mut c: String = s.chars().take(300).collect();
    if c.len() < s.len() {
        c += &format!("... ({} bytes)", s.len());
    }
    c
}

/// Why a message is not one short line naming `path`, if it is not.
fn bad_message(msg: &str, path: &str) -> Option<String> {
    let odd = msg.chars().find(|c| c.is_control() || *c == '\u{2028}' || *c == '\u{2029}');
    if let Some(c) = odd {
        return Some(format!("control character {c:?} in the message"));
    }
    if !msg.contains(path) {
        return Some(format!("the message does not name {path}"));
    }
    if msg.len() > 600 + path.len() {
        return Some(format!("a message of {} bytes", msg.len()));
    }
    None
}

/// Parses `file` as `SafetensorsFile::open` does, from memory.
fn parse(path: &Path, file: &[u8]) -> Result<usize, FormatError> {
    let n = header_len(path, file, file.len() as u64)?;
    parse_header(path, &file[8..8 + n], file.len() as u64).map(|h| h.tensors.len())
}

const IN_PROCESS_CASES: u64 = 20_000;
const BINARY_CASES: u64 = 3_000;
const CONVERT_EVERY: u64 = 10;
const RUN_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn mutated_headers_are_accepted_exactly_when_valid_and_refused_in_one_line_without_panic() {
    let start = Instant::now();
    let path = Path::new("fuzz/case.safetensors");
    let (mut valid, mut invalid) = (0u64, 0u64);
    let mut reasons = std::collections::BTreeMap::<&str, u64>::new();
    for i in 0..IN_PROCESS_CASES {
        let (file, what) = case(1, i);
        let expect = oracle(&file);
        let t = Instant::now();
        let got = std::panic::catch_unwind(|| parse(path, &file))
            .unwrap_or_else(|_| panic!("case {i} ({what}): the parser panicked"));
        assert!(t.elapsed() < Duration::from_secs(2), "case {i} ({what}): took {:?}", t.elapsed());
        match (&expect, &got) {
            (Ok(n), Ok(m)) => {
                assert_eq!(n, m, "case {i} ({what}): tensor count");
                valid += 1;
            }
            (Err(why), Err(e)) => {
                assert!(
                    matches!(e, FormatError::BadHeader { .. } | FormatError::BadTensor { .. }),
                    "case {i} ({what}): refused ({why}) with the wrong variant: {}",
                    clip(&format!("{e:?}"))
                );
                if let Some(b) = bad_message(&e.to_string(), &path.display().to_string()) {
                    panic!("case {i} ({what}): {b}: {}", clip(&e.to_string()));
                }
                *reasons.entry(why).or_default() += 1;
                invalid += 1;
            }
            (Ok(_), Err(e)) => panic!("case {i} ({what}): valid by the oracle, refused: {}", clip(&e.to_string())),
            (Err(why), Ok(_)) => panic!("case {i} ({what}): invalid by the oracle ({why}), accepted"),
        }
    }
    // The generator must exercise both sides and many causes, or the test proves little.
    assert!(valid > IN_PROCESS_CASES / 10, "only {valid} valid cases");
    assert!(invalid > IN_PROCESS_CASES / 2, "only {invalid} invalid cases");
    assert!(reasons.len() >= 15, "only {} causes of refusal: {reasons:?}", reasons.len());
    eprintln!("in process: {valid} valid, {invalid} invalid in {:?}; causes {reasons:?}", start.elapsed());
}

/// Runs `fp8forge args`, killed and failed after `RUN_TIMEOUT`: (exit code, stderr).
fn run(args: &[&std::ffi::OsStr], what: &str) -> (Option<i32>, String) {
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run fp8forge: {e}"));
    let mut err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if t.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: fp8forge {args:?} still running after {RUN_TIMEOUT:?} (hang)");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let err = reader.join().expect("stderr reader");
    (status.code(), String::from_utf8_lossy(&err).into_owned())
}

/// Final-named (not hidden) entries of `out`.
fn finals(out: &Path) -> Vec<String> {
    std::fs::read_dir(out)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn mutated_headers_through_the_binary_exit_0_or_2_with_one_line_naming_the_file() {
    let start = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let next = AtomicUsize::new(0);
    let counts = Mutex::new((0u64, 0u64, 0u64)); // valid, invalid, converted
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst) as u64;
                    if i >= BINARY_CASES {
                        break;
                    }
                    // Seed 2: other cases than the in-process test's.
                    let (file, what) = case(2, i);
                    let what = format!("case {i} ({what})");
                    let p: PathBuf = dir.path().join(format!("case-{i:05}.safetensors"));
                    std::fs::write(&p, &file).expect("write case");
                    let name = p.display().to_string();
                    let expect = oracle(&file);
                    let (code, err) = run(&["inspect".as_ref(), p.as_os_str()], &what);
                    match &expect {
                        Ok(_) => {
                            assert_eq!(code, Some(0), "{what}: valid by the oracle, inspect failed: {}", clip(&err));
                        }
                        Err(why) => {
                            assert_eq!(code, Some(2), "{what}: invalid ({why}): exit code; stderr: {}", clip(&err));
                            assert_eq!(err.matches('\n').count(), 1, "{what}: not one line: {:?}", clip(&err));
                            assert!(err.starts_with("fp8forge: error: "), "{what}: {:?}", clip(&err));
                            if let Some(b) = bad_message(err.trim_end_matches('\n'), &name) {
                                panic!("{what}: {b}: {:?}", clip(&err));
                            }
                        }
                    }
                    let mut c = counts.lock().expect("counts");
                    if expect.is_ok() {
                        c.0 += 1;
                    } else {
                        c.1 += 1;
                    }
                    drop(c);
                    if expect.is_err() && i.is_multiple_of(CONVERT_EVERY) {
                        let out = dir.path().join(format!("out-{i:05}"));
                        let args = ["convert".as_ref(), p.as_os_str(), out.as_os_str(), "--quiet".as_ref()];
                        let (code, err) = run(&args, &what);
                        assert_eq!(code, Some(2), "{what}: convert: exit code; stderr: {}", clip(&err));
                        assert_eq!(err.matches('\n').count(), 1, "{what}: convert: not one line: {:?}", clip(&err));
                        if let Some(b) = bad_message(err.trim_end_matches('\n'), &name) {
                            panic!("{what}: convert: {b}: {:?}", clip(&err));
                        }
                        let left = finals(&out);
                        assert!(left.is_empty(), "{what}: convert left final-named files in OUT: {left:?}");
                        counts.lock().expect("counts").2 += 1;
                    }
                    std::fs::remove_file(&p).expect("remove case");
                }
            });
        }
    });
    let (valid, invalid, converted) = *counts.lock().expect("counts");
    assert_eq!(valid + invalid, BINARY_CASES, "cases run");
    assert!(valid > BINARY_CASES / 10 && invalid > BINARY_CASES / 2, "{valid} valid, {invalid} invalid");
    eprintln!(
        "binary: {valid} valid, {invalid} invalid through inspect, {converted} through convert in {:?}",
        start.elapsed()
    );
}

#[test]
fn oracle_agrees_with_hand_made_cases() {
    let file = |json: &str, data: usize| {
        let mut f = (json.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(json.as_bytes());
        f.extend(std::iter::repeat_n(0u8, data));
        f
    };
    let ok = r#"{"a":{"dtype":"U8","shape":[2,2],"data_offsets":[0,4]},"__metadata__":{"k":"v"}}"#;
    assert_eq!(oracle(&file(ok, 4)), Ok(1));
    assert_eq!(oracle(&file(ok, 5)), Err("data length differs from the file's"));
    assert_eq!(oracle(&file(&ok.replace("[2,2]", "[2,-2]"), 4)), Err("dimension not a u64"));
    assert_eq!(oracle(&file(&ok.replace("[2,2]", "[2,2.0]"), 4)), Err("dimension not a u64"));
    assert_eq!(oracle(&file(&ok.replace("\"U8\"", "\"u8\""), 4)), Err("unknown dtype"));
    assert_eq!(oracle(&file(&ok.replace("\"k\":\"v\"", "\"k\":\"v\",\"k\":\"w\""), 4)), Err("not JSON"));
    assert_eq!(oracle(&file(&ok.replace("\"a\"", "\"\\ud800\""), 4)), Err("not JSON"));
    assert_eq!(oracle(&file(&ok.replace("\"a\"", "\"\\ud83d\\ude00\""), 4)), Ok(1));
    let twice =
        r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}"#;
    assert_eq!(oracle(&file(twice, 0)), Err("repeated name"));
    assert_eq!(oracle(&file("{} \n", 0)), Ok(0));
    assert_eq!(oracle(&file("{}x", 0)), Err("trailing characters after the JSON"));
    for (json, data) in [(ok, 4), (twice, 0), ("{} \n", 0), ("{}x", 0)] {
        let f = file(json, data);
        assert_eq!(oracle(&f).is_ok(), parse(Path::new("x"), &f).is_ok(), "oracle and parser disagree on {json}");
    }
}
