//! A Hugging Face checkpoint directory: `config.json`, one or many `*.safetensors` shards, the
//! optional `model.safetensors.index.json`, and the other files that travel with a model.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{FormatError, Result};
use crate::input::{read_regular_to_string, stat_input};
use crate::reader::SafetensorsFile;

/// Name of the index of a sharded checkpoint.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

/// Extensions of weight files of other frameworks: never copied next to converted safetensors.
const FOREIGN_WEIGHTS: &[&str] = &["bin", "pt", "pth", "ckpt", "h5", "msgpack", "gguf", "onnx", "pkl", "safetensors"];

/// One shard of a checkpoint.
#[derive(Debug)]
pub struct Shard {
    /// File name inside the checkpoint directory (a plain name, no separators).
    pub name: String,
    /// The opened, validated file.
    pub file: SafetensorsFile,
}

/// An opened checkpoint: every shard mapped and validated, the index checked against them.
#[derive(Debug)]
pub struct Checkpoint {
    /// The checkpoint directory.
    pub root: PathBuf,
    /// Shards in file-name order.
    pub shards: Vec<Shard>,
    /// `config.json`, when present.
    pub config: Option<Value>,
    /// Other files to carry over to a converted checkpoint (tokenizer, generation config, code...),
    /// as plain names inside `root`, sorted.
    pub extra_files: Vec<String>,
    /// Entries of the directory that are not carried over (subdirectories, weights of other
    /// frameworks, hidden files), for the user to see.
    pub skipped_files: Vec<String>,
}

impl Checkpoint {
    /// Opens a checkpoint directory, or a single `.safetensors` file (then with no config and no
    /// extra files). A path that is not there, or is a FIFO or a device, is refused as bad input
    /// without being opened; so is any such file the checkpoint names.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = stat_input(path)?;
        if meta.is_file() {
            let name = plain_name(path)?;
            let root = path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
            let file = SafetensorsFile::open(path)?;
            return Ok(Checkpoint {
                root,
                shards: vec![Shard { name, file }],
                config: None,
                extra_files: vec![],
                skipped_files: vec![],
            });
        }
        let root = path.to_path_buf();
        let config_path = root.join("config.json");
        let config = if config_path.exists() { Some(read_json(&config_path)?) } else { None };
        let index_path = root.join(INDEX_NAME);
        let names = if index_path.exists() { index_files(&index_path)? } else { glob_shards(&root)? };
        if names.is_empty() {
            return Err(FormatError::BadCheckpoint { path: root, reason: "no *.safetensors files found".into() });
        }
        let mut shards = Vec::with_capacity(names.len());
        for name in &names {
            let p = root.join(name);
            check_inside(&root, &p)?;
            shards.push(Shard { name: name.clone(), file: SafetensorsFile::open(&p)? });
        }
        let ckpt_shards = shards;
        check_unique_names(&root, &ckpt_shards)?;
        if index_path.exists() {
            check_index_matches(&index_path, &ckpt_shards)?;
        }
        let (extra_files, skipped_files) = other_files(&root)?;
        Ok(Checkpoint { root, shards: ckpt_shards, config, extra_files, skipped_files })
    }

    /// Total bytes of tensor data over all shards.
    pub fn total_tensor_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.file.header().data_len() as u64).sum()
    }

    /// Finds the shard holding `tensor`.
    pub fn find(&self, tensor: &str) -> Option<(&Shard, &crate::header::TensorInfo)> {
        self.shards.iter().find_map(|s| s.file.header().get(tensor).map(|t| (s, t)))
    }
}

/// Reads and parses a JSON file (a regular file: see [`crate::input::open_regular`]).
pub fn read_json(path: &Path) -> Result<Value> {
    let text = read_regular_to_string(path)?;
    serde_json::from_str(&text)
        .map_err(|e| FormatError::BadJson { path: path.to_owned(), reason: format!("malformed JSON: {e}") })
}

/// JSON as transformers writes it (two-space indent, a final newline), for the file `path`.
pub fn pretty_json<T: serde::Serialize>(v: &T, path: &Path) -> Result<Vec<u8>> {
    let mut b = serde_json::to_vec_pretty(v).map_err(|e| FormatError::Io {
        path: path.to_owned(),
        op: "serialize",
        source: std::io::Error::other(e),
    })?;
    b.push(b'\n');
    Ok(b)
}

fn plain_name(path: &Path) -> Result<String> {
    path.file_name().and_then(|n| n.to_str()).map(str::to_owned).ok_or_else(|| FormatError::BadCheckpoint {
        path: path.to_owned(),
        reason: "file name is not valid UTF-8".into(),
    })
}

/// True when `name` is a plain file name: no separators, not `.`/`..`, not absolute, not empty.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
}

