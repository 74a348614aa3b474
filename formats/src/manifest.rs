//! The sha256 manifest of a converted checkpoint, in the format of `sha256sum`, so that
//! `sha256sum -c SHA256SUMS` checks it with no fp8forge at hand.

use std::collections::BTreeMap;
use std::path::Path;

use crate::atomic::{sha256_file, write_atomic};
use crate::error::{FormatError, Result};
use crate::input::{read_regular_to_string, stat_input};

/// File name of the manifest inside a checkpoint directory.
pub const MANIFEST_NAME: &str = "SHA256SUMS";

/// Writes the manifest of `entries` (file name -> sha256 hex) into `dir`, atomically.
pub fn write_manifest(dir: &Path, entries: &BTreeMap<String, String>) -> Result<crate::atomic::WrittenFile> {
    let text: String = entries.iter().map(|(name, h)| format!("{h}  {name}\n")).collect();
    write_atomic(&dir.join(MANIFEST_NAME), text.as_bytes())
}

/// Reads the manifest of `dir`: file name -> sha256 hex.
pub fn read_manifest(dir: &Path) -> Result<BTreeMap<String, String>> {
    let path = dir.join(MANIFEST_NAME);
    let text = read_regular_to_string(&path)?;
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad =
            || FormatError::BadJson { path: path.clone(), reason: format!("line {}: not \"<sha256>  <file>\"", i + 1) };
        let (h, name) = line.split_once("  ").ok_or_else(bad)?;
        let name = name.strip_prefix('*').unwrap_or(name);
        if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) || !crate::checkpoint::is_plain_name(name) {
            return Err(bad());
        }
        out.insert(name.to_owned(), h.to_ascii_lowercase());
    }
    Ok(out)
}

/// What checking one file against a manifest found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileStatus {
    /// Listed, present, and of the listed sha256.
    Ok,
    /// Listed and present, but of another sha256 (changed or corrupted).
    Mismatch,
    /// Listed but not there.
    Missing,
    /// There but not listed.
    Unlisted,
}

impl FileStatus {
    /// The status as `--json` writes it.
    pub fn name(self) -> &'static str {
        match self {
            FileStatus::Ok => "ok",
            FileStatus::Mismatch => "mismatch",
            FileStatus::Missing => "missing",
            FileStatus::Unlisted => "unlisted",
        }
    }
}

/// One file's result when checking a manifest.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FileCheck {
    /// File name.
    pub file: String,
    /// What was found.
    pub status: FileStatus,
    /// True when the checkpoint is not as its manifest says: a mismatch, a missing file, or an
    /// unlisted file the manifest must cover ([`must_be_listed`]). Other unlisted files (a README
    /// added later) are not a problem.
    pub problem: bool,
}

/// True for the files a manifest must list, those a loader reads: weights (`*.safetensors`),
/// their index (`*.safetensors.index.json`) and `config.json`.
pub fn must_be_listed(name: &str) -> bool {
    name == "config.json" || name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json")
}

/// Checks every file of the manifest of `dir`, and lists files the manifest does not name.
/// `progress` is called with the bytes hashed after each file. A listed name that is a FIFO, a
/// device or a directory is an error ([`FormatError::NotRegularFile`]): it cannot be hashed.
pub fn check_manifest(dir: &Path, mut progress: impl FnMut(u64)) -> Result<Vec<FileCheck>> {
    let entries = read_manifest(dir)?;
    let mut out = Vec::new();
    for (name, expected) in &entries {
        let p = dir.join(name);
        let status = match stat_input(&p) {
            Err(FormatError::Missing { .. }) => FileStatus::Missing,
            Err(e) => return Err(e),
            Ok(m) if !m.is_file() => return Err(FormatError::NotRegularFile { path: p, kind: "directory" }),
            Ok(_) if sha256_file(&p)? == *expected => FileStatus::Ok,
            Ok(_) => FileStatus::Mismatch,
        };
        progress(std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0));
        out.push(FileCheck { file: name.clone(), status, problem: status != FileStatus::Ok });
    }
    let mut unlisted = Vec::new();
    for e in std::fs::read_dir(dir).map_err(FormatError::io(dir, "read_dir"))? {
        let e = e.map_err(FormatError::io(dir, "read_dir"))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != MANIFEST_NAME && !name.starts_with('.') && e.path().is_file() && !entries.contains_key(&name) {
            let problem = must_be_listed(&name);
            unlisted.push(FileCheck { file: name, status: FileStatus::Unlisted, problem });
        }
    }
    unlisted.sort_by(|a, b| a.file.cmp(&b.file));
    out.extend(unlisted);
    Ok(out)
}