/// Refuses a file that is a symbolic link leading outside the checkpoint directory. Links into the
/// Hugging Face cache's `blobs/` folder beside a `snapshots/<rev>/` directory are the cache's own
/// layout and are accepted.
fn check_inside(root: &Path, path: &Path) -> Result<()> {
    let link = std::fs::symlink_metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            FormatError::BadCheckpoint { path: path.to_owned(), reason: "missing file (named by the index)".into() }
        }
        _ => FormatError::Io { path: path.to_owned(), op: "stat", source: e },
    })?;
    if !link.file_type().is_symlink() {
        return if link.is_file() {
            Ok(())
        } else {
            // Say what it is: stat_input names a FIFO or a device; what is left is a directory.
            stat_input(path)?;
            Err(FormatError::NotRegularFile { path: path.to_owned(), kind: "directory" })
        };
    }
    let target = std::fs::canonicalize(path).map_err(|_| FormatError::BadCheckpoint {
        path: path.to_owned(),
        reason: "symbolic link to a missing file".into(),
    })?;
    let root = std::fs::canonicalize(root).map_err(FormatError::io(root, "canonicalize"))?;
    let hf_blobs = (root.parent().and_then(Path::file_name) == Some("snapshots".as_ref()))
        .then(|| root.parent().and_then(Path::parent).map(|repo| repo.join("blobs")))
        .flatten();
    if target.starts_with(&root) || hf_blobs.is_some_and(|b| target.starts_with(b)) {
        Ok(())
    } else {
        Err(FormatError::BadCheckpoint {
            path: path.to_owned(),
            reason: format!("symbolic link points outside the checkpoint directory (to {})", target.display()),
        })
    }
}

fn index_files(index_path: &Path) -> Result<Vec<String>> {
    let v = read_json(index_path)?;
    let bad = |reason: String| FormatError::BadJson { path: index_path.to_owned(), reason };
    let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| bad("no \"weight_map\" object".into()))?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| bad(format!("tensor {tensor}: file name is not a string")))?;
        if !is_plain_name(file) || Path::new(file).is_absolute() {
            return Err(bad(format!(
                "tensor {tensor}: file {file:?} is not a plain file name inside the checkpoint directory"
            )));
        }
        if !files.iter().any(|f| f == file) {
            files.push(file.to_owned());
        }
    }
    files.sort();
    Ok(files)
}

fn glob_shards(root: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(root).map_err(FormatError::io(root, "read_dir"))? {
        let entry = entry.map_err(FormatError::io(root, "read_dir"))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
        if name.ends_with(".safetensors") && !name.starts_with('.') {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

fn check_unique_names(root: &Path, shards: &[Shard]) -> Result<()> {
    let mut seen: HashMap<&str, &str> = HashMap::new();
    for s in shards {
        for t in &s.file.header().tensors {
            if let Some(first) = seen.insert(&t.name, &s.name) {
                return Err(FormatError::BadTensor {
                    path: root.join(&s.name),
                    tensor: t.name.clone(),
                    reason: format!("also stored in {first}"),
                });
            }
        }
    }
    Ok(())
}

fn check_index_matches(index_path: &Path, shards: &[Shard]) -> Result<()> {
    let v = read_json(index_path)?;
    let map: BTreeMap<&str, &str> = v
        .get("weight_map")
        .and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, f)| f.as_str().map(|f| (k.as_str(), f))).collect())
        .unwrap_or_default();
    for (tensor, file) in &map {
        let shard = shards.iter().find(|s| s.name == *file);
        if shard.is_none_or(|s| s.file.header().get(tensor).is_none()) {
            return Err(FormatError::BadTensor {
                path: index_path.to_owned(),
                tensor: (*tensor).to_owned(),
                reason: format!("the index places it in {file}, which does not hold it"),
            });
        }
    }
    for s in shards {
        for t in &s.file.header().tensors {
            if !map.contains_key(t.name.as_str()) {
                return Err(FormatError::BadTensor {
                    path: s.file.path().to_owned(),
                    tensor: t.name.clone(),
                    reason: format!("not listed in {INDEX_NAME}"),
                });
            }
        }
    }
    Ok(())
}

fn other_files(root: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let (mut keep, mut skip) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(root).map_err(FormatError::io(root, "read_dir"))? {
        let entry = entry.map_err(FormatError::io(root, "read_dir"))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
        let path = entry.path();
        if name == "config.json" || name.ends_with(".safetensors.index.json") || name.ends_with(".safetensors") {
            continue;
        }
        let ext = Path::new(&name).extension().and_then(|e| e.to_str()).unwrap_or("");
        let is_file = std::fs::metadata(&path).map(|m| m.is_file()).unwrap_or(false);
        if name.starts_with('.') || !is_file || FOREIGN_WEIGHTS.contains(&ext) {
            skip.push(name);
        } else {
            check_inside(root, &path)?;
            keep.push(name);
        }
    }
    keep.sort();
    skip.sort();
    Ok((keep, skip))
}
